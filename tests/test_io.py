"""Atomic file and folder writes, and the JSON rule every artifact follows."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest

from bidfcl import io as IO


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    IO.write_json(target, {"v": 1})

    def explode(tmp: Path) -> None:
        tmp.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        IO.atomic_write(target, explode)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_write_json_writes_standard_json_with_non_finite_numbers_as_null(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    payload = {"lam": float("inf"), "p": [np.float32("nan"), 1.5], "n": np.int64(3), "t": (1, 2)}

    IO.write_json(target, payload)

    text = target.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"lam": None, "p": [None, 1.5], "n": 3, "t": [1, 2]}


def test_replace_dir_keeps_the_old_folder_when_building_fails(tmp_path: Path) -> None:
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / "kept.txt").write_text("old")

    def broken(tmp: Path) -> None:
        (tmp / "half.txt").write_text("new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        IO.replace_dir(dest, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    assert [p.name for p in dest.iterdir()] == ["kept.txt"]


def test_published_files_and_folders_are_not_world_writable(tmp_path: Path) -> None:
    IO.write_json(tmp_path / "a.json", {"v": 1})
    folder = IO.replace_dir(tmp_path / "model", lambda tmp: (tmp / "w.bin").write_bytes(b"1"))
    for path in (tmp_path / "a.json", folder):
        mode = path.stat().st_mode
        assert mode & stat.S_IROTH and not mode & stat.S_IWOTH, oct(mode)
