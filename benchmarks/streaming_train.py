"""One epoch of tsm-obs on an OBS log larger than memory, streamed from its parquet row groups.

Writes a dataset folder to a scratch directory (OBS: ``--rows`` x ``--features`` float32
features, one parquet row group per generated chunk, so generation memory is one chunk; a
small RCT beside it), then trains one epoch of tsm-obs on it in a child process at the
shipped settings (the OBS table is over ``stream_obs_above_mb``, so it streams) and records
the child's wall time, rows per second and peak RSS (``getrusage(RUSAGE_CHILDREN)``). The
data is deleted afterwards unless ``--keep``.

    python benchmarks/streaming_train.py                        # 30M x 192 (~23 GB in /tmp)
    python benchmarks/streaming_train.py --rows 200000 --features 16 --out /tmp/small.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bidfcl import benchmark
from bidfcl.contract import OBS, RCT_TABLES, DatasetMeta, save_dataset, table_file
from bidfcl.io import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "streaming_train.json"
N_TREATMENTS = 5
PEAK_RSS_LIMIT_GB = 8.0


def simulated_rows(
    n_rows: int, n_features: int, first_id: int, seed: int, randomized: bool
) -> dict[str, np.ndarray]:
    """``n_rows`` contract rows: standard-normal float32 features, a logged arm (uniform when
    ``randomized``, else biased by the first feature) and non-negative outcomes whose arm
    effects depend on the features. Features come as (d, n) so each column is contiguous."""
    rng = np.random.default_rng([seed, first_id])
    x = rng.standard_normal((n_features, n_rows), dtype=np.float32)
    if randomized:
        treatment = rng.integers(0, N_TREATMENTS, n_rows)
    else:
        biased = np.clip(np.floor((x[0] + 2.5) * N_TREATMENTS / 5), 0, N_TREATMENTS - 1)
        treatment = np.where(
            rng.random(n_rows) < 0.5, biased, rng.integers(0, N_TREATMENTS, n_rows)
        )
    lift = treatment * (0.5 + 0.3 * x[1])
    revenue = np.maximum(0.0, 2.0 + x[2] + lift + rng.standard_normal(n_rows)).astype(np.float32)
    cost = np.maximum(0.0, 0.2 * treatment * (1.0 + 0.2 * x[3])).astype(np.float32)
    columns = {f"x{j}": x[j] for j in range(n_features)}
    return {
        "user_id": np.arange(first_id, first_id + n_rows, dtype=np.int64),
        **columns,
        "treatment": treatment.astype(np.int64),
        "revenue": revenue,
        "cost": cost,
    }


def write_obs(path: Path, n_rows: int, n_features: int, group_rows: int, seed: int) -> None:
    """OBS as parquet, one row group per chunk of ``group_rows`` rows (uncompressed: random
    floats do not compress, and decoding is then a copy)."""
    writer: pq.ParquetWriter | None = None
    try:
        for start in range(0, n_rows, group_rows):
            chunk = simulated_rows(min(group_rows, n_rows - start), n_features, start, seed, False)
            table = pa.table(chunk)
            if writer is None:
                writer = pq.ParquetWriter(
                    path, table.schema, compression="none", use_dictionary=False
                )
            writer.write_table(table, row_group_size=group_rows)
    finally:
        if writer is not None:
            writer.close()


def write_dataset(folder: Path, args: argparse.Namespace) -> None:
    """The dataset folder: OBS streamed to disk, then the RCT tables and meta.json."""
    folder.mkdir(parents=True, exist_ok=True)
    write_obs(folder / table_file(OBS), args.rows, args.features, args.row_group_rows, args.seed)
    tables = {}
    for k, name in enumerate(RCT_TABLES):
        rows = simulated_rows(
            args.rct_rows, args.features, args.rows + k * args.rct_rows, args.seed, True
        )
        frame = pd.DataFrame(rows)
        frame["propensity"] = np.float32(1 / N_TREATMENTS)
        tables[name] = frame
    meta = DatasetMeta(
        n_treatments=N_TREATMENTS,
        treatment_names=[f"arm{j}" for j in range(N_TREATMENTS)],
        feature_columns=[f"x{j}" for j in range(args.features)],
        source="benchmarks/streaming_train.py",
        extra={"default_budget": 0.3},
    )
    save_dataset(folder, meta, tables)


def train_one_epoch(folder: Path, threads: int, stream_above_mb: float | None) -> dict[str, Any]:
    """The child: one epoch of tsm-obs (at the shipped ``stream_obs_above_mb`` unless given);
    prints its timings as JSON."""
    from bidfcl.methods import train_to_folder
    from bidfcl.model import UpliftModel
    from bidfcl.train_config import TrainConfig

    config = TrainConfig(method="tsm-obs", max_epochs=1, num_threads=threads)
    if stream_above_mb is not None:
        config = replace(config, stream_obs_above_mb=stream_above_mb)
    started = time.perf_counter()
    model = UpliftModel.load(train_to_folder(folder, folder / "model", config, progress=False))
    return {
        "seconds": time.perf_counter() - started,
        "fit_seconds": model.metadata["fit_seconds"],
        "n_train_rows": model.metadata["n_train_rows"],
        "best_val_loss": model.metadata["best_val_loss"],
        "obs_streaming": model.metadata.get("obs_streaming"),
        "batch_size": config.batch_size,
        "stream_obs_above_mb": config.stream_obs_above_mb,
    }


def run_child(
    folder: Path, threads: int, stream_above_mb: float | None
) -> tuple[dict[str, Any], float, float]:
    """Train in a child process: its result, wall seconds and peak RSS (GB)."""
    command = [sys.executable, __file__, "--train-only", str(folder), "--threads", str(threads)]
    if stream_above_mb is not None:
        command += ["--stream-obs-above-mb", str(stream_above_mb)]
    started = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    return json.loads(done.stdout.strip().splitlines()[-1]), wall, peak_kb / 2**20


def markdown(result: dict[str, Any]) -> str:
    """The results table a reader scans."""
    rows = [
        ("OBS log", f"{result['rows']:,} rows x {result['features']} float32 features"),
        ("OBS file", f"{result['obs_file_gb']:.1f} GB parquet, {result['row_groups']} row groups"),
        ("method", f"tsm-obs, 1 epoch, batch {result['train']['batch_size']}, OBS streamed"),
        ("stream_obs_above_mb", f"{result['train']['stream_obs_above_mb']:g}"),
        ("torch threads", str(result["threads"])),
        ("generation wall", f"{result['generate_seconds']:.0f} s"),
        ("training wall (child process)", f"{result['train_wall_seconds']:.0f} s"),
        ("  of which the epoch (Trainer.fit)", f"{result['train']['fit_seconds']:.0f} s"),
        (
            "  of which the scaler pass",
            f"{result['train']['obs_streaming']['scaler_seconds']:.0f} s",
        ),
        ("  of which start-up, RCT, calibration", f"{result['other_seconds']:.0f} s"),
        ("rows/s, epoch", f"{result['rows_per_second_epoch']:,.0f}"),
        ("rows/s, whole training run", f"{result['rows_per_second_wall']:,.0f}"),
        ("peak RSS (child)", f"{result['peak_rss_gb']:.2f} GB (limit {PEAK_RSS_LIMIT_GB:g} GB)"),
        ("machine", result["machine"]),
        (
            "load average before / after",
            f"{result['load_average_before']} / {result['load_average_after']}",
        ),
    ]
    lines = [
        "# Streaming OBS: one tsm-obs epoch on a log larger than memory",
        "",
        f"`{result['command']}` (code {result['code_version']}).",
        "",
        "| | |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30_000_000)
    parser.add_argument("--features", type=int, default=192)
    parser.add_argument("--row-group-rows", type=int, default=65_536)
    parser.add_argument("--rct-rows", type=int, default=20_000, help="per RCT table")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stream-obs-above-mb",
        type=float,
        default=None,
        help="train.stream_obs_above_mb (default: the shipped one); 0 streams a small log",
    )
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep", action="store_true", help="keep the generated dataset")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--train-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_only is not None:
        print(json.dumps(train_one_epoch(args.train_only, args.threads, args.stream_obs_above_mb)))
        return
    folder = Path(tempfile.mkdtemp(prefix="bidfcl-streaming-", dir=args.scratch))
    try:
        load_before = os.getloadavg()
        started = time.perf_counter()
        write_dataset(folder, args)
        generate_seconds = time.perf_counter() - started
        train, wall, peak_gb = run_child(folder, args.threads, args.stream_obs_above_mb)
        if train["obs_streaming"] is None:
            raise SystemExit("OBS was loaded, not streamed: pass --stream-obs-above-mb 0")
        obs_file = folder / table_file(OBS)
        result = {
            "rows": args.rows,
            "features": args.features,
            "row_groups": pq.ParquetFile(obs_file).metadata.num_row_groups,
            "obs_file_gb": obs_file.stat().st_size / 1e9,
            "threads": args.threads,
            "generate_seconds": generate_seconds,
            "train_wall_seconds": wall,
            "other_seconds": wall - train["fit_seconds"] - train["obs_streaming"]["scaler_seconds"],
            "rows_per_second_epoch": args.rows / train["fit_seconds"],
            "rows_per_second_wall": args.rows / wall,
            "peak_rss_gb": peak_gb,
            "train": train,
            "machine": f"{benchmark.device_name()}, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
            "code_version": benchmark.code_version(),
            "git_commit": benchmark.git_commit(),
            "command": " ".join(["python", *sys.argv]),
        }
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    write_json(args.out, result)
    args.out.with_suffix(".md").write_text(markdown(result))
    print(
        f"{args.rows:,} x {args.features}: epoch {train['fit_seconds']:.0f} s "
        f"({result['rows_per_second_epoch']:,.0f} rows/s), training wall {wall:.0f} s, "
        f"peak RSS {peak_gb:.2f} GB; written to {args.out}"
    )
    if peak_gb > PEAK_RSS_LIMIT_GB:
        raise SystemExit(f"peak RSS {peak_gb:.2f} GB is over {PEAK_RSS_LIMIT_GB:g} GB")


if __name__ == "__main__":
    main()
