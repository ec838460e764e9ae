"""The command line end to end on small data, and how it reports errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from bidfcl.cli import app, main
from bidfcl.train_config import TrainConfig

runner = CliRunner()


def test_simulate_validate_summarize(tmp_path: Path) -> None:
    data = tmp_path / "sim"
    result = runner.invoke(
        app, ["simulate", str(data), "--n-obs", "3000", "--n-rct", "2500", "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    assert (data / "truth.parquet").exists()

    report = tmp_path / "report.json"
    result = runner.invoke(
        app, ["validate", str(data), "--report", str(report), "--data-docs", str(tmp_path / "docs")]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["passed"] is True

    result = runner.invoke(app, ["summarize", str(data), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    truth = summary["truth_rct_test"]
    assert summary["tables"]["obs"]["rows"] == 3000
    assert truth["all_max_arm"]["cost"] > summary["default_budget"] > truth["all_control"]["cost"]
    oracle = truth["oracle_at_default_budget"]
    assert oracle["cost"] <= summary["default_budget"] + 1e-9
    assert oracle["revenue"] > truth["all_control"]["revenue"]


def test_validate_exits_non_zero_and_names_column_and_rule(
    dataset_copy: Path, tmp_path: Path
) -> None:
    path = dataset_copy / "rct_test.parquet"
    frame = pd.read_parquet(path)
    frame.loc[frame.index[:3], "revenue"] = -1.0
    frame.to_parquet(path, index=False)

    report = tmp_path / "report.json"
    result = runner.invoke(
        app,
        [
            "validate",
            str(dataset_copy),
            "--report",
            str(report),
            "--data-docs",
            str(tmp_path / "docs"),
        ],
    )
    assert result.exit_code == 1
    assert "rct_test.parquet" in result.output and "revenue" in result.output
    failures = json.loads(report.read_text())["failures"]
    assert any(f["column"] == "revenue" and f["n_rows"] == 3 for f in failures)


# --------------------------------------------------------------------------- errors and help


def test_help_shows_defaults_and_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "[default: train.method of the parameters]" in text
    assert main(["evaluate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "<ipw|snipw|dr>" in text and "[default: dr]" in text


def test_a_bad_option_is_one_line_and_exit_2(
    small_dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", str(small_dataset_dir), "--out", str(tmp_path / "m"), "--method", "nope"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown method 'nope'" in err and "tsm-rct" in err
    assert not (tmp_path / "m").exists()
    assert main(["evaluate", "m", "d", "--estimator", "xyz"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_bad_input_is_one_line_and_exit_1_and_debug_shows_the_stack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["summarize", str(tmp_path / "missing")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err == f"bidfcl: error: {tmp_path / 'missing' / 'meta.json'}: file not found\n"
    assert main(["--debug", *args]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_train_outside_a_project_uses_the_library_defaults(
    small_dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no params.yaml here
    out = tmp_path / "model"
    assert main(["train", str(small_dataset_dir), "--out", str(out), "--method", "tsm-rct"]) == 0
    trained = json.loads((out / "model.json").read_text())["metadata"]["train_config"]
    assert trained == {**TrainConfig().to_dict(), "method": "tsm-rct"}
    missing = ["train", str(small_dataset_dir), "--out", str(out), "--params", "nope.yaml"]
    assert main(missing) == 1  # an explicit parameters file must exist
