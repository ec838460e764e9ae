"""Methods comparison on the default simulator: every learner, several seeds, EOM beside truth.

For each seed the default dataset is simulated (by default the data seed follows the
training seed, so the spread over seeds includes the sampling noise of the small RCT,
which is what decides whether one method beats another in practice; ``--data-seed``
fixes the data instead and leaves only the training noise). Every method is trained
with params.yaml's ``train:`` settings; the dfcl-* methods share one tsm-rct warm start
per seed (exactly what ``train_model`` would train for each of them). ``tsm-rct-ft`` is
a control: the same warm start fine-tuned by the factual MSE alone, with the decision
methods' batch size, learning rate and epochs, so it separates the decision loss from
the extra epochs.

Scored on rct_test at the dataset's default budget (mean cost per user):
- EOM: IPW revenue of the Lagrangian policy whose IPW cost meets the budget, 95% CLT
  interval, its lambda, and the true revenue/cost of that same policy;
- deployed: ``solve_mckp`` on the predicted revenue/cost (what ships without spend
  calibration), scored with the truth; its true cost may exceed the budget when costs are
  under-predicted;
- calibrated: the Lagrangian policy at the lambda calibrated on rct_val's doubly robust
  spend (``bidfcl.deployment``; what ships with ``calibrate_spend``), scored with the truth;
- lambda from rct_train: the Lagrangian policy at the lambda* that training re-solves on
  rct_train predictions, applied to rct_test users (truth);
- ranking: the true revenue of the model's Lagrangian policy whose *true* cost meets the
  budget, i.e. the quality of the scores with cost calibration taken out (n/a when no
  lambda gets there: the model ranks a coupon as some users' cheapest arm);
- oracle: ``solve_mckp`` on the true revenue/cost, the ceiling.
Values are also normalised by tsm-rct on the same seed, and each method's per-seed
differences to tsm-rct get a paired t-test.

    python benchmarks/methods.py --quick          # tiny smoke run, < 1 min
    python benchmarks/methods.py --seeds 0 1 2    # writes benchmarks/results/methods.{json,md}
    python benchmarks/methods.py --set tau=0.1 --methods tsm-rct dfcl-ppl --out results/x
    python benchmarks/methods.py --merge a.json b.json   # one report from parallel seed runs
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from scipy import stats

from bidfcl.allocation import lagrangian_choice, solve_mckp
from bidfcl.contract import RCT_TEST, RCT_TRAIN, Dataset, LoggedData, Truth
from bidfcl.deployment import Calibration
from bidfcl.evaluation import expected_outcome_metric
from bidfcl.io import atomic_write, write_json
from bidfcl.methods import METHOD_SPECS, METHODS, train_model
from bidfcl.model import UpliftModel
from bidfcl.params import load_params
from bidfcl.simulate import SimulatorConfig, simulate
from bidfcl.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
BASELINE = "tsm-rct"
FINE_TUNE_CONTROL = "tsm-rct-ft"
ALL_METHODS: tuple[str, ...] = (*METHODS, FINE_TUNE_CONTROL)
QUICK_SIMULATOR = {"n_obs": 20_000, "n_rct": 8_000}
QUICK_TRAIN = {"max_epochs": 2, "warm_start_epochs": 1, "propensity_steps": 20}
# Bisection for the lambda whose policy meets the budget in true cost (the "ranking" value).
RANKING_BRACKET_GROWTH = 4.0
RANKING_MAX_LAMBDA = 1e9
RANKING_BISECTION_STEPS = 50


@dataclass(frozen=True)
class MethodScore:
    """One trained model scored on rct_test (per user means; truth from the simulator)."""

    method: str
    seed: int
    data_seed: int
    eom: float
    eom_ci_low: float
    eom_ci_high: float
    eom_cost: float
    eom_lambda: float
    eom_true_revenue: float
    eom_true_cost: float
    eom_dr: float
    deployed_true_revenue: float
    deployed_true_cost: float
    deployed_over_budget: bool
    deployed_lambda: float
    calibrated_lambda: float  # NaN when the model carries no spend calibration
    calibrated_true_revenue: float
    calibrated_true_cost: float
    train_lambda: float
    train_lambda_true_revenue: float
    train_lambda_true_cost: float
    ranking_true_revenue: float
    seconds_per_epoch: float
    epochs_run: int
    best_epoch: int
    fit_seconds: float


def true_revenue_at_true_budget(
    revenue_pred: torch.Tensor, cost_pred: torch.Tensor, truth: Truth, budget: float, lam: float
) -> float:
    """True revenue of the predictions' Lagrangian policy at the lambda where its *true* cost
    meets the budget (bisection, from the deployed lambda outwards): the quality of the
    scores once cost calibration is perfect. NaN if no lambda up to 1e9 fits."""

    def true_value(multiplier: float) -> tuple[float, float]:
        return truth.policy_value(lagrangian_choice(revenue_pred, cost_pred, multiplier))

    if true_value(0.0)[1] <= budget:
        return true_value(0.0)[0]
    low, high = 0.0, lam if math.isfinite(lam) and lam > 0 else 1.0
    while true_value(high)[1] > budget:
        low, high = high, high * RANKING_BRACKET_GROWTH
        if high > RANKING_MAX_LAMBDA:
            return math.nan
    for _ in range(RANKING_BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if true_value(middle)[1] > budget else (low, middle)
    return true_value(high)[0]


def score_model(
    model: UpliftModel,
    method: str,
    seed: int,
    data_seed: int,
    test: LoggedData,
    truth: Truth,
    train_x: torch.Tensor,
    budget: float,
) -> MethodScore:
    """Every number of the comparison for one model (see the module docstring)."""
    revenue_pred, cost_pred = model.predict(test.x)
    eom = expected_outcome_metric(test, revenue_pred, cost_pred, budget, "ipw", truth=truth)
    eom_dr = expected_outcome_metric(test, revenue_pred, cost_pred, budget, "dr")
    deployed = solve_mckp(revenue_pred, cost_pred, budget)
    deployed_revenue, deployed_cost = truth.policy_value(deployed.treatment)
    calibration = Calibration.of(model)
    calibrated_lambda, calibrated = math.nan, (math.nan, math.nan)
    if calibration is not None:
        calibrated_lambda = calibration.lam
        calibrated = truth.policy_value(
            lagrangian_choice(revenue_pred, cost_pred, calibrated_lambda)
        )
    train_lambda = solve_mckp(*model.predict(train_x), budget).lam
    at_train_lambda = truth.policy_value(lagrangian_choice(revenue_pred, cost_pred, train_lambda))
    meta = model.metadata
    return MethodScore(
        method=method,
        seed=seed,
        data_seed=data_seed,
        eom=eom.eom.value,
        eom_ci_low=eom.eom.ci_low,
        eom_ci_high=eom.eom.ci_high,
        eom_cost=eom.cost.value,
        eom_lambda=eom.lam,
        eom_true_revenue=float(eom.true_revenue),
        eom_true_cost=float(eom.true_cost),
        eom_dr=eom_dr.eom.value,
        deployed_true_revenue=deployed_revenue,
        deployed_true_cost=deployed_cost,
        deployed_over_budget=deployed_cost > budget,
        deployed_lambda=deployed.lam,
        calibrated_lambda=calibrated_lambda,
        calibrated_true_revenue=calibrated[0],
        calibrated_true_cost=calibrated[1],
        train_lambda=train_lambda,
        train_lambda_true_revenue=at_train_lambda[0],
        train_lambda_true_cost=at_train_lambda[1],
        ranking_true_revenue=true_revenue_at_true_budget(
            revenue_pred, cost_pred, truth, budget, deployed.lam
        ),
        seconds_per_epoch=meta["seconds_per_epoch"],
        epochs_run=meta["epochs_run"],
        best_epoch=meta["best_epoch"],
        fit_seconds=meta["fit_seconds"],
    )


def train_one(
    dataset: Dataset, config: TrainConfig, method: str, warm_start: UpliftModel | None
) -> UpliftModel:
    """Train ``method``; decision methods and the fine-tune control start from ``warm_start``."""
    if method == FINE_TUNE_CONTROL:
        control = replace(
            config,
            method=BASELINE,
            batch_size=config.decision_batch_size,
            lr=config.decision_lr,
        )
        return train_model(dataset, control, progress=False, warm_start=warm_start)
    spec = METHOD_SPECS[method]
    start = warm_start if spec.warm_start == BASELINE else None
    return train_model(dataset, replace(config, method=method), progress=False, warm_start=start)


def run_seed(
    seed: int,
    data_seed: int,
    methods: list[str],
    config: TrainConfig,
    simulator: dict[str, Any],
) -> tuple[list[MethodScore], dict[str, Any]]:
    """Simulate one dataset, train and score every method on it; also the oracle's values."""
    dataset = simulate(SimulatorConfig(seed=data_seed, **simulator))
    budget = dataset.meta.budget_or_default(config.budget)
    test, truth = dataset.logged(RCT_TEST), dataset.truth_for(RCT_TEST)
    train_x = dataset.logged(RCT_TRAIN).x
    oracle = solve_mckp(truth.revenue, truth.cost, budget)
    seeded = replace(config, seed=seed)
    warm_start = None
    if any(m == FINE_TUNE_CONTROL or METHOD_SPECS[m].warm_start for m in methods):
        warm_config = replace(seeded, method=BASELINE, max_epochs=config.warm_start_epochs)
        warm_start = train_model(dataset, warm_config, progress=False)
    scores = []
    for method in methods:
        model = train_one(dataset, seeded, method, warm_start)
        scores.append(score_model(model, method, seed, data_seed, test, truth, train_x, budget))
        print(f"  seed {seed} {method:11s} true deployed {scores[-1].deployed_true_revenue:.3f}")
    context = {
        "seed": seed,
        "data_seed": data_seed,
        "budget": budget,
        "n_test": len(test),
        "oracle_true_revenue": oracle.mean_revenue,
        "oracle_true_cost": oracle.mean_cost,
        "oracle_lambda": oracle.lam,
        "warm_start": None
        if warm_start is None
        else {
            key: warm_start.metadata[key]
            for key in ("seconds_per_epoch", "epochs_run", "best_epoch")
        },
    }
    return scores, context


