"""Training on an OBS table larger than memory: its parquet row groups streamed, not loaded.

Above ``train.stream_obs_above_mb`` the OBS table is never read whole. The feature scaler is
fitted in one pass over the row groups (running mean and variance, merged in float64), which
also runs the contract's row checks group by group. Each epoch then reads the row groups in
an order drawn from (seed, epoch), a few at a time (a window), and serves batches gathered
in random order from each window: the same ``LoggedData`` batches, as many of them
(ceil(rows / batch_size), near-equal) as the in-memory loader serves, so the learners do not
change. In-memory rows trained beside OBS (RCT train for ``tsm-both``) are dealt out across
the windows in a random share each. The order depends on the seed and the epoch alone, so a
fit resumed from a checkpoint draws the batches an uninterrupted one would have.

Under ``torch.distributed`` each rank takes every world-size-th row group of the epoch's
order (disjoint, together the whole file) and cuts its rows into as many batches as the
largest rank needs, so no rank waits at a collective for a batch another never sends.
Reading happens in the training process (no loader workers): pyarrow decodes with its own
threads, and one reader thread fetches the next window while the current one trains.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset

from bidfcl.contract import (
    COST,
    OBS,
    PROPENSITY,
    RCT_VAL,
    REVENUE,
    TREATMENT,
    USER_ID,
    DataContractError,
    Dataset,
    DatasetMeta,
    LoggedData,
    check_column_names,
    check_ids_unique_across_chunks,
    check_rows,
    concat_logged,
    table_file,
)
from bidfcl.datamodule import IndexedRows
from bidfcl.distributed import rank_and_world_size
from bidfcl.learner import UpliftLearner, fit_learner
from bidfcl.model import FeatureScaler, UpliftModel, UpliftNet
from bidfcl.train_config import TrainConfig

WINDOW_ROW_GROUPS = 4
"""Row groups read and shuffled together: rows mix across this many groups per window, and
two windows (the one training, the one being read) bound the memory a stream holds."""
MB = 2**20
T = TypeVar("T")
STREAMING_KEY = "obs_streaming"  # model metadata of a fit that streamed OBS


def obs_tensor_mb(path: Path) -> float:
    """The OBS table's size as float32 tensors (rows x columns x 4 bytes), read from the
    parquet footer alone: the measure ``stream_obs_above_mb`` is compared with."""
    metadata = pq.ParquetFile(path).metadata
    return metadata.num_rows * metadata.num_columns * 4 / MB


def streams_obs(folder: Path | str, config: TrainConfig, streamable: Collection[str]) -> bool:
    """Whether training ``config.method`` on ``folder`` streams OBS instead of loading it.

    A method outside ``streamable`` (one that needs all of OBS in memory) is refused with a
    one-line error when OBS is over the setting, rather than running out of memory later.
    """
    path = Path(folder) / table_file(OBS)
    limit = config.stream_obs_above_mb
    if limit is None or not path.exists():
        return False  # a missing file is load_dataset's error to report
    size = obs_tensor_mb(path)
    if size <= limit:
        return False
    if config.method not in streamable:
        raise ValueError(
            f"train.stream_obs_above_mb: {path} is {size:.0f} MB > {limit:g} MB, and "
            f"{config.method} cannot stream OBS (it needs all of it in memory); raise the "
            f"setting or train one of {sorted(streamable)}"
        )
    return True


def streamed_obs_key(dataset: Dataset) -> str:
    """The identity of an OBS table left on disk (size and modification time of its file),
    for the data key a checkpoint is resumed under; "" when OBS is loaded or absent."""
    path = None if dataset.path is None else dataset.path / table_file(OBS)
    if OBS in dataset.tables or path is None or not path.exists():
        return ""
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


class ParquetRows:
    """A table's parquet file read a row group at a time, as checked ``LoggedData``."""

    def __init__(self, path: Path, meta: DatasetMeta) -> None:
        self.path = Path(path)
        self.meta = meta
        # buffered reads, not a memory map: mapped pages would count as the process's memory
        self.file = pq.ParquetFile(self.path, memory_map=False)
        names = self.file.schema_arrow.names
        check_column_names(names, str(self.path))
        missing = [c for c in meta.row_columns if c != PROPENSITY and c not in names]
        if missing:
            detail = f"missing {missing}"
            raise DataContractError.broken(str(self.path), "required_columns", detail, missing[0])
        self.columns = [c for c in meta.row_columns if c in names]
        self.group_rows = np.array(
            [self.file.metadata.row_group(g).num_rows for g in range(self.n_groups)], np.int64
        )
        if self.n_rows == 0:
            raise DataContractError.broken(
                str(self.path), "non_empty_table", "the table has no rows"
            )

    @property
    def n_groups(self) -> int:
        return self.file.metadata.num_row_groups

    @property
    def n_rows(self) -> int:
        return int(self.group_rows.sum())

    def read(self, groups: Sequence[int]) -> LoggedData:
        """Rows of ``groups``, in order, once they passed the contract's row checks (a
        vectorised pass per read, small beside training on the rows)."""
        table = self.file.read_row_groups(list(groups), columns=self.columns, use_threads=True)
        return arrow_to_logged(table, self.meta, str(self.path))


