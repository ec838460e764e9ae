"""Off-policy evaluation of allocation policies on randomized (RCT) logs.

A policy gives every logged user one arm. Its value (mean revenue or cost per user) is
estimated from the users whose logged arm happens to match it, re-weighted by the logging
propensity; this is unbiased whenever the propensities are the true assignment
probabilities, which holds for an RCT. Three estimators share one interface:

- ``IPW``: mean_i 1[pi_i = t_i] y_i / p_i (unbiased).
- ``SNIPW``: the same sum divided by the sum of weights instead of N (slightly biased,
  usually less variable).
- ``DoublyRobust``: the model's prediction of the policy's arm plus the IPW correction of
  that prediction's residual on matched users (unbiased for any predictions, and the
  better the predictions, the smaller the variance).

Every estimate carries a CLT or bootstrap interval. On top sit the paper's metrics: EOM
(revenue per user of the Lagrangian policy whose estimated cost meets a budget), the
budget-value curve and its area, AUCC for two arms, and Qini/AUUC for uplift rankings.
Where simulated ground truth exists, the true value of the same allocation is reported
next to each estimate.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from bidfcl.allocation import lagrangian_choice
from bidfcl.contract import COST, REVENUE, LoggedData, Truth
from bidfcl.outcome_model import OutcomePredictions

INTERVALS: tuple[str, ...] = ("clt", "bootstrap")
# Upper bound on resample indices held at once by the bootstrap (chunks x users).
_BOOTSTRAP_CHUNK_ELEMENTS = 1 << 22
# Upper bound on (lambdas x users) policy entries scored at once by the budget search.
_SEARCH_CHUNK_ELEMENTS = 1 << 22
# Lambdas evaluated in one vectorised sweep before bisecting the bracket it finds.
_SEARCH_GRID_POINTS = 65


@dataclass(frozen=True)
class Estimate:
    """A point estimate of a mean per user with its (1 - alpha) interval."""

    value: float
    ci_low: float
    ci_high: float
    std_error: float
    n: int
    estimator: str
    interval: str  # "clt" | "bootstrap"


class PolicyValueEstimator(ABC):
    """Estimates a policy's mean outcome per user from one logged table.

    Every estimator here is a ratio of per-user sums, sum(numerator) / sum(denominator),
    so intervals (CLT by the delta method, bootstrap by resampling users) are shared.
    """

    name: ClassVar[str]
    needs_predictions: bool = False  # whether ``terms`` needs per-call predictions

    @abstractmethod
    def terms(
        self,
        data: LoggedData,
        policy: torch.Tensor,
        outcome: str = REVENUE,
        predictions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-user numerator and denominator terms (float64, shape of ``policy``).

        ``policy`` may carry leading batch dimensions, (..., N), to score many policies at
        once; the last dimension indexes the users of ``data``.
        """

    def point(
        self,
        data: LoggedData,
        policy: torch.Tensor,
        outcome: str = REVENUE,
        predictions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Point estimates only, one per policy in a (..., N) batch (no interval work)."""
        numerator, denominator = self.terms(data, policy, outcome, predictions)
        return numerator.sum(-1) / denominator.sum(-1)

    def estimate(
        self,
        data: LoggedData,
        policy: torch.Tensor,
        outcome: str = REVENUE,
        predictions: torch.Tensor | None = None,
        interval: str = "clt",
        alpha: float = 0.05,
        n_bootstrap: int = 1000,
        seed: int = 0,
    ) -> Estimate:
        """Value of ``policy`` (an (N,) arm per user) with a (1 - alpha) interval."""
        _check_policy(data, policy)
        numerator, denominator = self.terms(data, policy, outcome, predictions)
        return _ratio_estimate(
            numerator, denominator, self.name, interval, alpha, n_bootstrap, seed
        )


class IPW(PolicyValueEstimator):
    """Inverse propensity weighting: mean_i 1[pi_i = t_i] y_i / p_i."""

    name = "ipw"

    def terms(
        self,
        data: LoggedData,
        policy: torch.Tensor,
        outcome: str = REVENUE,
        predictions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weight = _importance_weights(data, policy)
        numerator = weight * _outcome(data, outcome)
        return numerator, torch.ones_like(numerator)


class SNIPW(PolicyValueEstimator):
    """Self-normalised IPW: sum_i w_i y_i / sum_i w_i with w_i = 1[pi_i = t_i] / p_i."""

    name = "snipw"

    def terms(
        self,
        data: LoggedData,
        policy: torch.Tensor,
        outcome: str = REVENUE,
        predictions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weight = _importance_weights(data, policy)
        return weight * _outcome(data, outcome), weight


class DoublyRobust(PolicyValueEstimator):
    """Doubly robust: mean_i [q_i(pi_i) + 1[pi_i = t_i] (y_i - q_i(t_i)) / p_i].

    q (N, M) predicts the outcome of every arm (the direct-method part); the IPW term
    corrects its error, so the estimate stays unbiased for any q not fitted on these users'
    outcomes. q is ``direct`` when given (e.g. :func:`~bidfcl.outcome_model.crossfit_outcomes`,
    a model independent of the policies judged), else the ``predictions`` passed per call
    (the scored model's own).
    """

    name = "dr"

    def __init__(self, direct: OutcomePredictions | None = None) -> None:
        self.direct = direct
        self.needs_predictions = direct is None

    def terms(
        self,
        data: LoggedData,
        policy: torch.Tensor,
        outcome: str = REVENUE,
        predictions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.direct is not None:
            predictions = self.direct.of(outcome)
        if predictions is None:
            raise ValueError("the doubly robust estimator needs predictions of shape (N, M)")
        _check_predictions(data, predictions, "predictions")
        q = predictions.to(torch.float64)
        users = torch.arange(len(data), device=q.device)
        direct = q[users, policy]
        residual = _outcome(data, outcome) - q[users, data.treatment]
        numerator = direct + _importance_weights(data, policy) * residual
        return numerator, torch.ones_like(numerator)


ESTIMATORS: dict[str, type[PolicyValueEstimator]] = {
    IPW.name: IPW,
    SNIPW.name: SNIPW,
    DoublyRobust.name: DoublyRobust,
}


def make_estimator(name: str, direct: OutcomePredictions | None = None) -> PolicyValueEstimator:
    """The estimator called ``name`` ("ipw", "snipw" or "dr"); ``direct`` is DR's outcome
    model (ignored by the others)."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; expected one of {sorted(ESTIMATORS)}")
    if name == DoublyRobust.name:
        return DoublyRobust(direct)
    return ESTIMATORS[name]()


# ----------------------------------------------------------------------------- one policy


@dataclass(frozen=True)
class PolicyEvaluation:
    """Estimated revenue and cost per user of one policy, with the truth where known."""

    revenue: Estimate
    cost: Estimate
    true_revenue: float | None
    true_cost: float | None


def evaluate_policy(
    data: LoggedData,
    policy: torch.Tensor,
    estimator: str | PolicyValueEstimator = "ipw",
    revenue_pred: torch.Tensor | None = None,
    cost_pred: torch.Tensor | None = None,
    truth: Truth | None = None,
    interval: str = "clt",
    alpha: float = 0.05,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> PolicyEvaluation:
    """Revenue and cost per user of ``policy`` on ``data`` (and their true values if known).

    ``revenue_pred`` / ``cost_pred`` (N, M) feed the direct part of the doubly robust
    estimator; the other estimators ignore them.
    """
    est = _resolve(estimator, revenue_pred, cost_pred)
    options = {"interval": interval, "alpha": alpha, "n_bootstrap": n_bootstrap, "seed": seed}
    revenue = est.estimate(data, policy, REVENUE, revenue_pred, **options)
    cost = est.estimate(data, policy, COST, cost_pred, **options)
    true_revenue, true_cost = _true_values(truth, policy)
    return PolicyEvaluation(revenue, cost, true_revenue, true_cost)


# ----------------------------------------------------------------------------- two policies


@dataclass(frozen=True)
class PairedComparison:
    """Policy A minus policy B, estimated on the same logged users.

    Users on whom the two policies agree add the same term to both estimates (nothing, for
    IPW), so the per-user differences vary far less than each estimate does, and the paired
    interval is far narrower than two unpaired ones when the policies mostly agree. The
    interval ``[ci_low, ci_high]`` is two-sided at level 1 - alpha; ``lower_bound`` is the
    one-sided 1 - alpha lower bound and ``p_value`` the one-sided p-value of "A is no
    better than B" (CLT for both, also under the bootstrap interval). The ``cost_*`` fields
    are the same for spend. ``unpaired_std_error`` is what the difference's standard error
    would be if the two estimates were independent (for comparison only).
    """

    estimator: str
    interval: str
    alpha: float
    n_users: int
    agreement: float  # share of users given the same arm by both policies
    value_a: float
    value_b: float
    difference: float
    std_error: float
    ci_low: float
    ci_high: float
    lower_bound: float
    p_value: float
    unpaired_std_error: float
    cost_difference: float
    cost_std_error: float
    cost_ci_low: float
    cost_ci_high: float
    true_difference: float | None
    true_cost_difference: float | None


def compare_policies(
    data: LoggedData,
    policy_a: torch.Tensor,
    policy_b: torch.Tensor,
    estimator: str | PolicyValueEstimator = "ipw",
    direct: OutcomePredictions | None = None,
    truth: Truth | None = None,
    interval: str = "clt",
    alpha: float = 0.05,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> PairedComparison:
    """Revenue and cost per user of ``policy_a`` minus ``policy_b`` on the same users.

    ``direct`` is DR's outcome model; it must not come from either policy's model (use
    :func:`~bidfcl.outcome_model.crossfit_outcomes` on ``data``), or the comparison would
    favour the model that also predicts the outcomes.
    """
    est = make_estimator(estimator, direct) if isinstance(estimator, str) else estimator
    if est.needs_predictions:
        raise ValueError(
            "a paired doubly robust comparison needs an outcome model independent of both "
            "policies: pass direct=crossfit_outcomes(data)"
        )
    _check_policy(data, policy_a)
    _check_policy(data, policy_b)
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")
    revenue = _paired(est, data, policy_a, policy_b, REVENUE, interval, alpha, n_bootstrap, seed)
    cost = _paired(est, data, policy_a, policy_b, COST, interval, alpha, n_bootstrap, seed)
    true_difference = true_cost_difference = None
    if truth is not None:
        true_a, true_b = _true_values(truth, policy_a), _true_values(truth, policy_b)
        true_difference = true_a[0] - true_b[0]
        true_cost_difference = true_a[1] - true_b[1]
    return PairedComparison(
        estimator=est.name,
        interval=interval,
        alpha=alpha,
        n_users=len(data),
        agreement=float((policy_a == policy_b).to(torch.float64).mean()),
        **asdict(revenue),
        cost_difference=cost.difference,
        cost_std_error=cost.std_error,
        cost_ci_low=cost.ci_low,
        cost_ci_high=cost.ci_high,
        true_difference=true_difference,
        true_cost_difference=true_cost_difference,
    )


@dataclass(frozen=True)
class _PairedOutcome:
    """One outcome's part of a PairedComparison (its revenue fields carry these names)."""

    value_a: float
    value_b: float
    difference: float
    std_error: float
    ci_low: float
    ci_high: float
    lower_bound: float
    p_value: float
    unpaired_std_error: float


def _paired(
    est: PolicyValueEstimator,
    data: LoggedData,
    policy_a: torch.Tensor,
    policy_b: torch.Tensor,
    outcome: str,
    interval: str,
    alpha: float,
    n_bootstrap: int,
    seed: int,
) -> _PairedOutcome:
    """One outcome's paired difference from the estimator's per-user ratio terms."""
    if interval not in INTERVALS:
        raise ValueError(f"unknown interval {interval!r}; expected one of {INTERVALS}")
    numerator, denominator = est.terms(data, torch.stack([policy_a, policy_b]), outcome)
    n = int(numerator.shape[-1])
    if n < 2:
        raise ValueError(f"need at least two logged users to compare policies, got {n}")
    values = numerator.sum(-1) / denominator.sum(-1)
    # Each ratio's influence terms (delta method); for IPW and DR simply numerator - value.
    influence = (numerator - values[:, None] * denominator) / denominator.mean(-1, keepdim=True)
    difference = float(values[0] - values[1])
    std_error = float((influence[0] - influence[1]).std() / math.sqrt(n))
    unpaired = float(influence.var(-1).sum().sqrt() / math.sqrt(n))
    normal = NormalDist()
    if std_error > 0:
        p_value = 1.0 - normal.cdf(difference / std_error)
    else:  # the policies agree on every user who could tell them apart
        p_value = 0.0 if difference > 0 else 1.0
    if interval == "clt":
        z_two, z_one = normal.inv_cdf(1.0 - alpha / 2.0), normal.inv_cdf(1.0 - alpha)
        low, high = difference - z_two * std_error, difference + z_two * std_error
        lower_bound = difference - z_one * std_error
    else:
        ratios = _bootstrap_ratios(numerator, denominator, n_bootstrap, seed)
        replicates = ratios[0] - ratios[1]
        levels = torch.tensor([alpha / 2.0, 1.0 - alpha / 2.0, alpha], dtype=replicates.dtype)
        low, high, lower_bound = (float(q) for q in torch.quantile(replicates, levels))
        std_error = float(replicates.std())
    return _PairedOutcome(
        float(values[0]),
        float(values[1]),
        difference,
        std_error,
        low,
        high,
        lower_bound,
        p_value,
        unpaired,
    )


# ----------------------------------------------------------------------------- EOM


@dataclass(frozen=True)
class EOMResult:
    """EOM: estimated revenue per user of the Lagrangian policy at the budget.

    ``budget_met`` is False when even the cheapest-arm policy (lambda -> infinity) has an
    estimated cost above the budget; ``lam`` and ``policy`` are then that policy's.
    """

    eom: Estimate
    cost: Estimate
    lam: float
    policy: torch.Tensor
    budget: float
    budget_met: bool
    true_revenue: float | None
    true_cost: float | None


def expected_outcome_metric(
    data: LoggedData,
    revenue_pred: torch.Tensor,
    cost_pred: torch.Tensor,
    budget: float,
    estimator: str | PolicyValueEstimator = "ipw",
    truth: Truth | None = None,
    interval: str = "clt",
    alpha: float = 0.05,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> EOMResult:
    """EOM at ``budget`` (mean cost per user, the unit of the cost estimate).

    lambda is the smallest multiplier whose Lagrangian policy argmax_j (r_hat - lambda
    c_hat) has an estimated cost (same estimator, same RCT sample) within the budget.
    """
    est = _resolve(estimator, revenue_pred, cost_pred)
    search = _BudgetSearch(data, revenue_pred, cost_pred, est)
    return _eom_at(search, budget, truth, interval, alpha, n_bootstrap, seed)


def budget_lambda(
    data: LoggedData,
    revenue_pred: torch.Tensor,
    cost_pred: torch.Tensor,
    budget: float,
    estimator: str | PolicyValueEstimator = "ipw",
) -> tuple[float, bool]:
    """The smallest lambda whose Lagrangian policy's estimated cost on ``data`` meets the
    budget, and whether any does (if none, the lambda of the cheapest arms)."""
    est = _resolve(estimator, revenue_pred, cost_pred)
    search = _BudgetSearch(data, revenue_pred, cost_pred, est)
    index, budget_met = search.solve(budget)
    return float(search.candidates[index]), budget_met


def budget_value_curve(
    data: LoggedData,
    revenue_pred: torch.Tensor,
    cost_pred: torch.Tensor,
    budgets: Sequence[float],
    estimator: str | PolicyValueEstimator = "ipw",
    truth: Truth | None = None,
    interval: str = "clt",
    alpha: float = 0.05,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """EOM over a grid of budgets, one row per budget in the given order.

    Columns: budget, lam, budget_met, eom, eom_ci_low, eom_ci_high, cost (the estimated
    cost of the chosen policy), true_revenue, true_cost (NaN without truth).
    """
    est = _resolve(estimator, revenue_pred, cost_pred)
    search = _BudgetSearch(data, revenue_pred, cost_pred, est)
    rows = []
    for budget in budgets:
        result = _eom_at(search, float(budget), truth, interval, alpha, n_bootstrap, seed)
        rows.append(
            {
                "budget": result.budget,
                "lam": result.lam,
                "budget_met": result.budget_met,
                "eom": result.eom.value,
                "eom_ci_low": result.eom.ci_low,
                "eom_ci_high": result.eom.ci_high,
                "cost": result.cost.value,
                "true_revenue": math.nan if result.true_revenue is None else result.true_revenue,
                "true_cost": math.nan if result.true_cost is None else result.true_cost,
            }
        )
    return pd.DataFrame(rows)


def curve_area(curve: pd.DataFrame, value: str = "eom") -> float:
    """Normalised area under a budget-value curve: its mean height over the budget range.

    Trapezoid rule of ``value`` over the sorted budgets, divided by (max - min budget), so
    the result is in revenue per user and comparable across budget grids of equal range.
    """
    ordered = curve.sort_values("budget")
    budgets = ordered["budget"].to_numpy(np.float64)
    if len(budgets) < 2 or budgets[-1] <= budgets[0]:
        raise ValueError("curve_area needs at least two distinct budgets")
    area = np.trapezoid(ordered[value].to_numpy(np.float64), budgets)
    return float(area / (budgets[-1] - budgets[0]))


# ----------------------------------------------------------------------------- two-arm curves


def cost_curve(
    data: LoggedData, revenue_pred: torch.Tensor, cost_pred: torch.Tensor, n_bins: int = 100
) -> pd.DataFrame:
    """Cost curve of a two-arm ranking by predicted incremental ROI.

    Users are ranked by (r_hat_1 - r_hat_0) / (c_hat_1 - c_hat_0) (cost gaps floored at a
    tiny positive number, so a free gain ranks first). For the top fraction q, the
    incremental revenue and cost of treating it are the treated-minus-control group
    means inside it times its size. Columns: fraction, incremental_revenue,
    incremental_cost, and both divided by their value at q = 1 (``revenue_share``,
    ``cost_share``).
    """
    if data.n_treatments != 2:
        raise ValueError(
            f"AUCC is defined for two arms (control, treated); got {data.n_treatments}. "
            "Use budget_value_curve and curve_area for more arms."
        )
    _check_predictions(data, revenue_pred, "revenue_pred")
    _check_predictions(data, cost_pred, "cost_pred")
    revenue_gap = (revenue_pred[:, 1] - revenue_pred[:, 0]).to(torch.float64)
    cost_gap = (cost_pred[:, 1] - cost_pred[:, 0]).to(torch.float64)
    roi = revenue_gap / cost_gap.clamp_min(torch.finfo(torch.float64).tiny)
    ranked = _RankedGroups(data, roi, treated_arm=1, n_bins=n_bins)
    revenue = ranked.uplift_gain(data.revenue)
    cost = ranked.uplift_gain(data.cost)
    return pd.DataFrame(
        {
            "fraction": ranked.fraction.cpu().numpy(),
            "incremental_revenue": revenue.cpu().numpy(),
            "incremental_cost": cost.cpu().numpy(),
            "revenue_share": (revenue / revenue[-1]).cpu().numpy(),
            "cost_share": (cost / cost[-1]).cpu().numpy(),
        }
    )


def aucc(
    data: LoggedData, revenue_pred: torch.Tensor, cost_pred: torch.Tensor, n_bins: int = 100
) -> float:
    """Area under the cost curve (revenue share against cost share); random ranking ~ 0.5."""
    curve = cost_curve(data, revenue_pred, cost_pred, n_bins)
    return float(np.trapezoid(curve["revenue_share"], curve["cost_share"]))


def qini_curve(
    data: LoggedData,
    score: torch.Tensor,
    outcome: str = REVENUE,
    treated_arm: int = 1,
    n_bins: int = 100,
) -> pd.DataFrame:
    """Qini and uplift-gain curves of a ranking by ``score`` (treated arm vs control).

    Only users logged in control or ``treated_arm`` take part. For the top k users:
    qini = Y_T - Y_C * N_T / N_C (sums and counts inside the top k) and
    uplift_gain = (mean_T - mean_C) * k. ``random_qini`` is the straight line to the final
    Qini value that a random ranking follows on average.
    """
    ranked = _RankedGroups(data, score, treated_arm, n_bins)
    y = _outcome(data, outcome)
    qini = ranked.qini(y)
    return pd.DataFrame(
        {
            "fraction": ranked.fraction.cpu().numpy(),
            "n_users": ranked.size.cpu().numpy(),
            "qini": qini.cpu().numpy(),
            "uplift_gain": ranked.uplift_gain(y).cpu().numpy(),
            "random_qini": (ranked.fraction * qini[-1]).cpu().numpy(),
        }
    )


def auuc(
    data: LoggedData,
    score: torch.Tensor,
    outcome: str = REVENUE,
    treated_arm: int = 1,
    n_bins: int = 100,
) -> float:
    """Area under the uplift-gain curve divided by its final value; random ranking ~ 0.5.

    Dividing by the total uplift makes the number scale-free (like AUCC); it is unstable
    when the total uplift is near zero.
    """
    curve = qini_curve(data, score, outcome, treated_arm, n_bins)
    gain = curve["uplift_gain"].to_numpy(np.float64)
    return float(np.trapezoid(gain / gain[-1], curve["fraction"]))


def qini_coefficient(
    data: LoggedData,
    score: torch.Tensor,
    outcome: str = REVENUE,
    treated_arm: int = 1,
    n_bins: int = 100,
) -> float:
    """Area between the Qini curve and the random line, per unit of total Qini uplift.

    0 for a random ranking on average, positive when the score ranks responders first.
    """
    curve = qini_curve(data, score, outcome, treated_arm, n_bins)
    excess = (curve["qini"] - curve["random_qini"]).to_numpy(np.float64)
    total = abs(float(curve["qini"].iloc[-1]))
    return float(np.trapezoid(excess, curve["fraction"]) / total)


# ----------------------------------------------------------------------------- internals


def _resolve(
    estimator: str | PolicyValueEstimator,
    revenue_pred: torch.Tensor | None,
    cost_pred: torch.Tensor | None,
) -> PolicyValueEstimator:
    est = make_estimator(estimator) if isinstance(estimator, str) else estimator
    if est.needs_predictions and (revenue_pred is None or cost_pred is None):
        raise ValueError(f"estimator {est.name!r} needs both revenue_pred and cost_pred")
    return est


def _outcome(data: LoggedData, outcome: str) -> torch.Tensor:
    if outcome == REVENUE:
        return data.revenue.to(torch.float64)
    if outcome == COST:
        return data.cost.to(torch.float64)
    raise ValueError(f"unknown outcome {outcome!r}; expected {REVENUE!r} or {COST!r}")


def _importance_weights(data: LoggedData, policy: torch.Tensor) -> torch.Tensor:
    """1[pi_i = t_i] / p_i, broadcast over any leading policy dimensions."""
    propensity = data.propensity.to(torch.float64)
    if not bool((torch.isfinite(propensity) & (propensity > 0)).all()):
        raise ValueError(
            "inverse propensity weighting needs every logging propensity known and > 0; "
            "this table has NaN or non-positive propensities (OBS logs usually do)"
        )
    return (policy == data.treatment).to(torch.float64) / propensity


def _check_policy(data: LoggedData, policy: torch.Tensor) -> None:
    n = len(data)
    if policy.dtype.is_floating_point or policy.dtype == torch.bool:
        raise TypeError(f"policy must hold integer arm indices, got {policy.dtype}")
    if tuple(policy.shape) != (n,):
        raise ValueError(f"policy must have shape ({n},), got {tuple(policy.shape)}")
    if n and (int(policy.min()) < 0 or int(policy.max()) >= data.n_treatments):
        raise ValueError(f"policy arms must lie in [0, {data.n_treatments - 1}]")


def _check_predictions(data: LoggedData, predictions: torch.Tensor, name: str) -> None:
    expected = (len(data), data.n_treatments)
    if tuple(predictions.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(predictions.shape)}")


def _ratio_estimate(
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    name: str,
    interval: str,
    alpha: float,
    n_bootstrap: int,
    seed: int,
) -> Estimate:
    """Point value sum(numerator)/sum(denominator) with a CLT or bootstrap interval."""
    if interval not in INTERVALS:
        raise ValueError(f"unknown interval {interval!r}; expected one of {INTERVALS}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    n = int(numerator.shape[0])
    if n < 2:
        raise ValueError(f"need at least two logged users to estimate an interval, got {n}")
    value = float(numerator.sum() / denominator.sum())
    if interval == "clt":
        # Delta method for a ratio of means; reduces to std(numerator) when denominator == 1.
        influence = (numerator - value * denominator) / denominator.mean()
        std_error = float(influence.std() / math.sqrt(n))
        z = NormalDist().inv_cdf(1.0 - alpha / 2.0)
        low, high = value - z * std_error, value + z * std_error
    else:
        replicates = _bootstrap_ratios(numerator, denominator, n_bootstrap, seed)
        std_error = float(replicates.std())
        bounds = torch.quantile(
            replicates, torch.tensor([alpha / 2.0, 1.0 - alpha / 2.0], dtype=replicates.dtype)
        )
        low, high = float(bounds[0]), float(bounds[1])
    return Estimate(value, low, high, std_error, n, name, interval)


def _bootstrap_ratios(
    numerator: torch.Tensor, denominator: torch.Tensor, n_bootstrap: int, seed: int
) -> torch.Tensor:
    """Ratio estimates on ``n_bootstrap`` resamples of users (with replacement), in chunks.

    Terms of shape (..., N) give (..., n_bootstrap): every leading row is resampled with the
    same users, which is what a paired comparison needs.
    """
    if n_bootstrap < 2:
        raise ValueError(f"n_bootstrap must be at least 2, got {n_bootstrap}")
    n = int(numerator.shape[-1])
    device = numerator.device
    generator = torch.Generator(device=device).manual_seed(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    replicates = []
    for start in range(0, n_bootstrap, chunk):
        rows = min(chunk, n_bootstrap - start)
        index = torch.randint(0, n, (rows, n), generator=generator, device=device)
        replicates.append(numerator[..., index].sum(-1) / denominator[..., index].sum(-1))
    return torch.cat(replicates, dim=-1).cpu()


def _true_values(truth: Truth | None, policy: torch.Tensor) -> tuple[float | None, float | None]:
    if truth is None:
        return None, None
    if truth.revenue.shape[0] != policy.shape[0]:
        raise ValueError(
            f"truth covers {truth.revenue.shape[0]} users but the policy {policy.shape[0]}; "
            "pass the truth aligned with the evaluated table (Dataset.truth_for)"
        )
    return truth.policy_value(policy)


class _BudgetSearch:
    """Finds the smallest lambda whose Lagrangian policy's estimated cost meets a budget.

    A user's Lagrangian arm only changes at a lambda where two arms tie,
    (r_hat_j - r_hat_k) / (c_hat_j - c_hat_k) > 0, so the estimated cost is a step function
    with steps at those breakpoints. Candidates are one lambda inside each step (0, the
    midpoints of consecutive breakpoints, twice the last one); the search sweeps a
    vectorised grid of candidates to bracket the first feasible one, then bisects the
    bracket. The IPW cost need not be monotone in lambda, so the result is the smallest
    feasible candidate on the grid's resolution, refined by bisection inside its bracket.
    """

    def __init__(
        self,
        data: LoggedData,
        revenue_pred: torch.Tensor,
        cost_pred: torch.Tensor,
        estimator: PolicyValueEstimator,
    ) -> None:
        _check_predictions(data, revenue_pred, "revenue_pred")
        _check_predictions(data, cost_pred, "cost_pred")
        self.data = data
        self.revenue_pred = revenue_pred
        self.cost_pred = cost_pred
        self.estimator = estimator
        self.candidates = _candidate_lambdas(revenue_pred, cost_pred)
        self._costs: dict[int, float] = {}

    def cost_at(self, indices: list[int]) -> list[float]:
        """Estimated cost per user of the policy at each candidate index (memoised)."""
        todo = sorted({i for i in indices if i not in self._costs})
        chunk = max(1, _SEARCH_CHUNK_ELEMENTS // max(1, len(self.data)))
        for start in range(0, len(todo), chunk):
            batch = todo[start : start + chunk]
            # lagrangian_choice itself (not a re-derived score), so the checked policies are
            # bit for bit the one finally reported; each call is vectorised over users.
            policies = torch.stack(
                [
                    lagrangian_choice(self.revenue_pred, self.cost_pred, self.candidates[i])
                    for i in batch
                ]
            )
            costs = self.estimator.point(self.data, policies, COST, self.cost_pred)
            self._costs.update(zip(batch, costs.tolist(), strict=True))
        return [self._costs[i] for i in indices]

    def solve(self, budget: float) -> tuple[int, bool]:
        """Index of the chosen candidate and whether its estimated cost meets the budget."""
        last = len(self.candidates) - 1
        first_cost, last_cost = self.cost_at([0, last])
        if first_cost <= budget:
            return 0, True
        if not last_cost <= budget:
            return last, False
        grid = sorted(
            {round(i * last / (_SEARCH_GRID_POINTS - 1)) for i in range(_SEARCH_GRID_POINTS)}
        )
        feasible = [cost <= budget for cost in self.cost_at(grid)]
        hi_pos = feasible.index(True)
        lo, hi = grid[hi_pos - 1], grid[hi_pos]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.cost_at([mid])[0] <= budget:
                hi = mid
            else:
                lo = mid
        return hi, True


def _candidate_lambdas(revenue_pred: torch.Tensor, cost_pred: torch.Tensor) -> torch.Tensor:
    """One lambda inside every interval on which all users' Lagrangian arms are constant."""
    n_arms = revenue_pred.shape[1]
    first, second = torch.triu_indices(n_arms, n_arms, offset=1, device=revenue_pred.device)
    ratio = (revenue_pred[:, first] - revenue_pred[:, second]) / (
        cost_pred[:, first] - cost_pred[:, second]
    )
    breakpoints = torch.unique(ratio[torch.isfinite(ratio) & (ratio > 0)])
    zero = torch.zeros(1, dtype=revenue_pred.dtype, device=revenue_pred.device)
    if breakpoints.numel() == 0:
        return zero
    midpoints = (breakpoints[:-1] + breakpoints[1:]) / 2
    return torch.cat([zero, midpoints, breakpoints[-1:] * 2])


def _eom_at(
    search: _BudgetSearch,
    budget: float,
    truth: Truth | None,
    interval: str,
    alpha: float,
    n_bootstrap: int,
    seed: int,
) -> EOMResult:
    index, budget_met = search.solve(budget)
    lam = search.candidates[index]
    policy = lagrangian_choice(search.revenue_pred, search.cost_pred, lam)
    evaluation = evaluate_policy(
        search.data,
        policy,
        search.estimator,
        search.revenue_pred,
        search.cost_pred,
        truth,
        interval,
        alpha,
        n_bootstrap,
        seed,
    )
    return EOMResult(
        eom=evaluation.revenue,
        cost=evaluation.cost,
        lam=float(lam),
        policy=policy,
        budget=budget,
        budget_met=budget_met,
        true_revenue=evaluation.true_revenue,
        true_cost=evaluation.true_cost,
    )


class _RankedGroups:
    """Cumulative treated/control counts along a ranking, read at n_bins + 1 cut points."""

    def __init__(self, data: LoggedData, score: torch.Tensor, treated_arm: int, n_bins: int):
        if not 1 <= treated_arm < data.n_treatments:
            raise ValueError(f"treated_arm must lie in [1, {data.n_treatments - 1}]")
        if tuple(score.shape) != (len(data),):
            raise ValueError(f"score must have shape ({len(data)},), got {tuple(score.shape)}")
        if n_bins < 1:
            raise ValueError(f"n_bins must be positive, got {n_bins}")
        kept = (data.treatment == 0) | (data.treatment == treated_arm)
        n = int(kept.sum())
        if n == 0:
            raise ValueError(f"no users were logged in control or arm {treated_arm}")
        order = torch.argsort(score[kept], descending=True, stable=True)
        self._kept = kept
        self._order = order
        treated = (data.treatment[kept][order] == treated_arm).to(torch.float64)
        device = treated.device
        self.size = torch.round(torch.linspace(0, n, n_bins + 1, device=device)).long()
        self.fraction = self.size.to(torch.float64) / n
        self._treated = treated
        self.n_treated = self._cumulative(treated)
        self.n_control = self._cumulative(1.0 - treated)

    def _cumulative(self, values: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([values.new_zeros(1), torch.cumsum(values, 0)])
        return padded[self.size]

    def _group_sums(self, outcome: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = outcome.to(torch.float64)[self._kept][self._order]
        return self._cumulative(y * self._treated), self._cumulative(y * (1.0 - self._treated))

    def uplift_gain(self, outcome: torch.Tensor) -> torch.Tensor:
        """(treated mean - control mean) * k for the top k users (a group mean is 0 if empty)."""
        treated_sum, control_sum = self._group_sums(outcome)
        treated_mean = treated_sum / self.n_treated.clamp_min(1.0)
        control_mean = control_sum / self.n_control.clamp_min(1.0)
        return (treated_mean - control_mean) * self.size.to(torch.float64)

    def qini(self, outcome: torch.Tensor) -> torch.Tensor:
        """Y_T - Y_C * N_T / N_C for the top k users (the control term is 0 if N_C is 0)."""
        treated_sum, control_sum = self._group_sums(outcome)
        return treated_sum - control_sum * self.n_treated / self.n_control.clamp_min(1.0)
