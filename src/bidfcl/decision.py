"""Decision losses as the learners call them: one adapter per surrogate over a batch of RCT rows.

Each adapter maps the predictions on a batch, the batch's logged rows and the current
lambda* to a scalar loss, taking only the few settings the surrogates need
(:class:`DecisionSettings`), so the learners hold one interchangeable callable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from bidfcl.contract import LoggedData
from bidfcl.losses import dual_ifd_loss, dual_pl_loss, pifd_loss, ppl_loss


@dataclass(frozen=True)
class DecisionSettings:
    """PPL temperature, PIFD/IFD flip-distance floor, and the dual variants' lambda grid as
    scales of the current lambda* (so the grid follows the budget)."""

    tau: float = 1.0
    h: float = 3.0
    dual_lambda_scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0)


class DecisionLoss(Protocol):
    """(revenue_hat, cost_hat, rows, lambda*, settings) -> scalar loss on the rows (RCT: known
    p). ``baseline``: (N, M) revenue predictions of a model that never saw the rows, for a
    doubly robust loss; only PPL takes one."""

    def __call__(
        self,
        revenue_hat: torch.Tensor,
        cost_hat: torch.Tensor,
        rows: LoggedData,
        lam: float,
        settings: DecisionSettings,
        baseline: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def ppl_decision(
    revenue_hat: torch.Tensor,
    cost_hat: torch.Tensor,
    rows: LoggedData,
    lam: float,
    settings: DecisionSettings,
    baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    return ppl_loss(
        revenue_hat,
        cost_hat,
        rows.treatment,
        rows.revenue,
        rows.propensity,
        lam,
        settings.tau,
        baseline,
    )


def pifd_decision(
    revenue_hat: torch.Tensor,
    cost_hat: torch.Tensor,
    rows: LoggedData,
    lam: float,
    settings: DecisionSettings,
    baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    _ipw_only(baseline, "pifd")
    return pifd_loss(
        revenue_hat, cost_hat, rows.treatment, rows.revenue, rows.propensity, lam, settings.h
    )


def dual_pl_decision(
    revenue_hat: torch.Tensor,
    cost_hat: torch.Tensor,
    rows: LoggedData,
    lam: float,
    settings: DecisionSettings,
    baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    _ipw_only(baseline, "dual-pl")
    grid = _lambda_grid(lam, settings)
    return dual_pl_loss(
        revenue_hat, cost_hat, rows.treatment, rows.revenue, rows.cost, rows.propensity, grid
    )


def dual_ifd_decision(
    revenue_hat: torch.Tensor,
    cost_hat: torch.Tensor,
    rows: LoggedData,
    lam: float,
    settings: DecisionSettings,
    baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    _ipw_only(baseline, "dual-ifd")
    grid = _lambda_grid(lam, settings)
    return dual_ifd_loss(
        revenue_hat,
        cost_hat,
        rows.treatment,
        rows.revenue,
        rows.cost,
        rows.propensity,
        grid,
        settings.h,
    )


def _ipw_only(baseline: torch.Tensor | None, loss: str) -> None:
    if baseline is not None:
        raise ValueError(f"the doubly robust upper loss is defined for PPL only, not {loss}")


def _lambda_grid(lam: float, settings: DecisionSettings) -> torch.Tensor:
    return torch.tensor(settings.dual_lambda_scales) * lam
