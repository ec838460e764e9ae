"""Lightning training of the uplift learners: two-stage baselines and decision-focused DFCL.

Every method trains the same :class:`~bidfcl.model.UpliftNet`; methods differ only in the
rows they learn from, the per-row weights and the loss, so a method is one entry of
:data:`METHOD_SPECS`. The checkpoint kept, and the number early stopping watches, is the
epoch's score on ``rct_val`` named by ``select_by``:

- ``loss`` (default): the method's own RCT objective on rct_val (factual MSE; a decision
  method adds its decision loss at the current lambda*, as in training);
- ``eom``: the validation EOM, the paper's rule. On a small validation set its
  epoch-to-epoch noise (IPW, hard argmax) is several times the real change between
  epochs, so it stops at a lucky early epoch; benchmarks/results/methods.md has numbers.

Both are logged every epoch.

- ``tsm-rct`` / ``tsm-obs`` / ``tsm-both``: factual MSE (per-arm weighted) on RCT train,
  OBS, or both.
- ``tsm-ips``: factual MSE on OBS weighted by 1 / p, with p from a multinomial logistic
  propensity model fitted on OBS features and clipped from below.
- ``dfcl-ppl`` / ``dfcl-pifd``: primal decision losses on RCT train at lambda*, which is
  re-solved from the current predictions at the start of every epoch, plus alpha * MSE;
  warm-started from a ``tsm-rct`` model.
- ``dfcl-pl`` / ``dfcl-ifd``: DFCL's dual losses over a lambda grid (scales of the current
  lambda*), plus alpha * MSE; warm-started the same way.
- ``bidfcl-ppl`` / ``bidfcl-pifd``: the bi-level learner of :mod:`bidfcl.bilevel` (a Bridge
  tuned by the RCT decision loss mixes a frozen tsm-rct Teacher into the OBS pseudo-labels
  of the Target); they train their own tsm-rct Teacher, which is also the Target's start.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger

from bidfcl.allocation import solve_mckp
from bidfcl.contract import OBS, RCT_TRAIN, RCT_VAL, Dataset, LoggedData, Truth, load_dataset
from bidfcl.datamodule import Batch, UpliftDataModule, batch_of, concat_batches
from bidfcl.evaluation import expected_outcome_metric
from bidfcl.losses import (
    dual_ifd_loss,
    dual_pl_loss,
    factual_mse,
    pifd_loss,
    ppl_loss,
)
from bidfcl.model import ModelConfig, UpliftModel

# --------------------------------------------------------------------------- configuration

# select_by -> (the logged validation metric, whether larger is better)
SELECT_BY: dict[str, tuple[str, bool]] = {"loss": ("val_loss", False), "eom": ("val_eom", True)}
# Settings that name one of a few variants, and those variants.
CHOICES: dict[str, tuple[str, ...]] = {
    "select_by": tuple(SELECT_BY),
    "bridge": ("gate", "ipw"),
    "hypergradient": ("implicit", "explicit"),
    "curvature": ("gauss_newton", "hessian"),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything in params.yaml's ``train:`` section (see that file for the meaning).

    ``budget`` is the mean cost per user; None takes the dataset's ``default_budget``.
    """

    method: str = "tsm-rct"
    seed: int = 0
    budget: float | None = None
    max_epochs: int = 100
    patience: int = 10
    select_by: str = "loss"
    batch_size: int = 2048
    decision_batch_size: int = 4096
    lr: float = 1e-3
    decision_lr: float = 1e-3
    weight_decay: float = 0.0
    hidden: tuple[int, ...] = (128, 64, 32)
    dropout: float = 0.0
    activation: str = "relu"
    alpha: float = 1.0
    tau: float = 1.0
    h: float = 3.0
    dual_lambda_scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0)
    ips_clip: float = 0.05
    propensity_steps: int = 200
    warm_start_epochs: int = 100
    bilevel_k: int = 5
    n_cg: int = 50
    cg_tol: float = 0.1
    cg_damping: float = 1.0
    lookahead_lr: float = 1e-2
    bridge_lr: float = 1e-3
    bridge_hidden: tuple[int, ...] = (32,)
    bridge_warmup_epochs: int = 1
    pseudo_label_weight: float = 1.0
    bridge: str = "gate"
    hypergradient: str = "implicit"
    curvature: str = "gauss_newton"
    curvature_fraction: float = 0.5
    accelerator: str = "auto"
    deterministic: bool = True
    num_workers: int = 0
    num_threads: int | None = None
    fast_dev_run: bool = False
    log_dir: str | None = None
    baselines: tuple[str, ...] = ()  # the pipeline's train stage also trains these methods

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(w) for w in self.hidden))
        object.__setattr__(self, "baselines", tuple(str(m) for m in self.baselines))
        unknown = [m for m in (self.method, *self.baselines) if m not in METHOD_SPECS]
        if unknown:
            named = ", ".join(map(repr, unknown))
            raise ValueError(f"unknown method {named}; choose one of {list(METHODS)}")
        object.__setattr__(self, "bridge_hidden", tuple(int(w) for w in self.bridge_hidden))
        object.__setattr__(
            self, "dual_lambda_scales", tuple(float(s) for s in self.dual_lambda_scales)
        )
        positive = {
            "max_epochs": self.max_epochs,
            "patience": self.patience,
            "batch_size": self.batch_size,
            "decision_batch_size": self.decision_batch_size,
            "lr": self.lr,
            "decision_lr": self.decision_lr,
            "tau": self.tau,
            "h": self.h,
            "propensity_steps": self.propensity_steps,
            "warm_start_epochs": self.warm_start_epochs,
            "bilevel_k": self.bilevel_k,
            "n_cg": self.n_cg,
            "cg_tol": self.cg_tol,
            "lookahead_lr": self.lookahead_lr,
            "bridge_lr": self.bridge_lr,
        }
        bad = {name: value for name, value in positive.items() if not value > 0}
        if bad:
            raise ValueError(f"these train settings must be > 0: {bad}")
        if self.budget is not None and self.budget < 0:
            raise ValueError(f"budget must be >= 0 (mean cost per user), got {self.budget}")
        if not 0 < self.ips_clip <= 1:
            raise ValueError(f"ips_clip must lie in (0, 1], got {self.ips_clip}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or null, got {self.num_threads}")
        if self.alpha < 0 or self.weight_decay < 0 or self.num_workers < 0:
            raise ValueError("alpha, weight_decay and num_workers must be >= 0")
        if min(self.cg_damping, self.pseudo_label_weight, self.bridge_warmup_epochs) < 0:
            raise ValueError(
                "cg_damping, pseudo_label_weight and bridge_warmup_epochs must be >= 0"
            )
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}"
                )
        if not 0 < self.curvature_fraction <= 1:
            raise ValueError(
                f"curvature_fraction must lie in (0, 1], got {self.curvature_fraction}"
            )
        if not self.dual_lambda_scales or min(self.dual_lambda_scales) < 0:
            raise ValueError(
                f"dual_lambda_scales must be non-empty and >= 0: {self.dual_lambda_scales}"
            )

    @classmethod
    def from_params(cls, params: dict[str, Any], **overrides: Any) -> TrainConfig:
        """Build from a params.yaml ``train:`` section; overrides whose value is None are
        ignored, so unset CLI options keep the file's values."""
        known = {f.name for f in fields(cls)}
        values = {**params, **{k: v for k, v in overrides.items() if v is not None}}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown train setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(hidden=self.hidden, dropout=self.dropout, activation=self.activation)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "hidden": list(self.hidden),
            "bridge_hidden": list(self.bridge_hidden),
            "dual_lambda_scales": list(self.dual_lambda_scales),
            "baselines": list(self.baselines),
        }


