"""The Lightning side of training: the module every learner builds on and one way to fit it.

:class:`UpliftLearner` trains one :class:`~bidfcl.model.UpliftModel` by the factual MSE,
plus a decision loss for decision methods, and keeps the weights of its best validation
epoch. The checkpoint kept, and the number early stopping watches, is the epoch's score on
``rct_val`` named by ``select_by``:

- ``loss`` (default): the method's own RCT objective on rct_val (factual MSE; a decision
  method adds its decision loss at the current lambda*, as in training; a bi-level method
  scores its upper level's decision loss alone, :meth:`~bidfcl.bilevel.BilevelLearner.objective`);
- ``eom``: the validation EOM, the paper's rule. On a small validation set its
  epoch-to-epoch noise (IPW, hard argmax) is several times the real change between epochs,
  so it stops at a lucky early epoch (benchmarks/results/methods.md).

Both are logged every epoch. :func:`fit_learner` runs the Trainer and describes the run in
the model's metadata; :func:`scoped_torch_settings` keeps training's thread and determinism
settings from leaking into the rest of the process. Whoever runs training (a pipeline stage,
a benchmark) watches it epoch by epoch through :func:`observe_training`, without every fit
function passing the observer along.

With ``checkpoint_dir`` set, every epoch ends with ``last.ckpt`` there (Lightning's
``ModelCheckpoint``, written atomically), and a fit that finds one resumes from it: the
weights, optimisers, loop and early-stopping state, the learner's own state (best epoch and
its weights, history, lambda) and every random generator the batches are drawn from, so a
run killed at any point ends with the weights an uninterrupted run gets.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, Strategy

from bidfcl.allocation import solve_mckp
from bidfcl.contract import Dataset, LoggedData, Truth
from bidfcl.datamodule import ShuffledBatches
from bidfcl.decision import DecisionLoss
from bidfcl.distributed import gather_shards, rank_shard, spread_over_processes
from bidfcl.evaluation import expected_outcome_metric
from bidfcl.io import atomic_write
from bidfcl.losses import factual_mse
from bidfcl.model import UpliftModel
from bidfcl.train_config import SELECT_BY, TrainConfig

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "last"  # <checkpoint_dir>/last.ckpt: the state after the last finished epoch
CHECKPOINT_FILE = f"{CHECKPOINT_NAME}{ModelCheckpoint.FILE_EXTENSION}"
LEARNER_STATE_KEY = "bidfcl_learner"
RNG_STATE_KEY = "bidfcl_rng"


@dataclass(frozen=True)
class EpochSummary:
    """One finished training epoch: the method the Trainer fits (a warm start or Teacher
    phase names its own method), the epoch (from 0) out of at most ``max_epochs``, its
    wall-clock seconds and the epoch's logged metrics (train_* and val_*)."""

    method: str
    epoch: int
    max_epochs: int
    seconds: float
    metrics: dict[str, float]


EpochObserver = Callable[[EpochSummary], None]
_EPOCH_OBSERVER: ContextVar[EpochObserver | None] = ContextVar("epoch_observer", default=None)


@contextlib.contextmanager
def observe_training(observer: EpochObserver) -> Iterator[None]:
    """Call ``observer`` after every epoch of every fit started inside the block."""
    token = _EPOCH_OBSERVER.set(observer)
    try:
        yield
    finally:
        _EPOCH_OBSERVER.reset(token)


