"""Validation: a valid dataset passes, each planted corruption is named, files stay untouched."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import great_expectations as gx
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from bidfcl.cli import app, main
from bidfcl.contract import META_FILE, DatasetMeta, table_file
from bidfcl.gx_expectations import (
    FREQUENCY_MIN_P,
    FeatureBalanceSmd,
    TreatmentFrequencyMatchesPropensity,
    arm_frequencies,
)
from bidfcl.validation import (
    ValidationReport,
    build_suite,
    default_suites_dir,
    resolve_template,
    validate_dataset,
    write_report,
)

RANDOMIZATION_RULES = (
    TreatmentFrequencyMatchesPropensity.expectation_type,
    FeatureBalanceSmd.expectation_type,
)


def _edit_table(folder: Path, table: str, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    path = folder / table_file(table)
    edit(pd.read_parquet(path)).to_parquet(path, index=False)


def _edit_meta(folder: Path, edit: Callable[[dict], None]) -> None:
    path = folder / META_FILE
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _set(column: str, rows: slice, value: object) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def edit(frame: pd.DataFrame) -> pd.DataFrame:
        frame.loc[frame.index[rows], column] = value
        return frame

    return edit


def _duplicate_first_user(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[1, "user_id"] = frame.loc[0, "user_id"]
    return frame


def _thin_arm(frame: pd.DataFrame) -> pd.DataFrame:
    """Drop most users of arm 2 while the propensity column still claims 1/M for them."""
    arm_two = np.flatnonzero(frame["treatment"].to_numpy() == 2)
    return frame.drop(index=frame.index[arm_two[: int(0.6 * len(arm_two))]])


def _shift_arm_one(frame: pd.DataFrame) -> pd.DataFrame:
    """Users of arm 1 get larger x0: assignment that depended on a feature."""
    frame.loc[frame["treatment"] == 1, "x0"] += 1.5
    return frame


def _take_users_of_obs(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[frame.index[:3], "user_id"] = [0, 1, 2]
    return frame


# id -> (corruption, file, column, rule)
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str, str | None, str]] = {
    "negative_revenue": (
        lambda d: _edit_table(d, "obs", _set("revenue", slice(3, 5), -2.0)),
        "obs.parquet",
        "revenue",
        "expect_column_values_to_be_between",
    ),
    "negative_cost": (
        lambda d: _edit_table(d, "rct_train", _set("cost", slice(0, 1), -0.5)),
        "rct_train.parquet",
        "cost",
        "expect_column_values_to_be_between",
    ),
    "null_feature": (
        lambda d: _edit_table(d, "rct_val", _set("x3", slice(10, 12), np.nan)),
        "rct_val.parquet",
        "x3",
        "expect_column_values_to_not_be_null",
    ),
    "treatment_out_of_range": (
        lambda d: _edit_table(d, "obs", _set("treatment", slice(0, 1), 7)),
        "obs.parquet",
        "treatment",
        "expect_column_values_to_be_in_set",
    ),
    "propensity_zero": (
        lambda d: _edit_table(d, "rct_test", _set("propensity", slice(0, 4), 0.0)),
        "rct_test.parquet",
        "propensity",
        "expect_column_values_to_be_between",
    ),
    "propensity_above_one": (
        lambda d: _edit_table(d, "obs", _set("propensity", slice(0, 1), 1.5)),
        "obs.parquet",
        "propensity",
        "expect_column_values_to_be_between",
    ),
    "duplicate_user_id": (
        lambda d: _edit_table(d, "rct_train", _duplicate_first_user),
        "rct_train.parquet",
        "user_id",
        "expect_column_values_to_be_unique",
    ),
    "user_in_two_tables": (
        lambda d: _edit_table(d, "rct_test", _take_users_of_obs),
        "rct_test.parquet",
        "user_id",
        "user_id_unique_across_tables",
    ),
    "empty_obs": (
        lambda d: _edit_table(d, "obs", lambda f: f.iloc[:0]),
        "obs.parquet",
        None,
        "expect_table_row_count_to_be_between",
    ),
    "arm_missing_from_rct_test": (
        lambda d: _edit_table(d, "rct_test", lambda f: f[f["treatment"] != 3]),
        "rct_test.parquet",
        "treatment",
        "expect_column_distinct_values_to_contain_set",
    ),
    "missing_column": (
        lambda d: _edit_table(d, "rct_val", lambda f: f.drop(columns="cost")),
        "rct_val.parquet",
        "cost",
        "expect_table_columns_to_match_set",
    ),
    "string_feature": (
        lambda d: _edit_table(d, "obs", lambda f: f.assign(x2=f["x2"].astype(str))),
        "obs.parquet",
        "x2",
        "expect_column_values_to_be_in_type_list",
    ),
    "meta_n_treatments_mismatch": (
        lambda d: _edit_meta(d, lambda m: m.update(n_treatments=m["n_treatments"] + 1)),
        "meta.json",
        "n_treatments, len(treatment_names)",
        "expect_column_pair_values_to_be_equal",
    ),
    "meta_missing_key": (
        lambda d: _edit_meta(d, lambda m: m.pop("source")),
        "meta.json",
        "source",
        "expect_table_columns_to_match_set",
    ),
    "meta_not_json": (
        lambda d: (d / META_FILE).write_text('{"n_treatments": 5,'),
        "meta.json",
        None,
        "valid_json",
    ),
    "feature_declared_but_absent": (
        lambda d: _edit_meta(d, lambda m: m["feature_columns"].append("x_gone")),
        "rct_train.parquet",
        "x_gone",
        "expect_table_columns_to_match_set",
    ),
    "table_not_parquet": (
        lambda d: (d / table_file("obs")).write_bytes(b"not a parquet file"),
        "obs.parquet",
        None,
        "readable_parquet",
    ),
    "table_file_missing": (
        lambda d: (d / table_file("rct_val")).unlink(),
        "rct_val.parquet",
        None,
        "file_exists",
    ),
    "propensity_contradicts_frequencies": (
        lambda d: _edit_table(d, "rct_train", _thin_arm),
        "rct_train.parquet",
        "propensity",
        "treatment_frequency_matches_propensity",
    ),
    "feature_imbalance_across_arms": (
        lambda d: _edit_table(d, "rct_train", _shift_arm_one),
        "rct_train.parquet",
        "x0",
        "feature_balance_smd",
    ),
}


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def valid_report(small_dataset_dir: Path) -> tuple[ValidationReport, dict, dict]:
    """The valid dataset's report, with the file hashes from before and after validating."""
    before = _hashes(small_dataset_dir)
    report = validate_dataset(small_dataset_dir)
    return report, before, _hashes(small_dataset_dir)


