"""Budgeted allocation: the multiple-choice knapsack (MCKP) behind every policy.

Each of N users gets exactly one of M arms; arm j of user i earns ``revenue[i, j]`` and
spends ``cost[i, j]``; the mean cost per user may not exceed ``budget``. Two solvers:

- ``"exact"`` solves the LP relaxation exactly: per user, the upper concave hull of its
  (cost, revenue) points turns into steps of decreasing efficiency (delta revenue / delta
  cost); taking steps in globally decreasing efficiency until the budget binds is optimal
  and the efficiency of the step that does not fit is lambda*. The integral answer drops
  that one fractional step, so it is within one user's step of the LP optimum. For large N
  a random sample of users brackets lambda*; two Lagrangian passes over all users then fix
  every user whose arm is the same at both ends of the bracket, and only the few users left
  (those with a hull step inside the bracket) go through the hulls. The greedy itself needs
  no full sort: steps are bucketed by efficiency, bucket totals locate the binding bucket
  and only that bucket's few steps are sorted.
- ``"bisection"`` is the paper's Lagrangian bisection on lambda: the smallest lambda whose
  policy fits the budget.

Both are vectorised over users and arms and run on whatever device the inputs live on.
Small CPU inputs are solved with one torch thread: at that size intra-op threads cost more
in hand-offs than they save, and on a busy machine every parallel operation waits for a
core to come free.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal

import torch

STATUS_OK = "ok"
STATUS_INFEASIBLE = "budget_below_min_cost"
STATUS_SLACK = "budget_slack"

_BRACKET_Z = 4.0  # sampling standard errors on each side of the sample's lambda*
_BRACKET_GROWTH = 4.0  # how much a bracket side widens when it misses lambda*
_BRACKET_MAX_WIDENING = 1e6  # past this, a side jumps to lambda = 0 or lambda = inf
_BUCKETS = 4096  # efficiency buckets of the LP greedy's selection
_MIN_SAMPLE = 1024  # smallest sample worth bracketing lambda* with
_HULL_BLOCK = 8192  # users per block of the pairwise hull computation
_PASS_BLOCK = 1 << 20  # users per block of a Lagrangian pass over all users
_ONE_THREAD_SCORES = 1 << 20  # N * M up to which CPU inputs are solved on one thread


@dataclass(frozen=True)
class AllocationResult:
    """An integral allocation and the Lagrange multiplier that produced it."""

    treatment: torch.Tensor  # int64 (N,), on the input's device
    lam: float  # Lagrange multiplier (lambda*); inf when even the cheapest arms overspend
    mean_revenue: float  # mean revenue per user of the integral allocation
    mean_cost: float  # mean cost per user of the integral allocation (<= budget unless infeasible)
    lp_value: float | None  # mean revenue per user of the LP relaxation optimum ("exact" only)
    status: str  # STATUS_OK, STATUS_INFEASIBLE (all control returned) or STATUS_SLACK


def lagrangian_choice(
    revenue: torch.Tensor, cost: torch.Tensor, lam: float | torch.Tensor
) -> torch.Tensor:
    """Each user's arm under multiplier ``lam``: argmax_j (revenue_ij - lam * cost_ij).

    One vectorised pass over the (N, M) scores; ties go to the lowest arm index. The score
    is one fused multiply-add, with ``lam`` as a number or a 0-dim tensor (kept on device).
    """
    if isinstance(lam, torch.Tensor):
        return torch.addcmul(revenue, cost, -lam).argmax(dim=1)
    return torch.add(revenue, cost, alpha=-lam).argmax(dim=1)


@torch.no_grad()
def solve_mckp(
    revenue: torch.Tensor,
    cost: torch.Tensor,
    budget: float,
    method: Literal["exact", "bisection"] = "exact",
    *,
    steps: int = 50,
    sample_size: int = 65_536,
    seed: int = 0,
) -> AllocationResult:
    """Best integral allocation whose mean cost per user stays within ``budget``.

    ``revenue`` and ``cost`` are (N, M) tensors on any device; arm 0 is control. If even
    each user's cheapest arm overspends, every user gets control and the status says so;
    if the unconstrained optimum (highest revenue, ties to the cheaper arm) fits, it is
    returned with lam = 0. Options: ``steps`` (bisection iterations), ``sample_size`` (the
    most users sampled to bracket lambda* in the exact method; it samples about 2 N^(2/3),
    at least 1024, and solves inputs under four times that directly) and ``seed``. Sums are
    accumulated in float64, so the budget holds up to float64 rounding. CPU inputs with
    N * M up to 2^20 are solved with one torch thread (restored afterwards).

    Tie rule of the exact method: hull steps are taken by decreasing efficiency, equal
    efficiencies in order of (step along the user's hull, user index), until the first step
    that does not fit. The direct path follows it exactly; the bracketed path follows it for
    the users the bracket leaves undecided, so where many steps tie at lambda* it may pick
    other tied users.

    At lambda* several arms tie; bisection returns the policy at a lambda just above it,
    which sends the tied users to their cheaper arm, so its revenue can be slightly below
    the exact method's. The allocation is a decision, not a differentiable output, so no
    autograd graph is recorded.
    """
    if steps < 1 or sample_size < 2:
        raise ValueError(f"need steps >= 1 and sample_size >= 2; got {steps} and {sample_size}")
    if method not in ("exact", "bisection"):
        raise ValueError(f"unknown method {method!r}; expected 'exact' or 'bisection'")
    small = revenue.device.type == "cpu" and revenue.numel() <= _ONE_THREAD_SCORES
    with _one_thread(small):
        revenue, cost = _checked_inputs(revenue, cost, budget)
        total_budget = float(budget) * revenue.shape[0]
        if method == "bisection":
            return _solve_bisection(revenue, cost, total_budget, steps)
        n_users = revenue.shape[0]
        # Sample work grows like S and the undecided users like N / sqrt(S): S ~ N^(2/3).
        sample_size = min(sample_size, max(_MIN_SAMPLE, round(2 * n_users ** (2 / 3))))
        if n_users > 4 * sample_size:
            return _solve_exact_bracketed(revenue, cost, total_budget, sample_size, seed)
        return _solve_exact_direct(revenue, cost, total_budget)


@contextmanager
def _one_thread(active: bool) -> Iterator[None]:
    """Torch's intra-op threads set to one while the block runs (when ``active``)."""
    threads = torch.get_num_threads()
    if not active or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _checked_inputs(
    revenue: torch.Tensor, cost: torch.Tensor, budget: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes, device and finiteness; promote to a common floating dtype."""
    if revenue.ndim != 2 or revenue.shape != cost.shape:
        raise ValueError(
            f"revenue and cost must both be (N, M); got {tuple(revenue.shape)} and "
            f"{tuple(cost.shape)}"
        )
    if revenue.shape[0] == 0 or revenue.shape[1] == 0:
        raise ValueError("need at least one user and one arm")
    if revenue.device != cost.device:
        raise ValueError(f"revenue is on {revenue.device} but cost is on {cost.device}")
    if not math.isfinite(budget):
        raise ValueError(f"budget must be finite, got {budget}")
    dtype = torch.promote_types(revenue.dtype, cost.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64
    revenue, cost = revenue.to(dtype), cost.to(dtype)
    # One cheap reduction catches any NaN or infinity (a single sum is far cheaper than isfinite).
    if not math.isfinite(float(revenue.sum() + cost.sum())):
        raise ValueError("revenue and cost must be finite")
    return revenue, cost


def _gather(values: torch.Tensor, arm: torch.Tensor) -> torch.Tensor:
    return values.gather(1, arm.unsqueeze(1)).squeeze(1)


def _lexicographic_argmax(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Per row, the arm with the largest ``primary``, ties broken by the largest ``secondary``."""
    best = primary.max(dim=1, keepdim=True).values
    return secondary.masked_fill(primary != best, -math.inf).argmax(dim=1)


def _all_control(revenue: torch.Tensor, cost: torch.Tensor) -> AllocationResult:
    n = revenue.shape[0]
    return AllocationResult(
        treatment=torch.zeros(n, dtype=torch.long, device=revenue.device),
        lam=math.inf,
        mean_revenue=float(revenue[:, 0].sum(dtype=torch.float64)) / n,
        mean_cost=float(cost[:, 0].sum(dtype=torch.float64)) / n,
        lp_value=None,
        status=STATUS_INFEASIBLE,
    )


# ----------------------------------------------------------------------------- exact LP


@dataclass(frozen=True)
class _GreedyCut:
    """Where the LP greedy stops for one budget: the steps taken and the one that binds."""

    taken: torch.Tensor  # bool (K,), over the plan's steps
    cost: float  # total cost of the hull starts plus the taken steps
    revenue: float
    binding: tuple[float, float, float] | None  # (efficiency, cost, revenue); None if all fit


@dataclass(frozen=True)
class _GreedyPlan:
    """Every user's hull steps, bucketed by efficiency so that a budget needs no full sort.

    ``arms[p, i]`` is user i's arm after its first p hull steps (repeating the last hull arm
    past the end of its hull); step k of the plan is entry ``grid_index[k]`` of the flat
    (step, user) grid. Buckets are ranges of efficiency (a higher bucket is more efficient)
    whose cost and revenue totals locate the budget's binding bucket in one cumulative sum;
    only that bucket's few steps are then sorted.
    """

    arms: torch.Tensor  # int64 (M, n)
    grid_index: torch.Tensor  # int64 (K,), increasing
    efficiency: torch.Tensor  # float64 (K,)
    step_cost: torch.Tensor  # float64 (K,), > 0
    step_revenue: torch.Tensor  # float64 (K,), > 0
    bucket: torch.Tensor  # int64 (K,), grows with efficiency
    cost_from_top: torch.Tensor  # float64 (B,): total cost of the highest t + 1 buckets
    revenue_from_top: torch.Tensor  # float64 (B,)
    base_cost: float  # total cost of every user's hull start
    base_revenue: float

    def cut(self, total_budget: float) -> _GreedyCut:
        """Take steps by decreasing efficiency while they fit (``total_budget`` >= base_cost)."""
        spare = total_budget - self.base_cost
        device = self.cost_from_top.device
        n_buckets = self.cost_from_top.shape[0]
        spare_t = torch.tensor([spare], dtype=torch.float64, device=device)
        full_buckets = int(torch.searchsorted(self.cost_from_top, spare_t, right=True))
        if full_buckets == n_buckets:
            taken = torch.ones_like(self.bucket, dtype=torch.bool)
            revenue = float(self.revenue_from_top[-1]) if n_buckets else 0.0
            cost = float(self.cost_from_top[-1]) if n_buckets else 0.0
            return _GreedyCut(taken, self.base_cost + cost, self.base_revenue + revenue, None)
        binding_bucket = n_buckets - 1 - full_buckets
        cost_before = float(self.cost_from_top[full_buckets - 1]) if full_buckets else 0.0
        revenue_before = float(self.revenue_from_top[full_buckets - 1]) if full_buckets else 0.0
        members = (self.bucket == binding_bucket).nonzero().squeeze(1)
        members = members[torch.argsort(self.efficiency[members], descending=True, stable=True)]
        running_cost = self.step_cost[members].cumsum(0)
        running_revenue = self.step_revenue[members].cumsum(0)
        spare_t = spare_t - cost_before
        n_fit = min(int(torch.searchsorted(running_cost, spare_t, right=True)), len(members) - 1)
        taken = self.bucket > binding_bucket
        taken[members[:n_fit]] = True
        if n_fit:
            cost_before += float(running_cost[n_fit - 1])
            revenue_before += float(running_revenue[n_fit - 1])
        binding = int(members[n_fit])
        return _GreedyCut(
            taken=taken,
            cost=self.base_cost + cost_before,
            revenue=self.base_revenue + revenue_before,
            binding=(
                float(self.efficiency[binding]),
                float(self.step_cost[binding]),
                float(self.step_revenue[binding]),
            ),
        )

    def lambda_at(self, total_budget: float) -> float:
        """The greedy's lambda* for ``total_budget``: inf below the base cost, 0 once all fit."""
        if total_budget < self.base_cost:
            return math.inf
        binding = self.cut(total_budget).binding
        return 0.0 if binding is None else binding[0]

    def treatment(self, taken: torch.Tensor) -> torch.Tensor:
        """Each user's arm after its taken steps (always a prefix of its hull)."""
        n_positions, n_users = self.arms.shape
        grid = torch.zeros((n_positions - 1) * n_users, dtype=torch.long, device=taken.device)
        grid[self.grid_index[taken]] = 1
        hull_position = grid.view(n_positions - 1, n_users).sum(dim=0)
        return self.arms.gather(0, hull_position.unsqueeze(0)).squeeze(0)

    @property
    def largest_step_cost(self) -> float:
        return float(self.step_cost.max()) if self.step_cost.numel() else 0.0


def _greedy_plan(revenue: torch.Tensor, cost: torch.Tensor) -> _GreedyPlan:
    """Upper concave hulls of every user's (cost, revenue) points, as greedy-ordered steps.

    Gift wrapping, vectorised over users: from the current hull point, the next one is the
    arm with the steepest positive slope among strictly costlier arms (ties to the nearest,
    so collinear arms become separate steps), which skips dominated arms. It starts at the
    user's cheapest arm (ties to the higher revenue) and runs to the most lucrative one.
    Slopes keep the input's precision (they only order the steps); the step increments and
    all sums are float64. A running minimum keeps each user's efficiencies non-increasing
    despite rounding, so the greedy takes every user's steps in hull order.
    """
    n_users, n_arms = revenue.shape
    successor, successor_slope = _hull_successors(revenue, cost)
    successor_slope = successor_slope.double()
    revenue, cost = revenue.double(), cost.double()
    current = _lexicographic_argmax(-cost, revenue)
    current_cost, current_revenue = _gather(cost, current), _gather(revenue, current)
    base_cost = float(current_cost.sum())
    base_revenue = float(current_revenue.sum())
    # Step-major (step, user) grids, so that flat index order is hull order within a user.
    arms = current.unsqueeze(0).repeat(n_arms, 1)
    step_cost = revenue.new_zeros(n_arms - 1, n_users)
    step_revenue = revenue.new_zeros(n_arms - 1, n_users)
    efficiency = revenue.new_full((n_arms - 1, n_users), -math.inf)
    ceiling = revenue.new_full((n_users,), math.inf)
    for step in range(n_arms - 1):
        slope = _gather(successor_slope, current)
        active = slope > 0
        if not bool(active.any()):
            break
        current = torch.where(active, _gather(successor, current), current)
        next_cost, next_revenue = _gather(cost, current), _gather(revenue, current)
        step_cost[step] = next_cost - current_cost
        step_revenue[step] = next_revenue - current_revenue
        ceiling = torch.minimum(ceiling, slope)
        efficiency[step] = torch.where(active, ceiling, -math.inf)
        arms[step + 1 :] = current
        current_cost, current_revenue = next_cost, next_revenue
    flat_efficiency = efficiency.reshape(-1)
    grid_index = (flat_efficiency > -math.inf).nonzero().squeeze(1)
    step_efficiency = flat_efficiency[grid_index]
    step_cost, step_revenue = (
        step_cost.reshape(-1)[grid_index],
        step_revenue.reshape(-1)[grid_index],
    )
    bucket, n_buckets = _efficiency_buckets(step_efficiency)
    # Totals per bucket, accumulated from the most efficient bucket down.
    cost_from_top = torch.bincount(bucket, step_cost, minlength=n_buckets).flip(0).cumsum(0)
    revenue_from_top = torch.bincount(bucket, step_revenue, minlength=n_buckets).flip(0).cumsum(0)
    return _GreedyPlan(
        arms=arms,
        grid_index=grid_index,
        efficiency=step_efficiency,
        step_cost=step_cost,
        step_revenue=step_revenue,
        bucket=bucket,
        cost_from_top=cost_from_top,
        revenue_from_top=revenue_from_top,
        base_cost=base_cost,
        base_revenue=base_revenue,
    )


def _hull_successors(
    revenue: torch.Tensor, cost: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every user and arm a: the next hull arm after a, and the slope of that edge.

    The next arm is the steepest among strictly costlier arms (ties to the nearest);
    a slope <= 0 means a ends the hull. All M x M pairs at once, in blocks of users so the
    (block, M, M) temporaries stay small. Arms are first sorted by cost so that the argmax,
    which keeps the first of tied maxima, picks the nearest arm without another pass.
    """
    successors, slopes = [], []
    for first in range(0, revenue.shape[0], _HULL_BLOCK):
        block_cost, by_cost = cost[first : first + _HULL_BLOCK].sort(dim=1, stable=True)
        block_revenue = revenue[first : first + _HULL_BLOCK].gather(1, by_cost)
        # [i, a, b]: from the a-th to the b-th cheapest arm of user i.
        extra_cost = block_cost.unsqueeze(1) - block_cost.unsqueeze(2)
        slope = block_revenue.unsqueeze(1) - block_revenue.unsqueeze(2)
        slope.div_(extra_cost).masked_fill_(extra_cost <= 0, -math.inf)
        steepest, nearest = slope.max(dim=2)
        # Back from cost rank to arm index, for both the arm and the arm it leads to.
        successors.append(
            torch.empty_like(by_cost).scatter_(1, by_cost, by_cost.gather(1, nearest))
        )
        slopes.append(torch.empty_like(steepest).scatter_(1, by_cost, steepest))
    return torch.cat(successors), torch.cat(slopes)


def _efficiency_buckets(efficiency: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Bucket index per step between evenly spaced order statistics of a strided subsample.

    About ``_BUCKETS`` buckets of roughly equal counts (ties excepted); the index grows with
    efficiency, so equal efficiencies share a bucket and per-user order is kept.
    """
    n_samples = min(_BUCKETS, efficiency.shape[0])
    picks = torch.linspace(0, efficiency.shape[0] - 1, n_samples, device=efficiency.device)
    boundaries = efficiency[picks.long()].sort().values
    return torch.searchsorted(boundaries, efficiency), n_samples + 1


@dataclass(frozen=True)
class _PartialSolution:
    """The exact solution for some users, in totals (not means) so parts can be added up."""

    treatment: torch.Tensor
    lam: float
    cost: float
    revenue: float
    lp_revenue: float
    status: str


def _solve_plan(plan: _GreedyPlan, total_budget: float) -> _PartialSolution | None:
    """Run the LP greedy on ``plan``; None when even the cheapest arms overspend."""
    if total_budget < plan.base_cost:
        return None
    cut = plan.cut(total_budget)
    if cut.binding is None:
        lam, lp_revenue, status = 0.0, cut.revenue, STATUS_SLACK
    else:
        lam, binding_cost, binding_revenue = cut.binding
        lp_revenue = cut.revenue + (total_budget - cut.cost) / binding_cost * binding_revenue
        status = STATUS_OK
    return _PartialSolution(
        treatment=plan.treatment(cut.taken),
        lam=lam,
        cost=cut.cost,
        revenue=cut.revenue,
        lp_revenue=lp_revenue,
        status=status,
    )


def _result(
    solution: _PartialSolution, revenue: torch.Tensor, cost: torch.Tensor
) -> AllocationResult:
    """Package a whole-population solution; the integral totals are re-summed from the arms."""
    n = revenue.shape[0]
    return AllocationResult(
        treatment=solution.treatment,
        lam=solution.lam,
        mean_revenue=float(_gather(revenue, solution.treatment).sum(dtype=torch.float64)) / n,
        mean_cost=float(_gather(cost, solution.treatment).sum(dtype=torch.float64)) / n,
        lp_value=solution.lp_revenue / n,
        status=solution.status,
    )


def _solve_exact_direct(
    revenue: torch.Tensor, cost: torch.Tensor, total_budget: float
) -> AllocationResult:
    solution = _solve_plan(_greedy_plan(revenue, cost), total_budget)
    if solution is None:
        return _all_control(revenue, cost)
    return _result(solution, revenue, cost)


@dataclass(frozen=True)
class _LagrangianPass:
    """Every user's Lagrangian arm at one lambda, with its cost and revenue."""

    lam: float
    treatment: torch.Tensor
    arm_cost: torch.Tensor
    arm_revenue: torch.Tensor
    total_cost: float


def _lagrangian_pass(revenue: torch.Tensor, cost: torch.Tensor, lam: float) -> _LagrangianPass:
    """One pass over all users; lam = 0 and lam = inf break ties towards the cheaper and the
    more lucrative arm respectively, matching the limits of the Lagrangian policy. Blocks of
    users bound the (block, M) scores' scratch, which would otherwise rival the inputs."""
    treatment = torch.empty(revenue.shape[0], dtype=torch.long, device=revenue.device)
    for first in range(0, revenue.shape[0], _PASS_BLOCK):
        rows = slice(first, first + _PASS_BLOCK)
        if lam == 0.0:
            treatment[rows] = _lexicographic_argmax(revenue[rows], -cost[rows])
        elif lam == math.inf:
            treatment[rows] = _lexicographic_argmax(-cost[rows], revenue[rows])
        else:
            treatment[rows] = lagrangian_choice(revenue[rows], cost[rows], lam)
    arm_cost = _gather(cost, treatment)
    return _LagrangianPass(
        lam=lam,
        treatment=treatment,
        arm_cost=arm_cost,
        arm_revenue=_gather(revenue, treatment),
        total_cost=float(arm_cost.sum(dtype=torch.float64)),
    )


def _solve_exact_bracketed(
    revenue: torch.Tensor, cost: torch.Tensor, total_budget: float, sample_size: int, seed: int
) -> AllocationResult:
    """Exact LP solution for large N: bracket lambda* from a sample, solve the rest exactly.

    A user whose Lagrangian arm is the same at both ends of a bracket [lo, hi] keeps that arm
    for every lambda in between (the scores are linear in lambda), so if lambda* lies in the
    bracket, fixing such users and solving the LP over the others with the remaining budget
    is optimal. The bracket holds lambda* when the policy at hi fits the budget and the policy
    at lo does not; a side that misses is widened (its pass becomes the other side's bound).
    """
    n_users = revenue.shape[0]
    generator = torch.Generator(device=revenue.device).manual_seed(seed)
    rows = torch.randint(n_users, (sample_size,), generator=generator, device=revenue.device)
    sample = _greedy_plan(revenue[rows], cost[rows])
    sample_budget = total_budget * sample_size / n_users
    sample_solution = _solve_plan(sample, max(sample_budget, sample.base_cost))
    assert sample_solution is not None
    spread = float(_gather(cost[rows], sample_solution.treatment).double().std())
    margin = max(_BRACKET_Z * spread * math.sqrt(sample_size), sample.largest_step_cost)

    def bound(side: float, widening: float) -> float:
        """Sample lambda* for a budget ``widening`` margins above (side 1) or below (-1)."""
        if widening > _BRACKET_MAX_WIDENING:
            return 0.0 if side > 0 else math.inf
        return sample.lambda_at(sample_budget + side * widening * margin)

    high = _lagrangian_pass(revenue, cost, bound(-1.0, 1.0))
    low: _LagrangianPass | None = None
    widening = 1.0
    while high.total_cost > total_budget:
        if high.lam == math.inf:
            return _all_control(revenue, cost)
        low = high
        while bound(-1.0, widening) <= low.lam:
            widening *= _BRACKET_GROWTH
        high = _lagrangian_pass(revenue, cost, bound(-1.0, widening))
    widening = 1.0
    while low is None:
        lam = bound(1.0, widening)
        candidate = _lagrangian_pass(revenue, cost, lam) if lam < high.lam else high
        if candidate.total_cost > total_budget:
            low = candidate
        elif candidate.lam == 0.0:
            return _result(_slack_solution(candidate), revenue, cost)
        else:
            high = candidate
            while bound(1.0, widening) >= high.lam:
                widening *= _BRACKET_GROWTH
    undecided = (low.treatment != high.treatment).nonzero().squeeze(1)
    fixed_cost = high.total_cost - float(high.arm_cost[undecided].sum(dtype=torch.float64))
    fixed_revenue = float(high.arm_revenue.sum(dtype=torch.float64)) - float(
        high.arm_revenue[undecided].sum(dtype=torch.float64)
    )
    rest = _solve_plan(_greedy_plan(revenue[undecided], cost[undecided]), total_budget - fixed_cost)
    assert rest is not None, "the policy at the bracket's upper end fits the budget"
    treatment = high.treatment.clone()
    treatment[undecided] = rest.treatment
    solution = _PartialSolution(
        treatment=treatment,
        lam=min(max(rest.lam, low.lam), high.lam),
        cost=fixed_cost + rest.cost,
        revenue=fixed_revenue + rest.revenue,
        lp_revenue=fixed_revenue + rest.lp_revenue,
        status=STATUS_OK,
    )
    return _result(solution, revenue, cost)


def _slack_solution(unconstrained: _LagrangianPass) -> _PartialSolution:
    revenue = float(unconstrained.arm_revenue.sum(dtype=torch.float64))
    return _PartialSolution(
        treatment=unconstrained.treatment,
        lam=0.0,
        cost=unconstrained.total_cost,
        revenue=revenue,
        lp_revenue=revenue,
        status=STATUS_SLACK,
    )


# ----------------------------------------------------------------------------- bisection


def _solve_bisection(
    revenue: torch.Tensor, cost: torch.Tensor, total_budget: float, steps: int
) -> AllocationResult:
    """Smallest lambda (to ``steps`` halvings) whose Lagrangian policy fits the budget.

    An upper end is found by doubling from 1 (a few synchronising passes); the halvings then
    stay on the device, updating the bracket with ``torch.where`` instead of Python branches.
    """
    if float(cost.min(dim=1).values.sum(dtype=torch.float64)) > total_budget:
        return _all_control(revenue, cost)
    unconstrained = _lagrangian_pass(revenue, cost, 0.0)
    if unconstrained.total_cost <= total_budget:
        slack = _result(_slack_solution(unconstrained), revenue, cost)
        return replace(slack, lp_value=None)
    low, high = 0.0, 1.0
    while _lagrangian_pass(revenue, cost, high).total_cost > total_budget:
        if high > torch.finfo(revenue.dtype).max / 4:
            high = math.inf
            break
        low, high = high, 2.0 * high
    if high < math.inf:
        low_t = torch.tensor(low, dtype=torch.float64, device=revenue.device)
        high_t = torch.tensor(high, dtype=torch.float64, device=revenue.device)
        for _ in range(steps):
            middle = (low_t + high_t) / 2
            spent = _gather(cost, lagrangian_choice(revenue, cost, middle)).sum(dtype=torch.float64)
            fits = spent <= total_budget
            high_t = torch.where(fits, middle, high_t)
            low_t = torch.where(fits, low_t, middle)
        high = float(high_t)
    final = _lagrangian_pass(revenue, cost, high)
    n = revenue.shape[0]
    return AllocationResult(
        treatment=final.treatment,
        lam=high,
        mean_revenue=float(final.arm_revenue.sum(dtype=torch.float64)) / n,
        mean_cost=final.total_cost / n,
        lp_value=None,
        status=STATUS_OK,
    )
