"""Scoring a saved model: metrics.json, and streaming allocation of new users."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from bidfcl.allocation import lagrangian_choice, solve_mckp
from bidfcl.cli import app
from bidfcl.contract import RCT_TEST, load_dataset
from bidfcl.deployment import Calibration
from bidfcl.methods import train_to_folder
from bidfcl.model import FeatureMismatchError, UpliftModel
from bidfcl.scoring import Metrics, allocate_file, evaluate_model
from bidfcl.train_config import TrainConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(small_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = TrainConfig(method="tsm-rct", max_epochs=2, num_threads=1)
    return train_to_folder(small_dataset_dir, tmp_path_factory.mktemp("m") / "model", config, False)


def test_evaluate_writes_metrics_with_estimates_beside_truth(
    model_dir: Path, small_dataset_dir: Path, tmp_path: Path
) -> None:
    out, curve = tmp_path / "metrics.json", tmp_path / "curve.csv"
    metrics = evaluate_model(model_dir, small_dataset_dir, out, curve_out=curve).to_json()
    assert json.loads(out.read_text()) == metrics
    assert Metrics.read(out).to_json() == metrics  # the record the gate and registry read back
    assert "aucc" not in metrics  # five arms: the budget-value curve, not AUCC
    budget = load_dataset(small_dataset_dir, tables=()).meta.extra["default_budget"]
    assert metrics["budget"] == pytest.approx(budget)
    assert metrics["eom_ci_low"] < metrics["eom"] < metrics["eom_ci_high"]
    assert metrics["mean_cost"] <= budget + 1e-6 and metrics["budget_met"]
    assert metrics["deployed_predicted_cost"] <= budget + 1e-6
    assert metrics["method"] == "tsm-rct"
    for key in ("true_value", "true_cost", "deployed_true_value", "budget_curve_area"):
        assert isinstance(metrics[key], float)
    assert metrics["oracle_value"] >= metrics["deployed_true_value"] - 1e-9
    frame = pd.read_csv(curve)
    assert list(frame["budget"]) == sorted(frame["budget"])
    assert {"eom", "true_revenue"} <= set(frame.columns)


def test_allocate_streams_chunks_into_the_one_shot_solution(
    model_dir: Path, small_dataset_dir: Path, tmp_path: Path
) -> None:
    users = load_dataset(small_dataset_dir, tables=(RCT_TEST,)).table(RCT_TEST)
    features = UpliftModel.load(model_dir).feature_columns
    users_file = tmp_path / "users.parquet"
    users[["user_id", *features]].to_parquet(users_file, index=False)  # no outcomes needed
    out = tmp_path / "alloc.parquet"

    result = allocate_file(model_dir, users_file, budget=2.0, out=out, chunk_rows=97)

    written = pd.read_parquet(out)
    assert list(written.columns) == ["user_id", "treatment"]
    assert written["user_id"].tolist() == users["user_id"].tolist()
    model = UpliftModel.load(model_dir)
    revenue, cost = model.predict(torch.tensor(users[features].to_numpy(), dtype=torch.float32))
    one_shot = solve_mckp(revenue, cost, 2.0)
    assert torch.equal(torch.tensor(written["treatment"].to_numpy()), one_shot.treatment)
    assert result.mean_cost <= 2.0 + 1e-6


def test_allocate_refuses_a_table_without_the_model_features(
    model_dir: Path, tmp_path: Path
) -> None:
    users_file = tmp_path / "users.parquet"
    pd.DataFrame({"user_id": [1, 2], "x0": [0.1, 0.2]}).to_parquet(users_file, index=False)
    with pytest.raises(FeatureMismatchError, match="missing from the data"):
        allocate_file(model_dir, users_file, budget=1.0, out=tmp_path / "a.parquet")
    assert not (tmp_path / "a.parquet").exists()


def test_cli_evaluate_and_allocate(
    model_dir: Path, small_dataset_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "metrics.json"
    result = runner.invoke(
        app, ["evaluate", str(model_dir), str(small_dataset_dir), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "EOM" in result.output and "deployed allocation (calibrated)" in result.output
    assert "; true " in result.output
    assert json.loads(out.read_text())["eom"] > 0

    users = tmp_path / "users.parquet"
    load_dataset(small_dataset_dir, tables=(RCT_TEST,)).table(RCT_TEST).to_parquet(users)
    alloc = tmp_path / "alloc.parquet"
    result = runner.invoke(
        app, ["allocate", str(model_dir), str(users), "--budget", "1.5", "--out", str(alloc)]
    )
    assert result.exit_code == 0, result.output
    assert len(pd.read_parquet(alloc)) == len(pd.read_parquet(users))


def test_metrics_name_an_unknown_key_in_a_metrics_file() -> None:
    with pytest.raises(ValueError, match=r"m\.json: unknown metric\(s\) \['eomm'\]"):
        Metrics.from_json({"eomm": 1.0}, origin="m.json")


def test_two_arm_metrics_rank_by_aucc_qini_and_auuc(tmp_path: Path) -> None:
    from bidfcl.simulate import SimulatorConfig, simulate_to_folder

    data = simulate_to_folder(
        tmp_path / "two-arms", SimulatorConfig(n_obs=1000, n_rct=3000, n_treatments=2), False
    )
    config = TrainConfig(method="tsm-rct", max_epochs=1, num_threads=1)
    model = train_to_folder(data, tmp_path / "model", config, progress=False)
    metrics = evaluate_model(model, data, tmp_path / "metrics.json").to_json()
    for key in ("aucc", "qini", "auuc"):
        assert isinstance(metrics[key], float), key
    assert "budget_curve_area" not in metrics


def test_compare_writes_the_paired_difference_of_two_models(
    model_dir: Path, small_dataset_dir: Path, tmp_path: Path
) -> None:
    other = train_to_folder(
        small_dataset_dir,
        tmp_path / "other",
        TrainConfig(method="tsm-obs", max_epochs=2, num_threads=1),
        progress=False,
    )
    out = tmp_path / "compare.json"
    args = ["compare", str(other), str(model_dir), str(small_dataset_dir), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "A - B: revenue" in result.output and "true difference" in result.output
    report = json.loads(out.read_text())
    expected = {"difference", "ci_low", "ci_high", "p_value", "cost_difference", "agreement"}
    assert expected | {"estimator", "n_users", "true_difference"} <= set(report)
    assert report["estimator"] == "dr" and 0.0 <= report["agreement"] <= 1.0
    assert report["ci_low"] <= report["difference"] <= report["ci_high"]
    itself = runner.invoke(
        app, ["compare", str(model_dir), str(model_dir), str(small_dataset_dir), "--out", str(out)]
    )
    assert itself.exit_code == 0
    assert json.loads(out.read_text())["difference"] == 0.0


def test_allocate_ships_the_calibrated_lambda_at_the_calibrated_budget(
    model_dir: Path, small_dataset_dir: Path, tmp_path: Path
) -> None:
    model = UpliftModel.load(model_dir)
    calibration = Calibration.of(model)
    assert calibration is not None  # params.yaml's default: calibrate_spend
    users = small_dataset_dir / "rct_test.parquet"
    result = allocate_file(model_dir, users, calibration.budget, tmp_path / "plan.parquet")
    x = load_dataset(small_dataset_dir, tables=(RCT_TEST,)).logged(RCT_TEST).x
    revenue, cost = model.predict(x)
    assert result.status == "calibrated" and result.lam == calibration.lam
    assert result.treatment.equal(lagrangian_choice(revenue, cost, calibration.lam))
