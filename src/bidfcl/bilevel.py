"""Bi-DFCL: the bi-level learner that lets a small RCT steer how a large OBS log is used.

Three networks:
- Teacher: frozen, fit on RCT rows (``teacher``: tsm-obs-ft, pre-trained on OBS; or
  tsm-rct, the RCT rows alone; or tsm-both, pooled with OBS). Unbiased where the RCT
  decides, but noisy; a tsm-both Teacher trades some of that noise for OBS's bias.
- Target: the deployed UpliftNet, started from the Teacher. Lower level: its parameters
  theta minimise the MSE to gated labels on OBS plus ``rct_weight`` times the factual MSE
  on the RCT rows of the lower level.
- Bridge: an MLP of the OBS user's features, logged arm and outcomes and the Teacher/anchor
  predictions (``bridge_inputs: row``; ``arm``: of nothing, so one learned gate per arm and
  outcome shared by all users), giving gates w in (0, 1) per user, arm and outcome
  (``bridge``):
  - ``labels`` (default): every OBS label is w * teacher + (1 - w) * base, the base being
    the logged outcome for the logged arm (where the targeting bias enters) and, for the
    arms the user did not receive, the anchor: the Target frozen at the start of the epoch,
    so a gate is a mixing weight, not a pull rate;
  - ``gate`` (the first version, kept as an ablation): only the pseudo-labels of unreceived
    arms are gated, anchored on the Target's own current prediction. For any gate > 0 that
    label's fixed point is the Teacher, so the gate sets a speed, not a blend;
  - ``ipw``: one weight per OBS row on the factual MSE, no pseudo-labels.
  With ``fixed_gate`` g the gates are the constant g and the Bridge never steps: the
  ablation a learned Bridge has to beat.

Upper level: phi minimises the RCT decision loss (PPL or PIFD at lambda*) of theta*(phi),
scored on RCT rows neither the Teacher nor the lower level saw (cross-fitting by a disjoint
split, :func:`upper_level_split`): judged on the Teacher's own rows, trusting the Teacher
would look better than it is.
Every ``bilevel_k``-th OBS batch the learner copies theta, takes k look-ahead steps on
the lower loss (theta_k ~ theta*(phi)), preconditioned by the Target's own Adam statistics
(:meth:`BilevelLearner._step_sizes`; plain SGD diverges on revenue-scale labels), and steps
phi along the hypergradient:
- implicit (default): by the implicit function theorem, solve (H + damping I) v =
  grad_theta L_upper(theta_k) by conjugate gradient on Hessian-vector products (double
  backprop, no Hessian is formed), then
  grad_phi = -d/dphi (grad_theta L_lower(theta_k, phi) . v). H is by default the
  Gauss-Newton part of the lower loss's Hessian (``curvature: gauss_newton``): an MLP's
  exact MSE Hessian is indefinite where residuals are large, which stops CG at its first
  direction, while J^T W J is positive semi-definite. It is the exact Hessian's HVP taken
  with every label set to the current prediction (zero residuals drop the second-order
  term), and equals the exact Hessian for a model linear in theta. The products use a
  ``curvature_fraction`` of the batch (a subsampled curvature, as in Hessian-free
  optimisation): they are most of a hypergradient's cost;
- explicit (ablation): differentiate L_upper through the last look-ahead step.
With ``audit_bridge_steps`` the look-ahead is redone after each Bridge step with the new
gates, and the step counts as helpful if the upper loss on the same held-out batch went down
(``helpful_share`` in the model's metadata): a diagnostic that costs k more look-ahead steps
per Bridge step, so it is off unless asked for. Every OBS batch the Target takes one real
Adam step on the lower loss with the current gates. The saved model is the Target at its
best validation epoch, so evaluation and allocation treat it like any other method's model.

Under DDP each process holds a shard of every batch. The Target's step is reduced by
Lightning's DDP; the look-ahead steps, the CG products, the hypergradient and the losses that
judge a Bridge step are averaged over the processes here (:mod:`bidfcl.distributed`), so
every process takes the step one process would take on the whole batch (the explicit
ablation averages the processes' own unrolled hypergradients instead).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call
from torch.nn import functional as F

from bidfcl.contract import OBS, RCT_TRAIN, RCT_VAL, Dataset, LoggedData, Truth
from bidfcl.datamodule import ObsRctDataModule
from bidfcl.decision import DecisionLoss
from bidfcl.distributed import mean_over_processes
from bidfcl.learner import UpliftLearner, fit_learner
from bidfcl.losses import factual_mse
from bidfcl.model import UpliftModel
from bidfcl.train_config import TrainConfig

# (theta, phi) -> scalar lower loss; theta is one flat vector, phi the Bridge's tensors.
LowerLoss = Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]
UpperLoss = Callable[[torch.Tensor], torch.Tensor]
BILEVEL_STATE_KEY = "bidfcl_bilevel"  # the counters a checkpoint keeps beside the learner's

# --------------------------------------------------------------------------- hypergradients


@dataclass(frozen=True)
class CGResult:
    """A conjugate-gradient solution, the iterations taken and the final relative residual."""

    solution: torch.Tensor
    iterations: int
    relative_residual: float


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    max_iter: int,
    tol: float,
) -> CGResult:
    """Solve A x = rhs for a symmetric positive-definite A known only through x -> A x.

    Stops once ||rhs - A x|| <= tol ||rhs|| or after ``max_iter`` products. A direction of
    non-positive curvature (A not positive definite there) also stops it, keeping the
    iterate so far (zero if it is the first direction; see :func:`implicit_hypergradient`).
    """
    solution = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    residual_sq = residual.dot(residual)
    target_sq = (tol * rhs.norm()) ** 2
    iterations = 0
    while iterations < max_iter and residual_sq > target_sq:
        product = matvec(direction)
        curvature = direction.dot(product)
        if not curvature > 0:  # also catches NaN
            break
        step = residual_sq / curvature
        solution = solution + step * direction
        residual = residual - step * product
        new_residual_sq = residual.dot(residual)
        direction = residual + (new_residual_sq / residual_sq) * direction
        residual_sq = new_residual_sq
        iterations += 1
    relative = float(residual_sq.sqrt() / rhs.norm().clamp_min(torch.finfo(rhs.dtype).tiny))
    return CGResult(solution, iterations, relative)


def implicit_hypergradient(
    lower_loss: LowerLoss,
    upper_loss: UpperLoss,
    theta: torch.Tensor,
    phi: Sequence[torch.Tensor],
    n_cg: int,
    tol: float,
    damping: float,
    curvature_loss: UpperLoss | None = None,
    average: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor,
) -> tuple[list[torch.Tensor], CGResult]:
    """d L_upper(theta*(phi)) / d phi by the implicit function theorem, at theta ~ theta*.

    v solves (H + damping I) v = grad_theta L_upper with H the Hessian in theta of
    ``curvature_loss`` (default: the lower loss itself; pass a stand-in such as the
    Gauss-Newton loss), by CG on Hessian-vector products from double backprop; the
    hypergradient is -d/dphi (grad_theta L_lower . v) with v held constant.
    ``CGResult.iterations == 0`` (or a non-finite solution) falls back to
    v = grad_theta L_upper / damping. L_upper must not depend on phi directly (true here:
    the RCT loss sees phi only through theta*).

    ``average`` makes the solve global when each process holds a shard of both losses'
    rows (:func:`~bidfcl.distributed.mean_over_processes`): it averages the upper gradient,
    every curvature product and the hypergradient, so every process runs the same CG on the
    mean of the shards' losses and takes the same step.
    """
    theta = theta.detach().requires_grad_(True)
    (upper_grad,) = torch.autograd.grad(upper_loss(theta), theta)
    upper_grad = average(upper_grad)
    lower_grad = None
    if curvature_loss is None:
        (lower_grad,) = torch.autograd.grad(lower_loss(theta, phi), theta, create_graph=True)
        curvature_grad = lower_grad
    else:
        (curvature_grad,) = torch.autograd.grad(curvature_loss(theta), theta, create_graph=True)

    def damped_hvp(vector: torch.Tensor) -> torch.Tensor:
        (hvp,) = torch.autograd.grad(curvature_grad, theta, vector, retain_graph=True)
        return average(hvp) + damping * vector

    cg = conjugate_gradient(damped_hvp, upper_grad, n_cg, tol)
    solution = cg.solution.detach()
    if cg.iterations == 0 or not bool(torch.isfinite(solution).all()):
        # H + damping I is not positive definite along grad L_upper itself (an MLP's MSE
        # Hessian is indefinite where residuals are large): fall back to H ~ damping I.
        solution = upper_grad / damping if damping > 0 else upper_grad
    if lower_grad is None:
        # grad_theta L_lower . v as a forward-mode directional derivative, then d/dphi of it:
        # one dual forward pass instead of a double backward through the whole batch
        with forward_ad.dual_level():
            directional = forward_ad.unpack_dual(
                lower_loss(forward_ad.make_dual(theta.detach(), solution), phi)
            ).tangent
    else:
        directional = lower_grad.dot(solution)
    mixed = torch.autograd.grad(directional, phi)
    return [-average(g) for g in mixed], cg


def unrolled_hypergradient(
    lower_loss: LowerLoss,
    upper_loss: UpperLoss,
    theta: torch.Tensor,
    phi: Sequence[torch.Tensor],
    lr: float | torch.Tensor,
) -> list[torch.Tensor]:
    """d L_upper(theta - lr grad_theta L_lower(theta, phi)) / d phi: one differentiated step
    (``lr`` a scalar or per-parameter step sizes)."""
    theta = theta.detach().requires_grad_(True)
    (lower_grad,) = torch.autograd.grad(lower_loss(theta, phi), theta, create_graph=True)
    return list(torch.autograd.grad(upper_loss(theta - lr * lower_grad), phi))


# --------------------------------------------------------------------------- networks


class Bridge(nn.Module):
    """Gates from the OBS user's features, logged arm and the Teacher/Target predictions.

    ``per_arm``: sigmoid gates (N, M, 2) for revenue and cost of every arm; otherwise one
    sigmoid weight per row (N,). The last layer starts at zero: every gate starts at 0.5.
    """

    def __init__(
        self, n_inputs: int, n_treatments: int, hidden: tuple[int, ...], per_arm: bool
    ) -> None:
        super().__init__()
        self.n_treatments = n_treatments
        self.per_arm = per_arm
        widths = (n_inputs, *hidden)
        layers: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        out = nn.Linear(widths[-1], 2 * n_treatments if per_arm else 1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.mlp = nn.Sequential(*layers, out)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        gates = torch.sigmoid(self.mlp(inputs))
        return gates.view(-1, self.n_treatments, 2) if self.per_arm else gates.squeeze(1)


class ObsContext(NamedTuple):
    """One lower-level batch with everything the lower loss holds constant in theta and phi."""

    batch: LoggedData  # the OBS rows
    rct: LoggedData  # the lower level's RCT rows (none with rct_weight 0)
    x_scaled: torch.Tensor  # (N + N_rct, d): OBS then RCT rows, for one forward pass
    bridge_inputs: torch.Tensor  # (N, d + 5M + 2); (N, 1) ones with bridge_inputs "arm"
    teacher: torch.Tensor  # (N, M, 2) revenue and cost
    base: torch.Tensor  # (N, M, 2) the logged outcomes at the logged arm, the anchor elsewhere
    unreceived: torch.Tensor  # (N, M) bool, arms the user was not given

    def head(self, fraction: float) -> ObsContext:
        """The first ``fraction`` of the OBS and of the RCT rows: uniform subsamples, as
        batches are shuffled."""
        n = self.batch.n_rows
        n_obs = max(1, round(fraction * n))
        n_rct = round(fraction * self.rct.n_rows)
        x = torch.cat([self.x_scaled[:n_obs], self.x_scaled[n : n + n_rct]])
        per_obs_row = (self.bridge_inputs, self.teacher, self.base, self.unreceived)
        return ObsContext(
            self.batch.rows(slice(0, n_obs)),
            self.rct.rows(slice(0, n_rct)),
            x,
            *(tensor[:n_obs] for tensor in per_obs_row),
        )


class UpperLevelSplit(NamedTuple):
    """``lower``: the dataset with rct_train cut to the rows the Teacher and the lower level
    train on; ``upper``: the held-out rct_train rows the upper level is scored on."""

    lower: Dataset
    upper: LoggedData


def upper_level_split(dataset: Dataset, config: TrainConfig) -> UpperLevelSplit:
    """Hold ``upper_fraction`` of rct_train out of the Teacher and the lower level, drawn at
    random with the run's seed (RCT rows are exchangeable). With 0 the upper level reuses
    the whole of rct_train, as in the first version."""
    frame = dataset.table(RCT_TRAIN)
    n_upper = round(config.upper_fraction * len(frame))
    if n_upper == 0:
        return UpperLevelSplit(dataset, dataset.logged(RCT_TRAIN))
    order = np.random.default_rng(config.seed).permutation(len(frame))
    upper, lower = np.sort(order[:n_upper]), np.sort(order[n_upper:])
    lower_dataset = replace(dataset, tables={**dataset.tables, RCT_TRAIN: frame.iloc[lower]})
    return UpperLevelSplit(lower_dataset, dataset.logged(RCT_TRAIN).rows(torch.from_numpy(upper)))


def _signed_log(values: torch.Tensor) -> torch.Tensor:
    return values.sign() * values.abs().log1p()


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


# --------------------------------------------------------------------------- Lightning module


class BilevelLearner(UpliftLearner):
    """Target (``model``), frozen Teacher (a copy of the warm start) and Bridge, trained by
    manual optimisation: a Target step every OBS batch, a Bridge step every k-th."""

    def __init__(
        self,
        model: UpliftModel,
        decision_loss: DecisionLoss | None,
        config: TrainConfig,
        budget: float,
        lr: float,
        decision_x: torch.Tensor | None = None,
        val_truth: Truth | None = None,
    ) -> None:
        super().__init__(model, decision_loss, config, budget, lr, decision_x, val_truth)
        if decision_loss is None:
            raise ValueError("the bi-level learner needs an upper-level decision loss")
        self.automatic_optimization = False
        self.teacher = copy.deepcopy(model.net).requires_grad_(False)
        n_arms = model.n_treatments
        self.bridge = Bridge(
            model.net.n_features + 5 * n_arms + 2 if config.bridge_inputs == "row" else 1,
            n_arms,
            config.bridge_hidden,
            config.bridge != "ipw",
        )
        # the anchor of ``labels`` gates: the Target as it was at the start of the epoch
        self.anchor = copy.deepcopy(model.net).requires_grad_(False)
        self.param_names = [name for name, _ in self.net.named_parameters()]
        self.param_shapes = [p.shape for p in self.net.parameters()]
        self.param_sizes = [p.numel() for p in self.net.parameters()]
        self.bridge_names = [name for name, _ in self.bridge.named_parameters()]
        self.hyper_steps = 0
        self.cg_iterations = 0
        self.skipped_steps = 0
        self.helpful_steps = 0
        self.last_context: ObsContext | None = None
        self.gate_means: list[float] = []  # mean gate on each epoch's last OBS batch

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        self.target_optimizer = torch.optim.Adam(
            self.net.parameters(), lr=self.lr, weight_decay=self.config.weight_decay
        )
        return [
            self.target_optimizer,
            torch.optim.Adam(self.bridge.parameters(), lr=self.config.bridge_lr),
        ]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """The schedule: a Bridge step every k-th OBS batch (after the warm-up), then a
        Target step on every OBS batch; batch_idx counts OBS batches within the epoch.
        ``batch`` is an :class:`~bidfcl.datamodule.ObsRctDataModule` item."""
        target_opt, bridge_opt = self.optimizers()
        context = self.last_context = self._context(batch["obs"], batch["rct"])
        self.epoch_rows += context.batch.n_rows + context.rct.n_rows
        warm = self.current_epoch < self.config.bridge_warmup_epochs
        learned = self.config.fixed_gate is None
        if learned and not warm and batch_idx % self.config.bilevel_k == 0:
            upper = self.trainer.datamodule.upper_batch(batch["upper"]).to(self.device)
            self._bridge_step(bridge_opt, context, upper)

        target_opt.zero_grad()
        theta = dict(self.net.named_parameters())
        phi = {name: p.detach() for name, p in self.bridge.named_parameters()}
        loss = self._lower_loss(theta, self._gates(phi, context), context)
        self.manual_backward(loss)
        target_opt.step()
        self.log("train_lower", loss, on_step=False, on_epoch=True, batch_size=context.batch.n_rows)

    def objective(
        self, revenue_hat: torch.Tensor, cost_hat: torch.Tensor, batch: LoggedData
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The upper level's objective, the decision loss (on rct_val when validating), with
        the factual MSE reported beside it: the epoch kept and early stopping follow what
        the Bridge is tuned for. Adding ``alpha`` times the MSE, as a single-level decision
        method's objective does, would let the MSE (hundreds against a decision loss of
        tens) pick the epoch, and keep the Target closest to its start."""
        _, parts = super().objective(revenue_hat, cost_hat, batch)
        return parts["decision"], parts

    def decision_baseline(self, rows: LoggedData) -> torch.Tensor | None:
        """``upper_estimator: dr``: the Teacher's revenue predictions. The upper rows and
        rct_val are out of the Teacher's sample, so the doubly robust loss stays unbiased."""
        if self.config.upper_estimator == "ipw":
            return None
        with torch.no_grad():
            return self.teacher(self.scaler(rows.x))[0]

    def _bridge_step(
        self, bridge_opt: torch.optim.Optimizer, ctx: ObsContext, upper: LoggedData
    ) -> None:
        """One Bridge step along the hypergradient; then the look-ahead again with the new
        gates, to count whether the step lowered the upper loss on this held-out batch."""
        x_upper = self.scaler(upper.x)
        baseline = self.decision_baseline(upper)

        def upper_loss(theta: torch.Tensor) -> torch.Tensor:
            revenue_hat, cost_hat = functional_call(self.net, self._unflatten(theta), (x_upper,))
            return self.decision_loss(
                revenue_hat, cost_hat, upper, self.lam, self.decision_settings, baseline
            )

        theta_0 = _flat(list(self.net.parameters()))
        hypergradient, before = self._hypergradient(ctx, upper_loss, theta_0)
        if not all(bool(torch.isfinite(g).all()) for g in hypergradient):
            self.skipped_steps += 1  # a diverged look-ahead: skip rather than poison the Bridge
            return
        bridge_opt.zero_grad()
        for param, grad in zip(self.bridge.parameters(), hypergradient, strict=True):
            param.grad = grad
        bridge_opt.step()
        if before is not None:
            with torch.no_grad():
                after = upper_loss(self._lookahead(ctx, theta_0, self.config.bilevel_k))
            self.helpful_steps += int(float(mean_over_processes(after)) < before)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The learner's state plus the bi-level counters (the Teacher, anchor, Bridge and
        both optimisers are in Lightning's part of the checkpoint)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[BILEVEL_STATE_KEY] = {
            "hyper_steps": self.hyper_steps,
            "cg_iterations": self.cg_iterations,
            "skipped_steps": self.skipped_steps,
            "helpful_steps": self.helpful_steps,
            "gate_means": self.gate_means,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint[BILEVEL_STATE_KEY]
        self.hyper_steps = state["hyper_steps"]
        self.cg_iterations = state["cg_iterations"]
        self.skipped_steps = state["skipped_steps"]
        self.helpful_steps = state["helpful_steps"]
        self.gate_means = state["gate_means"]

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.anchor.load_state_dict(self.net.state_dict())
        # Lightning puts every submodule in train mode at fit start
        self.teacher.eval()
        self.anchor.eval()

    def on_train_epoch_end(self) -> None:
        self.log("hyper_steps", float(self.hyper_steps), on_step=False, on_epoch=True)
        if self.config.fixed_gate is not None:
            self.gate_means.append(self.config.fixed_gate)
        elif self.last_context is not None:
            with torch.no_grad():
                self.gate_means.append(float(self.bridge(self.last_context.bridge_inputs).mean()))

    def _context(self, obs: LoggedData, rct: LoggedData) -> ObsContext:
        if self.config.rct_weight == 0:
            rct = rct.rows(slice(0, 0))
        with torch.no_grad():
            x_scaled = self.scaler(obs.x)
            teacher = torch.stack(self.teacher(x_scaled), dim=-1)
            # ``labels`` gates mix with the epoch's frozen Target; the first version with the
            # Target as it is now (``ipw`` uses no anchor)
            anchor_net = self.anchor if self.config.bridge == "labels" else self.net
            anchor = torch.stack(anchor_net(x_scaled), dim=-1)
            logged = F.one_hot(obs.treatment, self.model.n_treatments).to(x_scaled.dtype)
            outcomes = torch.stack((obs.revenue, obs.cost), dim=-1).to(x_scaled.dtype)
            base = torch.where(logged.bool().unsqueeze(-1), outcomes.unsqueeze(1), anchor)
            if self.config.bridge_inputs == "row":
                predictions = torch.cat([teacher, anchor], dim=-1).flatten(1)
                inputs = torch.cat(
                    [x_scaled, logged, _signed_log(predictions), _signed_log(outcomes)], 1
                )
            else:  # one gate per arm and outcome, whatever the row
                inputs = torch.ones_like(x_scaled[:, :1])
            both = torch.cat([x_scaled, self.scaler(rct.x)])
        return ObsContext(obs, rct, both, inputs, teacher, base, logged == 0)

    def _gates(self, phi: dict[str, torch.Tensor], ctx: ObsContext) -> torch.Tensor:
        """(N, M, 2) gates, or (N,) row weights for the ``ipw`` bridge."""
        if self.config.fixed_gate is None:
            return functional_call(self.bridge, phi, (ctx.bridge_inputs,))
        shape_of = ctx.batch.revenue if self.config.bridge == "ipw" else ctx.teacher
        return torch.full_like(shape_of, self.config.fixed_gate)

    def _lower_loss(
        self,
        theta: dict[str, torch.Tensor],
        gates: torch.Tensor,
        ctx: ObsContext,
        gauss_newton: bool = False,
    ) -> torch.Tensor:
        """The MSE to the gated OBS labels (factual per arm as :func:`factual_mse`, plus
        ``pseudo_label_weight`` times the mean over unreceived arms), plus ``rct_weight``
        times the factual MSE on the lower level's RCT rows. The Bridge's parameters enter
        only through ``gates`` (:meth:`_gates`).

        ``gauss_newton``: every label is replaced by the (detached) prediction, so the
        loss is zero with zero residuals and its Hessian at theta is the Gauss-Newton one.
        """
        cfg = self.config
        revenue_all, cost_all = functional_call(self.net, theta, (ctx.x_scaled,))
        n = ctx.batch.n_rows
        revenue_hat, cost_hat = revenue_all[:n], cost_all[:n]
        predictions = torch.stack((revenue_hat, cost_hat), dim=-1)
        if gauss_newton:
            labels = predictions.detach()
        elif cfg.bridge == "labels":
            labels = ctx.base + gates * (ctx.teacher - ctx.base)
        elif cfg.bridge == "gate":
            pseudo_gates = gates * ctx.unreceived.unsqueeze(-1)
            labels = ctx.base + pseudo_gates * (ctx.teacher - ctx.base)
        else:
            labels = ctx.base
        b = ctx.batch
        factual_labels = labels[torch.arange(b.n_rows, device=labels.device), b.treatment]
        row_weight = gates if cfg.bridge == "ipw" else None
        loss = factual_mse(
            revenue_hat, cost_hat, b.treatment, *factual_labels.unbind(-1), row_weight
        )
        if cfg.bridge != "ipw":
            error = (predictions - labels).square().sum(dim=-1)
            unreceived = ctx.unreceived.to(error.dtype)  # a mask product: no gather per step
            loss = loss + cfg.pseudo_label_weight * (error * unreceived).sum() / unreceived.sum()
        if ctx.rct.n_rows > 0:
            rct = ctx.rct
            rct_revenue, rct_cost = revenue_all[n:], cost_all[n:]
            rct_labels = (rct.revenue, rct.cost)
            if gauss_newton:
                logged = rct.treatment.unsqueeze(1)
                rct_labels = tuple(
                    hat.detach().gather(1, logged).squeeze(1) for hat in (rct_revenue, rct_cost)
                )
            loss = loss + cfg.rct_weight * factual_mse(
                rct_revenue, rct_cost, rct.treatment, *rct_labels
            )
        return loss

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = flat.split(self.param_sizes)
        return {
            name: part.view(shape)
            for name, part, shape in zip(self.param_names, parts, self.param_shapes, strict=True)
        }

    def _lower(self, ctx: ObsContext) -> LowerLoss:
        def lower(theta: torch.Tensor, phi_values: Sequence[torch.Tensor]) -> torch.Tensor:
            gates = self._gates(dict(zip(self.bridge_names, phi_values, strict=True)), ctx)
            return self._lower_loss(self._unflatten(theta), gates, ctx)

        return lower

    def _lookahead(self, ctx: ObsContext, theta: torch.Tensor, steps: int) -> torch.Tensor:
        """``steps`` preconditioned gradient steps of the lower loss from ``theta`` at the
        current gates (:meth:`_step_sizes`; on the mean of the processes' shards, so every
        process looks ahead to the same theta)."""
        with torch.no_grad():  # the gates are constants here: one Bridge pass, not one per step
            gates = self._gates(dict(self.bridge.named_parameters()), ctx)
        adam = self._adam_second_moment()
        with torch.enable_grad():
            for _ in range(steps):
                theta = theta.detach().requires_grad_(True)
                loss = self._lower_loss(self._unflatten(theta), gates, ctx)
                (grad,) = torch.autograd.grad(loss, theta)
                grad = mean_over_processes(grad)
                theta = theta - self._step_sizes(grad, adam) * grad
        return theta.detach()

    def _adam_second_moment(self) -> torch.Tensor | None:
        """The Target's Adam second-moment estimate, bias-corrected and flat (None before
        the Target's first step)."""
        optimizer = getattr(self, "target_optimizer", None)
        if optimizer is None:
            return None
        states = [optimizer.state.get(p) for p in self.net.parameters()]
        if not all(states):
            return None
        beta2 = optimizer.param_groups[0]["betas"][1]
        return torch.cat(
            [
                state["exp_avg_sq"].reshape(-1) / (1 - beta2 ** float(state["step"]))
                for state in states
            ]
        )

    def _step_sizes(self, grad: torch.Tensor, adam: torch.Tensor | None) -> torch.Tensor:
        """Per-parameter look-ahead step sizes ``lookahead_lr / (sqrt(v) + 1e-8)``, v being
        the larger of the Target's Adam second moment ``adam`` and the gradient squared, so
        no parameter moves more than ``lookahead_lr`` per step.

        The look-ahead then moves theta in the metric the Target trains in. Plain SGD does
        not fit this loss: revenue-scale labels give gradients in the hundreds, and SGD at
        any rate that moves the small-gradient parameters blows the others up. The floor at
        the current gradient keeps a parameter with a tiny Adam estimate (a unit dead on
        earlier batches) from taking a huge step.
        """
        second_moment = grad.detach().square()
        if adam is not None:
            second_moment = torch.maximum(second_moment, adam)
        return self.config.lookahead_lr / (second_moment.sqrt() + 1e-8)

    def _hypergradient(
        self, ctx: ObsContext, upper: UpperLoss, theta_0: torch.Tensor
    ) -> tuple[list[torch.Tensor], float | None]:
        """Look ahead k steps from theta_0, then the implicit or unrolled hypergradient;
        with ``audit_bridge_steps`` also the upper loss after the full look-ahead (what a
        Bridge step should lower), else None."""
        cfg = self.config
        audit = cfg.audit_bridge_steps
        phi = list(self.bridge.parameters())
        lower = self._lower(ctx)
        explicit = cfg.hypergradient == "explicit"
        theta = self._lookahead(ctx, theta_0, cfg.bilevel_k - 1 if explicit else cfg.bilevel_k)
        self.hyper_steps += 1
        before = None
        if explicit:
            if audit:
                with torch.no_grad():
                    before = float(mean_over_processes(upper(self._lookahead(ctx, theta, 1))))
            (first_grad,) = torch.autograd.grad(lower(theta.requires_grad_(True), phi), theta)
            step_sizes = self._step_sizes(
                mean_over_processes(first_grad), self._adam_second_moment()
            )
            grads = unrolled_hypergradient(lower, upper, theta, phi, step_sizes)
            return [mean_over_processes(g) for g in grads], before
        if audit:
            with torch.no_grad():
                before = float(mean_over_processes(upper(theta)))

        curvature_ctx = ctx.head(cfg.curvature_fraction)
        with torch.no_grad():
            frozen_gates = self._gates(dict(self.bridge.named_parameters()), curvature_ctx)

        def curvature(theta: torch.Tensor) -> torch.Tensor:
            return self._lower_loss(
                self._unflatten(theta),
                frozen_gates,
                curvature_ctx,
                gauss_newton=cfg.curvature == "gauss_newton",
            )

        grads, cg = implicit_hypergradient(
            lower,
            upper,
            theta,
            phi,
            cfg.n_cg,
            cfg.cg_tol,
            cfg.cg_damping,
            curvature,
            mean_over_processes,
        )
        self.cg_iterations += cg.iterations
        self.log_dict(
            {"cg_iterations": float(cg.iterations), "cg_residual": cg.relative_residual},
            on_step=False,
            on_epoch=True,
            batch_size=1,
        )
        return grads, before