def arrow_to_logged(table: pa.Table, meta: DatasetMeta, file: str) -> LoggedData:
    """An arrow table of contract rows as tensors (features float32, stacked row-major),
    once it passed the contract's row checks (:func:`~bidfcl.contract.check_rows`; the
    features by one finiteness test of the float32 matrix) within this table."""
    features = meta.feature_columns
    others = [c for c in table.column_names if c not in set(features)]
    frame = table.select(others).to_pandas()
    x = np.empty((table.num_rows, len(features)), dtype=np.float32)
    for j, name in enumerate(features):
        x[:, j] = table.column(name).to_numpy()
    check_rows(frame, replace(meta, feature_columns=[]), file)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise DataContractError.broken(
            file,
            "features_finite",
            "a number within float32 range, not NaN or infinite",
            features[int(np.argmin(np.isfinite(x).all(axis=0)))],
            n_rows=int((~finite).sum()),
        )
    propensity = (
        frame[PROPENSITY].to_numpy(np.float32, na_value=np.nan)
        if PROPENSITY in frame.columns
        else np.full(len(frame), np.nan, np.float32)
    )
    return LoggedData(
        user_id=_tensor(frame[USER_ID].to_numpy(np.int64)),
        x=torch.from_numpy(x),
        treatment=_tensor(frame[TREATMENT].to_numpy(np.int64)),
        revenue=_tensor(frame[REVENUE].to_numpy(np.float32)),
        cost=_tensor(frame[COST].to_numpy(np.float32)),
        propensity=_tensor(propensity),
        n_treatments=meta.n_treatments,
    )


def _tensor(values: np.ndarray) -> torch.Tensor:
    """A tensor over a writable copy (arrow hands pandas read-only buffers)."""
    return torch.from_numpy(np.array(values, copy=True))


