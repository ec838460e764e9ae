"""Bad input at every entry point (issue 13): each planted input is refused with one line that
names the file, the column and the rule (exit 1; a bad option value exits 2 like any usage
error), no traceback, and nothing partial written. README.md's reliability table lists the
same inputs. Every test name holds ``bad_input``, so ``pytest -k bad_input`` runs them all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from bidfcl import stages
from bidfcl.cli import main
from bidfcl.contract import (
    META_FILE,
    OBS,
    RCT_TEST,
    RCT_TRAIN,
    RCT_VAL,
    TRUTH_FILE,
    load_dataset,
    table_file,
)
from bidfcl.methods import TrainingDiverged, train_model, train_to_folder
from bidfcl.model import MODEL_FILE
from bidfcl.params import IngestParams, ValidateParams, load_params
from bidfcl.train_config import TrainConfig
from bidfcl.validation import SuiteSettings, validate_dataset
from test_stages import REPO, make_project

Corruption = Callable[[Path], None]


# --------------------------------------------------------------------------- planting


def edit_table(table: str, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Corruption:
    def corrupt(folder: Path) -> None:
        path = folder / (table if table.endswith(".parquet") else table_file(table))
        edit(pd.read_parquet(path)).to_parquet(path, index=False)

    return corrupt


def edit_meta(edit: Callable[[dict], object]) -> Corruption:
    def corrupt(folder: Path) -> None:
        meta = json.loads((folder / META_FILE).read_text())
        edit(meta)
        (folder / META_FILE).write_text(json.dumps(meta))  # NaN is written as NaN, as Python does

    return corrupt


def set_first(column: str, value: object, rows: int = 1) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def edit(frame: pd.DataFrame) -> pd.DataFrame:
        if frame[column].dtype.kind in "iu" and not isinstance(value, int):
            frame[column] = frame[column].astype("float64")
        frame.loc[frame.index[:rows], column] = value
        return frame

    return edit


def as_csv(file: str) -> Corruption:
    """The table written as CSV under its .parquet name."""

    def corrupt(folder: Path) -> None:
        path = folder / file
        pd.read_parquet(path).to_csv(path, index=False)

    return corrupt


def repeat_column(file: str, column: str) -> Corruption:
    """A second column with the same name (pandas cannot write that; pyarrow can)."""

    def corrupt(folder: Path) -> None:
        table = pq.read_table(folder / file)
        names = [*table.column_names, column]
        pq.write_table(
            pa.Table.from_arrays([*table.columns, table[column]], names=names), folder / file
        )

    return corrupt


def duplicate_first_user(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[frame.index[1], "user_id"] = frame.loc[frame.index[0], "user_id"]
    return frame


def planted(folder: Path, *corruptions: Corruption) -> Path:
    for corrupt in corruptions:
        corrupt(folder)
    return folder


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], *named: str, code: int = 1) -> str:
    """Run the command line; it must exit ``code`` with one stderr line holding ``named``."""
    status = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == code, captured.out + captured.err
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert all(word in lines[0] for word in named), lines[0]
    return lines[0]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(small_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = TrainConfig(method="tsm-rct", max_epochs=1, num_threads=1)
    return train_to_folder(small_dataset_dir, tmp_path_factory.mktemp("m") / "model", config, False)


@pytest.fixture(scope="module")
def other_features_model(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model as if trained on other features: x0 is z0 in its description."""
    dest = tmp_path_factory.mktemp("other") / "model"
    shutil.copytree(model_dir, dest)
    description = json.loads((dest / MODEL_FILE).read_text())
    description["feature_columns"][0] = "z0"
    (dest / MODEL_FILE).write_text(json.dumps(description))
    return dest


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    """Settings for the train command that would train in a second, were anything accepted."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_epochs": 1, "num_threads": 1}}))
    return path


@pytest.fixture
def users(small_dataset_dir: Path, tmp_path: Path) -> pd.DataFrame:
    """A users table: rct_test's ids and features (what allocate reads)."""
    dataset = load_dataset(small_dataset_dir, tables=(RCT_TEST,))
    return dataset.table(RCT_TEST)[["user_id", *dataset.meta.feature_columns]].copy()


# --------------------------------------------------------------------------- validate

