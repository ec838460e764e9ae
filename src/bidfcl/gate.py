"""The promotion gate: whether a challenger may replace the champion, and why. Pure: no MLflow.

The promote stage scores the policy each model ships (its deployed allocation) on the same
held-out RCT users: the challenger against the champion re-scored on that data, or against
the baseline method for a first model. :func:`decide` promotes only on evidence that noise
cannot fake: the one-sided lower confidence bound of the *paired* difference in revenue per
user must clear the margin, and the upper confidence bound of the challenger's deployed
spend must fit the budget. Its :class:`GateDecision` is tagged on the model version.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

from bidfcl.allocation import STATUS_INFEASIBLE
from bidfcl.evaluation import PairedComparison
from bidfcl.scoring import Metrics


@dataclass(frozen=True)
class PromoteParams:
    """``promote:`` — registered model name, the gate's margin, confidence level, spend
    tolerance and the baseline a first model must beat."""

    model_name: str = "bidfcl-uplift"
    margin: float = 0.0
    alpha: float = 0.05
    cost_tolerance: float = 0.10
    baseline: str = "tsm-rct"

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 0.5:
            raise ValueError(f"promote.alpha must lie in (0, 0.5), got {self.alpha}")
        if self.cost_tolerance < 0:
            raise ValueError(f"promote.cost_tolerance must be >= 0, got {self.cost_tolerance}")


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided for one challenger, and the evidence (tagged on the version).

    ``difference`` is challenger minus reference in deployed revenue per user, with its
    two-sided 1 - alpha interval and one-sided ``lower_bound``; ``spend_upper_bound`` is the
    one-sided 1 - alpha upper bound of the challenger's deployed spend per user.
    """

    promoted: bool
    reason: str
    reference: str
    estimator: str
    alpha: float
    difference: float | None
    difference_ci_low: float | None
    difference_ci_high: float | None
    lower_bound: float | None
    p_value: float | None
    agreement: float | None
    true_difference: float | None
    spend: float
    spend_upper_bound: float
    budget: float
    validation_passed: bool

    def tags(self) -> dict[str, str]:
        return {
            "decision": "promoted" if self.promoted else "rejected",
            **{k: str(v) for k, v in asdict(self).items() if k != "promoted"},
        }


def spend_upper_bound(challenger: Metrics, alpha: float) -> float:
    """One-sided 1 - alpha upper bound of the deployed allocation's estimated spend."""
    if challenger.deployed_cost is None or challenger.deployed_cost_std_error is None:
        return math.inf
    z = NormalDist().inv_cdf(1.0 - alpha)
    return challenger.deployed_cost + z * challenger.deployed_cost_std_error


def decide(
    challenger: Metrics,
    comparison: PairedComparison | None,
    reference: str,
    validation_passed: bool,
    config: PromoteParams,
) -> GateDecision:
    """The promotion rule.

    Promote only if validation passed, the challenger's deployed allocation is not
    all-control for want of budget, the upper bound of its deployed spend is within
    budget * (1 + ``cost_tolerance``), and the lower bound of the paired difference
    (challenger - ``reference``, computed at ``config.alpha``) exceeds ``margin``.
    ``comparison`` is None only when there is nothing to compare with: a first model
    that is the baseline method itself is then promoted on the other checks alone.
    """
    budget = float(challenger.budget)
    spend = math.nan if challenger.deployed_cost is None else challenger.deployed_cost
    upper = spend_upper_bound(challenger, config.alpha)
    paired = {
        "difference": None,
        "difference_ci_low": None,
        "difference_ci_high": None,
        "lower_bound": None,
        "p_value": None,
        "agreement": None,
        "true_difference": None,
    }
    estimator = challenger.estimator
    if comparison is not None:
        estimator = comparison.estimator
        paired = {
            "difference": comparison.difference,
            "difference_ci_low": comparison.ci_low,
            "difference_ci_high": comparison.ci_high,
            "lower_bound": comparison.lower_bound,
            "p_value": comparison.p_value,
            "agreement": comparison.agreement,
            "true_difference": comparison.true_difference,
        }

    def result(promoted: bool, reason: str) -> GateDecision:
        return GateDecision(
            promoted=promoted,
            reason=reason,
            reference=reference,
            estimator=estimator,
            alpha=config.alpha,
            spend=spend,
            spend_upper_bound=upper,
            budget=budget,
            validation_passed=validation_passed,
            **paired,
        )

    if not validation_passed:
        return result(False, "validation of the training data did not pass")
    if challenger.deployed_status == STATUS_INFEASIBLE:
        return result(
            False,
            "even each user's cheapest arm is estimated to cost more than the budget "
            f"{budget:.4f}, so the deployed allocation would be all-control",
        )
    limit = budget * (1 + config.cost_tolerance)
    if not upper <= limit:
        return result(
            False,
            f"deployed spend upper bound {upper:.4f} exceeds the budget {budget:.4f} "
            f"+ {config.cost_tolerance:.0%} tolerance",
        )
    if comparison is None:
        if challenger.method == config.baseline:
            return result(True, f"first model, and it is the baseline {config.baseline} itself")
        return result(False, f"nothing to compare with: no model of baseline {config.baseline}")
    level = f"{1 - config.alpha:.0%}"
    if comparison.lower_bound > config.margin:
        return result(
            True,
            f"paired {level} lower bound {comparison.lower_bound:+.4f} of the gain over "
            f"{reference} > margin {config.margin:.4f} ({comparison.estimator}, difference "
            f"{comparison.difference:+.4f}, agreement {comparison.agreement:.0%})",
        )
    return result(
        False,
        f"no proven gain over {reference}: paired {level} lower bound "
        f"{comparison.lower_bound:+.4f} <= margin {config.margin:.4f} ({comparison.estimator}, "
        f"difference {comparison.difference:+.4f}, agreement {comparison.agreement:.0%})",
    )