def test_valid_dataset_passes(valid_report: tuple[ValidationReport, dict, dict]) -> None:
    report, _, _ = valid_report
    assert report.passed, report.render()
    assert report.failures == []
    assert report.checks_run > 100
    assert set(report.details["randomization"]) == {"rct_train", "rct_val", "rct_test"}
    assert "PASSED" in report.render()


def test_validation_leaves_the_files_untouched(
    valid_report: tuple[ValidationReport, dict, dict],
) -> None:
    _, before, after = valid_report
    assert before == after


# Beyond the cases the issue lists; deselected by default to keep the file fast.
EXTRA_CORRUPTIONS = {
    "negative_cost",
    "user_in_two_tables",
    "meta_not_json",
    "table_not_parquet",
    "table_file_missing",
}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in EXTRA_CORRUPTIONS else n for n in CORRUPTIONS],
)
def test_planted_corruption_is_named(name: str, dataset_copy: Path) -> None:
    corrupt, file, column, rule = CORRUPTIONS[name]
    corrupt(dataset_copy)
    corrupted = _hashes(dataset_copy)

    report = validate_dataset(dataset_copy)

    assert not report.passed
    matching = [f for f in report.failures if (f.file, f.column, f.rule) == (file, column, rule)]
    assert matching, report.render()
    assert file in matching[0].message and rule in matching[0].message
    assert column is None or repr(column) in matching[0].message
    assert matching[0].message in report.render()
    assert _hashes(dataset_copy) == corrupted
    json.dumps(report.to_dict(), allow_nan=False)