# id -> (corruptions, require_default_budget, file, column, rule)
VALIDATE_CASES: dict[str, tuple[tuple[Corruption, ...], bool, str, str | None, str]] = {
    "obs_feature_inf": (
        (edit_table("obs", set_first("x1", np.inf, rows=3)),),
        False,
        "obs.parquet",
        "x1",
        "expect_column_values_to_be_between",
    ),
    "obs_feature_1e300": (
        (edit_table("obs", set_first("x1", 1e300)),),
        False,
        "obs.parquet",
        "x1",
        "expect_column_values_to_be_between",
    ),
    "rct_feature_nan": (
        (edit_table("rct_val", set_first("x4", np.nan)),),
        False,
        "rct_val.parquet",
        "x4",
        "expect_column_values_to_not_be_null",
    ),
    "default_budget_string": (
        (edit_meta(lambda m: m.update(default_budget="3.7")),),
        False,
        "meta.json",
        "default_budget",
        "expect_column_values_to_be_in_type_list",
    ),
    "default_budget_negative": (
        (edit_meta(lambda m: m.update(default_budget=-1.0)),),
        False,
        "meta.json",
        "number(default_budget)",
        "expect_column_values_to_be_between",
    ),
    "default_budget_nan": (
        (edit_meta(lambda m: m.update(default_budget=float("nan"))),),
        False,
        "meta.json",
        "default_budget",
        "expect_column_values_to_not_be_null",
    ),
    "default_budget_missing_where_relied_on": (
        (edit_meta(lambda m: m.pop("default_budget")),),
        True,
        "meta.json",
        "default_budget",
        "expect_table_columns_to_match_set",
    ),
    "truth_missing_users": (
        (edit_table(TRUTH_FILE, lambda f: f.iloc[5:]),),
        False,
        "truth.parquet",
        "user_id",
        "truth_covers_users",
    ),
    "truth_is_csv": ((as_csv(TRUTH_FILE),), False, "truth.parquet", None, "readable_parquet"),
    "rct_propensity_1e-9": (
        (edit_table("rct_test", set_first("propensity", 1e-9)),),
        False,
        "rct_test.parquet",
        "propensity",
        "expect_column_values_to_be_between",
    ),
    **{
        f"{table}_is_csv": (
            (as_csv(table_file(table)),),
            False,
            table_file(table),
            None,
            "readable_parquet",
        )
        for table in ("obs", "rct_train", "rct_val", "rct_test")
    },
    "duplicated_column_names": (
        (repeat_column("rct_val.parquet", "x0"),),
        False,
        "rct_val.parquet",
        "x0",
        "unique_column_names",
    ),
    "user_id_typed_differently": (
        (edit_table("rct_val", lambda f: f.assign(user_id=f["user_id"].astype(str))),),
        False,
        "rct_val.parquet",
        "user_id",
        "expect_column_values_to_be_in_type_list",
    ),
    "meta_n_treatments_4_names_5": (
        (edit_meta(lambda m: m.update(n_treatments=4)),),
        False,
        "meta.json",
        "n_treatments, len(treatment_names)",
        "expect_column_pair_values_to_be_equal",
    ),
}


@pytest.mark.parametrize("case", list(VALIDATE_CASES))
def test_validate_names_each_bad_input(case: str, dataset_copy: Path) -> None:
    corruptions, require_budget, file, column, rule = VALIDATE_CASES[case]
    planted(dataset_copy, *corruptions)

    report = validate_dataset(
        dataset_copy, settings=SuiteSettings(require_default_budget=require_budget)
    )

    (failure,) = report.failures  # one planted input, one line
    assert (failure.file, failure.column, failure.rule) == (file, column, rule), failure.message
    assert failure.message.startswith(f"{file}: ") and rule in failure.message


