"""The pipeline's stages as library functions: ingest, validate, version, train, evaluate, promote.

The CLI (``bidfcl stage ...``), ``dvc.yaml`` and the Prefect flow all call these functions, so
the three entry points run the same code. Every stage reads only its own ``params.yaml``
section
and writes its artifacts at fixed paths under the project root, each file or folder replaced
atomically so a failed stage leaves the previous artifacts in place.

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
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import chdir, contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from bidfcl.allocation import STATUS_INFEASIBLE
from bidfcl.contract import RCT_TEST, write_json

LANDING_DIR = Path("data/landing")
RAW_DIR = Path("data/raw")
DATA_DVC = "data.dvc"
VALIDATION_REPORT = Path("results/validation.json")
MODELS_DIR = Path("models")
MANIFEST_FILE = "manifest.json"
METRICS_DIR = Path("results/metrics")
CURVES_DIR = Path("results/curves")
PROMOTION_FILE = Path("results/promotion.json")
SIMULATE = "simulate"


class ValidationFailed(RuntimeError):
    """The landing batch broke the data contract; the message is the readable report."""


# --------------------------------------------------------------------------- parameters


def read_params(params_path: Path | str) -> dict[str, Any]:
    """The whole params file as a mapping (each stage then takes only its section)."""
    path = Path(params_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: params file not found")
    params = yaml.safe_load(path.read_text()) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path}: must hold a mapping of sections")
    return params


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """One stage's section; a missing section means the stage's defaults."""
    value = params.get(name) or {}
    if not isinstance(value, dict):
        raise ValueError(f"params.yaml: section {name!r} must be a mapping, got {value!r}")
    return value


@dataclass(frozen=True)
class IngestParams:
    """``ingest:`` — where the batch comes from, and the simulator's size when simulating."""

    source: str = SIMULATE
    n_obs: int = 200_000
    n_rct: int = 40_000
    n_treatments: int = 5
    seed: int = 0


@dataclass(frozen=True)
class EvaluateParams:
    """``evaluate:`` — the budget (mean cost per user; None = dataset default) and estimator."""

    budget: float | None = None
    estimator: str = "ipw"
    table: str = RCT_TEST


@dataclass(frozen=True)
class PromoteParams:
    """``promote:`` — registry name and the gate's margin, cost tolerance and first baseline.

    ``tracking_uri`` is relative to the project root; ``MLFLOW_TRACKING_URI`` overrides it.
    """

    model_name: str = "bidfcl-uplift"
    experiment: str = "bidfcl"
    tracking_uri: str = "sqlite:///mlflow.db"
    margin: float = 0.0
    cost_tolerance: float = 0.01
    baseline: str = "tsm-rct"


def _typed(cls: type, values: dict[str, Any], name: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"params.yaml: unknown {name} setting(s) {unknown}; known: {sorted(known)}"
        )
    return cls(**values)


def ingest_params(params: dict[str, Any]) -> IngestParams:
    return _typed(IngestParams, section(params, "ingest"), "ingest")


def evaluate_params(params: dict[str, Any]) -> EvaluateParams:
    return _typed(EvaluateParams, section(params, "evaluate"), "evaluate")


def promote_params(params: dict[str, Any]) -> PromoteParams:
    return _typed(PromoteParams, section(params, "promote"), "promote")


def training_methods(params: dict[str, Any]) -> list[str]:
    """``train.method`` first, then ``train.baselines`` without repeats."""
    from bidfcl.training import METHODS

    train = section(params, "train")
    methods = list(dict.fromkeys([train.get("method", "tsm-rct"), *train.get("baselines", [])]))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"params.yaml: unknown method(s) {unknown}; choose from {list(METHODS)}")
    return methods


def set_params(params_path: Path | str, values: dict[str, Any]) -> None:
    """Set dotted keys (``ingest.source``) in the params file, keeping its comments.

    The flow records a run's data path and budget here, so DVC's lock matches what ran.
    """
    from dvc.utils.serialize import modify_yaml

    with modify_yaml(str(params_path)) as data:
        for dotted, value in values.items():
            *parents, key = dotted.split(".")
            node = data
            for parent in parents:
                node = node.setdefault(parent, {})
            node[key] = value


# --------------------------------------------------------------------------- file helpers


