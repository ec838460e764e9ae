"""Off-policy evaluation: hand-computed values, unbiasedness, intervals and the metrics."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bidfcl import evaluation as E
from bidfcl.allocation import lagrangian_choice
from bidfcl.contract import LoggedData, Truth, load_dataset
from bidfcl.outcome_model import crossfit_outcomes


def _logged(
    treatment: torch.Tensor,
    revenue: torch.Tensor,
    cost: torch.Tensor,
    propensity: torch.Tensor,
    n_treatments: int,
) -> LoggedData:
    n = treatment.shape[0]
    return LoggedData(
        user_id=torch.arange(n),
        x=torch.zeros(n, 1),
        treatment=treatment.long(),
        revenue=revenue.float(),
        cost=cost.float(),
        propensity=propensity.float(),
        n_treatments=n_treatments,
    )


def _population(n: int, n_arms: int, seed: int) -> Truth:
    """Expected revenue and cost per arm: cost rises with the arm, revenue lift varies."""
    g = torch.Generator().manual_seed(seed)
    base = 5.0 + 2.0 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    arms = torch.arange(n_arms, dtype=torch.float64)
    lift = 2.0 * torch.rand(n, 1, generator=g, dtype=torch.float64) - 0.5
    revenue = base + lift * torch.sqrt(arms) + 0.3 * torch.rand(n, n_arms, generator=g)
    cost = arms * (0.5 + torch.rand(n, 1, generator=g, dtype=torch.float64))
    return Truth(revenue=revenue, cost=cost)


def _rct(truth: Truth, seed: int, noise: float = 1.0) -> LoggedData:
    """A uniform randomized log of ``truth``'s users with Gaussian outcome noise."""
    g = torch.Generator().manual_seed(seed)
    n, n_arms = truth.revenue.shape
    treatment = torch.randint(0, n_arms, (n,), generator=g)
    pick = treatment.unsqueeze(1)
    revenue = truth.revenue.gather(1, pick)[:, 0] + noise * torch.randn(n, generator=g)
    cost = truth.cost.gather(1, pick)[:, 0] * (1 + 0.5 * torch.randn(n, generator=g))
    return _logged(treatment, revenue, cost, torch.full((n,), 1.0 / n_arms), n_arms)


# ----------------------------------------------------------------------------- estimators

HAND_TREATMENT = torch.tensor([0, 1, 2, 1, 0, 2])
HAND_PROPENSITY = torch.tensor([0.5, 0.25, 0.25, 0.25, 0.5, 0.25])
HAND_REVENUE = torch.tensor([2.0, 4.0, 6.0, 8.0, 10.0, 12.0])
HAND_COST = torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0, 2.0])
HAND_POLICY = torch.tensor([0, 1, 1, 1, 2, 2])
# q[i, j] = i + j: the model's prediction of every arm for every user.
HAND_Q = (torch.arange(6).unsqueeze(1) + torch.arange(3)).double()


@pytest.fixture
def hand() -> LoggedData:
    return _logged(HAND_TREATMENT, HAND_REVENUE, HAND_COST, HAND_PROPENSITY, 3)


def test_estimators_match_a_hand_computed_example(hand: LoggedData) -> None:
    # matches [1, 1, 0, 1, 0, 1], weights 1/p on matches [2, 4, 0, 4, 0, 4] (sum 14),
    # weighted revenue [4, 16, 0, 32, 0, 48] (sum 100).
    assert E.IPW().estimate(hand, HAND_POLICY).value == pytest.approx(100 / 6)
    assert E.SNIPW().estimate(hand, HAND_POLICY).value == pytest.approx(100 / 14)
    # DR: q(pi) = [0, 2, 3, 4, 6, 7] (sum 22); residual y - q(t) = [2, 2, 2, 4, 6, 5],
    # weighted on matches [4, 8, 0, 16, 0, 20] (sum 48).
    dr = E.DoublyRobust().estimate(hand, HAND_POLICY, predictions=HAND_Q)
    assert dr.value == pytest.approx(70 / 6)
    # IPW cost: weighted cost [0, 4, 0, 4, 0, 8].
    assert E.IPW().estimate(hand, HAND_POLICY, outcome="cost").value == pytest.approx(16 / 6)


