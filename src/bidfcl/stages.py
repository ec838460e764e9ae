"""The pipeline's stages as library functions: ingest, validate, version, train, evaluate, promote.

The CLI (``bidfcl stage ...``), ``dvc.yaml`` and the Prefect flow all call these functions, so
the three entry points run the same code. Every stage takes only its own ``params.yaml``
section (a :mod:`bidfcl.params` dataclass) and writes its artifacts at fixed paths under the
project root, each file or folder replaced atomically so a failed stage leaves the previous
artifacts in place.

Data layout and versioning (see ``dvc.yaml`` and ``data.dvc``):

- ``ingest`` writes the arriving batch to ``data/landing`` (simulated from params, or copied
  from a dataset folder); it is a dvc.yaml stage, so ``dvc repro`` works from a fresh clone.
- ``validate`` checks ``data/landing`` and writes ``results/validation.json``; only a batch
  that passed is published to ``data/validated`` (hard links to the landed files, so no copy).
- ``version`` is ``data.dvc``: a DVC import of ``data/validated`` into ``data/raw``. Importing
  the validate stage's output makes DVC run validation first, so ``dvc repro`` stops on a bad
  batch before anything is versioned. DVC copies the validated tables into its cache and
  records their hashes in ``data.dvc``; every later stage reads ``data/raw``, never the
  landing folder.
- ``train`` writes ``models/<method>/`` and ``models/manifest.json``; ``evaluate`` writes
  each method's ``Metrics`` record to ``results/scores/<method>.json`` and its budget-value
  curve to ``results/curves/<method>.csv`` (both read back by ``promote``), and for DVC
  ``results/metrics.json`` (a few numbers per method under names that do not change with the
  candidate), ``results/budget_value.json`` (every curve, the data of dvc.yaml's plot) and
  ``results/plots/budget_value.png``; ``promote`` logs the runs to MLflow, applies the gate
  and writes ``results/promotion.json``.
- ``push`` uploads what DVC caches (``data/raw``, ``models/``) to the DVC remote at the end of
  a flow run. It is no dvc.yaml stage: it reproduces nothing, it copies what the stages
  recorded. The results DVC does not cache (``results/``) travel with git.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, chdir, contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bidfcl.gate import PromoteParams, decide
from bidfcl.io import atomic_write, project_lock, replace_dir, write_json
from bidfcl.params import (
    SIMULATE,
    EvaluateParams,
    IngestParams,
    TrackingParams,
    TrainParams,
    ValidateParams,
)
from bidfcl.scoring import Metrics, compare_models

if TYPE_CHECKING:
    from bidfcl.learner import EpochSummary

LANDING_DIR = Path("data/landing")
VALIDATED_DIR = Path("data/validated")  # the last batch that passed validation (data.dvc's source)
RAW_DIR = Path("data/raw")
DATA_DVC = "data.dvc"
VALIDATION_REPORT = Path("results/validation.json")
DATA_DOCS_DIR = Path("reports/data_docs")  # Great Expectations' HTML report (not versioned)
MODELS_DIR = Path("models")
MANIFEST_FILE = "manifest.json"
# Each method's MLflow run id and model URI: beside models/, not in it, so that models/ (and
# its hash in dvc.lock) stays byte-identical when the same seed retrains the same weights.
TRAINING_RUNS_FILE = Path("results/training_runs.json")
SCORES_DIR = Path("results/scores")  # each method's full Metrics record (not a DVC metric)
CURVES_DIR = Path("results/curves")
METRICS_FILE = Path("results/metrics.json")  # DVC's metrics: see dvc_metrics
BUDGET_VALUE_FILE = Path("results/budget_value.json")  # every method's curve, one row per point
BUDGET_VALUE_PNG = Path("results/plots/budget_value.png")
PROMOTION_FILE = Path("results/promotion.json")
CHECKPOINTS_DIR = Path(".checkpoints")  # train's per-method checkpoints until it succeeds
RUNS_LOCK = CHECKPOINTS_DIR / ".runs.lock"  # methods training at once open their runs in turn


class ValidationFailed(RuntimeError):
    """The landing batch broke the data contract; the message is the readable report."""


# --------------------------------------------------------------------------- stages


def ingest(root: Path, config: IngestParams, progress: bool = False) -> Path:
    """Write the arriving batch to ``data/landing``: simulated, or a copy of a dataset
    folder's contract files (a batch holding symbolic links is refused)."""
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
    from bidfcl.contract import META_FILE, TABLES, TRUTH_FILE, DataContractError, table_file

    source = Path(config.source)
    source = source if source.is_absolute() else root / source
    if not source.is_dir():
        raise FileNotFoundError(f"ingest.source: {source} is not a dataset folder")
    # Only the contract's files, and never through a link: a batch must not smuggle in
    # a file from elsewhere on the machine (it would be versioned and cached by DVC).
    links = sorted(path.name for path in source.iterdir() if path.is_symlink())
    if links:
        raise DataContractError(
            f"ingest.source: {source} holds symbolic links ({', '.join(links)}); a batch "
            "must hold its own files"
        )
    names = [META_FILE, *map(table_file, TABLES), TRUTH_FILE]
    present = [name for name in names if (source / name).exists()]
    for name in present:
        if not (source / name).is_file():
            raise DataContractError(f"{source / name}: not a regular file")

    def copy(tmp: Path) -> None:
        for name in present:  # O_NOFOLLOW: a file swapped for a link since the check fails
            with (
                open(os.open(source / name, os.O_RDONLY | os.O_NOFOLLOW), "rb") as read,
                open(tmp / name, "wb") as write,
            ):
                shutil.copyfileobj(read, write)

    return replace_dir(dest, copy)