def test_validate_command_bad_input_is_one_line_per_failure_and_exit_1(
    dataset_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    planted(dataset_copy, edit_table("rct_test", set_first("propensity", 1e-9)))
    args = ["validate", str(dataset_copy), "--report", str(tmp_path / "r.json")]

    assert main([*args, "--data-docs", str(tmp_path / "docs"), "--propensity-floor", "0.01"]) == 1

    out = capsys.readouterr().out
    assert "FAILED (1 failure(s)" in out
    assert "rct_test.parquet: column 'propensity' breaks expect_column_values_to_be_between" in out
    assert "min_value=0.01" in out  # the floor is a setting


def test_validate_bad_input_defaults_come_from_params(dataset_copy: Path) -> None:
    """The pipeline's defaults: floor 0.001, and meta.json must carry the budget exactly when
    train.budget or evaluate.budget is null."""
    settings = load_params(REPO / "params.yaml", run_overrides=False).validate
    assert settings.propensity_floor == 0.001 and settings.require_default_budget is True
    given = {"train.budget": 2.0, "evaluate.budget": 2.0}
    assert load_params(REPO / "params.yaml", given, run_overrides=False).validate == ValidateParams(
        suites="expectations", require_default_budget=False
    )
    with pytest.raises(ValueError, match="propensity_floor"):
        ValidateParams(propensity_floor=0)


# --------------------------------------------------------------------------- train

# id -> (corruptions, method, named in the line)
TRAIN_CASES: dict[str, tuple[tuple[Corruption, ...], str, tuple[str, ...]]] = {
    "meta_n_treatments_4_names_5": (
        (edit_meta(lambda m: m.update(n_treatments=4)),),
        "tsm-rct",
        ("meta.json", "key 'treatment_names'", "one_name_per_arm"),
    ),
    "negative_revenue": (
        (edit_table("rct_train", set_first("revenue", -2.0)),),
        "tsm-rct",
        ("rct_train.parquet", "column 'revenue'", "outcome_finite_non_negative"),
    ),
    "duplicate_user_ids": (
        (edit_table("rct_train", duplicate_first_user),),
        "tsm-rct",
        ("rct_train.parquet", "column 'user_id'", "user_id_unique"),
    ),
    "rct_propensity_zero": (
        (edit_table("rct_val", set_first("propensity", 0.0)),),
        "tsm-rct",
        ("rct_val.parquet", "column 'propensity'", "propensity_in_unit_interval"),
    ),
    "obs_propensity_zero_tsm_ips": (
        (edit_table("obs", set_first("propensity", 0.0)),),
        "tsm-ips",
        ("obs.parquet", "column 'propensity'", "propensity_in_unit_interval"),
    ),
    "obs_feature_inf": (
        (edit_table("obs", set_first("x2", -np.inf)),),
        "tsm-obs",
        ("obs.parquet", "column 'x2'", "features_finite"),
    ),
    "obs_feature_1e300": (
        (edit_table("obs", set_first("x2", 1e300)),),
        "tsm-obs",
        ("obs.parquet", "column 'x2'", "features_finite"),
    ),
    "missing_feature_column": (
        (edit_table("rct_train", lambda f: f.drop(columns="x3")),),
        "tsm-rct",
        ("rct_train.parquet", "column 'x3'", "required_columns"),
    ),
    "rct_train_is_csv": (
        (as_csv("rct_train.parquet"),),
        "tsm-rct",
        ("rct_train.parquet", "readable_parquet"),
    ),
    "duplicated_column_names": (
        (repeat_column("rct_train.parquet", "x5"),),
        "tsm-rct",
        ("rct_train.parquet", "column 'x5'", "unique_column_names"),
    ),
    "user_id_typed_differently": (
        (edit_table("rct_val", lambda f: f.assign(user_id=f["user_id"].astype(str))),),
        "tsm-rct",
        ("rct_val.parquet", "column 'user_id'", "user_id_integer"),
    ),
    **{
        f"default_budget_{name}": (
            (edit_meta(edit),),
            "tsm-rct",
            ("meta.json", "key 'default_budget'", "budget_positive_finite"),
        )
        for name, edit in {
            "string": lambda m: m.update(default_budget="3.7"),
            "negative": lambda m: m.update(default_budget=-1),
            "nan": lambda m: m.update(default_budget=float("nan")),
            "missing": lambda m: m.pop("default_budget"),
        }.items()
    },
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_refuses_bad_input(
    case: str,
    dataset_copy: Path,
    params_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    corruptions, method, named = TRAIN_CASES[case]
    planted(dataset_copy, *corruptions)
    out = tmp_path / "model"
    args = ["train", str(dataset_copy), "--out", str(out), "--method", method]

    refused(capsys, [*args, "--params", str(params_file)], *named)

    assert not out.exists() and not list(tmp_path.glob(".model*"))


def test_train_bad_input_budget_in_params_is_refused_before_training(
    small_dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"budget": 0}}))
    out = tmp_path / "model"
    argv = ["train", str(small_dataset_dir), "--out", str(out), "--params", str(params)]

    refused(capsys, argv, "params.yaml", "key 'train.budget'", "budget_positive_finite")
    assert not out.exists()