def load_train_config(params_path: Path | str = "params.yaml", **overrides: Any) -> TrainConfig:
    """Read the ``train:`` section of a params file (overrides as in ``from_params``)."""
    path = Path(params_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: params file not found")
    params = yaml.safe_load(path.read_text()) or {}
    section = params.get("train")
    if not isinstance(section, dict):
        raise ValueError(f"{path}: needs a 'train:' mapping")
    return TrainConfig.from_params(section, **overrides)


# --------------------------------------------------------------------------- decision losses

# (revenue_hat, cost_hat, batch, lambda*, config) -> scalar loss on the batch's RCT rows
DecisionLoss = Callable[[torch.Tensor, torch.Tensor, Batch, float, TrainConfig], torch.Tensor]


def ppl_decision(
    revenue_hat: torch.Tensor, cost_hat: torch.Tensor, batch: Batch, lam: float, cfg: TrainConfig
) -> torch.Tensor:
    return ppl_loss(
        revenue_hat, cost_hat, batch.treatment, batch.revenue, batch.propensity, lam, cfg.tau
    )


def pifd_decision(
    revenue_hat: torch.Tensor, cost_hat: torch.Tensor, batch: Batch, lam: float, cfg: TrainConfig
) -> torch.Tensor:
    return pifd_loss(
        revenue_hat, cost_hat, batch.treatment, batch.revenue, batch.propensity, lam, cfg.h
    )


def dual_pl_decision(
    revenue_hat: torch.Tensor, cost_hat: torch.Tensor, batch: Batch, lam: float, cfg: TrainConfig
) -> torch.Tensor:
    grid = _lambda_grid(lam, cfg)
    return dual_pl_loss(
        revenue_hat, cost_hat, batch.treatment, batch.revenue, batch.cost, batch.propensity, grid
    )


def dual_ifd_decision(
    revenue_hat: torch.Tensor, cost_hat: torch.Tensor, batch: Batch, lam: float, cfg: TrainConfig
) -> torch.Tensor:
    grid = _lambda_grid(lam, cfg)
    return dual_ifd_loss(
        revenue_hat,
        cost_hat,
        batch.treatment,
        batch.revenue,
        batch.cost,
        batch.propensity,
        grid,
        cfg.h,
    )


def _lambda_grid(lam: float, cfg: TrainConfig) -> torch.Tensor:
    """The dual variants' grid: fixed scales of the current lambda*, so it follows the budget."""
    return torch.tensor(cfg.dual_lambda_scales) * lam


# --------------------------------------------------------------------------- propensity model


def fit_propensity_model(
    data: LoggedData, steps: int = 200, l2: float = 1e-4
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multinomial logistic regression of the logged arm on standardised features.

    Full-batch L-BFGS (deterministic on CPU). Returns a function mapping raw features
    (N, d) to arm probabilities (N, M).
    """
    mean, std = data.x.mean(dim=0), data.x.std(dim=0).clamp_min(1e-6)
    features = (data.x - mean) / std
    linear = torch.nn.Linear(features.shape[1], data.n_treatments)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(
        linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(features), data.treatment)
        loss = loss + l2 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    linear.requires_grad_(False)
    return lambda x: torch.softmax(linear((x - mean) / std), dim=1)


def ips_weights(data: LoggedData, clip: float, steps: int) -> torch.Tensor:
    """1 / p(logged arm | x) from a propensity model fitted on ``data`` itself, p >= clip."""
    probabilities = fit_propensity_model(data, steps)(data.x)
    logged = probabilities.gather(1, data.treatment.unsqueeze(1)).squeeze(1)
    return 1.0 / logged.clamp(min=clip, max=1.0)


# --------------------------------------------------------------------------- Lightning module


class UpliftLearner(L.LightningModule):
    """Trains one UpliftModel by a method's loss; keeps the weights of its best validation
    epoch (``config.select_by``).

    Decision methods get ``decision_x`` (the raw features of the users the budget is spread
    over, RCT train) and re-solve lambda* on them at the start of every epoch.
    """

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
        super().__init__()
        self.model = model
        self.net = model.net  # registered as submodules so Lightning moves and optimises them
        self.scaler = model.scaler
        self.decision_loss = decision_loss
        self.config = config
        self.budget = budget
        self.lr = lr
        self.decision_x = decision_x
        self.val_truth = val_truth
        self.lam = 0.0
        self.history: list[dict[str, float]] = []
        self.monitor, self.maximize = SELECT_BY[config.select_by]
        self.best_score = -math.inf if self.maximize else math.inf
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] | None = None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.net.parameters(), lr=self.lr, weight_decay=self.config.weight_decay
        )

    def on_train_epoch_start(self) -> None:
        if self.decision_x is None:
            return
        revenue_hat, cost_hat = self.model.predict(self.decision_x)
        lam = solve_mckp(revenue_hat, cost_hat, self.budget).lam
        # lambda* is inf only if the predicted cheapest arms overspend; keep the last one.
        if math.isfinite(lam):
            self.lam = lam
        self.log("lambda", self.lam, on_step=False, on_epoch=True)

    def objective(
        self, revenue_hat: torch.Tensor, cost_hat: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Factual MSE; decision methods add their decision loss and weight the MSE by alpha.
        Returns the loss and its parts by name (``mse``, ``decision``)."""
        mse = factual_mse(
            revenue_hat, cost_hat, batch.treatment, batch.revenue, batch.cost, batch.weight
        )
        if self.decision_loss is None:
            return mse, {"mse": mse}
        decision = self.decision_loss(revenue_hat, cost_hat, batch, self.lam, self.config)
        return decision + self.config.alpha * mse, {"mse": mse, "decision": decision}

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        revenue_hat, cost_hat = self.model.forward(batch.x)
        loss, parts = self.objective(revenue_hat, cost_hat, batch)
        metrics = {f"train_{name}": value for name, value in parts.items()}
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=batch.n_rows)
        self.log(
            "train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=batch.n_rows
        )
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        revenue_hat, cost_hat = self.model.forward(batch.x)
        result = expected_outcome_metric(
            batch.logged(self.model.n_treatments),
            revenue_hat,
            cost_hat,
            self.budget,
            truth=self.val_truth,
        )
        loss, parts = self.objective(revenue_hat, cost_hat, batch)
        metrics = {
            "val_loss": float(loss),
            **{f"val_{name}": float(value) for name, value in parts.items()},
            "val_eom": result.eom.value,
            "val_cost": result.cost.value,
        }
        if result.true_revenue is not None:
            metrics["val_true_revenue"] = result.true_revenue
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name == "val_eom", batch_size=batch.n_rows)
        if not self.trainer.sanity_checking:
            self._record(metrics)

    def _record(self, metrics: dict[str, float]) -> None:
        """Append the epoch to the history; snapshot the weights if its score is the best."""
        lam = {"lambda": self.lam} if self.decision_x is not None else {}
        self.history.append({"epoch": self.current_epoch, **lam, **metrics})
        score = metrics[self.monitor]
        if score > self.best_score if self.maximize else score < self.best_score:
            self.best_score = score
            self.best_epoch = self.current_epoch
            self.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}