def test_clt_interval_of_ipw_is_mean_plus_minus_z_standard_errors(hand: LoggedData) -> None:
    est = E.IPW().estimate(hand, HAND_POLICY, alpha=0.1)
    std_error = statistics.stdev([4, 16, 0, 32, 0, 48]) / math.sqrt(6)
    assert est.std_error == pytest.approx(std_error)
    assert est.ci_high - est.value == pytest.approx(1.6448536 * std_error, rel=1e-6)
    assert (est.n, est.estimator, est.interval) == (6, "ipw", "clt")


def test_make_estimator_and_input_errors(hand: LoggedData) -> None:
    assert isinstance(E.make_estimator("snipw"), E.SNIPW)
    with pytest.raises(ValueError, match="unknown estimator"):
        E.make_estimator("magic")
    with pytest.raises(ValueError, match="needs predictions"):
        E.DoublyRobust().estimate(hand, HAND_POLICY)
    with pytest.raises(ValueError, match="needs both revenue_pred and cost_pred"):
        E.evaluate_policy(hand, HAND_POLICY, "dr", revenue_pred=HAND_Q)
    with pytest.raises(ValueError, match="arms must lie"):
        E.IPW().estimate(hand, HAND_POLICY + 1)
    with pytest.raises(ValueError, match="unknown interval"):
        E.IPW().estimate(hand, HAND_POLICY, interval="exact")
    unknown = _logged(HAND_TREATMENT, HAND_REVENUE, HAND_COST, HAND_PROPENSITY * math.nan, 3)
    with pytest.raises(ValueError, match="propensit"):
        E.IPW().estimate(unknown, HAND_POLICY)


def test_ipw_and_dr_are_unbiased_on_randomized_logs_with_known_value() -> None:
    n, n_arms, draws = 40, 3, 2000
    g = torch.Generator().manual_seed(1)
    mu = 3.0 * torch.rand(n, n_arms, generator=g, dtype=torch.float64)
    logging = torch.softmax(torch.randn(n, n_arms, generator=g), dim=1) * 0.7 + 0.1
    policy = torch.randint(0, n_arms, (n,), generator=g)
    wrong_q = mu + 1.5 * torch.randn(n, n_arms, generator=g, dtype=torch.float64)
    known = float(mu.gather(1, policy.unsqueeze(1)).mean())
    values: dict[str, list[float]] = {"ipw": [], "dr": []}
    std_errors = []
    for _ in range(draws):
        treatment = torch.multinomial(logging, 1, generator=g)[:, 0]
        revenue = mu.gather(1, treatment.unsqueeze(1))[:, 0] + torch.randn(n, generator=g)
        propensity = logging.gather(1, treatment.unsqueeze(1))[:, 0]
        data = _logged(treatment, revenue, torch.zeros(n), propensity, n_arms)
        ipw = E.IPW().estimate(data, policy)
        values["ipw"].append(ipw.value)
        std_errors.append(ipw.std_error)
        values["dr"].append(E.DoublyRobust().estimate(data, policy, predictions=wrong_q).value)
    for name, estimates in values.items():
        spread = statistics.stdev(estimates)
        assert abs(statistics.mean(estimates) - known) < 4 * spread / math.sqrt(draws), name
    # The CLT standard error is calibrated to the spread of the estimates.
    assert statistics.mean(std_errors) == pytest.approx(statistics.stdev(values["ipw"]), rel=0.1)


