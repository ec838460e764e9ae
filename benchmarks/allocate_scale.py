"""`bidfcl allocate` at scale: wall time, throughput and peak memory on N users (default 10M).

Steps, each in bounded memory:
1. a features parquet of N users (``user_id`` and ``--features`` float32 columns drawn
   from a normal distribution), generated and written one row group of ``--row-group``
   rows at a time;
2. a model folder the CLI loads: a freshly initialised :class:`~bidfcl.model.UpliftModel`
   of the default architecture with M arms and its scaler fitted on one chunk. Its weights
   are random, which makes no difference to the work of predicting and allocating; the
   budget is set 30% of the way from the cheapest arms' mean predicted cost to the
   unconstrained optimum's (estimated on that chunk), so the exact MCKP binds;
3. ``bidfcl allocate MODEL USERS --budget B --out OUT`` in a subprocess, timed from the
   outside; its peak resident set is ``ru_maxrss`` of the waited-for children (the
   subprocess is the only child).
The output is checked to hold one row per user. Results go to
``benchmarks/results/allocate-scale[-N].json`` and ``.md``; the data and model live in a
temporary folder removed afterwards (``--keep`` keeps it).

    python benchmarks/allocate_scale.py                 # 10M users
    python benchmarks/allocate_scale.py --users 200000  # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bidfcl.allocation import solve_mckp
from bidfcl.contract import USER_ID
from bidfcl.io import atomic_write, write_json
from bidfcl.model import ModelConfig, UpliftModel

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BUDGET_FRACTION = 0.3


def write_users(path: Path, n_users: int, n_features: int, row_group: int, seed: int) -> None:
    """Shuffled-looking unique ids and normal features, one row group in memory at a time."""
    rng = np.random.default_rng(seed)
    columns = [f"f{i}" for i in range(n_features)]
    schema = pa.schema([(USER_ID, pa.int64())] + [(c, pa.float32()) for c in columns])
    # An odd multiplier modulo a power of two is a bijection: unique ids in no sorted order.
    modulus = 1 << max(1, int(n_users - 1).bit_length())
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n_users, row_group):
            rows = np.arange(start, min(start + row_group, n_users), dtype=np.int64)
            features = rng.normal(0.0, 1.0, (len(rows), n_features)).astype(np.float32)
            arrays = [pa.array((rows * 2_654_435_761) % modulus)]
            arrays += [pa.array(features[:, j]) for j in range(n_features)]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))


def build_model(folder: Path, users: Path, n_arms: int, seed: int) -> tuple[Path, float]:
    """A saved random-weight model of the default architecture, and a budget that binds."""
    torch.manual_seed(seed)
    with pq.ParquetFile(users) as source:
        first = source.read_row_group(0)
    columns = [c for c in first.column_names if c != USER_ID]
    x = torch.from_numpy(np.stack([first[c].to_numpy() for c in columns], axis=1))
    arms = ["control"] + [f"arm{j}" for j in range(1, n_arms)]
    model = UpliftModel.build(x, columns, arms, ModelConfig(), {"method": "random-init"})
    revenue, cost = model.predict(x)
    cheapest = float(cost.min(1).values.double().mean())
    unconstrained = solve_mckp(revenue, cost, float(cost.max())).mean_cost
    budget = cheapest + BUDGET_FRACTION * (unconstrained - cheapest)
    return model.save(folder), budget


def run_allocate(model_dir: Path, users: Path, budget: float, out: Path, chunk_rows: int) -> dict:
    """Time ``bidfcl allocate`` in a subprocess; its peak RSS from the children's rusage."""
    command = [
        str(Path(sys.executable).with_name("bidfcl")),
        "allocate",
        str(model_dir),
        str(users),
        "--budget",
        repr(budget),
        "--out",
        str(out),
        "--chunk-rows",
        str(chunk_rows),
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall_s = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"bidfcl allocate failed ({done.returncode}): {done.stderr[-2000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_s": wall_s, "peak_rss_gb": peak_kb * 1024 / 2**30, "stdout": done.stdout.strip()}