# --------------------------------------------------------------------------- method registry


@dataclass(frozen=True)
class MethodSpec:
    """How one method trains: its rows, their weights, its loss and its Lightning module.

    Every method fits the factual MSE on ``sources``; a ``decision_loss`` makes it a
    decision method: it must train on RCT rows (the loss needs known propensities), uses
    ``decision_batch_size`` and ``decision_lr``, re-solves lambda* every epoch and adds
    alpha * MSE. ``warm_start`` names the method whose trained model it starts from.
    ``bilevel`` methods train in :func:`bidfcl.bilevel.train_bilevel_stage` instead.
    """

    sources: tuple[str, ...]
    decision_loss: DecisionLoss | None = None
    ips_weighted: bool = False
    warm_start: str | None = None
    learner: type[UpliftLearner] = UpliftLearner
    bilevel: bool = False

    @property
    def decision(self) -> bool:
        return self.decision_loss is not None


METHOD_SPECS: dict[str, MethodSpec] = {
    "tsm-rct": MethodSpec((RCT_TRAIN,)),
    "tsm-obs": MethodSpec((OBS,)),
    "tsm-both": MethodSpec((RCT_TRAIN, OBS)),
    "tsm-ips": MethodSpec((OBS,), ips_weighted=True),
    "dfcl-ppl": MethodSpec((RCT_TRAIN,), ppl_decision, warm_start="tsm-rct"),
    "dfcl-pifd": MethodSpec((RCT_TRAIN,), pifd_decision, warm_start="tsm-rct"),
    "dfcl-pl": MethodSpec((RCT_TRAIN,), dual_pl_decision, warm_start="tsm-rct"),
    "dfcl-ifd": MethodSpec((RCT_TRAIN,), dual_ifd_decision, warm_start="tsm-rct"),
    "bidfcl-ppl": MethodSpec((OBS, RCT_TRAIN), ppl_decision, bilevel=True),
    "bidfcl-pifd": MethodSpec((OBS, RCT_TRAIN), pifd_decision, bilevel=True),
}
METHODS: tuple[str, ...] = tuple(METHOD_SPECS)


