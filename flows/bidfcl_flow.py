"""The Prefect flow: ingest -> validate -> version -> train -> evaluate -> promote -> push.

Each task calls the same stage functions as ``bidfcl stage NAME`` and ``dvc repro``, then
records the stage in DVC (``dvc commit``), so after a flow run ``dvc status`` is clean and
``dvc repro`` has nothing to do; the train task trains the methods at once, one task each in
worker processes, where the stage trains them one after another. A batch that fails
validation stops the flow there: the report becomes a Prefect artifact, data/landing is put
back, and the versioned data, models, metrics and registry keep their previous state.
A successful run ends by pushing the data and models to the DVC remote; a push that fails
fails the flow run (exit 1) with the error, and keeps the run's results: rerun the push alone
with ``bidfcl stage push``.

Run once:      python flows/bidfcl_flow.py [--data-path DIR] [--budget B] [--project-dir DIR]
Serve nightly: python flows/bidfcl_flow.py --serve   (schedule and parameters from prefect.yaml)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import cloudpickle
import yaml
from prefect import flow, get_run_logger, serve, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner

from bidfcl import stages
from bidfcl.gate import PromoteParams
from bidfcl.io import project_lock, restrict_umask
from bidfcl.learner import EpochSummary
from bidfcl.params import (
    PARAMS_FILE,
    EvaluateParams,
    IngestParams,
    TrackingParams,
    TrainParams,
    ValidateParams,
    load_params,
    write_run_overrides,
)
from bidfcl.registry import redacted
from bidfcl.scoring import Metrics

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"
# The task runner's worker processes cannot import this file by name (flows/ is no package),
# so the tasks sent to them travel by value (as they do unasked when it runs as __main__ or
# was loaded without an entry in sys.modules).
if __name__ in sys.modules:
    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only errors that can pass on their own: a dropped connection, a time-out, a lock
    another process holds (DVC's, a sqlite registry's), files a DVC remote failed to take;
    also as the cause of a stage's own error (a failed push). A missing folder or bad data
    fails the same way every time, so it is not retried."""
    try:
        state.result()
    except Exception as error:
        for cause in (error, error.__cause__):
            if isinstance(cause, ConnectionError | TimeoutError):
                return True
            if type(cause).__name__ in ("LockError", "UploadError"):
                return True
        return "database is locked" in str(error).lower()
    return False


@task(name="ingest", retries=2, retry_delay_seconds=5, retry_condition_fn=transient)
def ingest_task(root: Path, config: IngestParams) -> str:
    """Copies can fail transiently (a network share, a batch still being written): retried.
    DVC records the landed batch only once it has passed validation."""
    return str(stages.ingest(root, config))


@task(name="validate")
def validate_task(root: Path, config: ValidateParams) -> dict[str, Any]:
    """Not retried: a broken batch stays broken. Its report becomes a flow-run artifact; the
    flow then puts data/landing and the committed report back as they were."""
    try:
        return stages.validate(root, config)
    except stages.ValidationFailed as failure:
        create_markdown_artifact(
            key="validation-report",
            markdown=f"## Validation failed\n\n```\n{failure}\n```",
            description="The batch broke the data contract; nothing downstream ran.",
        )
        raise


