"""The allocation a trained model ships, and the spend calibration that makes it trustworthy.

A model's predicted costs carry whatever level its training data taught it; a model fit on
a biased OBS log can under- or over-spend when its allocation is solved on them. With
calibration, training ends by choosing the Lagrange multiplier lambda whose policy
argmax_j (r_hat_ij - lambda c_hat_ij) has a doubly robust estimated spend on the held-out
``rct_val`` within the budget (the DR outcome model is cross-fitted on rct_val itself, so it
belongs to no model), and saves that lambda with the model. Shipping then applies the saved
lambda to new users; without calibration it solves the budgeted allocation (exact MCKP) on
the predicted costs of the users at hand.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bidfcl.allocation import STATUS_INFEASIBLE, AllocationResult, lagrangian_choice, solve_mckp
from bidfcl.contract import RCT_VAL, LoggedData
from bidfcl.evaluation import budget_lambda, make_estimator
from bidfcl.model import UpliftModel
from bidfcl.outcome_model import crossfit_outcomes

DEPLOYMENT_KEY = "deployment"  # where the calibration lives in the model's metadata
STATUS_CALIBRATED = "calibrated"
CALIBRATION_ESTIMATOR = "dr"


@dataclass(frozen=True)
class Calibration:
    """The lambda a model ships at ``budget``, chosen on ``table``'s estimated spend."""

    budget: float
    lam: float
    budget_met: bool  # False: even each user's cheapest arm is estimated to overspend
    table: str = RCT_VAL
    estimator: str = CALIBRATION_ESTIMATOR

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, model: UpliftModel) -> Calibration | None:
        raw = model.metadata.get(DEPLOYMENT_KEY)
        return None if raw is None else cls(**raw)

    def applies_to(self, budget: float) -> bool:
        return math.isclose(self.budget, budget, rel_tol=1e-9, abs_tol=1e-12)


def calibrate(model: UpliftModel, rows: LoggedData, budget: float, seed: int = 0) -> Calibration:
    """The smallest lambda whose policy's DR-estimated spend on ``rows`` (an RCT table the
    model was not fitted on) meets ``budget``."""
    revenue_pred, cost_pred = model.predict(rows.x.to(model.device))
    rows = rows.to(model.device)
    estimator = make_estimator(CALIBRATION_ESTIMATOR, crossfit_outcomes(rows, seed=seed))
    lam, met = budget_lambda(rows, revenue_pred, cost_pred, budget, estimator)
    return Calibration(budget=float(budget), lam=lam, budget_met=met)


def deploy(
    model: UpliftModel,
    revenue_pred: torch.Tensor,
    cost_pred: torch.Tensor,
    budget: float,
) -> AllocationResult:
    """The allocation ``model`` ships for users with these predictions: its calibrated
    lambda when it carries one for ``budget``, else the exact MCKP on predicted costs."""
    calibration = Calibration.of(model)
    if calibration is None or not calibration.applies_to(budget):
        return solve_mckp(revenue_pred, cost_pred, budget)
    arms = lagrangian_choice(revenue_pred, cost_pred, calibration.lam)
    users = torch.arange(arms.shape[0], device=arms.device)
    n = max(1, arms.shape[0])
    return AllocationResult(
        treatment=arms,
        lam=calibration.lam,
        mean_revenue=float(revenue_pred[users, arms].sum(dtype=torch.float64)) / n,
        mean_cost=float(cost_pred[users, arms].sum(dtype=torch.float64)) / n,
        lp_value=None,
        status=STATUS_CALIBRATED if calibration.budget_met else STATUS_INFEASIBLE,
    )