# --------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("budget", ["0", "-1", "nan", "inf"])
@pytest.mark.parametrize("command", ["train", "evaluate", "compare", "allocate"])
def test_bad_input_budget_is_a_usage_error_before_anything_runs(
    command: str,
    budget: str,
    model_dir: Path,
    small_dataset_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    data, model = str(small_dataset_dir), str(model_dir)
    argv = {
        "train": ["train", data, "--out", str(out)],
        "evaluate": ["evaluate", model, data, "--out", str(out)],
        "compare": ["compare", model, model, data, "--out", str(out)],
        "allocate": [
            "allocate",
            model,
            str(small_dataset_dir / "rct_test.parquet"),
            "--out",
            str(out),
        ],
    }[command]

    refused(capsys, [*argv, "--budget", budget], "'--budget'", "budget_positive_finite", code=2)

    assert not out.exists()


def test_bad_input_budget_in_the_flow_is_refused_before_anything_is_written() -> None:
    """The flow reads its settings (with --budget as an override) before its first task."""
    for budget in (0.0, -1.0, float("nan")):
        overrides = {"train.budget": budget, "evaluate.budget": budget}
        with pytest.raises(ValueError, match=r"key 'train\.budget' breaks budget_positive_finite"):
            load_params(REPO / "params.yaml", overrides, run_overrides=False)


def test_bad_input_huge_budget_is_accepted_and_said_not_to_bind(
    model_dir: Path,
    small_dataset_dir: Path,
    users: pd.DataFrame,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Above what every user's dearest arm costs, a budget is not wrong, only slack: each
    user gets the arm of highest predicted revenue, and the output says the budget does not
    bind."""
    users.to_parquet(tmp_path / "users.parquet", index=False)
    plan = tmp_path / "plan.parquet"
    allocate = ["allocate", str(model_dir), str(tmp_path / "users.parquet"), "--out", str(plan)]
    evaluate = [
        "evaluate",
        str(model_dir),
        str(small_dataset_dir),
        "--out",
        str(tmp_path / "m.json"),
    ]
    for argv in (allocate, evaluate):
        assert main([*argv, "--budget", "1e12"]) == 0
        assert "budget_slack: the budget does not bind" in capsys.readouterr().out
    assert len(pd.read_parquet(plan)) == len(users)
    assert json.loads((tmp_path / "m.json").read_text())["budget"] == 1e12


# --------------------------------------------------------------------------- evaluate, compare

# id -> (corruptions, named in the line)
EVALUATE_CASES: dict[str, tuple[tuple[Corruption, ...], tuple[str, ...]]] = {
    "rct_test_empty": (
        (edit_table("rct_test", lambda f: f.iloc[:0]),),
        ("rct_test.parquet", "non_empty_table"),
    ),
    "rct_test_is_csv": ((as_csv("rct_test.parquet"),), ("rct_test.parquet", "readable_parquet")),
    "rct_test_feature_nan": (
        (edit_table("rct_test", set_first("x7", np.nan)),),
        ("rct_test.parquet", "column 'x7'", "features_finite"),
    ),
    "rct_test_missing_feature": (
        (edit_table("rct_test", lambda f: f.drop(columns="x7")),),
        ("rct_test.parquet", "column 'x7'", "required_columns"),
    ),
    "truth_missing_users": (
        (edit_table(TRUTH_FILE, lambda f: f.iloc[::2]),),
        ("truth.parquet", "column 'user_id'", "truth_covers_users"),
    ),
    "default_budget_zero": (
        (edit_meta(lambda m: m.update(default_budget=0)),),
        ("meta.json", "key 'default_budget'", "budget_positive_finite"),
    ),
}


@pytest.mark.parametrize("case", list(EVALUATE_CASES))
def test_evaluate_refuses_bad_input(
    case: str,
    model_dir: Path,
    dataset_copy: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    corruptions, named = EVALUATE_CASES[case]
    planted(dataset_copy, *corruptions)
    out, curve = tmp_path / "metrics.json", tmp_path / "curve.csv"
    argv = ["evaluate", str(model_dir), str(dataset_copy), "--out", str(out), "--curve", str(curve)]

    refused(capsys, argv, *named)

    assert not out.exists() and not curve.exists()


@pytest.mark.parametrize("command", ["evaluate", "compare"])
def test_bad_input_model_trained_on_other_features_is_refused(
    command: str,
    model_dir: Path,
    other_features_model: Path,
    small_dataset_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out.json"
    models = (
        [str(other_features_model)]
        if command == "evaluate"
        else [str(model_dir), str(other_features_model)]
    )
    argv = [command, *models, str(small_dataset_dir), "--out", str(out)]

    line = refused(capsys, argv, "meta.json", "key 'feature_columns'", "model_features", "'z0'")

    assert str(other_features_model) in line and not out.exists()


# --------------------------------------------------------------------------- allocate


def _nan_user_id(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(user_id=frame["user_id"].astype("float64").where(frame.index > 0))


# id -> (users table edit, named in the line); the table is read 500 rows at a time
ALLOCATE_CASES: dict[str, tuple[Callable[[pd.DataFrame], pd.DataFrame], tuple[str, ...]]] = {
    "missing_feature": (lambda f: f.drop(columns="x3"), ("column 'x3'", "model_features")),
    "feature_nan": (
        set_first("x3", np.nan, rows=2),
        ("column 'x3'", "features_finite", "2 row(s)"),
    ),
    "feature_inf": (set_first("x9", np.inf), ("column 'x9'", "features_finite")),
    "feature_string": (
        lambda f: f.assign(x1=f["x1"].astype(str)),
        ("column 'x1'", "features_finite"),
    ),
    "zero_rows": (lambda f: f.iloc[:0], ("non_empty_table",)),
    "user_id_nan": (_nan_user_id, ("column 'user_id'", "user_id_integer", "1 row(s)")),
    "user_id_string": (
        lambda f: f.assign(user_id=f["user_id"].astype(str)),
        ("column 'user_id'", "user_id_integer"),
    ),
    "user_id_repeated_across_chunks": (
        lambda f: f.assign(user_id=np.r_[f["user_id"].to_numpy()[:-1], f["user_id"].iloc[0]]),
        ("column 'user_id'", "user_id_unique", "2 row(s)"),
    ),
    "user_id_missing": (
        lambda f: f.drop(columns="user_id"),
        ("column 'user_id'", "required_columns"),
    ),
}


@pytest.mark.parametrize("case", list(ALLOCATE_CASES))
def test_allocate_refuses_bad_input(
    case: str,
    model_dir: Path,
    users: pd.DataFrame,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    edit, named = ALLOCATE_CASES[case]
    path, plan = tmp_path / "users.parquet", tmp_path / "plan.parquet"
    edit(users).to_parquet(path, index=False)
    argv = ["allocate", str(model_dir), str(path), "--budget", "2", "--out", str(plan)]

    refused(capsys, [*argv, "--chunk-rows", "500"], str(path), *named)

    assert files(tmp_path) == {"users.parquet"}  # no plan, no temporary file


@pytest.mark.parametrize("case", ["is_csv", "duplicated_column_names", "other_features_model"])
def test_allocate_refuses_bad_input_files(
    case: str,
    model_dir: Path,
    other_features_model: Path,
    users: pd.DataFrame,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, plan = tmp_path / "users.parquet", tmp_path / "plan.parquet"
    users.to_parquet(path, index=False)
    model, named = model_dir, ("readable_parquet",)
    if case == "is_csv":
        as_csv("users.parquet")(tmp_path)
    elif case == "duplicated_column_names":
        repeat_column("users.parquet", "x2")(tmp_path)
        named = ("column 'x2'", "unique_column_names")
    else:
        model, named = other_features_model, ("column 'z0'", "model_features")
    argv = ["allocate", str(model), str(path), "--budget", "2", "--out", str(plan)]

    refused(capsys, argv, str(path), *named)

    assert files(tmp_path) == {"users.parquet"}


# --------------------------------------------------------------------------- feature names


def test_bad_input_feature_names_with_quotes_and_unicode_are_data_never_code(
    dataset_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Names that look like code, quotes, placeholders or unicode go through validation,
    training, evaluation and allocation as plain column names."""
    marker = tmp_path / "PWNED"
    renamed = {
        "x0": 'x"0',
        "x1": "x'1",
        "x2": "üñí€😀",
        "x3": f"__import__('os').system('touch {marker}')",
        "x4": "$features",
        "x5": "a.b[0]",
    }
    meta = json.loads((dataset_copy / META_FILE).read_text())
    meta["feature_columns"] = [renamed.get(c, c) for c in meta["feature_columns"]]
    (dataset_copy / META_FILE).write_text(json.dumps(meta))
    for table in ("obs", "rct_train", "rct_val", "rct_test"):
        edit_table(table, lambda f: f.rename(columns=renamed))(dataset_copy)

    report = validate_dataset(dataset_copy)
    assert report.passed, report.render()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"max_epochs": 1, "num_threads": 1}}))
    model = tmp_path / "model"
    train = ["train", str(dataset_copy), "--out", str(model), "--method", "tsm-rct"]
    assert main([*train, "--params", str(params)]) == 0
    assert main(["evaluate", str(model), str(dataset_copy), "--out", str(tmp_path / "m.json")]) == 0
    users = tmp_path / "users.parquet"
    pd.read_parquet(dataset_copy / "rct_test.parquet").to_parquet(users, index=False)
    plan = tmp_path / "plan.parquet"
    assert main(["allocate", str(model), str(users), "--budget", "2", "--out", str(plan)]) == 0
    capsys.readouterr()
    assert json.loads((model / MODEL_FILE).read_text())["feature_columns"][:6] == list(
        renamed.values()
    )
    assert len(pd.read_parquet(plan)) == len(pd.read_parquet(users))
    assert not marker.exists()


