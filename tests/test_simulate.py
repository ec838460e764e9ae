"""The simulator keeps its promises: contract schema, assignment mechanisms, truth, confounding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bidfcl.contract import (
    COST,
    OBS,
    PROPENSITY,
    RCT_TABLES,
    REVENUE,
    TABLES,
    TREATMENT,
    USER_ID,
    Dataset,
    load_dataset,
    truth_cost_columns,
    truth_revenue_columns,
)
from bidfcl.simulate import (
    SimulatorConfig,
    expected_outcomes,
    face_values,
    logging_probabilities,
    simulate,
    simulate_to_folder,
)

SMALL = SimulatorConfig(n_obs=3000, n_rct=2000, seed=3)
STATS = SimulatorConfig(n_obs=30_000, n_rct=30_000, seed=11)


@pytest.fixture(scope="module")
def small() -> Dataset:
    return simulate(SMALL)


@pytest.fixture(scope="module")
def stats() -> Dataset:
    return simulate(STATS)


def _features(data: Dataset, table: str) -> np.ndarray:
    return data.table(table)[data.meta.feature_columns].to_numpy(np.float64)


def _truth_matrices(data: Dataset, table: str) -> tuple[np.ndarray, np.ndarray]:
    truth = data.truth_for(table)
    assert truth is not None
    return truth.revenue.numpy(), truth.cost.numpy()


def _rct(data: Dataset) -> pd.DataFrame:
    return pd.concat([data.table(name) for name in RCT_TABLES], ignore_index=True)


def _max_arm_feature_z(frame: pd.DataFrame, feature_columns: list[str]) -> float:
    """Largest |z| of an arm's feature mean against the table mean: ~N(0,1) if independent."""
    x = frame[feature_columns].to_numpy(np.float64)
    arm = frame[TREATMENT].to_numpy()
    worst = 0.0
    for t in np.unique(arm):
        inside = x[arm == t]
        z = (inside.mean(0) - x.mean(0)) / (x.std(0) / np.sqrt(len(inside)))
        worst = max(worst, float(np.abs(z).max()))
    return worst


def test_same_seed_same_data_and_new_seed_new_data(small: Dataset) -> None:
    again = simulate(SMALL)
    for name in TABLES:
        pd.testing.assert_frame_equal(small.table(name), again.table(name))
    pd.testing.assert_frame_equal(small.truth, again.truth)
    assert small.meta == again.meta
    other = simulate(SimulatorConfig(n_obs=3000, n_rct=2000, seed=4))
    assert not np.allclose(small.table(OBS)[REVENUE], other.table(OBS)[REVENUE])


def test_tables_follow_the_contract(small: Dataset) -> None:
    meta = small.meta
    m = SMALL.n_treatments
    assert small.path is None
    assert meta.n_treatments == m
    assert meta.treatment_names == ["control", "coupon_1", "coupon_2", "coupon_3", "coupon_4"]
    assert meta.feature_columns == [f"x{k}" for k in range(SMALL.n_features)]
    assert {"default_budget", "truth_summary", "simulator"} <= set(meta.extra)
    assert meta.extra["simulator"]["seed"] == SMALL.seed
    sizes = {name: len(small.table(name)) for name in TABLES}
    assert sizes == {OBS: 3000, "rct_train": 1000, "rct_val": 400, "rct_test": 600}
    for name in TABLES:
        frame = small.table(name)
        assert list(frame.columns) == meta.row_columns
        assert frame[TREATMENT].between(0, m - 1).all()
        assert (frame[REVENUE] >= 0).all() and (frame[COST] >= 0).all()
        assert (frame.loc[frame[TREATMENT] == 0, COST] == 0).all()
        assert frame[PROPENSITY].between(0, 1, inclusive="right").all()
        logged = small.logged(name)
        assert logged.x.shape == (len(frame), SMALL.n_features)
        assert np.array_equal(logged.x.double().numpy(), _features(small, name))
    for name in RCT_TABLES:
        assert np.allclose(small.table(name)[PROPENSITY], 1 / m)
    ids = pd.concat([small.table(name)[USER_ID] for name in TABLES])
    assert ids.is_unique
    assert list(small.truth.columns) == [USER_ID, *truth_revenue_columns(m), *truth_cost_columns(m)]
    assert set(small.truth[USER_ID]) == set(ids)
    assert (small.truth.drop(columns=USER_ID).to_numpy() >= 0).all()
    assert (small.truth["cost_0"] == 0).all()


