"""Coverage study of the off-policy estimators on the simulator.

One fixed policy is evaluated on many independently simulated RCT samples. The policy is
the Lagrangian allocation of a noisy-truth "model" at the default budget: predictions are
the true expected outcomes times exp(noise * tanh(x W)) with W drawn once, so the model
(and the policy) is a fixed function of a user's features, and lambda is fixed once on a
large reference population (Lagrangian bisection of ``solve_mckp``) so that the policy's
mean predicted cost meets the budget.

Estimand (per replication): the mean over the evaluated rct_test users of the true
expected revenue (cost) of the arm the policy gives each of them, i.e. the policy value
conditional on the sampled users. IPW and DR are unbiased for it; their CLT standard
errors also carry the between-user spread, so they are slightly conservative for it and
exact for the population value, whose coverage is reported as well (computed on the
reference population). DR's direct part is the same noisy-truth predictions.

Run:  python benchmarks/ope_coverage.py [--replications 200] [--n-rct 40000] [--quick]
Writes benchmarks/results/ope_coverage.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bidfcl.allocation import lagrangian_choice, solve_mckp
from bidfcl.contract import COST, OBS, RCT_TEST, REVENUE, LoggedData, Truth
from bidfcl.evaluation import make_estimator
from bidfcl.io import write_json
from bidfcl.simulate import SimulatorConfig, simulate

RESULTS = Path(__file__).parent / "results" / "ope_coverage.json"
QUICK_RESULTS = RESULTS.with_name("ope_coverage_quick.json")
ESTIMATORS = ("ipw", "snipw", "dr")
OUTCOMES = (REVENUE, COST)
REFERENCE_SEED = 1_000_000
REFERENCE_USERS = 200_000
MODEL_SEED = 12_345
MIN_COVERAGE = 0.93


@dataclass(frozen=True)
class NoisyTruthModel:
    """Predictions = truth * exp(noise * tanh(x W)): a fixed, feature-driven model error."""

    revenue_weights: torch.Tensor  # (d, M)
    cost_weights: torch.Tensor  # (d, M)
    noise: float

    @classmethod
    def draw(cls, n_features: int, n_arms: int, noise: float) -> NoisyTruthModel:
        g = torch.Generator().manual_seed(MODEL_SEED)
        scale = 1.0 / np.sqrt(n_features)
        weights = torch.randn(2, n_features, n_arms, generator=g, dtype=torch.float64) * scale
        return cls(weights[0], weights[1], noise)

    def predict(self, data: LoggedData, truth: Truth) -> tuple[torch.Tensor, torch.Tensor]:
        x = data.x.to(torch.float64)
        revenue = truth.revenue * torch.exp(self.noise * torch.tanh(x @ self.revenue_weights))
        cost = truth.cost * torch.exp(self.noise * torch.tanh(x @ self.cost_weights))
        return revenue, cost


def simulated_users(config: SimulatorConfig, table: str) -> tuple[LoggedData, Truth, float]:
    """One simulated table, its ground truth and the dataset's default budget."""
    dataset = simulate(config)
    truth = dataset.truth_for(table)
    if truth is None:
        raise RuntimeError("the simulator returned no ground truth")
    return dataset.logged(table), truth, float(dataset.meta.extra["default_budget"])


def run(replications: int, n_rct: int, noise: float, n_bootstrap: int) -> dict:
    """Evaluate the fixed policy on ``replications`` fresh RCT samples; return the summary."""
    started = time.perf_counter()
    # The reference users only need features and truth, so the large OBS table serves.
    reference, reference_truth, budget = simulated_users(
        SimulatorConfig(n_obs=REFERENCE_USERS, n_rct=10, seed=REFERENCE_SEED), OBS
    )
    model = NoisyTruthModel.draw(reference.x.shape[1], reference.n_treatments, noise)
    ref_revenue, ref_cost = model.predict(reference, reference_truth)
    lam = solve_mckp(ref_revenue, ref_cost, budget, method="bisection").lam
    ref_policy = lagrangian_choice(ref_revenue, ref_cost, lam)
    population = dict(zip(OUTCOMES, reference_truth.policy_value(ref_policy), strict=True))

    intervals = ("clt", "bootstrap") if n_bootstrap else ("clt",)
    keys = [(e, i, o) for e in ESTIMATORS for i in intervals for o in OUTCOMES]
    records: dict[tuple[str, str, str], list[tuple[float, float, float, float]]] = {
        k: [] for k in keys
    }
    n_evaluated = 0
    for rep in range(replications):
        data, truth, _ = simulated_users(SimulatorConfig(n_obs=1, n_rct=n_rct, seed=rep), RCT_TEST)
        n_evaluated = len(data)
        revenue_pred, cost_pred = model.predict(data, truth)
        policy = lagrangian_choice(revenue_pred, cost_pred, lam)
        target = dict(zip(OUTCOMES, truth.policy_value(policy), strict=True))
        predictions = {REVENUE: revenue_pred, COST: cost_pred}
        for name, interval, outcome in keys:
            est = make_estimator(name).estimate(
                data,
                policy,
                outcome,
                predictions[outcome],
                interval=interval,
                n_bootstrap=n_bootstrap,
                seed=rep,
            )
            records[name, interval, outcome].append(
                (est.value, est.ci_low, est.ci_high, target[outcome])
            )

    rows = [
        summarise(name, interval, outcome, records[name, interval, outcome], population)
        for name, interval, outcome in keys
    ]
    return {
        "config": {
            "replications": replications,
            "n_rct": n_rct,
            "n_evaluated_users": n_evaluated,
            "table": RCT_TEST,
            "prediction_noise": noise,
            "n_bootstrap": n_bootstrap,
            "alpha": 0.05,
        },
        "estimand": (
            "mean over the evaluated rct_test users of the true expected outcome of the "
            "policy's arm (conditional on the users); population value from "
            f"{REFERENCE_USERS} reference users"
        ),
        "policy": {"lambda": lam, "budget": budget, "population_value": population},
        "rows": rows,
        "checks": checks(rows),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "wall_seconds": round(time.perf_counter() - started, 1),
        },
    }


