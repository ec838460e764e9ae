"""MLflow I/O: log training runs, register challengers, keep the gate's bookkeeping (aliases
and decision tags), and resolve ``models:/NAME@alias`` to a local model folder.

Tracking and registry default to a sqlite file in the project root (``tracking.uri``); an
``http(s)://`` tracking server (e.g. one on PostgreSQL) or a ``postgresql://`` database in
``tracking.uri``, or ``MLFLOW_TRACKING_URI``, points both elsewhere. Models are logged
as an MLflow pyfunc that wraps the saved :class:`~bidfcl.model.UpliftModel` folder, so the
registry holds exactly the files ``bidfcl allocate`` reads. Aliases, not the deprecated stages,
mark ``challenger`` and ``champion``. The pickled pyfunc names :class:`UpliftPyfunc` by this
module's path, so registered models keep loading only while it stays here.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bidfcl.model import MODEL_FILE, UpliftModel
from bidfcl.serving import UpliftAllocator, log_model

if TYPE_CHECKING:  # annotations only: training runs log through here without the gate
    from bidfcl.gate import GateDecision, PromoteParams
    from bidfcl.learner import EpochSummary
    from bidfcl.scoring import Metrics

CHALLENGER = "challenger"
CHAMPION = "champion"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
QUIET_LINKS_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"  # MLflow's "View run at: URL" lines
DVC_EXPERIMENT_ENV = "DVC_EXP_NAME"  # set by DVC for every `dvc exp run` (also --temp, --queue)
DVC_ROOT_ENV = "DVC_ROOT"  # for experiments, the repository they were started from
EXPERIMENT_TAG = "dvc_experiment"
HOLDOUT_TAG = "holdout"  # the md5 of the held-out table a gate decision was taken on
# One promotion (a flow run, or one set of promote inputs) tags its version with this key, so
# a retried promotion finds the version it registered instead of registering another.
PROMOTION_TAG = "promotion_key"
MODEL_URI_TAG = "model_uri"
# A gate decision is committed by its decision tag, written last; a version whose promotion
# was killed before it has none, and the next promotion tags it ABANDONED (see
# settle_interrupted_promotions). PREVIOUS_CHAMPION_TAG (written before the champion alias
# moves) says whom to give the alias back to.
DECISION_TAG = "decision"
ABANDONED = "abandoned"
PREVIOUS_CHAMPION_TAG = "previous_champion"
NO_VERSION = "none"
MODELS_SCHEME = "models:/"
# models:/NAME@ALIAS or models:/NAME/VERSION, each part free of separators and escapes
_MODEL_REF = re.compile(r"models:/[^/\\@%\x00-\x1f]+[@/][^/\\@%\x00-\x1f]+")


class UpliftPyfunc(UpliftAllocator):
    """Exists so models registered before serving.py, pickled by this path, still load."""


def dvc_experiment() -> str | None:
    """The name of the DVC experiment this process runs in (``dvc exp run``, ``--temp`` or
    ``--queue``), or None outside one."""
    return os.environ.get(DVC_EXPERIMENT_ENV) or None


def store_root(root: Path) -> Path:
    """Where a relative sqlite store and its artifacts live: the project root, or for a DVC
    experiment run in a temporary copy the repository it was started from (``DVC_ROOT``),
    so the experiment's runs land in the project's store rather than in a throwaway one."""
    if dvc_experiment() and os.environ.get(DVC_ROOT_ENV):
        return Path(os.environ[DVC_ROOT_ENV])
    return root


def tracking_uri(root: Path, uri: str) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``uri``: a relative sqlite path is anchored at
    :func:`store_root`, any other URI (a server, a PostgreSQL database) is used as it is."""
    uri = os.environ.get(TRACKING_ENV) or uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).is_absolute():
        return prefix + str((store_root(root) / uri[len(prefix) :]).resolve())
    return uri