class EpochReporter(Callback):
    """Hands each finished epoch to an observer (at train-epoch end, after validation, so
    the epoch's train and validation metrics are both in)."""

    def __init__(self, method: str, observer: EpochObserver) -> None:
        self.method = method
        self.observer = observer
        self.started = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        self.observer(
            EpochSummary(
                method=self.method,
                epoch=trainer.current_epoch,
                max_epochs=trainer.max_epochs or 0,
                seconds=time.perf_counter() - self.started,
                metrics=metrics,
            )
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint beside its path and renames it into place: a kill during the
    write leaves the previous epoch's checkpoint whole."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        def write(tmp: Path) -> None:
            TorchCheckpointIO.save_checkpoint(self, checkpoint, tmp, storage_options)

        atomic_write(Path(path), write)


class ShufflingState(Callback):
    """Adds to each checkpoint what Lightning leaves out: torch's global generator and the
    private generators the datamodule's samplers shuffle with, so a resumed fit draws the
    batches the uninterrupted one would have drawn."""

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[RNG_STATE_KEY] = {
            "torch": torch.get_rng_state(),
            "samplers": [sampler.generator.get_state() for sampler in _samplers(trainer)],
        }

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Restored before the fit loop builds its data iterators, which draw the first order.
        state = checkpoint[RNG_STATE_KEY]
        torch.set_rng_state(state["torch"])
        for sampler, saved in zip(_samplers(trainer), state["samplers"], strict=True):
            sampler.generator.set_state(saved)


def _samplers(trainer: L.Trainer) -> list[ShuffledBatches]:
    """The datamodule's shuffling samplers, in the order it holds them."""
    return [s for s in vars(trainer.datamodule).values() if isinstance(s, ShuffledBatches)]


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
        self.decision_settings = config.decision_settings
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
        self.epoch_rows = 0  # training rows this process saw in the current epoch
        self.distributed: dict[str, Any] = {}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.net.parameters(), lr=self.lr, weight_decay=self.config.weight_decay
        )

    def on_train_epoch_start(self) -> None:
        self.epoch_rows = 0
        if self.decision_x is None:
            return
        # each process predicts its shard of the users; lambda* is solved on all of them
        shard = rank_shard(self.decision_x)
        revenue_hat, cost_hat = (gather_shards(p) for p in self.model.predict(shard))
        lam = solve_mckp(revenue_hat, cost_hat, self.budget).lam
        # lambda* is inf only if the predicted cheapest arms overspend; keep the last one.
        if math.isfinite(lam):
            self.lam = lam
        self.log("lambda", self.lam, on_step=False, on_epoch=True)

    def objective(
        self, revenue_hat: torch.Tensor, cost_hat: torch.Tensor, batch: LoggedData
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Factual MSE; decision methods add their decision loss and weight the MSE by alpha.
        Returns the loss and its parts by name (``mse``, ``decision``)."""
        mse = factual_mse(
            revenue_hat, cost_hat, batch.treatment, batch.revenue, batch.cost, batch.weight
        )
        if self.decision_loss is None:
            return mse, {"mse": mse}
        decision = self.decision_loss(
            revenue_hat,
            cost_hat,
            batch,
            self.lam,
            self.decision_settings,
            self.decision_baseline(batch),
        )
        return decision + self.config.alpha * mse, {"mse": mse, "decision": decision}

    def decision_baseline(self, rows: LoggedData) -> torch.Tensor | None:
        """The revenue predictions a doubly robust decision loss centres on; None (IPW) for
        single-level methods, whose only outcome model is the one being trained."""
        return None

    def training_step(self, batch: LoggedData, batch_idx: int) -> torch.Tensor:
        self.epoch_rows += batch.n_rows
        revenue_hat, cost_hat = self.model.forward(batch.x)
        loss, parts = self.objective(revenue_hat, cost_hat, batch)
        metrics = {f"train_{name}": value for name, value in parts.items()}
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=batch.n_rows)
        self.log(
            "train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=batch.n_rows
        )
        return loss

    def validation_step(self, batch: LoggedData, batch_idx: int) -> None:
        revenue_hat, cost_hat = self.model.forward(batch.x)
        result = expected_outcome_metric(
            batch,
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

    def on_train_end(self) -> None:
        """Describe how the fit was spread: the processes, the rows each trained on in the
        last epoch, and the largest difference of any weight between processes (0 when
        they stayed in step, as DDP must keep them)."""
        rows = gather_shards(torch.tensor([self.epoch_rows], device=self.device))
        weights = torch.cat([p.detach().reshape(-1) for p in self.parameters()])
        self.distributed = {
            "processes": rows.numel(),
            "rows_last_epoch": rows.tolist(),
            "weight_spread": spread_over_processes(weights),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep what Lightning does not: the best epoch's weights (held in memory), the
        history and lambda."""
        checkpoint[LEARNER_STATE_KEY] = {
            "lam": self.lam,
            "history": self.history,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint[LEARNER_STATE_KEY]
        self.lam = state["lam"]
        self.history = state["history"]
        self.best_score = state["best_score"]
        self.best_epoch = state["best_epoch"]
        self.best_state = state["best_state"]
        log.warning(
            "%s: resuming after epoch %d of an interrupted run",
            self.config.method,
            len(self.history),
        )

    def _record(self, metrics: dict[str, float]) -> None:
        """Append the epoch to the history; snapshot the weights if its score is the best."""
        lam = {"lambda": self.lam} if self.decision_x is not None else {}
        self.history.append({"epoch": self.current_epoch, **lam, **metrics})
        score = metrics[self.monitor]
        if score > self.best_score if self.maximize else score < self.best_score:
            self.best_score = score
            self.best_epoch = self.current_epoch
            self.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}


def fit_learner(
    learner: UpliftLearner,
    data: L.LightningDataModule,
    dataset: Dataset,
    config: TrainConfig,
    budget: float,
    progress: bool,
    training_tables: Sequence[str],
    n_train_rows: int,
) -> UpliftModel:
    """Fit ``learner`` on ``data``; return its model (CPU) at its best validation epoch,
    with the run described in its metadata. With ``config.checkpoint_dir`` the fit resumes
    from the checkpoint an interrupted fit left there."""
    model = learner.model
    resume = None
    if config.checkpoint_dir is not None:
        last = Path(config.checkpoint_dir) / CHECKPOINT_FILE
        resume = last if last.exists() else None
    started = time.perf_counter()
    with quiet_lightning():
        make_trainer(config, progress, manual_optimization=not learner.automatic_optimization).fit(
            learner, datamodule=data, ckpt_path=resume, weights_only=True
        )
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
        "training_tables": list(training_tables),
        "n_train_rows": n_train_rows,
        "distributed": learner.distributed,
        "train_config": config.to_dict(),
        "dataset": dataset.meta.to_dict(),
        "dataset_path": str(dataset.path) if dataset.path is not None else None,
    }
    return model


