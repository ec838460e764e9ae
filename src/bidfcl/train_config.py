"""The ``train:`` settings every learner reads, checked once when they are built.

params.yaml's ``train:`` section becomes a :class:`TrainConfig` (through
:mod:`bidfcl.params`); the library defaults equal the shipped params.yaml, so code that
builds one by hand trains what the pipeline trains. Which method names exist is
:mod:`bidfcl.methods`' business, not this module's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bidfcl.decision import DecisionSettings
from bidfcl.model import ModelConfig

# select_by -> (the logged validation metric, whether larger is better)
SELECT_BY: dict[str, tuple[str, bool]] = {"loss": ("val_loss", False), "eom": ("val_eom", True)}
# Settings that name one of a few variants, and those variants.
CHOICES: dict[str, tuple[str, ...]] = {
    "select_by": tuple(SELECT_BY),
    "bridge": ("labels", "gate", "ipw"),
    # what a Bridge's gates may depend on: the OBS row (its features, logged arm, outcomes and
    # the Teacher/anchor predictions), or only the arm and outcome (one gate each, all users)
    "bridge_inputs": ("row", "arm"),
    "hypergradient": ("implicit", "explicit"),
    "curvature": ("gauss_newton", "hessian"),
    # the method a bidfcl-* Teacher is trained by (on the lower split of rct_train, with OBS
    # for the two that use it)
    "teacher": ("tsm-rct", "tsm-obs-ft", "tsm-both"),
    # how a bidfcl-* upper level estimates the policy value on RCT rows
    "upper_estimator": ("ipw", "dr"),
    # "ddp": Lightning's DDP, one process per device (launched by Lightning itself, or by
    # torchrun / SLURM, which it detects); spawn-style launchers lose the learner's state
    "strategy": ("auto", "ddp"),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything in params.yaml's ``train:`` section (see that file for the meaning).

    ``budget`` is the mean cost per user; None takes the dataset's ``default_budget``.
    ``checkpoint_dir``: a folder of this run's own where each training phase checkpoints
    every epoch, so that a rerun after a crash resumes instead of starting over (None: no
    checkpoints, as a library call wants; the pipeline's train stage sets one).
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
    cg_tol: float = 0.3
    cg_damping: float = 1.0
    lookahead_lr: float = 1e-3
    bridge_lr: float = 3e-2
    bridge_hidden: tuple[int, ...] = (32,)
    bridge_warmup_epochs: int = 1
    pseudo_label_weight: float = 1.0
    bridge: str = "labels"
    bridge_inputs: str = "arm"
    rct_weight: float = 1.0
    upper_fraction: float = 0.3
    upper_estimator: str = "ipw"
    teacher: str = "tsm-obs-ft"
    fixed_gate: float | None = None
    hypergradient: str = "implicit"
    curvature: str = "gauss_newton"
    curvature_fraction: float = 0.5
    audit_bridge_steps: bool = False
    calibrate_spend: bool = True
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    deterministic: bool = True
    num_workers: int = 0
    num_threads: int | None = None
    fast_dev_run: bool = False
    log_dir: str | None = None
    checkpoint_dir: str | None = None
    stream_obs_above_mb: float | None = 4096.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(w) for w in self.hidden))
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
        if self.devices < 1 or self.num_nodes < 1:
            raise ValueError(
                f"devices and num_nodes must be >= 1, got {self.devices} and {self.num_nodes}"
            )
        if self.devices * self.num_nodes > 1 and self.checkpoint_dir is not None:
            raise ValueError(
                "checkpoint_dir (resuming a crashed fit) works in one process only: with "
                f"devices * num_nodes = {self.devices * self.num_nodes}, set it to null"
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or null, got {self.num_threads}")
        if self.stream_obs_above_mb is not None and not self.stream_obs_above_mb >= 0:
            limit = self.stream_obs_above_mb
            raise ValueError(f"stream_obs_above_mb must be >= 0 or null, got {limit}")
        if self.alpha < 0 or self.weight_decay < 0 or self.num_workers < 0:
            raise ValueError("alpha, weight_decay and num_workers must be >= 0")
        nonnegative = (self.cg_damping, self.pseudo_label_weight, self.bridge_warmup_epochs)
        if min(*nonnegative, self.rct_weight) < 0:
            raise ValueError(
                "cg_damping, pseudo_label_weight, bridge_warmup_epochs and rct_weight must be >= 0"
            )
        if not 0 <= self.upper_fraction < 1:
            raise ValueError(f"upper_fraction must lie in [0, 1), got {self.upper_fraction}")
        if self.upper_estimator == "dr" and self.upper_fraction == 0:
            raise ValueError(
                "upper_estimator dr needs upper_fraction > 0: its baseline, the Teacher, must "
                "not have seen the upper level's rows"
            )
        if self.upper_estimator == "dr" and self.method == "bidfcl-pifd":
            raise ValueError(
                "upper_estimator dr is defined for a PPL upper level, not bidfcl-pifd's"
            )
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}"
                )
        if self.fixed_gate is not None and not 0 <= self.fixed_gate <= 1:
            raise ValueError(f"fixed_gate must lie in [0, 1] or be null, got {self.fixed_gate}")
        if not 0 < self.curvature_fraction <= 1:
            raise ValueError(
                f"curvature_fraction must lie in (0, 1], got {self.curvature_fraction}"
            )
        if not self.dual_lambda_scales or min(self.dual_lambda_scales) < 0:
            raise ValueError(
                f"dual_lambda_scales must be non-empty and >= 0: {self.dual_lambda_scales}"
            )

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(hidden=self.hidden, dropout=self.dropout, activation=self.activation)

    @property
    def decision_settings(self) -> DecisionSettings:
        return DecisionSettings(tau=self.tau, h=self.h, dual_lambda_scales=self.dual_lambda_scales)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "hidden": list(self.hidden),
            "bridge_hidden": list(self.bridge_hidden),
            "dual_lambda_scales": list(self.dual_lambda_scales),
        }