def summarise(
    name: str,
    interval: str,
    outcome: str,
    record: list[tuple[float, float, float, float]],
    population: dict[str, float],
) -> dict:
    value, low, high, target = np.asarray(record).T
    error = value - target
    return {
        "estimator": name,
        "interval": interval,
        "outcome": outcome,
        "coverage": float(np.mean((low <= target) & (target <= high))),
        "coverage_population": float(
            np.mean((low <= population[outcome]) & (population[outcome] <= high))
        ),
        "mean_width": float(np.mean(high - low)),
        "bias": float(np.mean(error)),
        "bias_std_error": float(np.std(error, ddof=1) / np.sqrt(len(error))),
        "rmse": float(np.sqrt(np.mean(error**2))),
    }


def checks(rows: list[dict]) -> dict:
    """The issue's acceptance numbers: IPW/DR CLT coverage >= 93%, DR narrower than IPW."""
    clt = {(r["estimator"], r["outcome"]): r for r in rows if r["interval"] == "clt"}
    result = {}
    for outcome in OUTCOMES:
        ipw, dr = clt["ipw", outcome], clt["dr", outcome]
        result[outcome] = {
            "ipw_coverage_ok": ipw["coverage"] >= MIN_COVERAGE,
            "dr_coverage_ok": dr["coverage"] >= MIN_COVERAGE,
            "dr_narrower_than_ipw": dr["mean_width"] < ipw["mean_width"],
            "dr_width_ratio": dr["mean_width"] / ipw["mean_width"],
        }
    return result


def print_table(summary: dict) -> None:
    cfg, policy = summary["config"], summary["policy"]
    print(
        f"{cfg['replications']} replications, {cfg['n_evaluated_users']} evaluated users each, "
        f"lambda={policy['lambda']:.4f} at budget {policy['budget']:.3f}"
    )
    header = f"{'estimator':<9} {'interval':<9} {'outcome':<7} {'cover':>6} {'cover_pop':>9} "
    print(header + f"{'width':>8} {'bias':>8} {'bias_se':>8} {'rmse':>8}")
    for r in summary["rows"]:
        print(
            f"{r['estimator']:<9} {r['interval']:<9} {r['outcome']:<7} {r['coverage']:>6.3f} "
            f"{r['coverage_population']:>9.3f} {r['mean_width']:>8.4f} {r['bias']:>8.4f} "
            f"{r['bias_std_error']:>8.4f} {r['rmse']:>8.4f}"
        )
    print("checks:", summary["checks"])
    print(f"wall time {summary['machine']['wall_seconds']} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replications", type=int, default=200)
    parser.add_argument(
        "--n-rct", type=int, default=40_000, help="simulator n_rct (30%% evaluated)"
    )
    parser.add_argument("--noise", type=float, default=0.3, help="log-scale prediction noise")
    parser.add_argument("--n-bootstrap", type=int, default=500, help="0 skips bootstrap intervals")
    parser.add_argument("--quick", action="store_true", help="10 small replications (< 1 min)")
    parser.add_argument(
        "--output", type=Path, help=f"default {RESULTS} ({QUICK_RESULTS.name} if quick)"
    )
    args = parser.parse_args()
    if args.quick:
        args.replications, args.n_rct, args.n_bootstrap = 10, 10_000, 200
    args.output = args.output or (QUICK_RESULTS if args.quick else RESULTS)
    summary = run(args.replications, args.n_rct, args.noise, args.n_bootstrap)
    write_json(args.output, summary)
    print_table(summary)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
