"""A direct outcome model for doubly robust estimates, cross-fitted on the evaluated RCT table.

Doubly robust (DR) estimates add a model's prediction of each user's outcome under every
arm to the IPW correction of its residual. The estimate stays unbiased for any such model,
and the closer the model, the smaller the variance. Judging two policies against each other
needs a model that belongs to neither of them, so it is fitted here on the evaluated table
itself: per-arm ridge regressions on the features, K-fold cross-fitted, so that no user's
prediction uses that user's own outcome (which would bias the correction term).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bidfcl.contract import COST, REVENUE, LoggedData


@dataclass(frozen=True)
class OutcomePredictions:
    """Predicted revenue and cost of every arm for every user, each (N, M) float64."""

    revenue: torch.Tensor
    cost: torch.Tensor

    def of(self, outcome: str) -> torch.Tensor:
        if outcome == REVENUE:
            return self.revenue
        if outcome == COST:
            return self.cost
        raise ValueError(f"unknown outcome {outcome!r}; expected {REVENUE!r} or {COST!r}")


def crossfit_outcomes(
    data: LoggedData, n_folds: int = 5, ridge: float = 1.0, seed: int = 0
) -> OutcomePredictions:
    """Out-of-fold per-arm ridge predictions of revenue and cost for every user of ``data``.

    Users are split into ``n_folds`` random folds; for each fold and arm, a ridge regression
    (standardised features plus intercept, penalty ``ridge`` on the slopes) is fitted on the
    other folds' users logged in that arm and predicts the fold's users. An arm with no
    users outside a fold predicts that fold's users by the arm's overall mean.
    """
    if n_folds < 2:
        raise ValueError(f"cross-fitting needs at least two folds, got {n_folds}")
    n, n_arms = len(data), data.n_treatments
    if n < n_folds:
        raise ValueError(f"{n} users cannot be split into {n_folds} folds")
    x = data.x.to(torch.float64)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12)
    design = torch.cat([torch.ones(n, 1, dtype=torch.float64, device=x.device), x], dim=1)
    targets = torch.stack([data.revenue, data.cost], dim=1).to(torch.float64)  # (N, 2)
    generator = torch.Generator().manual_seed(seed)
    fold = (torch.randperm(n, generator=generator) % n_folds).to(x.device)
    penalty = ridge * torch.eye(design.shape[1], dtype=torch.float64, device=x.device)
    penalty[0, 0] = 0.0  # the intercept is not shrunk
    predictions = torch.empty(n, n_arms, 2, dtype=torch.float64, device=x.device)
    for k in range(n_folds):
        held_out = fold == k
        for arm in range(n_arms):
            rows = ~held_out & (data.treatment == arm)
            if int(rows.sum()) == 0:
                fallback = targets[data.treatment == arm].mean(0)
                predictions[held_out, arm] = fallback.nan_to_num(0.0)
                continue
            a, y = design[rows], targets[rows]
            coefficients = torch.linalg.solve(a.T @ a + penalty, a.T @ y)  # (d + 1, 2)
            predictions[held_out, arm] = design[held_out] @ coefficients
    return OutcomePredictions(revenue=predictions[..., 0], cost=predictions[..., 1])