def test_cli_exits_non_zero_and_writes_report_outside_data(
    dataset_copy: Path, tmp_path: Path
) -> None:
    _edit_table(dataset_copy, "rct_test", _set("propensity", slice(0, 4), 0.0))
    before = _hashes(dataset_copy)
    report_path = tmp_path / "reports" / "validation.json"

    result = CliRunner().invoke(
        app,
        [
            "validate",
            str(dataset_copy),
            "--report",
            str(report_path),
            "--data-docs",
            str(tmp_path / "docs"),
        ],
    )

    assert result.exit_code == 1
    assert "propensity" in result.output
    assert "expect_column_values_to_be_between" in result.output
    written = json.loads(report_path.read_text())
    assert written["passed"] is False
    (failure,) = written["failures"]
    assert (failure["column"], failure["n_rows"], failure["examples"]) == (
        "propensity",
        4,
        [0.0] * 4,
    )
    assert _hashes(dataset_copy) == before


def test_write_report_round_trips(
    valid_report: tuple[ValidationReport, dict, dict], tmp_path: Path
) -> None:
    report, _, _ = valid_report
    path = tmp_path / "report.json"
    write_report(report, path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(report.to_dict()))


def test_obs_without_propensity_is_valid(dataset_copy: Path) -> None:
    """OBS logs often lack the logging probability; the contract allows that."""
    _edit_table(dataset_copy, "obs", lambda f: f.drop(columns="propensity"))
    report = validate_dataset(dataset_copy)
    assert report.passed, report.render()


def test_rules_come_from_the_suites_dir(dataset_copy: Path, tmp_path: Path) -> None:
    suites = tmp_path / "suites"
    suites.mkdir()
    for suite in default_suites_dir().glob("*.json"):
        (suites / suite.name).write_text(suite.read_text())
    obs_suite = json.loads((suites / "obs.json").read_text())
    obs_suite["expectations"].append(
        {
            "type": "expect_column_max_to_be_between",
            "kwargs": {"column": "$features", "max_value": 0},
        }
    )
    (suites / "obs.json").write_text(json.dumps(obs_suite))

    report = validate_dataset(dataset_copy, suites_dir=suites)

    flagged = {f.column for f in report.failures if f.rule == "expect_column_max_to_be_between"}
    assert flagged == {f"x{k}" for k in range(12)}


def test_frequency_check_accepts_unequal_designed_propensities() -> None:
    """A stratified trial: each user's arm probabilities depend on a segment."""
    rng = np.random.default_rng(3)
    n = 20_000
    segment = rng.random(n) < 0.5
    p_treated = np.where(segment, 0.8, 0.3)
    treated = rng.random(n) < p_treated
    onehot = np.stack([~treated, treated], axis=1)
    propensity = np.where(treated, p_treated, 1 - p_treated)

    arms = arm_frequencies(onehot, propensity, [0, 1])
    assert all(arm["p_value"] > FREQUENCY_MIN_P for arm in arms)

    claimed_uniform = np.full(n, 0.5)
    arms = arm_frequencies(onehot, claimed_uniform, [0, 1])
    assert min(arm["p_value"] for arm in arms) < FREQUENCY_MIN_P


def _triple_arm_one(frame: pd.DataFrame) -> pd.DataFrame:
    """Arm 1 assigned three times as often as its declared propensity says (copies, new ids)."""
    arm_one = frame[frame["treatment"] == 1]
    new_ids = 10**9 + np.arange(2 * len(arm_one)).reshape(2, -1)  # no table holds these
    copies = [arm_one.assign(user_id=ids) for ids in new_ids]
    return pd.concat([frame, *copies], ignore_index=True)