# --------------------------------------------------------------------------- training


def train_model(
    dataset: Dataset,
    config: TrainConfig,
    progress: bool = True,
    warm_start: UpliftModel | None = None,
) -> UpliftModel:
    """Train ``config.method`` and return the model of its best validation epoch.

    Training starts from ``warm_start`` when one is given (it is copied, not modified);
    otherwise methods with a warm-start method (dfcl-*) first train that method for
    ``warm_start_epochs``. The returned model is on the CPU; its metadata records the
    method, seed, budget, best epoch, per-epoch validation history, the warm start and
    the dataset's metadata.
    """
    spec = METHOD_SPECS[config.method]
    budget = dataset.meta.budget_or_default(config.budget)
    with _scoped_torch_settings(config.num_threads):
        if warm_start is None and spec.warm_start is not None:
            warm_config = replace(
                config, method=spec.warm_start, max_epochs=config.warm_start_epochs
            )
            warm_start = _train_stage(dataset, warm_config, budget, progress, None)
        model = _stage_for(spec)(dataset, config, budget, progress, warm_start)
    model.metadata["warm_start"] = (
        None
        if warm_start is None
        else {
            key: warm_start.metadata.get(key)
            for key in ("method", "best_epoch", "best_val_eom", "best_val_loss", "epochs_run")
        }
    )
    return model