def machine() -> dict[str, object]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name")), "")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    memory_kb = next(int(x.split()[1]) for x in meminfo if x.startswith("MemTotal"))
    return {
        "cpu": model or platform.processor(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(memory_kb / 2**20, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def write_markdown(path: Path, result: dict) -> None:
    host, run = result["machine"], result["allocate"]
    lines = [
        f"# `bidfcl allocate` on {result['n_users']:,} users",
        "",
        f"Machine: {host['cpu']}, {host['cpu_count']} CPUs, {host['memory_gb']} GiB; torch "
        f"{host['torch']} ({host['torch_threads']} threads); load average at start "
        f"{', '.join(f'{x:.2f}' for x in host['load_average_at_start'])} (a shared machine).",
        "",
        f"Input: {result['n_features']} float32 features, {result['input_gb']:.2f} GB parquet "
        f"in row groups of {result['row_group']:,}; model: default architecture, "
        f"{result['n_arms']} arms (random weights); budget {result['budget']:.4f} "
        f"(binding); `--chunk-rows {result['chunk_rows']:,}`.",
        "",
        "| wall time (s) | rows/s | peak RSS (GB) | predictions bound (GB) |",
        "|---:|---:|---:|---:|",
        f"| {run['wall_s']:.1f} | {result['rows_per_s']:,.0f} | {run['peak_rss_gb']:.2f} | "
        f"{result['predictions_gb']:.2f} |",
        "",
        "Peak RSS is the `bidfcl allocate` subprocess's `ru_maxrss` (interpreter, torch and "
        "pyarrow included). The predictions bound is the (N, M) float32 revenue and cost, "
        "the ids and the chosen arms: 8 M + 16 bytes per user.",
        "",
        f"CLI output: `{run['stdout']}`",
        "",
    ]
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000_000, help="N")
    parser.add_argument("--features", type=int, default=12, help="feature columns")
    parser.add_argument("--arms", type=int, default=5, help="M, control included")
    parser.add_argument("--row-group", type=int, default=250_000, help="rows per row group")
    parser.add_argument("--chunk-rows", type=int, default=1_000_000, help="allocate's chunk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where the data go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the data and the model")
    args = parser.parse_args()

    host = machine()
    workdir = Path(tempfile.mkdtemp(prefix="allocate-scale-", dir=args.workdir))
    try:
        users, out = workdir / "users.parquet", workdir / "plan.parquet"
        start = time.perf_counter()
        write_users(users, args.users, args.features, args.row_group, args.seed)
        generate_s = time.perf_counter() - start
        print(f"wrote {users} in {generate_s:.1f} s", file=sys.stderr, flush=True)
        model_dir, budget = build_model(workdir / "model", users, args.arms, args.seed)
        run = run_allocate(model_dir, users, budget, out, args.chunk_rows)
        written = pq.ParquetFile(out).metadata.num_rows
        if written != args.users:
            raise RuntimeError(f"{out} holds {written} rows, expected {args.users}")
        result = {
            "n_users": args.users,
            "n_features": args.features,
            "n_arms": args.arms,
            "row_group": args.row_group,
            "chunk_rows": args.chunk_rows,
            "budget": budget,
            "input_gb": users.stat().st_size / 2**30,
            "generate_s": generate_s,
            "allocate": run,
            "rows_per_s": args.users / run["wall_s"],
            "predictions_gb": args.users * (8 * args.arms + 16) / 2**30,
            "machine": host,
        }
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    suffix = "" if args.users == 10_000_000 else f"-{args.users}"
    path = RESULTS_DIR / f"allocate-scale{suffix}.json"
    write_json(path, result)
    write_markdown(path.with_suffix(".md"), result)
    print(
        f"{run['wall_s']:.1f} s, {result['rows_per_s']:,.0f} rows/s, peak RSS "
        f"{run['peak_rss_gb']:.2f} GB; wrote {path}"
    )


if __name__ == "__main__":
    main()