@task(name="version", retries=2, retry_delay_seconds=5, retry_condition_fn=transient)
def version_task(root: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Record the accepted batch: the run's overrides in params.run.yaml, the ingest and
    validate stages in dvc.lock, then DVC imports the batch into data/raw. DVC's repository
    lock may be held by another process for a moment: retried (each step is idempotent)."""
    write_run_overrides(root, overrides)
    stages.record_stage(root, "ingest")
    stages.record_stage(root, "validate")
    return stages.version(root)


@task(name="train-method", task_run_name="train-{method}")
def train_method_task(
    root: Path, config: TrainParams, method: str, staging: Path, tracking: TrackingParams
) -> dict[str, str]:
    """One method in a worker process and its own MLflow run, live: each epoch is a log line
    here, a step of the run's metrics, and an update of the method's progress artifact."""
    logger = get_run_logger()
    progress_id = create_progress_artifact(
        progress=0.0, key=f"training-progress-{method}", description=f"Training {method}"
    )

    def on_epoch(method: str, summary: EpochSummary) -> None:
        logger.info(stages.epoch_line(method, summary))
        done = (summary.epoch + 1) / max(1, summary.max_epochs)
        update_progress_artifact(progress_id, progress=round(100 * min(done, 1.0), 1))

    run = stages.train_method(root, config, method, staging, tracking, on_epoch=on_epoch)
    update_progress_artifact(progress_id, progress=100.0)
    return run


@task(name="train")
def train_task(root: Path, config: TrainParams, tracking: TrackingParams) -> list[str]:
    """The candidate and each baseline train at once, one task each (the flow's process pool),
    into one staging folder; ``models/`` is replaced only once all of them succeeded. The
    progress artifact counts the methods whose task has ended."""
    methods = config.methods
    progress_id = create_progress_artifact(
        progress=0.0, key="training-progress", description=f"Training {', '.join(methods)}"
    )

    def train_all(staging: Path) -> dict[str, dict[str, str]]:
        # The workers report to this run's API server: where that is Prefect's temporary
        # one (no PREFECT_API_URL), each would otherwise start a temporary server of its own.
        with temporary_settings({PREFECT_API_URL: str(get_client(sync_client=True).api_url)}):
            futures = {
                method: train_method_task.submit(root, config, method, staging, tracking)
                for method in methods
            }
        for ended, _ in enumerate(as_completed(list(futures.values())), 1):
            update_progress_artifact(progress_id, round(100 * ended / len(methods), 1))
        # every task has finished (none still writes to staging): the first failure raises
        return {method: future.result() for method, future in futures.items()}

    trained = stages.publish_models(root, methods, train_all, tracking)
    stages.record_stage(root, "train")
    return trained


@task(name="evaluate")
def evaluate_task(root: Path, config: EvaluateParams) -> dict[str, Metrics]:
    metrics = stages.evaluate(root, config)
    stages.record_stage(root, "evaluate")
    return metrics


@task(name="promote", retries=2, retry_delay_seconds=5, retry_condition_fn=transient)
def promote_task(root: Path, config: PromoteParams, tracking: TrackingParams) -> dict[str, Any]:
    """The registry (a database, possibly remote) can be briefly unavailable: retried. The
    flow run's id keys the promotion, so a retry reuses the version the first try registered."""
    promotion = stages.promote(root, config, tracking, promotion_key=flow_run.id)
    stages.record_stage(root, "promote")
    return promotion


@task(name="push", retries=2, retry_delay_seconds=5, retry_condition_fn=transient)
def push_task(root: Path) -> dict[str, Any]:
    """Last, once every result is recorded: the remote (storage, possibly over a network) can
    be briefly unavailable, so retried; a push changes nothing locally, so a failure leaves
    the run's results standing."""
    pushed = stages.push(root)
    get_run_logger().info(
        f"DVC remote {pushed['remote']}: {pushed['pushed']} file(s) pushed (data/raw, models/)"
    )
    return pushed


def run_overrides(data_path: str | None, budget: float | None) -> dict[str, Any]:
    """The flow's parameters as dotted overrides of params.yaml."""
    overrides: dict[str, Any] = {}
    if data_path is not None:
        overrides["ingest.source"] = str(Path(data_path).resolve())
    if budget is not None:
        overrides |= {"train.budget": float(budget), "evaluate.budget": float(budget)}
    return overrides


# Processes, not threads (measured by `make run` on the idle 2-core VM): threads share the
# GIL, so Bi-DFCL's epochs took 3.3 s instead of 2.2 s and the train step 98 s instead of
# 78-83 s (`bidfcl stage train`, one method after another: 124 s); and they share process-wide
# state (Lightning seeds torch's global random generator), so tsm-rct and tsm-obs came out
# with other weights than the train stage gives. Each worker trains with train.num_threads
# torch threads (1) and starts when the tasks are submitted (about 10 s of imports), at most
# one per CPU (PREFECT_TASKS_RUNNER_PROCESS_POOL_MAX_WORKERS overrides that).
@flow(name="bidfcl-pipeline", log_prints=True, task_runner=ProcessPoolTaskRunner())
def bidfcl_pipeline(
    project_dir: str = ".",
    data_path: str | None = None,
    budget: float | None = None,
) -> dict[str, Any]:
    """Validate, version, train, evaluate and gate one batch of logs, then push the versioned
    data and models to the DVC remote (a failed push fails the run and undoes nothing).

    ``data_path``: a dataset folder with the new batch (None: ``ingest.source`` in
    params.yaml, by default the simulator). ``budget``: mean cost per user for training and
    evaluation (None: params.yaml, else the dataset's default). The settings are read once,
    here, and handed to each task, so a concurrent edit of params.yaml cannot reach a
    running flow. params.yaml is never written: once the batch is accepted, the overrides
    go to params.run.yaml, which dvc.lock records. A rejected batch leaves data/landing,
    params.run.yaml, dvc.lock, the data and the registry as they were. The stages run under
    the project lock (:func:`bidfcl.io.project_lock`), so a second flow on the same project
    waits for this one instead of mixing its batch, models or promotion into it.
    """
    restrict_umask()  # also for runs a Prefect worker starts: nothing written is world-writable
    root = Path(project_dir).resolve()
    overrides = run_overrides(data_path, budget)
    params = load_params(root / PARAMS_FILE, overrides, run_overrides=False)

    # One flow at a time per project, whatever started it: a second one waits here.
    with project_lock(root):
        with stages.restore_on_failure(root, [stages.LANDING_DIR, stages.VALIDATION_REPORT]):
            ingest_task(root, params.ingest)
            validate_task(root, params.validate)
        version_task(root, overrides)
        train_task(root, params.train, params.tracking)
        metrics = evaluate_task(root, params.evaluate)
        promotion = promote_task(root, params.promote, params.tracking)
        pushed = push_task(root, return_state=True)

    rows = stages.summary_rows(metrics)
    create_table_artifact(
        key="bidfcl-methods",
        table=rows,
        description=(
            f"EOM on held-out RCT per method. Gate: {promotion['method']} "
            f"v{promotion['version']} {promotion['decision']} ({promotion['reason']}); "
            f"champion is v{promotion['champion_version']}."
        ),
    )
    return {
        "rows": rows,
        "promotion": promotion,
        # a failed push raises its error here: the flow run fails, the results above stay
        "push": pushed.result(),
        "curves": str(root / stages.BUDGET_VALUE_PNG),
        "metrics": str(root / stages.METRICS_FILE),
    }


def nightly_deployment() -> dict[str, Any]:
    """The deployment declared in prefect.yaml (one source for ``prefect deploy`` and serve)."""
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    return next(d for d in spec["deployments"] if d["name"] == "nightly")


def nightly_runner() -> Any:
    """prefect.yaml's nightly deployment for ``serve``: schedule, parameters and its limit
    of one run at a time."""
    declared = nightly_deployment()
    return bidfcl_pipeline.to_deployment(
        name=declared["name"],
        cron=declared["schedules"][0]["cron"],
        parameters=declared["parameters"],
        concurrency_limit=declared["concurrency_limit"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", default=".")
    parser.add_argument("--data-path", default=None)
    parser.add_argument("--budget", type=float, default=None)
    parser.add_argument("--serve", action="store_true", help="serve the nightly deployment")
    args = parser.parse_args()
    # Prefect's ephemeral API server can take longer than its default 20 s on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    if args.serve:
        serve(nightly_runner())
        return
    try:
        result = bidfcl_pipeline(args.project_dir, args.data_path, args.budget)
    except stages.PushFailed as failure:
        sys.exit(f"error: {failure}")
    promotion = result["promotion"]
    print()
    print(stages.render_table(result["rows"]))
    print()
    print(
        f"gate: {promotion['method']} version {promotion['version']} {promotion['decision']}: "
        f"{promotion['reason']}"
    )
    print(f"champion: {promotion['model_name']} version {promotion['champion_version']}")
    holdout = promotion["holdout"]
    print(
        f"held-out {holdout['table']} (md5 {holdout['md5'][:8]}) has now served "
        f"{holdout['decisions']} gate decision(s); a new RCT batch refreshes it"
    )
    print(f"metrics: {result['metrics']}   budget-value curves: {result['curves']}")
    print(f"MLflow: mlflow ui --backend-store-uri {redacted(promotion['tracking_uri'])}")


if __name__ == "__main__":
    main()
