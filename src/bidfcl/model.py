"""The uplift network every learner trains, its feature scaler, and the saved-model folder.

One network predicts, for every user and every treatment, the expected revenue and the
expected cost. A trained model travels as a folder (``weights.pt`` + ``model.json``) so that
evaluation, promotion and serving rebuild exactly the network that was trained, on exactly
the feature columns it was trained on.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bidfcl.io import replace_dir, write_json

WEIGHTS_FILE = "weights.pt"
MODEL_FILE = "model.json"
FORMAT_VERSION = 1
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


class FeatureMismatchError(ValueError):
    """The data's feature columns differ from those the model was trained on."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the network: trunk widths, dropout between trunk layers, trunk activation."""

    hidden: tuple[int, ...] = (128, 64, 32)
    dropout: float = 0.0
    activation: str = "relu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(w) for w in self.hidden))
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(
                f"hidden widths must be a non-empty list of positive ints: {self.hidden}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1): {self.dropout}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} not in {sorted(ACTIVATIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hidden": list(self.hidden)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        return cls(
            hidden=tuple(raw["hidden"]), dropout=float(raw["dropout"]), activation=raw["activation"]
        )


class FeatureScaler(nn.Module):
    """Standardises features with the training data's mean and std, kept as buffers.

    Buffers travel with ``state_dict`` and ``.to(device)``, so the statistics are saved with
    the weights and applied on whatever device the network runs on. A feature whose std is
    below ``min_std`` (constant in training) is only centred: dividing by a tiny std would
    blow up any value that differs at prediction time.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, n_features: int, min_std: float = 1e-6) -> None:
        super().__init__()
        self.min_std = min_std
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    def fit(self, x: torch.Tensor) -> FeatureScaler:
        """Set mean/std from training features ``x`` (N, d); returns self."""
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"expected features of shape (N, {self.mean.shape[0]}), got {tuple(x.shape)}"
            )
        if x.shape[0] == 0 or not bool(torch.isfinite(x).all()):
            raise ValueError("cannot fit the scaler: features are empty or hold NaN/inf")
        x64 = x.detach().to(torch.float64)
        std = x64.std(dim=0, unbiased=False)
        std = torch.where(std < self.min_std, torch.ones_like(std), std)
        self.mean.copy_(x64.mean(dim=0))
        self.std.copy_(std)
        return self

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x)


class UpliftNet(nn.Module):
    """Multi-head MLP: a shared trunk, then one revenue and one cost head per treatment.

    The heads are the 2*M output units of one final linear layer (each unit is its own
    linear head on the shared trunk). Both outputs pass through softplus: the contract's
    revenue and cost are non-negative, so their expectations are too, and a non-negative
    cost keeps the Lagrangian score r - lambda*c monotone in lambda.
    """

    def __init__(
        self, n_features: int, n_treatments: int, config: ModelConfig = ModelConfig()
    ) -> None:
        super().__init__()
        if n_features < 1 or n_treatments < 1:
            raise ValueError(
                f"need n_features >= 1 and n_treatments >= 1, got {n_features}, {n_treatments}"
            )
        self.n_features = n_features
        self.n_treatments = n_treatments
        self.config = config
        layers: list[nn.Module] = []
        width_in = n_features
        for width in config.hidden:
            layers += [nn.Linear(width_in, width), ACTIVATIONS[config.activation]()]
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            width_in = width
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.Linear(width_in, 2 * n_treatments)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised features (N, d) -> (revenue_hat (N, M), cost_hat (N, M)), both >= 0."""
        out = F.softplus(self.heads(self.trunk(x)))
        return out[:, : self.n_treatments], out[:, self.n_treatments :]


@dataclass
class UpliftModel:
    """A network with everything needed to use it on new data: scaler, columns, arm names.

    ``metadata`` is free JSON (method, dataset source, lambda*, epochs...) saved alongside.
    """

    net: UpliftNet
    scaler: FeatureScaler
    feature_columns: list[str]
    treatment_names: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.feature_columns) != self.net.n_features:
            raise ValueError(
                f"{len(self.feature_columns)} feature columns for a net over {self.net.n_features}"
            )
        if len(self.treatment_names) != self.net.n_treatments:
            raise ValueError(
                f"{len(self.treatment_names)} treatment names for a net with "
                f"{self.net.n_treatments} arms"
            )

    @classmethod
    def build(
        cls,
        x_train: torch.Tensor,
        feature_columns: list[str],
        treatment_names: list[str],
        config: ModelConfig = ModelConfig(),
        metadata: dict[str, Any] | None = None,
    ) -> UpliftModel:
        """A fresh (untrained) network with its scaler fitted on the raw training features."""
        n_features = len(feature_columns)
        scaler = FeatureScaler(n_features).fit(x_train.cpu())
        net = UpliftNet(n_features, len(treatment_names), config)
        return cls(net, scaler, list(feature_columns), list(treatment_names), metadata or {})

    @property
    def config(self) -> ModelConfig:
        return self.net.config

    @property
    def n_treatments(self) -> int:
        return self.net.n_treatments

    @property
    def device(self) -> torch.device:
        return self.scaler.mean.device

    def to(self, device: torch.device | str) -> UpliftModel:
        self.net.to(device)
        self.scaler.to(device)
        return self

    def forward(self, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable predictions from raw features (for training loops)."""
        return self.net(self.scaler(x_raw))

    def predict(
        self, x_raw: torch.Tensor, batch_size: int = 65536
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted (revenue, cost), each (N, M), on the model's device; eval mode, no grad.

        Runs in chunks of ``batch_size`` rows so millions of users fit in memory, and
        restores the network's train/eval mode afterwards so it is safe inside training.
        Uses ``no_grad`` rather than ``inference_mode`` so the outputs can serve as
        constants (e.g. pseudo-labels) in a later autograd graph.
        """
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                parts = [
                    self.forward(chunk.to(self.device, torch.float32))
                    for chunk in x_raw.split(batch_size)
                ]
        finally:
            self.net.train(was_training)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def save(self, folder: Path | str) -> Path:
        """Write the model folder atomically (built beside it, then swapped in), so no
        reader ever sees a half-written model folder."""

        def build(staging: Path) -> None:
            torch.save(
                {"net": _cpu_state(self.net), "scaler": _cpu_state(self.scaler)},
                staging / WEIGHTS_FILE,
            )
            write_json(staging / MODEL_FILE, self._description())

        return replace_dir(Path(folder), build)

    def _description(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "n_features": self.net.n_features,
            "n_treatments": self.n_treatments,
            "feature_columns": list(self.feature_columns),
            "treatment_names": list(self.treatment_names),
            "config": self.config.to_dict(),
            "scaler_min_std": self.scaler.min_std,
            "metadata": self.metadata,
        }

    @classmethod
    def load(
        cls,
        folder: Path | str,
        expected_features: list[str] | None = None,
        map_location: torch.device | str = "cpu",
    ) -> UpliftModel:
        """Rebuild a saved model; weights are read with ``weights_only=True`` (no pickled code).

        With ``expected_features`` (the data's feature columns) it refuses to load a model
        trained on other columns, naming the missing, extra or misordered ones.
        """
        folder = Path(folder)
        for name in (MODEL_FILE, WEIGHTS_FILE):
            if not (folder / name).exists():
                raise FileNotFoundError(f"{folder / name}: not a saved model (file missing)")
        description = json.loads((folder / MODEL_FILE).read_text())
        if description.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{folder / MODEL_FILE}: format_version {description.get('format_version')!r}, "
                f"this code reads {FORMAT_VERSION}"
            )
        feature_columns = [str(c) for c in description["feature_columns"]]
        if expected_features is not None:
            check_feature_columns(feature_columns, list(expected_features))
        config = ModelConfig.from_dict(description["config"])
        net = UpliftNet(len(feature_columns), int(description["n_treatments"]), config)
        scaler = FeatureScaler(len(feature_columns), float(description["scaler_min_std"]))
        try:
            state = torch.load(folder / WEIGHTS_FILE, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:  # a pickle naming code: the file is not weights
            raise ValueError(
                f"{folder / WEIGHTS_FILE}: holds objects other than tensors; not loaded"
            ) from error
        net.load_state_dict(state["net"])
        scaler.load_state_dict(state["scaler"])
        model = cls(
            net,
            scaler,
            feature_columns,
            [str(n) for n in description["treatment_names"]],
            dict(description.get("metadata", {})),
        )
        return model.to(map_location)


def check_feature_columns(trained_on: list[str], given: list[str]) -> None:
    """Raise FeatureMismatchError unless ``given`` equals ``trained_on``, in the same order."""
    if trained_on == given:
        return
    missing = [c for c in trained_on if c not in given]
    extra = [c for c in given if c not in trained_on]
    repeated = sorted({c for c in given if given.count(c) > 1})
    problems = []
    if missing:
        problems.append(f"missing from the data: {missing}")
    if extra:
        problems.append(f"not known to the model: {extra}")
    if repeated:
        problems.append(f"repeated in the data: {repeated}")
    if not (missing or extra or repeated):
        moved = [c for c, d in zip(trained_on, given, strict=True) if c != d]
        problems.append(f"same columns in another order; misplaced: {moved}")
    raise FeatureMismatchError(
        "feature columns differ from those the model was trained on ("
        + "; ".join(problems)
        + f"). Model expects {trained_on}"
    )


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}
