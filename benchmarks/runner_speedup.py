"""Speed-up of the experiment runner's Dask fan-out over the local (sequential) runner.

Runs one spec twice from empty output folders, through the same Prefect flow: once with the
local runner (one cell at a time), once on a Dask LocalCluster of ``--workers`` processes
(one torch thread each). Both walls include the flow's start; the Dask one also the
cluster's. The cells of both runs must agree (same keys, same scores), or the script fails.

    python benchmarks/runner_speedup.py                       # quick.yaml, 2 workers
    python benchmarks/runner_speedup.py --spec benchmarks/specs/quick.yaml --workers 2
    python benchmarks/runner_speedup.py --keep benchmarks/runs/quick   # keep the cells too
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bidfcl import benchmark
from bidfcl.cli import load_flow
from bidfcl.io import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "runner-speedup.json"


def same_cells(first: Path, second: Path) -> bool:
    """Both folders hold the same cells with the same scores."""
    scores = [{r["key"]: r["metrics"] for r in benchmark.read_cells(d)} for d in (first, second)]
    return scores[0] == scores[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "benchmarks/specs/quick.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="copy the sequential run's cells here (a results folder)",
    )
    args = parser.parse_args()
    flow = load_flow("benchmark_flow", ROOT)
    with tempfile.TemporaryDirectory(prefix="bidfcl-speedup-") as scratch:
        local_dir, dask_dir = Path(scratch) / "local", Path(scratch) / "dask"
        load_before = os.getloadavg()
        local = flow.run(args.spec, local_dir, ROOT / "params.yaml")
        on_dask = flow.run(args.spec, dask_dir, ROOT / "params.yaml", workers=args.workers)
        if not same_cells(local_dir, dask_dir):
            raise SystemExit("the Dask run's cells differ from the sequential run's")
        cell_seconds = sum(r["seconds"] for r in benchmark.read_cells(local_dir))
        if args.keep is not None:
            shutil.copytree(local_dir / benchmark.CELLS_DIR, args.keep / benchmark.CELLS_DIR)
    result = {
        "spec": str(args.spec.relative_to(ROOT)),
        "cells": local["cells"],
        "workers": args.workers,
        "sequential_wall_seconds": local["wall_seconds"],
        "dask_wall_seconds": on_dask["wall_seconds"],
        "speedup": local["wall_seconds"] / on_dask["wall_seconds"],
        "sum_of_cell_seconds": cell_seconds,
        "cells_agree": True,
        "device": benchmark.device_name(),
        "cpu_cores": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "code_version": benchmark.code_version(),
        "git_commit": benchmark.git_commit(),
        "command": " ".join(sys.argv),
    }
    write_json(args.out, result)
    print(
        f"{result['cells']} cells: sequential {result['sequential_wall_seconds']:.0f} s, "
        f"dask x{args.workers} {result['dask_wall_seconds']:.0f} s, "
        f"speed-up {result['speedup']:.2f}x ({result['device']}); written to {args.out}"
    )


if __name__ == "__main__":
    main()
