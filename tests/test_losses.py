"""Prediction and decision-focused losses: values, gradient directions, finite differences."""

from __future__ import annotations

import pytest
import torch

from bidfcl.contract import LoggedData
from bidfcl.decision import DecisionSettings, pifd_decision
from bidfcl.losses import (
    doubly_robust_rewards,
    dual_ifd_loss,
    dual_mer_loss,
    dual_pl_loss,
    factual_mse,
    lagrangian_scores,
    pifd_loss,
    pifd_slopes,
    ppl_loss,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def ipw_contributions(
    scores: torch.Tensor, treatment: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """Each user's term of V: w_i if the argmax policy matches the logged arm, else 0."""
    return (scores.argmax(dim=1) == treatment).to(w.dtype) * w


def leaf(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_factual_mse_averages_within_arms_then_over_arms() -> None:
    revenue_hat = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    cost_hat = torch.tensor([[0.0, 1.0], [0.5, 1.5], [1.0, 2.0]])
    treatment = torch.tensor([0, 0, 1])
    revenue = torch.tensor([2.0, 3.0, 3.0])
    cost = torch.tensor([0.0, 0.0, 1.0])
    # errors: user0 (1-2)^2+0 = 1, user1 0+0.25 = 0.25, user2 (6-3)^2+(2-1)^2 = 10
    loss = factual_mse(revenue_hat, cost_hat, treatment, revenue, cost)
    assert loss.item() == pytest.approx(((1 + 0.25) / 2 + 10) / 2)

    weighted = factual_mse(
        revenue_hat, cost_hat, treatment, revenue, cost, torch.tensor([3.0, 1.0, 7.0])
    )
    assert weighted.item() == pytest.approx(((3 * 1 + 0.25) / 4 + 10) / 2)


def test_factual_mse_skips_arms_absent_from_the_batch() -> None:
    revenue_hat = torch.tensor([[1.0, 9.0, 9.0], [2.0, 9.0, 9.0]])
    loss = factual_mse(
        revenue_hat,
        torch.zeros(2, 3),
        torch.tensor([0, 0]),
        torch.tensor([0.0, 0.0]),
        torch.tensor([0.0, 0.0]),
    )
    assert loss.item() == pytest.approx((1 + 4) / 2)


def two_users() -> dict[str, torch.Tensor]:
    """Same features, arm 1 earns 10 (IPW 20) for the user who got it, arm 0 earns 2 (IPW 4)."""
    return {
        "treatment": torch.tensor([1, 0]),
        "revenue": torch.tensor([10.0, 2.0], dtype=torch.float64),
        "propensity": torch.tensor([0.5, 0.5], dtype=torch.float64),
    }


def test_ppl_raising_the_better_arm_raises_the_surrogate_value() -> None:
    data = two_users()
    cost_hat = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    revenue_hat = leaf([[1.0, 1.0], [1.0, 1.0]])
    loss = ppl_loss(revenue_hat, cost_hat, lam=0.5, tau=0.5, **data)
    loss.backward()

    raised = revenue_hat.detach().clone()
    raised[:, 1] += 0.1
    assert ppl_loss(raised, cost_hat, lam=0.5, tau=0.5, **data) < loss
    grad = revenue_hat.grad
    assert grad[0, 1] < 0 < grad[0, 0]  # user who earned on arm 1: push arm 1 up
    assert grad[1, 0] < 0 < grad[1, 1]  # user who earned on arm 0: push arm 0 up
    assert grad[:, 1].sum() < 0  # together: arm 1 earns more, so its score goes up


def test_ppl_pushes_cost_down_on_the_arm_that_earned() -> None:
    cost_hat = leaf([[0.5, 0.5], [0.5, 0.5]])
    revenue_hat = torch.ones(2, 2, dtype=torch.float64)
    ppl_loss(revenue_hat, cost_hat, lam=2.0, tau=1.0, **two_users()).backward()
    assert cost_hat.grad[0, 1] > 0 > cost_hat.grad[0, 0]


def test_ppl_matches_its_formula() -> None:
    data = two_users()
    revenue_hat = torch.tensor([[1.0, 2.0], [3.0, 1.0]], dtype=torch.float64)
    cost_hat = torch.tensor([[0.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    scores = revenue_hat - 0.25 * cost_hat
    prob = torch.softmax(scores / 0.7, dim=1)
    expected = -(20.0 * prob[0, 1] + 4.0 * prob[1, 0]) / 2
    assert ppl_loss(revenue_hat, cost_hat, lam=0.25, tau=0.7, **data).item() == pytest.approx(
        expected.item()
    )


def test_doubly_robust_ppl_with_a_zero_baseline_is_the_ipw_ppl() -> None:
    data = two_users()
    revenue_hat = torch.tensor([[1.0, 2.0], [3.0, 1.0]], dtype=torch.float64)
    cost_hat = torch.tensor([[0.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    ipw = ppl_loss(revenue_hat, cost_hat, lam=0.25, tau=0.7, **data)
    dr = ppl_loss(revenue_hat, cost_hat, lam=0.25, tau=0.7, baseline=torch.zeros(2, 2), **data)
    assert dr.item() == pytest.approx(ipw.item())


def test_doubly_robust_ppl_has_the_ipw_expectation_over_the_randomization() -> None:
    """Averaged exactly over every arm a randomized trial could have logged (each with its
    propensity), the DR and IPW surrogates agree for any baseline; per draw they differ."""
    generator = torch.Generator().manual_seed(0)
    n_users, n_arms = 6, 3
    revenue_hat = torch.randn(n_users, n_arms, generator=generator, dtype=torch.float64)
    cost_hat = torch.rand(n_users, n_arms, generator=generator, dtype=torch.float64)
    outcomes = 5 * torch.rand(n_users, n_arms, generator=generator, dtype=torch.float64)
    baseline = outcomes + torch.randn(n_users, n_arms, generator=generator, dtype=torch.float64)
    propensity = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)

    def expected(with_baseline: torch.Tensor | None) -> float:
        total = 0.0
        for arm in range(n_arms):
            logged = torch.full((n_users,), arm)
            loss = ppl_loss(
                revenue_hat,
                cost_hat,
                logged,
                outcomes[:, arm],
                propensity[logged],
                lam=0.4,
                tau=0.5,
                baseline=with_baseline,
            )
            total += float(propensity[arm] * loss)
        return total

    assert expected(baseline) == pytest.approx(expected(None), rel=1e-12)
    one_draw = torch.tensor([0, 1, 2, 0, 1, 2])
    draw = {
        "treatment": one_draw,
        "revenue": outcomes.gather(1, one_draw[:, None]).squeeze(1),
        "propensity": propensity[one_draw],
    }
    assert ppl_loss(revenue_hat, cost_hat, lam=0.4, tau=0.5, baseline=baseline, **draw) != (
        pytest.approx(ppl_loss(revenue_hat, cost_hat, lam=0.4, tau=0.5, **draw).item())
    )


def test_doubly_robust_rewards_add_the_weighted_residual_on_the_logged_arm_only() -> None:
    baseline = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    rewards = doubly_robust_rewards(
        torch.tensor([2, 0]),
        torch.tensor([5.0, 2.0], dtype=torch.float64),
        torch.tensor([0.25, 0.5], dtype=torch.float64),
        baseline,
    )
    assert rewards.tolist() == [[1.0, 2.0, 3.0 + 2.0 / 0.25], [4.0 - 2.0 / 0.5, 5.0, 6.0]]


def test_only_ppl_takes_a_doubly_robust_baseline() -> None:
    rows = LoggedData(
        user_id=torch.arange(2),
        x=torch.zeros(2, 1),
        treatment=torch.tensor([1, 0]),
        revenue=torch.tensor([10.0, 2.0]),
        cost=torch.tensor([1.0, 0.0]),
        propensity=torch.tensor([0.5, 0.5]),
        n_treatments=2,
    )
    with pytest.raises(ValueError, match="PPL only, not pifd"):
        pifd_decision(
            torch.ones(2, 2), torch.ones(2, 2), rows, 0.5, DecisionSettings(), torch.ones(2, 2)
        )


def test_pifd_slopes_follow_the_rules_on_hand_cases() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.5], [1.0, 4.0, 2.0]], dtype=torch.float64)
    treatment = torch.tensor([0, 0])
    w = torch.tensor([2.0, 6.0], dtype=torch.float64)
    g = pifd_slopes(scores, treatment, w, h=1e-3)
    # user 0 is kept: rivals at distance 2 and 0.5, the runner-up at 0.5
    assert torch.allclose(g[0], torch.tensor([2 / 0.5, -2 / 2, -2 / 0.5], dtype=torch.float64))
    # user 1 is missed (arm 1 wins by 3): raise arm 0, lower arm 1, leave arm 2
    assert torch.allclose(g[1], torch.tensor([6 / 3, -6 / 3, 0.0], dtype=torch.float64))


def numerical_slopes(scores: torch.Tensor, treatment: torch.Tensor, w: torch.Tensor) -> tuple:
    """Change of each user's V term when a score crosses its flip distance by 1e-7.

    Returns (change, signed distance): the argmax arm is lowered below the runner-up, any
    other arm is raised above the argmax.
    """
    n, m = scores.shape
    top2 = scores.topk(2, dim=1).values
    base = ipw_contributions(scores, treatment, w)
    changes, distances = torch.zeros(n, m, dtype=w.dtype), torch.zeros(n, m, dtype=w.dtype)
    for j in range(m):
        is_best = scores.argmax(dim=1) == j
        distance = torch.where(is_best, -(top2[:, 0] - top2[:, 1]), top2[:, 0] - scores[:, j])
        moved = scores.clone()
        moved[:, j] += distance + torch.sign(distance) * 1e-7
        changes[:, j] = ipw_contributions(moved, treatment, w) - base
        distances[:, j] = distance
    return changes, distances


@pytest.mark.parametrize("n_arms", [2, 4])
def test_pifd_slopes_match_a_numerical_finite_difference(n_arms: int) -> None:
    gen = torch.Generator().manual_seed(3)
    n = 400
    scores = torch.randn(n, n_arms, generator=gen, dtype=torch.float64)
    treatment = torch.randint(0, n_arms, (n,), generator=gen)
    w = torch.rand(n, generator=gen, dtype=torch.float64) * 10
    g = pifd_slopes(scores, treatment, w, h=1e-9)
    change, distance = numerical_slopes(scores, treatment, w)

    # The one documented approximation: lowering a wrong winner hands the user to the
    # runner-up, which earns w only if the runner-up is the logged arm.
    chosen = scores.argmax(dim=1)
    runner_up = scores.topk(2, dim=1).indices[:, 1]
    approx = torch.zeros(n, n_arms, dtype=torch.bool)
    approx[torch.arange(n), chosen] = (chosen != treatment) & (runner_up != treatment)
    assert torch.allclose((g * distance)[~approx], change[~approx], atol=1e-9)
    if n_arms == 2:
        assert not approx.any()
    else:
        assert approx.any()
        users = approx.any(dim=1)
        gap_to_logged = scores.max(dim=1).values - scores.gather(1, treatment.unsqueeze(1))[:, 0]
        assert torch.allclose(g[approx], -(w / gap_to_logged)[users])


def test_pifd_gradient_is_the_frozen_slope_pushed_through_the_scores() -> None:
    revenue_hat = leaf([[3.0, 1.0, 2.0], [1.0, 4.0, 2.0]])
    cost_hat = leaf([[1.0, 1.0, 0.5], [0.5, 2.0, 0.5]])
    treatment = torch.tensor([0, 2])
    revenue = torch.tensor([4.0, 3.0], dtype=torch.float64)
    propensity = torch.tensor([0.25, 0.5], dtype=torch.float64)
    lam = 0.5
    loss = pifd_loss(revenue_hat, cost_hat, treatment, revenue, propensity, lam, h=0.01)
    loss.backward()
    scores = lagrangian_scores(revenue_hat, cost_hat, lam).detach()
    g = pifd_slopes(scores, treatment, revenue / propensity, h=0.01)
    centred = g - g.mean(dim=1, keepdim=True)
    assert torch.allclose(revenue_hat.grad, -centred / 2)
    assert torch.allclose(cost_hat.grad, lam * centred / 2)
    # a common shift of a user's scores does not change the policy, so the push has none
    assert torch.allclose(revenue_hat.grad.sum(dim=1), torch.zeros(2, dtype=torch.float64))
    # user 1 (logged arm 2, earned) is missed: its arm goes up, the winner (arm 1) goes down
    assert revenue_hat.grad[1, 2] < 0 < revenue_hat.grad[1, 1]
    # user 0 is kept: its arm is defended against the nearest rival
    assert revenue_hat.grad[0, 0] < 0 < revenue_hat.grad[0, 2]


def test_pifd_slopes_stay_bounded_on_ties() -> None:
    scores = torch.zeros(3, 3)
    g = pifd_slopes(scores, torch.tensor([0, 1, 2]), torch.tensor([1.0, 1.0, 1.0]), h=0.1)
    assert bool(torch.isfinite(g).all())
    assert g.abs().max().item() == pytest.approx(10.0)


def lagrangian_case() -> dict[str, torch.Tensor]:
    """User 0 got arm 1 cheaply (revenue 5, cost 1); user 1 got arm 1 dearly (1, cost 5)."""
    return {
        "treatment": torch.tensor([1, 1]),
        "revenue": torch.tensor([5.0, 1.0], dtype=torch.float64),
        "cost": torch.tensor([1.0, 5.0], dtype=torch.float64),
        "propensity": torch.tensor([0.5, 0.5], dtype=torch.float64),
        "lams": torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64),
    }


@pytest.mark.parametrize(
    ("loss_fn", "extra"),
    [(dual_pl_loss, {}), (dual_mer_loss, {"tau": 0.5}), (dual_ifd_loss, {"h": 1e-3})],
)
def test_dual_losses_push_towards_profitable_arms_and_away_from_costly_ones(
    loss_fn, extra: dict
) -> None:
    revenue_hat = leaf([[1.0, 0.9], [1.0, 1.1]])
    cost_hat = torch.tensor([[0.0, 0.2], [0.0, 0.2]], dtype=torch.float64)
    loss_fn(revenue_hat, cost_hat, **lagrangian_case(), **extra).backward()
    grad = revenue_hat.grad
    # r - lam c > 0 for user 0 at every lambda: its logged arm's score goes up
    assert grad[0, 1] < 0 < grad[0, 0]
    # r - lam c < 0 for user 1 at every lambda: its logged arm's score goes down
    assert grad[1, 1] > 0 > grad[1, 0]


def test_dual_pl_averages_the_ppl_shape_over_the_grid() -> None:
    case = lagrangian_case()
    revenue_hat = torch.tensor([[1.0, 2.0], [3.0, 1.0]], dtype=torch.float64)
    cost_hat = torch.tensor([[0.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    per_lambda = []
    for lam in case["lams"].tolist():
        lagrangian_revenue = case["revenue"] - lam * case["cost"]
        per_lambda.append(
            ppl_loss(
                revenue_hat,
                cost_hat,
                case["treatment"],
                lagrangian_revenue,
                case["propensity"],
                lam,
                tau=1.0,
            )
        )
    expected = torch.stack(per_lambda).mean()
    assert dual_pl_loss(revenue_hat, cost_hat, **case).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_losses_are_finite_on_ties_for_any_device_and_dtype(
    device: str, dtype: torch.dtype
) -> None:
    n, m = 6, 3
    revenue_hat = torch.ones(n, m, dtype=dtype, device=device, requires_grad=True)
    cost_hat = torch.ones(n, m, dtype=dtype, device=device, requires_grad=True)
    logged = {  # logged tensors stay float32 on the CPU: the losses move them
        "treatment": torch.arange(n) % m,
        "revenue": torch.rand(n) * 5,
        "propensity": torch.full((n,), 1 / m),
    }
    cost = torch.rand(n)
    lams = torch.tensor([0.0, 0.5, 1.0])
    losses = [
        factual_mse(revenue_hat, cost_hat, logged["treatment"], logged["revenue"], cost),
        ppl_loss(revenue_hat, cost_hat, **logged, lam=0.7, tau=0.1),
        pifd_loss(revenue_hat, cost_hat, **logged, lam=torch.tensor(0.7), h=1e-4),
        dual_pl_loss(revenue_hat, cost_hat, **logged, cost=cost, lams=lams),
        dual_mer_loss(revenue_hat, cost_hat, **logged, cost=cost, lams=lams, tau=0.1),
        dual_ifd_loss(revenue_hat, cost_hat, **logged, cost=cost, lams=lams, h=1e-4),
    ]
    for loss in losses:
        assert loss.dtype == dtype and loss.device.type == device
        assert bool(torch.isfinite(loss))
        grads = torch.autograd.grad(loss, [revenue_hat, cost_hat])
        assert all(bool(torch.isfinite(g).all()) for g in grads)
