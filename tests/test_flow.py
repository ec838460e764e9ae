"""The Prefect flow end to end on the small dataset, in a throwaway git + DVC project.

One Prefect test harness (conftest.py) serves the whole session. The module runs the flow
twice on the same batch (first model promoted, then an equal challenger rejected) and then on
a corrupt batch (stopped at validation, nothing downstream touched); each successful run
pushes to the project's default DVC remote (a folder beside it), which a copy of the project
pulls back from. A run whose push fails, in a project of its own, fails and keeps its
results. Then, in another project, a candidate and a baseline train at once (a second run's
baseline diverges).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
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
from bidfcl.methods import TrainingDiverged
from bidfcl.model import UpliftModel
from bidfcl.params import RUN_PARAMS_FILE, TrackingParams, load_params
from bidfcl.scoring import allocate_file
from test_resume import same_weights
from test_stages import REPO, make_project

MODEL_NAME = "bidfcl-uplift"
GIT_COMMIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q"]
COMMITTED_RESULTS = (stages.PROMOTION_FILE, stages.VALIDATION_REPORT)


@dataclass
class Runs:
    root: Path
    batch: Path
    first: dict[str, Any]
    second: dict[str, Any]
    params_yaml: bytes  # params.yaml before the runs

    def client(self) -> MlflowClient:
        return registry_client(self.root)


def registry_client(root: Path) -> MlflowClient:
    """The project's own MLflow store (the default sqlite file)."""
    uri = registry.tracking_uri(root, TrackingParams().uri)
    return MlflowClient(uri, uri)