def redacted(uri: str) -> str:
    """``uri`` (or any text quoting URIs, such as an error message) with every password
    masked, in the ``scheme://user:password@host`` form and in ``?password=`` style query
    parameters, for files and logs that others read."""
    text = re.sub(r"(://[^/:@\s]*):[^/@\s]+@", r"\1:***@", uri)
    secret_parameter = r"([?&][^=&\s]*(?:password|secret|token)[^=&\s]*=)[^&#\s]*"
    return re.sub(secret_parameter, r"\1***", text, flags=re.IGNORECASE)


@contextmanager
def tracking(root: Path, uri: str, experiment: str) -> Iterator[MlflowClient]:
    """Point MLflow (tracking and registry) at the project's store and ``experiment`` for
    the duration.

    MLflow's setter also exports ``MLFLOW_TRACKING_URI``; the caller's value (or its absence)
    is put back afterwards, so a later call in the same process resolves its own store.
    A password in the URI stays out of what others read: MLflow's run links (printed from
    the URI) are switched off and errors leaving the block are redacted.
    """
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    previous_env = os.environ.get(TRACKING_ENV)
    previous_links = os.environ.get(QUIET_LINKS_ENV)
    resolved = tracking_uri(root, uri)
    if redacted(resolved) != resolved:
        os.environ[QUIET_LINKS_ENV] = "true"
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    try:
        if mlflow.get_experiment_by_name(experiment) is None:
            # A server stores artifacts where it is told to; a database opened directly
            # would put them in ./mlruns of whatever folder the command runs in.
            local = (store_root(root) / "mlruns").resolve().as_uri()
            mlflow.create_experiment(
                experiment, artifact_location=local if _is_database(resolved) else None
            )
        mlflow.set_experiment(experiment)
        yield MlflowClient(resolved, resolved)
    except Exception as error:
        _redact_error(error)  # MLflow quotes the store URI in its errors
        raise
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
        _put_back_env(TRACKING_ENV, previous_env)
        _put_back_env(QUIET_LINKS_ENV, previous_links)


def _is_database(uri: str) -> bool:
    """Whether MLflow opens ``uri`` as a SQLAlchemy database itself (no tracking server)."""
    scheme = uri.partition(":")[0].partition("+")[0]
    return scheme in ("sqlite", "postgresql", "mysql", "mssql")


def _put_back_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _redact_error(error: BaseException | None) -> None:
    """Mask passwords in the messages of ``error`` and the errors it chains, so neither the
    CLI's one line, a traceback nor Prefect's log of a failed task shows them."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        args = tuple(redacted(arg) if isinstance(arg, str) else arg for arg in error.args)
        if args != error.args:
            error.args = args
        if isinstance(getattr(error, "message", None), str):
            error.message = redacted(error.message)  # type: ignore[attr-defined]
        error = error.__cause__ or error.__context__


@dataclass(frozen=True)
class Lineage:
    """What a training run read and which code ran it: the data folder with DVC's hash of
    it, the git commit, and the DVC experiment (if any)."""

    data_path: Path
    data_digest: str | None
    git_commit: str | None
    dvc_experiment: str | None

    def tags(self) -> dict[str, str]:
        tags = {"mlflow.source.git.commit": self.git_commit, EXPERIMENT_TAG: self.dvc_experiment}
        return {key: value for key, value in tags.items() if value}


@contextmanager
def training_run(method: str, lineage: Lineage) -> Iterator[str]:
    """An MLflow run open while ``method`` trains (yields its id): tagged with the method,
    the git commit and the DVC experiment, with the dataset it reads as its input."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with mlflow.start_run(run_name=method) as run:
        mlflow.set_tags({"method": method, **lineage.tags()})
        with warnings.catch_warnings():  # MLflow warns that it guessed a local-path source
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(lineage.data_path.resolve()))
        data = MetaDataset(source, name=lineage.data_path.name, digest=lineage.data_digest)
        mlflow.log_input(data, context="training")
        yield run.info.run_id