SUMMARISED = (
    "eom",
    "eom_ci_low",
    "eom_ci_high",
    "eom_true_revenue",
    "eom_true_cost",
    "eom_dr",
    "deployed_true_revenue",
    "deployed_true_cost",
    "calibrated_true_revenue",
    "calibrated_true_cost",
    "train_lambda_true_revenue",
    "ranking_true_revenue",
    "eom_lambda",
    "train_lambda",
    "seconds_per_epoch",
    "epochs_run",
    "best_epoch",
)
COMPARED = ("eom", "eom_true_revenue", "deployed_true_revenue", "ranking_true_revenue")


def mean_sd(values: list[float]) -> dict[str, float]:
    """Mean and sample sd over the seeds with a value (NaN = undefined on that seed, e.g. no
    ranking value); ``n`` counts them. The sd is NaN below two values or with an inf lambda."""
    array = np.asarray(values, dtype=np.float64)
    array = array[~np.isnan(array)]
    if len(array) == 0:
        return {"mean": math.nan, "sd": math.nan, "n": 0}
    sd = float(array.std(ddof=1)) if len(array) > 1 and np.isfinite(array).all() else math.nan
    return {"mean": float(array.mean()), "sd": sd, "n": len(array)}


def paired_vs_baseline(values: list[float], baseline: list[float]) -> dict[str, float]:
    """Mean and sd of the per-seed differences, ratio to the baseline and a paired t-test."""
    differences = [v - b for v, b in zip(values, baseline, strict=True)]
    ratios = [v / b for v, b in zip(values, baseline, strict=True)]
    p_value = math.nan
    if len(differences) > 1 and any(d != differences[0] for d in differences):
        p_value = float(stats.ttest_rel(values, baseline).pvalue)
    return {
        "difference": mean_sd(differences),
        "normalised": mean_sd(ratios),
        "wins": sum(d > 0 for d in differences),
        "p_value": p_value,
    }


