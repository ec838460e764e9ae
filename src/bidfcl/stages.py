"""The pipeline's stages as library functions: ingest, validate, version, train, evaluate, promote.

The CLI (``bidfcl stage ...``), ``dvc.yaml`` and the Prefect flow all call these functions, so
the three entry points run the same code. Every stage takes only its own ``params.yaml``
section (a :mod:`bidfcl.params` dataclass) and writes its artifacts at fixed paths under the
project root, each file or folder replaced atomically so a failed stage leaves the previous
artifacts in place.

Data layout and versioning (see ``dvc.yaml`` and ``data.dvc``):

- ``ingest`` writes the arriving batch to ``data/landing`` (simulated from params, or copied
  from a dataset folder); it is a dvc.yaml stage, so ``dvc repro`` works from a fresh clone.
- ``validate`` checks ``data/landing`` and writes ``results/validation.json``.
- ``version`` is ``data.dvc``: a DVC import of ``data/landing`` into ``data/raw``. DVC copies
  the validated tables into its cache and records their hashes in ``data.dvc``; every later
  stage reads ``data/raw``, never the landing folder.
- ``train`` writes ``models/<method>/`` and ``models/manifest.json``; ``evaluate`` writes
  ``results/metrics/<method>.json`` and ``results/curves/<method>.csv``; ``promote`` logs the
  runs to MLflow, applies the gate and writes ``results/promotion.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import chdir, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from bidfcl.gate import PromoteParams, decide
from bidfcl.io import replace_dir, write_json
from bidfcl.params import (
    SIMULATE,
    EvaluateParams,
    IngestParams,
    TrainParams,
    ValidateParams,
)
from bidfcl.scoring import Metrics

LANDING_DIR = Path("data/landing")
RAW_DIR = Path("data/raw")
DATA_DVC = "data.dvc"
VALIDATION_REPORT = Path("results/validation.json")
MODELS_DIR = Path("models")
MANIFEST_FILE = "manifest.json"
METRICS_DIR = Path("results/metrics")
CURVES_DIR = Path("results/curves")
PROMOTION_FILE = Path("results/promotion.json")


class ValidationFailed(RuntimeError):
    """The landing batch broke the data contract; the message is the readable report."""


# --------------------------------------------------------------------------- stages


def ingest(root: Path, config: IngestParams, progress: bool = False) -> Path:
    """Write the arriving batch to ``data/landing``: simulated, or a copy of a dataset folder."""
    from bidfcl.simulate import SimulatorConfig, simulate_to_folder

    dest = root / LANDING_DIR
    if config.source == SIMULATE:
        simulator = SimulatorConfig(
            n_obs=config.n_obs,
            n_rct=config.n_rct,
            n_treatments=config.n_treatments,
            seed=config.seed,
        )
        return replace_dir(dest, lambda tmp: simulate_to_folder(tmp, simulator, progress))
    source = Path(config.source)
    source = source if source.is_absolute() else root / source
    if not source.is_dir():
        raise FileNotFoundError(f"ingest.source: {source} is not a dataset folder")

    def copy(tmp: Path) -> None:
        shutil.copytree(source, tmp, dirs_exist_ok=True)

    return replace_dir(dest, copy)


def validate(root: Path, config: ValidateParams) -> dict[str, Any]:
    """Check ``data/landing`` against the suites; write the report; raise if it failed."""
    from bidfcl.validation import validate_dataset, write_report

    with chdir(root):  # the committed report names project-relative paths
        report = validate_dataset(LANDING_DIR, config.suites)
    write_report(report, root / VALIDATION_REPORT)
    if not report.passed:
        raise ValidationFailed(report.render())
    return report.to_dict()


def version(root: Path) -> dict[str, Any]:
    """Version the validated batch: DVC imports ``data/landing`` into ``data/raw``.

    This reproduces the ``data.dvc`` stage (copy into the cache, hashes into data.dvc); it is
    a no-op when the landing folder has not changed since the last version.
    """
    with _dvc_repo(root) as repo:
        repo.reproduce(DATA_DVC, single_item=True)
    tracked = yaml.safe_load((root / DATA_DVC).read_text())
    return {key: tracked["outs"][0].get(key) for key in ("path", "md5", "size", "nfiles")}


def train(root: Path, config: TrainParams, progress: bool = False) -> list[str]:
    """Train ``train.method`` and ``train.baselines`` on ``data/raw`` into ``models/<method>/``."""
    from bidfcl.methods import train_to_folder

    methods = config.methods
    configs = [config.config_for(method) for method in methods]

    def build(tmp: Path) -> None:
        for method_config in configs:
            train_to_folder(root / RAW_DIR, tmp / method_config.method, method_config, progress)
        write_json(tmp / MANIFEST_FILE, {"candidate": methods[0], "methods": methods})

    replace_dir(root / MODELS_DIR, build)
    return methods


def read_manifest(root: Path) -> dict[str, Any]:
    """Which model is the candidate, and which methods were trained."""
    path = root / MODELS_DIR / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trained models (run the train stage first)")
    return json.loads(path.read_text())


def evaluate(root: Path, config: EvaluateParams) -> dict[str, Metrics]:
    """Score every trained model on held-out RCT: metrics JSON and budget-value curve CSV."""
    from bidfcl.scoring import evaluate_model

    methods = read_manifest(root)["methods"]
    results: dict[str, Metrics] = {}

    def build_metrics(metrics_tmp: Path) -> None:
        def build_curves(curves_tmp: Path) -> None:
            for method in methods:
                results[method] = evaluate_model(
                    root / MODELS_DIR / method,
                    root / RAW_DIR,
                    metrics_tmp / f"{method}.json",
                    config.budget,
                    table=config.table,
                    estimator=config.estimator,
                    curve_out=curves_tmp / f"{method}.csv",
                )

        replace_dir(root / CURVES_DIR, build_curves)

    replace_dir(root / METRICS_DIR, build_metrics)
    return results


def promote(root: Path, config: PromoteParams) -> dict[str, Any]:
    """Log every trained method to MLflow, register the candidate as ``challenger`` and apply
    the gate; write ``results/promotion.json`` with the decision."""
    from bidfcl import registry

    manifest = read_manifest(root)
    metrics = {
        method: Metrics.read(root / METRICS_DIR / f"{method}.json")
        for method in manifest["methods"]
    }
    report_path = root / VALIDATION_REPORT
    validation_passed = report_path.exists() and bool(
        json.loads(report_path.read_text()).get("passed")
    )
    candidate = manifest["candidate"]
    with registry.tracking(root, config):
        runs = {
            method: registry.log_training_run(
                root / MODELS_DIR / method,
                metrics[method],
                root / CURVES_DIR / f"{method}.csv",
            )
            for method in manifest["methods"]
        }
        version_number = registry.register_challenger(runs[candidate]["model_uri"], config)
        champion_eom = _rescore_champion(
            config, root / RAW_DIR, metrics[candidate], exclude_version=version_number
        )
        baseline = metrics.get(config.baseline)
        decision = decide(
            metrics[candidate],
            validation_passed,
            config,
            champion_eom,
            None if baseline is None else baseline.eom,
        )
        registry.record_decision(config, version_number, decision)
    summary = {
        "model_name": config.model_name,
        "version": version_number,
        "method": candidate,
        "decision": "promoted" if decision.promoted else "rejected",
        **{k: v for k, v in asdict(decision).items() if k != "promoted"},
        "champion_version": registry.champion_version(root, config),
        # as configured (relative to the project root), so the committed file is portable
        "tracking_uri": os.environ.get(registry.TRACKING_ENV) or config.tracking_uri,
        "runs": runs,
    }
    write_json(root / PROMOTION_FILE, summary)
    return summary


def _rescore_champion(
    config: PromoteParams, data_dir: Path, challenger: Metrics, exclude_version: str
) -> float | None:
    """The current champion's EOM on the challenger's held-out table, budget and estimator;
    None when there is no champion (or it is the challenger itself). Runs inside
    :func:`bidfcl.registry.tracking`."""
    from bidfcl import registry
    from bidfcl.scoring import score_saved_model

    version = registry.alias_version(config, registry.CHAMPION)
    if version is None or version == exclude_version:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        folder = registry.resolve_model_uri(f"models:/{config.model_name}/{version}", Path(tmp))
        metrics, _ = score_saved_model(
            folder, data_dir, challenger.budget, challenger.table, challenger.estimator
        )
    return metrics.eom


# --------------------------------------------------------------------------- DVC bookkeeping


@contextmanager
def _dvc_repo(root: Path) -> Iterator[Any]:
    """The project's DVC repository, entered from its root: DVC resolves stage targets
    against the working directory, so a caller elsewhere must not reach another dvc.yaml."""
    from dvc.repo import Repo

    with chdir(root), Repo(".") as repo:
        yield repo


def record_stage(root: Path, stage: str) -> None:
    """Tell DVC that ``stage`` just ran outside ``dvc repro``: hash its deps, params and outs
    into dvc.lock and cache its outputs, so ``dvc status`` is clean afterwards."""
    with _dvc_repo(root) as repo:
        repo.commit(stage, force=True)


def summary_rows(metrics: Mapping[str, Metrics]) -> list[dict[str, Any]]:
    """One row per method: EOM with its interval, cost, budget and (if known) true values."""
    keys = ("eom", "eom_ci_low", "eom_ci_high", "mean_cost", "budget", "true_value", "true_cost")
    return [
        {"method": method, **{key: getattr(values, key) for key in keys}}
        for method, values in metrics.items()
    ]


def render_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of :func:`summary_rows` for the terminal."""
    head = f"{'method':<12} {'EOM':>8} {'95% interval':>19} {'cost':>8} {'budget':>8} {'true':>8}"
    lines = [head, "-" * len(head)]
    for row in rows:
        interval = f"[{_num(row['eom_ci_low'])}, {_num(row['eom_ci_high'])}]"
        lines.append(
            f"{row['method']:<12} {_num(row['eom']):>8} {interval:>19} {_num(row['mean_cost']):>8}"
            f" {_num(row['budget']):>8} {_num(row['true_value']):>8}"
        )
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
