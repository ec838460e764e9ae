"""Shared fixtures: one small simulated dataset per test session (tests copy it to corrupt it)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bidfcl.contract import Dataset

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

SMALL = {"n_obs": 4000, "n_rct": 3000, "seed": 7}


@pytest.fixture(scope="session")
def small_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid simulated dataset folder, shared read-only by the whole session."""
    from bidfcl.simulate import SimulatorConfig, simulate_to_folder

    out = tmp_path_factory.mktemp("sim") / "data"
    simulate_to_folder(out, SimulatorConfig(**SMALL), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny() -> Dataset:
    """An in-memory simulated dataset small enough for one- or two-epoch training runs."""
    from bidfcl.simulate import SimulatorConfig, simulate

    return simulate(SimulatorConfig(n_obs=2000, n_rct=1500, seed=11))


@pytest.fixture
def dataset_copy(small_dataset_dir: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the small dataset."""
    dst = tmp_path / "data"
    shutil.copytree(small_dataset_dir, dst)
    return dst


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
