"""Speed and optimality of the budgeted allocation solver (``bidfcl.allocation.solve_mckp``).

For each problem size N (M = 8 arms, float32) and each device, a fresh subprocess builds
one synthetic instance and times, as the median of repeats (five times as many up to
N = 100,000) after a warm-up, once with
torch's default intra-op threads and once with one thread (``torch.set_num_threads(1)``):
- one vectorised Lagrangian pass, ``(revenue - lam * cost).argmax(1)`` (the yardstick);
- ``solve_mckp(method="exact")`` and ``solve_mckp(method="bisection")``;
- at small N, scipy's HiGHS on the LP relaxation (float64), once (shared by both rows).
It reports the LP gap to HiGHS (relative), the integral allocation's shortfall from the
HiGHS LP optimum in units of the largest single-user revenue range (an upper bound on any
one user's hull step, so <= 1 means "within one user's step"), the speed ratios, the
agreement of bisection's lambda with the exact one and the peak memory: on CPU the
subprocess's peak resident set (``ru_maxrss``, inputs included, measured right after the
exact solver ran), on CUDA ``torch.cuda.max_memory_allocated`` during the exact solver.

Load: ``--load K`` starts K busy-looping Python processes (``while True: pass``, one core
each) before the first measurement and stops them after the last, so that every timing,
HiGHS included, runs on a machine whose other cores are busy, as a shared machine is;
``--load`` alone means one fewer than the CPU count (on a two-core machine: the other
core). The results record K, the CPU count and the load average when the run started.

Instance: cost_ij = (j / (M-1)) * (0.5 + U_ij) (control is free), revenue_ij =
a_i * (1 - exp(-b_i * cost_ij)) + 0.05 * eps_ij with a_i lognormal and b_i ~ U(0.5, 3):
diminishing returns with noise, so hulls skip some arms. The budget is 30% of the
unconstrained optimum's mean cost.

    python benchmarks/solver.py --quick       # under a minute on a CPU
    python benchmarks/solver.py               # N = 1e4 ... 1e7; writes benchmarks/results/
    python benchmarks/solver.py --load --sizes 10000 20000 100000 1000000

Each run writes ``solver-<device>[-quick][-load].json`` and a ``.md`` table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linprog

from bidfcl.allocation import solve_mckp
from bidfcl.io import atomic_write, write_json

N_ARMS = 8
BUDGET_FRACTION = 0.3
QUICK_SIZES = (5_000, 50_000, 500_000)
FULL_SIZES = (10_000, 20_000, 100_000, 1_000_000, 10_000_000)
QUICK_HIGHS_MAX = 5_000
FULL_HIGHS_MAX = 20_000
RESULTS_DIR = Path(__file__).resolve().parent / "results"
GENERATION_CHUNK = 1_000_000
SMALL_N = 100_000
T = TypeVar("T")


def make_instance(n_users: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Synthetic float32 (revenue, cost) on the CPU, built in chunks to keep memory flat."""
    generator = torch.Generator().manual_seed(seed)
    arm_value = torch.linspace(0.0, 1.0, N_ARMS)
    revenue = torch.empty(n_users, N_ARMS)
    cost = torch.empty(n_users, N_ARMS)
    for first in range(0, n_users, GENERATION_CHUNK):
        rows = min(GENERATION_CHUNK, n_users - first)
        chunk_cost = arm_value * (0.5 + torch.rand(rows, N_ARMS, generator=generator))
        scale = torch.exp(0.5 * torch.randn(rows, 1, generator=generator))
        rate = 0.5 + 2.5 * torch.rand(rows, 1, generator=generator)
        noise = 0.05 * torch.randn(rows, N_ARMS, generator=generator)
        revenue[first : first + rows] = scale * (1 - torch.exp(-rate * chunk_cost)) + noise
        cost[first : first + rows] = chunk_cost
    unconstrained_cost = cost.gather(1, revenue.argmax(1, keepdim=True)).double().mean()
    return revenue, cost, BUDGET_FRACTION * float(unconstrained_cost)


