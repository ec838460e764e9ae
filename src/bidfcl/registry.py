"""MLflow I/O: log training runs, register challengers, keep the gate's bookkeeping (aliases
and decision tags), and resolve ``models:/NAME@alias`` to a local model folder.

Tracking and registry default to a sqlite file in the project root (``promote.tracking_uri``);
``MLFLOW_TRACKING_URI`` points both elsewhere (e.g. a server on PostgreSQL). Models are logged
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
DVC_EXPERIMENT_ENV = "DVC_EXP_NAME"  # set by DVC for every `dvc exp run` (also --temp, --queue)
DVC_ROOT_ENV = "DVC_ROOT"  # for experiments, the repository they were started from
EXPERIMENT_TAG = "dvc_experiment"
HOLDOUT_TAG = "holdout"  # the md5 of the held-out table a gate decision was taken on
# One promotion (a flow run, or one set of promote inputs) tags its version with this key, so
# a retried promotion finds the version it registered instead of registering another.
PROMOTION_TAG = "promotion_key"
MODEL_URI_TAG = "model_uri"


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
    """``MLFLOW_TRACKING_URI`` if set, else ``uri`` with a relative sqlite path anchored at
    :func:`store_root`."""
    uri = os.environ.get(TRACKING_ENV) or uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).is_absolute():
        return prefix + str((store_root(root) / uri[len(prefix) :]).resolve())
    return uri


def redacted(uri: str) -> str:
    """``uri`` without the password of a ``scheme://user:password@host`` form, for files
    and logs that others read."""
    return re.sub(r"(://[^/:@]+):[^/@]*@", r"\1:***@", uri)


@contextmanager
def tracking(root: Path, uri: str, experiment: str) -> Iterator[MlflowClient]:
    """Point MLflow (tracking and registry) at the project's store and ``experiment`` for
    the duration.

    MLflow's setter also exports ``MLFLOW_TRACKING_URI``; the caller's value (or its absence)
    is put back afterwards, so a later call in the same process resolves its own store.
    """
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    previous_env = os.environ.get(TRACKING_ENV)
    resolved = tracking_uri(root, uri)
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    try:
        if mlflow.get_experiment_by_name(experiment) is None:
            local = (store_root(root) / "mlruns").resolve().as_uri()
            mlflow.create_experiment(
                experiment, artifact_location=local if resolved.startswith("sqlite") else None
            )
        mlflow.set_experiment(experiment)
        yield MlflowClient(resolved, resolved)
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
        if previous_env is None:
            os.environ.pop(TRACKING_ENV, None)
        else:
            os.environ[TRACKING_ENV] = previous_env


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
    """Tag the version with the decision, its evidence and ``extra_tags``; move
    ``champion`` if promoted."""
    client = MlflowClient()
    for key, value in {**decision.tags(), **(extra_tags or {})}.items():
        client.set_model_version_tag(config.model_name, version, key, value)
    if decision.promoted:
        client.set_registered_model_alias(config.model_name, CHAMPION, version)


def holdout_decisions(config: PromoteParams, holdout: str, exclude_version: str) -> int:
    """How many gate decisions the registry records on the held-out table ``holdout``, other
    than one on ``exclude_version`` (a retried promotion's own)."""
    versions = MlflowClient().search_model_versions(f"name='{config.model_name}'")
    return sum(
        v.tags.get(HOLDOUT_TAG) == holdout and "decision" in v.tags
        for v in versions
        if str(v.version) != exclude_version
    )


def resolve_model_uri(ref: str, dest: Path | None = None) -> Path:
    """A local model folder for ``ref``: a folder path as is, or ``models:/NAME@alias`` (or
    ``models:/NAME/VERSION``) downloaded from the registry at ``MLFLOW_TRACKING_URI``."""
    if not ref.startswith("models:/"):
        return Path(ref)
    target = dest or Path(tempfile.mkdtemp(prefix="bidfcl-model-"))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(target)))
    found = sorted(path.parent for path in local.rglob(MODEL_FILE))
    if not found:
        raise FileNotFoundError(f"{ref}: the registered model holds no {MODEL_FILE}")
    return found[0]
