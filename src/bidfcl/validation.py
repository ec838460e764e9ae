"""Validate a dataset folder before anything trains on it.

The JSON files in ``expectations/`` are templates of Great Expectations 1.x suites (one for
the OBS table, one for each RCT table, one for ``meta.json``): dataset-specific values
(feature columns, arms) are written as ``$placeholders``, so one template serves every
dataset. :func:`build_suite` fills them from ``meta.json`` into a real GX suite, and each
file is then validated by a GX ``ValidationDefinition`` run through a ``Checkpoint``, whose
``UpdateDataDocsAction`` renders the results as Data Docs (HTML) when a folder is given.
The RCT suite includes the randomization check (arm frequencies against the declared
propensities, feature balance across arms) as the custom expectations of
:mod:`bidfcl.gx_expectations`. A cross-table user-id check runs beside the suites, and
everything lands in one :class:`ValidationReport`.

Validation only reads the folder; the caller decides where the report and Data Docs go.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import numpy as np
import pandas as pd
from great_expectations.checkpoint import UpdateDataDocsAction
from great_expectations.core.expectation_validation_result import ExpectationValidationResult
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)

from bidfcl.contract import (
    META_FILE,
    N_EXAMPLES,
    OBS,
    PROPENSITY_FLOOR,
    RCT_TABLES,
    RESERVED_COLUMNS,
    TABLES,
    TRUTH_FILE,
    USER_ID,
    DataContractError,
    DatasetMeta,
    read_parquet_file,
    rule_message,
    table_file,
    truth_cost_columns,
    truth_revenue_columns,
)
from bidfcl.gx_expectations import FeatureBalanceSmd, TreatmentFrequencyMatchesPropensity
from bidfcl.io import write_json

EXPECTATIONS_DIRNAME = "expectations"
META_SUITE = "meta"
TRUTH_SUITE = "truth"
SUITE_OF_TABLE = {OBS: "obs", **dict.fromkeys(RCT_TABLES, "rct")}
DATA_DOCS_SITE = "bidfcl"
DEFAULT_BUDGET = "default_budget"

PLACEHOLDERS = (
    "$features",
    "$treatments",
    "$row_columns",
    "$truth_columns",
    "$truth_outcomes",
    "$propensity_floor",
    "$required_budget",
)
"""Names a template may use for values that come from meta.json or from the validate
settings (see ``_placeholders``)."""
_COLUMN_KWARGS = ("column", "column_A", "column_B", "treatment_column", "propensity_column")


@dataclass(frozen=True)
class SuiteSettings:
    """The validate settings the templates refer to (params.yaml's ``validate:``).

    ``propensity_floor``: the smallest RCT propensity accepted, because IPW weighs a row by
    1 / p. ``require_default_budget``: meta.json must hold ``default_budget``, as the pipeline
    needs when it takes its budget from there; a ``default_budget`` that is present is
    checked either way.
    """

    propensity_floor: float = PROPENSITY_FLOOR
    require_default_budget: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.propensity_floor < 1:
            raise ValueError(f"propensity_floor must lie in (0, 1), got {self.propensity_floor}")


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


def validate_dataset(
    folder: Path | str,
    suites_dir: Path | str | None = None,
    data_docs: Path | str | None = None,
    settings: SuiteSettings = SuiteSettings(),
) -> ValidationReport:
    """Check every file of a dataset folder against its suite; Data Docs go to ``data_docs``.

    Data Docs are GX's HTML view of the same results: a page per file of this call, listed
    in ``index.html``. None builds none, which keeps quick checks quick.
    """
    folder = Path(folder)
    suites_dir = Path(suites_dir) if suites_dir is not None else default_suites_dir()
    suites = {META_SUITE, TRUTH_SUITE, *SUITE_OF_TABLE.values()}
    templates = {name: _read_template(suites_dir, name) for name in suites}
    runner = _SuiteRunner(folder.resolve().name, None if data_docs is None else Path(data_docs))
    failures: list[Failure] = []
    checks_run = 1
    details: dict[str, Any] = {"suites_dir": str(suites_dir), "tables": {}, "skipped": []}

    raw_meta, meta_failure = _read_raw_meta(folder)
    meta = None
    if meta_failure is not None:
        failures.append(meta_failure)
    else:
        frame = _meta_frame(raw_meta)
        suite = build_suite(templates[META_SUITE], None, frame.columns, settings=settings)
        results = runner.run(frame, suite)
        failures += _failures(META_FILE, results)
        checks_run += len(results)
        meta = _usable_meta(raw_meta)
    if meta is None:
        details["skipped"].append("table checks that need a consistent meta.json")

    frames: dict[str, pd.DataFrame] = {}
    randomization: dict[str, Any] = {}
    for table in TABLES:
        frame, read_failure = _read_frame(folder / table_file(table))
        checks_run += 1
        if read_failure is not None:
            failures.append(read_failure)
            continue
        frames[table] = frame
        details["tables"][table] = len(frame)
        template = templates[SUITE_OF_TABLE[table]]
        suite = build_suite(template, meta, frame.columns, name=table, settings=settings)
        results = runner.run(frame, suite)
        failures += _failures(table_file(table), results)
        checks_run += len(results)
        if table in RCT_TABLES:
            randomization[table] = _randomization_summary(results)

    failures += _user_ids_across_tables(frames)
    checks_run += 1
    if (folder / TRUTH_FILE).exists():  # simulated data only
        truth, read_failure = _read_frame(folder / TRUTH_FILE)
        checks_run += 1
        if read_failure is not None:
            failures.append(read_failure)
        else:
            suite = build_suite(templates[TRUTH_SUITE], meta, truth.columns, settings=settings)
            results = runner.run(truth, suite)
            failures += _failures(TRUTH_FILE, results) + _truth_covers_users(truth, frames)
            checks_run += len(results) + 1
    if meta is not None:
        details["randomization"] = randomization
    if runner.docs_index is not None:
        details["data_docs"] = str(runner.docs_index)
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


def resolve_template(
    template: dict[str, Any],
    meta: DatasetMeta | None,
    columns: Collection[str] | None = None,
    settings: SuiteSettings = SuiteSettings(),
) -> dict[str, Any]:
    """A suite template with its ``$placeholders`` filled from meta.json and ``settings``:
    plain GX suite JSON.

    ``"column": "$features"`` repeats a rule per feature; other placeholders become lists
    or values. Rules whose placeholders cannot be filled (``meta`` is None when it is
    unusable; ``$required_budget`` only exists when ``settings`` require a default budget)
    are left out. ``columns`` are the table's own: rules on columns it lacks are left out
    too (the column-set rule reports each once), and so are the template's
    ``optional_columns`` it lacks from ``$row_columns``; None keeps every rule.
    """
    placeholders = _placeholders(meta, settings)
    present = None if columns is None else set(columns)
    optional = set(template.get("meta", {}).get("optional_columns", []))
    expectations = [
        resolved
        for expectation in template["expectations"]
        for resolved in _expand(expectation, placeholders, present, optional)
    ]
    return {**template, "expectations": expectations}


def build_suite(
    template: dict[str, Any],
    meta: DatasetMeta | None,
    columns: Collection[str] | None = None,
    name: str | None = None,
    settings: SuiteSettings = SuiteSettings(),
) -> gx.ExpectationSuite:
    """The real GX suite of one file: ``template`` resolved, named ``name`` or as the template.

    See :func:`resolve_template` for ``meta``, ``columns`` and ``settings``.
    """
    resolved = resolve_template(template, meta, columns, settings)
    return gx.ExpectationSuite(**{**resolved, "name": name or resolved["name"]})


def _read_template(suites_dir: Path, name: str) -> dict[str, Any]:
    """A suite template as a dict; a malformed one is a bug in the tool, so it raises."""
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


def _placeholders(meta: DatasetMeta | None, settings: SuiteSettings) -> dict[str, Any]:
    """Values the templates refer to as ``$name``: the settings', and meta.json's unless it
    is unusable."""
    values: dict[str, Any] = {"$propensity_floor": settings.propensity_floor}
    if settings.require_default_budget:
        values["$required_budget"] = [DEFAULT_BUDGET]
    if meta is None:
        return values
    outcomes = [
        *truth_revenue_columns(meta.n_treatments),
        *truth_cost_columns(meta.n_treatments),
    ]
    return values | {
        "$features": list(meta.feature_columns),
        "$treatments": list(range(meta.n_treatments)),
        "$row_columns": meta.row_columns,
        "$truth_columns": [USER_ID, *outcomes],
        "$truth_outcomes": outcomes,
    }


def _expand(
    expectation: dict[str, Any],
    placeholders: dict[str, Any],
    present: set[str] | None,
    optional_columns: set[str],
) -> list[dict[str, Any]]:
    """The concrete rules of one template entry (see :func:`resolve_template`)."""
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
            kept = [
                c
                for c in placeholders[value]
                if present is None or c in present or c not in optional_columns
            ]
            variants = [{**v, key: kept} for v in variants]
        else:
            variants = [{**v, key: placeholders[value]} for v in variants]
    return [
        {**expectation, "kwargs": v}
        for v in variants
        if present is None or all(v[k] in present for k in _COLUMN_KWARGS if k in v)
    ]


class _SuiteRunner:
    """One ephemeral GX project per validate call, with a Data Docs site if one is asked for.

    Each file gets its own data asset, ValidationDefinition and Checkpoint (a pandas
    batch is passed at run time, so a Checkpoint cannot share it between files), all under
    one run id named after the dataset. The results live in memory, so the Data Docs
    folder shows this call only: GX drops the pages of results its stores no longer hold.
    """

    def __init__(self, run_name: str, data_docs: Path | None) -> None:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        sites = {} if data_docs is None else {DATA_DOCS_SITE: _site_config(data_docs)}
        config = DataContextConfig(
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            data_docs_sites=sites,
        )
        self._context = gx.get_context(mode="ephemeral", project_config=config)
        self._source = self._context.data_sources.add_pandas("bidfcl")
        self._actions = (
            [UpdateDataDocsAction(name="data docs", site_names=[DATA_DOCS_SITE])] if sites else []
        )
        self._run_id = RunIdentifier(run_name=run_name)
        self._index = None if data_docs is None else data_docs / "index.html"
        self.docs_index: Path | None = None
        """The Data Docs ``index.html``, once a run has written it."""

    def run(
        self, frame: pd.DataFrame, suite: gx.ExpectationSuite
    ) -> list[ExpectationValidationResult]:
        """GX results of ``suite`` on ``frame`` (and its Data Docs pages if configured)."""
        if not suite.expectations:
            return []
        batch = self._source.add_dataframe_asset(suite.name).add_batch_definition_whole_dataframe(
            "whole table"
        )
        definition = self._context.validation_definitions.add(
            gx.ValidationDefinition(
                name=suite.name, data=batch, suite=self._context.suites.add(suite)
            )
        )
        checkpoint = self._context.checkpoints.add(
            gx.Checkpoint(
                name=suite.name,
                validation_definitions=[definition],
                actions=self._actions,
                result_format={"result_format": "BASIC", "partial_unexpected_count": N_EXAMPLES},
            )
        )
        outcome = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=self._run_id)
        self.docs_index = self._index
        (suite_result,) = outcome.run_results.values()
        return list(suite_result.results)


def _site_config(folder: Path) -> dict[str, Any]:
    """A local filesystem Data Docs site in ``folder`` (``index.html`` at its top)."""
    return {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {
            "class_name": "TupleFilesystemStoreBackend",
            "base_directory": str(folder.resolve()),
        },
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }


def _failures(file: str, results: list[ExpectationValidationResult]) -> list[Failure]:
    return [_failure_from_result(file, result) for result in results if not result.success]


def _randomization_summary(results: list[ExpectationValidationResult]) -> dict[str, Any]:
    """The randomization statistics of one RCT table, from its custom rules' results."""
    frequency: dict[str, Any] = {}
    balance: dict[str, Any] = {"max_smd": {}, "limit_by_arm": {}}
    for result in results:
        config, outcome = result.expectation_config, result.result or {}
        if "details" not in outcome:  # the rule raised; its failure says why
            continue
        if config.type == TreatmentFrequencyMatchesPropensity.expectation_type:
            frequency = {
                "rows_checked": outcome["details"]["rows_checked"],
                "frequency": outcome["details"]["arms"],
            }
        elif config.type == FeatureBalanceSmd.expectation_type:
            balance["max_smd"][config.kwargs["column"]] = outcome["observed_value"]
            balance["limit_by_arm"] = outcome["details"]["limit_by_arm"]
    return {**frequency, "balance": balance}


def _failure_from_result(file: str, result: ExpectationValidationResult) -> Failure:
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
    explanation = outcome.get("details", {}).get("explanation")  # set by custom rules
    detail = f"could not be evaluated: {error}" if error else explanation or _rule_arguments(kwargs)
    return _failure(file, column, rule, detail, n_rows, examples)


def _rule_arguments(kwargs: dict[str, Any]) -> str:
    """A rule's thresholds as ``name=value`` (numbers short: 1e+15, not sixteen digits)."""
    return ", ".join(
        f"{k}={f'{v:g}' if isinstance(v, float) else _short(v)}"
        for k, v in kwargs.items()
        if k not in _COLUMN_KWARGS and v is not None
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
    shown = [_short(value) for value in quoted]
    message = rule_message(file, rule, detail, column or None, n_rows=n_rows, examples=shown)
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
    if DEFAULT_BUDGET in raw:  # range rules need a number; the type rule reports the rest
        budget = raw[DEFAULT_BUDGET]
        number = isinstance(budget, int | float) and not isinstance(budget, bool)
        row[f"number({DEFAULT_BUDGET})"] = budget if number else None
    return pd.DataFrame({key: pd.Series([value], dtype=object) for key, value in row.items()})


def _usable_meta(raw: dict[str, Any]) -> DatasetMeta | None:
    """The metadata if it can drive the table checks, else None.

    When the arm count and the arm names disagree there is no telling which is right, so
    the checks that depend on them are skipped (the meta suite has reported the conflict).
    """
    try:  # the table checks never read ``source``; a missing one is the meta suite's to report
        return DatasetMeta.from_dict({"source": "", **raw})
    except DataContractError:
        return None


def _read_frame(path: Path) -> tuple[pd.DataFrame, Failure | None]:
    """A parquet file, or the rule it breaks (missing, not parquet, repeated column names)."""
    try:
        return read_parquet_file(path), None
    except DataContractError as err:
        rule = err.rule or "readable_parquet"
        return pd.DataFrame(), _failure(path.name, err.column, rule, err.detail)


def _truth_covers_users(truth: pd.DataFrame, frames: dict[str, pd.DataFrame]) -> list[Failure]:
    """Scores on simulated data set each user's truth beside the estimate; a user without one
    cannot be scored. Ids of another type are the type rules' to report."""
    if USER_ID not in truth.columns or not pd.api.types.is_integer_dtype(truth[USER_ID]):
        return []
    failures = []
    for table, frame in frames.items():
        if USER_ID not in frame.columns or not pd.api.types.is_integer_dtype(frame[USER_ID]):
            continue
        lacking = frame.loc[~frame[USER_ID].isin(truth[USER_ID]), USER_ID]
        if len(lacking):
            detail = f"users of {table_file(table)} without ground truth"
            examples = lacking.head(N_EXAMPLES).tolist()
            failures.append(
                _failure(TRUTH_FILE, USER_ID, "truth_covers_users", detail, len(lacking), examples)
            )
    return failures


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
