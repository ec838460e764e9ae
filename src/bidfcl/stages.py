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

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import chdir, contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import yaml

from bidfcl.gate import PromoteParams, decide
from bidfcl.io import atomic_write, replace_dir, write_json
from bidfcl.params import (
    SIMULATE,
    EvaluateParams,
    IngestParams,
    TrainParams,
    ValidateParams,
)
from bidfcl.scoring import Metrics, compare_models

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
    """Score every trained model on held-out RCT: metrics JSON and budget-value curve CSV.

    Each model's deployed allocation is also compared, paired on the same users, with the
    ``reference`` method's when that method was trained (the ``paired_*`` metrics).
    """
    from bidfcl.contract import load_dataset
    from bidfcl.model import UpliftModel
    from bidfcl.scoring import model_metrics

    methods = read_manifest(root)["methods"]
    dataset = load_dataset(root / RAW_DIR, tables=(config.table,))
    budget = dataset.meta.budget_or_default(config.budget)
    features = dataset.meta.feature_columns
    models = {
        m: UpliftModel.load(root / MODELS_DIR / m, expected_features=features) for m in methods
    }
    results: dict[str, Metrics] = {}
    curves = {}
    for method, model in models.items():
        metrics, curves[method] = model_metrics(
            model, dataset, budget, config.table, config.estimator
        )
        results[method] = replace(metrics, method=model.metadata.get("method"))
        if config.reference in models:
            paired = compare_models(
                model, models[config.reference], dataset, budget, config.table, config.estimator
            )
            results[method] = results[method].with_comparison(config.reference, paired)

    def build_metrics(metrics_tmp: Path) -> None:
        for method, metrics in results.items():
            write_json(metrics_tmp / f"{method}.json", metrics.to_json())

    def build_curves(curves_tmp: Path) -> None:
        for method, curve in curves.items():
            if curve is not None:
                atomic_write(
                    curves_tmp / f"{method}.csv", lambda tmp, c=curve: c.to_csv(tmp, index=False)
                )

    replace_dir(root / CURVES_DIR, build_curves)
    replace_dir(root / METRICS_DIR, build_metrics)
    return results


def promote(root: Path, config: PromoteParams, promotion_key: str | None = None) -> dict[str, Any]:
    """Log every trained method to MLflow, register the candidate as ``challenger`` and apply
    the gate; write ``results/promotion.json`` with the decision.

    Idempotent per ``promotion_key`` (the flow passes its run id; by default a digest of the
    promote inputs: manifest, metrics and the candidate's weights): a retry finds the runs
    and the version it already logged and registered, and decides again on the same data.

    The gate compares the candidate's deployed allocation with the champion's (re-scored on
    the same held-out table, budget and estimator) or, with no champion yet, with the
    ``baseline`` method's, paired on the same users (:func:`bidfcl.scoring.compare_models`).
    Every decision is counted against the held-out table it was taken on, because a test
    set reused night after night slowly turns into a training set for the gate.
    """
    from bidfcl import registry
    from bidfcl.contract import load_dataset, table_file
    from bidfcl.model import WEIGHTS_FILE, UpliftModel

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
    challenger = metrics[candidate]
    key = promotion_key or _digest(
        [
            root / MODELS_DIR / MANIFEST_FILE,
            root / MODELS_DIR / candidate / WEIGHTS_FILE,
            *(root / METRICS_DIR / f"{method}.json" for method in manifest["methods"]),
        ]
    )
    dataset = load_dataset(root / RAW_DIR, tables=(challenger.table,))
    holdout = _digest([root / RAW_DIR / table_file(challenger.table)])
    challenger_model = UpliftModel.load(root / MODELS_DIR / candidate)
    with registry.tracking(root, config), tempfile.TemporaryDirectory() as tmp:
        runs = {
            method: registry.log_training_run(
                root / MODELS_DIR / method,
                metrics[method],
                root / CURVES_DIR / f"{method}.csv",
                key,
            )
            for method in manifest["methods"]
        }
        version_number = registry.register_challenger(runs[candidate]["model_uri"], config, key)
        champion = registry.alias_version(config, registry.CHAMPION)
        reference, reference_dir = None, None
        if champion is not None and champion != version_number:
            reference = f"champion v{champion}"
            uri = f"models:/{config.model_name}/{champion}"
            reference_dir = registry.resolve_model_uri(uri, Path(tmp))
        elif champion is None and candidate != config.baseline and config.baseline in metrics:
            reference, reference_dir = (
                f"baseline {config.baseline}",
                root / MODELS_DIR / config.baseline,
            )
        comparison = None
        if reference_dir is not None:
            comparison = compare_models(
                challenger_model,
                UpliftModel.load(reference_dir, expected_features=dataset.meta.feature_columns),
                dataset,
                challenger.budget,
                challenger.table,
                challenger.estimator,
                config.alpha,
            )
        decision = decide(challenger, comparison, reference or "nothing", validation_passed, config)
        holdout_uses = registry.holdout_decisions(config, holdout, version_number) + 1
        registry.record_decision(
            config,
            version_number,
            decision,
            {registry.HOLDOUT_TAG: holdout, "holdout_uses": str(holdout_uses)},
        )
    summary = {
        "model_name": config.model_name,
        "version": version_number,
        "method": candidate,
        "decision": "promoted" if decision.promoted else "rejected",
        **{k: v for k, v in asdict(decision).items() if k != "promoted"},
        "holdout": {"table": challenger.table, "md5": holdout, "decisions": holdout_uses},
        "champion_version": registry.champion_version(root, config),
        # as configured (relative to the project root), so the committed file is portable
        "tracking_uri": os.environ.get(registry.TRACKING_ENV) or config.tracking_uri,
        "runs": runs,
    }
    write_json(root / PROMOTION_FILE, summary)
    return summary


