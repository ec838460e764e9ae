"""params.yaml as typed settings: one dataclass per section, behind one loader.

Each pipeline stage receives only its own section, so what a stage reads is visible in its
signature and matches the ``params:`` DVC lists for it. An unknown key anywhere fails
loudly with the key named, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from bidfcl.contract import RCT_TEST
from bidfcl.gate import PromoteParams
from bidfcl.methods import METHODS
from bidfcl.train_config import TrainConfig

PARAMS_FILE = "params.yaml"
SIMULATE = "simulate"
SectionT = TypeVar("SectionT")


@dataclass(frozen=True)
class IngestParams:
    """``ingest:`` — where the batch comes from, and the simulator's size when simulating."""

    source: str = SIMULATE
    n_obs: int = 200_000
    n_rct: int = 40_000
    n_treatments: int = 5
    seed: int = 0


@dataclass(frozen=True)
class ValidateParams:
    """``validate:`` — the folder of Great Expectations suites (None: the installed ones),
    relative to the project root."""

    suites: str | None = None


@dataclass(frozen=True)
class TrainParams:
    """``train:`` — the candidate's learner settings, and the baselines the pipeline trains
    and evaluates beside it with the same settings."""

    config: TrainConfig = field(default_factory=TrainConfig)
    baselines: tuple[str, ...] = ()

    @property
    def methods(self) -> list[str]:
        """The candidate first, then the baselines, without repeats."""
        return list(dict.fromkeys([self.config.method, *self.baselines]))

    def config_for(self, method: str) -> TrainConfig:
        return replace(self.config, method=method)


@dataclass(frozen=True)
class EvaluateParams:
    """``evaluate:`` — the budget (mean cost per user; None = dataset default), the
    estimator, the held-out table every model (and the champion) is scored on, and the
    method every model's deployed allocation is compared with, paired on the same users."""

    budget: float | None = None
    estimator: str = "dr"
    table: str = RCT_TEST
    reference: str = "tsm-rct"


@dataclass(frozen=True)
class Params:
    """The whole params file, one typed section per stage."""

    ingest: IngestParams = field(default_factory=IngestParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    promote: PromoteParams = field(default_factory=PromoteParams)


def load_params(
    path: Path | str = PARAMS_FILE, overrides: Mapping[str, Any] | None = None
) -> Params:
    """Read a params file (see :func:`parse_params` for ``overrides``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: params file not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: must hold a mapping of sections")
    return parse_params(raw, overrides, origin=str(path))


def parse_params(
    raw: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    origin: str = PARAMS_FILE,
) -> Params:
    """Type every section of a params mapping; a missing section means its defaults.

    ``overrides`` maps dotted keys (``train.seed``) to values that replace the mapping's; a
    None value leaves it as it is (an unset CLI option).
    """
    raw = copy.deepcopy(dict(raw))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _assign(raw, dotted, value)
    unknown = sorted(set(raw) - {f.name for f in fields(Params)})
    if unknown:
        raise ValueError(f"{origin}: unknown section(s) {unknown}")
    train = dict(_section(raw, "train", origin))
    baselines = tuple(str(m) for m in train.pop("baselines", None) or ())
    train_params = TrainParams(_typed(TrainConfig, train, "train", origin), baselines)
    unknown_methods = [m for m in train_params.methods if m not in METHODS]
    if unknown_methods:
        raise ValueError(
            f"{origin}: unknown method(s) {unknown_methods}; choose from {list(METHODS)}"
        )
    return Params(
        ingest=_typed(IngestParams, _section(raw, "ingest", origin), "ingest", origin),
        validate=_typed(ValidateParams, _section(raw, "validate", origin), "validate", origin),
        train=train_params,
        evaluate=_typed(EvaluateParams, _section(raw, "evaluate", origin), "evaluate", origin),
        promote=_typed(PromoteParams, _section(raw, "promote", origin), "promote", origin),
    )


def set_params(path: Path | str, values: Mapping[str, Any]) -> None:
    """Set dotted keys (``ingest.source``) in the params file, keeping its comments.

    The flow records a run's data path and budget here, so DVC's lock matches what ran.
    """
    from dvc.utils.serialize import modify_yaml

    with modify_yaml(str(path)) as data:
        for dotted, value in values.items():
            _assign(data, dotted, value)


def _assign(tree: Any, dotted: str, value: Any) -> None:
    """Set ``tree[a][b] = value`` for ``dotted = "a.b"``, creating missing sections."""
    *parents, key = dotted.split(".")
    for parent in parents:
        if tree.get(parent) is None:
            tree[parent] = {}
        tree = tree[parent]
    tree[key] = value


def _section(raw: Mapping[str, Any], name: str, origin: str) -> Mapping[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{origin}: section {name!r} must be a mapping, got {value!r}")
    return value


def _typed(cls: type[SectionT], values: Mapping[str, Any], name: str, origin: str) -> SectionT:
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{origin}: unknown {name} setting(s) {unknown}; known: {sorted(known)}")
    return cls(**values)