def replace_dir(dest: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder in a temporary sibling, then swap it in for ``dest``.

    An exception in ``build`` leaves ``dest`` exactly as it was.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        build(staging)
        staging.chmod(0o755)
        if dest.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            dest.rename(trash / dest.name)
            staging.rename(dest)
            shutil.rmtree(trash)
        else:
            staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------- stages


def ingest(root: Path, params: dict[str, Any], progress: bool = False) -> Path:
    """Write the arriving batch to ``data/landing``: simulated, or a copy of a dataset folder."""
    from bidfcl.simulate import SimulatorConfig, simulate_to_folder

    config = ingest_params(params)
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


def validate(root: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Check ``data/landing`` against the suites; write the report; raise if it failed."""
    from bidfcl.validation import validate_dataset, write_report

    suites = section(params, "validate").get("suites")
    with chdir(root):  # the committed report names project-relative paths
        report = validate_dataset(LANDING_DIR, suites)
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


def train(root: Path, params: dict[str, Any], progress: bool = False) -> list[str]:
    """Train ``train.method`` and ``train.baselines`` on ``data/raw`` into ``models/<method>/``."""
    from bidfcl.training import TrainConfig, train_to_folder

    methods = training_methods(params)
    train_section = section(params, "train")
    configs = [TrainConfig.from_params(train_section, method=m) for m in methods]

    def build(tmp: Path) -> None:
        for config in configs:
            train_to_folder(root / RAW_DIR, tmp / config.method, config, progress)
        write_json(tmp / MANIFEST_FILE, {"candidate": methods[0], "methods": methods})

    replace_dir(root / MODELS_DIR, build)
    return methods


def read_manifest(root: Path) -> dict[str, Any]:
    """Which model is the candidate, and which methods were trained."""
    path = root / MODELS_DIR / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trained models (run the train stage first)")
    return json.loads(path.read_text())


def evaluate(root: Path, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Score every trained model on held-out RCT: metrics JSON and budget-value curve CSV."""
    from bidfcl.scoring import evaluate_model

    config = evaluate_params(params)
    methods = read_manifest(root)["methods"]
    results: dict[str, dict[str, Any]] = {}

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


# --------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided for one challenger, and why (tagged on the model version)."""

    promoted: bool
    reason: str
    challenger_eom: float
    challenger_eom_ci_low: float
    challenger_cost: float
    budget: float
    reference: str
    reference_eom: float | None
    validation_passed: bool

    def tags(self) -> dict[str, str]:
        return {
            "decision": "promoted" if self.promoted else "rejected",
            **{k: str(v) for k, v in asdict(self).items() if k != "promoted"},
        }


def decide(
    challenger: dict[str, Any],
    validation_passed: bool,
    config: PromoteParams,
    champion_eom: float | None,
    baseline_eom: float | None,
) -> GateDecision:
    """The promotion rule.

    With a champion: promote only if validation passed, the challenger's EOM lower confidence
    bound exceeds the champion's EOM (re-scored on the same data) plus ``margin``, and its
    estimated cost stays within the budget (times 1 + ``cost_tolerance``). Without one, the
    challenger's EOM must exceed the ``baseline`` method's EOM plus ``margin`` (or the
    challenger is that baseline). Either way a challenger whose *predicted* costs put even
    each user's cheapest arm over the budget is rejected: the EOM scores its Lagrangian
    policy at an RCT-estimated lambda, but ``bidfcl allocate`` would ship all-control.
    """
    eom, low = float(challenger["eom"]), float(challenger["eom_ci_low"])
    cost, budget = float(challenger["mean_cost"]), float(challenger["budget"])
    if champion_eom is not None:
        reference, reference_eom = "champion", float(champion_eom)
    else:
        reference = f"baseline {config.baseline}"
        reference_eom = None if baseline_eom is None else float(baseline_eom)

    def result(promoted: bool, reason: str) -> GateDecision:
        return GateDecision(
            promoted, reason, eom, low, cost, budget, reference, reference_eom, validation_passed
        )

    if not validation_passed:
        return result(False, "validation of the training data did not pass")
    if not math.isfinite(cost) or cost > budget * (1 + config.cost_tolerance):
        return result(
            False,
            f"estimated cost {cost:.4f} exceeds the budget {budget:.4f} "
            f"(tolerance {config.cost_tolerance:.2%})",
        )
    if challenger.get("deployed_status") == STATUS_INFEASIBLE:
        return result(
            False,
            "the model predicts that even each user's cheapest arm costs more than the budget "
            f"{budget:.4f}, so its deployed allocation would be all-control",
        )
    if champion_eom is not None:
        if low > reference_eom + config.margin:
            return result(
                True,
                f"EOM lower bound {low:.4f} > champion EOM {reference_eom:.4f} "
                f"+ margin {config.margin:.4f}",
            )
        return result(
            False,
            f"no better challenger: EOM lower bound {low:.4f} <= champion EOM "
            f"{reference_eom:.4f} + margin {config.margin:.4f}",
        )
    if challenger.get("method") == config.baseline:
        return result(True, f"first model, and it is the baseline {config.baseline} itself")
    if reference_eom is None:
        return result(False, f"first model, but no metrics for baseline {config.baseline}")
    if eom > reference_eom + config.margin:
        return result(
            True,
            f"first model: EOM {eom:.4f} > {config.baseline} EOM {reference_eom:.4f} "
            f"+ margin {config.margin:.4f}",
        )
    return result(
        False,
        f"first model does not beat {config.baseline}: EOM {eom:.4f} <= {reference_eom:.4f} "
        f"+ margin {config.margin:.4f}",
    )


def promote(root: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Log every trained method to MLflow, register the candidate as ``challenger`` and apply
    the gate; write ``results/promotion.json`` with the decision."""
    from bidfcl import registry

    config = promote_params(params)
    manifest = read_manifest(root)
    metrics = {
        method: json.loads((root / METRICS_DIR / f"{method}.json").read_text())
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
        champion_eom = registry.rescore_champion(
            config, root / RAW_DIR, metrics[candidate], exclude_version=version_number
        )
        baseline = metrics.get(config.baseline)
        decision = decide(
            metrics[candidate],
            validation_passed,
            config,
            champion_eom,
            None if baseline is None else baseline["eom"],
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


def summary_rows(metrics: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: EOM with its interval, cost, budget and (if known) true values."""
    keys = ("eom", "eom_ci_low", "eom_ci_high", "mean_cost", "budget", "true_value", "true_cost")
    return [
        {"method": method, **{key: values.get(key) for key in keys}}
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