@pytest.mark.parametrize("name", ["meta", "obs", "rct"])
def test_each_template_resolves_into_a_real_gx_suite(name: str, small_dataset_dir: Path) -> None:
    template = json.loads((default_suites_dir() / f"{name}.json").read_text())
    meta = DatasetMeta.from_dict(json.loads((small_dataset_dir / META_FILE).read_text()))

    resolved = resolve_template(template, meta)
    suite = gx.ExpectationSuite(**resolved)

    assert isinstance(suite, gx.ExpectationSuite)
    assert "$" not in json.dumps([e["kwargs"] for e in resolved["expectations"]])
    assert build_suite(template, meta, name="x").to_json_dict() == {
        **suite.to_json_dict(),
        "name": "x",
    }
    if name != "meta":  # the raw template carries placeholders, which GX rejects
        with pytest.raises(ValueError):
            gx.ExpectationSuite(**template)
    if name == "rct":
        types = [e.expectation_type for e in suite.expectations]
        assert types.count(TreatmentFrequencyMatchesPropensity.expectation_type) == 1
        assert types.count(FeatureBalanceSmd.expectation_type) == len(meta.feature_columns)


def test_validate_writes_data_docs_that_show_the_randomization_rules(
    small_dataset_dir: Path, tmp_path: Path
) -> None:
    docs = tmp_path / "data_docs"
    args = ["validate", str(small_dataset_dir), "--report", str(tmp_path / "report.json")]

    result = CliRunner().invoke(app, [*args, "--data-docs", str(docs)])

    assert result.exit_code == 0, result.output
    assert f"Data Docs at {docs / 'index.html'}" in result.output
    assert (docs / "index.html").is_file()
    html = " ".join(page.read_text() for page in docs.rglob("*.html"))
    assert all(rule in html for rule in RANDOMIZATION_RULES)


def test_randomization_failure_is_the_custom_rules_one_line(
    dataset_copy: Path, tmp_path: Path
) -> None:
    _edit_table(dataset_copy, "rct_train", _triple_arm_one)
    (dataset_copy / "truth.parquet").unlink()  # the copies are new users without ground truth
    docs = tmp_path / "data_docs"

    report = validate_dataset(dataset_copy, data_docs=docs)

    (failure,) = report.failures
    frequency = report.details["randomization"]["rct_train"]["frequency"]
    bad = [arm for arm in frequency if arm["p_value"] < FREQUENCY_MIN_P]
    assert 1 in [arm["arm"] for arm in bad]
    examples = [
        f"arm {a['arm']}: {a['rows']} rows weigh {a['weighted_count']:.0f} (p={a['p_value']:.1e})"
        for a in bad
    ]
    assert failure.message == (
        "rct_train.parquet: column 'propensity' breaks treatment_frequency_matches_propensity "
        f"(inverse-propensity-weighted arm counts differ from the {frequency[0]['expected']} "
        f"rows, p < 0.0001) in {sum(a['rows'] for a in bad)} row(s); e.g. {', '.join(examples)}"
    )
    assert failure.message in report.render()
    (page,) = (docs / "validations" / "rct_train").rglob("*.html")
    assert examples[0] in page.read_text()


def test_cli_on_a_corrupt_dataset_prints_one_line_per_rule_and_no_stack(
    dataset_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit_meta(dataset_copy, lambda m: m.update(n_treatments="five"))
    _edit_table(dataset_copy, "obs", lambda f: f.assign(x2=f["x2"].astype(str)))
    _edit_table(dataset_copy, "rct_val", lambda f: f.drop(columns=["cost", "treatment"]))
    (dataset_copy / table_file("rct_test")).write_bytes(b"not a parquet file")
    docs = tmp_path / "data_docs"
    args = ["validate", str(dataset_copy), "--report", str(tmp_path / "report.json")]

    assert main([*args, "--data-docs", str(docs)]) == 1

    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "readable_parquet" in captured.out
    assert "Traceback" not in captured.out + captured.err
    assert (docs / "index.html").is_file()
