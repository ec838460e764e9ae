"""The data contract: one dataset folder, its metadata, and the typed view every stage uses.

A dataset folder holds ``meta.json``, ``obs.parquet``, ``rct_train.parquet``,
``rct_val.parquet``, ``rct_test.parquet`` and, for simulated data, ``truth.parquet``.
Everything downstream (validation, training, evaluation) reads data through this module,
so the column names and the rules about them live in exactly one place.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
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
RESERVED_COLUMNS: tuple[str, ...] = (USER_ID, TREATMENT, *OUTCOME_COLUMNS, PROPENSITY)
"""Column names a feature may not take."""


def table_file(table: str) -> str:
    """File name of a table inside a dataset folder."""
    return f"{table}.parquet"


def truth_revenue_columns(n_treatments: int) -> list[str]:
    return [f"revenue_{j}" for j in range(n_treatments)]


def truth_cost_columns(n_treatments: int) -> list[str]:
    return [f"cost_{j}" for j in range(n_treatments)]


PROPENSITY_FLOOR = 1e-3
"""Smallest RCT propensity validation accepts by default (``validate.propensity_floor``):
IPW weighs a row by 1 / p, so one row at p = 1e-9 outweighs a whole trial."""
BUDGET_RULE = "budget_positive_finite"
N_EXAMPLES = 5
"""How many offending values an error quotes."""
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def rule_message(
    file: str,
    rule: str,
    detail: str = "",
    column: str | None = None,
    *,
    kind: str = "column",
    n_rows: int = 0,
    examples: Sequence[str] = (),
) -> str:
    """One line for a broken rule, ``FILE: column 'C' breaks RULE (DETAIL) in N row(s); e.g. ...``.

    Validation reports and command-line errors share this form, so a reader learns one.
    ``kind`` names what ``column`` is (``key`` for a JSON or YAML key).
    """
    message = f"{file}: {'file' if column is None else f'{kind} {column!r}'} breaks {rule}"
    if detail:
        message += f" ({detail})"
    if n_rows:
        message += f" in {n_rows} row(s)"
    if examples:
        message += "; e.g. " + ", ".join(examples)
    return message


class DataContractError(ValueError):
    """A file does not follow the contract; the message is one line naming the file, the
    column (where there is one) and the rule, which reports can also read as attributes."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        rule: str | None = None,
        column: str | None = None,
        detail: str = "",
    ) -> None:
        super().__init__(message)
        self.file, self.rule, self.column, self.detail = file, rule, column, detail

    @classmethod
    def broken(
        cls,
        file: str,
        rule: str,
        detail: str = "",
        column: str | None = None,
        *,
        kind: str = "column",
        n_rows: int = 0,
        examples: Sequence[str] = (),
    ) -> DataContractError:
        """The error for one broken rule, its message in the :func:`rule_message` form."""
        message = rule_message(
            file, rule, detail, column, kind=kind, n_rows=n_rows, examples=examples
        )
        return cls(message, file=file, rule=rule, column=column, detail=detail)


def budget_problem(budget: Any) -> str | None:
    """Why ``budget`` cannot be spent, or None when it is a finite number > 0.

    A budget is the mean cost per user the policy may spend: 0 or less leaves nothing to
    allocate and no spend to scale curves by, NaN or infinity no knapsack to solve. A budget
    above what every user's dearest arm costs is allowed: it simply does not bind.
    """
    number = isinstance(budget, int | float | np.integer | np.floating)
    number = number and not isinstance(budget, bool | np.bool_)
    if number and math.isfinite(budget) and budget > 0:
        return None
    shown = f"{float(budget):g}" if number else repr(budget)
    return f"the mean cost per user to spend must be a finite number > 0, got {shown}"


def check_budget(budget: Any, file: str | None = None, key: str = "budget") -> float:
    """``budget`` as a float, or a DataContractError naming the file and key it came from
    (``file`` None: an argument)."""
    problem = budget_problem(budget)
    if problem is None:
        return float(budget)
    if file is None:
        message = f"{key} breaks {BUDGET_RULE} ({problem})"
        raise DataContractError(message, rule=BUDGET_RULE, column=key, detail=problem)
    raise DataContractError.broken(file, BUDGET_RULE, problem, key, kind="key")


