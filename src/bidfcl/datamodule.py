"""Training data for the learners: logged rows as in-memory tensors, served in whole batches.

Rows never pass through per-row Python: a batch is one fancy-indexing gather from column
tensors, driven by a sampler that yields index tensors. The training loader draws from a
method's source tables (RCT train, OBS or both); validation is the whole ``rct_val`` in one
batch, because its metric (EOM) is a property of the full policy, not a per-row mean.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from bidfcl.contract import LoggedData


class Batch(NamedTuple):
    """Column tensors of logged rows; ``weight`` is the per-row weight of the factual MSE."""

    user_id: torch.Tensor  # int64 (N,)
    x: torch.Tensor  # float32 (N, d), raw features
    treatment: torch.Tensor  # int64 (N,)
    revenue: torch.Tensor  # float32 (N,)
    cost: torch.Tensor  # float32 (N,)
    propensity: torch.Tensor  # float32 (N,), NaN where unknown
    weight: torch.Tensor  # float32 (N,)

    @property
    def n_rows(self) -> int:
        return int(self.treatment.shape[0])

    def logged(self, n_treatments: int) -> LoggedData:
        """The rows as the contract's LoggedData, for the evaluation functions."""
        return LoggedData(
            user_id=self.user_id,
            x=self.x,
            treatment=self.treatment,
            revenue=self.revenue,
            cost=self.cost,
            propensity=self.propensity,
            n_treatments=n_treatments,
        )


def batch_of(data: LoggedData, weight: torch.Tensor | None = None) -> Batch:
    """All rows of one logged table as a Batch (unit weights unless given)."""
    return Batch(
        user_id=data.user_id,
        x=data.x,
        treatment=data.treatment,
        revenue=data.revenue,
        cost=data.cost,
        propensity=data.propensity,
        weight=torch.ones(len(data)) if weight is None else weight.to(torch.float32),
    )


def concat_batches(parts: list[Batch]) -> Batch:
    """Rows of several batches stacked in order (e.g. RCT train followed by OBS)."""
    return Batch(*(torch.cat(columns) for columns in zip(*parts, strict=True)))


class BatchRows(TorchDataset[Batch]):
    """Map-style dataset whose index is a tensor of row numbers and whose item is a Batch."""

    def __init__(self, rows: Batch) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return self.rows.n_rows

    def __getitem__(self, index: torch.Tensor) -> Batch:
        return Batch(*(column[index] for column in self.rows))


class ShuffledBatches(Sampler[torch.Tensor]):
    """A fresh permutation each epoch, cut into ceil(N / batch_size) near-equal index chunks.

    Near-equal chunks (instead of full batches plus a remainder) keep every batch large
    enough for the per-arm losses to see all arms. The generator is private and seeded, so
    the order depends only on the seed and the epoch.
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int) -> None:
        self.n_rows = n_rows
        self.n_batches = max(1, math.ceil(n_rows / batch_size))
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = torch.randperm(self.n_rows, generator=self.generator)
        yield from order.tensor_split(self.n_batches)


class UpliftDataModule(L.LightningDataModule):
    """Shuffled training batches over in-memory rows; the validation rows as one batch."""

    def __init__(
        self, train: Batch, val: Batch, batch_size: int, seed: int, num_workers: int = 0
    ) -> None:
        super().__init__()
        self.train_rows = train
        self.val_rows = val
        self.train_sampler = ShuffledBatches(train.n_rows, batch_size, seed)
        self.num_workers = num_workers

    def train_dataloader(self) -> DataLoader[Batch]:
        return self._loader(self.train_rows, self.train_sampler)

    def val_dataloader(self) -> DataLoader[Batch]:
        return self._loader(self.val_rows, [torch.arange(self.val_rows.n_rows)])

    def _loader(
        self, rows: Batch, sampler: Sampler[torch.Tensor] | list[torch.Tensor]
    ) -> DataLoader:
        # batch_size=None: each sampler item is already a whole batch of row indices.
        return DataLoader(
            BatchRows(rows),
            sampler=sampler,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class ObsRctDataModule(UpliftDataModule):
    """OBS batches paired with RCT batches, the RCT loader cycled so every OBS batch has one.

    Each training item is ``{"obs": Batch, "rct": Batch}``; an epoch is one pass over OBS.
    The bi-level learner steps the Target on the OBS half and the Bridge on the RCT half.
    """

    def __init__(
        self,
        obs: Batch,
        rct: Batch,
        val: Batch,
        batch_size: int,
        rct_batch_size: int,
        seed: int,
        num_workers: int = 0,
    ) -> None:
        super().__init__(obs, val, batch_size, seed, num_workers)
        self.rct_rows = rct
        self.rct_sampler = ShuffledBatches(rct.n_rows, rct_batch_size, seed + 1)

    def train_dataloader(self) -> CombinedLoader:  # type: ignore[override]
        loaders = {
            "obs": self._loader(self.train_rows, self.train_sampler),
            "rct": self._loader(self.rct_rows, self.rct_sampler),
        }
        return CombinedLoader(loaders, mode="max_size_cycle")
