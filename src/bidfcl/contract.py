"""The data contract: one dataset folder, its metadata, and the typed view every stage uses.

A dataset folder holds ``meta.json``, ``obs.parquet``, ``rct_train.parquet``,
``rct_val.parquet``, ``rct_test.parquet`` and, for simulated data, ``truth.parquet``.
Everything downstream (validation, training, evaluation) reads data through this module,
so the column names and the rules about them live in exactly one place.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from bidfcl.io import write_json, write_parquet

META_FILE = "meta.json"
TRUTH_FILE = "truth.parquet"
OBS = "obs"
RCT_TRAIN = "rct_train"
RCT_VAL = "rct_val"
RCT_TEST = "rct_test"
TABLES: tuple[str, ...] = (OBS, RCT_TRAIN, RCT_VAL, RCT_TEST)
RCT_TABLES: tuple[str, ...] = (RCT_TRAIN, RCT_VAL, RCT_TEST)

USER_ID = "user_id"
TREATMENT = "treatment"
REVENUE = "revenue"
COST = "cost"
PROPENSITY = "propensity"
OUTCOME_COLUMNS: tuple[str, ...] = (REVENUE, COST)


def table_file(table: str) -> str:
    """File name of a table inside a dataset folder."""
    return f"{table}.parquet"


def truth_revenue_columns(n_treatments: int) -> list[str]:
    return [f"revenue_{j}" for j in range(n_treatments)]


def truth_cost_columns(n_treatments: int) -> list[str]:
    return [f"cost_{j}" for j in range(n_treatments)]


class DataContractError(ValueError):
    """A dataset folder does not follow the contract; the message names the file and rule."""


@dataclass(frozen=True)
class DatasetMeta:
    """Contents of ``meta.json``. Unknown keys are kept in ``extra`` and written back."""

    n_treatments: int
    treatment_names: list[str]
    feature_columns: list[str]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    REQUIRED_KEYS = ("n_treatments", "treatment_names", "feature_columns", "source")

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_treatments": self.n_treatments,
            "treatment_names": list(self.treatment_names),
            "feature_columns": list(self.feature_columns),
            "source": self.source,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], origin: str = META_FILE) -> DatasetMeta:
        missing = [k for k in cls.REQUIRED_KEYS if k not in raw]
        if missing:
            raise DataContractError(f"{origin}: missing required key(s) {missing}")
        extra = {k: v for k, v in raw.items() if k not in cls.REQUIRED_KEYS}
        return cls(
            n_treatments=int(raw["n_treatments"]),
            treatment_names=[str(n) for n in raw["treatment_names"]],
            feature_columns=[str(c) for c in raw["feature_columns"]],
            source=str(raw["source"]),
            extra=extra,
        )

    def budget_or_default(self, budget: float | None) -> float:
        """``budget`` (mean cost per user) if given, else this dataset's ``default_budget``."""
        if budget is not None:
            return float(budget)
        if "default_budget" not in self.extra:
            raise ValueError(
                "no budget given (train.budget / --budget) and meta.json has no default_budget: "
                "state the mean cost per user the policy may spend"
            )
        return float(self.extra["default_budget"])

    @property
    def row_columns(self) -> list[str]:
        """Columns every table row carries, in canonical order."""
        return [USER_ID, *self.feature_columns, TREATMENT, REVENUE, COST, PROPENSITY]


