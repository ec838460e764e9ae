"""Streaming OBS from parquet row groups: the same rows as the in-memory loader, the same
scaler, used exactly above ``stream_obs_above_mb``, disjoint row groups per rank."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bidfcl import streaming
from bidfcl.contract import (
    OBS,
    RCT_TRAIN,
    DataContractError,
    LoggedData,
    concat_logged,
    load_dataset,
    read_meta,
    table_file,
)
from bidfcl.datamodule import UpliftDataModule
from bidfcl.learner import UpliftLearner
from bidfcl.methods import STREAMING_METHODS, train_to_folder
from bidfcl.model import FeatureScaler, UpliftModel
from bidfcl.streaming import ParquetRows, StreamedRows, obs_tensor_mb, streams_obs
from bidfcl.train_config import TrainConfig

GROUP_ROWS = 300  # 4000 OBS rows: 14 row groups, so windows and ranks get several each
TINY = TrainConfig(
    method="tsm-obs", max_epochs=2, batch_size=512, hidden=(16, 8), num_threads=1, seed=3
)


@pytest.fixture(scope="module")
def grouped_dir(small_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small dataset with OBS rewritten in many small row groups."""
    folder = tmp_path_factory.mktemp("streaming") / "data"
    shutil.copytree(small_dataset_dir, folder)
    path = folder / table_file(OBS)
    pq.write_table(pq.read_table(path), path, row_group_size=GROUP_ROWS)
    return folder


def _obs(folder: Path) -> ParquetRows:
    return ParquetRows(folder / table_file(OBS), read_meta(folder))


def _ids(batches: list) -> Counter[int]:
    return Counter(torch.cat([b.user_id for b in batches]).tolist())


def test_streaming_serves_the_in_memory_loaders_rows_and_batch_sizes(grouped_dir: Path) -> None:
    dataset = load_dataset(grouped_dir)
    obs, rct = dataset.logged(OBS), dataset.logged(RCT_TRAIN)
    pooled = concat_logged([rct, obs])
    in_memory = list(UpliftDataModule(pooled, rct, 512, 0).train_dataloader())
    streamed = list(StreamedRows(_obs(grouped_dir), 512, 0, in_memory=rct))
    assert _ids(streamed) == _ids(in_memory)  # every OBS and RCT row once per epoch
    assert max(_ids(streamed).values()) == 1
    assert sorted(len(b) for b in streamed) == sorted(len(b) for b in in_memory)
    by_id = {int(u): i for i, u in enumerate(pooled.user_id)}
    first = streamed[0]
    rows = pooled.rows(torch.tensor([by_id[int(u)] for u in first.user_id]))
    for name in ("x", "treatment", "revenue", "cost"):
        assert torch.equal(getattr(first, name), getattr(rows, name)), name


