"""Atomic writes of files and folders, and the one JSON rule every artifact follows.

A reader (a stage, DVC, a user) must never see a half-written file or model folder, and a
failed stage must leave the previous artifacts in place: everything is built beside its
destination and renamed into place. JSON has no NaN or infinity, so non-finite numbers
(an infinite lambda, an undefined p-value) are written as ``null``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FILE_MODE = 0o644  # published artifacts are readable by all, writable by their owner only
DIR_MODE = 0o755


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place.

    A crash or an exception leaves the previous file (if any) untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        build(staging)
        staging.chmod(DIR_MODE)  # mkdtemp creates 0700
        if dest.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            os.replace(dest, retired / dest.name)
            os.replace(staging, dest)
            shutil.rmtree(retired)
        else:
            os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


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