def log_epoch(summary: EpochSummary, method: str) -> None:
    """One epoch's metrics and duration in the open run, at step = epoch; a warm start or
    Teacher phase (another method's fit) is logged under its method's name."""
    prefix = "" if summary.method == method else f"{summary.method}/"
    values = {**summary.metrics, "epoch_seconds": summary.seconds}
    mlflow.log_metrics({f"{prefix}{key}": value for key, value in values.items()}, summary.epoch)


def log_trained_model(model_dir: Path) -> dict[str, str]:
    """Finish the open training run: settings as params, the fit's totals and the model.
    Returns the run id and the logged model's URI (recorded in the models manifest)."""
    model = UpliftModel.load(model_dir)
    meta = model.metadata
    mlflow.log_params(
        {
            **{f"train.{k}": v for k, v in (meta.get("train_config") or {}).items()},
            "budget": meta.get("budget"),
            "dataset.source": (meta.get("dataset") or {}).get("source"),
        }
    )
    totals = {key: meta.get(key) for key in ("fit_seconds", "epochs_run", "best_epoch")}
    mlflow.log_metrics({key: float(value) for key, value in totals.items() if value is not None})
    model_uri = log_model(model, model_dir, {"method": meta.get("method")})
    mlflow.set_tag(MODEL_URI_TAG, model_uri)
    return {"run_id": mlflow.active_run().info.run_id, "model_uri": model_uri}


def log_evaluation(run_id: str, metrics: Metrics, curve_csv: Path, tags: dict[str, str]) -> None:
    """Add a method's held-out scores and budget-value curve (CSV and PNG) to its training
    run. Logging the same evaluation again (a retried promotion) changes nothing."""
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(
            {
                key: float(value)
                for key, value in metrics.to_json().items()
                if isinstance(value, int | float) and not isinstance(value, bool)
            }
        )
        mlflow.set_tags({"table": metrics.table, **tags})
        if curve_csv.exists():
            mlflow.log_artifact(str(curve_csv), artifact_path="plots")
            meta = {"method": metrics.method}
            mlflow.log_figure(_curve_figure(pd.read_csv(curve_csv), meta), "plots/budget_value.png")


def _curve_figure(curve: pd.DataFrame, meta: dict[str, Any]) -> Any:
    from bidfcl.plots import budget_value_figure

    method = str(meta.get("method"))
    return budget_value_figure({method: curve}, f"budget-value curve: {method}")


def register_challenger(model_uri: str, config: PromoteParams, promotion_key: str) -> str:
    """Register a logged model as a new version and give it the ``challenger`` alias; the
    version this promotion already registered, if any, is reused."""
    client = MlflowClient()
    versions = client.search_model_versions(f"name='{config.model_name}'")
    mine = [v for v in versions if v.tags.get(PROMOTION_TAG) == promotion_key]
    if mine:
        version = str(mine[0].version)
    else:
        version = str(mlflow.register_model(model_uri, config.model_name).version)
        client.set_model_version_tag(config.model_name, version, PROMOTION_TAG, promotion_key)
    client.set_registered_model_alias(config.model_name, CHALLENGER, version)
    return version


def settle_interrupted_promotions(config: PromoteParams, promotion_key: str) -> list[str]:
    """Put the registry back in a decided state after killed promotions; call it under the
    project lock, before registering. A version without a decision tag that holds
    ``champion`` (its promotion died between moving the alias and committing the decision)
    gives the alias back to the version it took it from; every undecided version that this
    promotion (``promotion_key``) did not register is tagged ``decision=abandoned`` and is
    never aliased again. Returns the abandoned version numbers."""
    client = MlflowClient()
    name = config.model_name
    abandoned = []
    for model_version in client.search_model_versions(f"name='{name}'"):
        tags, version = model_version.tags, str(model_version.version)
        if DECISION_TAG in tags:
            continue
        previous = tags.get(PREVIOUS_CHAMPION_TAG)
        if previous is not None and alias_version(config, CHAMPION) == version:
            if previous == NO_VERSION:
                client.delete_registered_model_alias(name, CHAMPION)
            else:
                client.set_registered_model_alias(name, CHAMPION, previous)
        if tags.get(PROMOTION_TAG) != promotion_key and alias_version(config, CHAMPION) != version:
            client.set_model_version_tag(name, version, DECISION_TAG, ABANDONED)
            client.set_model_version_tag(
                name, version, "reason", "its promotion stopped before the gate decided"
            )
            abandoned.append(version)
    return abandoned


