"""How much can a Bi-DFCL gate matter at all? The reach of constant gates, from saved cells.

Reads bidfcl-ppl cells whose gates were frozen (``fixed_gate``: methods named
``bidfcl-frozen-G``) beside the learned Bridge (``bidfcl-ppl``) and the rct_val-chosen
constant (``bidfcl-fixed``) on the same datasets and seeds, and reports per dataset:

- each constant gate's mean true value, and the spread (best minus worst gate) per seed;
- the *truth-best* constant gate per seed and its gain over the gate 0.5 the learned Bridge
  starts from: what a Bridge that always found the best constant would add, knowing the
  truth (an upper bound for any chooser of constants, biased up by taking a maximum);
- the learned Bridge and bidfcl-fixed against the frozen 0.5, paired by seed, and the
  difference a paired t-test over these seeds detects with 80% power at the spread of the
  learned-minus-frozen differences (the minimal detectable effect), and how many seeds it
  would take to detect the truth-best constant's gain at that spread.

    python benchmarks/gate_span.py benchmarks/runs/regimes-50k-frozen \\
        benchmarks/runs/regimes-50k-gate-span benchmarks/runs/regimes-50k \\
        --out benchmarks/results/regimes-50k-gate-span
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import pandas as pd
from scipy import stats

from bidfcl.report import paired_comparison
from paired_metric import per_seed, read_latest, save

FROZEN_PREFIX = "bidfcl-frozen-"
START_GATE = 0.5  # every learned gate starts here (the Bridge's last layer starts at zero)
LEARNED, RCT_CHOSEN = "bidfcl-ppl", "bidfcl-fixed"
POWER, ALPHA = 0.8, 0.05


def minimal_detectable_effect(sd: float, n: int) -> float:
    """The mean paired difference a two-sided t-test at ALPHA detects with POWER over n pairs
    whose differences have standard deviation ``sd`` (t quantiles, the usual approximation of
    the power)."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    return (stats.t.ppf(1 - ALPHA / 2, n - 1) + stats.t.ppf(POWER, n - 1)) * sd / math.sqrt(n)


def seeds_to_detect(effect: float, sd: float) -> float:
    """Pairs a two-sided test at ALPHA needs to detect a mean difference ``effect`` with POWER
    when the differences have standard deviation ``sd`` (normal quantiles: a lower bound)."""
    if not effect > 0 or not math.isfinite(sd):
        return math.nan
    z = stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(POWER)
    return math.ceil((z * sd / effect) ** 2)


def gate_columns(values: pd.DataFrame) -> dict[float, str]:
    """Frozen gate value -> its method column (``bidfcl-frozen-0.25`` -> 0.25)."""
    return {
        float(name.removeprefix(FROZEN_PREFIX)): name
        for name in values
        if name.startswith(FROZEN_PREFIX)
    }


def span(values: pd.DataFrame) -> dict[str, Any] | None:
    """One dataset's (seed x method) table -> the reach of its constant gates."""
    gates = gate_columns(values)
    start = gates.get(START_GATE)
    if start is None or len(gates) < 2:
        return None
    frozen = values[list(gates.values())].dropna()
    best = frozen.max(axis=1)
    oracle_gain = best - frozen[start]
    best_gate = frozen.idxmax(axis=1).map({name: gate for gate, name in gates.items()})
    result: dict[str, Any] = {
        "seeds": len(frozen),
        "gate_means": {
            str(gate): float(frozen[name].mean()) for gate, name in sorted(gates.items())
        },
        "spread_mean": float((best - frozen.min(axis=1)).mean()),
        "truth_best_gate_per_seed": {str(seed): gate for seed, gate in best_gate.items()},
        "truth_best_gain_over_0.5": {
            "mean": float(oracle_gain.mean()),
            "sd": float(oracle_gain.std(ddof=1)),
            "max": float(oracle_gain.max()),
        },
        "versus_0.5": {},
    }
    for method in (LEARNED, RCT_CHOSEN):
        if method not in values:
            continue
        pair = paired_comparison(values, method, start)
        difference = (values[method] - values[start]).dropna()
        pair["sd_diff"] = float(difference.std(ddof=1)) if len(difference) > 1 else math.nan
        pair["minimal_detectable_effect"] = minimal_detectable_effect(pair["sd_diff"], pair["n"])
        pair["seeds_to_detect_truth_best_gain"] = seeds_to_detect(
            result["truth_best_gain_over_0.5"]["mean"], pair["sd_diff"]
        )
        result["versus_0.5"][method] = pair
    return result


def markdown(result: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = ["# The reach of constant gates (bidfcl-ppl, gates frozen)", ""]
    for metric, datasets in result.items():
        lines += [f"## `{metric}`", ""]
        for dataset, row in datasets.items():
            gates = ", ".join(f"{g}: {v:.3f}" for g, v in row["gate_means"].items())
            gain = row["truth_best_gain_over_0.5"]
            chosen = pd.Series(row["truth_best_gate_per_seed"]).value_counts().sort_index()
            lines += [
                f"### {dataset} ({row['seeds']} seeds)",
                "",
                f"- mean by constant gate: {gates}",
                f"- best minus worst constant gate, per seed, mean: {row['spread_mean']:.3f}",
                "- truth-best constant gate: "
                + ", ".join(f"{g} on {n} seeds" for g, n in chosen.items()),
                f"- truth-best constant minus 0.5: {gain['mean']:+.3f} per user "
                f"(sd {gain['sd']:.3f}, largest {gain['max']:+.3f})",
            ]
            for method, pair in row["versus_0.5"].items():
                p = "n/a" if math.isnan(pair["p_value"]) else f"{pair['p_value']:.3f}"
                lines.append(
                    f"- {method} minus 0.5: {pair['mean_diff']:+.3f} (p {p}, "
                    f"{pair['wins']}/{pair['n']} wins, {pair['ties']} tied; sd "
                    f"{pair['sd_diff']:.3f}, detectable with 80% power: "
                    f"{pair['minimal_detectable_effect']:.3f}; seeds to detect the "
                    f"truth-best gain at that sd: {pair['seeds_to_detect_truth_best_gain']})"
                )
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="benchmark output folders")
    parser.add_argument("--metrics", nargs="+", default=["deployed_true_value", "true_value"])
    parser.add_argument("--out", type=Path, default=None, help="path stem for .md and .json")
    args = parser.parse_args(argv)
    cells = read_latest(args.runs)
    result = {
        metric: {
            dataset: row
            for dataset, values in sorted(per_seed(cells, metric).items())
            if (row := span(values)) is not None
        }
        for metric in args.metrics
    }
    text = markdown(result)
    print(text)
    if args.out is not None:
        save(args.out, args.runs, cells, text, result=result)


if __name__ == "__main__":
    main()
