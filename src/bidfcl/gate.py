"""The promotion gate: whether a challenger may replace the champion, and why. Pure: no MLflow.

The promote stage gathers the challenger's metrics, the champion's metrics re-scored on the
same held-out table, the baseline's and whether validation passed; :func:`decide` turns
them into a :class:`GateDecision` whose reason is tagged on the model version.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from bidfcl.allocation import STATUS_INFEASIBLE
from bidfcl.scoring import Metrics


@dataclass(frozen=True)
class PromoteParams:
    """``promote:`` — registry name and the gate's margin, cost tolerance and first baseline.

    ``tracking_uri`` is relative to the project root; ``MLFLOW_TRACKING_URI`` overrides it.
    """

    model_name: str = "bidfcl-uplift"
    experiment: str = "bidfcl"
    tracking_uri: str = "sqlite:///mlflow.db"
    margin: float = 0.0
    cost_tolerance: float = 0.01
    baseline: str = "tsm-rct"


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided for one challenger, and why (tagged on the model version)."""

    promoted: bool
    reason: str
    challenger_eom: float
    challenger_eom_ci_low: float
    challenger_cost: float
    budget: float
    reference: str
    reference_eom: float | None
    validation_passed: bool

    def tags(self) -> dict[str, str]:
        return {
            "decision": "promoted" if self.promoted else "rejected",
            **{k: str(v) for k, v in asdict(self).items() if k != "promoted"},
        }


def decide(
    challenger: Metrics,
    validation_passed: bool,
    config: PromoteParams,
    champion_eom: float | None,
    baseline_eom: float | None,
) -> GateDecision:
    """The promotion rule.

    With a champion: promote only if validation passed, the challenger's EOM lower confidence
    bound exceeds the champion's EOM (re-scored on the same data) plus ``margin``, and its
    estimated cost stays within the budget (times 1 + ``cost_tolerance``). Without one, the
    challenger's EOM must exceed the ``baseline`` method's EOM plus ``margin`` (or the
    challenger is that baseline). Either way a challenger whose *predicted* costs put even
    each user's cheapest arm over the budget is rejected: the EOM scores its Lagrangian
    policy at an RCT-estimated lambda, but ``bidfcl allocate`` would ship all-control.
    """
    eom, low = _number(challenger.eom), _number(challenger.eom_ci_low)
    cost, budget = _number(challenger.mean_cost), float(challenger.budget)
    if champion_eom is not None:
        reference, reference_eom = "champion", float(champion_eom)
    else:
        reference = f"baseline {config.baseline}"
        reference_eom = None if baseline_eom is None else float(baseline_eom)

    def result(promoted: bool, reason: str) -> GateDecision:
        return GateDecision(
            promoted, reason, eom, low, cost, budget, reference, reference_eom, validation_passed
        )

    if not validation_passed:
        return result(False, "validation of the training data did not pass")
    if not math.isfinite(cost) or cost > budget * (1 + config.cost_tolerance):
        return result(
            False,
            f"estimated cost {cost:.4f} exceeds the budget {budget:.4f} "
            f"(tolerance {config.cost_tolerance:.2%})",
        )
    if challenger.deployed_status == STATUS_INFEASIBLE:
        return result(
            False,
            "the model predicts that even each user's cheapest arm costs more than the budget "
            f"{budget:.4f}, so its deployed allocation would be all-control",
        )
    if champion_eom is not None:
        if low > reference_eom + config.margin:
            return result(
                True,
                f"EOM lower bound {low:.4f} > champion EOM {reference_eom:.4f} "
                f"+ margin {config.margin:.4f}",
            )
        return result(
            False,
            f"no better challenger: EOM lower bound {low:.4f} <= champion EOM "
            f"{reference_eom:.4f} + margin {config.margin:.4f}",
        )
    if challenger.method == config.baseline:
        return result(True, f"first model, and it is the baseline {config.baseline} itself")
    if reference_eom is None:
        return result(False, f"first model, but no metrics for baseline {config.baseline}")
    if eom > reference_eom + config.margin:
        return result(
            True,
            f"first model: EOM {eom:.4f} > {config.baseline} EOM {reference_eom:.4f} "
            f"+ margin {config.margin:.4f}",
        )
    return result(
        False,
        f"first model does not beat {config.baseline}: EOM {eom:.4f} <= {reference_eom:.4f} "
        f"+ margin {config.margin:.4f}",
    )


def _number(value: float | None) -> float:
    """A metric as a float; null in metrics.json (a non-finite estimate) becomes NaN."""
    return math.nan if value is None else float(value)