@dataclass(frozen=True)
class LoggedData:
    """Logged rows as tensors: the single type passed between data, learners and evaluation.

    ``propensity`` is NaN where the logging probability is unknown (possible for OBS).
    ``weight`` is the per-row weight a learner gives a row's factual loss (None: every row
    weighs 1), e.g. inverse propensities; evaluation ignores it.
    """

    user_id: torch.Tensor  # int64 (N,)
    x: torch.Tensor  # float32 (N, d)
    treatment: torch.Tensor  # int64 (N,)
    revenue: torch.Tensor  # float32 (N,)
    cost: torch.Tensor  # float32 (N,)
    propensity: torch.Tensor  # float32 (N,)
    n_treatments: int
    weight: torch.Tensor | None = None  # float32 (N,)

    # the per-row tensor fields, in order (weight last: the one that may be None)
    ROW_FIELDS: ClassVar[tuple[str, ...]] = (
        "user_id",
        "x",
        "treatment",
        "revenue",
        "cost",
        "propensity",
        "weight",
    )

    def __len__(self) -> int:
        return int(self.treatment.shape[0])

    @property
    def n_rows(self) -> int:
        return len(self)

    def _columns(self) -> dict[str, torch.Tensor | None]:
        return {name: getattr(self, name) for name in self.ROW_FIELDS}

    def to(self, device: torch.device | str) -> LoggedData:
        """The rows on ``device`` (Lightning moves a batch through this method)."""
        moved = {k: None if v is None else v.to(device) for k, v in self._columns().items()}
        return replace(self, **moved)

    def rows(self, index: torch.Tensor | slice) -> LoggedData:
        """The rows at ``index`` (a tensor of row numbers, a mask or a slice), one gather."""
        taken = {k: None if v is None else v[index] for k, v in self._columns().items()}
        return replace(self, **taken)

    def with_weight(self, weight: torch.Tensor) -> LoggedData:
        return replace(self, weight=weight.to(torch.float32))

    @property
    def has_propensity(self) -> bool:
        return bool(torch.isfinite(self.propensity).all())


def concat_logged(parts: Sequence[LoggedData]) -> LoggedData:
    """Rows of several tables stacked in order (e.g. RCT train followed by OBS); a part
    without weights counts as weighing 1 when another part has them."""
    columns = {
        name: torch.cat([getattr(part, name) for part in parts])
        for name in LoggedData.ROW_FIELDS[:-1]
    }
    weight = None
    if any(part.weight is not None for part in parts):
        weight = torch.cat([torch.ones(len(p)) if p.weight is None else p.weight for p in parts])
    return LoggedData(**columns, n_treatments=parts[0].n_treatments, weight=weight)


@dataclass(frozen=True)
class Truth:
    """Expected revenue and cost of every arm for a set of users (simulated data only)."""

    revenue: torch.Tensor  # float (N, M)
    cost: torch.Tensor  # float (N, M)

    def to(self, device: torch.device | str) -> Truth:
        return Truth(self.revenue.to(device), self.cost.to(device))

    def policy_value(self, treatment: torch.Tensor) -> tuple[float, float]:
        """True mean revenue and mean cost per user of giving each user ``treatment``."""
        idx = treatment.to(self.revenue.device).long().unsqueeze(1)
        rev = self.revenue.gather(1, idx).mean()
        cost = self.cost.gather(1, idx).mean()
        return float(rev), float(cost)


@dataclass
class Dataset:
    """A loaded dataset folder: metadata, the four row tables and optional ground truth."""

    meta: DatasetMeta
    tables: dict[str, pd.DataFrame]
    truth: pd.DataFrame | None = None
    path: Path | None = None

    def table(self, name: str) -> pd.DataFrame:
        if name not in self.tables:
            raise KeyError(f"unknown table {name!r}; expected one of {TABLES}")
        return self.tables[name]

    def logged(self, name: str, device: torch.device | str = "cpu") -> LoggedData:
        return frame_to_logged(self.table(name), self.meta).to(device)

    def truth_for(self, name: str, device: torch.device | str = "cpu") -> Truth | None:
        """Ground truth aligned row by row with table ``name`` (None without truth)."""
        if self.truth is None:
            return None
        return truth_for_users(self.truth, self.table(name)[USER_ID], self.meta.n_treatments).to(
            device
        )


