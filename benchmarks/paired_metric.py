"""Paired comparisons of saved benchmark cells on any metric a cell records.

The report (``bidfcl report``) ranks methods by the deployed allocation's true value, whose
spend follows the rct_val calibration and so moves by several percent from seed to seed.
This script pairs the same cells on another recorded metric; ``true_value`` (the true
revenue of the Lagrangian policy whose spend meets the budget on the 12,000-user rct_test)
holds the spend at the budget and so separates ranking quality from spend luck.

    python benchmarks/paired_metric.py benchmarks/runs/regimes-50k --metric true_value \\
        --against tsm-both tsm-obs-ft bidfcl-fixed --out benchmarks/results/regimes-50k-true-value
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from bidfcl.benchmark import read_cells
from bidfcl.io import atomic_write, write_json
from bidfcl.report import cell_frame, paired_comparison


def latest(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each grid point's latest run, as the report keeps it (:func:`~bidfcl.report.cell_frame`):
    a grid rerun at new code leaves the earlier cells in the folder under their old keys."""
    kept = set(cell_frame(cells)["key"])
    return [cell for cell in cells if str(cell["key"]) in kept]


def read_latest(runs: list[Path]) -> list[dict[str, Any]]:
    """The latest cell of every grid point in these benchmark output folders."""
    return latest([cell for folder in runs for cell in read_cells(folder)])


def save(
    out: Path, runs: list[Path], cells: list[dict[str, Any]], text: str, **fields: Any
) -> None:
    """``out``.md (the text) and ``out``.json (``fields`` plus where the numbers came from)."""
    payload = {
        **fields,
        "runs": [str(folder) for folder in runs],
        "code_versions": sorted({str(cell.get("code_version")) for cell in cells}),
        "seeds": sorted({int(cell["seed"]) for cell in cells}),
        "command": " ".join(sys.argv),
    }
    write_json(out.with_suffix(".json"), payload)
    atomic_write(out.with_suffix(".md"), lambda tmp: tmp.write_text(text + "\n"))


def per_seed(cells: list[dict[str, Any]], metric: str) -> dict[str, pd.DataFrame]:
    """dataset -> (seed x method) table of the metric (cells without it are left out)."""
    rows = [
        {"dataset": c["dataset"], "method": c["method"], "seed": c["seed"], "value": v}
        for c in cells
        if (v := c["metrics"].get(metric)) is not None
    ]
    frame = pd.DataFrame(rows, columns=["dataset", "method", "seed", "value"])
    return {
        dataset: group.pivot(index="seed", columns="method", values="value").astype(float)
        for dataset, group in frame.groupby("dataset")
    }


def compare(table: dict[str, pd.DataFrame], against: list[str]) -> dict[str, dict[str, Any]]:
    """Per dataset and method: the mean over seeds and its paired test against each of
    ``against`` that the dataset has (the report's :func:`~bidfcl.report.paired_comparison`)."""
    return {
        dataset: {
            method: {
                "seeds": int(values[method].notna().sum()),
                "mean": float(values[method].mean()),
                "versus": {
                    other: paired_comparison(values, method, other)
                    for other in against
                    if other in values and other != method
                },
            }
            for method in sorted(values)
        }
        for dataset, values in sorted(table.items())
    }


def markdown(result: dict[str, dict[str, Any]], metric: str, against: list[str]) -> str:
    lines = [f"# Paired comparison on `{metric}`", ""]
    for dataset, methods in result.items():
        lines += [f"## {dataset}", "", "| method | seeds | mean | " + " | ".join(against) + " |"]
        lines.append("|---" * (3 + len(against)) + "|")
        for method, row in methods.items():
            cells = []
            for other in against:
                pair = row["versus"].get(other)
                if pair is None or pair["n"] == 0:
                    cells.append("–")
                    continue
                p = "n/a" if math.isnan(pair["p_value"]) else f"{pair['p_value']:.3f}"
                tied = f", {pair['ties']} tied" if pair["ties"] else ""
                cells.append(f"{pair['mean_diff']:+.3f} (p {p}, {pair['wins']}/{pair['n']}{tied})")
            lines.append(f"| {method} | {row['seeds']} | {row['mean']:.3f} | {' | '.join(cells)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="benchmark output folders")
    parser.add_argument("--metric", default="true_value")
    parser.add_argument("--against", nargs="+", default=["tsm-both", "tsm-obs-ft"])
    parser.add_argument("--out", type=Path, default=None, help="path stem for .md and .json")
    args = parser.parse_args(argv)
    cells = read_latest(args.runs)
    result = compare(per_seed(cells, args.metric), args.against)
    text = markdown(result, args.metric, args.against)
    print(text)
    if args.out is not None:
        save(args.out, args.runs, cells, text, metric=args.metric, result=result)


if __name__ == "__main__":
    main()
