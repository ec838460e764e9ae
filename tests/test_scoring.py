"""Scoring a saved model: metrics.json, and streaming allocation of new users."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from bidfcl.allocation import STATUS_OK, lagrangian_choice, solve_mckp
from bidfcl.cli import app, main
from bidfcl.contract import RCT_TEST, TREATMENT, USER_ID, DataContractError, load_dataset
from bidfcl.deployment import Calibration, deploy
from bidfcl.methods import train_to_folder
from bidfcl.model import FeatureMismatchError, ModelConfig, UpliftModel
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


# ----------------------------------------------------------------------------- streaming

FEATURES = [f"f{i}" for i in range(5)]


@pytest.fixture(scope="module")
def streaming_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[UpliftModel, Path]:
    """An untrained (random-weight) saved model: allocation needs scores, not good ones."""
    torch.manual_seed(0)
    x = torch.randn(256, len(FEATURES)) * 3 + 1
    model = UpliftModel.build(x, FEATURES, ["control", "a", "b", "c"], ModelConfig(hidden=(8,)))
    return model, model.save(tmp_path_factory.mktemp("streaming") / "model")


def _users_file(path: Path, n: int, row_group_size: int, seed: int = 0) -> pd.DataFrame:
    """Shuffled ids and float64 features, written in many row groups."""
    rng = np.random.default_rng(seed)
    users = pd.DataFrame(rng.normal(1.0, 3.0, (n, len(FEATURES))), columns=FEATURES)
    users.insert(0, USER_ID, rng.permutation(10 * n)[:n].astype(np.int64))
    pq.write_table(pa.Table.from_pandas(users), path, row_group_size=row_group_size)
    return users


def test_allocate_streaming_matches_in_memory(
    streaming_model: tuple[UpliftModel, Path], tmp_path: Path
) -> None:
    model, model_dir = streaming_model
    users_file = tmp_path / "users.parquet"
    users = _users_file(users_file, 1000, row_group_size=37)
    assert pq.ParquetFile(users_file).metadata.num_row_groups > 20
    revenue, cost = model.predict(torch.tensor(users[FEATURES].to_numpy(), dtype=torch.float32))
    cheapest = float(cost.min(1).values.mean())
    unconstrained = solve_mckp(revenue, cost, float(cost.max())).mean_cost
    budget = cheapest + 0.4 * (unconstrained - cheapest)
    in_memory = deploy(model, revenue, cost, budget)
    assert in_memory.status == STATUS_OK  # the budget binds: the exact MCKP, not a shortcut

    out = tmp_path / "plan.parquet"
    streamed = allocate_file(model_dir, users_file, budget, out, chunk_rows=50)
    written = pd.read_parquet(out)
    assert list(written.columns) == [USER_ID, TREATMENT]
    np.testing.assert_array_equal(written[USER_ID], users[USER_ID])
    np.testing.assert_array_equal(written[TREATMENT], in_memory.treatment.numpy())
    assert pq.ParquetFile(out).metadata.num_row_groups == 20  # written chunk by chunk
    # float32 predictions of a 50-row batch may differ from a whole-table one in the last bit
    assert streamed.lam == pytest.approx(in_memory.lam, rel=1e-6)
    assert streamed.mean_cost == pytest.approx(in_memory.mean_cost, rel=1e-6)

    via_cli = tmp_path / "cli.parquet"
    argv = ["allocate", str(model_dir), str(users_file), "--budget", repr(budget)]
    assert main([*argv, "--out", str(via_cli), "--chunk-rows", "64"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(via_cli), written)


@pytest.mark.parametrize("missing", ["nan", "null"])
def test_allocate_streaming_refuses_missing_features(
    streaming_model: tuple[UpliftModel, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    missing: str,
) -> None:
    _, model_dir = streaming_model
    users_file = tmp_path / "users.parquet"
    users = _users_file(users_file, 300, row_group_size=40)
    table = pa.Table.from_pandas(users)
    column = pa.array(users["f3"].where(users.index != 250, np.nan), from_pandas=missing == "null")
    assert column.null_count == (missing == "null")
    pq.write_table(table.set_column(4, "f3", column), users_file, row_group_size=40)
    out = tmp_path / "plan.parquet"
    out.write_text("the previous plan")

    argv = ["allocate", str(model_dir), str(users_file), "--budget", "0.5", "--out", str(out)]
    assert main([*argv, "--chunk-rows", "32"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0]
    assert f"{users_file}: column 'f3' breaks features_finite" in lines[0]
    assert out.read_text() == "the previous plan"  # nothing written, the old file kept
    assert {p.name for p in tmp_path.iterdir()} == {"users.parquet", "plan.parquet"}
    with pytest.raises(DataContractError) as refused:
        allocate_file(model_dir, users_file, 0.5, out, chunk_rows=32)
    assert (refused.value.file, refused.value.column) == (str(users_file), "f3")
    assert refused.value.rule == "features_finite"


def test_allocate_streaming_refuses_a_user_repeated_across_chunks(
    streaming_model: tuple[UpliftModel, Path], tmp_path: Path
) -> None:
    _, model_dir = streaming_model
    users_file = tmp_path / "users.parquet"
    users = _users_file(users_file, 200, row_group_size=30)
    users.loc[190, USER_ID] = users.loc[3, USER_ID]  # chunk 0 and chunk 3 of 50 rows
    users.to_parquet(users_file, index=False)
    with pytest.raises(DataContractError, match="user_id_unique"):
        allocate_file(model_dir, users_file, 0.5, tmp_path / "p.parquet", chunk_rows=50)
    assert not (tmp_path / "p.parquet").exists()
