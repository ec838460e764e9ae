"""Training data for the learners: logged rows as in-memory tensors, served in whole batches.

Rows never pass through per-row Python: a batch is one fancy-indexing gather from column
tensors, driven by a sampler that yields index tensors. The training loader draws from a
method's source tables (RCT train, OBS or both); validation is the whole ``rct_val`` in one
batch, because its metric (EOM) is a property of the full policy, not a per-row mean.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from bidfcl.contract import LoggedData
from bidfcl.distributed import rank_shard


class IndexedRows(TorchDataset[LoggedData]):
    """Map-style dataset whose index is a tensor of row numbers and whose item is those rows."""

    def __init__(self, rows: LoggedData) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: torch.Tensor) -> LoggedData:
        return self.rows.rows(index)


class RowNumbers(TorchDataset[torch.Tensor]):
    """Map-style dataset whose item is its index: a loader of row numbers only, for rows
    gathered later and only when a step uses them."""

    def __init__(self, n_rows: int) -> None:
        self.n_rows = n_rows

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return index


class ShuffledBatches(Sampler[torch.Tensor]):
    """A fresh permutation each epoch, cut into ceil(N / batch_size) near-equal index chunks.

    Near-equal chunks (instead of full batches plus a remainder) keep every batch large
    enough for the per-arm losses to see all arms. The generator is private and seeded, so
    the order depends only on the seed and the epoch. Under DDP every process draws the same
    order and takes its own shard of each batch (:func:`~bidfcl.distributed.rank_shard`), so
    the processes together step on the batches one process would (Lightning's distributed
    sampler, which hands out whole batches, is off).
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int) -> None:
        self.n_rows = n_rows
        self.n_batches = max(1, math.ceil(n_rows / batch_size))
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = torch.randperm(self.n_rows, generator=self.generator)
        for batch in order.tensor_split(self.n_batches):
            yield rank_shard(batch)


class UpliftDataModule(L.LightningDataModule):
    """Shuffled training batches over in-memory rows; the validation rows as one batch."""

    def __init__(
        self, train: LoggedData, val: LoggedData, batch_size: int, seed: int, num_workers: int = 0
    ) -> None:
        super().__init__()
        self.train_rows = train
        self.val_rows = val
        self.train_sampler = ShuffledBatches(len(train), batch_size, seed)
        self.num_workers = num_workers

    def train_dataloader(self) -> DataLoader[LoggedData]:
        return self._loader(self.train_rows, self.train_sampler)

    def val_dataloader(self) -> DataLoader[LoggedData]:
        return self._loader(self.val_rows, [torch.arange(len(self.val_rows))])

    def _loader(
        self, rows: LoggedData, sampler: Sampler[torch.Tensor] | list[torch.Tensor]
    ) -> DataLoader:
        # batch_size=None: each sampler item is already a whole batch of row indices.
        return DataLoader(
            IndexedRows(rows),
            sampler=sampler,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class ObsRctDataModule(UpliftDataModule):
    """OBS batches paired with two RCT batches, the RCT loaders cycled so every OBS batch has
    one of each.

    Each training item is ``{"obs": ..., "rct": ..., "upper": ...}``: ``LoggedData`` for the
    first two, row numbers of the upper table for the last (:meth:`upper_batch` gathers
    them: the Bridge steps on every k-th batch only, so the other gathers would be waste);
    an epoch is one pass over OBS and one over the ``rct`` rows, cut into as many batches
    as OBS (as pooling them would see them). The bi-level learner steps the Target on OBS
    plus the ``rct`` rows (the lower level) and the Bridge on the ``upper`` rows (the upper
    level).
    """

    def __init__(
        self,
        obs: LoggedData,
        rct: LoggedData,
        upper: LoggedData,
        val: LoggedData,
        batch_size: int,
        upper_batch_size: int,
        seed: int,
        num_workers: int = 0,
    ) -> None:
        super().__init__(obs, val, batch_size, seed, num_workers)
        self.rct_rows = rct
        self.upper_rows = upper
        rct_batch_size = math.ceil(len(rct) / len(self.train_sampler))
        self.rct_sampler = ShuffledBatches(len(rct), rct_batch_size, seed + 1)
        self.upper_sampler = ShuffledBatches(len(upper), upper_batch_size, seed + 2)

    def train_dataloader(self) -> CombinedLoader:  # type: ignore[override]
        loaders = {
            "obs": self._loader(self.train_rows, self.train_sampler),
            "rct": self._loader(self.rct_rows, self.rct_sampler),
            "upper": DataLoader(
                RowNumbers(len(self.upper_rows)), sampler=self.upper_sampler, batch_size=None
            ),
        }
        return CombinedLoader(loaders, mode="max_size_cycle")

    def upper_batch(self, row_numbers: torch.Tensor) -> LoggedData:
        """The upper-level rows a training item's ``"upper"`` numbers name."""
        return self.upper_rows.rows(row_numbers.cpu())