def validate(root: Path, config: ValidateParams) -> dict[str, Any]:
    """Check ``data/landing`` against the suites; write the report and Great Expectations'
    Data Docs (``reports/data_docs/index.html``); raise if it failed, else publish the batch
    as ``data/validated``, the only folder ``version`` imports (a failure leaves the last
    accepted batch there)."""
    from bidfcl.validation import SuiteSettings, validate_dataset, write_report

    settings = SuiteSettings(
        propensity_floor=config.propensity_floor,
        require_default_budget=config.require_default_budget is not False,
    )
    with chdir(root):  # the committed report names project-relative paths
        report = validate_dataset(LANDING_DIR, config.suites, DATA_DOCS_DIR, settings)
    write_report(report, root / VALIDATION_REPORT)
    if not report.passed:
        raise ValidationFailed(report.render())
    replace_dir(root / VALIDATED_DIR, lambda tmp: _link_tree(root / LANDING_DIR, tmp))
    return report.to_dict()


def _link_tree(source: Path, dest: Path) -> None:
    """Fill ``dest`` with hard links to the files under ``source`` (a copy where the file
    system has no hard links): every writer replaces files by rename, so they stay apart."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, dest, copy_function=link, dirs_exist_ok=True)


def version(root: Path) -> dict[str, Any]:
    """Version the validated batch: DVC imports ``data/validated`` into ``data/raw``.

    This reproduces the ``data.dvc`` stage (copy into the cache, hashes into data.dvc); it is
    a no-op when the landing folder has not changed since the last version.
    """
    with _dvc_repo(root) as repo:
        repo.reproduce(DATA_DVC, single_item=True)
    return _versioned_data(root)


def train(
    root: Path,
    config: TrainParams,
    tracking: TrackingParams | None = None,
    on_epoch: Callable[[str, EpochSummary], None] | None = None,
    progress: bool = False,
) -> list[str]:
    """Train ``train.method`` and ``train.baselines`` on ``data/raw`` into ``models/<method>/``,
    one after another (:func:`train_method` each, then :func:`publish_models`).

    Each method trains inside its own MLflow run (``tracking``: the project's store by
    default), which gets every epoch's metrics and duration as they happen, the dataset's
    DVC hash as its input, the git commit, and finally the model;
    ``results/training_runs.json`` records the run ids. ``on_epoch(method, summary)`` hears
    every epoch too (the log line of the CLI and the flow); the summary names a warm start's
    or Teacher's own method.

    It holds the project lock. Each method checkpoints into ``.checkpoints/<method>/`` every
    epoch, so a rerun after a crash resumes where the killed run stopped (reusing finished
    phases and methods); the checkpoints are deleted once ``models/`` is in place.
    """
    methods = config.methods

    def train_all(staging: Path) -> dict[str, dict[str, str]]:
        return {
            method: train_method(root, config, method, staging, tracking, on_epoch, progress)
            for method in methods
        }

    with project_lock(root):
        return publish_models(root, methods, train_all, tracking)


def train_method(
    root: Path,
    config: TrainParams,
    method: str,
    staging: Path,
    tracking: TrackingParams | None = None,
    on_epoch: Callable[[str, EpochSummary], None] | None = None,
    progress: bool = False,
) -> dict[str, str]:
    """Train ``method`` (one of ``config.methods``) into ``staging/<method>`` inside its own
    MLflow run, checkpointing into ``.checkpoints/<method>/``; return the run's id and model
    URI. See :func:`train`.

    It takes no project lock: its caller holds it, and the flow runs it in worker processes,
    which would wait forever for their parent's lock.
    """
    from bidfcl import registry
    from bidfcl.learner import observe_training
    from bidfcl.methods import train_to_folder

    tracking = tracking or TrackingParams()
    lineage = registry.Lineage(
        data_path=root / RAW_DIR,
        data_digest=_versioned_data(root).get("md5"),
        git_commit=_git_commit(root),
        dvc_experiment=registry.dvc_experiment(),
    )

    def observe(summary: EpochSummary) -> None:
        registry.log_epoch(summary, method)
        if on_epoch is not None:
            on_epoch(method, summary)

    method_config = replace(
        config.config_for(method), checkpoint_dir=str(root / CHECKPOINTS_DIR / method)
    )
    with registry.tracking(root, tracking.uri, tracking.experiment), ExitStack() as run:
        # MLflow adds a dataset it has not seen by a look-up, then an insert: two runs opened
        # at once on a new batch would both insert it, and one fail. They open in turn.
        with _exclusive(root / RUNS_LOCK):
            run.enter_context(registry.training_run(method, lineage))
        run.enter_context(observe_training(observe))
        train_to_folder(root / RAW_DIR, staging / method, method_config, progress)
        return registry.log_trained_model(staging / method)


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the block (processes take turns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def publish_models(
    root: Path,
    methods: Sequence[str],
    train_all: Callable[[Path], Mapping[str, dict[str, str]]],
    tracking: TrackingParams | None = None,
) -> list[str]:
    """Replace ``models/`` as a whole with the folders ``train_all(staging)`` trains into a
    staging folder beside it (returning each method's run ids) and the manifest (the first
    method is the candidate); then record the runs in ``results/training_runs.json`` and
    delete the checkpoints. A failure leaves ``models/`` and the checkpoints as they were.

    The MLflow store and experiment are set up first, so methods training at once in other
    processes never race to create them. The caller holds the project lock.
    """
    from bidfcl import registry

    methods = list(methods)
    tracking = tracking or TrackingParams()
    runs: dict[str, dict[str, str]] = {}

    def build(staging: Path) -> None:
        runs.update(train_all(staging))
        missing = [m for m in methods if m not in runs or not (staging / m).is_dir()]
        if missing:
            raise RuntimeError(f"no trained model for {', '.join(missing)}")
        write_json(staging / MANIFEST_FILE, {"candidate": methods[0], "methods": methods})

    with registry.tracking(root, tracking.uri, tracking.experiment):
        replace_dir(root / MODELS_DIR, build)
    write_json(root / TRAINING_RUNS_FILE, {method: runs[method] for method in methods})
    shutil.rmtree(root / CHECKPOINTS_DIR, ignore_errors=True)
    return methods


def epoch_line(method: str, summary: EpochSummary) -> str:
    """One line per training epoch for logs: method (and the phase it is in), epoch, the
    validation scores the checkpoint is chosen by, and the epoch's duration."""
    phase = method if summary.method == method else f"{method} [{summary.method} first]"
    scores = " ".join(
        f"{name} {summary.metrics[name]:.4f}"
        for name in ("train_loss", "train_lower", "val_loss", "val_eom")
        if name in summary.metrics
    )
    return (
        f"{phase}: epoch {summary.epoch + 1}/{summary.max_epochs} {scores} "
        f"({summary.seconds:.1f} s)"
    )


