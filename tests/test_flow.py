"""The Prefect flow end to end on the small dataset, in a throwaway git + DVC project.

One Prefect test harness serves the whole session. The module runs the flow twice on the
same batch (first model promoted, then an equal challenger rejected) and then on a corrupt
batch (stopped at validation, nothing downstream touched).
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from bidfcl import registry, stages
from bidfcl.cli import app
from bidfcl.params import RUN_PARAMS_FILE, TrackingParams, load_params
from bidfcl.scoring import allocate_file
from test_stages import REPO, make_project

FLOW_FILE = REPO / "flows" / "bidfcl_flow.py"
MODEL_NAME = "bidfcl-uplift"
GIT_COMMIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q"]
COMMITTED_RESULTS = (stages.PROMOTION_FILE, stages.VALIDATION_REPORT)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def flow_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bidfcl_flow", FLOW_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Prefect finds a deployable flow's module by name
    spec.loader.exec_module(module)
    return module


@dataclass
class Runs:
    root: Path
    batch: Path
    first: dict[str, Any]
    second: dict[str, Any]
    params_yaml: bytes  # params.yaml before the runs

    def client(self) -> MlflowClient:
        uri = registry.tracking_uri(self.root, TrackingParams().uri)
        return MlflowClient(uri, uri)


@pytest.fixture(scope="module")
def runs(
    prefect_harness: None,
    flow_module: ModuleType,
    small_dataset_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch_module: pytest.MonkeyPatch,
) -> Runs:
    """Two flow runs on the same batch; tsm-rct as the candidate keeps training short."""
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = tmp_path_factory.mktemp("flow")
    batch = base / "incoming"
    shutil.copytree(small_dataset_dir, batch)
    root = make_project(
        base / "project",
        train={"method": "tsm-rct", "max_epochs": 2, "patience": 1, "baselines": []},
    )
    subprocess.run(
        [*GIT_COMMIT, "--allow-empty", "-m", "project"],
        cwd=root,
        check=True,
    )
    params_yaml = (root / "params.yaml").read_bytes()
    flow = flow_module.bidfcl_pipeline
    first = flow(project_dir=str(root), data_path=str(batch))
    second = flow(project_dir=str(root), data_path=str(batch))
    return Runs(root, batch, first, second, params_yaml)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def dvc_status(root: Path) -> dict:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.status()


def fingerprint(root: Path) -> dict[str, str]:
    """Hashes of every file a rejected batch must leave alone."""
    paths = [
        root / name
        for name in ("params.yaml", RUN_PARAMS_FILE, "data.dvc", "dvc.lock", *COMMITTED_RESULTS)
    ]
    for folder in (stages.LANDING_DIR, stages.RAW_DIR, stages.MODELS_DIR, stages.SCORES_DIR):
        paths += sorted(p for p in (root / folder).rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in paths}


def aliases(client: MlflowClient) -> dict[str, str]:
    return {
        alias: str(client.get_model_version_by_alias(MODEL_NAME, alias).version)
        for alias in client.get_registered_model(MODEL_NAME).aliases
    }


def test_the_flow_records_its_overrides_without_writing_params_yaml(runs: Runs) -> None:
    assert (runs.root / "params.yaml").read_bytes() == runs.params_yaml
    recorded = yaml.safe_load((runs.root / RUN_PARAMS_FILE).read_text())
    assert recorded["ingest"] == {"source": str(runs.batch.resolve())}
    lock = yaml.safe_load((runs.root / "dvc.lock").read_text())
    assert lock["stages"]["ingest"]["params"][RUN_PARAMS_FILE] == {"ingest": recorded["ingest"]}
    # what `dvc repro` and `bidfcl stage` now read is what the run used
    assert load_params(runs.root / "params.yaml").ingest.source == str(runs.batch.resolve())


def test_training_is_tracked_live_with_its_data_and_code(runs: Runs) -> None:
    client = runs.client()
    run_id = runs.second["promotion"]["runs"]["tsm-rct"]["run_id"]
    run = client.get_run(run_id)
    assert run.data.tags["method"] == "tsm-rct"
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=runs.root, capture_output=True, text=True, check=True
    )
    assert run.data.tags["mlflow.source.git.commit"] == head.stdout.strip()
    [dataset] = run.inputs.dataset_inputs
    dvc_md5 = yaml.safe_load((runs.root / "data.dvc").read_text())["outs"][0]["md5"]
    assert dataset.dataset.digest == dvc_md5
    history = client.get_metric_history(run_id, "val_loss")
    assert [m.step for m in history] == list(range(len(history))) and len(history) >= 1
    assert all(m.value > 0 for m in client.get_metric_history(run_id, "epoch_seconds"))
    assert "deployed_value" in run.data.metrics  # the promote stage scored the same run
    assert (
        run.info.start_time
        < client.get_run(runs.second["promotion"]["runs"]["tsm-rct"]["run_id"]).info.end_time
    )


def test_every_epoch_is_a_log_line_and_moves_a_progress_artifact() -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterLevel

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(level=LogFilterLevel(ge_=20)))
    lines = [log.message for log in logs if "epoch" in log.message]
    assert any(line.startswith("tsm-rct: epoch 1/2 train_loss") for line in lines), lines
    progress = flow_artifacts("training-progress")
    assert progress and all(artifact.type == "progress" for artifact in progress)
    assert {float(artifact.data) for artifact in progress} == {100.0}


def test_first_run_completes_and_promotes_exactly_one_champion(runs: Runs) -> None:
    promotion = runs.first["promotion"]
    assert promotion["decision"] == "promoted"
    assert promotion["version"] == promotion["champion_version"] == "1"
    assert [row["method"] for row in runs.first["rows"]] == ["tsm-rct"]
    row = runs.first["rows"][0]
    assert row["deployed_value_ci_low"] < row["deployed_value"] < row["deployed_value_ci_high"]
    assert row["deployed_true_value"] is not None
    assert row["reference"] == "tsm-rct" and row["paired_difference"] == 0.0  # itself
    assert promotion["holdout"]["decisions"] == 1
    versions = runs.client().search_model_versions(f"name='{MODEL_NAME}'")
    promoted = [v for v in versions if v.tags.get("decision") == "promoted"]
    assert [str(v.version) for v in promoted] == ["1"]
    champion = runs.client().get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) == "1"


def flow_artifacts(key: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )


def test_each_run_publishes_a_table_of_methods_and_the_gate_decision(runs: Runs) -> None:
    tables = flow_artifacts("bidfcl-methods")
    assert len(tables) >= 2
    assert all(table.type == "table" and "tsm-rct" in str(table.data) for table in tables)
    descriptions = " ".join(str(table.description) for table in tables)
    assert "promoted" in descriptions
    assert "rejected (no proven gain over champion v1" in descriptions


def test_dvc_knows_everything_the_flow_wrote(runs: Runs) -> None:
    assert dvc_status(runs.root) == {}
    tracked = yaml.safe_load((runs.root / "data.dvc").read_text())
    assert tracked["outs"][0]["path"] == "data/raw"
    assert tracked["outs"][0]["md5"] == tracked["deps"][0]["md5"]
    assert sorted(p.name for p in (runs.root / "data" / "raw").glob("*.parquet")) == [
        "obs.parquet",
        "rct_test.parquet",
        "rct_train.parquet",
        "rct_val.parquet",
        "truth.parquet",
    ]


def test_second_run_on_the_same_data_promotes_nothing_and_says_why(runs: Runs) -> None:
    promotion = runs.second["promotion"]
    assert promotion["decision"] == "rejected"
    # the same seed retrains the same model: every user gets the same arm, so the paired
    # difference is exactly 0 and its lower bound cannot clear the margin
    assert promotion["reason"].startswith("no proven gain over champion v1")
    assert promotion["difference"] == 0.0 and promotion["agreement"] == 1.0
    assert promotion["champion_version"] == "1"
    assert promotion["holdout"]["decisions"] == 2  # both runs judged on the same rct_test
    client = runs.client()
    version = client.get_model_version(MODEL_NAME, promotion["version"])
    assert version.tags["decision"] == "rejected"
    assert version.tags["reason"] == promotion["reason"]
    assert version.tags["holdout_uses"] == "2"
    assert str(client.get_model_version_by_alias(MODEL_NAME, "challenger").version) == "2"
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"


def test_the_champion_loads_from_the_registry_and_allocates(
    runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = CliRunner().invoke(
        app,
        [
            "resolve-model",
            f"models:/{MODEL_NAME}@champion",
            "--root",
            str(runs.root),
            "--params",
            str(runs.root / "params.yaml"),
            "--dest",
            str(tmp_path / "champion"),
        ],
    )
    assert result.exit_code == 0, result.output
    model_dir = Path(result.stdout.strip().splitlines()[-1])
    users = tmp_path / "users.parquet"
    pd.read_parquet(runs.batch / "rct_test.parquet").to_parquet(users)
    plan = tmp_path / "plan.parquet"
    allocation = allocate_file(model_dir, users, budget=1.0, out=plan)
    assert allocation.mean_cost <= 1.0 + 1e-6

    monkeypatch.chdir(runs.root)  # `bidfcl allocate` finds the registry through params.yaml
    from_registry = tmp_path / "plan-from-registry.parquet"
    result = CliRunner().invoke(
        app,
        [
            "allocate",
            f"models:/{MODEL_NAME}@champion",
            str(users),
            "--budget",
            "1.0",
            "--out",
            str(from_registry),
        ],
    )
    assert result.exit_code == 0, result.output
    assert pd.read_parquet(from_registry).equals(pd.read_parquet(plan))


def test_a_corrupt_batch_stops_at_validation_and_touches_nothing(
    runs: Runs, flow_module: ModuleType, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(runs.batch, corrupt)
    frame = pd.read_parquet(corrupt / "rct_train.parquet")
    frame.loc[frame.index[:5], "treatment"] = 9
    frame.to_parquet(corrupt / "rct_train.parquet", index=False)
    before = fingerprint(runs.root)
    before_aliases = aliases(runs.client())
    n_versions = len(runs.client().search_model_versions(f"name='{MODEL_NAME}'"))

    state = flow_module.bidfcl_pipeline(
        project_dir=str(runs.root), data_path=str(corrupt), return_state=True
    )

    assert state.is_failed()
    with pytest.raises(stages.ValidationFailed, match=r"rct_train\.parquet.*treatment"):
        state.result()
    # data/landing, the report, params files, dvc.lock, data, models, metrics: as they were
    assert fingerprint(runs.root) == before
    assert not list(runs.root.glob(".snapshot.*"))
    assert any("rct_train.parquet" in str(a.data) for a in flow_artifacts("validation-report"))
    assert len(runs.client().search_model_versions(f"name='{MODEL_NAME}'")) == n_versions
    assert aliases(runs.client()) == before_aliases


def test_the_nightly_deployment_matches_prefect_yaml(flow_module: ModuleType) -> None:
    declared = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    nightly = next(d for d in declared if d["name"] == "nightly")
    assert nightly == flow_module.nightly_deployment()
    assert nightly["entrypoint"] == "flows/bidfcl_flow.py:bidfcl_pipeline"
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
    assert nightly["concurrency_limit"] == 1  # runs share params.yaml, data/ and the registry
    flow = flow_module.bidfcl_pipeline
    assert set(nightly["parameters"]) <= set(flow.parameters.properties)
    assert flow.validate_parameters(nightly["parameters"]) == nightly["parameters"]
    deployment = flow_module.nightly_runner()  # what `--serve` serves
    assert deployment.schedules[0].schedule.cron == "0 2 * * *"
    assert deployment.parameters == nightly["parameters"]
    assert deployment.concurrency_limit == 1


def test_only_transient_errors_are_retried(flow_module: ModuleType) -> None:
    from prefect.states import Failed

    def retried(error: Exception) -> bool:
        return flow_module.transient(None, None, Failed(data=error))

    assert retried(ConnectionError("registry unreachable"))
    assert retried(TimeoutError("timed out"))
    assert retried(RuntimeError("(sqlite3.OperationalError) database is locked"))
    assert not retried(FileNotFoundError("data/incoming: not a dataset folder"))
    assert not retried(ValueError("rct_train.parquet: column treatment out of range"))


def test_a_retried_promotion_reuses_its_runs_and_version(runs: Runs) -> None:
    """Last in this file: it adds a version to the shared registry."""
    params = load_params(runs.root / "params.yaml")
    client = runs.client()
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    assert experiment is not None
    n_runs = len(client.search_runs([experiment.experiment_id]))
    before = len(client.search_model_versions(f"name='{MODEL_NAME}'"))
    first = stages.promote(runs.root, params.promote, params.tracking, promotion_key="flow-run-7")
    again = stages.promote(runs.root, params.promote, params.tracking, promotion_key="flow-run-7")
    assert again["version"] == first["version"] and again["runs"] == first["runs"]
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == before + 1
    assert again["holdout"]["decisions"] == first["holdout"]["decisions"]
    assert len(client.search_runs([experiment.experiment_id])) == n_runs  # scored, not re-logged