def alias_version(config: PromoteParams, alias: str) -> str | None:
    """The version number holding ``alias`` in the current registry, or None."""
    try:
        return str(MlflowClient().get_model_version_by_alias(config.model_name, alias).version)
    except MlflowException:
        return None


def record_decision(
    config: PromoteParams,
    version: str,
    decision: GateDecision,
    extra_tags: dict[str, str] | None = None,
) -> None:
    """Tag the version with the decision's evidence, ``extra_tags`` and the champion it
    would replace; move ``champion`` if promoted; then commit the decision tag, last, so a
    kill at any point leaves a version :func:`settle_interrupted_promotions` can undo."""
    client = MlflowClient()
    tags = {**decision.tags(), **(extra_tags or {})}
    verdict = tags.pop(DECISION_TAG)
    tags[PREVIOUS_CHAMPION_TAG] = alias_version(config, CHAMPION) or NO_VERSION
    for key, value in tags.items():
        client.set_model_version_tag(config.model_name, version, key, value)
    if decision.promoted:
        client.set_registered_model_alias(config.model_name, CHAMPION, version)
    client.set_model_version_tag(config.model_name, version, DECISION_TAG, verdict)


def holdout_decisions(config: PromoteParams, holdout: str, exclude_version: str) -> int:
    """How many gate decisions the registry records on the held-out table ``holdout``, other
    than one on ``exclude_version`` (a retried promotion's own); an abandoned promotion
    decided nothing."""
    versions = MlflowClient().search_model_versions(f"name='{config.model_name}'")
    return sum(
        v.tags.get(HOLDOUT_TAG) == holdout and v.tags.get(DECISION_TAG) not in (None, ABANDONED)
        for v in versions
        if str(v.version) != exclude_version
    )


def check_model_ref(ref: str) -> None:
    """Refuse a ``models:/`` reference that is not ``models:/NAME@ALIAS`` or
    ``models:/NAME/VERSION`` with plain parts, before anything opens the registry."""
    if _MODEL_REF.fullmatch(ref) is None or ".." in ref:
        raise ValueError(
            f"{ref}: not a model reference; use models:/NAME@ALIAS or models:/NAME/VERSION "
            "(no '..', '/', '\\', '%' or '@' inside a part)"
        )


def resolve_model_uri(ref: str, dest: Path) -> Path:
    """The model folder of ``models:/NAME@alias`` (or ``models:/NAME/VERSION``), downloaded
    into ``dest`` from the registry at ``MLFLOW_TRACKING_URI``. A reference of any other shape
    is refused before the registry is asked, so no name, alias or version can point the
    download outside the model."""
    check_model_ref(ref)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(dest)))
    found = sorted(path.parent for path in local.rglob(MODEL_FILE))
    if not found:
        raise FileNotFoundError(f"{ref}: the registered model holds no {MODEL_FILE}")
    return found[0]


@contextmanager
def local_model(ref: str, dest: Path | None = None) -> Iterator[Path]:
    """A model folder for ``ref`` while the block runs: a folder path as is, a ``models:/``
    reference resolved by :func:`resolve_model_uri`. The download goes into ``dest``, which is
    kept and must be empty (a model left there could be picked up instead), or else into a
    temporary folder deleted on exit, so a lookup leaves nothing behind."""
    if not ref.startswith(MODELS_SCHEME):
        yield Path(ref)
    elif dest is not None:
        if dest.exists() and any(dest.iterdir()):
            raise FileExistsError(f"{dest}: not empty; a model is downloaded into an empty folder")
        yield resolve_model_uri(ref, dest)
    else:
        with tempfile.TemporaryDirectory(prefix="bidfcl-model-") as tmp:
            yield resolve_model_uri(ref, Path(tmp))