# --------------------------------------------------------------------------- the flow, DVC

BAD_BATCH = edit_table("obs", set_first("treatment", 9))  # the red team's batch


def test_flow_data_path_bad_input_is_never_published_for_versioning(
    small_dataset_dir: Path, dataset_copy: Path, tmp_path: Path
) -> None:
    """The flow's --data-path: ingest, then validate; only a passed batch reaches
    data/validated, the folder data.dvc imports, and a refused one leaves the last good
    batch there."""
    root = tmp_path / "project"
    suites = ValidateParams(suites=str(REPO / "expectations"))
    stages.ingest(root, IngestParams(source=str(small_dataset_dir)))
    stages.validate(root, suites)
    validated = root / stages.VALIDATED_DIR
    assert files(validated) == files(small_dataset_dir)
    landed = root / stages.LANDING_DIR / "obs.parquet"
    assert (validated / "obs.parquet").stat().st_ino == landed.stat().st_ino  # linked, not copied

    stages.ingest(root, IngestParams(source=str(planted(dataset_copy, BAD_BATCH))))
    with pytest.raises(stages.ValidationFailed) as failure:
        stages.validate(root, suites)

    assert "obs.parquet: column 'treatment' breaks expect_column_values_to_be_in_set" in str(
        failure.value
    )
    assert pd.read_parquet(validated / "obs.parquet")["treatment"].max() < 9  # the good batch