def test_streaming_order_depends_on_seed_and_epoch_alone(grouped_dir: Path) -> None:
    def order(seed: int, epoch: int) -> torch.Tensor:
        rows = StreamedRows(_obs(grouped_dir), 512, seed, epoch_of=lambda: epoch)
        return torch.cat([b.user_id for b in rows])

    assert torch.equal(order(0, 1), order(0, 1))
    assert not torch.equal(order(0, 1), order(0, 2))
    assert not torch.equal(order(0, 1), order(1, 1))
    # rows mix across the row groups of a window: a batch holds rows of several groups
    file_ids = pq.read_table(grouped_dir / table_file(OBS))["user_id"].to_numpy()
    positions = {int(u): i for i, u in enumerate(file_ids)}
    first_batch = order(0, 1)[:512]
    assert len({positions[int(u)] // GROUP_ROWS for u in first_batch}) > 1


def test_streamed_scaler_equals_the_in_memory_fit(grouped_dir: Path) -> None:
    dataset = load_dataset(grouped_dir)
    rct = dataset.logged(RCT_TRAIN)
    expected = FeatureScaler(rct.x.shape[1]).fit(concat_logged([rct, dataset.logged(OBS)]).x)
    scaler = streaming.streamed_scaler(_obs(grouped_dir), rct)
    # both accumulate in float64; they differ by summation order only (~1e-15 relative)
    torch.testing.assert_close(scaler.mean, expected.mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(scaler.std, expected.std, rtol=1e-9, atol=1e-10)


def test_streaming_pass_runs_the_contracts_row_checks(grouped_dir: Path, tmp_path: Path) -> None:
    table = pq.read_table(grouped_dir / table_file(OBS))
    ids = table["user_id"].to_numpy().copy()
    ids[-1] = ids[0]  # a duplicate in another row group than its twin
    folder = tmp_path / "data"
    shutil.copytree(grouped_dir, folder)
    duplicated = table.set_column(0, "user_id", pa.array(ids))
    pq.write_table(duplicated, folder / table_file(OBS), row_group_size=GROUP_ROWS)
    with pytest.raises(DataContractError, match="user_id_unique"):
        streaming.streamed_scaler(_obs(folder), None)
    feature = read_meta(folder).feature_columns[2]
    values = table[feature].to_numpy().copy()
    values[GROUP_ROWS + 5] = np.nan
    broken = table.set_column(table.schema.get_field_index(feature), feature, pa.array(values))
    pq.write_table(broken, folder / table_file(OBS), row_group_size=GROUP_ROWS)
    with pytest.raises(DataContractError, match=f"'{feature}' breaks features_finite"):
        streaming.streamed_scaler(_obs(folder), None)


def test_streaming_is_used_exactly_above_the_setting(grouped_dir: Path) -> None:
    size = obs_tensor_mb(grouped_dir / table_file(OBS))
    assert size == pytest.approx(
        4000 * len(pq.read_schema(grouped_dir / "obs.parquet")) * 4 / 2**20
    )
    assert streams_obs(
        grouped_dir, replace(TINY, stream_obs_above_mb=size * 0.99), STREAMING_METHODS
    )
    assert not streams_obs(grouped_dir, replace(TINY, stream_obs_above_mb=size), STREAMING_METHODS)
    assert not streams_obs(grouped_dir, replace(TINY, stream_obs_above_mb=None), STREAMING_METHODS)
    assert not streams_obs(grouped_dir, TrainConfig(), STREAMING_METHODS)  # the shipped default
    bilevel = replace(TINY, method="bidfcl-ppl", stream_obs_above_mb=0.0)
    with pytest.raises(ValueError, match=r"stream_obs_above_mb.*bidfcl-ppl cannot stream"):
        streams_obs(grouped_dir, bilevel, STREAMING_METHODS)
    assert "tsm-ips" not in STREAMING_METHODS
    assert {"tsm-obs", "tsm-both", "tsm-obs-ft"} <= set(STREAMING_METHODS)


def test_streaming_tsm_obs_fit_is_finite_sensible_and_repeatable(
    grouped_dir: Path, tmp_path: Path
) -> None:
    streamed_config = replace(TINY, stream_obs_above_mb=0.0)
    models = [
        UpliftModel.load(train_to_folder(grouped_dir, tmp_path / name, config, progress=False))
        for name, config in (("a", streamed_config), ("b", streamed_config), ("mem", TINY))
    ]
    streamed, again, in_memory = models
    assert streamed.metadata["obs_streaming"]["row_groups"] == 14
    assert "obs_streaming" not in in_memory.metadata  # below the shipped setting: loaded
    assert streamed.metadata["n_train_rows"] == in_memory.metadata["n_train_rows"] == 4000
    assert all(torch.isfinite(t).all() for t in streamed.net.state_dict().values())
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            streamed.net.state_dict().values(), again.net.state_dict().values(), strict=True
        )
    )
    torch.testing.assert_close(streamed.scaler.mean, in_memory.scaler.mean, rtol=1e-9, atol=1e-10)
    # it learns: the validation loss falls, to about where the in-memory fit's does
    history = [row["val_loss"] for row in streamed.metadata["history"]]
    assert history[-1] < history[0]
    assert streamed.metadata["best_val_loss"] == pytest.approx(
        in_memory.metadata["best_val_loss"], rel=0.05
    )


def test_streaming_ranks_take_disjoint_row_groups_covering_the_file(
    grouped_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    obs = _obs(grouped_dir)
    rct = load_dataset(grouped_dir, tables=(RCT_TRAIN,)).logged(RCT_TRAIN)
    rows = StreamedRows(obs, 512, 0, in_memory=rct, epoch_of=lambda: 1)
    plans = [rows.plan(1, rank, 2) for rank in (0, 1)]
    groups = [set(plan.groups.tolist()) for plan in plans]
    assert not groups[0] & groups[1]
    assert groups[0] | groups[1] == set(range(obs.n_groups))
    assert len(plans[0].batch_sizes) == len(plans[1].batch_sizes)  # no rank waits on another
    served = []
    for rank in (0, 1):
        monkeypatch.setattr(streaming, "rank_and_world_size", lambda rank=rank: (rank, 2))
        served.append(_ids(list(rows)))
    assert not set(served[0]) & set(served[1])
    assert served[0] + served[1] == Counter(
        [*obs.read(range(obs.n_groups)).user_id.tolist(), *rct.user_id.tolist()]
    )


def test_streaming_fit_resumed_from_a_checkpoint_ends_as_an_uninterrupted_one(
    grouped_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = replace(TINY, max_epochs=3, patience=10, stream_obs_above_mb=0.0)

    def fit(name: str) -> UpliftModel:
        folder = replace(config, checkpoint_dir=str(tmp_path / f"{name}-checkpoints"))
        return UpliftModel.load(train_to_folder(grouped_dir, tmp_path / name, folder, False))

    uninterrupted = fit("whole")
    step = UpliftLearner.training_step

    def crashing(self: UpliftLearner, batch: LoggedData, batch_idx: int) -> torch.Tensor:
        if (self.current_epoch, batch_idx) == (1, 2):
            raise RuntimeError("killed mid-epoch")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(UpliftLearner, "training_step", crashing)
    with pytest.raises(RuntimeError, match="killed mid-epoch"):
        fit("resumed")
    monkeypatch.setattr(UpliftLearner, "training_step", step)
    with caplog.at_level(logging.WARNING, logger="bidfcl.learner"):
        resumed = fit("resumed")
    assert "resuming after epoch 1" in caplog.text  # not a fresh start
    for name, tensor in uninterrupted.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[name], tensor), name