@dataclass
class RunningMoments:
    """Per-column count, mean and sum of squared deviations, merged chunk by chunk in float64
    (Chan et al.'s pairwise update), so the variance of N rows needs one pass and never all
    N rows in memory. numpy, not torch: its column reductions over a row-major chunk run
    several times faster."""

    count: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    def add(self, x: torch.Tensor) -> None:
        n = int(x.shape[0])
        if n == 0:
            return
        values = x.detach().cpu().numpy()
        mean = values.mean(axis=0, dtype=np.float64)
        centred = values - mean  # float64
        m2 = np.einsum("ij,ij->j", centred, centred)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def mean_and_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and population std (as :meth:`FeatureScaler.fit` takes it), float64."""
        if self.mean is None or self.m2 is None:
            raise ValueError("no rows seen")
        return torch.from_numpy(self.mean), torch.from_numpy(np.sqrt(self.m2 / self.count))


def streamed_scaler(obs: ParquetRows, in_memory: LoggedData | None) -> FeatureScaler:
    """The scaler :meth:`FeatureScaler.fit` would fit on OBS plus ``in_memory`` rows, in one
    pass over OBS's row groups; the pass also checks that user ids are unique across the
    whole table (a full load's check; each read checks only its own rows)."""
    moments = RunningMoments()
    if in_memory is not None:
        moments.add(in_memory.x)
    ids: list[np.ndarray] = []
    for rows in read_ahead(obs.read, [[group] for group in range(obs.n_groups)]):
        moments.add(rows.x)
        ids.append(rows.user_id.numpy())
    check_ids_unique_across_chunks(np.concatenate(ids), str(obs.path))
    scaler = FeatureScaler(len(obs.meta.feature_columns))
    mean, std = moments.mean_and_std()
    scaler.mean.copy_(mean)
    scaler.std.copy_(torch.where(std < scaler.min_std, torch.ones_like(std), std))
    return scaler


@dataclass(frozen=True)
class EpochPlan:
    """One rank's share of one epoch: its row groups in reading order, the in-memory rows
    read beside each, and the size of every batch it serves."""

    groups: np.ndarray  # row-group numbers
    extra: list[torch.Tensor]  # per group: indices into the in-memory rows
    batch_sizes: list[int]


class StreamedRows(IterableDataset[LoggedData]):
    """An epoch's batches from OBS's row groups (plus optional in-memory rows), shuffled by
    row group and within windows of :data:`WINDOW_ROW_GROUPS` groups."""

    def __init__(
        self,
        obs: ParquetRows,
        batch_size: int,
        seed: int,
        in_memory: LoggedData | None = None,
        epoch_of: Callable[[], int] = lambda: 0,
    ) -> None:
        self.obs = obs
        self.batch_size = batch_size
        self.seed = seed
        self.in_memory = in_memory
        self.epoch_of = epoch_of  # the datamodule points it at the trainer's epoch

    def plan(self, epoch: int, rank: int = 0, world: int = 1) -> EpochPlan:
        """Rank ``rank`` of ``world``'s row groups, in-memory rows and batch sizes in ``epoch``.

        Every rank draws the same order (the draw depends only on seed and epoch), so the
        ranks' shares are disjoint and cover the file.
        """
        if self.obs.n_groups < world:
            raise ValueError(
                f"{self.obs.path}: {self.obs.n_groups} row group(s) cannot be shared among "
                f"{world} ranks; rewrite it with smaller row groups"
            )
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.obs.n_groups)
        n_extra = 0 if self.in_memory is None else len(self.in_memory)
        extra = list(torch.from_numpy(rng.permutation(n_extra)).tensor_split(len(order)))
        rows = [
            int(self.obs.group_rows[order[r::world]].sum()) + sum(len(e) for e in extra[r::world])
            for r in range(world)
        ]
        n_batches = max(1, math.ceil(max(rows) / self.batch_size))
        sizes = [len(c) for c in torch.arange(rows[rank]).tensor_split(n_batches)]
        return EpochPlan(order[rank::world], extra[rank::world], sizes)

    def __len__(self) -> int:
        return len(self.plan(self.epoch_of(), *rank_and_world_size()).batch_sizes)

    def __iter__(self) -> Iterator[LoggedData]:
        epoch = self.epoch_of()
        rank, world = rank_and_world_size()
        plan = self.plan(epoch, rank, world)
        rng = np.random.default_rng([self.seed, epoch, rank, 1])
        yield from cut_batches(self._windows(plan, rng), plan.batch_sizes)

    def _windows(self, plan: EpochPlan, rng: np.random.Generator) -> Iterator[LoggedData]:
        """Each window's rows in random order, gathered as they are cut (no shuffled copy);
        the next window is read while this one is served."""
        windows = [
            plan.groups[start : start + WINDOW_ROW_GROUPS].tolist()
            for start in range(0, len(plan.groups), WINDOW_ROW_GROUPS)
        ]
        extras = [
            torch.cat(plan.extra[start : start + WINDOW_ROW_GROUPS])
            for start in range(0, len(plan.groups), WINDOW_ROW_GROUPS)
        ]
        for rows, extra in zip(read_ahead(self.obs.read, windows), extras, strict=True):
            if self.in_memory is not None:
                rows = concat_logged([rows, self.in_memory.rows(extra)])
            order = torch.from_numpy(rng.permutation(len(rows)))
            yield from (rows.rows(part) for part in order.split(self.batch_size))


def read_ahead(read: Callable[[T], LoggedData], items: Sequence[T]) -> Iterator[LoggedData]:
    """``read(item)`` for each item in turn, the next one read on a thread while the caller
    works on this one: pyarrow and torch release the GIL, so reading overlaps training."""
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1) as reader:
        ahead = reader.submit(read, items[0])
        for item in items[1:]:
            current, ahead = ahead, reader.submit(read, item)
            yield current.result()
        yield ahead.result()