def test_bootstrap_and_clt_intervals_agree_on_a_large_sample() -> None:
    truth = _population(20_000, 3, seed=2)
    data = _rct(truth, seed=3)
    policy = truth.revenue.argmax(dim=1)
    for name in ("ipw", "snipw"):
        clt = E.make_estimator(name).estimate(data, policy)
        boot = E.make_estimator(name).estimate(data, policy, interval="bootstrap", seed=4)
        width = clt.ci_high - clt.ci_low
        assert boot.value == clt.value
        assert boot.ci_low == pytest.approx(clt.ci_low, abs=0.1 * width)
        assert boot.ci_high == pytest.approx(clt.ci_high, abs=0.1 * width)
        assert boot.std_error == pytest.approx(clt.std_error, rel=0.1)
    again = E.IPW().estimate(data, policy, interval="bootstrap", seed=4)
    assert again == E.IPW().estimate(data, policy, interval="bootstrap", seed=4)


def test_evaluate_policy_reports_truth_beside_estimates() -> None:
    truth = _population(3000, 3, seed=5)
    data = _rct(truth, seed=6)
    policy = truth.revenue.argmax(dim=1)
    without = E.evaluate_policy(data, policy)
    assert without.true_revenue is None and without.true_cost is None
    result = E.evaluate_policy(
        data, policy, "dr", truth.revenue.float(), truth.cost.float(), truth=truth
    )
    assert (result.true_revenue, result.true_cost) == truth.policy_value(policy)
    assert result.revenue.estimator == "dr" and result.cost.estimator == "dr"
    assert result.revenue.ci_low < result.true_revenue < result.revenue.ci_high


# ----------------------------------------------------------------------------- EOM


def test_eom_meets_the_budget_and_grows_with_it() -> None:
    truth = _population(5000, 4, seed=7)
    data = _rct(truth, seed=8)
    rev_pred, cost_pred = truth.revenue.float(), truth.cost.float()
    budgets = [0.2, 0.5, 0.8, 1.1, 1.4]
    curve = E.budget_value_curve(data, rev_pred, cost_pred, budgets, truth=truth)
    assert list(curve["budget"]) == budgets
    assert curve["budget_met"].all()
    assert (curve["cost"] <= curve["budget"] + 1e-9).all()
    assert curve["lam"].is_monotonic_decreasing
    # With exact predictions, a smaller lambda buys more true revenue at more true cost.
    assert curve["true_cost"].is_monotonic_increasing
    assert curve["true_revenue"].is_monotonic_increasing
    assert (curve["eom_ci_low"] < curve["eom"]).all() and (
        curve["eom"] < curve["eom_ci_high"]
    ).all()
    single = E.expected_outcome_metric(data, rev_pred, cost_pred, 0.8, truth=truth)
    assert single.eom.value == curve["eom"][2] and single.lam == curve["lam"][2]
    assert torch.equal(single.policy, lagrangian_choice(rev_pred, cost_pred, single.lam))


def test_eom_lambda_is_the_smallest_that_meets_the_budget() -> None:
    # 20 users x 3 arms have few enough breakpoints for the search to see every step.
    truth = _population(20, 3, seed=9)
    data = _rct(truth, seed=10, noise=0.1)
    g = torch.Generator().manual_seed(11)
    rev_pred = truth.revenue.float() + 0.5 * torch.randn(20, 3, generator=g)
    cost_pred = truth.cost.float()
    budget = 0.6
    result = E.expected_outcome_metric(data, rev_pred, cost_pred, budget)
    assert result.budget_met and result.lam > 0
    assert result.cost.value <= budget
    # Any smaller lambda either busts the budget or lies on the same step (same policy).
    for lam in torch.linspace(0, result.lam, 2001, dtype=torch.float64)[:-1]:
        policy = lagrangian_choice(rev_pred, cost_pred, float(lam))
        cost = E.IPW().estimate(data, policy, "cost").value
        assert cost > budget or torch.equal(policy, result.policy)


