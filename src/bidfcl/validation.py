"""Validate a dataset folder before anything trains on it.

Great Expectations 1.x runs the rule suites kept as JSON in ``expectations/`` (one for
the OBS table, one for each RCT table, one for ``meta.json``); dataset-specific names
(feature columns, arms) are filled in from ``meta.json`` at run time, so one suite serves
every dataset. A randomization check on the RCT tables (arm frequencies against the
declared propensities, feature balance across arms) and a cross-table user-id check run
beside the suites, and everything lands in one :class:`ValidationReport`.

Validation only reads the folder; the caller decides where the report goes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import stats

from bidfcl.contract import (
    META_FILE,
    OBS,
    OUTCOME_COLUMNS,
    PROPENSITY,
    RCT_TABLES,
    TABLES,
    TREATMENT,
    USER_ID,
    DataContractError,
    DatasetMeta,
    read_table,
    table_file,
)
from bidfcl.io import json_ready, write_json

if TYPE_CHECKING:
    from great_expectations.core.batch_definition import BatchDefinition

EXPECTATIONS_DIRNAME = "expectations"
META_SUITE = "meta"
SUITE_OF_TABLE = {OBS: "obs", **dict.fromkeys(RCT_TABLES, "rct")}

N_EXAMPLES = 5
"""How many offending values a failure quotes."""
FREQUENCY_MIN_P = 1e-4
"""Two-sided p-value below which an arm's frequency contradicts its declared propensity."""
SMD_MAX = 0.1
"""Largest standardized mean difference between a treated arm and control on big samples."""
SMD_NOISE_Z = 4.5
"""On small arms the limit widens to this many standard errors of a null SMD."""

PLACEHOLDERS = ("$features", "$treatments", "$row_columns")
"""Names a suite may use for values that come from meta.json (see ``_placeholders``)."""
RESERVED_COLUMNS = (USER_ID, TREATMENT, *OUTCOME_COLUMNS, PROPENSITY)
_COLUMN_KWARGS = ("column", "column_A", "column_B")


@dataclass(frozen=True)
class Failure:
    """One broken rule: where it broke, how many rows, and a few offending values."""

    file: str
    column: str | None
    rule: str
    n_rows: int
    examples: list
    message: str


@dataclass
class ValidationReport:
    """Outcome of validating one dataset folder; ``passed`` is False on any failure."""

    dataset: str
    passed: bool
    failures: list[Failure]
    checks_run: int
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "passed": self.passed,
            "checks_run": self.checks_run,
            "n_failures": len(self.failures),
            "failures": [asdict(failure) for failure in self.failures],
            "details": self.details,
        }

    def render(self) -> str:
        """Readable text: a verdict line, then one line per failure."""
        verdict = "PASSED" if self.passed else "FAILED"
        head = (
            f"validation of {self.dataset}: {verdict} "
            f"({len(self.failures)} failure(s) in {self.checks_run} checks)"
        )
        return "\n".join([head, *(f"  - {failure.message}" for failure in self.failures)])


def default_suites_dir() -> Path:
    """``expectations/`` shipped inside the package if present, else at the checkout root."""
    package_dir = Path(__file__).resolve().parent
    candidates = (package_dir / EXPECTATIONS_DIRNAME, package_dir.parents[1] / EXPECTATIONS_DIRNAME)
    for candidate in candidates:
        if (candidate / f"{META_SUITE}.json").is_file():
            return candidate
    raise FileNotFoundError(f"no expectation suites found in any of {[str(c) for c in candidates]}")


