"""The budgeted allocation solver against brute force, HiGHS and the MCKP's edge cases."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import linprog

from bidfcl import allocation
from bidfcl.allocation import (
    STATUS_INFEASIBLE,
    STATUS_OK,
    STATUS_SLACK,
    AllocationResult,
    lagrangian_choice,
    solve_mckp,
)

ROUNDING = 1e-9


def random_instance(
    rng: np.random.Generator, n: int, m: int, integer: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous values, or small integers that force ties, equal costs and dominated arms."""
    if integer:
        return (
            torch.from_numpy(rng.integers(0, 4, (n, m)).astype(np.float64)),
            torch.from_numpy(rng.integers(0, 4, (n, m)).astype(np.float64)),
        )
    return torch.from_numpy(rng.random((n, m))), torch.from_numpy(rng.random((n, m)))


def budget_between_extremes(rng: np.random.Generator, cost: torch.Tensor) -> float:
    low, high = float(cost.min(1).values.mean()), float(cost.max(1).values.mean())
    return float(rng.uniform(low - 0.1 * (high - low), high))


def binding_budget(revenue: torch.Tensor, cost: torch.Tensor, fraction: float) -> float:
    """A budget ``fraction`` of the way from the cheapest arms to the unconstrained optimum."""
    cheapest = float(cost.min(1).values.mean())
    unconstrained = solve_mckp(revenue, cost, float(cost.max())).mean_cost
    return cheapest + fraction * (unconstrained - cheapest)


def highs_lp_value(revenue: torch.Tensor, cost: torch.Tensor, budget: float) -> float:
    """Mean revenue per user of the LP relaxation, solved by HiGHS."""
    n, m = revenue.shape
    one_arm_each = sp.kron(sp.eye(n), np.ones((1, m)), format="csr")
    solution = linprog(
        -revenue.numpy().ravel(),
        A_ub=cost.numpy().reshape(1, -1),
        b_ub=[budget * n],
        A_eq=one_arm_each,
        b_eq=np.ones(n),
        bounds=(0, 1),
        method="highs",
    )
    assert solution.status == 0, solution.message
    return -solution.fun / n


def assert_consistent(result: AllocationResult, revenue: torch.Tensor, cost: torch.Tensor) -> None:
    """The reported means are those of the returned arms."""
    assert result.treatment.dtype == torch.int64
    assert result.treatment.shape == (revenue.shape[0],)
    chosen = result.treatment.unsqueeze(1)
    assert result.mean_revenue == pytest.approx(float(revenue.gather(1, chosen).double().mean()))
    assert result.mean_cost == pytest.approx(float(cost.gather(1, chosen).double().mean()))


@pytest.mark.parametrize("seed", range(80))
def test_exact_against_brute_force_enumeration(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(1, 7)), int(rng.integers(2, 5))
    revenue, cost = random_instance(rng, n, m, integer=seed % 2 == 0)
    budget = budget_between_extremes(rng, cost)

    allocations = np.array(list(itertools.product(range(m), repeat=n)))
    users = np.arange(n)
    totals_revenue = revenue.numpy()[users, allocations].sum(1)
    totals_cost = cost.numpy()[users, allocations].sum(1)
    feasible = totals_cost <= budget * n + ROUNDING

    result = solve_mckp(revenue, cost, budget)
    assert_consistent(result, revenue, cost)
    if not feasible.any():
        assert result.status == STATUS_INFEASIBLE
        assert result.treatment.eq(0).all()
        return
    best = totals_revenue[feasible].max() / n
    largest_step = float((revenue.max(1).values - revenue.min(1).values).max()) / n
    assert result.mean_cost <= budget + ROUNDING
    assert result.mean_revenue <= best + ROUNDING
    assert result.lp_value >= best - ROUNDING
    assert result.mean_revenue >= result.lp_value - largest_step - ROUNDING