def test_data_dvc_imports_what_validate_publishes_bad_input() -> None:
    """DVC orders stages by their outputs: data.dvc reads the validate stage's output, so
    `dvc repro` validates a batch before it versions it."""
    validate = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["validate"]
    outs = {next(iter(o)) if isinstance(o, dict) else o for o in validate["outs"]}
    (dep,) = yaml.safe_load((REPO / stages.DATA_DVC).read_text())["deps"]
    assert dep["path"] == str(stages.VALIDATED_DIR) in outs


def test_dvc_repro_on_a_bad_input_batch_versions_nothing(
    dataset_copy: Path, tmp_path: Path
) -> None:
    root = make_project(
        tmp_path / "project", ingest={"source": str(planted(dataset_copy, BAD_BATCH))}
    )
    shutil.copy(REPO / "dvc.lock", root / "dvc.lock")  # what the last accepted run recorded
    before = (root / stages.DATA_DVC).read_bytes()
    locked = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    done = subprocess.run(
        [str(Path(sys.executable).with_name("dvc")), "repro"],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
    )

    assert done.returncode != 0, done.stdout
    assert "Running stage 'validate'" in done.stdout and "Importing" not in done.stdout
    assert (
        "column 'treatment' breaks expect_column_values_to_be_in_set" in done.stdout + done.stderr
    )
    assert (root / stages.DATA_DVC).read_bytes() == before
    after = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert {k: v for k, v in after.items() if k != "ingest"} == {  # ingest itself succeeded
        k: v for k, v in locked.items() if k != "ingest"
    }
    assert not (root / stages.RAW_DIR).exists() and not (root / stages.VALIDATED_DIR).exists()


def test_train_never_reports_success_for_a_diverged_model_bad_input(
    small_dataset_dir: Path,
) -> None:
    """A learning rate that blows the weights up ends in an error, not in NaN weights saved
    as a trained model."""
    dataset = load_dataset(small_dataset_dir, tables=(OBS, RCT_TRAIN, RCT_VAL))
    config = TrainConfig(method="tsm-rct", max_epochs=2, lr=1e30, calibrate_spend=False)
    with pytest.raises(TrainingDiverged, match="tsm-rct"):
        train_model(dataset, config, progress=False)