def validate_dataset(folder: Path | str, suites_dir: Path | str | None = None) -> ValidationReport:
    """Check every file of a dataset folder against the suites and the randomization checks."""
    folder = Path(folder)
    suites_dir = Path(suites_dir) if suites_dir is not None else default_suites_dir()
    suites = {
        name: _read_suite(suites_dir, name) for name in {META_SUITE, *SUITE_OF_TABLE.values()}
    }
    runner = _SuiteRunner()
    failures: list[Failure] = []
    checks_run = 1
    details: dict[str, Any] = {"suites_dir": str(suites_dir), "tables": {}, "skipped": []}

    raw_meta, meta_failure = _read_raw_meta(folder)
    meta = None
    if meta_failure is not None:
        failures.append(meta_failure)
    else:
        found, n_checks = runner.run(META_FILE, _meta_frame(raw_meta), suites[META_SUITE], {})
        failures, checks_run = failures + found, checks_run + n_checks
        meta = _usable_meta(raw_meta)
    if meta is None:
        details["skipped"].append("table checks that need a consistent meta.json")
    placeholders = _placeholders(meta)

    frames: dict[str, pd.DataFrame] = {}
    for table in TABLES:
        frame, read_failure = _read_frame(folder, table)
        checks_run += 1
        if read_failure is not None:
            failures.append(read_failure)
            continue
        frames[table] = frame
        details["tables"][table] = len(frame)
        suite = suites[SUITE_OF_TABLE[table]]
        found, n_checks = runner.run(table_file(table), frame, suite, placeholders)
        failures, checks_run = failures + found, checks_run + n_checks

    failures += _user_ids_across_tables(frames)
    checks_run += 1
    if meta is not None:
        randomization: dict[str, Any] = {}
        for table in RCT_TABLES:
            if table in frames:
                found, randomization[table], n_checks = _randomization_checks(
                    table, frames[table], meta
                )
                failures, checks_run = failures + found, checks_run + n_checks
        details["randomization"] = randomization
    return ValidationReport(
        dataset=str(folder),
        passed=not failures,
        failures=failures,
        checks_run=checks_run,
        details=details,
    )


def write_report(report: ValidationReport, path: Path | str) -> None:
    """Write the report as JSON, atomically."""
    write_json(Path(path), report.to_dict())


# ----------------------------------------------------------------------------- suites


class _SuiteRunner:
    """One ephemeral Great Expectations context, reused for every frame of a validate call."""

    def __init__(self) -> None:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        config = DataContextConfig(
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        )
        context = gx.get_context(mode="ephemeral", project_config=config)
        asset = context.data_sources.add_pandas("bidfcl").add_dataframe_asset("table")
        self._batch_definition: BatchDefinition = asset.add_batch_definition_whole_dataframe(
            "whole table"
        )

    def run(
        self,
        file: str,
        frame: pd.DataFrame,
        suite: dict[str, Any],
        placeholders: dict[str, list],
    ) -> tuple[list[Failure], int]:
        """Validate ``frame`` against ``suite`` (placeholders expanded): failures, rules run.

        A pass/fail sweep first (GE's per-rule cost triples when it counts and samples
        offending rows), then only the failed rules again for their counts and examples.
        """
        optional = set(suite.get("meta", {}).get("optional_columns", []))
        configs = [
            expanded
            for expectation in suite["expectations"]
            for expanded in _expand(expectation, placeholders, frame.columns, optional)
        ]
        if not configs:
            return [], 0
        batch = self._batch_definition.get_batch(batch_parameters={"dataframe": frame})
        sweep = self._validate(batch, f"{suite['name']}:{file}", configs, "BOOLEAN_ONLY")
        failed = [_config_of(result) for result in sweep if not result.success]
        if not failed:
            return [], len(sweep)
        detailed = self._validate(batch, f"{suite['name']}:{file}:failed", failed, "SUMMARY")
        failures = [_failure_from_result(file, result) for result in detailed if not result.success]
        return failures, len(sweep)

    @staticmethod
    def _validate(
        batch: Any, name: str, configs: list[dict[str, Any]], result_format: str
    ) -> list[Any]:
        """GE results of ``configs`` on ``batch``."""
        import great_expectations as gx
        from great_expectations.expectations.expectation_configuration import (
            ExpectationConfiguration,
        )

        expectations = [
            ExpectationConfiguration(type=c["type"], kwargs=c["kwargs"]).to_domain_obj()
            for c in configs
        ]
        suite = gx.ExpectationSuite(name=name, expectations=expectations)
        result = batch.validate(
            suite,
            result_format={"result_format": result_format, "partial_unexpected_count": N_EXAMPLES},
        )
        return list(result.results)


def _config_of(result: Any) -> dict[str, Any]:
    """The expectation a GE result belongs to, as the plain dict the runner builds from."""
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
    return {"type": config.type, "kwargs": kwargs}


def _read_suite(suites_dir: Path, name: str) -> dict[str, Any]:
    """A suite file as a dict; a malformed suite is a bug in the tool, so it raises."""
    path = suites_dir / f"{name}.json"
    suite = json.loads(path.read_text())
    if not isinstance(suite.get("expectations"), list):
        raise ValueError(f"{path}: not an expectation suite (no 'expectations' list)")
    unknown = {
        value
        for expectation in suite["expectations"]
        for value in expectation["kwargs"].values()
        if isinstance(value, str) and value.startswith("$") and value not in PLACEHOLDERS
    }
    if unknown:
        raise ValueError(f"{path}: unknown placeholder(s) {sorted(unknown)}; known: {PLACEHOLDERS}")
    return suite


