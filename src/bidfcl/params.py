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

from bidfcl.contract import PROPENSITY_FLOOR, RCT_TEST, check_budget
from bidfcl.gate import PromoteParams
from bidfcl.io import atomic_write
from bidfcl.methods import METHODS
from bidfcl.train_config import TrainConfig

PARAMS_FILE = "params.yaml"
RUN_PARAMS_FILE = "params.run.yaml"
"""Beside params.yaml: the last flow run's overrides (data path, budget), read after it."""
RUN_PARAMS_SECTIONS = ("ingest", "train", "evaluate")
RUN_PARAMS_HEADER = """\
# Written by the pipeline flow (flows/bidfcl_flow.py): the overrides of params.yaml that its
# last run used (--data-path, --budget). Every stage reads them after params.yaml, and
# dvc.lock records them, so `dvc repro` reproduces that run. A run without overrides empties
# them. Change settings in params.yaml, not here.
"""
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
    relative to the project root; the smallest RCT propensity accepted (IPW weighs a row by
    1 / propensity); and whether meta.json must hold a valid ``default_budget``. None (the
    default) lets :func:`parse_params` decide: required exactly when ``train.budget`` or
    ``evaluate.budget`` is null, as the pipeline then takes its budget from there."""

    suites: str | None = None
    propensity_floor: float = PROPENSITY_FLOOR
    require_default_budget: bool | None = None

    def __post_init__(self) -> None:
        floor = self.propensity_floor
        if isinstance(floor, bool) or not isinstance(floor, int | float) or not 0 < floor < 1:
            raise ValueError(f"validate.propensity_floor must lie in (0, 1), got {floor!r}")
        required = self.require_default_budget
        if required is not None and not isinstance(required, bool):
            raise ValueError(
                f"validate.require_default_budget must be true, false or null, got {required!r}"
            )


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
class TrackingParams:
    """``tracking:`` — the MLflow store every training run and the registry live in
    (``uri``: a sqlite path relative to the project root, or an ``http(s)://`` tracking server
    or ``postgresql://`` database used as it is; ``MLFLOW_TRACKING_URI`` overrides it) and the
    experiment the runs are grouped under. Where runs are logged changes no result, so no
    stage lists this section as a DVC param."""

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "bidfcl"


@dataclass(frozen=True)
class Params:
    """The whole params file, one typed section per stage."""

    ingest: IngestParams = field(default_factory=IngestParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    promote: PromoteParams = field(default_factory=PromoteParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)


def load_params(
    path: Path | str = PARAMS_FILE,
    overrides: Mapping[str, Any] | None = None,
    run_overrides: bool = True,
) -> Params:
    """Read a params file, then (with ``run_overrides``) the overrides the last flow run
    recorded in ``params.run.yaml`` beside it, then ``overrides`` (see :func:`parse_params`).

    ``dvc repro`` and ``bidfcl stage`` thereby run with what the last flow run used, as
    dvc.lock records it, while params.yaml stays as its owner wrote it.
    """
    path = Path(path)
    raw = _read_mapping(path)
    recorded = read_run_overrides(path.parent) if run_overrides else {}
    return parse_params(raw, {**recorded, **(overrides or {})}, origin=str(path))


def read_run_overrides(root: Path) -> dict[str, Any]:
    """The dotted overrides recorded in ``root/params.run.yaml`` ({} if there is none)."""
    path = Path(root) / RUN_PARAMS_FILE
    if not path.exists():
        return {}
    raw = _read_mapping(path)
    unknown = sorted(set(raw) - set(RUN_PARAMS_SECTIONS))
    if unknown:
        raise ValueError(f"{path}: only {list(RUN_PARAMS_SECTIONS)} may be overridden: {unknown}")
    return {
        f"{section}.{key}": value
        for section in RUN_PARAMS_SECTIONS
        for key, value in _section(raw, section, str(path)).items()
    }


def write_run_overrides(root: Path, overrides: Mapping[str, Any]) -> None:
    """Record a flow run's dotted overrides in ``root/params.run.yaml`` (every overridable
    section present, so DVC finds the params each stage lists; a run without overrides
    leaves them empty)."""
    tree: dict[str, Any] = {section: {} for section in RUN_PARAMS_SECTIONS}
    for dotted, value in overrides.items():
        if dotted.split(".")[0] not in RUN_PARAMS_SECTIONS:
            raise ValueError(f"{dotted}: only {list(RUN_PARAMS_SECTIONS)} may be overridden")
        _assign(tree, dotted, value)
    text = RUN_PARAMS_HEADER + yaml.safe_dump(tree, sort_keys=True)
    atomic_write(Path(root) / RUN_PARAMS_FILE, lambda tmp: tmp.write_text(text))


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: params file not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: must hold a mapping of sections")
    return raw


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
    budgets = {name: _section(raw, name, origin).get("budget") for name in ("train", "evaluate")}
    for name, budget in budgets.items():  # before any stage runs, so none writes a thing
        overridden = (overrides or {}).get(f"{name}.budget") is not None
        if budget is not None:
            check_budget(
                budget, f"{origin} (overridden)" if overridden else origin, f"{name}.budget"
            )
    validate = _typed(ValidateParams, _section(raw, "validate", origin), "validate", origin)
    if validate.require_default_budget is None:
        validate = replace(validate, require_default_budget=None in budgets.values())
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
        validate=validate,
        train=train_params,
        evaluate=_typed(EvaluateParams, _section(raw, "evaluate", origin), "evaluate", origin),
        promote=_typed(PromoteParams, _section(raw, "promote", origin), "promote", origin),
        tracking=_typed(TrackingParams, _section(raw, "tracking", origin), "tracking", origin),
    )


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