def test_eom_unconstrained_and_infeasible_budgets() -> None:
    truth = _population(2000, 3, seed=12)
    data = _rct(truth, seed=13)
    rev_pred, cost_pred = truth.revenue.float(), truth.cost.float()
    loose = E.expected_outcome_metric(data, rev_pred, cost_pred, budget=1e9)
    assert loose.lam == 0.0 and loose.budget_met
    assert torch.equal(loose.policy, rev_pred.argmax(dim=1))
    impossible = E.expected_outcome_metric(data, rev_pred, cost_pred, budget=-1.0)
    assert not impossible.budget_met
    assert torch.equal(impossible.policy, cost_pred.argmin(dim=1))


def test_curve_area_is_the_mean_height_over_the_budget_range() -> None:
    curve = pd.DataFrame({"budget": [2.0, 0.0, 1.0], "eom": [1.0, 0.0, 1.0]})
    assert E.curve_area(curve) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="two distinct budgets"):
        E.curve_area(curve.iloc[:1])


# ----------------------------------------------------------------------------- rankings


def _two_arm_population(n: int, seed: int) -> tuple[LoggedData, torch.Tensor, torch.Tensor]:
    """Two-arm RCT whose users differ in uplift and cost; returns data and true r, c."""
    g = torch.Generator().manual_seed(seed)
    base = 5.0 + torch.rand(n, generator=g, dtype=torch.float64)
    uplift = 3.0 * torch.rand(n, generator=g, dtype=torch.float64) ** 2
    treat_cost = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    revenue = torch.stack([base, base + uplift], dim=1)
    cost = torch.stack([torch.zeros(n, dtype=torch.float64), treat_cost], dim=1)
    data = _rct(Truth(revenue, cost), seed=seed + 1, noise=0.5)
    return data, revenue, cost


def test_aucc_of_a_perfect_ranking_beats_random_which_is_about_half() -> None:
    data, revenue, cost = _two_arm_population(20_000, seed=14)
    perfect = E.aucc(data, revenue, cost)
    g = torch.Generator().manual_seed(15)
    random_revenue = torch.rand(20_000, 2, generator=g)
    random_auccs = [
        E.aucc(data, random_revenue.roll(shift, 0), torch.ones_like(random_revenue))
        for shift in (0, 5000, 10_000)
    ]
    assert statistics.mean(random_auccs) == pytest.approx(0.5, abs=0.05)
    assert perfect > max(random_auccs) + 0.1
    curve = E.cost_curve(data, revenue, cost, n_bins=10)
    assert len(curve) == 11 and curve["cost_share"].iloc[-1] == pytest.approx(1.0)
    three = _rct(_population(100, 3, seed=16), seed=17)
    with pytest.raises(ValueError, match="two arms"):
        E.aucc(three, torch.zeros(100, 3), torch.zeros(100, 3))


def test_qini_and_auuc_of_a_perfect_score_beat_random() -> None:
    data, revenue, _ = _two_arm_population(20_000, seed=18)
    perfect = revenue[:, 1] - revenue[:, 0]
    random = torch.rand(20_000, generator=torch.Generator().manual_seed(19))
    assert E.qini_coefficient(data, perfect) > 0.1
    assert E.qini_coefficient(data, random) == pytest.approx(0.0, abs=0.05)
    assert E.auuc(data, perfect) > E.auuc(data, random) + 0.1
    assert E.auuc(data, random) == pytest.approx(0.5, abs=0.05)
    curve = E.qini_curve(data, perfect, n_bins=20)
    assert list(curve.columns) == ["fraction", "n_users", "qini", "uplift_gain", "random_qini"]
    assert curve["n_users"].iloc[0] == 0 and curve["n_users"].iloc[-1] == 20_000
    assert curve["qini"].iloc[-1] == pytest.approx(curve["random_qini"].iloc[-1])


# ----------------------------------------------------------------------------- simulator


def test_eom_on_simulated_rct_sits_near_the_truth(small_dataset_dir: Path) -> None:
    dataset = load_dataset(small_dataset_dir)
    data = dataset.logged("rct_test")
    truth = dataset.truth_for("rct_test")
    assert truth is not None
    budget = float(dataset.meta.extra["default_budget"])
    result = E.expected_outcome_metric(
        data, truth.revenue.float(), truth.cost.float(), budget, "dr", truth=truth
    )
    assert result.budget_met and result.cost.value <= budget
    assert result.true_revenue is not None and result.true_cost is not None
    assert abs(result.eom.value - result.true_revenue) < 4 * result.eom.std_error
    assert np.isfinite([result.eom.ci_low, result.eom.ci_high]).all()


