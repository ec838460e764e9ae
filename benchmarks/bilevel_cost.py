"""Cost of Bi-DFCL: seconds per epoch of bidfcl-* against tsm-both on the same data and device.

Both learners see every OBS row once per epoch (tsm-both also every RCT train row) and
validate on rct_val once per epoch; the bidfcl runs start from one shared tsm-rct Teacher
and take Bridge steps from the first epoch (``bridge_warmup_epochs=0``), so every timed
epoch pays for the hypergradients. Early stopping is off (patience = epochs). The paper
reports 6.3x for Bi-DFCL-PPL against TSM-SL; the goal here is <= 3x. A shared VM's timings
move by 10-15% from run to run, so ``--repeats`` times every method that many times,
interleaved, and the ratio is the median run's.

    python benchmarks/bilevel_cost.py                      # CPU, default simulator
    python benchmarks/bilevel_cost.py --accelerator gpu    # on a CUDA device
    python benchmarks/bilevel_cost.py --quick              # tiny data, seconds
    python benchmarks/bilevel_cost.py --set cg_tol=0.1     # any train setting
    python benchmarks/bilevel_cost.py --repeats 3          # medians of 3 interleaved runs
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bidfcl.io import write_json
from bidfcl.methods import train_model
from bidfcl.params import load_params
from bidfcl.simulate import SimulatorConfig, simulate
from bidfcl.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from methods import parse_assignments, train_overrides  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
VARIANTS: dict[str, dict[str, Any]] = {
    "bidfcl-ppl": {"method": "bidfcl-ppl"},
    "bidfcl-ppl-audit": {"method": "bidfcl-ppl", "audit_bridge_steps": True},
    "bidfcl-pifd": {"method": "bidfcl-pifd"},
    "bidfcl-ppl-explicit": {"method": "bidfcl-ppl", "hypergradient": "explicit"},
    "bidfcl-ppl-hessian": {"method": "bidfcl-ppl", "curvature": "hessian"},
}


def seconds_per_epoch(dataset: Any, config: TrainConfig, teacher: Any = None) -> dict[str, Any]:
    model = train_model(dataset, config, progress=False, warm_start=teacher)
    meta = model.metadata
    return {
        "seconds_per_epoch": meta["seconds_per_epoch"],
        "epochs_run": meta["epochs_run"],
        "bilevel": meta.get("bilevel"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (params: 1)")
    parser.add_argument("--quick", action="store_true", help="20k OBS / 8k RCT, 1 epoch")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="train setting overrides"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each method")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)

    simulator = SimulatorConfig(n_obs=20_000, n_rct=8_000) if args.quick else SimulatorConfig()
    epochs = 1 if args.quick else args.epochs
    dataset = simulate(simulator)
    base = replace(
        load_params(
            ROOT / "params.yaml", train_overrides(parse_assignments(args.set))
        ).train.config,
        max_epochs=epochs,
        patience=epochs,
        accelerator=args.accelerator,
        num_threads=args.threads,
        bridge_warmup_epochs=0,
    )
    teacher = train_model(
        dataset, replace(base, method="tsm-rct", max_epochs=1, accelerator="cpu"), progress=False
    )
    started = time.perf_counter()
    configs = {"tsm-both": replace(base, method="tsm-both")}
    configs |= {name: replace(base, **VARIANTS[name]) for name in args.variants}
    timed: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for _ in range(args.repeats):  # interleaved, so a slow spell of the VM hits every method
        for name, config in configs.items():
            start = None if name == "tsm-both" else teacher
            timed[name].append(seconds_per_epoch(dataset, config, start))
    runs = {}
    for name, results in timed.items():
        seconds = [result["seconds_per_epoch"] for result in results]
        runs[name] = {**results[0], "seconds_per_epoch": statistics.median(seconds)}
        runs[name]["seconds_per_epoch_runs"] = seconds
        if name != "tsm-both":
            runs[name]["ratio_to_tsm_both"] = (
                runs[name]["seconds_per_epoch"] / runs["tsm-both"]["seconds_per_epoch"]
            )
            print(f"{name:22s} {runs[name]['ratio_to_tsm_both']:.2f}x tsm-both", flush=True)
    device = torch.cuda.get_device_name(0) if args.accelerator == "gpu" else platform.processor()
    payload = {
        "device": device or platform.machine(),
        "accelerator": args.accelerator,
        "torch_threads": args.threads,
        "epochs": epochs,
        "repeats": args.repeats,
        "simulator": {"n_obs": simulator.n_obs, "n_rct": simulator.n_rct},
        "train": base.to_dict(),
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
        "command": " ".join(sys.argv),
    }
    suffix = "-quick" if args.quick else ""
    out = args.out or RESULTS_DIR / f"bilevel-cost-{args.accelerator}{suffix}.json"
    write_json(out, payload)
    print(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
