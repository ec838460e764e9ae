"""The data contract: round trips, typed tensors, truth alignment and atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bidfcl import contract as C


def _meta(**extra: object) -> C.DatasetMeta:
    return C.DatasetMeta(
        n_treatments=3,
        treatment_names=["control", "small", "big"],
        feature_columns=["a", "b"],
        source="unit test",
        extra=dict(extra),
    )


def _table(user_ids: list[int], rng: np.random.Generator) -> pd.DataFrame:
    n = len(user_ids)
    return pd.DataFrame(
        {
            "treatment": rng.integers(0, 3, n),
            "b": rng.normal(size=n),
            "user_id": user_ids,
            "a": rng.normal(size=n),
            "revenue": rng.exponential(size=n),
            "cost": rng.exponential(size=n),
            "propensity": np.full(n, 1 / 3),
        }
    )


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    tables = {
        name: _table(list(range(10 * k, 10 * k + 10)), rng) for k, name in enumerate(C.TABLES)
    }
    truth = pd.DataFrame(
        {"user_id": range(40)}
        | {f"revenue_{j}": np.arange(40) + j for j in range(3)}
        | {f"cost_{j}": np.full(40, float(j)) for j in range(3)}
    )
    return C.save_dataset(tmp_path / "ds", _meta(default_budget=0.5), tables, truth)


def test_round_trip_keeps_tables_meta_and_unknown_keys(saved: Path) -> None:
    ds = C.load_dataset(saved)
    assert ds.meta.n_treatments == 3
    assert ds.meta.extra == {"default_budget": 0.5}
    assert json.loads((saved / C.META_FILE).read_text())["default_budget"] == 0.5
    for name in C.TABLES:
        assert list(ds.table(name).columns) == ds.meta.row_columns
        assert len(ds.table(name)) == 10
    assert ds.truth is not None


def test_logged_tensors_are_typed(saved: Path) -> None:
    logged = C.load_dataset(saved).logged(C.RCT_TEST)
    assert logged.x.dtype == torch.float32 and logged.x.shape == (10, 2)
    assert logged.treatment.dtype == torch.int64
    assert logged.user_id.dtype == torch.int64
    assert logged.revenue.dtype == torch.float32
    assert logged.has_propensity and len(logged) == 10 and logged.n_treatments == 3


def test_missing_propensity_becomes_nan(saved: Path) -> None:
    ds = C.load_dataset(saved)
    frame = ds.table(C.OBS).drop(columns=["propensity"])
    logged = C.frame_to_logged(frame, ds.meta)
    assert torch.isnan(logged.propensity).all() and not logged.has_propensity


def test_truth_is_aligned_with_table_rows(saved: Path) -> None:
    ds = C.load_dataset(saved)
    truth = ds.truth_for(C.RCT_TRAIN)
    assert truth is not None
    ids = ds.table(C.RCT_TRAIN)["user_id"].to_numpy()
    assert torch.equal(truth.revenue[:, 2], torch.tensor(ids + 2.0, dtype=torch.float64))
    value, cost = truth.policy_value(torch.full((10,), 2))
    assert value == pytest.approx(ids.mean() + 2) and cost == pytest.approx(2.0)


def test_truth_missing_user_is_an_error(saved: Path) -> None:
    ds = C.load_dataset(saved)
    assert ds.truth is not None
    with pytest.raises(C.DataContractError, match="no ground truth"):
        C.truth_for_users(ds.truth, pd.Series([999]), 3)


def test_meta_errors_name_the_file_and_key(tmp_path: Path) -> None:
    (tmp_path / C.META_FILE).write_text(json.dumps({"n_treatments": 2}))
    with pytest.raises(C.DataContractError, match=r"meta\.json.*treatment_names"):
        C.read_meta(tmp_path)
    (tmp_path / C.META_FILE).write_text("{not json")
    with pytest.raises(C.DataContractError, match="not valid JSON"):
        C.read_meta(tmp_path)


def test_unknown_table_name_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(C.DataContractError, match="unknown table"):
        C.save_dataset(tmp_path, _meta(), {"train": pd.DataFrame()})