def summarise(scores: list[MethodScore], methods: list[str]) -> dict[str, Any]:
    """Per method: mean and sd over seeds of every number, and the paired tsm-rct comparison."""
    by_method = {
        m: sorted((s for s in scores if s.method == m), key=lambda s: s.seed) for m in methods
    }
    summary: dict[str, Any] = {}
    for method, rows in by_method.items():
        entry: dict[str, Any] = {
            key: mean_sd([float(getattr(r, key)) for r in rows]) for key in SUMMARISED
        }
        entry["deployed_over_budget_seeds"] = sum(r.deployed_over_budget for r in rows)
        if BASELINE in by_method:
            baseline = by_method[BASELINE]
            entry["vs_tsm_rct"] = {
                key: paired_vs_baseline(
                    [getattr(r, key) for r in rows], [getattr(b, key) for b in baseline]
                )
                for key in COMPARED
            }
        summary[method] = entry
    return summary


def _pm(stat: dict[str, float], digits: int = 2, n_seeds: int | None = None) -> str:
    """``mean ± sd``; with ``n_seeds``, says how many seeds had a value when some did not."""
    text = f"{stat['mean']:.{digits}f}"
    if not math.isnan(stat["sd"]):
        text += f" ± {stat['sd']:.{digits}f}"
    if n_seeds is not None and stat["n"] < n_seeds:
        text = "n/a" if stat["n"] == 0 else f"{text} ({stat['n']} of {n_seeds} seeds)"
    return text


