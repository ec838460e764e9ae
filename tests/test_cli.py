"""The command line end to end on small data: simulate, validate, summarize."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from bidfcl.cli import app

runner = CliRunner()


def test_simulate_validate_summarize(tmp_path: Path) -> None:
    data = tmp_path / "sim"
    result = runner.invoke(
        app, ["simulate", str(data), "--n-obs", "3000", "--n-rct", "2500", "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    assert (data / "truth.parquet").exists()

    report = tmp_path / "report.json"
    result = runner.invoke(app, ["validate", str(data), "--report", str(report)])
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
    result = runner.invoke(app, ["validate", str(dataset_copy), "--report", str(report)])
    assert result.exit_code == 1
    assert "rct_test.parquet" in result.output and "revenue" in result.output
    failures = json.loads(report.read_text())["failures"]
    assert any(f["column"] == "revenue" and f["n_rows"] == 3 for f in failures)
