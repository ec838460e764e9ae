"""The few collective operations training needs when Lightning runs it in several processes.

Under a DDP strategy every process holds the same weights and a disjoint shard of each batch.
Lightning all-reduces the gradients its own backward produces; what it cannot know about are
the gradients the bi-level learner computes with ``torch.autograd.grad`` (look-ahead steps,
conjugate-gradient products, the hypergradient), the losses that decide whether a Bridge step
helped, and the predictions lambda* is solved on. These helpers make those global. Outside a
process group (one process, the default) every one of them is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this process is the one that writes results (rank 0, or the only one)."""
    return rank_and_world_size()[0] == 0


def rank_shard(rows: torch.Tensor) -> torch.Tensor:
    """This process's part of ``rows`` (along dim 0): near-equal contiguous shards, so a
    batch split over the processes covers the batch a single process would have taken."""
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return rows
    return rows.tensor_split(world_size)[rank]


def mean_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over the processes (a new tensor; differentiable nowhere)."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / world_size


def gather_shards(shard: torch.Tensor) -> torch.Tensor:
    """Every process's ``shard`` concatenated in rank order along dim 0 (shards may differ
    in length by any amount; gloo and NCCL gather equal shapes, so they are padded)."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return shard
    length = torch.tensor([shard.shape[0]], device=shard.device)
    lengths = [torch.zeros_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length)
    longest = int(max(int(n) for n in lengths))
    padded = shard.new_zeros((longest, *shard.shape[1:]))
    padded[: shard.shape[0]] = shard
    parts = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(n)] for part, n in zip(parts, lengths, strict=True)])


def spread_over_processes(tensor: torch.Tensor) -> float:
    """The largest difference of any element of ``tensor`` between two processes (0 in one
    process): what tells that processes meant to stay in step did."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return 0.0
    highest, lowest = tensor.detach().clone(), tensor.detach().clone()
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    return float((highest - lowest).abs().max())