def _placeholders(meta: DatasetMeta | None) -> dict[str, list]:
    """Values the suites refer to as ``$name``; empty when meta.json is unusable."""
    if meta is None:
        return {}
    return {
        "$features": list(meta.feature_columns),
        "$treatments": list(range(meta.n_treatments)),
        "$row_columns": meta.row_columns,
    }


def _expand(
    expectation: dict[str, Any],
    placeholders: dict[str, list],
    columns: pd.Index,
    optional_columns: set[str],
) -> list[dict[str, Any]]:
    """Concrete expectations for one suite entry on a frame with ``columns``.

    ``"column": "$features"`` repeats the entry per feature; other ``$name`` values are
    replaced by lists. Entries whose placeholders are unknown for this dataset, or whose
    column is absent (the column-set rule already reports it once), are left out.
    """
    kwargs = dict(expectation["kwargs"])
    variants = [kwargs]
    for key, value in kwargs.items():
        if value not in PLACEHOLDERS:
            continue
        if value not in placeholders:
            return []
        if key == "column":
            variants = [{**v, key: item} for v in variants for item in placeholders[value]]
        elif value == "$row_columns":
            present = set(columns)
            kept = [c for c in placeholders[value] if c in present or c not in optional_columns]
            variants = [{**v, key: kept} for v in variants]
        else:
            variants = [{**v, key: placeholders[value]} for v in variants]
    return [
        {"type": expectation["type"], "kwargs": v}
        for v in variants
        if all(v[k] in columns for k in _COLUMN_KWARGS if k in v)
    ]


def _failure_from_result(file: str, result: Any) -> Failure:
    """Turn one failed GE result into a Failure naming its column, rule, rows and examples."""
    config = result.expectation_config
    rule = config.type
    kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
    outcome = dict(result.result or {})
    mismatched = dict(outcome.get("details", {}).get("mismatched", {}))
    if kwargs.get("exact_match") is False:
        mismatched.pop("unexpected", None)  # extra columns are allowed there
    column = kwargs.get("column")
    if "column_A" in kwargs:
        column = f"{kwargs['column_A']}, {kwargs['column_B']}"
    elif mismatched:
        column = ", ".join([*mismatched.get("missing", []), *mismatched.get("unexpected", [])])
    n_rows = int(outcome.get("unexpected_count") or 0)
    if "partial_unexpected_list" in outcome:
        examples = outcome["partial_unexpected_list"]
    elif "partial_missing_list" in outcome:
        examples = outcome["partial_missing_list"]
    elif mismatched:
        examples = [f"{kind}: {name}" for kind, names in mismatched.items() for name in names]
    elif "observed_value" in outcome:
        examples = [outcome["observed_value"]]
    else:
        examples = []
    error = _exception_message(result.exception_info)
    detail = f"could not be evaluated: {error}" if error else _rule_arguments(kwargs)
    return _failure(file, column, rule, detail, n_rows, examples)


def _rule_arguments(kwargs: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={_short(v)}" for k, v in kwargs.items() if k not in _COLUMN_KWARGS and v is not None
    )


def _failure(
    file: str,
    column: str | None,
    rule: str,
    detail: str,
    n_rows: int = 0,
    examples: list | None = None,
) -> Failure:
    """A Failure whose one-line message names the file, column, rule, rows and examples."""
    quoted = [_plain(value) for value in (examples or [])[:N_EXAMPLES]]
    message = f"{file}: {f'column {column!r}' if column else 'file'} breaks {rule}"
    if detail:
        message += f" ({detail})"
    if n_rows:
        message += f" in {n_rows} row(s)"
    if quoted:
        message += "; e.g. " + ", ".join(_short(value) for value in quoted)
    return Failure(file, column, rule, n_rows, quoted, message)