def truth_for_users(truth: pd.DataFrame, user_ids: pd.Series, n_treatments: int) -> Truth:
    """Rows of the truth table for ``user_ids``, in that order."""
    indexed = truth.set_index(USER_ID)
    missing = ~user_ids.isin(indexed.index)
    if missing.any():
        raise DataContractError(
            f"{TRUTH_FILE}: no ground truth for {int(missing.sum())} user(s), "
            f"e.g. user_id={user_ids[missing].iloc[0]}"
        )
    rows = indexed.loc[user_ids.to_numpy()]
    return Truth(
        revenue=_tensor(rows[truth_revenue_columns(n_treatments)], np.float64),
        cost=_tensor(rows[truth_cost_columns(n_treatments)], np.float64),
    )


def _tensor(values: pd.Series | pd.DataFrame, dtype: type) -> torch.Tensor:
    """A writable, contiguous tensor copy (pandas may hand out read-only views)."""
    return torch.from_numpy(np.array(values.to_numpy(dtype), dtype=dtype, order="C", copy=True))


def frame_to_logged(frame: pd.DataFrame, meta: DatasetMeta) -> LoggedData:
    """Convert one table to tensors (features float32, outcomes float32, ids int64)."""
    missing = [c for c in meta.row_columns if c not in frame.columns and c != PROPENSITY]
    if missing:
        raise DataContractError(f"table is missing column(s) {missing}")
    prop = (
        frame[PROPENSITY].to_numpy(np.float32, na_value=np.nan)
        if PROPENSITY in frame.columns
        else np.full(len(frame), np.nan, dtype=np.float32)
    )
    return LoggedData(
        user_id=_tensor(frame[USER_ID], np.int64),
        x=_tensor(frame[meta.feature_columns], np.float32),
        treatment=_tensor(frame[TREATMENT], np.int64),
        revenue=_tensor(frame[REVENUE], np.float32),
        cost=_tensor(frame[COST], np.float32),
        propensity=torch.from_numpy(np.array(prop, copy=True)),
        n_treatments=meta.n_treatments,
    )


# ----------------------------------------------------------------------------- folder I/O


def read_meta(folder: Path) -> DatasetMeta:
    path = Path(folder) / META_FILE
    if not path.exists():
        raise DataContractError(f"{path}: file not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataContractError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise DataContractError(f"{path}: must hold a JSON object")
    return DatasetMeta.from_dict(raw, origin=str(path))


def read_table(folder: Path, table: str) -> pd.DataFrame:
    path = Path(folder) / table_file(table)
    if not path.exists():
        raise DataContractError(f"{path}: file not found")
    return pd.read_parquet(path)


def load_dataset(folder: Path | str, tables: tuple[str, ...] = TABLES) -> Dataset:
    """Read a dataset folder (the named tables, metadata and truth if present)."""
    folder = Path(folder)
    meta = read_meta(folder)
    frames = {name: read_table(folder, name) for name in tables}
    truth_path = folder / TRUTH_FILE
    truth = pd.read_parquet(truth_path) if truth_path.exists() else None
    return Dataset(meta=meta, tables=frames, truth=truth, path=folder)


def save_dataset(
    folder: Path | str,
    meta: DatasetMeta,
    tables: dict[str, pd.DataFrame],
    truth: pd.DataFrame | None = None,
) -> Path:
    """Write a dataset folder; each file is written atomically, metadata last.

    Row tables are written with columns in canonical order so files are comparable.
    """
    folder = Path(folder)
    unknown = set(tables) - set(TABLES)
    if unknown:
        raise DataContractError(f"unknown table name(s) {sorted(unknown)}; expected {TABLES}")
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        ordered = [c for c in meta.row_columns if c in frame.columns]
        extras = [c for c in frame.columns if c not in ordered]
        write_parquet(folder / table_file(name), frame[ordered + extras])
    if truth is not None:
        write_parquet(folder / TRUTH_FILE, truth)
    write_json(folder / META_FILE, meta.to_dict())
    return folder
