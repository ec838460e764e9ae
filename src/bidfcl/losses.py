"""Training losses: factual prediction error and the decision-focused surrogates.

All functions are pure, vectorised over users (and over the lambda grid for the dual
variants), and follow the dtype and device of the predictions. Shapes: predictions
``revenue_hat``/``cost_hat`` are (N, M); ``treatment`` (int), ``revenue``, ``cost`` and
``propensity`` are (N,) logged values. Every decision loss is the negative of a surrogate
of the inverse-propensity-weighted (IPW) policy value

    V(pi) = (1/N) sum_i 1[pi(x_i) = t_i] w_i,   w_i = r_i / p(t_i)

of the Lagrangian policy pi(x_i) = argmax_j a_ij with scores a_ij = r_hat_ij - lam c_hat_ij,
so minimising a loss raises the estimated revenue of the budgeted allocation. PPL also takes
the doubly robust estimate of V, given a baseline outcome model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def factual_mse(
    revenue_hat: torch.Tensor,
    cost_hat: torch.Tensor,
    treatment: torch.Tensor,
    revenue: torch.Tensor,
    cost: torch.Tensor,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-arm weighted squared error of the logged arm's predictions (DFCL's prediction loss).

    With e_i = (r_hat_{i,t_i} - r_i)^2 + (c_hat_{i,t_i} - c_i)^2 and weights s_i (1 if
    none), each arm j gets E_j = sum_{t_i=j} s_i e_i / sum_{t_i=j} s_i, and the loss is the
    plain mean of E_j over the arms present in the batch (total weight > 0). Averaging within
    arms first stops a large control group from drowning the small treated arms.
    """
    n_arms = revenue_hat.shape[1]
    arm = treatment.to(revenue_hat.device).long()
    idx = arm.unsqueeze(1)
    like = revenue_hat
    error = (revenue_hat.gather(1, idx).squeeze(1) - _as(revenue, like)) ** 2 + (
        cost_hat.gather(1, idx).squeeze(1) - _as(cost, like)
    ) ** 2
    weight = torch.ones_like(error) if sample_weight is None else _as(sample_weight, like)
    arm_error = torch.zeros(n_arms, dtype=like.dtype, device=like.device)
    arm_weight = torch.zeros_like(arm_error)
    arm_error = arm_error.index_add(0, arm, weight * error)
    arm_weight = arm_weight.index_add(0, arm, weight)
    present = arm_weight > 0
    return (arm_error[present] / arm_weight[present]).mean()