def test_folder_round_trip(tmp_path: Path, small: Dataset) -> None:
    out = simulate_to_folder(tmp_path / "data", SMALL, progress=False)
    loaded = load_dataset(out)
    assert loaded.meta.to_dict() == json.loads(json.dumps(small.meta.to_dict()))
    for name in TABLES:
        pd.testing.assert_frame_equal(loaded.table(name), small.table(name))
    pd.testing.assert_frame_equal(loaded.truth, small.truth)


def test_progress_bar_only_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    tiny = SimulatorConfig(n_obs=50, n_rct=30)
    simulate(tiny, progress=False)
    assert capsys.readouterr().err == ""
    simulate(tiny, progress=True)
    assert "simulate" in capsys.readouterr().err


def test_rct_assignment_ignores_features_and_obs_follows_them(stats: Dataset) -> None:
    columns = stats.meta.feature_columns
    assert _max_arm_feature_z(_rct(stats), columns) < 4.5
    assert _max_arm_feature_z(stats.table(OBS), columns) > 15
    arm_shares = np.bincount(_rct(stats)[TREATMENT], minlength=STATS.n_treatments) / STATS.n_rct
    assert np.allclose(arm_shares, 1 / STATS.n_treatments, atol=0.015)


def test_unbiased_logging_is_uniform_random() -> None:
    config = SimulatorConfig(n_obs=30_000, n_rct=100, bias=0.0, seed=5)
    data = simulate(config)
    obs = data.table(OBS)
    assert np.allclose(obs[PROPENSITY], 1 / config.n_treatments)
    assert _max_arm_feature_z(obs, data.meta.feature_columns) < 4.5


def test_obs_propensity_is_the_logging_probability() -> None:
    """Inverse-propensity weights of each arm sum to N only if they are the true ones."""
    config = SimulatorConfig(n_obs=40_000, n_rct=100, bias=0.5, seed=8)
    obs = simulate(config).table(OBS)
    for t in range(config.n_treatments):
        weight = np.where(obs[TREATMENT] == t, 1 / obs[PROPENSITY], 0.0)
        standard_error = weight.std() / np.sqrt(len(weight))
        assert abs(weight.mean() - 1) < 4 * standard_error


@pytest.mark.parametrize("table_kind", ["rct", "obs"])
def test_observed_means_match_truth(stats: Dataset, table_kind: str) -> None:
    """Per arm, mean observed outcome minus mean truth of the same users is within 4 SE."""
    names = RCT_TABLES if table_kind == "rct" else (OBS,)
    frame = pd.concat([stats.table(name) for name in names], ignore_index=True)
    truths = [_truth_matrices(stats, name) for name in names]
    arm = frame[TREATMENT].to_numpy()
    rows = np.arange(len(frame))
    for column, k in ((REVENUE, 0), (COST, 1)):
        expected = np.concatenate([truth[k] for truth in truths])[rows, arm]
        residual = frame[column].to_numpy() - expected
        for t in range(STATS.n_treatments):
            inside = residual[arm == t]
            assert abs(inside.mean()) <= 4 * inside.std() / np.sqrt(len(inside)), (column, t)


def test_truth_summary_and_default_budget_as_documented(stats: Dataset) -> None:
    truth = stats.truth_for(OBS)
    assert truth is not None
    n = truth.revenue.shape[0]
    control_rev, control_cost = truth.policy_value(torch.zeros(n, dtype=torch.long))
    max_arm = torch.full((n,), STATS.n_treatments - 1, dtype=torch.long)
    max_rev, max_cost = truth.policy_value(max_arm)
    assert control_cost == 0 < max_cost
    assert max_rev > control_rev
    assert max_rev - control_rev < max_cost, "blanket max coupon should return less than it costs"

    summary = stats.meta.extra["truth_summary"]
    all_rev = stats.truth[truth_revenue_columns(STATS.n_treatments)].to_numpy()
    all_cost = stats.truth[truth_cost_columns(STATS.n_treatments)].to_numpy()
    assert summary["all_control"]["revenue"] == pytest.approx(all_rev[:, 0].mean())
    assert summary["all_max"]["cost"] == pytest.approx(all_cost[:, -1].mean())
    budget = stats.meta.extra["default_budget"]
    assert summary["all_control"]["cost"] < budget < summary["all_max"]["cost"]
    assert budget == pytest.approx(
        (summary["all_control"]["cost"] + summary["all_max"]["cost"]) / 2
    )


