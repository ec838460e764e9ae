"""Bi-DFCL against the baselines the paper beats, paired by seed, on the default simulator.

Runs ``benchmarks/methods.py`` for tsm-rct, tsm-obs, tsm-both, dfcl-ppl, bidfcl-ppl and
bidfcl-pifd (or reads a run it already wrote, ``--from-json``), then pairs every bidfcl-*
run with every baseline on the same seed: mean difference of the true revenue of the
deployed allocation and of the EOM policy, a paired t-test p-value and the win count.

    python benchmarks/bilevel_compare.py --seeds 0 1 2 3 4 --set max_epochs=20
    python benchmarks/bilevel_compare.py --from-json benchmarks/results/bilevel-compare.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from scipy import stats

from bidfcl.io import atomic_write

sys.path.insert(0, str(Path(__file__).resolve().parent))
import methods

BIDFCL = ("bidfcl-ppl", "bidfcl-pifd")
BASELINES = ("tsm-rct", "tsm-obs", "tsm-both", "dfcl-ppl")
METRICS = ("deployed_true_revenue", "eom_true_revenue")


def paired_rows(runs: list[dict]) -> list[dict]:
    """One row per (bidfcl method, baseline, metric) in the runs: paired differences."""
    by_key = {(run["method"], run["seed"]): run for run in runs}
    seeds = sorted({run["seed"] for run in runs})
    present = {run["method"] for run in runs}
    rows = []
    for method in (m for m in BIDFCL if m in present):
        for baseline in (b for b in BASELINES if b in present):
            for metric in METRICS:
                diffs = [by_key[(method, s)][metric] - by_key[(baseline, s)][metric] for s in seeds]
                p_value = stats.ttest_1samp(diffs, 0.0).pvalue if len(diffs) > 1 else float("nan")
                rows.append(
                    {
                        "method": method,
                        "baseline": baseline,
                        "metric": metric,
                        "mean_diff": statistics.fmean(diffs),
                        "sd_diff": statistics.stdev(diffs) if len(diffs) > 1 else float("nan"),
                        "relative": statistics.fmean(diffs)
                        / statistics.fmean(by_key[(baseline, s)][metric] for s in seeds),
                        "p_value": float(p_value),
                        "wins": sum(d > 0 for d in diffs),
                        "n_seeds": len(diffs),
                    }
                )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| method | baseline | metric | mean Δ ± sd | relative | p (paired t) | wins |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['baseline']} | {r['metric']} | {r['mean_diff']:+.3f} ± "
        f"{r['sd_diff']:.3f} | {100 * r['relative']:+.2f}% | {r['p_value']:.3f} | "
        f"{r['wins']}/{r['n_seeds']} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-json", type=Path, default=None, help="a methods.py output")
    parser.add_argument("--out", type=Path, default=methods.RESULTS_DIR / "bilevel-compare")
    args, rest = parser.parse_known_args(argv)
    source = args.from_json
    if source is None:
        methods.main(
            [*rest, "--methods", *BASELINES, *BIDFCL, "--out", str(args.out)],
        )
        source = args.out.with_suffix(".json")
    runs = json.loads(source.read_text())["runs"]
    table = markdown(paired_rows(runs))
    pairs = args.out.with_name(args.out.name + "-pairs.md")
    text = f"# Bi-DFCL paired differences ({source.name})\n\n{table}\n"
    atomic_write(pairs, lambda tmp: tmp.write_text(text))
    print(table)


if __name__ == "__main__":
    main()