# ----------------------------------------------------------------------------- two policies


def _two_policies(truth: Truth, changed_share: float, seed: int) -> tuple[torch.Tensor, ...]:
    """B: a Lagrangian policy of the truth; A: B with a random share of users sent to
    another arm (so A and B agree on the rest)."""
    g = torch.Generator().manual_seed(seed)
    policy_b = lagrangian_choice(truth.revenue, truth.cost, 0.4)
    n, n_arms = truth.revenue.shape
    changed = torch.rand(n, generator=g) < changed_share
    shift = torch.randint(1, n_arms, (n,), generator=g)
    policy_a = torch.where(changed, (policy_b + shift) % n_arms, policy_b)
    return policy_a, policy_b


@pytest.mark.parametrize("estimator", ["ipw", "dr"])
def test_paired_difference_is_unbiased_over_randomized_logs(estimator: str) -> None:
    truth = _population(1500, 4, seed=3)
    policy_a, policy_b = _two_policies(truth, 0.4, seed=1)
    true_difference = truth.policy_value(policy_a)[0] - truth.policy_value(policy_b)[0]
    differences, covered = [], 0
    for seed in range(300):
        data = _rct(truth, seed)
        direct = crossfit_outcomes(data, seed=seed) if estimator == "dr" else None
        result = E.compare_policies(data, policy_a, policy_b, estimator, direct, truth=truth)
        assert result.true_difference == pytest.approx(true_difference)
        differences.append(result.difference)
        covered += result.ci_low <= true_difference <= result.ci_high
    spread = statistics.stdev(differences) / math.sqrt(len(differences))
    assert abs(statistics.fmean(differences) - true_difference) < 4 * spread
    assert 0.90 <= covered / len(differences) <= 0.99


def test_paired_interval_is_narrower_than_unpaired_when_policies_mostly_agree() -> None:
    truth = _population(4000, 4, seed=5)
    data = _rct(truth, seed=0)
    for changed_share, at_most in ((0.1, 0.6), (0.5, 1.2)):
        policy_a, policy_b = _two_policies(truth, changed_share, seed=2)
        result = E.compare_policies(data, policy_a, policy_b, "ipw")
        assert result.agreement == pytest.approx(1 - changed_share, abs=0.03)
        # IPW: users on whom the policies agree add nothing, so the ratio is about
        # sqrt(2 (1 - agreement)) for equal-variance arms
        assert result.std_error / result.unpaired_std_error < at_most
    same = E.compare_policies(data, policy_b, policy_b, "ipw")
    assert same.difference == 0.0 and same.std_error == 0.0 and same.p_value == 1.0


def test_a_paired_dr_comparison_needs_an_independent_outcome_model() -> None:
    truth = _population(200, 3, seed=1)
    data = _rct(truth, seed=0)
    policy_a, policy_b = _two_policies(truth, 0.5, seed=0)
    with pytest.raises(ValueError, match="independent of both policies"):
        E.compare_policies(data, policy_a, policy_b, "dr")
    bootstrap = E.compare_policies(data, policy_a, policy_b, "ipw", interval="bootstrap")
    assert bootstrap.ci_low < bootstrap.difference < bootstrap.ci_high
    assert bootstrap.ci_low <= bootstrap.lower_bound
    # SNIPW is a ratio per policy: its paired difference is the difference of the ratios
    snipw = E.compare_policies(data, policy_a, policy_b, "snipw")
    expected = E.SNIPW().point(data, policy_a) - E.SNIPW().point(data, policy_b)
    assert snipw.difference == pytest.approx(float(expected))
    assert snipw.ci_low < snipw.difference < snipw.ci_high