@dataclass(frozen=True)
class DatasetMeta:
    """Contents of ``meta.json``. Unknown keys are kept in ``extra`` and written back."""

    n_treatments: int
    treatment_names: list[str]
    feature_columns: list[str]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)
    origin: str = field(default=META_FILE, compare=False, repr=False)  # the file, for errors

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
        """Typed metadata; keys that contradict each other are a DataContractError, because
        a model would otherwise be built for the wrong number of arms or features."""
        missing = [k for k in cls.REQUIRED_KEYS if k not in raw]
        if missing:
            raise DataContractError.broken(origin, "required_keys", f"missing key(s) {missing}")
        n_treatments, names, features = (
            raw["n_treatments"],
            raw["treatment_names"],
            raw["feature_columns"],
        )
        problems = {
            "n_treatments": (
                "at_least_two_arms",
                not isinstance(n_treatments, int)
                or isinstance(n_treatments, bool)
                or n_treatments < 2,
                f"an integer >= 2 (control and a treatment), got {n_treatments!r}",
            ),
            "treatment_names": (
                "one_name_per_arm",
                not isinstance(names, list)
                or len(names) != n_treatments
                or len(set(map(str, names))) != len(names),
                f"n_treatments is {n_treatments!r}, so that many distinct names, got {names!r}",
            ),
            "feature_columns": (
                "features_declared",
                not isinstance(features, list)
                or not features
                or len(set(map(str, features))) != len(features)
                or any(str(f) in RESERVED_COLUMNS for f in features),
                f"a non-empty list of distinct names other than {list(RESERVED_COLUMNS)}",
            ),
        }
        for key, (rule, broken, detail) in problems.items():
            if broken:
                raise DataContractError.broken(origin, rule, detail, key, kind="key")
        extra = {k: v for k, v in raw.items() if k not in cls.REQUIRED_KEYS}
        return cls(
            n_treatments=n_treatments,
            treatment_names=[str(n) for n in names],
            feature_columns=[str(c) for c in features],
            source=str(raw["source"]),
            extra=extra,
            origin=origin,
        )

    def budget_or_default(self, budget: float | None) -> float:
        """``budget`` (mean cost per user) if given, else this dataset's ``default_budget``;
        either must be a finite number > 0."""
        if budget is not None:
            return check_budget(budget)
        if "default_budget" not in self.extra:
            raise DataContractError.broken(
                self.origin,
                BUDGET_RULE,
                "no budget given (train.budget, evaluate.budget or --budget) and no "
                "default_budget here: state the mean cost per user the policy may spend",
                "default_budget",
                kind="key",
            )
        return check_budget(self.extra["default_budget"], self.origin, "default_budget")

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

    def file(self, name: str) -> str:
        """Where file ``name`` (a table or ``truth.parquet``) came from, for error messages."""
        file = table_file(name) if name in TABLES else name
        return file if self.path is None else str(self.path / file)

    def logged(self, name: str, device: torch.device | str = "cpu") -> LoggedData:
        """Table ``name`` as tensors, once it passed the contract's row checks."""
        frame = self.table(name)
        return frame_to_logged(frame, self.meta, self.file(name), name in RCT_TABLES).to(device)

    def truth_for(self, name: str, device: torch.device | str = "cpu") -> Truth | None:
        """Ground truth aligned row by row with table ``name`` (None without truth)."""
        if self.truth is None:
            return None
        user_ids = self.table(name)[USER_ID]
        check_user_ids(user_ids, self.file(name))  # ids of another type would find no truth
        return truth_for_users(
            self.truth, user_ids, self.meta.n_treatments, self.file(TRUTH_FILE)
        ).to(device)


def truth_for_users(
    truth: pd.DataFrame, user_ids: pd.Series, n_treatments: int, file: str = TRUTH_FILE
) -> Truth:
    """Rows of the truth table for ``user_ids``, in that order."""
    columns = [*truth_revenue_columns(n_treatments), *truth_cost_columns(n_treatments)]
    missing_columns = [c for c in [USER_ID, *columns] if c not in truth.columns]
    if missing_columns:
        detail = f"missing {missing_columns}"
        raise DataContractError.broken(file, "required_columns", detail, missing_columns[0])
    check_user_ids(truth[USER_ID], file)
    indexed = truth.set_index(USER_ID)
    missing = ~user_ids.isin(indexed.index)
    if missing.any():
        raise DataContractError.broken(
            file,
            "truth_covers_users",
            f"no ground truth for {int(missing.sum())} user(s)",
            USER_ID,
            examples=[f"user_id={user_ids[missing].iloc[0]}"],
        )
    rows = indexed.loc[user_ids.to_numpy()]
    return Truth(
        revenue=_tensor(rows[truth_revenue_columns(n_treatments)], np.float64),
        cost=_tensor(rows[truth_cost_columns(n_treatments)], np.float64),
    )