def _versioned_data(root: Path) -> dict[str, Any]:
    """What data.dvc records of data/raw: path, DVC's md5, size and file count ({} before
    the first version)."""
    dvc_file = root / DATA_DVC
    if not dvc_file.exists():
        return {}
    tracked = yaml.safe_load(dvc_file.read_text())["outs"][0]
    return {key: tracked.get(key) for key in ("path", "md5", "size", "nfiles")}


def _git_commit(root: Path) -> str | None:
    """The commit the code ran from: a DVC experiment's baseline, else the checkout's HEAD
    (None outside git)."""
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        return os.environ["DVC_EXP_BASELINE_REV"]
    done = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or None if done.returncode == 0 else None


def read_manifest(root: Path) -> dict[str, Any]:
    """Which model is the candidate, and which methods were trained."""
    path = root / MODELS_DIR / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trained models (run the train stage first)")
    return json.loads(path.read_text())


def evaluate(root: Path, config: EvaluateParams) -> dict[str, Metrics]:
    """Score every trained model on held-out RCT: each method's metrics JSON and budget-value
    curve CSV, and for DVC the metrics summary, every curve in one file and their PNG.

    Each model's deployed allocation is also compared, paired on the same users, with the
    ``reference`` method's when that method was trained (the ``paired_*`` metrics).
    """
    from bidfcl.contract import load_dataset
    from bidfcl.model import UpliftModel
    from bidfcl.plots import budget_value_figure
    from bidfcl.scoring import model_metrics

    manifest = read_manifest(root)
    methods, candidate = manifest["methods"], manifest["candidate"]
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

    drawn = {m: c for m, c in curves.items() if c is not None}
    figure = budget_value_figure(
        {f"{m} (candidate)" if m == candidate else m: c for m, c in drawn.items()},
        f"Budget-value curves: {config.estimator.upper()} estimate on held-out {config.table}",
    )
    replace_dir(root / CURVES_DIR, build_curves)
    replace_dir(root / SCORES_DIR, build_metrics)
    write_json(
        root / BUDGET_VALUE_FILE,
        [{"method": m, **row} for m, curve in drawn.items() for row in curve.to_dict("records")],
    )
    atomic_write(root / BUDGET_VALUE_PNG, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    write_json(root / METRICS_FILE, dvc_metrics(candidate, results))
    return results


DVC_METRIC_KEYS = (
    "deployed_value",
    "deployed_value_ci_low",
    "deployed_value_ci_high",
    "deployed_cost",
    "deployed_cost_ci_high",
    "paired_difference",
    "paired_ci_low",
    "deployed_true_value",
    "deployed_true_cost",
    "eom",
    "budget_curve_area",
)


def dvc_metrics(candidate: str, results: Mapping[str, Metrics]) -> dict[str, Any]:
    """``results/metrics.json``: the budget, and per method the numbers a promotion rests on,
    under ``candidate.*`` and ``baselines.<method>.*`` so that ``dvc exp show`` keeps the
    same few columns (and ``dvc metrics diff`` can compare them) when ``train.method``
    changes. Only numbers: DVC would make a column of a string too. A value that does not
    apply (no ground truth, no reference) is left out, as DVC leaves out ``null``."""

    def numbers(metrics: Metrics) -> dict[str, float]:
        return {k: v for k in DVC_METRIC_KEYS if (v := getattr(metrics, k)) is not None}

    return {
        "budget": results[candidate].budget,
        "candidate": numbers(results[candidate]),
        "baselines": {m: numbers(v) for m, v in results.items() if m != candidate},
    }


def read_metrics(root: Path) -> dict[str, Metrics]:
    """Each trained method's full :class:`Metrics` record as ``evaluate`` wrote it, candidate
    first (``results/metrics.json`` keeps only a summary)."""
    return {
        method: Metrics.read(root / SCORES_DIR / f"{method}.json")
        for method in read_manifest(root)["methods"]
    }


def promote(
    root: Path,
    config: PromoteParams,
    tracking: TrackingParams | None = None,
    promotion_key: str | None = None,
) -> dict[str, Any]:
    """Add the held-out scores to every method's training run, register the candidate as
    ``challenger`` and apply the gate; write ``results/promotion.json`` with the decision.

    Idempotent per ``promotion_key`` (the flow passes its run id; by default a digest of the
    promote inputs: manifest, metrics and the candidate's weights): a retry finds the version
    it already registered, and decides again on the same data.

    Inside a DVC experiment (``dvc exp run``, ``--temp``, ``--queue``) nothing is registered
    and no alias moves: the runs get their scores, tagged with the experiment's name, and
    promotion.json says what the gate would decide. Registration belongs to the pipeline run
    (the flow, or ``dvc repro``), not to a try-out.

    The gate compares the candidate's deployed allocation with the champion's (re-scored on
    the same held-out table, budget and estimator) or, with no champion yet, with the
    ``baseline`` method's, paired on the same users (:func:`bidfcl.scoring.compare_models`).
    Every decision is counted against the held-out table it was taken on, because a test
    set reused night after night slowly turns into a training set for the gate.

    It holds the project lock from reading its inputs to writing promotion.json, so two
    promotions never judge against the same champion: the second waits, then compares with
    the champion the first left. Versions whose promotion was killed before deciding are
    tagged ``decision=abandoned`` first (listed under ``abandoned_versions``), and a champion
    alias such a promotion had moved goes back (:func:`registry.settle_interrupted_promotions`).
    """
    with project_lock(root):
        return _promote(root, config, tracking or TrackingParams(), promotion_key)


def _promote(
    root: Path, config: PromoteParams, tracking: TrackingParams, promotion_key: str | None
) -> dict[str, Any]:
    """:func:`promote`'s work, run under the project lock."""
    from bidfcl import registry
    from bidfcl.contract import load_dataset, table_file
    from bidfcl.model import WEIGHTS_FILE, UpliftModel

    manifest = read_manifest(root)
    metrics = read_metrics(root)
    report_path = root / VALIDATION_REPORT
    validation_passed = report_path.exists() and bool(
        json.loads(report_path.read_text()).get("passed")
    )
    candidate = manifest["candidate"]
    challenger = metrics[candidate]
    runs = json.loads((root / TRAINING_RUNS_FILE).read_text())
    key = promotion_key or _digest(
        [
            root / MODELS_DIR / MANIFEST_FILE,
            root / MODELS_DIR / candidate / WEIGHTS_FILE,
            *(root / SCORES_DIR / f"{method}.json" for method in manifest["methods"]),
        ]
    )
    experiment = registry.dvc_experiment()
    dataset = load_dataset(root / RAW_DIR, tables=(challenger.table,))
    holdout = _digest([root / RAW_DIR / table_file(challenger.table)])
    challenger_model = UpliftModel.load(root / MODELS_DIR / candidate)
    with (
        registry.tracking(root, tracking.uri, tracking.experiment),
        tempfile.TemporaryDirectory() as tmp,
    ):
        tags = {registry.EXPERIMENT_TAG: experiment} if experiment else {}
        for method in manifest["methods"]:
            curve = root / CURVES_DIR / f"{method}.csv"
            registry.log_evaluation(runs[method]["run_id"], metrics[method], curve, tags)
        version_number, abandoned = None, []
        if experiment is None:
            abandoned = registry.settle_interrupted_promotions(config, key)
            model_uri = runs[candidate]["model_uri"]
            version_number = registry.register_challenger(model_uri, config, key)
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
        holdout_uses = registry.holdout_decisions(config, holdout, version_number or "")
        if version_number is not None:
            holdout_uses += 1
            registry.record_decision(
                config,
                version_number,
                decision,
                {registry.HOLDOUT_TAG: holdout, "holdout_uses": str(holdout_uses)},
            )
        if version_number is not None and decision.promoted:
            champion = version_number  # record_decision moved the alias to it
    verdict = "promoted" if decision.promoted else "rejected"
    summary = {
        "model_name": config.model_name,
        "version": version_number,
        "method": candidate,
        "decision": verdict if version_number else f"would be {verdict} (not registered)",
        **{k: v for k, v in asdict(decision).items() if k != "promoted"},
        "holdout": {"table": challenger.table, "md5": holdout, "decisions": holdout_uses},
        "champion_version": champion,
        "abandoned_versions": abandoned,
        "dvc_experiment": experiment,
        # as configured (relative to the project root), so the committed file is portable
        "tracking_uri": registry.redacted(os.environ.get(registry.TRACKING_ENV) or tracking.uri),
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


# --------------------------------------------------------------------------- rollback


@contextmanager
def restore_on_failure(root: Path, paths: Sequence[Path]) -> Iterator[None]:
    """Put ``paths`` (files or folders under ``root``) back exactly as they were if the
    block raises, so a rejected or broken batch leaves the working tree as it was found.

    The snapshot hard-links the files (every writer here replaces files by rename and never
    writes into one), so it costs no copy of the data.
    """
    snapshot = Path(tempfile.mkdtemp(prefix=".snapshot.", dir=root))
    try:
        for relative in paths:
            source = root / relative
            if source.is_dir():
                shutil.copytree(source, snapshot / relative, copy_function=os.link)
            elif source.exists():
                (snapshot / relative).parent.mkdir(parents=True, exist_ok=True)
                os.link(source, snapshot / relative)
        yield
    except BaseException:
        for relative in paths:
            _restore(snapshot / relative, root / relative)
        raise
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)


def _restore(saved: Path, dest: Path) -> None:
    if saved.is_dir():
        replace_dir(dest, lambda tmp: shutil.copytree(saved, tmp, dirs_exist_ok=True))
    elif saved.exists():
        atomic_write(dest, lambda tmp: shutil.copy2(saved, tmp))
    elif dest.is_dir():
        shutil.rmtree(dest)
    else:
        dest.unlink(missing_ok=True)


# --------------------------------------------------------------------------- DVC bookkeeping


@contextmanager
def _dvc_repo(root: Path) -> Iterator[Any]:
    """The project's DVC repository, entered from its root: DVC resolves stage targets
    against the working directory, so a caller elsewhere must not reach another dvc.yaml."""
    from dvc.repo import Repo

    with chdir(root), Repo(".") as repo:
        yield repo


class PushFailed(RuntimeError):
    """DVC could not upload the run's artifacts; they stay in the workspace and dvc.lock."""


def push(root: Path, remote: str | None = None) -> dict[str, Any]:
    """Upload every output DVC caches (the versioned data, the models) to ``remote`` (None:
    the default remote of ``.dvc/config``, overridable in ``.dvc/config.local``), so a fresh
    clone gets them with ``dvc pull``. Returns the remote's name and how many files went up
    (0 when the remote already held them all).

    Not a dvc.yaml stage: pushing reproduces nothing. A failure raises :class:`PushFailed`
    and leaves the workspace, the cache, dvc.lock and the registry as they were, so the run's
    results stand and the push can be repeated (``bidfcl stage push``).
    """
    from dvc.exceptions import DvcException

    name = remote
    try:
        with _dvc_repo(root) as repo:
            name = remote or repo.config["core"].get("remote")
            return {"remote": name, "pushed": repo.push(remote=remote)}
    except (DvcException, OSError) as error:  # OSError: a local remote's folder
        raise PushFailed(
            f"dvc push to remote {name or '(none configured)'} failed: {error}; the run's "
            "results are in place (dvc.lock, data/raw, models/, results/, the registry): "
            "push them with `bidfcl stage push` once the remote is reachable"
        ) from error


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
