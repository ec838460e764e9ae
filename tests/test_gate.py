"""The promotion gate: a pure rule over metrics, no registry needed."""

from __future__ import annotations

from bidfcl.allocation import STATUS_INFEASIBLE
from bidfcl.gate import GateDecision, PromoteParams, decide
from bidfcl.scoring import Metrics


def challenger(**overrides: object) -> Metrics:
    values: dict[str, object] = {
        "table": "rct_test",
        "estimator": "ipw",
        "n_users": 100,
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
        "deployed_status": "ok",
        "deployed_predicted_cost": 1.0,
        "method": "dfcl-ppl",
    }
    return Metrics(**(values | overrides))  # type: ignore[arg-type]


def test_gate_promotes_a_challenger_whose_lower_bound_beats_the_champion() -> None:
    decision = decide(challenger(), True, PromoteParams(margin=0.5), 8.4, None)
    assert decision.promoted
    assert decision.reference == "champion"
    assert decision.tags()["decision"] == "promoted"


def test_gate_rejects_when_the_lower_bound_does_not_clear_champion_plus_margin() -> None:
    decision = decide(challenger(), True, PromoteParams(margin=0.5), 8.6, None)
    assert not decision.promoted
    assert "no better challenger" in decision.reason
    assert decision.tags()["decision"] == "rejected"


def test_gate_rejects_failed_validation_and_overspending_even_when_better() -> None:
    assert "validation" in decide(challenger(), False, PromoteParams(), 1.0, None).reason
    tolerant = PromoteParams(cost_tolerance=0.01)
    over = decide(challenger(mean_cost=1.02), True, tolerant, 1.0, None)
    assert not over.promoted
    assert "exceeds the budget" in over.reason
    within = decide(challenger(mean_cost=1.005), True, tolerant, 1.0, None)
    assert within.promoted


def test_gate_rejects_a_model_whose_deployed_allocation_would_be_all_control() -> None:
    infeasible = challenger(deployed_status=STATUS_INFEASIBLE)
    for champion_eom, baseline_eom in ((1.0, None), (None, 1.0)):
        decision = decide(infeasible, True, PromoteParams(), champion_eom, baseline_eom)
        assert not decision.promoted
        assert "all-control" in decision.reason
    assert decide(challenger(deployed_status="ok"), True, PromoteParams(), 1.0, None).promoted


def test_first_model_must_beat_the_baseline_point_estimate() -> None:
    config = PromoteParams(baseline="tsm-rct")
    assert decide(challenger(), True, config, None, 9.5).promoted
    beaten = decide(challenger(), True, config, None, 10.5)
    assert not beaten.promoted
    assert "does not beat tsm-rct" in beaten.reason
    assert decide(challenger(method="tsm-rct"), True, config, None, 10.0).promoted
    assert not decide(challenger(), True, config, None, None).promoted


def test_decision_tags_are_strings_naming_the_reason() -> None:
    tags = decide(challenger(), True, PromoteParams(), 9.5, None).tags()
    assert set(tags) == {"decision"} | {
        name for name in GateDecision.__dataclass_fields__ if name != "promoted"
    }
    assert all(isinstance(value, str) for value in tags.values())


def test_a_null_estimate_is_rejected_rather_than_crashing() -> None:
    decision = decide(challenger(eom_ci_low=None), True, PromoteParams(), 8.0, None)
    assert not decision.promoted