def markdown_table(summary: dict[str, Any], contexts: list[dict[str, Any]]) -> str:
    """The results table (means ± sd over seeds) with the oracle ceiling as the last row."""
    header = (
        "| method | EOM (IPW) | 95% CI | true rev, EOM policy | true rev, deployed "
        "| true cost, deployed | true rev, ranking | norm EOM | norm deployed "
        "| Δ deployed vs tsm-rct (p) | s/epoch | epochs (best) |"
    )
    lines = [header, "|" + "---|" * 12]
    for method, s in summary.items():
        versus = s.get("vs_tsm_rct", {})
        deployed_diff = versus.get("deployed_true_revenue")
        diff_text = "–"
        if deployed_diff is not None and method != BASELINE:
            diff_text = (
                f"{_pm(deployed_diff['difference'], 3)} (p={deployed_diff['p_value']:.2f}, "
                f"wins {deployed_diff['wins']})"
            )
        over = s["deployed_over_budget_seeds"]
        cost_text = _pm(s["deployed_true_cost"]) + (f" ({over} over)" if over else "")
        lines.append(
            f"| {method} | {_pm(s['eom'])} | [{s['eom_ci_low']['mean']:.2f}, "
            f"{s['eom_ci_high']['mean']:.2f}] | {_pm(s['eom_true_revenue'])} "
            f"| {_pm(s['deployed_true_revenue'])} | {cost_text} "
            f"| {_pm(s['ranking_true_revenue'], n_seeds=len(contexts))} "
            f"| {_pm(versus['eom']['normalised'], 4) if versus else '–'} "
            f"| {_pm(versus['deployed_true_revenue']['normalised'], 4) if versus else '–'} "
            f"| {diff_text} | {_pm(s['seconds_per_epoch'])} "
            f"| {s['epochs_run']['mean']:.1f} ({s['best_epoch']['mean']:.1f}) |"
        )
    oracle = mean_sd([c["oracle_true_revenue"] for c in contexts])
    oracle_cost = mean_sd([c["oracle_true_cost"] for c in contexts])
    dashes = " – |"
    lines.append(f"| oracle (truth) |{dashes * 3} {_pm(oracle)} | {_pm(oracle_cost)} |{dashes * 6}")
    return "\n".join(lines)


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings to a dict, values parsed as YAML (numbers, lists, null)."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {pair!r}")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