def train_to_folder(
    data_dir: Path | str, out_dir: Path | str, config: TrainConfig, progress: bool = True
) -> Path:
    """Load a dataset folder, train ``config.method`` and save the model folder atomically."""
    dataset = load_dataset(data_dir, tables=(OBS, RCT_TRAIN, RCT_VAL))
    return train_model(dataset, config, progress).save(out_dir)


def _stage_for(spec: MethodSpec) -> Callable[..., UpliftModel]:
    if not spec.bilevel:
        return _train_stage
    from bidfcl.bilevel import train_bilevel_stage  # bilevel builds on this module

    return train_bilevel_stage


def _train_stage(
    dataset: Dataset,
    config: TrainConfig,
    budget: float,
    progress: bool,
    start_from: UpliftModel | None,
) -> UpliftModel:
    """One Lightning fit of one method, from ``start_from`` (copied) or a fresh network."""
    spec = METHOD_SPECS[config.method]
    L.seed_everything(config.seed, workers=True, verbose=False)
    train_rows = _training_rows(dataset, spec, config)
    if start_from is None:
        model = UpliftModel.build(
            train_rows.x,
            dataset.meta.feature_columns,
            dataset.meta.treatment_names,
            config.model_config,
        )
    else:
        model = copy.deepcopy(start_from).to("cpu")
    learner = spec.learner(
        model,
        spec.decision_loss,
        config,
        budget,
        lr=config.decision_lr if spec.decision else config.lr,
        decision_x=train_rows.x if spec.decision else None,
        val_truth=dataset.truth_for(RCT_VAL),
    )
    batch_size = config.decision_batch_size if spec.decision else config.batch_size
    data = UpliftDataModule(
        train_rows,
        batch_of(dataset.logged(RCT_VAL)),
        batch_size,
        config.seed,
        config.num_workers,
    )
    return fit_learner(learner, data, dataset, config, budget, progress, train_rows.n_rows)


