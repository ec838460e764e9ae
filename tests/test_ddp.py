"""Training under Lightning DDP: two CPU processes on the gloo backend against one process.

Two processes each take half of every batch, so with gradients averaged they take the step
one process takes on the whole batch, up to how the losses decompose: the per-arm means of
the factual MSE over a half batch are not exactly those over the whole one. Tolerance,
chosen from that: every prediction on rct_val within 5% of the mean absolute prediction,
and the unconstrained best arm the same for at least 99% of users. The collectives the
bi-level learner adds are checked exactly, on the hypergradient itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from bidfcl.bilevel import implicit_hypergradient
from bidfcl.contract import RCT_VAL, load_dataset
from bidfcl.distributed import gather_shards, mean_over_processes, rank_shard
from bidfcl.model import UpliftModel

TINY_TRAIN = {
    "max_epochs": 3,
    "warm_start_epochs": 2,
    "accelerator": "cpu",
    "calibrate_spend": False,
    "hidden": [16, 8],
    "batch_size": 256,
    "decision_batch_size": 512,
    "num_threads": 1,
}
RELATIVE_TOLERANCE = 0.05
SAME_ARM_SHARE = 0.99


def _train(data: Path, out: Path, train: dict[str, Any]) -> UpliftModel:
    """`bidfcl train` in a subprocess (Lightning launches the second DDP process itself by
    re-running the command, so it cannot run inside pytest)."""
    params = out.with_suffix(".yaml")
    params.write_text(yaml.safe_dump({"train": {**TINY_TRAIN, **train}}))
    command = [sys.executable, "-m", "bidfcl.cli", "train", str(data), "--out", str(out)]
    result = subprocess.run(
        [*command, "--params", str(params)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return UpliftModel.load(out)


def _compare(one: UpliftModel, two: UpliftModel, data: Path) -> tuple[float, float]:
    """The largest prediction difference relative to the mean absolute prediction, and the
    share of users whose unconstrained best arm (revenue - cost) is the same."""
    x = load_dataset(data, tables=(RCT_VAL,)).logged(RCT_VAL).x
    (r1, c1), (r2, c2) = one.predict(x), two.predict(x)
    scale = torch.cat([r1, c1]).abs().mean()
    difference = max(float((r1 - r2).abs().max()), float((c1 - c2).abs().max()))
    same_arm = (r1 - c1).argmax(1).eq((r2 - c2).argmax(1)).float().mean()
    return difference / float(scale), float(same_arm)


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("tsm-rct", {}),
        ("dfcl-ppl", {}),  # lambda* solved on the processes' gathered predictions
        ("bidfcl-ppl", {"fixed_gate": 0.5}),  # the bi-level Target, manual optimisation
    ],
)
def test_ddp_on_two_processes_matches_one_process(
    method: str, extra: dict[str, Any], small_dataset_dir: Path, tmp_path: Path
) -> None:
    one = _train(small_dataset_dir, tmp_path / "one", {"method": method, **extra})
    two = _train(
        small_dataset_dir,
        tmp_path / "two",
        {"method": method, "devices": 2, "strategy": "ddp", **extra},
    )
    spread = two.metadata["distributed"]
    assert spread["processes"] == 2
    rows = spread["rows_last_epoch"]
    assert abs(rows[0] - rows[1]) <= 0.02 * sum(rows)  # each process trained on half
    assert sum(rows) == sum(one.metadata["distributed"]["rows_last_epoch"])
    assert spread["weight_spread"] == 0.0
    relative_difference, same_arm = _compare(one, two, small_dataset_dir)
    assert relative_difference <= RELATIVE_TOLERANCE
    assert same_arm >= SAME_ARM_SHARE


def test_ddp_keeps_a_learned_bridge_in_step(small_dataset_dir: Path, tmp_path: Path) -> None:
    """The Bridge's steps come from autograd.grad, which DDP never sees: without the
    learner's own averaging each process would step its Bridge on its own shard and the
    processes' gates, then Targets, would drift apart."""
    two = _train(
        small_dataset_dir,
        tmp_path / "two",
        {"method": "bidfcl-ppl", "devices": 2, "strategy": "ddp", "bridge_warmup_epochs": 0},
    )
    assert two.metadata["bilevel"]["hypergradient_steps"] > 0
    assert two.metadata["distributed"]["weight_spread"] == 0.0


# ----------------------------------------------------------------- the collectives, exactly

N_ROWS, N_FEATURES = 40, 3


def _problem(rows: torch.Tensor) -> tuple[Any, Any, torch.Tensor, list[torch.Tensor]]:
    """A least-squares lower level with per-row gates sigmoid(z . phi) and a squared upper
    loss, both plain means over ``rows`` (so the mean over two equal halves is the whole)."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(N_ROWS, N_FEATURES, generator=generator, dtype=torch.float64)[rows]
    y = torch.randn(N_ROWS, generator=generator, dtype=torch.float64)[rows]
    teacher = torch.randn(N_ROWS, generator=generator, dtype=torch.float64)[rows]
    target = torch.randn(N_ROWS, generator=generator, dtype=torch.float64)[rows]
    theta = torch.randn(N_FEATURES, generator=generator, dtype=torch.float64)
    phi = [torch.randn(N_FEATURES, generator=generator, dtype=torch.float64).requires_grad_()]

    def lower(theta: torch.Tensor, phi: list[torch.Tensor]) -> torch.Tensor:
        gate = torch.sigmoid(z @ phi[0])
        label = y + gate * (teacher - y)
        return (z @ theta - label).square().mean()

    def upper(theta: torch.Tensor) -> torch.Tensor:
        return (z @ theta - target).square().mean()

    return lower, upper, theta, phi


def _hypergradient_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        lower, upper, theta, phi = _problem(rank_shard(torch.arange(N_ROWS)))
        grads, _ = implicit_hypergradient(
            lower, upper, theta, phi, 50, 1e-12, 0.1, average=mean_over_processes
        )
        gathered = gather_shards(torch.arange(rank * 3 + 1))  # unequal lengths
        torch.save({"grads": grads, "gathered": gathered}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_hypergradient_on_two_shards_equals_the_whole_batch(tmp_path: Path) -> None:
    out = str(tmp_path / "result")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_hypergradient_worker, args=(str(tmp_path / "init"), out), nprocs=2)
    lower, upper, theta, phi = _problem(torch.arange(N_ROWS))
    (whole,), _ = implicit_hypergradient(lower, upper, theta, phi, 50, 1e-12, 0.1)
    for rank in range(2):
        result = torch.load(f"{out}.{rank}")
        (sharded,) = result["grads"]
        assert torch.allclose(sharded, whole, rtol=1e-9, atol=1e-12)
        assert result["gathered"].tolist() == [0, 0, 1, 2, 3]
