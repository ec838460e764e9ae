"""The MLflow pyfunc a registered model is served by: its scores, or the allocation it ships.

Portability: models are logged with ``code_paths=[<the bidfcl package>]``. MLflow copies the
package into the model and puts it on ``sys.path`` before unpickling, so the pickled
:class:`UpliftAllocator` (a class reference with no state) loads wherever torch, numpy,
pandas and mlflow are installed, bidfcl or not. Models-from-code would need the same copy
(its script imports bidfcl) plus a script file to keep in step, so code_paths it is. This
module imports only light layers (model, deployment and what they import), so loading a
model pulls in none of the training stack.
"""

from __future__ import annotations

import logging
import math
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from bidfcl.contract import COST, REVENUE, TREATMENT
from bidfcl.deployment import deploy
from bidfcl.model import UpliftModel

MODEL_ARTIFACT = "model"  # the logged model's name within its run
UPLIFT_ARTIFACT = "uplift_model"  # the saved UpliftModel folder among the pyfunc's artifacts
PINNED_PACKAGES = ("torch", "numpy", "pandas", "mlflow")
BUDGET = "budget"
OUTPUT = "output"
SCORES = "scores"
ALLOCATION = "allocation"
OUTPUTS = (SCORES, ALLOCATION)


class UpliftAllocator(mlflow.pyfunc.PythonModel):
    """A saved :class:`~bidfcl.model.UpliftModel` behind ``predict(frame, params)``.

    ``params={"output": "scores"}`` (the default) returns every arm's predicted revenue and
    cost as columns ``revenue_j`` and ``cost_j``. ``params={"output": "allocation",
    "budget": B}`` returns what ``bidfcl allocate`` would ship at mean cost per user ``B``
    (default: the training budget): one row per input row with the chosen arm
    (``treatment``) and its predicted ``revenue`` and ``cost``. The allocation (the model's
    calibrated lambda for ``B``, else the multiple-choice knapsack on predicted costs) is
    solved over the whole batch passed to one ``predict`` call: the budget bounds the batch's
    mean cost, so a caller who sends rows one at a time gets a per-row budget instead.

    All state is set in ``load_context``, so instances pickled by earlier releases load too.
    """

    def load_context(self, context: Any) -> None:
        self.model = UpliftModel.load(context.artifacts[UPLIFT_ARTIFACT])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        output, budget = _checked_params(params or {})
        if output == SCORES:
            return predictions_frame(self.model, model_input)
        revenue, cost = _predictions(self.model, model_input)
        chosen = deploy(
            self.model, revenue, cost, training_budget(self.model) if budget is None else budget
        ).treatment
        users = torch.arange(chosen.shape[0], device=chosen.device)
        return pd.DataFrame(
            {
                TREATMENT: chosen.cpu().numpy(),
                REVENUE: revenue[users, chosen].cpu().numpy(),
                COST: cost[users, chosen].cpu().numpy(),
            },
            index=model_input.index,
        )


def predictions_frame(model: UpliftModel, features: pd.DataFrame) -> pd.DataFrame:
    """The model's (N, M) revenue and cost predictions for a frame of feature columns."""
    revenue, cost = _predictions(model, features)
    columns = {f"revenue_{j}": revenue[:, j].cpu().numpy() for j in range(model.n_treatments)}
    columns |= {f"cost_{j}": cost[:, j].cpu().numpy() for j in range(model.n_treatments)}
    return pd.DataFrame(columns, index=features.index)


def training_budget(model: UpliftModel) -> float:
    """The budget the model was trained for, else its dataset's default: what a caller who
    names no budget means."""
    budget = model.metadata.get(BUDGET)
    if budget is None:
        budget = (model.metadata.get("dataset") or {}).get("default_budget")
    if budget is None:
        raise ValueError(
            "the model's metadata records no training budget: pass params={'budget': B}"
        )
    return float(budget)


def log_model(model: UpliftModel, model_dir: Path, metadata: dict[str, Any]) -> str:
    """Log ``model_dir`` (the saved ``model``) as an :class:`UpliftAllocator` pyfunc in the
    active MLflow run and return its URI. Requirements are pinned (MLflow's inference is
    slow) without local version tags such as ``+cpu``, which no package index serves."""
    columns = list(model.feature_columns)
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.double, name) for name in columns]),
        params=ParamSchema(
            [
                ParamSpec(BUDGET, DataType.double, training_budget(model)),
                ParamSpec(OUTPUT, DataType.string, SCORES),
            ]
        ),
    )
    pyfunc_logger = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_logger.level
    # MLflow warns on every pickled python_model; this one pickles a bare class reference
    # whose code travels in code_paths, and the warning would repeat once per trained method.
    pyfunc_logger.setLevel(logging.ERROR)
    try:
        info = _log_pyfunc(model_dir, columns, signature, metadata)
    finally:
        pyfunc_logger.setLevel(level)
    return info.model_uri


def _log_pyfunc(
    model_dir: Path, columns: list[str], signature: ModelSignature, metadata: dict[str, Any]
) -> Any:
    return mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT,
        python_model=UpliftAllocator(),
        artifacts={UPLIFT_ARTIFACT: str(model_dir)},
        code_paths=[str(Path(__file__).resolve().parent)],
        pip_requirements=[
            f"{name}=={installed_version(name).split('+')[0]}" for name in PINNED_PACKAGES
        ],
        signature=signature,
        input_example=pd.DataFrame([[0.0] * len(columns), [1.0] * len(columns)], columns=columns),
        metadata=metadata,
    )


def _checked_params(params: dict[str, Any]) -> tuple[str, float | None]:
    """``output`` and ``budget`` (None: not given), refused with a clear ValueError when
    invalid rather than failing deep inside the solver."""
    output = params.get(OUTPUT, SCORES)
    if output not in OUTPUTS:
        raise ValueError(f"params['{OUTPUT}'] must be one of {list(OUTPUTS)}, got {output!r}")
    budget = params.get(BUDGET)
    if budget is None:
        return output, None
    budget = float(budget)
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(
            f"params['{BUDGET}'] (mean cost per user) must be finite and > 0, got {budget}"
        )
    return output, budget


def _predictions(model: UpliftModel, features: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted (revenue, cost) for the model's feature columns, picked by name; null or
    non-finite features are refused, as ``bidfcl allocate`` refuses them."""
    values = features[model.feature_columns].to_numpy(np.float32)
    x = torch.from_numpy(np.array(values, copy=True))
    finite = torch.isfinite(x).all(dim=0)
    if not finite.all():
        bad = [c for c, ok in zip(model.feature_columns, finite.tolist(), strict=True) if not ok]
        raise ValueError(f"null or non-finite values in feature(s) {bad}")
    return model.predict(x)
