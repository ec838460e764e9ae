"""The promotion gate: a pure rule over the paired comparison and the deployed spend."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bidfcl.allocation import STATUS_INFEASIBLE
from bidfcl.evaluation import PairedComparison
from bidfcl.gate import GateDecision, PromoteParams, decide, spend_upper_bound
from bidfcl.scoring import Metrics


def challenger(**overrides: object) -> Metrics:
    values: dict[str, object] = {
        "table": "rct_test",
        "estimator": "dr",
        "n_users": 12_000,
        "budget": 1.0,
        "eom": 10.0,
        "eom_ci_low": 9.0,
        "eom_ci_high": 11.0,
        "eom_std_error": 0.5,
        "mean_cost": 1.0,
        "cost_ci_low": 0.9,
        "cost_ci_high": 1.1,
        "lam": 0.5,
        "budget_met": True,
        "deployed_lam": 0.5,
        "deployed_status": "calibrated",
        "deployed_predicted_cost": 1.0,
        "deployed_value": 10.0,
        "deployed_value_ci_low": 9.0,
        "deployed_value_ci_high": 11.0,
        "deployed_value_std_error": 0.5,
        "deployed_cost": 1.0,
        "deployed_cost_ci_low": 0.96,
        "deployed_cost_ci_high": 1.04,
        "deployed_cost_std_error": 0.02,
        "method": "bidfcl-ppl",
    }
    return Metrics(**(values | overrides))  # type: ignore[arg-type]


def paired(difference: float, std_error: float = 0.1) -> PairedComparison:
    return PairedComparison(
        estimator="dr",
        interval="clt",
        alpha=0.05,
        n_users=12_000,
        agreement=0.8,
        value_a=10.0 + difference,
        value_b=10.0,
        difference=difference,
        std_error=std_error,
        ci_low=difference - 1.96 * std_error,
        ci_high=difference + 1.96 * std_error,
        lower_bound=difference - 1.645 * std_error,
        p_value=0.5,
        unpaired_std_error=3 * std_error,
        cost_difference=0.0,
        cost_std_error=0.01,
        cost_ci_low=-0.02,
        cost_ci_high=0.02,
        true_difference=None,
        true_cost_difference=None,
    )


def test_gate_promotes_only_when_the_paired_lower_bound_clears_the_margin() -> None:
    config = PromoteParams(margin=0.05)
    promoted = decide(challenger(), paired(0.3), "champion v1", True, config)
    assert promoted.promoted
    assert "paired 95% lower bound +0.1355" in promoted.reason
    assert promoted.tags()["decision"] == "promoted"
    # same point estimate, but noise could produce it: the lower bound is below the margin
    noisy = decide(challenger(), paired(0.3, std_error=0.2), "champion v1", True, config)
    assert not noisy.promoted
    assert "no proven gain over champion v1" in noisy.reason
    assert noisy.lower_bound == pytest.approx(0.3 - 1.645 * 0.2)


def test_gate_rejects_a_deployed_spend_bound_over_the_budget() -> None:
    config = PromoteParams(cost_tolerance=0.05, alpha=0.05)
    over = challenger(deployed_cost=1.03, deployed_cost_std_error=0.02)  # bound 1.063
    decision = decide(over, paired(1.0), "baseline tsm-rct", True, config)
    assert not decision.promoted
    assert "spend upper bound 1.0629 exceeds the budget" in decision.reason
    assert spend_upper_bound(over, 0.05) == pytest.approx(1.03 + 1.6449 * 0.02, abs=1e-4)
    within = challenger(deployed_cost=1.0, deployed_cost_std_error=0.02)  # bound 1.033
    assert decide(within, paired(1.0), "baseline tsm-rct", True, config).promoted
    unknown = challenger(deployed_cost=None)
    assert not decide(unknown, paired(1.0), "baseline tsm-rct", True, config).promoted


def test_gate_rejects_failed_validation_and_an_all_control_deployment() -> None:
    assert "validation" in decide(challenger(), paired(1.0), "x", False, PromoteParams()).reason
    infeasible = challenger(deployed_status=STATUS_INFEASIBLE)
    decision = decide(infeasible, paired(1.0), "x", True, PromoteParams())
    assert not decision.promoted
    assert "all-control" in decision.reason


def test_a_first_model_needs_a_baseline_to_beat_unless_it_is_the_baseline() -> None:
    config = PromoteParams(baseline="tsm-rct")
    assert not decide(challenger(), None, "nothing", True, config).promoted
    assert decide(challenger(method="tsm-rct"), None, "nothing", True, config).promoted


def test_decision_tags_are_strings_naming_the_evidence() -> None:
    comparison = replace(paired(0.3), true_difference=0.25)
    tags = decide(challenger(), comparison, "champion v2", True, PromoteParams()).tags()
    assert set(tags) == {"decision"} | {
        name for name in GateDecision.__dataclass_fields__ if name != "promoted"
    }
    assert all(isinstance(value, str) for value in tags.values())
    assert tags["estimator"] == "dr" and tags["alpha"] == "0.05"
    assert tags["true_difference"] == "0.25"


def test_promote_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="alpha"):
        PromoteParams(alpha=0.7)
    with pytest.raises(ValueError, match="cost_tolerance"):
        PromoteParams(cost_tolerance=-0.1)
