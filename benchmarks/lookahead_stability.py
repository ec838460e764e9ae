"""Does Bi-DFCL's look-ahead descend the lower loss? The learner's preconditioned steps
against plain SGD, on the simulator's revenue-scale labels.

The hypergradient is taken where the k-step look-ahead ends (theta_k ~ theta*(phi)); if the
look-ahead diverges, every Bridge step follows the gradient of a blown-up Target. This
script fits the default Teacher on one simulated regime, starts a Bi-DFCL learner from it,
and on ``--batches`` OBS batches (each after one real Adam step of the Target, so the
Target's Adam statistics are those of a run) takes k look-ahead steps with each rule from
the same theta. It records the lower loss after each step and counts look-aheads whose
loss rose at some step or ended non-finite.

    python benchmarks/lookahead_stability.py --preset scarce-rct-2k --n-obs 50000 --seed 0
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import platform
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bidfcl.bilevel import BilevelLearner, upper_level_split
from bidfcl.contract import OBS, RCT_TRAIN
from bidfcl.decision import ppl_decision
from bidfcl.io import write_json
from bidfcl.methods import train_model
from bidfcl.params import load_params
from bidfcl.simulate import simulate, simulator_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


def lookahead_losses(
    learner: BilevelLearner, context: Any, gates: torch.Tensor, rule: str, steps: int
) -> list[float]:
    """The lower loss at theta_0 and after each of ``steps`` look-ahead steps of ``rule``:
    ``preconditioned`` (the learner's own) or ``sgd:<lr>``."""
    theta = torch.cat([p.detach().reshape(-1) for p in learner.net.parameters()])

    def lower(theta: torch.Tensor) -> torch.Tensor:
        return learner._lower_loss(learner._unflatten(theta), gates, context)

    losses = [float(lower(theta))]
    for _ in range(steps):
        if rule == "preconditioned":
            theta = learner._lookahead(context, theta, 1)
        else:
            theta = theta.requires_grad_(True)
            (grad,) = torch.autograd.grad(lower(theta), theta)
            theta = (theta - float(rule.split(":")[1]) * grad).detach()
        losses.append(float(lower(theta)))
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="scarce-rct-2k")
    parser.add_argument("--n-obs", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rules", nargs="+", default=["preconditioned", "sgd:0.01", "sgd:0.001"])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "lookahead-stability.json")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    dataset = simulate(simulator_config({"preset": args.preset, "n_obs": args.n_obs}, args.seed))
    config = replace(
        load_params(ROOT / "params.yaml", run_overrides=False).train.config,
        method="bidfcl-ppl",
        seed=args.seed,
        num_threads=1,
        accelerator="cpu",
    )
    split = upper_level_split(dataset, config)
    teacher_config = replace(config, method=config.teacher, max_epochs=config.warm_start_epochs)
    teacher = train_model(split.lower, teacher_config, progress=False)
    budget = dataset.meta.budget_or_default(config.budget)
    learner = BilevelLearner(copy.deepcopy(teacher), ppl_decision, config, budget, config.lr)
    target_optimizer = learner.configure_optimizers()[0]
    obs, rct = dataset.logged(OBS), split.lower.logged(RCT_TRAIN)
    n_batches = math.ceil(len(obs) / config.batch_size)
    rct_rows = math.ceil(len(rct) / n_batches)
    order, rct_order = torch.randperm(len(obs)), torch.randperm(len(rct))
    records: dict[str, list[list[float]]] = {rule: [] for rule in args.rules}
    for index in range(min(args.batches, n_batches)):
        rows = order[index * config.batch_size : (index + 1) * config.batch_size]
        rct_batch = rct_order[(index * rct_rows) % len(rct) :][:rct_rows]
        context = learner._context(obs.rows(rows), rct.rows(rct_batch))
        with torch.no_grad():
            gates = learner._gates(dict(learner.bridge.named_parameters()), context)
        target_optimizer.zero_grad()  # one real Target step, as every training batch takes
        learner._lower_loss(dict(learner.net.named_parameters()), gates, context).backward()
        target_optimizer.step()
        for rule in args.rules:
            records[rule].append(lookahead_losses(learner, context, gates, rule, config.bilevel_k))

    summary = {}
    for rule, runs in records.items():
        rose = [any(b > a for a, b in itertools.pairwise(r)) for r in runs]
        broken = [not math.isfinite(r[-1]) or r[-1] > 10 * r[0] for r in runs]
        summary[rule] = {
            "lookaheads": len(runs),
            "share_where_the_loss_rose_at_some_step": sum(rose) / len(runs),
            "share_ending_non_finite_or_above_10x_the_start": sum(broken) / len(runs),
            "median_final_over_start": sorted(r[-1] / r[0] for r in runs)[len(runs) // 2],
        }
    payload = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "preset": args.preset,
        "n_obs": args.n_obs,
        "seed": args.seed,
        "k": config.bilevel_k,
        "lookahead_lr": config.lookahead_lr,
        "summary": summary,
        "losses": records,
    }
    write_json(args.out, payload)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