@pytest.mark.parametrize("seed", range(8))
def test_exact_lp_value_matches_highs(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    revenue, cost = random_instance(rng, 200, 5, integer=seed % 2 == 1)
    budget = binding_budget(revenue, cost, 0.4)
    result = solve_mckp(revenue, cost, budget)
    assert result.status == STATUS_OK
    assert result.lp_value == pytest.approx(highs_lp_value(revenue, cost, budget), rel=1e-6)
    assert result.mean_cost <= budget + ROUNDING


@pytest.mark.parametrize("method", ["exact", "bisection"])
def test_value_grows_with_budget_and_budget_holds(method: str) -> None:
    rng = np.random.default_rng(5)
    revenue, cost = random_instance(rng, 300, 6, integer=False)
    budgets = np.linspace(float(cost.min(1).values.mean()), float(cost.max(1).values.mean()), 25)
    results = [solve_mckp(revenue, cost, float(b), method=method) for b in budgets]
    for budget, result in zip(budgets, results, strict=True):
        assert result.mean_cost <= budget + ROUNDING
        assert_consistent(result, revenue, cost)
    values = [r.mean_revenue for r in results]
    assert all(a <= b + ROUNDING for a, b in itertools.pairwise(values))
    if method == "exact":
        lp_values = [r.lp_value for r in results]
        assert all(a <= b + ROUNDING for a, b in itertools.pairwise(lp_values))
        lams = [r.lam for r in results]
        assert all(a >= b for a, b in itertools.pairwise(lams))


@pytest.mark.parametrize("method", ["exact", "bisection"])
def test_budget_below_every_cheapest_arm_returns_all_control(method: str) -> None:
    revenue = torch.tensor([[1.0, 2.0], [1.0, 3.0]])
    cost = torch.tensor([[0.5, 1.0], [0.4, 0.2]])
    result = solve_mckp(revenue, cost, budget=0.3, method=method)
    assert result.status == STATUS_INFEASIBLE
    assert result.treatment.tolist() == [0, 0]
    assert result.lam == math.inf
    assert result.mean_cost == pytest.approx(0.45)


def test_cheapest_arm_need_not_be_control() -> None:
    # Control costs 0.5 for the first user, but its arm 1 is cheaper and the budget fits it.
    revenue = torch.tensor([[1.0, 0.5, 3.0], [1.0, 2.0, 2.5]], dtype=torch.float64)
    cost = torch.tensor([[0.5, 0.1, 2.0], [0.0, 1.0, 1.5]], dtype=torch.float64)
    result = solve_mckp(revenue, cost, budget=0.06)
    assert result.status == STATUS_OK
    assert result.treatment.tolist() == [1, 0]
    # The first user's hull jumps from arm 1 straight to arm 2 (arm 0 lies below that chord).
    assert result.lam == pytest.approx(2.5 / 1.9)
    assert result.lp_value == pytest.approx((0.5 + 1.0 + 0.02 * 2.5 / 1.9) / 2)


@pytest.mark.parametrize("method", ["exact", "bisection"])
def test_slack_budget_returns_unconstrained_optimum_with_ties_to_cheaper(method: str) -> None:
    revenue = torch.tensor([[1.0, 3.0, 3.0], [2.0, 1.0, 0.5], [0.0, 1.0, 2.0]])
    cost = torch.tensor([[0.0, 2.0, 1.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    result = solve_mckp(revenue, cost, budget=10.0, method=method)
    assert result.status == STATUS_SLACK
    assert result.lam == 0.0
    assert result.treatment.tolist() == [2, 0, 2]
    if method == "exact":
        assert result.lp_value == pytest.approx(result.mean_revenue)


def test_identical_users_tie_and_the_budget_admits_whole_steps_only() -> None:
    revenue = torch.tensor([[0.0, 2.0, 3.0]]).repeat(10, 1)
    cost = torch.tensor([[0.0, 1.0, 2.0]]).repeat(10, 1)
    result = solve_mckp(revenue, cost, budget=0.45)
    assert result.lam == pytest.approx(2.0)
    assert result.treatment.tolist().count(1) == 4
    assert result.treatment.tolist().count(0) == 6
    assert result.lp_value == pytest.approx(0.9)
    assert result.mean_revenue == pytest.approx(0.8)


def test_collinear_arms_become_separate_steps() -> None:
    # Arm 1 sits on the segment from arm 0 to arm 2: the greedy may stop half way there.
    revenue = torch.tensor([[0.0, 1.0, 2.0]])
    cost = torch.tensor([[0.0, 1.0, 2.0]])
    result = solve_mckp(revenue, cost, budget=1.5)
    assert result.treatment.tolist() == [1]
    assert result.lp_value == pytest.approx(1.5)


def test_zero_cost_upgrade_is_always_taken() -> None:
    revenue = torch.tensor([[1.0, 1.5, 4.0], [1.0, 1.2, 3.0]])
    cost = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    result = solve_mckp(revenue, cost, budget=0.0)
    assert result.status == STATUS_OK
    assert result.treatment.tolist() == [1, 1]
    assert result.mean_cost == 0.0


def test_dominated_arms_are_never_chosen() -> None:
    rng = np.random.default_rng(11)
    revenue, cost = random_instance(rng, 200, 3, integer=False)
    # Arm 3 costs more than arm 2 and earns less.
    revenue = torch.cat([revenue, revenue[:, 2:] - 0.1], dim=1)
    cost = torch.cat([cost, cost[:, 2:] + 0.1], dim=1)
    for budget in (0.2, 0.5, 0.8, 5.0):
        assert not solve_mckp(revenue, cost, budget).treatment.eq(3).any()


def test_two_arms_treat_users_by_decreasing_return_on_investment() -> None:
    rng = np.random.default_rng(3)
    uplift = torch.from_numpy(rng.random(50))
    extra_cost = torch.from_numpy(rng.random(50) + 0.1)
    revenue = torch.stack([torch.zeros(50), uplift], dim=1)
    cost = torch.stack([torch.zeros(50), extra_cost], dim=1)
    budget = float(extra_cost.sum()) / 50 / 3
    result = solve_mckp(revenue, cost, budget)
    ranking = torch.argsort(uplift / extra_cost, descending=True)
    fitting = int((extra_cost[ranking].cumsum(0) <= budget * 50).sum())
    expected = torch.zeros(50, dtype=torch.long)
    expected[ranking[:fitting]] = 1
    assert torch.equal(result.treatment, expected)
    assert result.lam == pytest.approx(float((uplift / extra_cost)[ranking[fitting]]))


def test_single_arm() -> None:
    revenue, cost = torch.ones(4, 1), torch.full((4, 1), 2.0)
    assert solve_mckp(revenue, cost, budget=2.0).status == STATUS_SLACK
    assert solve_mckp(revenue, cost, budget=1.0).status == STATUS_INFEASIBLE


@pytest.mark.parametrize("seed", range(12))
def test_sample_bracketed_path_matches_direct_solution(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    revenue, cost = random_instance(rng, 3000, 6, integer=seed % 3 == 0)
    low, high = float(cost.min(1).values.mean()), float(cost.max(1).values.mean())
    budget = low + (seed / 10 - 0.05) * (high - low)
    direct = solve_mckp(revenue, cost, budget)
    bracketed = solve_mckp(revenue, cost, budget, sample_size=40 + 10 * seed, seed=seed)
    assert bracketed.status == direct.status
    assert bracketed.lam == pytest.approx(direct.lam, rel=1e-9)
    assert_consistent(bracketed, revenue, cost)
    if direct.status != STATUS_INFEASIBLE:
        assert bracketed.lp_value == pytest.approx(direct.lp_value, rel=1e-9)
        assert bracketed.mean_cost <= budget + ROUNDING
        assert bracketed.mean_revenue >= bracketed.lp_value - float(revenue.max() - revenue.min())


@pytest.mark.parametrize("method", ["exact", "bisection"])
def test_small_cpu_inputs_are_solved_on_one_thread_and_threads_are_restored(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    for name in ("_solve_exact_bracketed", "_solve_bisection"):
        solve = getattr(allocation, name)

        def spy(*args: object, solve: Callable[..., AllocationResult] = solve) -> AllocationResult:
            seen.append(torch.get_num_threads())
            return solve(*args)

        monkeypatch.setattr(allocation, name, spy)
    rng = np.random.default_rng(700)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n, expected in ((6000, 1), (300_000, 2)):  # N * M below and above 2^20
            revenue, cost = random_instance(rng, n, 4, integer=False)
            solve_mckp(revenue, cost, binding_budget(revenue, cost, 0.3), method=method)
            assert seen[-1] == expected
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("fraction", [-0.5, 0.3, 1.5])  # infeasible, binding, slack
def test_blocked_lagrangian_passes_change_nothing(
    fraction: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(600)
    revenue, cost = random_instance(rng, 6000, 5, integer=True)
    budget = binding_budget(revenue, cost, fraction)
    whole = solve_mckp(revenue, cost, budget)
    monkeypatch.setattr(allocation, "_PASS_BLOCK", 97)
    blocked = solve_mckp(revenue, cost, budget)
    assert blocked.status == whole.status
    assert blocked.lam == whole.lam
    assert torch.equal(blocked.treatment, whole.treatment)


@pytest.mark.parametrize("seed", range(6))
def test_bisection_finds_the_exact_lambda(seed: int) -> None:
    rng = np.random.default_rng(300 + seed)
    revenue, cost = random_instance(rng, 500, 5, integer=False)
    budget = binding_budget(revenue, cost, 0.3)
    exact = solve_mckp(revenue, cost, budget)
    bisection = solve_mckp(revenue, cost, budget, method="bisection")
    assert bisection.lam == pytest.approx(exact.lam, rel=1e-4)
    assert bisection.lp_value is None
    assert bisection.mean_cost <= budget + ROUNDING
    assert bisection.mean_revenue <= exact.mean_revenue + ROUNDING


@pytest.mark.parametrize("method", ["exact", "bisection"])
def test_float32_and_float64_inputs_agree(method: str) -> None:
    rng = np.random.default_rng(9)
    revenue, cost = random_instance(rng, 400, 4, integer=False)
    result64 = solve_mckp(revenue, cost, 0.4, method=method)
    result32 = solve_mckp(revenue.float(), cost.float(), 0.4, method=method)
    assert result32.lam == pytest.approx(result64.lam, rel=1e-4)
    assert result32.mean_revenue == pytest.approx(result64.mean_revenue, rel=1e-4)
    assert result32.mean_cost <= 0.4 + ROUNDING
    assert result32.treatment.device == revenue.device


def test_lagrangian_choice_takes_number_or_tensor_multiplier() -> None:
    rng = np.random.default_rng(4)
    revenue, cost = random_instance(rng, 100, 5, integer=False)
    expected = (revenue - 0.7 * cost).argmax(1)
    assert torch.equal(lagrangian_choice(revenue, cost, 0.7), expected)
    assert torch.equal(lagrangian_choice(revenue, cost, torch.tensor(0.7)), expected)


def test_accepts_inputs_that_require_grad() -> None:
    revenue = torch.rand(2000, 4, requires_grad=True)
    cost = torch.rand(2000, 4)
    exact = solve_mckp(revenue, cost, 0.3)
    assert exact.treatment.equal(solve_mckp(revenue.detach(), cost, 0.3).treatment)


def test_rejects_bad_inputs() -> None:
    revenue, cost = torch.rand(5, 3), torch.rand(5, 3)
    with pytest.raises(ValueError, match=r"\(N, M\)"):
        solve_mckp(revenue, cost[:, :2], 0.5)
    with pytest.raises(ValueError, match="finite"):
        solve_mckp(revenue.masked_fill(revenue > 0.5, math.nan), cost, 0.5)
    with pytest.raises(ValueError, match="method"):
        solve_mckp(revenue, cost, 0.5, method="greedy")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["exact", "bisection"])
def test_cuda_matches_cpu(method: str) -> None:
    rng = np.random.default_rng(21)
    revenue, cost = random_instance(rng, 5000, 8, integer=False)
    on_cpu = solve_mckp(revenue.float(), cost.float(), 0.3, method=method, sample_size=256)
    on_gpu = solve_mckp(
        revenue.float().cuda(), cost.float().cuda(), 0.3, method=method, sample_size=256
    )
    assert on_gpu.treatment.is_cuda
    assert on_gpu.lam == pytest.approx(on_cpu.lam, rel=1e-5)
    assert on_gpu.mean_revenue == pytest.approx(on_cpu.mean_revenue, rel=1e-5)