def ppl_loss(
    revenue_hat: torch.Tensor,
    cost_hat: torch.Tensor,
    treatment: torch.Tensor,
    revenue: torch.Tensor,
    propensity: torch.Tensor,
    lam: float | torch.Tensor,
    tau: float,
    baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    """Primal policy learning: -mean_i w_i softmax_j(a_ij / tau)[t_i] at multiplier ``lam``.

    The softmax replaces the argmax indicator of V; ``tau`` is the maximum-entropy
    temperature (smaller = closer to the hard policy, larger = smoother gradients).
    With ``baseline`` (N, M) revenue predictions from a model that never saw these rows, the
    IPW reward becomes the doubly robust one (:func:`doubly_robust_rewards`): the same
    expectation on randomized rows, with less variance the better the baseline.
    """
    scores = lagrangian_scores(revenue_hat, cost_hat, lam)
    if baseline is None:
        return -_softmax_value(scores, treatment, _ipw(revenue, propensity, scores), tau).mean()
    rewards = doubly_robust_rewards(treatment, revenue, propensity, _as(baseline, scores))
    return -(torch.softmax(scores / tau, dim=-1) * rewards).sum(dim=-1).mean()


def doubly_robust_rewards(
    treatment: torch.Tensor,
    revenue: torch.Tensor,
    propensity: torch.Tensor,
    baseline: torch.Tensor,
) -> torch.Tensor:
    """(N, M) rewards mu_ij + 1[t_i = j] (r_i - mu_ij) / p_i: every arm gets the baseline's
    prediction, the logged arm its IPW-weighted residual on top. The residual has mean zero
    over the randomization for any baseline fixed before these rows were drawn."""
    logged = F.one_hot(treatment.to(baseline.device).long(), baseline.shape[-1])
    residual = (_as(revenue, baseline).unsqueeze(-1) - baseline) / _as(
        propensity, baseline
    ).unsqueeze(-1)
    return baseline + logged.to(baseline.dtype) * residual


def pifd_loss(
    revenue_hat: torch.Tensor,
    cost_hat: torch.Tensor,
    treatment: torch.Tensor,
    revenue: torch.Tensor,
    propensity: torch.Tensor,
    lam: float | torch.Tensor,
    h: float,
) -> torch.Tensor:
    """Primal improved finite difference: -(1/N) sum_ij stopgrad(g_ij - mean_k g_ik) a_ij.

    Its gradient with respect to a_ij is the finite-difference slope of V (see
    :func:`pifd_slopes`), centred per user, pushed into the network through the scores.
    """
    scores = lagrangian_scores(revenue_hat, cost_hat, lam)
    slopes = pifd_slopes(scores, treatment, _ipw(revenue, propensity, scores), h)
    return _push_slopes(slopes, scores)


def pifd_slopes(
    scores: torch.Tensor, treatment: torch.Tensor, reward_ipw: torch.Tensor, h: float
) -> torch.Tensor:
    """Finite-difference slope g_ij of each user's IPW contribution w.r.t. each score.

    ``scores`` is (..., M); ``treatment`` and ``reward_ipw`` (w) broadcast to (...). With
    the policy's arm k = argmax_j a_ij (ties to the lowest index) and logged arm t:
    - k = t (the user earns w): g_ij = -w / d with d = a_it - a_ij for j != t (raising
      a_ij by d flips the choice to j); g_it = +w / d with d = a_it - max_{j!=t} a_ij;
    - k != t (the user earns 0): d = a_ik - a_it; g_it = +w / d, g_ik = -w / d, others 0.
    Every d is floored at ``h`` so slopes stay bounded (at most |w| / h) on ties. Slopes are
    constants (computed on detached scores and weights) that the losses push back. The rules
    are exact flip distances except g_ik for M > 2 when an arm other than t sits between
    a_ik and a_it: lowering a_ik then hands the user to that arm, not to t.
    """
    scores = scores.detach()
    n_arms = scores.shape[-1]
    logged = treatment.to(scores.device).long().expand(scores.shape[:-1]).unsqueeze(-1)
    w = reward_ipw.detach().to(scores.device, scores.dtype).expand(scores.shape[:-1]).unsqueeze(-1)
    arms = torch.arange(n_arms, device=scores.device)
    is_logged = arms == logged
    chosen = scores.argmax(dim=-1, keepdim=True)
    is_chosen = arms == chosen
    score_logged = scores.gather(-1, logged)
    best_rival = scores.masked_fill(is_logged, float("-inf")).amax(dim=-1, keepdim=True)

    keep_distance = torch.where(is_logged, score_logged - best_rival, score_logged - scores)
    slope_if_kept = torch.where(is_logged, w, -w) / keep_distance.clamp_min(h)

    gain_distance = (scores.gather(-1, chosen) - score_logged).clamp_min(h)
    slope_if_missed = (is_logged.to(scores.dtype) - is_chosen.to(scores.dtype)) * w / gain_distance

    return torch.where(chosen == logged, slope_if_kept, slope_if_missed)


def dual_pl_loss(
    revenue_hat: torch.Tensor,
    cost_hat: torch.Tensor,
    treatment: torch.Tensor,
    revenue: torch.Tensor,
    cost: torch.Tensor,
    propensity: torch.Tensor,
    lams: torch.Tensor,
) -> torch.Tensor:
    """DFCL's dual policy learning: the PPL shape with tau = 1 and Lagrangian weights.

    For each lambda of the grid the weight is w_i = (r_i - lambda c_i) / p(t_i) (the IPW
    estimate of the user's Lagrangian dual term); the loss is averaged over the grid, so
    its scale does not depend on how many lambdas the grid holds.
    """
    return dual_mer_loss(revenue_hat, cost_hat, treatment, revenue, cost, propensity, lams, 1.0)


def dual_mer_loss(
    revenue_hat: torch.Tensor,
    cost_hat: torch.Tensor,
    treatment: torch.Tensor,
    revenue: torch.Tensor,
    cost: torch.Tensor,
    propensity: torch.Tensor,
    lams: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """DFCL's maximum-entropy-regularised dual loss: softmax(a / tau) policies over the grid.

    softmax(a / tau) is the exact maximiser of sum_j z_j a_j + tau * entropy(z), hence the
    name; weights and grid averaging as in :func:`dual_pl_loss`.
    """
    scores, weights = _grid(revenue_hat, cost_hat, revenue, cost, propensity, lams)
    return -_softmax_value(scores, treatment, weights, tau).mean()


def dual_ifd_loss(
    revenue_hat: torch.Tensor,
    cost_hat: torch.Tensor,
    treatment: torch.Tensor,
    revenue: torch.Tensor,
    cost: torch.Tensor,
    propensity: torch.Tensor,
    lams: torch.Tensor,
    h: float,
) -> torch.Tensor:
    """DFCL's improved finite difference: the PIFD slopes with Lagrangian weights per lambda.

    A negative weight (cost outweighs revenue at that lambda) flips the slopes' sign, so
    the network is pushed away from arms that lose money at that price of budget.
    """
    scores, weights = _grid(revenue_hat, cost_hat, revenue, cost, propensity, lams)
    return _push_slopes(pifd_slopes(scores, treatment, weights, h), scores)


def lagrangian_scores(
    revenue_hat: torch.Tensor, cost_hat: torch.Tensor, lam: float | torch.Tensor
) -> torch.Tensor:
    """a_ij = r_hat_ij - lam c_hat_ij; the Lagrangian policy picks the row-wise argmax."""
    return revenue_hat - _as(torch.as_tensor(lam), revenue_hat) * cost_hat


def _grid(
    revenue_hat: torch.Tensor,
    cost_hat: torch.Tensor,
    revenue: torch.Tensor,
    cost: torch.Tensor,
    propensity: torch.Tensor,
    lams: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (L, N, M) and IPW Lagrangian weights (L, N) for every lambda of the grid."""
    grid = _as(torch.as_tensor(lams), revenue_hat).reshape(-1, 1)
    scores = revenue_hat.unsqueeze(0) - grid.unsqueeze(-1) * cost_hat.unsqueeze(0)
    weights = (_as(revenue, scores) - grid * _as(cost, scores)) / _as(propensity, scores)
    return scores, weights


def _push_slopes(slopes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """-(1/N) sum_ij stopgrad(g_ij - mean_k g_ik) a_ij: the slopes, centred per user.

    The argmax policy ignores a common shift of a user's scores, so the part of the slopes
    along that shift carries no decision information; left in, it moves all of a user's
    scores together and (through a = r - lam c) drags the predicted costs up until the
    budget cannot be met (measured: benchmarks/methods.py, dfcl-pifd deployed at lambda =
    inf after long training). Centring removes exactly that part.
    """
    centred = slopes - slopes.mean(dim=-1, keepdim=True)
    return -(centred * scores).sum(dim=-1).mean()


def _softmax_value(
    scores: torch.Tensor, treatment: torch.Tensor, weight: torch.Tensor, tau: float
) -> torch.Tensor:
    """w_i * softmax_j(a_ij / tau)[t_i] per user (any leading grid dims)."""
    logged = treatment.to(scores.device).long().expand(scores.shape[:-1]).unsqueeze(-1)
    prob = torch.softmax(scores / tau, dim=-1).gather(-1, logged).squeeze(-1)
    return weight * prob


def _ipw(revenue: torch.Tensor, propensity: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return _as(revenue, like) / _as(propensity, like)


def _as(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.to(device=like.device, dtype=like.dtype)