def _tensor(values: pd.Series | pd.DataFrame, dtype: type) -> torch.Tensor:
    """A writable, contiguous tensor copy (pandas may hand out read-only views)."""
    return torch.from_numpy(np.array(values.to_numpy(dtype), dtype=dtype, order="C", copy=True))


def frame_to_logged(
    frame: pd.DataFrame,
    meta: DatasetMeta,
    file: str = "table",
    require_propensity: bool = False,
) -> LoggedData:
    """Convert one table to tensors (features float32, outcomes float32, ids int64) once
    :func:`check_rows` passed; ``file`` names the table in its errors."""
    check_rows(frame, meta, file, require_propensity)
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


# ----------------------------------------------------------------------------- row checks


def check_rows(
    frame: pd.DataFrame, meta: DatasetMeta, file: str, require_propensity: bool = False
) -> None:
    """The contract's cheap row checks; the first broken rule raises a DataContractError.

    Every reader of a table runs them (vectorised: milliseconds per 100k rows), so a batch
    that skipped validation still cannot train a model on duplicated users, negative
    revenue or a zero propensity (an infinite weight). ``require_propensity``: the table is
    randomized, so every row must carry its propensity.
    """
    check_column_names(list(frame.columns), file)
    required = [c for c in meta.row_columns if c != PROPENSITY or require_propensity]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataContractError.broken(file, "required_columns", f"missing {missing}", missing[0])
    if frame.empty:
        raise DataContractError.broken(file, "non_empty_table", "the table has no rows")
    check_user_ids(frame[USER_ID], file)
    check_features(frame, meta.feature_columns, file)
    arms = meta.n_treatments
    _check_values(
        frame,
        [TREATMENT],
        file,
        "treatment_in_arms",
        f"an integer arm in 0..{arms - 1}",
        lambda t: (t >= 0) & (t < arms),
        integer=True,
    )
    _check_values(
        frame,
        list(OUTCOME_COLUMNS),
        file,
        "outcome_finite_non_negative",
        "a finite number >= 0",
        lambda v: np.isfinite(v) & (v >= 0),
    )
    if PROPENSITY in frame.columns:
        unknown_allowed = not require_propensity
        _check_values(
            frame,
            [PROPENSITY],
            file,
            "propensity_in_unit_interval",
            "the probability of the logged arm, in (0, 1]"
            + ("" if unknown_allowed else ", known for every randomized row"),
            lambda p: ((p > 0) & (p <= 1)) | (np.isnan(p) & unknown_allowed),
        )


def check_column_names(columns: Sequence[str], file: str) -> None:
    """A column name may appear once: which of two same-named columns is meant is unknowable."""
    repeated = pd.Index(columns)[pd.Index(columns).duplicated()]
    if len(repeated):
        raise DataContractError.broken(
            file, "unique_column_names", "more than one column has this name", str(repeated[0])
        )


def check_user_ids(ids: pd.Series, file: str) -> None:
    """One row per user, each with an integer id (a NaN id would become INT64_MIN)."""
    nulls = ids.isna()
    if nulls.any():
        raise DataContractError.broken(
            file,
            "user_id_integer",
            "every row needs an integer id",
            USER_ID,
            n_rows=int(nulls.sum()),
        )
    if not pd.api.types.is_integer_dtype(ids):
        detail = f"every row needs an integer id; the column holds {ids.dtype}"
        raise DataContractError.broken(
            file, "user_id_integer", detail, USER_ID, examples=_shown(ids.head(N_EXAMPLES))
        )
    repeated = ids.duplicated(keep=False)
    if repeated.any():
        raise DataContractError.broken(
            file,
            "user_id_unique",
            "one row per user",
            USER_ID,
            n_rows=int(repeated.sum()),
            examples=_shown(ids[repeated].drop_duplicates().head(N_EXAMPLES)),
        )