@pytest.fixture(scope="module")
def runs(
    prefect_harness: None,
    pipeline_flow: ModuleType,
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
    flow = pipeline_flow.bidfcl_pipeline
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


def cached_outputs(root: Path) -> list[str]:
    """The outputs DVC caches (what a push uploads), as project-relative paths."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return sorted(out.def_path for out in repo.index.outs if out.use_cache)


def output_digests(root: Path, outputs: list[str]) -> dict[str, str]:
    files = [path for out in outputs for path in sorted((root / out).rglob("*")) if path.is_file()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_the_remote_gives_back_every_artifact_the_run_versioned(runs: Runs) -> None:
    """A copy of the project without DVC's cache and the cached outputs pulls them back,
    byte for byte, from the default remote the flow pushed to (.dvc/config's folder beside
    the checkout: the copy sits beside the project, so it reaches the same remote)."""
    remote = runs.root.parent / "bidfcl-dvc-remote"
    assert runs.first["push"]["remote"] == "local"
    assert runs.first["push"]["pushed"] > 0 and any(p.is_file() for p in remote.rglob("*"))
    # incremental: the second run's data is the first's, only what changed goes up
    assert runs.second["push"]["pushed"] < runs.first["push"]["pushed"]
    outputs = cached_outputs(runs.root)
    assert outputs == ["data/raw", "models"]
    expected = output_digests(runs.root, outputs)
    assert any(name.endswith("weights.pt") for name in expected)

    clone = runs.root.parent / "clone"
    shutil.copytree(runs.root, clone, symlinks=True)
    shutil.rmtree(clone / ".dvc" / "cache")
    # data/validated is data.dvc's import source: without it the data can only come back
    # from the remote
    for gone in (*outputs, "data/validated", "data/landing"):
        shutil.rmtree(clone / gone)
    dvc = Path(sys.executable).with_name("dvc")
    pulled = subprocess.run([dvc, "pull"], cwd=clone, capture_output=True, text=True)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert output_digests(clone, outputs) == expected
    again = CliRunner().invoke(app, ["stage", "push", "--root", str(clone)])
    assert again.exit_code == 0, again.output
    assert "DVC remote local: 0 file(s) pushed" in again.output  # it holds them all


def test_a_failed_push_to_the_remote_says_so_and_changes_nothing(
    runs: Runs, tmp_path: Path
) -> None:
    copy = tmp_path / "project"
    shutil.copytree(runs.root, copy, symlinks=True)
    (tmp_path / "blocker").write_text("a file where the remote's folder should be")
    dvc = Path(sys.executable).with_name("dvc")
    subprocess.run(
        [dvc, "remote", "add", "--local", "broken", str(tmp_path / "blocker" / "remote")],
        cwd=copy,
        check=True,
    )
    before = fingerprint(copy)
    with pytest.raises(stages.PushFailed, match=r"remote broken failed.*results are in place"):
        stages.push(copy, "broken")
    assert fingerprint(copy) == before


def test_a_run_whose_push_to_the_remote_fails_fails_and_keeps_its_results(
    prefect_harness: None,
    pipeline_flow: ModuleType,
    small_dataset_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = make_project(
        tmp_path / "project",
        train={"method": "tsm-rct", "max_epochs": 2, "patience": 1, "baselines": []},
    )
    subprocess.run([*GIT_COMMIT, "--allow-empty", "-m", "project"], cwd=root, check=True)
    (tmp_path / "blocker").write_text("a file where the remote's folder should be")
    dvc = Path(sys.executable).with_name("dvc")
    for command in (
        ["remote", "add", "--local", "broken", str(tmp_path / "blocker" / "r")],
        ["remote", "default", "--local", "broken"],
    ):
        subprocess.run([dvc, *command], cwd=root, check=True)

    state = pipeline_flow.bidfcl_pipeline(
        project_dir=str(root), data_path=str(small_dataset_dir), return_state=True
    )

    assert state.is_failed()
    with pytest.raises(stages.PushFailed, match=r"remote broken failed.*results are in place"):
        state.result()
    promotion = json.loads((root / stages.PROMOTION_FILE).read_text())
    assert promotion["decision"] == "promoted"  # the gate's decision stands
    assert stages.read_manifest(root)["methods"] == ["tsm-rct"]
    assert dvc_status(root) == {}  # data, models and results recorded, nothing undone
    champion = registry_client(root).get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) == promotion["version"]


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
    runs: Runs, pipeline_flow: ModuleType, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(runs.batch, corrupt)
    frame = pd.read_parquet(corrupt / "rct_train.parquet")
    frame.loc[frame.index[:5], "treatment"] = 9
    frame.to_parquet(corrupt / "rct_train.parquet", index=False)
    before = fingerprint(runs.root)
    before_aliases = aliases(runs.client())
    n_versions = len(runs.client().search_model_versions(f"name='{MODEL_NAME}'"))

    state = pipeline_flow.bidfcl_pipeline(
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


def test_the_nightly_deployment_matches_prefect_yaml(pipeline_flow: ModuleType) -> None:
    declared = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    nightly = next(d for d in declared if d["name"] == "nightly")
    assert nightly == pipeline_flow.nightly_deployment()
    assert nightly["entrypoint"] == "flows/bidfcl_flow.py:bidfcl_pipeline"
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
    assert nightly["concurrency_limit"] == 1  # runs share params.yaml, data/ and the registry
    flow = pipeline_flow.bidfcl_pipeline
    assert set(nightly["parameters"]) <= set(flow.parameters.properties)
    assert flow.validate_parameters(nightly["parameters"]) == nightly["parameters"]
    deployment = pipeline_flow.nightly_runner()  # what `--serve` serves
    assert deployment.schedules[0].schedule.cron == "0 2 * * *"
    assert deployment.parameters == nightly["parameters"]
    assert deployment.concurrency_limit == 1


def test_only_transient_errors_are_retried(pipeline_flow: ModuleType) -> None:
    from prefect.states import Failed

    def retried(error: Exception) -> bool:
        return pipeline_flow.transient(None, None, Failed(data=error))

    assert retried(ConnectionError("registry unreachable"))
    assert retried(TimeoutError("timed out"))
    assert retried(RuntimeError("(sqlite3.OperationalError) database is locked"))
    assert not retried(FileNotFoundError("data/incoming: not a dataset folder"))
    assert not retried(ValueError("rct_train.parquet: column treatment out of range"))
    from dvc.exceptions import UploadError

    failed_upload = stages.PushFailed("dvc push failed")
    failed_upload.__cause__ = UploadError(3)
    assert retried(failed_upload)  # files the remote did not take are pushed again


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


# --------------------------------------------------------------------------- parallel training

PARALLEL_METHODS = ["tsm-rct", "tsm-obs"]  # the candidate first


@dataclass
class Parallel:
    root: Path
    flow_run_id: Any
    published: Path  # a copy of the models/ the flow published


@pytest.fixture(scope="module")
def parallel(
    prefect_harness: None,
    pipeline_flow: ModuleType,
    small_dataset_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch_module: pytest.MonkeyPatch,
) -> Parallel:
    """One flow run training a candidate and a baseline, in a project of its own."""
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = tmp_path_factory.mktemp("parallel")
    root = make_project(
        base / "project",
        train={
            "method": PARALLEL_METHODS[0],
            "baselines": PARALLEL_METHODS[1:],
            "max_epochs": 12,
            "patience": 12,
        },
    )
    subprocess.run([*GIT_COMMIT, "--allow-empty", "-m", "project"], cwd=root, check=True)
    state = pipeline_flow.bidfcl_pipeline(
        project_dir=str(root), data_path=str(small_dataset_dir), return_state=True
    )
    assert state.is_completed(), state
    published = base / "published"
    shutil.copytree(root / stages.MODELS_DIR, published)
    return Parallel(root, state.state_details.flow_run_id, published)


def task_runs(flow_run_id: Any, names: list[str]) -> dict[str, Any]:
    """The finished flow run's task runs by name, once ``names`` are among them and all have
    ended (Prefect records task run states from events, a moment after the flow returns)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 60
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        named = {run.name: run for run in runs}
        if set(names) <= set(named) and all(run.end_time for run in runs):
            return named
        assert time.monotonic() < deadline, f"task runs never ended: {named}"
        time.sleep(0.5)


def test_each_method_trains_in_its_own_task_at_the_same_time(parallel: Parallel) -> None:
    names = [f"train-{method}" for method in PARALLEL_METHODS]
    runs = task_runs(parallel.flow_run_id, names)
    training = [runs.pop(name) for name in names]
    assert all(run.state.is_completed() for run in training)
    # each started before the other ended: submitted together, not one after the other
    for run, other in zip(training, reversed(training), strict=True):
        assert run.start_time < other.end_time, (run.start_time, other.end_time)
    # the train task submitted them, and published once both had ended
    [parent] = [run for run in runs.values() if run.name.startswith("train-")]
    for run in training:
        assert [p.id for p in run.task_inputs["__parents__"]] == [parent.id]
        assert run.end_time < parent.end_time
    for method in PARALLEL_METHODS:
        assert {float(a.data) for a in flow_artifacts(f"training-progress-{method}")} == {100.0}


def test_the_flow_publishes_what_the_train_stage_trains(parallel: Parallel) -> None:
    params = load_params(parallel.root / "params.yaml")
    flow_runs = json.loads((parallel.root / stages.TRAINING_RUNS_FILE).read_text())
    assert list(flow_runs) == PARALLEL_METHODS

    assert stages.train(parallel.root, params.train) == PARALLEL_METHODS  # one after another

    models = parallel.root / stages.MODELS_DIR
    manifest = {"candidate": PARALLEL_METHODS[0], "methods": PARALLEL_METHODS}
    assert json.loads((parallel.published / stages.MANIFEST_FILE).read_text()) == manifest
    assert stages.read_manifest(parallel.root) == manifest
    assert sorted(p.name for p in parallel.published.iterdir()) == sorted(
        p.name for p in models.iterdir()
    )
    for method in PARALLEL_METHODS:
        assert same_weights(
            UpliftModel.load(parallel.published / method), UpliftModel.load(models / method)
        )
    stage_runs = json.loads((parallel.root / stages.TRAINING_RUNS_FILE).read_text())
    assert list(stage_runs) == PARALLEL_METHODS
    assert all(stage_runs[m]["run_id"] != flow_runs[m]["run_id"] for m in PARALLEL_METHODS)


def test_a_method_failing_in_its_task_fails_the_flow_and_publishes_nothing(
    parallel: Parallel, pipeline_flow: ModuleType, small_dataset_dir: Path
) -> None:
    """dfcl-ppl's decision phase diverges while tsm-rct trains fine beside it."""
    root = parallel.root
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"] |= {"baselines": ["dfcl-ppl"], "decision_lr": 1e30, "warm_start_epochs": 1}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    watched = [stages.TRAINING_RUNS_FILE, *COMMITTED_RESULTS]
    before = {p: (root / p).read_bytes() for p in watched} | fingerprint(root)
    uri = registry.tracking_uri(root, TrackingParams().uri)
    client = MlflowClient(uri, uri)
    n_versions = len(client.search_model_versions(f"name='{MODEL_NAME}'"))

    state = pipeline_flow.bidfcl_pipeline(
        project_dir=str(root), data_path=str(small_dataset_dir), return_state=True
    )

    assert state.is_failed()
    with pytest.raises(TrainingDiverged, match="dfcl-ppl"):
        state.result()
    runs = task_runs(state.state_details.flow_run_id, ["train-tsm-rct", "train-dfcl-ppl"])
    assert runs["train-tsm-rct"].state.is_completed() and runs["train-dfcl-ppl"].state.is_failed()
    assert {p: (root / p).read_bytes() for p in watched} | fingerprint(root) == before
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == n_versions
    assert not [p.name for p in root.iterdir() if p.name.startswith(".models.")]
    assert (root / stages.CHECKPOINTS_DIR / "tsm-rct").is_dir()  # a rerun resumes from it
