"""The Prefect flow: ingest -> validate -> version -> train -> evaluate -> promote.

Each task calls the same stage function as ``bidfcl stage NAME`` and ``dvc repro``, then
records the stage in DVC (``dvc commit``), so after a flow run ``dvc status`` is clean and
``dvc repro`` has nothing to do. A batch that fails validation stops the flow there: the
report becomes a Prefect artifact and the versioned data, models, metrics and registry keep
their previous state.

Run once:      python flows/bidfcl_flow.py [--data-path DIR] [--budget B] [--project-dir DIR]
Serve nightly: python flows/bidfcl_flow.py --serve   (schedule and parameters from prefect.yaml)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, serve, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from bidfcl import stages
from bidfcl.params import PARAMS_FILE, Params, load_params, set_params
from bidfcl.scoring import Metrics

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


def _params(root: Path) -> Params:
    return load_params(root / PARAMS_FILE)


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only errors that can pass on their own: a dropped connection, a time-out, a lock
    another process holds (DVC's, a sqlite registry's). A missing folder or bad data fails
    the same way every time, so it is not retried."""
    try:
        state.result()
    except (ConnectionError, TimeoutError):
        return True
    except Exception as error:
        text = str(error).lower()
        return type(error).__name__ == "LockError" or "database is locked" in text
    return False


@task(name="ingest", retries=2, retry_delay_seconds=5, retry_condition_fn=transient)
def ingest_task(root: Path) -> str:
    """Copies can fail transiently (a network share, a batch still being written): retried.
    DVC records the landed batch only once it has passed validation."""
    return str(stages.ingest(root, _params(root).ingest))


@task(name="validate")
def validate_task(root: Path) -> dict[str, Any]:
    """Not retried: a broken batch stays broken. Its report becomes a flow-run artifact, and
    neither the batch nor the report reaches dvc.lock."""
    try:
        report = stages.validate(root, _params(root).validate)
    except stages.ValidationFailed as failure:
        create_markdown_artifact(
            key="validation-report",
            markdown=f"## Validation failed\n\n```\n{failure}\n```",
            description="The batch broke the data contract; nothing downstream ran.",
        )
        raise
    stages.record_stage(root, "ingest")
    stages.record_stage(root, "validate")
    return report


@task(name="version", retries=2, retry_delay_seconds=5, retry_condition_fn=transient)
def version_task(root: Path) -> dict[str, Any]:
    """DVC's repository lock may be held by another process for a moment: retried."""
    return stages.version(root)


@task(name="train")
def train_task(root: Path) -> list[str]:
    methods = stages.train(root, _params(root).train)
    stages.record_stage(root, "train")
    return methods


@task(name="evaluate")
def evaluate_task(root: Path) -> dict[str, Metrics]:
    metrics = stages.evaluate(root, _params(root).evaluate)
    stages.record_stage(root, "evaluate")
    return metrics


@task(name="promote", retries=2, retry_delay_seconds=5, retry_condition_fn=transient)
def promote_task(root: Path) -> dict[str, Any]:
    """The registry (a database, possibly remote) can be briefly unavailable: retried. The
    flow run's id keys the promotion, so a retry reuses what the first try logged."""
    promotion = stages.promote(root, _params(root).promote, promotion_key=flow_run.id)
    stages.record_stage(root, "promote")
    return promotion


@flow(name="bidfcl-pipeline", log_prints=True)
def bidfcl_pipeline(
    project_dir: str = ".",
    data_path: str | None = None,
    budget: float | None = None,
) -> dict[str, Any]:
    """Validate, version, train, evaluate and gate one batch of logs.

    ``data_path``: a dataset folder with the new batch (None: ``ingest.source`` in
    params.yaml, by default the simulator). ``budget``: mean cost per user for training and
    evaluation (None: params.yaml, else the dataset's default). Both are written to
    params.yaml so DVC's lock records what this run used.
    """
    root = Path(project_dir).resolve()
    overrides: dict[str, Any] = {}
    if data_path is not None:
        overrides["ingest.source"] = str(Path(data_path).resolve())
    if budget is not None:
        overrides |= {"train.budget": float(budget), "evaluate.budget": float(budget)}
    if overrides:
        set_params(root / PARAMS_FILE, overrides)

    ingest_task(root)
    validate_task(root)
    version_task(root)
    train_task(root)
    metrics = evaluate_task(root)
    promotion = promote_task(root)

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
        "curves": str(root / stages.CURVES_DIR),
        "metrics": str(root / stages.METRICS_DIR),
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
    result = bidfcl_pipeline(args.project_dir, args.data_path, args.budget)
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
    print(f"metrics: {result['metrics']}/   budget-value curves: {result['curves']}/")
    print(f"MLflow: mlflow ui --backend-store-uri {promotion['tracking_uri']}")


if __name__ == "__main__":
    main()