def check_ids_unique_across_chunks(ids: np.ndarray, file: str) -> None:
    """One row per user over every chunk of a table read in parts (a chunk's own check cannot
    see a twin in another chunk). A sorted copy finds repeats without a hash table of every
    id; only a table that has some pays for :func:`check_user_ids`' message naming them."""
    ordered = np.sort(ids)
    if (ordered[1:] == ordered[:-1]).any():
        check_user_ids(pd.Series(ids), file)


def check_features(frame: pd.DataFrame, columns: Sequence[str], file: str) -> None:
    """Features are numbers a float32 network can read: no NaN, no infinity, no value beyond
    float32's range (which would turn into infinity)."""
    _check_values(
        frame,
        list(columns),
        file,
        "features_finite",
        "a number within float32 range, not NaN or infinite",
        lambda x: np.abs(x) <= _FLOAT32_MAX,
    )


def _check_values(
    frame: pd.DataFrame,
    columns: list[str],
    file: str,
    rule: str,
    detail: str,
    valid: Callable[[np.ndarray], np.ndarray],
    integer: bool = False,
) -> None:
    """Raise for the first of ``columns`` that is not numeric (``integer``: not integral)
    or holds a value ``valid`` rejects; ``valid`` sees float64 values, NaN for a null."""
    for column in columns:
        values = frame[column]
        typed = pd.api.types.is_integer_dtype if integer else pd.api.types.is_numeric_dtype
        if not typed(values) or pd.api.types.is_bool_dtype(values):
            typed_detail = f"{detail}; the column holds {values.dtype}"
            raise DataContractError.broken(file, rule, typed_detail, column)
        array = values.to_numpy(np.float64, na_value=np.nan)
        bad = ~valid(array)
        if bad.any():
            raise DataContractError.broken(
                file,
                rule,
                detail,
                column,
                n_rows=int(bad.sum()),
                examples=_shown(array[bad][:N_EXAMPLES]),
            )


def _shown(values: Any) -> list[str]:
    """Offending values as short text for a message."""
    return [f"{v:.6g}" if isinstance(v, float | np.floating) else repr(v) for v in values]


# ----------------------------------------------------------------------------- folder I/O


def read_meta(folder: Path) -> DatasetMeta:
    path = Path(folder) / META_FILE
    if not path.exists():
        raise DataContractError(
            f"{path}: file not found", file=str(path), rule="file_exists", detail="file not found"
        )
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataContractError.broken(str(path), "valid_json", f"not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise DataContractError.broken(str(path), "valid_json", "must hold a JSON object")
    return DatasetMeta.from_dict(raw, origin=str(path))


def read_table(folder: Path, table: str) -> pd.DataFrame:
    return read_parquet_file(Path(folder) / table_file(table))


def read_parquet_file(path: Path) -> pd.DataFrame:
    """A parquet file as a frame. A missing file, one that is not parquet (say a CSV saved
    under a .parquet name) or one with repeated column names is a DataContractError."""
    if not path.exists():
        raise DataContractError(
            f"{path}: file not found", file=str(path), rule="file_exists", detail="file not found"
        )
    check_column_names(parquet_columns(path), str(path))
    try:
        return pd.read_parquet(path)
    except (OSError, pa.ArrowException) as err:
        raise _unreadable(path, err) from err


def parquet_columns(path: Path) -> list[str]:
    """The column names of a parquet file, read from its footer alone."""
    try:
        return list(pq.read_schema(path).names)
    except (OSError, pa.ArrowException) as err:
        raise _unreadable(path, err) from err


def _unreadable(path: Path, err: Exception) -> DataContractError:
    detail = "not a parquet file: " + " ".join(str(err).split())
    return DataContractError.broken(str(path), "readable_parquet", detail)


def load_dataset(folder: Path | str, tables: tuple[str, ...] = TABLES) -> Dataset:
    """Read a dataset folder (the named tables, metadata and truth if present)."""
    folder = Path(folder)
    meta = read_meta(folder)
    frames = {name: read_table(folder, name) for name in tables}
    truth_path = folder / TRUTH_FILE
    truth = read_parquet_file(truth_path) if truth_path.exists() else None
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