def test_decision_problem_is_not_trivial(stats: Dataset) -> None:
    """Users differ in their best arm, and some are harmed by the biggest coupon."""
    revenue = stats.truth[truth_revenue_columns(STATS.n_treatments)].to_numpy()
    cost = stats.truth[truth_cost_columns(STATS.n_treatments)].to_numpy()
    harmed = (revenue[:, -1] < revenue[:, 0]).mean()
    assert 0.1 < harmed < 0.5
    best_net = np.bincount((revenue - cost).argmax(1), minlength=STATS.n_treatments)
    assert (best_net / len(revenue) > 0.05).sum() >= 3
    mean_revenue = revenue.mean(0)
    assert mean_revenue.argmax() not in (0, STATS.n_treatments - 1), "diminishing returns"


def test_without_confounding_everything_is_a_function_of_the_features() -> None:
    config = SimulatorConfig(n_obs=2000, n_rct=500, confounding=0.0, seed=2)
    data = simulate(config)
    no_hidden = np.zeros(len(data.table(OBS)))
    revenue, cost = expected_outcomes(_features(data, OBS), no_hidden, config)
    truth_rev, truth_cost = _truth_matrices(data, OBS)
    assert np.allclose(revenue, truth_rev) and np.allclose(cost, truth_cost)
    probs = logging_probabilities(_features(data, OBS), no_hidden, config)
    obs = data.table(OBS)
    logged = probs[np.arange(len(obs)), obs[TREATMENT].to_numpy()]
    assert np.allclose(logged, obs[PROPENSITY])


def test_confounding_moves_outcomes_and_targeting_beyond_the_features() -> None:
    config = SimulatorConfig(n_obs=2000, n_rct=500, confounding=1.0, seed=2)
    data = simulate(config)
    unconfounded = simulate(SimulatorConfig(n_obs=2000, n_rct=500, confounding=0.0, seed=2))
    features = _features(data, OBS)
    assert np.array_equal(features, _features(unconfounded, OBS)), "same users for the same seed"
    no_hidden = np.zeros(len(features))
    revenue, _ = expected_outcomes(features, no_hidden, config)
    truth_rev, _ = _truth_matrices(data, OBS)
    assert not np.allclose(revenue, truth_rev)

    low, high = -np.ones(len(features)), np.ones(len(features))
    assert (
        expected_outcomes(features, high, config)[0] > expected_outcomes(features, low, config)[0]
    ).all()
    levels = np.arange(config.n_treatments)
    mean_level = {h: logging_probabilities(features, h, config) @ levels for h in (-1.0, 1.0)}
    assert (mean_level[1.0] > mean_level[-1.0]).all()
    unmoved = SimulatorConfig(confounding=0.0)
    assert np.array_equal(
        expected_outcomes(features, high, unmoved)[1], expected_outcomes(features, low, unmoved)[1]
    )


@pytest.mark.parametrize(("n_treatments", "n_features"), [(2, 9), (3, 16)])
def test_other_shapes(n_treatments: int, n_features: int) -> None:
    config = SimulatorConfig(n_obs=200, n_rct=100, n_treatments=n_treatments, n_features=n_features)
    data = simulate(config)
    assert data.meta.n_treatments == n_treatments
    assert len(data.meta.feature_columns) == n_features
    assert set(data.table(OBS)[TREATMENT]) <= set(range(n_treatments))
    assert face_values(n_treatments)[0] == 0 and np.all(np.diff(face_values(n_treatments)) > 0)
    truth_rev, truth_cost = _truth_matrices(data, "rct_test")
    assert truth_rev.shape == truth_cost.shape == (len(data.table("rct_test")), n_treatments)


@pytest.mark.parametrize(
    "bad",
    [
        {"n_treatments": 1},
        {"n_features": 8},
        {"n_obs": 0},
        {"bias": -1.0},
        {"confounding": -0.5},
        {"rct_split": (0.5, 0.5, 0.5)},
        {"rct_split": (1.0, 0.0, 0.0)},
        {"n_rct": 2},
    ],
)
def test_invalid_config_is_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SimulatorConfig(**bad)