def train_overrides(settings: dict[str, Any]) -> dict[str, Any]:
    """Train settings as dotted params overrides (``train.key``) for ``load_params``."""
    return {f"train.{key}": value for key, value in settings.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(ALL_METHODS))
    parser.add_argument(
        "--data-seed",
        type=int,
        default=None,
        help="fix the simulator seed for every run (default: data seed = training seed)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny data and 2 epochs (< 1 min)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="train setting overrides"
    )
    parser.add_argument(
        "--sim", nargs="*", default=[], metavar="KEY=VALUE", help="simulator overrides"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output path without suffix (default benchmarks/results/methods[-quick])",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="combine the runs of earlier outputs (e.g. seeds run in parallel) into one report",
    )
    args = parser.parse_args(argv)
    if args.merge:
        out = args.out or RESULTS_DIR / "methods"
        write_report(*merge_runs(args.merge), out)
        return

    train_settings = parse_assignments(args.set)
    simulator = parse_assignments(args.sim)
    if args.quick:
        train_settings = {**QUICK_TRAIN, **train_settings}
        simulator = {**QUICK_SIMULATOR, **simulator}
    config = load_params(args.params, train_overrides(train_settings)).train.config
    methods = [BASELINE, *(m for m in args.methods if m != BASELINE)]
    out = args.out or RESULTS_DIR / ("methods-quick" if args.quick else "methods")

    started = time.perf_counter()
    scores: list[MethodScore] = []
    contexts = []
    for seed in args.seeds:
        data_seed = seed if args.data_seed is None else args.data_seed
        seed_scores, context = run_seed(seed, data_seed, methods, config, simulator)
        scores.extend(seed_scores)
        contexts.append(context)

    settings = {
        "seeds": args.seeds,
        "data_seed": args.data_seed if args.data_seed is not None else "same as seed",
        "simulator": asdict(SimulatorConfig(**simulator)),
        "train": config.to_dict(),
        "overrides": {"train": train_settings, "simulator": simulator},
        "torch_threads": config.num_threads,
        "code_version": code_version(),
        "command": " ".join(sys.argv),
        "wall_seconds": time.perf_counter() - started,
    }
    write_report(scores, contexts, methods, settings, out)


def code_version() -> str:
    """The commit the code ran from, marked ``-dirty`` if tracked files had changes (runs
    merged into one report must share it)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")


def merge_runs(
    paths: list[Path],
) -> tuple[list[MethodScore], list[dict[str, Any]], list[str], dict[str, Any]]:
    """Scores, seed contexts, methods and settings of several outputs of this script, which
    must share their settings apart from the seeds (a seed may appear only once)."""
    payloads = [json.loads(path.read_text()) for path in paths]
    comparable = [
        {k: v for k, v in p["settings"].items() if k not in ("seeds", "command", "wall_seconds")}
        for p in payloads
    ]
    if any(c != comparable[0] for c in comparable[1:]):
        raise SystemExit(f"{paths}: the runs differ in more than their seeds")
    seeds = [seed for p in payloads for seed in p["settings"]["seeds"]]
    if len(set(seeds)) < len(seeds):
        raise SystemExit(f"{paths}: a seed appears in more than one run")
    scores = [
        MethodScore(**{k: math.nan if v is None else v for k, v in run.items()})
        for p in payloads
        for run in p["runs"]
    ]
    methods = list(dict.fromkeys(run.method for run in scores))
    settings = {
        **payloads[0]["settings"],
        "seeds": seeds,
        "command": [p["settings"]["command"] for p in payloads],
        "wall_seconds": sum(p["settings"]["wall_seconds"] for p in payloads),
        "merged_from": [str(path) for path in paths],
    }
    return scores, [c for p in payloads for c in p["seeds"]], methods, settings


def write_report(
    scores: list[MethodScore],
    contexts: list[dict[str, Any]],
    methods: list[str],
    settings: dict[str, Any],
    out: Path,
) -> None:
    """Summarise the runs and write ``out``.json (everything) and ``out``.md (the table)."""
    summary = summarise(scores, methods)
    table = markdown_table(summary, contexts)
    payload = {
        "settings": settings,
        "seeds": contexts,
        "summary": summary,
        "runs": [asdict(s) for s in scores],
    }
    write_json(out.with_suffix(".json"), payload)
    budget = statistics.fmean(c["budget"] for c in contexts)
    notes = (
        f"Budget {budget:.3f} per user (midway between all-control and all-max cost); "
        f"seeds {settings['seeds']}, data seed {settings['data_seed']}; rct_test "
        f"{contexts[0]['n_test']} users; mean ± sd over seeds; p from a paired t-test "
        f"against tsm-rct. Total compute {settings['wall_seconds']:.0f} s. "
        "s/epoch is Lightning fit time per epoch (validation included, 1 torch thread, "
        "2-core CPU VM); dfcl-* and tsm-rct-ft epochs exclude their shared tsm-rct warm start"
        f" (up to {settings['train']['warm_start_epochs']} epochs). The deployed allocation is "
        "solve_mckp on predictions; 'over' counts seeds whose true cost exceeds the budget."
    )
    text = f"# Methods comparison\n\n{notes}\n\n{table}\n"
    atomic_write(out.with_suffix(".md"), lambda tmp: tmp.write_text(text))
    print(table)
    print(notes)


if __name__ == "__main__":
    main()