# --------------------------------------------------------------------------- fitting


def fit_bilevel(
    dataset: Dataset,
    config: TrainConfig,
    budget: float,
    decision_loss: DecisionLoss,
    teacher: UpliftModel,
    progress: bool,
) -> UpliftModel:
    """Fit a bidfcl-* method: ``teacher`` (a model of the ``teacher`` setting's method whose
    RCT rows are ``upper_level_split(dataset, config).lower``, not modified) is the frozen
    Teacher and the Target's start; ``decision_loss`` is the upper level's loss.

    The Target starts from the Teacher rather than from tsm-obs: the labels then start at
    values the RCT decided and the lower level has to earn any move towards the biased OBS.
    The Teacher's summary goes into the model's ``teacher`` metadata.
    """
    L.seed_everything(config.seed, workers=True, verbose=False)
    split = upper_level_split(dataset, config)
    obs, rct = dataset.logged(OBS), split.lower.logged(RCT_TRAIN)
    learner = BilevelLearner(
        copy.deepcopy(teacher).to("cpu"),
        decision_loss,
        config,
        budget,
        lr=config.lr,
        decision_x=dataset.logged(RCT_TRAIN).x,
        val_truth=dataset.truth_for(RCT_VAL),
    )
    data = ObsRctDataModule(
        obs,
        rct,
        split.upper,
        dataset.logged(RCT_VAL),
        config.batch_size,
        config.decision_batch_size,
        config.seed,
        config.num_workers,
    )
    n_rows = len(obs) + len(rct) + len(split.upper)
    model = fit_learner(learner, data, dataset, config, budget, progress, (OBS, RCT_TRAIN), n_rows)
    model.metadata["teacher"] = {
        key: teacher.metadata.get(key)
        for key in (
            "method",
            "best_epoch",
            "best_val_eom",
            "best_val_loss",
            "epochs_run",
            "seconds_per_epoch",
            "n_train_rows",
        )
    }
    model.metadata["bilevel"] = {
        "hypergradient_steps": learner.hyper_steps,
        "mean_cg_iterations": learner.cg_iterations / max(1, learner.hyper_steps),
        "skipped_steps": learner.skipped_steps,
        "helpful_share": (
            learner.helpful_steps / max(1, learner.hyper_steps - learner.skipped_steps)
            if config.audit_bridge_steps and learner.hyper_steps > 0
            else None  # not audited, or no Bridge step to judge (a fixed gate)
        ),
        "upper_rows": len(split.upper),
        "gate_mean_per_epoch": learner.gate_means,
    }
    return model
