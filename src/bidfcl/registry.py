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
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bidfcl.gate import GateDecision, PromoteParams
from bidfcl.model import MODEL_FILE, UpliftModel
from bidfcl.scoring import Metrics

CHALLENGER = "challenger"
CHAMPION = "champion"
MODEL_ARTIFACT = "model"
UPLIFT_ARTIFACT = "uplift_model"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
HOLDOUT_TAG = "holdout"  # the md5 of the held-out table a gate decision was taken on
# One promotion (a flow run, or one set of promote inputs) tags its runs and version with this
# key, so a retried promotion finds what it already logged instead of logging it twice.
PROMOTION_TAG = "promotion_key"
MODEL_URI_TAG = "model_uri"
PINNED_PACKAGES = ("torch", "numpy", "pandas", "pyarrow", "mlflow")


class UpliftPyfunc(mlflow.pyfunc.PythonModel):
    """Predicted revenue and cost of every arm, as columns ``revenue_j`` and ``cost_j``."""

    def load_context(self, context: Any) -> None:
        self.model = UpliftModel.load(context.artifacts[UPLIFT_ARTIFACT])

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        return predictions_frame(self.model, model_input)


def predictions_frame(model: UpliftModel, features: pd.DataFrame) -> pd.DataFrame:
    """The model's (N, M) revenue and cost predictions for a frame of feature columns."""
    import numpy as np
    import torch

    x = torch.from_numpy(np.array(features[model.feature_columns].to_numpy(np.float32), copy=True))
    revenue, cost = model.predict(x)
    columns = {f"revenue_{j}": revenue[:, j].numpy() for j in range(model.n_treatments)}
    columns |= {f"cost_{j}": cost[:, j].numpy() for j in range(model.n_treatments)}
    return pd.DataFrame(columns, index=features.index)


def tracking_uri(root: Path, config: PromoteParams) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``promote.tracking_uri`` with a relative sqlite path
    anchored at the project root."""
    uri = os.environ.get(TRACKING_ENV) or config.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).is_absolute():
        return prefix + str((root / uri[len(prefix) :]).resolve())
    return uri


@contextmanager
def tracking(root: Path, config: PromoteParams) -> Iterator[MlflowClient]:
    """Point MLflow (tracking and registry) at the project's store for the duration.

    MLflow's setter also exports ``MLFLOW_TRACKING_URI``; the caller's value (or its absence)
    is put back afterwards, so a later call in the same process resolves its own store.
    """
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    previous_env = os.environ.get(TRACKING_ENV)
    uri = tracking_uri(root, config)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        if mlflow.get_experiment_by_name(config.experiment) is None:
            artifacts = (root / "mlruns").resolve().as_uri() if uri.startswith("sqlite") else None
            mlflow.create_experiment(config.experiment, artifact_location=artifacts)
        mlflow.set_experiment(config.experiment)
        yield MlflowClient(uri, uri)
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
        if previous_env is None:
            os.environ.pop(TRACKING_ENV, None)
        else:
            os.environ[TRACKING_ENV] = previous_env


def log_training_run(
    model_dir: Path, metrics: Metrics, curve_csv: Path, promotion_key: str
) -> dict[str, str]:
    """One MLflow run per trained method and promotion: params, numeric metrics, the
    budget-value curve (CSV and PNG) and the model. Returns the run id and the logged model's
    URI; a run this promotion already logged for the method is returned as it is."""
    model = UpliftModel.load(model_dir)
    meta = model.metadata
    method = str(meta.get("method"))
    logged = mlflow.search_runs(
        filter_string=f"tags.{PROMOTION_TAG} = '{promotion_key}' and tags.method = '{method}'",
        output_format="list",
    )
    done = [r for r in logged if MODEL_URI_TAG in r.data.tags]
    if done:
        return {"run_id": done[0].info.run_id, "model_uri": done[0].data.tags[MODEL_URI_TAG]}
    with mlflow.start_run(run_name=method) as run:
        mlflow.log_params(
            {
                **{f"train.{k}": v for k, v in (meta.get("train_config") or {}).items()},
                "budget": meta.get("budget"),
                "dataset.source": (meta.get("dataset") or {}).get("source"),
            }
        )
        mlflow.log_metrics(
            {
                key: float(value)
                for key, value in metrics.to_json().items()
                if isinstance(value, int | float) and not isinstance(value, bool)
            }
        )
        mlflow.set_tags({"method": method, "table": metrics.table, PROMOTION_TAG: promotion_key})
        if curve_csv.exists():
            mlflow.log_artifact(str(curve_csv), artifact_path="plots")
            mlflow.log_figure(_curve_figure(pd.read_csv(curve_csv), meta), "plots/budget_value.png")
        model_uri = _log_pyfunc(model, model_dir, metrics)
        mlflow.set_tag(MODEL_URI_TAG, model_uri)  # last: marks the run complete
    return {"run_id": run.info.run_id, "model_uri": model_uri}


def _curve_figure(curve: pd.DataFrame, meta: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.5))
    axes.plot(curve["budget"], curve["eom"], marker="o", label="EOM (IPW estimate)")
    axes.fill_between(curve["budget"], curve["eom_ci_low"], curve["eom_ci_high"], alpha=0.2)
    if curve["true_revenue"].notna().any():
        axes.plot(curve["budget"], curve["true_revenue"], linestyle="--", label="true value")
    axes.set(xlabel="budget (mean cost per user)", ylabel="revenue per user")
    axes.set_title(f"budget-value curve: {meta.get('method')}")
    axes.legend()
    figure.tight_layout()
    plt.close(figure)
    return figure


def _log_pyfunc(model: UpliftModel, model_dir: Path, metrics: Metrics) -> str:
    """Log the model folder as a pyfunc with pinned requirements and a two-row input example
    (pinning avoids MLflow's slow requirement inference)."""
    example = pd.DataFrame(
        [[0.0] * len(model.feature_columns), [1.0] * len(model.feature_columns)],
        columns=model.feature_columns,
    )
    info = mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT,
        python_model=UpliftPyfunc(),
        artifacts={UPLIFT_ARTIFACT: str(model_dir)},
        pip_requirements=[f"{name}=={installed_version(name)}" for name in PINNED_PACKAGES],
        input_example=example,
        metadata={"method": model.metadata.get("method"), "eom": metrics.eom},
    )
    return info.model_uri


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


def champion_version(root: Path, config: PromoteParams) -> str | None:
    """The version number holding ``champion``, or None."""
    with tracking(root, config):
        return alias_version(config, CHAMPION)


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
