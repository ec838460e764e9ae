"""The experiment runner as a Prefect flow: every pending cell of a spec is one task.

Cells already recorded in the output folder (same cache key) are skipped; the rest fan out
with ``.submit`` on the chosen task runner: one local worker by default (cells run one
after another), a ``dask.distributed.LocalCluster`` of ``--workers`` processes, or an
existing Dask cluster at ``--dask-address``. Each finished cell is a log line
``[done/total] ...`` and moves the flow run's progress artifact.

    bidfcl benchmark benchmarks/specs/quick.yaml --out benchmarks/runs/quick [--workers 2]
    python flows/benchmark_flow.py benchmarks/specs/quick.yaml --out DIR   (the same)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.futures import as_completed
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner

from bidfcl import benchmark
from bidfcl.io import write_json

# Dask workers import a task's function by module name; this file is loaded by path (the
# CLI) or run as a script, so its functions travel by value instead.
if __name__ != "__main__":
    cloudpickle.register_pickle_by_value(sys.modules[__name__])


@task(name="cell", task_run_name="{cell.label}")
def cell_task(cell: benchmark.Cell, out_dir: Path) -> dict[str, Any]:
    """Train, allocate and score one cell; one torch thread, so workers do not compete."""
    return benchmark.run_cell(cell, out_dir)


@flow(name="bidfcl-benchmark", log_prints=True)
def benchmark_flow(
    spec_path: str,
    out_dir: str,
    params_path: str = "params.yaml",
    runner: str = "local",
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Run the pending cells of ``spec_path`` (of its datasets named in ``only``, if given)
    into ``out_dir``; returns the run's summary (also written to ``out_dir/benchmark.json``).
    ``runner`` only labels the summary: the task runner is chosen by :func:`task_runner_for`."""
    logger = get_run_logger()
    started = time.perf_counter()
    out = Path(out_dir).resolve()
    spec = benchmark.BenchmarkSpec.load(spec_path).only(only or [])
    cells = spec.cells(Path(params_path))
    pending = benchmark.pending_cells(cells, out)
    total, done = len(cells), len(cells) - len(pending)
    logger.info(f"{spec.name}: {total} cells, {done} cached, {len(pending)} to run ({runner})")
    progress = create_progress_artifact(
        progress=100.0 * done / max(1, total), description=f"{spec.name}: cells done"
    )
    # Dask workers run task runs in other processes: they report to this flow's API server
    # (without it, each would start a temporary server of its own).
    with temporary_settings({PREFECT_API_URL: str(get_client(sync_client=True).api_url)}):
        futures = [cell_task.submit(cell, out) for cell in pending]
    for future in as_completed(futures):
        record = future.result()
        done += 1
        update_progress_artifact(progress, progress=round(100.0 * done / total, 1))
        logger.info(f"[{done}/{total}] {_describe(record)}")
    summary = {
        "spec": spec.name,
        "spec_file": str(spec_path),
        "datasets": [d.name for d in spec.datasets],
        "cells": total,
        "computed": len(pending),
        "cached": total - len(pending),
        "runner": runner,
        "wall_seconds": time.perf_counter() - started,
        "code_version": benchmark.code_version(),
        "git_commit": benchmark.git_commit(),
        "device": benchmark.device_name(),
    }
    write_json(out / benchmark.RUN_FILE, summary)
    return summary


def _describe(record: dict[str, Any]) -> str:
    metrics = record["metrics"]
    value = metrics.get("deployed_true_value")
    scored = f"true value {value:.4f}" if value is not None else f"EOM {metrics['eom']:.4f}"
    return (
        f"{record['dataset']} {record['method']} seed {record['seed']}: {scored} "
        f"({record['seconds']:.0f} s)"
    )


def task_runner_for(workers: int = 1, dask_address: str | None = None) -> tuple[Any, str]:
    """The task runner and its label: an existing Dask cluster, a LocalCluster of
    ``workers`` single-threaded processes, or (one worker, no address) the local runner."""
    if dask_address is None and workers <= 1:
        return ThreadPoolTaskRunner(max_workers=1), "local, 1 worker"
    from prefect_dask import DaskTaskRunner

    if dask_address is not None:
        return DaskTaskRunner(address=dask_address), f"dask at {dask_address}"
    # Loopback only (the dashboard on a free port, so two clusters never clash), and Dask's
    # own chatter kept out of the cell log lines.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # the worker processes
    cluster = {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": ":0",
        "silence_logs": logging.WARNING,
    }
    runner = DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster)
    return runner, f"dask LocalCluster, {workers} processes"


def run(
    spec_path: Path,
    out_dir: Path,
    params_path: Path = Path("params.yaml"),
    workers: int = 1,
    dask_address: str | None = None,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Run a spec with the runner the options choose (the CLI's and the script's entry)."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    task_runner, label = task_runner_for(workers, dask_address)
    configured = benchmark_flow.with_options(task_runner=task_runner)
    return configured(str(spec_path), str(out_dir), str(params_path), label, only)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--dask-address", default=None)
    parser.add_argument("--only", action="append", default=None, metavar="DATASET")
    args = parser.parse_args()
    summary = run(args.spec, args.out, args.params, args.workers, args.dask_address, args.only)
    print(
        f"{summary['spec']}: {summary['computed']} cells computed, {summary['cached']} cached, "
        f"{summary['wall_seconds']:.0f} s ({summary['runner']}); results in {args.out}"
    )


if __name__ == "__main__":
    main()
