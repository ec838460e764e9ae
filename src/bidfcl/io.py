"""Atomic writes of files and folders, the one JSON rule every artifact follows, and the
project lock.

A reader (a stage, DVC, a user) must never see a half-written file or model folder, and a
failed stage must leave the previous artifacts in place: everything is built beside its
destination and renamed into place. A folder is built in ``.NAME.PID.*`` beside it, so the
next build of NAME removes what a killed process left (its PID no longer runs) and nothing a
running one is writing. JSON has no NaN or infinity, so non-finite numbers (an infinite
lambda, an undefined p-value) are written as ``null``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FILE_MODE = 0o644  # published artifacts are readable by all, writable by their owner only
DIR_MODE = 0o755
LOCK_FILE = ".bidfcl.lock"  # in the project root: see project_lock

log = logging.getLogger(__name__)
_held_locks: set[Path] = set()  # the lock files this process holds


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place.

    A crash or an exception leaves the previous file (if any) untouched.
    """
    path = Path(path)
    _make_dirs(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(FILE_MODE)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_dir(dest: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder in a temporary sibling, then swap it in for ``dest``.

    An exception in ``build`` leaves ``dest`` exactly as it was; the old folder is moved
    aside before the rename and deleted after it, so no reader sees a half-built folder.
    Staging folders that killed builds of ``dest`` left behind are removed first.
    """
    dest = Path(dest)
    _make_dirs(dest.parent)
    remove_stale_staging(dest)
    prefix = f".{dest.name}.{os.getpid()}."
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
    try:
        build(staging)
        _publish_modes(staging)  # mkdtemp creates 0700; a builder's files follow the umask
        if dest.exists():
            retired = Path(tempfile.mkdtemp(prefix=f"{prefix}old.", dir=dest.parent))
            os.replace(dest, retired / dest.name)
            os.replace(staging, dest)
            shutil.rmtree(retired)
        else:
            os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _make_dirs(folder: Path) -> None:
    """``mkdir -p`` with every new folder DIR_MODE (``mkdir -p`` itself gives 0777 to the
    parents it creates under a umask of 0)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for parent in reversed(missing):
        parent.mkdir(mode=DIR_MODE, exist_ok=True)


def _publish_modes(tree: Path) -> None:
    """Folders DIR_MODE and files FILE_MODE throughout ``tree``. Links are left alone (a
    chmod would act on their target), and so is a file already in its mode (a hard link
    to a published file, which this process may not own)."""
    for path in [tree, *tree.rglob("*")]:
        if not path.is_symlink():
            mode = DIR_MODE if path.is_dir() else FILE_MODE
            if path.stat().st_mode & 0o7777 != mode:
                path.chmod(mode)


def restrict_umask() -> None:
    """Add o+w to the process umask, so nothing this process creates is world-writable:
    DVC, MLflow, Great Expectations and git write with the umask, not through this module.
    Entry points (the CLI, the flow) call it once."""
    os.umask(os.umask(0o022) | 0o002)


def remove_stale_staging(dest: Path) -> list[Path]:
    """Delete the ``.NAME.PID.*`` folders beside ``dest`` whose process no longer runs (a
    build killed before it could clean up); return them. A live process's are kept."""
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(\d+)\.(old\.)?[^.]+")
    removed = []
    for sibling in dest.parent.glob(f".{dest.name}.*"):
        found = pattern.fullmatch(sibling.name)
        if found and sibling.is_dir() and not _process_runs(int(found.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    return removed


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def project_lock(root: Path) -> Iterator[None]:
    """Hold the project's lock (an exclusive ``flock`` on ``root/.bidfcl.lock``) for the block,
    waiting while another process holds it, so two runs never interleave their writes to the
    project and its registry.

    Re-entrant within a process: a flow that holds it runs stages that take it too. The
    operating system releases it when its holder exits, even by SIGKILL, so a crashed run
    never leaves the project locked.
    """
    path = (Path(root) / LOCK_FILE).resolve()
    if path in _held_locks:
        yield
        return
    _make_dirs(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            log.warning("%s: waiting for the project lock, held by %s", root, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({Path(sys.argv[0]).name})\n".encode(), 0)
        _held_locks.add(path)
        try:
            yield
        finally:
            _held_locks.discard(path)
    finally:
        os.close(fd)  # releases the lock


def write_json(path: Path, payload: Any) -> None:
    """Atomically write ``payload`` as pretty, standard JSON (see :func:`json_ready`)."""
    text = json.dumps(json_ready(payload), indent=2, default=_json_default, allow_nan=False)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    """Atomically write a frame as parquet (no index)."""
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def json_ready(value: Any) -> Any:
    """A copy with every non-finite float as None, numpy scalars as Python numbers and
    tuples as lists."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