def timed(run: Callable[[], T], device: torch.device, repeats: int) -> tuple[float, T]:
    """Median wall time of ``repeats`` runs after one warm-up run, and the last run's output."""
    output = run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        output = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), output


def highs_lp(revenue: torch.Tensor, cost: torch.Tensor, budget: float) -> tuple[float, float]:
    """(mean revenue of the LP relaxation's optimum, seconds) from scipy's HiGHS."""
    n_users, n_arms = revenue.shape
    one_arm_each = sp.kron(sp.eye(n_users), np.ones((1, n_arms)), format="csr")
    start = time.perf_counter()
    solution = linprog(
        -revenue.double().numpy().ravel(),
        A_ub=cost.double().numpy().reshape(1, -1),
        b_ub=[budget * n_users],
        A_eq=one_arm_each,
        b_eq=np.ones(n_users),
        bounds=(0, 1),
        method="highs",
    )
    seconds = time.perf_counter() - start
    if solution.status != 0:
        raise RuntimeError(f"HiGHS failed: {solution.message}")
    return -solution.fun / n_users, seconds


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def measure(n_users: int, device_name: str, with_highs: bool, repeats: int) -> list[dict]:
    """The rows of the table for one size on one device: torch's default threads, then one."""
    device = torch.device(device_name)
    if n_users <= SMALL_N:
        repeats *= 5  # millisecond timings: more of them for a steady median
    revenue, cost, budget = make_instance(n_users)
    highs = highs_lp(revenue, cost, budget) if with_highs else None
    revenue, cost = revenue.to(device), cost.to(device)
    default_threads = torch.get_num_threads()
    rows = []
    for threads in (default_threads, 1):
        torch.set_num_threads(threads)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        exact_s, exact = timed(lambda: solve_mckp(revenue, cost, budget), device, repeats)
        peak_gb = peak_memory_gb(device)
        lam = exact.lam
        argmax_s, _ = timed(lambda lam=lam: (revenue - lam * cost).argmax(1), device, repeats)
        bisection_s, bisection = timed(
            lambda: solve_mckp(revenue, cost, budget, method="bisection"),
            device,
            max(1, repeats // 3),
        )
        row: dict[str, object] = {
            "device": device_name,
            "n_users": n_users,
            "n_arms": N_ARMS,
            "dtype": "float32",
            "budget": budget,
            "status": exact.status,
            "lam_exact": lam,
            "lam_bisection": bisection.lam,
            "lam_rel_diff": abs(bisection.lam - lam) / abs(lam) if lam else abs(bisection.lam),
            "lp_value": exact.lp_value,
            "integral_value": exact.mean_revenue,
            "bisection_value": bisection.mean_revenue,
            "mean_cost": exact.mean_cost,
            "argmax_pass_s": argmax_s,
            "exact_s": exact_s,
            "bisection_s": bisection_s,
            "exact_over_argmax": exact_s / argmax_s,
            "bisection_over_argmax": bisection_s / argmax_s,
            "peak_memory_gb": peak_gb,
            "peak_memory_kind": (
                "cuda max_memory_allocated" if device.type == "cuda" else "ru_maxrss"
            ),
            "torch_threads": threads,
            "torch_threads_setting": "default" if threads == default_threads else "1",
        }
        if highs is not None:
            highs_value, highs_s = highs
            largest_step = float((revenue.max(1).values - revenue.min(1).values).max())
            row |= {
                "highs_lp_value": highs_value,
                "highs_s": highs_s,
                "highs_over_exact": highs_s / exact_s,
                "lp_rel_gap": abs(exact.lp_value - highs_value) / abs(highs_value),
                "integral_gap_in_steps": (highs_value - exact.mean_revenue)
                * n_users
                / largest_step,
            }
        rows.append(row)
    return rows


def run_worker(n_users: int, device_name: str, with_highs: bool, repeats: int) -> list[dict]:
    """Measure one size in a fresh interpreter so that its peak memory is its own."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        str(n_users),
        "--device",
        device_name,
        "--repeats",
        str(repeats),
    ]
    if with_highs:
        command.append("--highs")
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    columns = [
        ("device", "{}"),
        ("n_users", "{:,}"),
        ("torch_threads", "{}"),
        ("argmax_pass_s", "{:.4f}"),
        ("exact_s", "{:.4f}"),
        ("exact_over_argmax", "{:.2f}"),
        ("bisection_s", "{:.3f}"),
        ("lam_rel_diff", "{:.1e}"),
        ("highs_s", "{:.2f}"),
        ("highs_over_exact", "{:,.0f}"),
        ("lp_rel_gap", "{:.1e}"),
        ("integral_gap_in_steps", "{:.3f}"),
        ("peak_memory_gb", "{:.2f}"),
    ]
    cells = [[name for name, _ in columns]]
    for row in rows:
        cells.append([fmt.format(row[name]) if name in row else "-" for name, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells
    )


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "memory_gb": round(memory_kb / 2**20, 1),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def start_load(burners: int) -> list[subprocess.Popen]:
    """``burners`` busy-looping processes, one core each (see the module docstring)."""
    busy_loop = [sys.executable, "-c", "while True: pass"]
    return [subprocess.Popen(busy_loop) for _ in range(burners)]


def stop_load(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
        process.wait()


def write_markdown(path: Path, payload: dict) -> None:
    """The table and the conditions it was measured under, for a reader of the results."""
    host = payload["machine"]
    lines = [
        f"# Allocation solver ({payload['rows'][0]['device']})",
        "",
        f"Machine: {host['cpu']}, {host['cpu_count']} CPUs, {host['memory_gb']} GiB; torch "
        f"{host['torch']}, numpy {host['numpy']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in host['load_average_at_start'])}.",
        f"Load: {payload['load_burners']} busy-loop process(es) ran throughout "
        "(benchmarks/solver.py docstring). Times are medians in seconds; `highs_over_exact` is "
        "HiGHS's time over the exact solver's in the same row.",
        "",
        "```",
        format_table(payload["rows"]),
        "```",
        "",
    ]
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--sizes", type=int, nargs="+", help="override the list of N")
    parser.add_argument("--devices", nargs="+", help="default: cpu, and cuda when available")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--highs-max", type=int, help="largest N solved by HiGHS too")
    parser.add_argument(
        "--load",
        type=int,
        nargs="?",
        const=max(1, (os.cpu_count() or 2) - 1),
        default=0,
        help="busy-loop processes run throughout (alone: one fewer than the CPUs)",
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--highs", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:
        print(json.dumps(measure(args.worker, args.device, args.highs, args.repeats)))
        return

    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    highs_max = args.highs_max or (QUICK_HIGHS_MAX if args.quick else FULL_HIGHS_MAX)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    host = machine()
    burners = start_load(args.load)
    try:
        for device_name in devices:
            rows = []
            for n_users in sizes:
                rows += run_worker(n_users, device_name, n_users <= highs_max, args.repeats)
                print(f"  done: {device_name} N={n_users:,}", file=sys.stderr, flush=True)
            print(format_table(rows), flush=True)
            suffix = ("-quick" if args.quick else "") + ("-load" if args.load else "")
            path = RESULTS_DIR / f"solver-{device_name}{suffix}.json"
            payload = {"quick": args.quick, "load_burners": args.load, "machine": host}
            payload["rows"] = rows
            write_json(path, payload)
            write_markdown(path.with_suffix(".md"), payload)
            print(f"wrote {path} and {path.with_suffix('.md').name}")
    finally:
        stop_load(burners)


if __name__ == "__main__":
    main()