def cut_batches(chunks: Iterator[LoggedData], sizes: Sequence[int]) -> Iterator[LoggedData]:
    """Batches of exactly ``sizes`` rows from a stream of chunks whose rows add up to
    ``sum(sizes)``; a batch that spans chunks joins their pieces."""
    pieces: list[LoggedData] = []
    held = 0
    k = 0
    for chunk in chunks:
        start = 0
        while k < len(sizes) and held + len(chunk) - start >= sizes[k]:
            end = start + sizes[k] - held
            piece = chunk.rows(slice(start, end))
            yield concat_logged([*pieces, piece]) if pieces else piece
            pieces, held, start, k = [], 0, end, k + 1
        if start < len(chunk):
            pieces.append(chunk.rows(slice(start, None)))
            held += len(chunk) - start


class StreamingDataModule(L.LightningDataModule):
    """Streamed training batches (:class:`StreamedRows`); the validation rows as one batch,
    as :class:`~bidfcl.datamodule.UpliftDataModule` serves them."""

    def __init__(self, train: StreamedRows, val: LoggedData) -> None:
        super().__init__()
        self.train_rows = train
        self.val_rows = val
        train.epoch_of = self._epoch

    def _epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return 0 if trainer is None else trainer.current_epoch

    def train_dataloader(self) -> DataLoader[LoggedData]:
        # batch_size=None: each item is already a whole batch
        return DataLoader(self.train_rows, batch_size=None)

    def val_dataloader(self) -> DataLoader[LoggedData]:
        index = [torch.arange(len(self.val_rows))]
        return DataLoader(IndexedRows(self.val_rows), sampler=index, batch_size=None)


def fit_streaming(
    sources: Sequence[str],
    dataset: Dataset,
    config: TrainConfig,
    budget: float,
    start_from: UpliftModel | None,
    progress: bool,
) -> UpliftModel:
    """A single-level MSE fit on ``sources`` with OBS streamed from ``dataset``'s folder and
    the other sources in memory: what ``fit_single_level`` does when OBS was not loaded."""
    if dataset.path is None:
        raise ValueError("streaming OBS needs the dataset's folder (dataset.path is None)")
    L.seed_everything(config.seed, workers=True, verbose=False)
    obs = ParquetRows(dataset.path / table_file(OBS), dataset.meta)
    others = [dataset.logged(table) for table in sources if table != OBS]
    in_memory = concat_logged(others) if others else None
    started = time.perf_counter()
    if start_from is None:
        scaler = streamed_scaler(obs, in_memory)
        meta = dataset.meta
        net = UpliftNet(len(meta.feature_columns), meta.n_treatments, config.model_config)
        model = UpliftModel(net, scaler, meta.feature_columns, meta.treatment_names)
    else:
        model = copy.deepcopy(start_from).to("cpu")
    scaler_seconds = time.perf_counter() - started
    learner = UpliftLearner(
        model, None, config, budget, lr=config.lr, val_truth=dataset.truth_for(RCT_VAL)
    )
    rows = StreamedRows(obs, config.batch_size, config.seed, in_memory)
    data = StreamingDataModule(rows, dataset.logged(RCT_VAL))
    n_rows = obs.n_rows + (0 if in_memory is None else len(in_memory))
    with warnings.catch_warnings():
        # the hint is about loader workers splitting an iterable; no worker reads this one
        warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
        fitted = fit_learner(learner, data, dataset, config, budget, progress, sources, n_rows)
    fitted.metadata[STREAMING_KEY] = {
        **streaming_summary(obs, config),
        "scaler_seconds": scaler_seconds,
    }
    return fitted


def streaming_summary(obs: ParquetRows, config: TrainConfig) -> dict[str, Any]:
    """What the model's metadata records of a streamed fit."""
    return {
        "file": str(obs.path),
        "rows": obs.n_rows,
        "row_groups": obs.n_groups,
        "window_row_groups": WINDOW_ROW_GROUPS,
        "tensor_mb": obs_tensor_mb(obs.path),
        "stream_obs_above_mb": config.stream_obs_above_mb,
    }
