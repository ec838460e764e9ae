"""benchmarks/gate_span.py: the reach of constant gates, on hand-made per-seed tables."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gate_span():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling paired_metric
    try:
        spec = importlib.util.spec_from_file_location("gate_span", BENCHMARKS / "gate_span.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_span_finds_the_truth_best_gate_and_its_gain_over_the_start(gate_span):
    values = pd.DataFrame(
        {
            "bidfcl-frozen-0": [1.0, 3.0, 2.0],
            "bidfcl-frozen-0.5": [2.0, 2.0, 2.0],
            "bidfcl-frozen-1": [4.0, 1.0, 2.0],
            "bidfcl-ppl": [2.5, 2.0, 1.0],
        },
        index=[0, 1, 2],
    )
    row = gate_span.span(values)
    # seed 2: every gate ties, and the first column wins
    assert row["truth_best_gate_per_seed"] == {"0": 1.0, "1": 0.0, "2": 0.0}
    assert row["truth_best_gain_over_0.5"]["mean"] == pytest.approx((2.0 + 1.0 + 0.0) / 3)
    assert row["spread_mean"] == pytest.approx((3.0 + 2.0 + 0.0) / 3)
    learned = row["versus_0.5"]["bidfcl-ppl"]
    assert learned["mean_diff"] == pytest.approx((0.5 + 0.0 - 1.0) / 3)
    assert (learned["wins"], learned["ties"]) == (1, 1)
    assert "bidfcl-fixed" not in row["versus_0.5"]


def test_span_needs_the_start_gate_and_another(gate_span):
    assert gate_span.span(pd.DataFrame({"bidfcl-frozen-1": [1.0], "bidfcl-ppl": [1.0]})) is None
    assert gate_span.span(pd.DataFrame({"bidfcl-frozen-0.5": [1.0, 2.0]})) is None


def test_minimal_detectable_effect_is_the_paired_t_power_formula(gate_span):
    # (t_0.975,9 + t_0.8,9) / sqrt(10) = (2.2622 + 0.8834) / 3.1623
    assert gate_span.minimal_detectable_effect(1.0, 10) == pytest.approx(0.99473, abs=1e-4)
    assert gate_span.minimal_detectable_effect(0.5, 10) == pytest.approx(0.49737, abs=1e-4)


def test_seeds_to_detect_grows_with_the_noise_squared(gate_span):
    # (1.96 + 0.8416)^2 = 7.849: sd equal to the effect needs 8 pairs, twice it 32
    assert gate_span.seeds_to_detect(1.0, 1.0) == 8
    assert gate_span.seeds_to_detect(0.5, 1.0) == 32
    assert gate_span.seeds_to_detect(0.0, 1.0) != gate_span.seeds_to_detect(0.0, 1.0)  # NaN