def make_trainer(
    config: TrainConfig, progress: bool, manual_optimization: bool = False
) -> L.Trainer:
    """The Trainer every learner fits with: early stopping on ``select_by``, the epoch
    observer if one is set, with ``checkpoint_dir`` a checkpoint after every epoch, and
    :func:`training_strategy`'s strategy."""
    logger = CSVLogger(config.log_dir, name=config.method) if config.log_dir else False
    monitor, maximize = SELECT_BY[config.select_by]
    use_cuda = torch.cuda.is_available() and config.accelerator in ("auto", "gpu", "cuda")
    # Some CUDA kernels have no deterministic version: warn there instead of failing.
    deterministic: bool | str = config.deterministic
    if config.deterministic and use_cuda:
        deterministic = "warn"
    callbacks: list[Callback] = [
        EarlyStopping(monitor=monitor, mode="max" if maximize else "min", patience=config.patience)
    ]
    observer = _EPOCH_OBSERVER.get()
    if observer is not None:
        callbacks.append(EpochReporter(config.method, observer))
    plugins = []
    if config.checkpoint_dir is not None:
        # monitor=None with save_top_k=1 keeps one file, rewritten every epoch.
        checkpoint = ModelCheckpoint(
            dirpath=config.checkpoint_dir,
            filename=CHECKPOINT_NAME,
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
        )
        callbacks += [ShufflingState(), checkpoint]
        plugins.append(AtomicCheckpointIO())
    return L.Trainer(
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=training_strategy(config, manual_optimization),
        # the samplers shard each batch over the processes themselves (ShuffledBatches)
        use_distributed_sampler=False,
        max_epochs=config.max_epochs,
        deterministic=deterministic,
        callbacks=callbacks,
        plugins=plugins,
        enable_checkpointing=config.checkpoint_dir is not None,
        enable_progress_bar=progress,
        enable_model_summary=False,
        logger=logger,
        num_sanity_val_steps=0,
        fast_dev_run=config.fast_dev_run,
    )


def training_strategy(config: TrainConfig, manual_optimization: bool) -> Strategy | str:
    """Lightning's DDP when the fit runs in more than one process or ``strategy: ddp`` asks
    for it, else Lightning's choice for one device.

    A manually optimised learner (the bi-level one) backpropagates its Target loss into the
    Target alone, so DDP must expect the Bridge's parameters to go without gradients there
    (``find_unused_parameters``); the Bridge's own steps are reduced by the learner.
    """
    if config.strategy == "auto" and config.devices * config.num_nodes == 1:
        return "auto"
    return DDPStrategy(find_unused_parameters=manual_optimization)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
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
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # resuming
            # under DDP every process scores the whole of rct_val: nothing to reduce
            warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def scoped_torch_settings(n_threads: int | None) -> Iterator[None]:
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
