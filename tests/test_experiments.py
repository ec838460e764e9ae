"""DVC experiments are try-outs: they train, score and log to MLflow, but never register a
model or move an alias (the registry belongs to the pipeline run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bidfcl import registry
from bidfcl.params import TrackingParams
from test_stages import FAST_TRAIN, make_project

MODEL_NAME = "bidfcl-uplift"
DVC = str(Path(sys.executable).with_name("dvc"))
GIT_COMMIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q"]


def registry_state(client: MlflowClient) -> tuple[int, dict[str, str]]:
    """How many versions the model has, and which version each alias points at."""
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    aliases = {
        alias: str(client.get_model_version_by_alias(MODEL_NAME, alias).version)
        for alias in client.get_registered_model(MODEL_NAME).aliases
    }
    return len(versions), aliases


@dataclass
class Project:
    root: Path
    env: dict[str, str]
    client: MlflowClient

    def run(self, *args: str) -> str:
        done = subprocess.run(args, cwd=self.root, capture_output=True, text=True, env=self.env)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout


@pytest.fixture(scope="module")
def project(small_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """A committed project whose pipeline run (`dvc repro`) registered version 1 as champion."""
    root = make_project(
        tmp_path_factory.mktemp("experiments") / "project",
        ingest={"source": str(small_dataset_dir)},
        train={**FAST_TRAIN, "method": "tsm-rct", "baselines": []},
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    uri = registry.tracking_uri(root, TrackingParams().uri)
    project = Project(root, env, MlflowClient(uri, uri))
    project.run(DVC, "repro")
    project.run("git", "add", "-A")
    project.run(*GIT_COMMIT, "-m", "baseline")
    yield project


@pytest.mark.parametrize(
    "mode",
    [
        "workspace",
        pytest.param("temp", marks=pytest.mark.slow),  # each also a full training run
        pytest.param("queue", marks=pytest.mark.slow),
    ],
)
def test_dvc_exp_run_never_touches_the_registry(project: Project, mode: str) -> None:
    before = registry_state(project.client)
    assert before == (1, {"challenger": "1", "champion": "1"})

    name = f"try-{mode}"
    options = {"workspace": [], "temp": ["--temp"], "queue": ["--queue"]}[mode]
    project.run(DVC, "exp", "run", "-n", name, *options, "-S", "train.seed=1")
    if mode == "queue":
        project.run(DVC, "exp", "run", "--run-all")

    assert registry_state(project.client) == before
    experiment = project.client.get_experiment_by_name(TrackingParams().experiment)
    assert experiment is not None
    logged = project.client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.dvc_experiment = '{name}'"
    )
    # the experiment's training run, in the project's own store (also from a temp copy),
    # with its held-out scores
    assert [r.data.tags["method"] for r in logged] == ["tsm-rct"]
    assert "deployed_value" in logged[0].data.metrics
    assert name in project.run(DVC, "exp", "show", "--json")
    if mode == "workspace":
        promotion = json.loads((project.root / "results" / "promotion.json").read_text())
        assert promotion["version"] is None and promotion["dvc_experiment"] == name
        assert promotion["decision"].startswith("would be")
