"""Spend calibration: the shipped allocation with and without the rct_val-calibrated lambda.

Reads the runs of ``benchmarks/methods.py`` (each model scored both ways on the same
rct_test users with the simulator's truth) and compares, per method, the allocation solved
on the model's predicted costs ("predicted") with the Lagrangian policy at the lambda whose
doubly robust spend on rct_val meets the budget ("calibrated", ``bidfcl.deployment``):
true revenue per user (paired over seeds, t-test), true spend against the budget, and the
seeds that overspend.

    python benchmarks/methods.py --methods tsm-rct tsm-obs tsm-both bidfcl-ppl \\
        --seeds 100 101 102 103 104 --sim bias=4 confounding=2 --out benchmarks/results/x
    python benchmarks/calibration.py benchmarks/results/x.json [more.json ...] \\
        --out benchmarks/results/calibration
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from scipy import stats

from bidfcl.io import atomic_write, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import RESULTS_DIR


def regime_of(payload: dict[str, Any]) -> str:
    """The simulator settings a methods run overrode, as a label ("default" if none)."""
    simulator = payload["settings"]["overrides"]["simulator"]
    return ", ".join(f"{k}={v}" for k, v in sorted(simulator.items())) or "default"


def compare_runs(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method of one methods run: predicted-cost vs calibrated allocation."""
    budgets = {c["seed"]: c["budget"] for c in payload["seeds"]}
    rows = []
    methods = dict.fromkeys(run["method"] for run in payload["runs"])
    for method in methods:
        runs = sorted(
            (r for r in payload["runs"] if r["method"] == method), key=lambda r: r["seed"]
        )
        predicted = [r["deployed_true_revenue"] for r in runs]
        calibrated = [r["calibrated_true_revenue"] for r in runs]
        differences = [c - p for c, p in zip(calibrated, predicted, strict=True)]
        p_value = float("nan")
        if len(runs) > 1 and any(d != differences[0] for d in differences):
            p_value = float(stats.ttest_rel(calibrated, predicted).pvalue)

        def spend_error(key: str, rs: list[dict[str, Any]] = runs) -> float:
            return statistics.fmean(abs(r[key] / budgets[r["seed"]] - 1) for r in rs)

        rows.append(
            {
                "regime": regime_of(payload),
                "method": method,
                "seeds": [r["seed"] for r in runs],
                "predicted_true_revenue": statistics.fmean(predicted),
                "calibrated_true_revenue": statistics.fmean(calibrated),
                "difference": statistics.fmean(differences),
                "difference_sd": statistics.stdev(differences) if len(runs) > 1 else float("nan"),
                "wins": sum(d > 0 for d in differences),
                "p_value": p_value,
                "predicted_spend_error": spend_error("deployed_true_cost"),
                "calibrated_spend_error": spend_error("calibrated_true_cost"),
                "predicted_over_budget": sum(
                    r["deployed_true_cost"] > budgets[r["seed"]] for r in runs
                ),
                "calibrated_over_budget": sum(
                    r["calibrated_true_cost"] > budgets[r["seed"]] for r in runs
                ),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| regime | method | seeds | true rev, predicted costs | true rev, calibrated "
        "| Δ (calibrated − predicted) | wins | p | mean abs spend error, predicted "
        "| …, calibrated | over budget, predicted / calibrated |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        lines.append(
            f"| {r['regime']} | {r['method']} | {len(r['seeds'])} "
            f"| {r['predicted_true_revenue']:.3f} | {r['calibrated_true_revenue']:.3f} "
            f"| {r['difference']:+.3f} ± {r['difference_sd']:.3f} | {r['wins']}/{len(r['seeds'])} "
            f"| {r['p_value']:.3f} | {r['predicted_spend_error']:.1%} "
            f"| {r['calibrated_spend_error']:.1%} "
            f"| {r['predicted_over_budget']} / {r['calibrated_over_budget']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON outputs of methods.py")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "calibration")
    args = parser.parse_args(argv)
    payloads = [json.loads(path.read_text()) for path in args.runs]
    rows = [row for payload in payloads for row in compare_runs(payload)]
    write_json(
        args.out.with_suffix(".json"), {"sources": [str(p) for p in args.runs], "rows": rows}
    )
    table = markdown(rows)
    notes = (
        "True revenue and spend per user on rct_test from the simulator's ground truth; "
        "'predicted' ships the exact MCKP on the model's predicted costs, 'calibrated' the "
        "Lagrangian policy at the lambda whose DR-estimated spend on rct_val meets the "
        "budget. Same trained model for both; p from a paired t-test over seeds. Spend "
        "error is |true spend / budget - 1|. Sources: "
        + ", ".join(f"`{p.name}`" for p in args.runs)
    )
    text = f"# Spend calibration\n\n{notes}\n\n{table}\n"
    atomic_write(args.out.with_suffix(".md"), lambda tmp: tmp.write_text(text))
    print(table)


if __name__ == "__main__":
    main()
