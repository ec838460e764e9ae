"""The promotion gate's statistics on the simulator, where the true difference is known.

Each replication simulates a fresh randomized trial (default size: rct_test has 12,000
users) and builds policies from the simulator's truth, so that the true difference in
revenue per user between two policies on the evaluated users is known exactly:

- B, the reference: the truth-optimal allocation at the default budget (exact MCKP);
- A for a true relative gain delta: B is A with users sent, one by one in random order, to
  a random worse arm until A - B = delta * value(B) (so A beats B by delta);
- A under the null: B with users switched in balanced gains and losses until the true
  difference is just <= 0 (A is truly no better; 30% of users switched);
- pairs that agree on a set share of users, for the width ratio.

The paired comparison (``bidfcl.evaluation.compare_policies``; DR's outcome model
cross-fitted on the evaluated table) is scored for IPW and DR on:
(a) coverage of the true difference by the two-sided 95% interval;
(b) the false-promotion rate under the null, promoting when the one-sided 95% lower bound
    exceeds 0 (margin 0);
(c) power: the promotion rate at true gains of 0.5%, 1%, 2% and 3%, and the rct_test size
    for 80% power at 1%, from the measured standard error (it scales as 1/sqrt(n));
(d) the paired over unpaired interval width against the agreement rate;
(e) how often the spend check passes for the truth-optimal allocation (true spend at the
    budget): its one-sided 95% spend upper bound within the budget times 1 + tolerance.

    python benchmarks/gate.py --quick        # 200 replications, well under 10 min on 2 cores
    python benchmarks/gate.py --replications 500
Writes benchmarks/results/gate.json (or gate-quick.json) and prints the tables.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from statistics import NormalDist
from typing import Any

import torch

from bidfcl.allocation import solve_mckp
from bidfcl.contract import RCT_TEST, LoggedData, Truth
from bidfcl.evaluation import compare_policies, make_estimator
from bidfcl.io import write_json
from bidfcl.outcome_model import crossfit_outcomes
from bidfcl.simulate import SimulatorConfig, simulate

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ESTIMATORS = ("ipw", "dr")
GAINS = (0.005, 0.01, 0.02, 0.03)
AGREEMENTS = (0.35, 0.5, 0.65, 0.8, 0.9, 0.95)
NULL_SWITCHED = 0.3
TOLERANCES = (0.01, 0.05, 0.10)
ALPHA = 0.05
POWER = 0.8
SEED_OFFSET = 50_000  # replication seeds are disjoint from the development and report seeds


def degraded(
    best: torch.Tensor, truth: Truth, target: float, generator: torch.Generator
) -> torch.Tensor:
    """``best`` with users moved to a random arm of lower true revenue, in random order,
    until its true revenue per user is ``target`` lower."""
    n, n_arms = truth.revenue.shape
    users = torch.arange(n)
    alternative = (best + torch.randint(1, n_arms, (n,), generator=generator)) % n_arms
    loss = truth.revenue[users, best] - truth.revenue[users, alternative]
    order = torch.randperm(n, generator=generator)
    order = order[loss[order] > 0]
    reached = torch.cumsum(loss[order], 0) / n >= target
    if not bool(reached.any()):
        raise RuntimeError(f"cannot degrade the policy by {target:.4f} per user")
    switched = order[: int(reached.nonzero()[0]) + 1]
    policy = best.clone()
    policy[switched] = alternative[switched]
    return policy


def balanced(best: torch.Tensor, truth: Truth, share: float, generator: torch.Generator):
    """``best`` with a ``share`` of users switched, gains and losses balanced so that the
    true difference (switched minus best) ends just at or below 0."""
    n, n_arms = truth.revenue.shape
    users = torch.arange(n)
    alternative = (best + torch.randint(1, n_arms, (n,), generator=generator)) % n_arms
    change = truth.revenue[users, alternative] - truth.revenue[users, best]
    gains = [int(i) for i in torch.randperm(n, generator=generator) if change[i] > 0]
    losses = [int(i) for i in torch.randperm(n, generator=generator) if change[i] <= 0]
    switched, total = [], 0.0
    while len(switched) < share * n and gains and losses:
        user = gains.pop() if total <= 0 else losses.pop()
        switched.append(user)
        total += float(change[user])
    while total > 0 and losses:  # end at or below zero: A is truly no better than B
        user = losses.pop()
        switched.append(user)
        total += float(change[user])
    policy = best.clone()
    index = torch.tensor(switched)
    policy[index] = alternative[index]
    return policy


def agreeing(best: torch.Tensor, share: float, n_arms: int, generator: torch.Generator):
    """``best`` with a random (1 - ``share``) of users sent to a random other arm."""
    n = best.shape[0]
    changed = torch.rand(n, generator=generator) >= share
    shift = torch.randint(1, n_arms, (n,), generator=generator)
    return torch.where(changed, (best + shift) % n_arms, best)


def replication(seed: int, n_rct: int) -> dict[str, Any]:
    dataset = simulate(SimulatorConfig(n_obs=1, n_rct=n_rct, seed=SEED_OFFSET + seed))
    data: LoggedData = dataset.logged(RCT_TEST)
    truth = dataset.truth_for(RCT_TEST)
    assert truth is not None
    budget = float(dataset.meta.extra["default_budget"])
    generator = torch.Generator().manual_seed(seed)
    best = solve_mckp(truth.revenue, truth.cost, budget).treatment
    value_b = truth.policy_value(best)[0]
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
        "null": (balanced(best, truth, NULL_SWITCHED, generator), best)
    }
    for gain in GAINS:
        reference = degraded(best, truth, gain / (1 + gain) * value_b, generator)
        pairs[f"gain {gain:.1%}"] = (best, reference)
    for share in AGREEMENTS:
        pairs[f"agree {share:.0%}"] = (agreeing(best, share, data.n_treatments, generator), best)
    direct = crossfit_outcomes(data, seed=seed)
    out: dict[str, Any] = {"n_users": len(data), "budget": budget, "pairs": {}, "spend": {}}
    for estimator in ESTIMATORS:
        for name, (policy_a, policy_b) in pairs.items():
            result = compare_policies(
                data,
                policy_a,
                policy_b,
                estimator,
                direct if estimator == "dr" else None,
                truth=truth,
                alpha=ALPHA,
            )
            out["pairs"][f"{estimator}|{name}"] = {
                "difference": result.difference,
                "true_difference": result.true_difference,
                "relative_true_difference": result.true_difference
                / truth.policy_value(policy_b)[0],
                "ci_low": result.ci_low,
                "ci_high": result.ci_high,
                "lower_bound": result.lower_bound,
                "std_error": result.std_error,
                "unpaired_std_error": result.unpaired_std_error,
                "agreement": result.agreement,
            }
        spend = make_estimator(estimator, direct).estimate(data, best, "cost")
        out["spend"][estimator] = {
            "estimate": spend.value,
            "std_error": spend.std_error,
            "true": truth.policy_value(best)[1],
        }
    return out


def summarise(reps: list[dict[str, Any]]) -> dict[str, Any]:
    z = NormalDist().inv_cdf(1 - ALPHA) + NormalDist().inv_cdf(POWER)
    n_users = reps[0]["n_users"]
    summary: dict[str, Any] = {"coverage": {}, "false_promotion": {}, "power": {}, "width": {}}
    summary["spend_check_pass"] = {}
    for estimator in ESTIMATORS:

        def rows(name: str, e: str = estimator) -> list[dict[str, float]]:
            return [r["pairs"][f"{e}|{name}"] for r in reps]

        names = ["null", *(f"gain {g:.1%}" for g in GAINS)]
        summary["coverage"][estimator] = {
            name: statistics.fmean(
                r["ci_low"] <= r["true_difference"] <= r["ci_high"] for r in rows(name)
            )
            for name in names
        }
        null = rows("null")
        summary["false_promotion"][estimator] = {
            "rate": statistics.fmean(r["lower_bound"] > 0 for r in null),
            "mean_true_difference": statistics.fmean(r["true_difference"] for r in null),
            "mean_agreement": statistics.fmean(r["agreement"] for r in null),
        }
        power = {}
        for gain in GAINS:
            gain_rows = rows(f"gain {gain:.1%}")
            mean_se = statistics.fmean(r["std_error"] for r in gain_rows)
            mean_difference = statistics.fmean(r["true_difference"] for r in gain_rows)
            power[f"{gain:.1%}"] = {
                "promotion_rate": statistics.fmean(r["lower_bound"] > 0 for r in gain_rows),
                "mean_true_difference": mean_difference,
                "mean_agreement": statistics.fmean(r["agreement"] for r in gain_rows),
                "mean_std_error": mean_se,
                "users_for_80pct_power": math.ceil(n_users * (z * mean_se / mean_difference) ** 2),
            }
        summary["power"][estimator] = power
        summary["width"][estimator] = {
            f"{share:.0%}": {
                "agreement": statistics.fmean(r["agreement"] for r in rows(f"agree {share:.0%}")),
                "paired_over_unpaired": statistics.fmean(
                    r["std_error"] / r["unpaired_std_error"] for r in rows(f"agree {share:.0%}")
                ),
                "ipw_theory": math.sqrt(2 * (1 - share)),
            }
            for share in AGREEMENTS
        }
        z_one = NormalDist().inv_cdf(1 - ALPHA)
        spend = [r["spend"][estimator] for r in reps]
        summary["spend_check_pass"][estimator] = {
            f"{tolerance:.0%}": statistics.fmean(
                s["estimate"] + z_one * s["std_error"] <= r["budget"] * (1 + tolerance)
                for s, r in zip(spend, reps, strict=True)
            )
            for tolerance in TOLERANCES
        } | {
            "mean_true_spend_over_budget": statistics.fmean(
                s["true"] / r["budget"] - 1 for s, r in zip(spend, reps, strict=True)
            ),
            "mean_std_error_over_budget": statistics.fmean(
                s["std_error"] / r["budget"] for s, r in zip(spend, reps, strict=True)
            ),
        }
    return summary


def tables(summary: dict[str, Any], n_reps: int, n_users: int) -> str:
    lines = [f"{n_reps} replications, {n_users} evaluated users each, alpha {ALPHA}", ""]
    lines.append("| estimator | coverage: null | 0.5% | 1% | 2% | 3% | false promotion (null) |")
    lines.append("|---|---|---|---|---|---|---|")
    for e in ESTIMATORS:
        cov = summary["coverage"][e]
        lines.append(
            f"| {e} | "
            + " | ".join(f"{v:.3f}" for v in cov.values())
            + f" | {summary['false_promotion'][e]['rate']:.3f} |"
        )
    lines += ["", "| estimator | true gain | promotion rate | mean se | users for 80% power |"]
    lines.append("|---|---|---|---|---|")
    for e in ESTIMATORS:
        for gain, row in summary["power"][e].items():
            lines.append(
                f"| {e} | {gain} | {row['promotion_rate']:.3f} | {row['mean_std_error']:.4f} "
                f"| {row['users_for_80pct_power']:,} |"
            )
    lines += ["", "| estimator | agreement | paired / unpaired width | sqrt(2(1-agreement)) |"]
    lines.append("|---|---|---|---|")
    for e in ESTIMATORS:
        for row in summary["width"][e].values():
            lines.append(
                f"| {e} | {row['agreement']:.2f} | {row['paired_over_unpaired']:.3f} "
                f"| {row['ipw_theory']:.3f} |"
            )
    lines += [
        "",
        "| estimator | spend check passes at tolerance 1% | 5% | 10% | spend se / budget |",
    ]
    lines.append("|---|---|---|---|---|")
    for e in ESTIMATORS:
        s = summary["spend_check_pass"][e]
        lines.append(
            f"| {e} | {s['1%']:.3f} | {s['5%']:.3f} | {s['10%']:.3f} "
            f"| {s['mean_std_error_over_budget']:.2%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replications", type=int, default=500)
    parser.add_argument("--n-rct", type=int, default=40_000, help="all RCT splits; test = 30%%")
    parser.add_argument("--quick", action="store_true", help="200 replications")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    replications = 200 if args.quick else args.replications
    torch.set_num_threads(1)
    started = time.perf_counter()
    reps = []
    for seed in range(replications):
        reps.append(replication(seed, args.n_rct))
        if (seed + 1) % 20 == 0:
            print(f"  {seed + 1}/{replications} replications", file=sys.stderr, flush=True)
    summary = summarise(reps)
    text = tables(summary, replications, reps[0]["n_users"])
    print(text)
    out = args.out or RESULTS_DIR / ("gate-quick.json" if args.quick else "gate.json")
    write_json(
        out,
        {
            "replications": replications,
            "n_rct": args.n_rct,
            "n_users": reps[0]["n_users"],
            "alpha": ALPHA,
            "summary": summary,
            "seconds": time.perf_counter() - started,
            "machine": f"{platform.machine()} {platform.processor()}, 1 torch thread",
            "command": " ".join(sys.argv),
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