def _exception_message(info: Any) -> str | None:
    """The first error GE caught while evaluating a rule (its layout varies by failure)."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    nested = [v for v in info.values() if isinstance(v, dict) and v.get("raised_exception")]
    return str(nested[0].get("exception_message")) if nested else None


# ----------------------------------------------------------------------------- reading files


def _read_raw_meta(folder: Path) -> tuple[dict[str, Any], Failure | None]:
    path = folder / META_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, _failure(META_FILE, None, "file_exists", "file not found")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return {}, _failure(META_FILE, None, "valid_json", f"JSON error: {err}")
    if not isinstance(raw, dict):
        return {}, _failure(META_FILE, None, "valid_json", "must hold a JSON object")
    return raw, None


def _meta_frame(raw: dict[str, Any]) -> pd.DataFrame:
    """meta.json as a one-row frame (one column per key) plus counts derived from its lists."""
    row: dict[str, Any] = dict(raw)
    for key in ("treatment_names", "feature_columns"):
        values = raw.get(key)
        if isinstance(values, list):
            row[f"len({key})"] = len(values)
            row[f"distinct({key})"] = len({str(v) for v in values})
    features = raw.get("feature_columns")
    if isinstance(features, list):
        row["reserved(feature_columns)"] = sum(str(f) in RESERVED_COLUMNS for f in features)
    return pd.DataFrame({key: pd.Series([value], dtype=object) for key, value in row.items()})


def _usable_meta(raw: dict[str, Any]) -> DatasetMeta | None:
    """The metadata if it can drive the table checks, else None.

    When the arm count and the arm names disagree there is no telling which is right, so
    the checks that depend on them are skipped (the meta suite has reported the conflict).
    """
    n_treatments = raw.get("n_treatments")
    names = raw.get("treatment_names")
    sound = (
        isinstance(n_treatments, int)
        and not isinstance(n_treatments, bool)
        and isinstance(names, list)
        and len(names) == n_treatments >= 1
        and isinstance(raw.get("feature_columns"), list)
    )
    # The table checks never read ``source``; a missing one is the meta suite's to report.
    return DatasetMeta.from_dict({"source": "", **raw}) if sound else None


def _read_frame(folder: Path, table: str) -> tuple[pd.DataFrame, Failure | None]:
    try:
        return read_table(folder, table), None
    except DataContractError:
        return pd.DataFrame(), _failure(table_file(table), None, "file_exists", "file not found")
    except (OSError, ValueError) as err:
        message = f"parquet error: {err}"
        return pd.DataFrame(), _failure(table_file(table), None, "readable_parquet", message)


# ----------------------------------------------------------------------------- cross-table


def _user_ids_across_tables(frames: dict[str, pd.DataFrame]) -> list[Failure]:
    """A user in two tables leaks between training and evaluation; each user has one table."""
    owner_frames = [
        pd.DataFrame({USER_ID: frame[USER_ID].drop_duplicates(), "table": table})
        for table, frame in frames.items()
        if USER_ID in frame.columns
    ]
    if not owner_frames:
        return []
    owners = pd.concat(owner_frames, ignore_index=True)
    shared = owners[owners.duplicated(USER_ID, keep="first")]
    failures = []
    for table, rows in shared.groupby("table", sort=False):
        failures.append(
            _failure(
                table_file(str(table)),
                USER_ID,
                "user_id_unique_across_tables",
                "these users already appear in another table",
                len(rows),
                rows[USER_ID].head(N_EXAMPLES).tolist(),
            )
        )
    return failures


# ----------------------------------------------------------------------------- randomization


def _randomization_checks(
    table: str, frame: pd.DataFrame, meta: DatasetMeta
) -> tuple[list[Failure], dict[str, Any], int]:
    """Arm frequencies against declared propensities, and feature balance across arms.

    Rows the suites already reject (bad arm, bad propensity) are left out here.
    """
    file = table_file(table)
    if TREATMENT not in frame.columns or PROPENSITY not in frame.columns:
        return [], {"skipped": "no treatment or propensity column"}, 0
    arm = _numeric(frame[TREATMENT])
    prop = _numeric(frame[PROPENSITY])
    keep = np.isin(arm, np.arange(meta.n_treatments)) & (prop > 0) & (prop <= 1)
    arm, prop = arm[keep].astype(np.int64), prop[keep]
    onehot = arm[:, None] == np.arange(meta.n_treatments)[None, :]

    failures, frequency = _frequency_check(file, onehot, prop)
    numeric = [
        c
        for c in meta.feature_columns
        if c in frame.columns and pd.api.types.is_numeric_dtype(frame[c])
    ]
    features = frame.loc[keep, numeric].to_numpy(np.float64, na_value=np.nan)
    balance_failures, balance = _balance_check(file, onehot, features, numeric)
    summary = {"rows_checked": int(keep.sum()), "frequency": frequency, "balance": balance}
    n_checks = meta.n_treatments + len(numeric) * (meta.n_treatments - 1)
    return failures + balance_failures, summary, n_checks


def _frequency_check(
    file: str, onehot: np.ndarray, propensity: np.ndarray
) -> tuple[list[Failure], list[dict[str, Any]]]:
    """Per arm, the inverse-propensity-weighted count must estimate the table size.

    sum_i 1[t_i = j] / p_i is unbiased for N under the declared design, whatever the
    propensities are, with variance estimated by sum_i 1[t_i = j] (1 - p_i) / p_i^2. An
    arm never assigned has no rows to estimate that from; it borrows the table's mean
    propensity.
    """
    n = onehot.shape[0]
    weights = 1.0 / propensity
    weighted_count = weights @ onehot
    variance = ((1.0 - propensity) * weights**2) @ onehot
    arm_rows = onehot.sum(axis=0)
    if n:
        mean_p = float(propensity.mean())
        variance = np.where(arm_rows > 0, variance, n * (1 - mean_p) / mean_p)
    gap = weighted_count - n
    z = np.divide(gap, np.sqrt(variance), out=np.where(gap == 0, 0.0, np.inf), where=variance > 0)
    p_values = 2 * stats.norm.sf(np.abs(z))
    arms = [
        {
            "arm": j,
            "rows": int(arm_rows[j]),
            "weighted_count": float(weighted_count[j]),
            "expected": n,
            "z": json_ready(float(z[j])),
            "p_value": float(p_values[j]),
        }
        for j in range(onehot.shape[1])
    ]
    bad = [a for a in arms if a["p_value"] < FREQUENCY_MIN_P]
    if not bad:
        return [], arms
    examples = [
        f"arm {a['arm']}: {a['rows']} rows weigh {a['weighted_count']:.0f} (p={a['p_value']:.1e})"
        for a in bad
    ]
    failure = _failure(
        file,
        PROPENSITY,
        "treatment_frequency_matches_propensity",
        f"inverse-propensity-weighted arm counts differ from the {n} rows, p < {FREQUENCY_MIN_P:g}",
        sum(a["rows"] for a in bad),
        examples,
    )
    return [failure], arms


def _balance_check(
    file: str, onehot: np.ndarray, features: np.ndarray, names: list[str]
) -> tuple[list[Failure], dict[str, Any]]:
    """Standardized mean difference of every feature between each treated arm and control.

    Randomization makes arms alike in distribution; a large SMD means assignment depended
    on the features. The limit is SMD_MAX, widened on small arms to SMD_NOISE_Z standard
    errors (about sqrt(1/n_j + 1/n_0)) so that chance imbalance does not fail a valid trial.
    """
    complete = ~np.isnan(features).any(axis=1)
    features, onehot = features[complete], onehot[complete].astype(np.float64)
    counts = onehot.sum(axis=0)
    safe_counts = np.maximum(counts, 1.0)[:, None]
    means = (onehot.T @ features) / safe_counts  # (M, d)
    variances = np.maximum((onehot.T @ features**2) / safe_counts - means**2, 0.0)
    pooled_sd = np.sqrt((variances[1:] + variances[:1]) / 2)
    gap = np.abs(means[1:] - means[:1])
    smd = np.divide(gap, pooled_sd, out=np.where(gap == 0, 0.0, np.inf), where=pooled_sd > 0)
    enough = (counts[1:] >= 2) & (counts[0] >= 2)
    with np.errstate(divide="ignore"):
        noise = np.sqrt(1.0 / counts[1:] + 1.0 / counts[0])
    limit = np.where(enough, np.maximum(SMD_MAX, SMD_NOISE_Z * noise), np.inf)  # (M-1,)
    broken = smd > limit[:, None]  # (M-1, d)
    failures = []
    for k in np.flatnonzero(broken.any(axis=0)):
        arms = np.flatnonzero(broken[:, k])
        examples = [f"arm {a + 1} vs control: SMD {smd[a, k]:.2f} > {limit[a]:.2f}" for a in arms]
        failures.append(
            _failure(
                file,
                names[k],
                "feature_balance_smd",
                "standardized mean difference between a treated arm and control",
                int(counts[arms + 1].sum()),
                examples,
            )
        )
    worst = np.where(enough[:, None], smd, 0.0).max(axis=0, initial=0.0)
    summary = {
        "max_smd": {name: json_ready(float(worst[k])) for k, name in enumerate(names)},
        "limit_by_arm": {str(a + 1): json_ready(float(v)) for a, v in enumerate(limit)},
    }
    return failures, summary


def _numeric(column: pd.Series) -> np.ndarray:
    """A column as float64, with NaN where a value is missing or not a number."""
    return pd.to_numeric(column, errors="coerce").to_numpy(np.float64, na_value=np.nan)


# ----------------------------------------------------------------------------- formatting


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of one example value (numpy scalars, tuples, NaN)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(_plain(value))
    return text if len(text) <= width else text[: width - 3] + "..."