def _digest(paths: list[Path]) -> str:
    """MD5 of the files' bytes in order (for one file, DVC's hash of it)."""
    digest = hashlib.md5()
    for path in paths:
        with path.open("rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


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


SUMMARY_KEYS = (
    "estimator",
    "budget",
    "deployed_value",
    "deployed_value_ci_low",
    "deployed_value_ci_high",
    "deployed_cost",
    "deployed_cost_ci_high",
    "deployed_true_value",
    "deployed_true_cost",
    "reference",
    "paired_difference",
    "paired_ci_low",
    "paired_ci_high",
    "paired_true_difference",
    "eom",
)


def summary_rows(metrics: Mapping[str, Metrics]) -> list[dict[str, Any]]:
    """One row per method: the deployed allocation's estimated revenue and spend with their
    intervals, its paired difference from the reference method, and (if known) the truth."""
    return [
        {"method": method, **{key: getattr(values, key) for key in SUMMARY_KEYS}}
        for method, values in metrics.items()
    ]


def render_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of :func:`summary_rows` for the terminal."""
    if not rows:
        return "no models were evaluated"
    reference = next((r["reference"] for r in rows if r["reference"]), None)
    versus = f"vs {reference}" if reference else "vs reference"
    head = (
        f"{'method':<12} {'revenue':>8} {'95% interval':>18} {'spend':>7} {'≤ (95%)':>7} "
        f"{'true':>8} {'t.spend':>7} │ {versus:>11} {'paired 95% interval':>20} {'true':>8}"
    )
    lines = [head, "─" * len(head)]
    for row in rows:
        interval = (
            f"[{_num(row['deployed_value_ci_low'], 2)}, {_num(row['deployed_value_ci_high'], 2)}]"
        )
        paired = f"[{_num(row['paired_ci_low'], 3, '+')}, {_num(row['paired_ci_high'], 3, '+')}]"
        lines.append(
            f"{row['method']:<12} {_num(row['deployed_value']):>8} {interval:>18} "
            f"{_num(row['deployed_cost'], 3):>7} {_num(row['deployed_cost_ci_high'], 3):>7} "
            f"{_num(row['deployed_true_value']):>8} {_num(row['deployed_true_cost'], 3):>7} │ "
            f"{_num(row['paired_difference'], 4, '+'):>11} {paired:>20} "
            f"{_num(row['paired_true_difference'], 4, '+'):>8}"
        )
    first = rows[0]
    lines.append(
        f"Deployed allocations at budget {_num(first['budget'])} per user, estimated on held-out "
        f"RCT ({first['estimator']}); 'true' columns from the simulator's ground truth."
    )
    return "\n".join(lines)


def _num(value: float | None, digits: int = 4, sign: str = "") -> str:
    return "-" if value is None else f"{value:{sign}.{digits}f}"
