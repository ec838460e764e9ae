"""Bi-DFCL: CG on Hessian-vector products, the implicit hypergradient against a closed-form
bilevel problem, and the bidfcl-* methods end to end."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from bidfcl.bilevel import (
    BilevelLearner,
    ObsContext,
    conjugate_gradient,
    implicit_hypergradient,
    unrolled_hypergradient,
    upper_level_split,
)
from bidfcl.contract import OBS, RCT_TRAIN, RCT_VAL, Dataset, LoggedData
from bidfcl.datamodule import ObsRctDataModule
from bidfcl.decision import ppl_decision
from bidfcl.methods import FIXED_GATES, train_model
from bidfcl.model import ModelConfig, UpliftModel
from bidfcl.simulate import SimulatorConfig, simulate
from bidfcl.train_config import TrainConfig

TINY = TrainConfig(
    max_epochs=2,
    warm_start_epochs=1,
    batch_size=256,
    decision_batch_size=512,
    hidden=(16, 8),
    bridge_hidden=(8,),
    bilevel_k=2,
    n_cg=5,
    bridge_warmup_epochs=0,
    num_threads=1,
)


def _spd_matrix(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(n, n, generator=generator, dtype=torch.float64)
    return factor @ factor.T + 0.5 * torch.eye(n, dtype=torch.float64)


def test_cg_solves_an_spd_system_to_tolerance_from_products_alone() -> None:
    matrix = _spd_matrix(30, seed=0)
    rhs = torch.linspace(-1.0, 2.0, 30, dtype=torch.float64)
    calls = []

    def matvec(vector: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return matrix @ vector

    result = conjugate_gradient(matvec, rhs, max_iter=200, tol=1e-10)

    exact = torch.linalg.solve(matrix, rhs)
    assert torch.linalg.norm(matrix @ result.solution - rhs) <= 1e-10 * torch.linalg.norm(rhs)
    assert torch.allclose(result.solution, exact, rtol=1e-6, atol=1e-8)
    assert result.relative_residual <= 1e-10
    assert result.iterations == len(calls) <= 200


def test_cg_stops_at_max_iter_and_at_negative_curvature() -> None:
    matrix = _spd_matrix(30, seed=1)
    rhs = torch.ones(30, dtype=torch.float64)
    capped = conjugate_gradient(lambda v: matrix @ v, rhs, max_iter=3, tol=1e-12)
    assert capped.iterations == 3 and capped.relative_residual > 1e-12

    indefinite = conjugate_gradient(lambda v: -v, rhs, max_iter=10, tol=1e-6)
    assert indefinite.iterations == 0
    assert torch.count_nonzero(indefinite.solution) == 0


class RidgeBilevel:
    """theta*(phi) = argmin ||X theta - y||^2 + sum_i exp(phi_i) theta_i^2 (closed form);
    upper loss ||X_val theta - y_val||^2."""

    def __init__(self, seed: int = 0, n: int = 40, p: int = 6) -> None:
        generator = torch.Generator().manual_seed(seed)
        kwargs = {"generator": generator, "dtype": torch.float64}
        truth = torch.randn(p, **kwargs)
        self.x, self.x_val = torch.randn(n, p, **kwargs), torch.randn(n, p, **kwargs)
        self.y = self.x @ truth + 0.5 * torch.randn(n, **kwargs)
        self.y_val = self.x_val @ truth + 0.5 * torch.randn(n, **kwargs)
        self.phi = 0.3 * torch.randn(p, **kwargs)

    def lower(self, theta: torch.Tensor, phi: list[torch.Tensor]) -> torch.Tensor:
        return (self.x @ theta - self.y).square().sum() + (phi[0].exp() * theta.square()).sum()

    def upper(self, theta: torch.Tensor) -> torch.Tensor:
        return (self.x_val @ theta - self.y_val).square().sum()

    def theta_star(self, phi: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.x.T @ self.x + torch.diag(phi.exp()), self.x.T @ self.y)

    def finite_difference(self, eps: float = 1e-6) -> torch.Tensor:
        steps = eps * torch.eye(self.phi.numel(), dtype=torch.float64)
        return torch.stack(
            [
                (
                    self.upper(self.theta_star(self.phi + s))
                    - self.upper(self.theta_star(self.phi - s))
                )
                / (2 * eps)
                for s in steps
            ]
        )


def test_implicit_hypergradient_matches_finite_differences_on_ridge() -> None:
    problem = RidgeBilevel()
    phi = problem.phi.clone().requires_grad_(True)
    theta = problem.theta_star(problem.phi)

    (grad,), cg = implicit_hypergradient(
        problem.lower, problem.upper, theta, [phi], n_cg=50, tol=1e-10, damping=0.0
    )

    reference = problem.finite_difference()
    assert cg.iterations > 0 and cg.relative_residual <= 1e-10
    assert torch.linalg.norm(grad - reference) / torch.linalg.norm(reference) < 1e-3


def test_gauss_newton_curvature_equals_the_hessian_for_a_linear_model() -> None:
    problem = RidgeBilevel(seed=1)
    phi = problem.phi.clone().requires_grad_(True)
    theta = problem.theta_star(problem.phi)

    def gauss_newton(t: torch.Tensor) -> torch.Tensor:
        prediction = problem.x @ t
        residual = prediction - prediction.detach()
        return residual.square().sum() + (problem.phi.exp() * t.square()).sum()

    kwargs = {"n_cg": 50, "tol": 1e-10, "damping": 0.0}
    (exact,), _ = implicit_hypergradient(problem.lower, problem.upper, theta, [phi], **kwargs)
    (approx,), cg = implicit_hypergradient(
        problem.lower, problem.upper, theta, [phi], curvature_loss=gauss_newton, **kwargs
    )

    assert cg.iterations > 0
    assert torch.allclose(approx, exact, rtol=1e-8, atol=1e-10)


def test_explicit_unrolled_hypergradient_points_the_same_way_on_ridge() -> None:
    problem = RidgeBilevel(seed=3)
    phi = problem.phi.clone().requires_grad_(True)
    theta = problem.theta_star(problem.phi)

    (implicit,), _ = implicit_hypergradient(
        problem.lower, problem.upper, theta, [phi], n_cg=50, tol=1e-10, damping=0.0
    )
    (explicit,) = unrolled_hypergradient(problem.lower, problem.upper, theta, [phi], lr=1e-3)

    cosine = torch.nn.functional.cosine_similarity(implicit, explicit, dim=0)
    assert cosine > 0
    assert torch.linalg.norm(problem.finite_difference() - implicit) < torch.linalg.norm(
        problem.finite_difference() - explicit
    )


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*deprecated")
def test_obs_rct_loader_pairs_every_obs_batch_with_cycled_rct_and_upper_batches(
    tiny: Dataset,
) -> None:
    split = upper_level_split(tiny, replace(TINY, upper_fraction=0.3))
    obs, rct = tiny.logged(OBS), split.lower.logged(RCT_TRAIN)
    data = ObsRctDataModule(obs, rct, split.upper, tiny.logged(RCT_VAL), 256, 128, seed=0)

    batches = [batch for batch, _, _ in data.train_dataloader()]

    assert len(batches) == math.ceil(obs.n_rows / 256)
    assert sum(b["obs"].n_rows for b in batches) == obs.n_rows
    rct_ids = torch.cat([b["rct"].user_id for b in batches])  # one pass, as many batches
    assert sorted(rct_ids.tolist()) == sorted(rct.user_id.tolist())
    upper_ids = torch.cat([data.upper_batch(b["upper"]).user_id for b in batches])
    assert len(upper_ids) > split.upper.n_rows  # cycled: fewer batches than OBS
    assert set(upper_ids.tolist()) == set(split.upper.user_id.tolist())


def test_the_upper_level_is_scored_on_rct_rows_the_teacher_never_saw(tiny: Dataset) -> None:
    config = replace(TINY, upper_fraction=0.3)
    split = upper_level_split(tiny, config)
    everything = set(tiny.table(RCT_TRAIN)["user_id"])
    lower = set(split.lower.table(RCT_TRAIN)["user_id"])
    upper = set(split.upper.user_id.tolist())

    assert lower.isdisjoint(upper) and lower | upper == everything
    assert len(upper) == round(0.3 * len(everything))
    assert torch.equal(upper_level_split(tiny, config).upper.user_id, split.upper.user_id)
    assert upper_level_split(tiny, replace(config, upper_fraction=0)).lower is tiny
    model = train_model(tiny, replace(config, method="bidfcl-ppl", fast_dev_run=True), False)
    assert model.metadata["bilevel"]["upper_rows"] == len(upper)
    assert model.metadata["teacher"]["n_train_rows"] == len(lower)


def test_a_tsm_obs_ft_teacher_is_pretrained_on_obs_and_fitted_on_the_lower_rct_rows(
    tiny: Dataset, tmp_path: Path
) -> None:
    config = replace(TINY, method="bidfcl-ppl", fast_dev_run=True, teacher="tsm-obs-ft")

    model = train_model(tiny, replace(config, checkpoint_dir=str(tmp_path)), progress=False)

    teacher = model.metadata["teacher"]
    assert teacher["method"] == "tsm-obs-ft"
    assert teacher["n_train_rows"] == len(upper_level_split(tiny, config).lower.table(RCT_TRAIN))
    # each phase of the chain checkpoints in its own folder: tsm-obs, then the Teacher
    assert {p.name for p in tmp_path.iterdir()} == {"tsm-obs", "tsm-obs-ft", "bidfcl-ppl"}


def test_a_tsm_both_teacher_pools_obs_with_the_lower_rct_rows_only(tiny: Dataset) -> None:
    config = replace(TINY, method="bidfcl-ppl", fast_dev_run=True, teacher="tsm-both")

    model = train_model(tiny, config, progress=False)

    teacher = model.metadata["teacher"]
    lower_rct = upper_level_split(tiny, config).lower.table(RCT_TRAIN)
    assert teacher["method"] == "tsm-both"
    assert teacher["n_train_rows"] == len(tiny.table(OBS)) + len(lower_rct)
    assert len(lower_rct) < len(tiny.table(RCT_TRAIN))  # the upper rows stay unseen


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("bidfcl-ppl", {}),
        ("bidfcl-pifd", {}),
        ("bidfcl-ppl", {"hypergradient": "explicit", "bridge": "ipw"}),
        ("bidfcl-ppl", {"bridge_inputs": "row"}),
        ("bidfcl-ppl", {"upper_estimator": "dr"}),
    ],
)
def test_bidfcl_fast_dev_run_takes_bridge_and_target_steps(
    tiny: Dataset, method: str, settings: dict[str, str]
) -> None:
    config = replace(TINY, method=method, fast_dev_run=True, **settings)

    model = train_model(tiny, config, progress=False)

    revenue_hat, cost_hat = model.predict(tiny.logged(RCT_VAL).x)
    assert revenue_hat.shape == cost_hat.shape == (len(tiny.table(RCT_VAL)), 5)
    assert torch.isfinite(revenue_hat).all() and torch.isfinite(cost_hat).all()
    meta = model.metadata
    assert meta["method"] == method and meta["teacher"]["method"] == config.teacher
    assert meta["bilevel"]["hypergradient_steps"] == 1
    assert meta["bilevel"]["helpful_share"] is None  # the audit is opt-in
    assert math.isfinite(meta["val_eom_history"][0]) and meta["history"][0]["lambda"] >= 0
    if config.hypergradient == "implicit":  # Gauss-Newton curvature: CG never stalls at once
        assert meta["bilevel"]["mean_cg_iterations"] > 0


def test_bidfcl_moves_the_target_away_from_the_teacher_and_repeats_exactly(
    tiny: Dataset,
) -> None:
    config = replace(TINY, method="bidfcl-pifd", max_epochs=1)
    teacher = train_model(tiny, replace(config, method="tsm-rct", max_epochs=1), progress=False)

    first = train_model(tiny, config, progress=False, warm_start=teacher)
    again = train_model(tiny, config, progress=False, warm_start=teacher)

    x = tiny.logged(RCT_VAL).x
    assert not torch.allclose(first.predict(x)[0], teacher.predict(x)[0])
    assert torch.equal(first.predict(x)[0], again.predict(x)[0])
    assert first.metadata["bilevel"]["hypergradient_steps"] == math.ceil(math.ceil(2000 / 256) / 2)


def test_bidfcl_keeps_the_epoch_by_the_upper_objective_alone(tiny: Dataset) -> None:
    """The validation loss that picks the epoch is the decision loss on rct_val (what the
    Bridge is tuned for), not decision + alpha * MSE as for a single-level decision method."""
    config = replace(TINY, method="bidfcl-ppl", max_epochs=2)
    model = train_model(tiny, config, progress=False)

    history = model.metadata["history"]
    assert all(epoch["val_loss"] == epoch["val_decision"] for epoch in history)
    assert all(epoch["val_mse"] > abs(epoch["val_decision"]) for epoch in history)
    assert model.metadata["best_val_loss"] == min(epoch["val_decision"] for epoch in history)


def test_arm_bridge_inputs_give_one_gate_per_arm_and_outcome_for_every_user(
    tiny: Dataset,
) -> None:
    config = replace(TINY, method="bidfcl-ppl", bridge_inputs="arm")
    model = UpliftModel.build(
        tiny.logged(OBS).x,
        tiny.meta.feature_columns,
        tiny.meta.treatment_names,
        config.model_config,
    )
    learner = BilevelLearner(model, ppl_decision, config, budget=1.0, lr=config.lr)
    with torch.no_grad():  # a Bridge that has learned something: gates away from 0.5
        for param in learner.bridge.parameters():
            param.normal_(0, 0.5)
    context = learner._context(tiny.logged(OBS), tiny.logged(RCT_TRAIN))

    gates = learner._gates(dict(learner.bridge.named_parameters()), context)

    assert gates.shape == (len(tiny.table(OBS)), 5, 2)
    assert torch.equal(gates, gates[:1].expand_as(gates))  # the same for every user
    assert gates[0].unique().numel() == 10  # but its own per arm and outcome


def test_bidfcl_fixed_freezes_the_gates_and_picks_one_on_rct_val(tiny: Dataset) -> None:
    config = replace(TINY, method="bidfcl-ppl", max_epochs=1)
    teacher = train_model(tiny, replace(config, method="tsm-rct", max_epochs=1), progress=False)
    frozen = train_model(tiny, replace(config, fixed_gate=0.5), progress=False, warm_start=teacher)
    fixed = train_model(tiny, replace(config, method="bidfcl-fixed"), False, warm_start=teacher)

    assert frozen.metadata["bilevel"]["gate_mean_per_epoch"] == [0.5]
    assert frozen.metadata["bilevel"]["hypergradient_steps"] == 0
    audit = replace(config, fixed_gate=0.5, audit_bridge_steps=True)
    audited = train_model(tiny, audit, progress=False, warm_start=teacher)
    assert audited.metadata["bilevel"]["helpful_share"] is None  # no Bridge step to judge
    chosen = fixed.metadata["fixed_gate"]
    scores = chosen["best_val_loss_by_gate"]
    assert set(scores) == set(FIXED_GATES)
    assert scores[chosen["chosen"]] == min(scores.values())  # select_by: loss


def test_learned_and_frozen_bridges_give_different_targets(tiny: Dataset) -> None:
    config = replace(TINY, method="bidfcl-ppl", max_epochs=2, bilevel_k=1)
    teacher = train_model(tiny, replace(config, method="tsm-rct", max_epochs=1), progress=False)
    learned = train_model(tiny, config, progress=False, warm_start=teacher)
    frozen = train_model(tiny, replace(config, fixed_gate=0.5), progress=False, warm_start=teacher)

    x = tiny.logged(RCT_VAL).x
    revenue_learned, revenue_frozen = learned.predict(x)[0], frozen.predict(x)[0]
    assert (revenue_learned - revenue_frozen).abs().max() > 1e-3 * revenue_frozen.abs().mean()


@pytest.mark.filterwarnings("ignore:.*self.trainer.* reference is not registered")
def test_the_lookahead_descends_the_lower_loss_on_revenue_scale_labels(tiny: Dataset) -> None:
    """The look-ahead is where theta*(phi) comes from: on the simulator's labels (gradients
    in the hundreds, the default network) every step must lower the lower loss. Plain SGD
    at the former default 1e-2 blows up here at its first step; in the simulator's regimes
    it diverged within five steps, and every hypergradient was taken at the wreck."""
    config = replace(TINY, method="bidfcl-ppl", hidden=TrainConfig().hidden)  # the default net
    teacher = train_model(tiny, replace(config, method="tsm-rct", max_epochs=5), progress=False)
    budget = tiny.meta.budget_or_default(None)
    learner = BilevelLearner(copy.deepcopy(teacher), ppl_decision, config, budget, config.lr)
    context = learner._context(tiny.logged(OBS), tiny.logged(RCT_TRAIN))
    _seed_target_adam(learner, context)
    gates = learner._gates(dict(learner.bridge.named_parameters()), context).detach()
    theta = torch.cat([p.detach().reshape(-1) for p in learner.net.parameters()])

    losses = []
    for _ in range(6):
        losses.append(float(learner._lower_loss(learner._unflatten(theta), gates, context)))
        theta = learner._lookahead(context, theta, 1)

    assert all(math.isfinite(loss) for loss in losses)
    assert all(after < before for before, after in itertools.pairwise(losses))


def test_implicit_hypergradient_falls_back_to_damping_without_positive_curvature() -> None:
    # L_lower = -||theta||^2 + phi . theta: H + I = -I, so CG finds no positive curvature.
    phi = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
    theta = torch.zeros(3, dtype=torch.float64)

    (grad,), cg = implicit_hypergradient(
        lambda t, p: -t.square().sum() + p[0].dot(t),
        lambda t: (t - target).square().sum(),
        theta,
        [phi],
        n_cg=10,
        tol=1e-8,
        damping=1.0,
    )

    # v = grad L_upper / damping = -2 target; d/dphi (grad_theta L_lower . v) = v.
    assert cg.iterations == 0
    assert torch.allclose(grad, 2 * target)


def _float64(rows: LoggedData) -> LoggedData:
    floats = ("x", "revenue", "cost", "propensity")
    return replace(rows, **{name: getattr(rows, name).double() for name in floats})


def _minimise(loss: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor) -> torch.Tensor:
    """A strict local minimum of ``loss`` to gradient norm ~1e-11: L-BFGS, then Newton."""
    theta = start.clone().requires_grad_(True)
    lbfgs = torch.optim.LBFGS([theta], max_iter=500, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        value = loss(theta)
        value.backward()
        return value

    lbfgs.step(closure)
    theta = theta.detach()
    for _ in range(100):
        grad = torch.func.grad(loss)(theta)
        if float(grad.norm()) < 1e-11:
            break
        step = torch.linalg.solve(torch.func.hessian(loss)(theta), grad)
        scale = 1.0
        while float(loss(theta - scale * step)) > float(loss(theta)) and scale > 1e-8:
            scale /= 2
        theta = theta - scale * step
    assert float(torch.func.grad(loss)(theta).norm()) < 1e-8
    return theta


def test_the_learners_hypergradient_matches_finite_differences_of_its_lower_problem() -> None:
    """The Bridge's gradient as the learner computes it (its real lower loss: gated OBS labels
    plus the lower RCT rows' MSE; the PPL loss on other RCT rows above; exact curvature, CG)
    against central
    differences of the upper loss at the re-solved lower optimum. ``cg_damping`` d makes the
    implicit solve exact for the lower loss plus (d/2)||theta - theta_0||^2, so that is the
    lower problem the differences re-solve (it also makes the optimum unique)."""
    torch.manual_seed(0)
    data = simulate(SimulatorConfig(n_obs=300, n_rct=400, seed=3))
    obs, rct_all = _float64(data.logged(OBS)), _float64(data.logged(RCT_TRAIN))
    rct_lower, rct = rct_all.rows(slice(0, 150)), rct_all.rows(slice(150, None))
    shape = ModelConfig(hidden=(4,), activation="tanh")
    model = UpliftModel.build(
        obs.x.float(), data.meta.feature_columns, data.meta.treatment_names, shape
    )
    model.net.double()
    model.scaler.double()
    config = TrainConfig(
        method="bidfcl-ppl",
        hidden=(4,),
        activation="tanh",
        bridge_hidden=(4,),
        bridge_inputs="row",
    )
    learner = BilevelLearner(model, ppl_decision, config, data.meta.budget_or_default(None), 1e-3)
    learner.bridge.double()
    learner.teacher.double()
    learner.anchor.double()
    with torch.no_grad():  # gates away from 0.5 and a Teacher that differs from the Target
        for param in learner.bridge.parameters():
            param.normal_(0, 0.3)
        for param in learner.teacher.parameters():
            param.add_(0.2 * torch.randn_like(param))
        for param in learner.anchor.parameters():
            param.add_(0.2 * torch.randn_like(param))
    learner.lam = 0.5
    context = learner._context(obs, rct_lower)
    x_rct = learner.scaler(rct.x)
    theta_0 = torch.cat([p.detach().reshape(-1) for p in learner.net.parameters()])
    damping = 0.1

    def lower(theta: torch.Tensor, phi: Sequence[torch.Tensor]) -> torch.Tensor:
        gates = learner._gates(dict(zip(learner.bridge_names, phi, strict=True)), context)
        return learner._lower_loss(learner._unflatten(theta), gates, context)

    def upper(theta: torch.Tensor) -> torch.Tensor:
        revenue, cost = functional_call(learner.net, learner._unflatten(theta), (x_rct,))
        return ppl_decision(revenue, cost, rct, learner.lam, config.decision_settings)

    def optimum(phi: Sequence[torch.Tensor], start: torch.Tensor) -> torch.Tensor:
        return _minimise(
            lambda t: lower(t, phi) + 0.5 * damping * (t - theta_0).square().sum(), start
        )

    phi = [p.detach().clone() for p in learner.bridge.parameters()]
    theta_star = optimum(phi, theta_0)
    grads, cg = implicit_hypergradient(
        lower, upper, theta_star, [p.clone().requires_grad_(True) for p in phi], 500, 1e-12, damping
    )
    direction = [torch.randn_like(p) for p in phi]
    analytic = float(sum((g * d).sum() for g, d in zip(grads, direction, strict=True)))
    eps = 1e-4
    moved = [
        float(
            upper(
                optimum(
                    [p + sign * eps * d for p, d in zip(phi, direction, strict=True)], theta_star
                )
            )
        )
        for sign in (1, -1)
    ]
    numeric = (moved[0] - moved[1]) / (2 * eps)
    assert cg.iterations > 10 and cg.relative_residual < 1e-10
    assert abs(analytic - numeric) <= 1e-3 * abs(numeric)
    # with a separate curvature loss (the learner's Gauss-Newton path) the mixed term is a
    # forward-mode directional derivative; on the same curvature it equals the double backward
    forward_mode, _ = implicit_hypergradient(
        lower,
        upper,
        theta_star,
        [p.clone().requires_grad_(True) for p in phi],
        500,
        1e-12,
        damping,
        curvature_loss=lambda theta: lower(theta, phi),
    )
    for exact, forward in zip(grads, forward_mode, strict=True):
        torch.testing.assert_close(forward, exact, rtol=1e-9, atol=1e-12)


def _segment_rows(n: int, seed: int, obs_bias: float) -> LoggedData:
    """Two arms; a coupon that pays +0.5 in segment 0 and costs -0.5 revenue in segment 1.
    ``obs_bias`` > 0: observational rows whose treated labels in segment 1 are inflated by
    it (the targeting bias) and whose propensities are unknown; otherwise an RCT at 0.5."""
    generator = torch.Generator().manual_seed(seed)
    segment = (torch.rand(n, generator=generator) < 0.5).float()
    x = torch.stack([segment, torch.randn(n, generator=generator)], dim=1)
    treated = (torch.rand(n, generator=generator) < 0.5).long()
    mean_revenue, mean_cost = _segment_means(x, obs_bias)
    noise = 0.1 * torch.randn(n, generator=generator)
    revenue = mean_revenue.gather(1, treated.unsqueeze(1)).squeeze(1) + noise
    cost = mean_cost.gather(1, treated.unsqueeze(1)).squeeze(1)
    propensity = torch.full((n,), math.nan if obs_bias > 0 else 0.5)
    return LoggedData(torch.arange(n), x, treated, revenue, cost, propensity, 2)


def _segment_means(x: torch.Tensor, bias: float) -> tuple[torch.Tensor, torch.Tensor]:
    segment = x[:, 0]
    uplift = torch.where(segment > 0, -0.5, 0.5) + bias * segment
    revenue = torch.stack([torch.ones_like(segment), 1 + uplift], dim=1)
    cost = torch.stack([torch.zeros_like(segment), torch.ones_like(segment)], dim=1)
    return revenue, cost


def _fit_means(model: UpliftModel, x: torch.Tensor, bias: float) -> None:
    revenue, cost = _segment_means(x, bias)
    optimiser = torch.optim.Adam(model.net.parameters(), lr=2e-2)
    for _ in range(400):
        optimiser.zero_grad()
        revenue_hat, cost_hat = model.forward(x)
        ((revenue_hat - revenue).square().mean() + (cost_hat - cost).square().mean()).backward()
        optimiser.step()


def _seed_target_adam(learner: BilevelLearner, context: ObsContext) -> None:
    """Give the Target's Adam the second moments of the lower loss's gradient on this batch
    without moving the Target, as a run's earlier Target steps would have: the look-ahead
    takes its step sizes from them."""
    target_optimizer = learner.configure_optimizers()[0]
    for group in target_optimizer.param_groups:
        group["lr"] = 0.0
    gates = learner._gates(dict(learner.bridge.named_parameters()), context)
    learner._lower_loss(dict(learner.net.named_parameters()), gates.detach(), context).backward()
    target_optimizer.step()
    target_optimizer.zero_grad()


@pytest.mark.filterwarnings("ignore:.*self.trainer.* reference is not registered")
@pytest.mark.parametrize("seed", [0, 1])
def test_the_bridge_moves_toward_the_teacher_where_the_obs_labels_are_biased(seed: int) -> None:
    """Segment 1's OBS labels overstate the coupon's revenue by 1.5; the Teacher is right
    everywhere and the Target learned the biased log. The upper level's gradient asks for
    more Teacher in segment 1's gates only, and a Bridge step along it lowers the held-out
    RCT decision loss and raises segment 1's gates."""
    torch.manual_seed(seed)
    obs = _segment_rows(2000, 1, obs_bias=1.5)
    rct_lower, upper = _segment_rows(1000, 2, 0.0), _segment_rows(2000, 3, 0.0)
    config = TrainConfig(
        method="bidfcl-ppl",
        hidden=(16,),
        bridge_hidden=(16,),
        bridge_inputs="row",  # gates that can tell the segments apart
        bilevel_k=10,
        lookahead_lr=0.01,
        cg_damping=0.1,
        cg_tol=1e-6,
        audit_bridge_steps=True,
    )
    target = UpliftModel.build(
        obs.x, ["segment", "noise"], ["control", "coupon"], config.model_config
    )
    teacher = copy.deepcopy(target)
    _fit_means(teacher, obs.x, bias=0.0)
    _fit_means(target, obs.x, bias=1.5)
    learner = BilevelLearner(target, ppl_decision, config, budget=0.5, lr=1e-3)
    learner.teacher.load_state_dict(teacher.net.state_dict())
    learner.lam = 0.25  # treat where the uplift beats 0.25 per unit of cost: segment 0 only
    context = learner._context(obs, rct_lower)
    x_upper = learner.scaler(upper.x)
    _seed_target_adam(learner, context)

    def upper_loss(theta: torch.Tensor) -> torch.Tensor:
        revenue, cost = functional_call(learner.net, learner._unflatten(theta), (x_upper,))
        return ppl_decision(revenue, cost, upper, learner.lam, config.decision_settings)

    theta_0 = torch.cat([p.detach().reshape(-1) for p in learner.net.parameters()])
    theta = learner._lookahead(context, theta_0, config.bilevel_k)
    with torch.no_grad():
        gates = learner._gates(dict(learner.bridge.named_parameters()), context)
    (gate_grad,), _ = implicit_hypergradient(
        lambda t, g: learner._lower_loss(learner._unflatten(t), g[0], context),
        upper_loss,
        theta,
        [gates.clone().requires_grad_(True)],
        n_cg=50,
        tol=1e-6,
        damping=config.cg_damping,
    )
    segment = obs.x[:, 0] > 0
    coupon_revenue_grad = gate_grad[:, 1, 0]
    biased, clean = coupon_revenue_grad[segment].mean(), coupon_revenue_grad[~segment].mean()
    assert biased < 0 and abs(biased) > 20 * abs(clean)

    with torch.no_grad():
        before = learner.bridge(context.bridge_inputs)[:, 1, 0]
    learner._bridge_step(torch.optim.SGD(learner.bridge.parameters(), lr=10.0), context, upper)
    with torch.no_grad():
        after = learner.bridge(context.bridge_inputs)[:, 1, 0]
    assert learner.helpful_steps == 1
    assert (after - before)[segment].mean() > 0.01