def fit_learner(
    learner: UpliftLearner,
    data: L.LightningDataModule,
    dataset: Dataset,
    config: TrainConfig,
    budget: float,
    progress: bool,
    n_train_rows: int,
) -> UpliftModel:
    """Fit ``learner`` on ``data``; return its model (CPU) at its best validation epoch,
    with the run described in its metadata."""
    model = learner.model
    spec = METHOD_SPECS[config.method]
    started = time.perf_counter()
    with _quiet_lightning():
        _trainer(config, progress).fit(learner, datamodule=data)
    seconds = time.perf_counter() - started

    model.to("cpu")
    if learner.best_state is not None:
        model.net.load_state_dict(learner.best_state)
    epochs_run = len(learner.history)
    best = next((row for row in learner.history if row["epoch"] == learner.best_epoch), None)
    model.metadata = {
        "method": config.method,
        "seed": config.seed,
        "budget": budget,
        "best_epoch": learner.best_epoch,
        "selected_by": learner.monitor,
        "best_val_eom": best["val_eom"] if best else None,
        "best_val_loss": best["val_loss"] if best else None,
        "val_eom_history": [row["val_eom"] for row in learner.history],
        "history": learner.history,
        "epochs_run": epochs_run,
        "fit_seconds": seconds,
        "seconds_per_epoch": seconds / max(1, epochs_run),
        "training_tables": list(spec.sources),
        "n_train_rows": n_train_rows,
        "train_config": config.to_dict(),
        "dataset": dataset.meta.to_dict(),
        "dataset_path": str(dataset.path) if dataset.path is not None else None,
    }
    return model


def _training_rows(dataset: Dataset, spec: MethodSpec, config: TrainConfig) -> Batch:
    parts = []
    for table in spec.sources:
        logged = dataset.logged(table)
        weight = (
            ips_weights(logged, config.ips_clip, config.propensity_steps)
            if spec.ips_weighted
            else None
        )
        parts.append(batch_of(logged, weight))
    return concat_batches(parts)


def _trainer(config: TrainConfig, progress: bool) -> L.Trainer:
    logger = CSVLogger(config.log_dir, name=config.method) if config.log_dir else False
    monitor, maximize = SELECT_BY[config.select_by]
    use_cuda = torch.cuda.is_available() and config.accelerator in ("auto", "gpu", "cuda")
    # Some CUDA kernels have no deterministic version: warn there instead of failing.
    deterministic: bool | str = config.deterministic
    if config.deterministic and use_cuda:
        deterministic = "warn"
    return L.Trainer(
        accelerator=config.accelerator,
        devices=1,
        max_epochs=config.max_epochs,
        deterministic=deterministic,
        callbacks=[
            EarlyStopping(
                monitor=monitor, mode="max" if maximize else "min", patience=config.patience
            )
        ],
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        logger=logger,
        num_sanity_val_steps=0,
        fast_dev_run=config.fast_dev_run,
    )


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide Lightning's start-up chatter (device summary, tips, data loader hints)."""
    names = ("lightning.pytorch", "lightning.fabric")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*no logger configured.*")
            warnings.filterwarnings("ignore", message=".*treespec.*deprecated.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _scoped_torch_settings(n_threads: int | None) -> Iterator[None]:
    """Cap torch's CPU threads while training (None: leave them), and afterwards restore them
    and the deterministic-algorithms flag the Trainer sets, so later code in the same process
    (evaluation, a pipeline) runs as it would have.

    A small MLP gains little from intra-op threads, and on a busy CPU they spin and slow
    every step down.
    """
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if n_threads is not None:
        torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn_only)
