"""A readable summary of a dataset folder: sizes, arms, naive outcome means, true policy values."""

from __future__ import annotations

from typing import Any

import torch

from bidfcl.allocation import solve_mckp
from bidfcl.contract import COST, REVENUE, TABLES, TREATMENT, Dataset, Truth


def summarize_dataset(dataset: Dataset) -> dict[str, Any]:
    """Numbers a user checks before training: table sizes, arm mix, outcome means, truth."""
    meta = dataset.meta
    tables: dict[str, Any] = {}
    for name in TABLES:
        frame = dataset.table(name)
        arms = range(meta.n_treatments)
        by_arm = frame.groupby(TREATMENT)[[REVENUE, COST]].mean().reindex(arms)
        counts = frame[TREATMENT].value_counts().reindex(arms, fill_value=0)
        tables[name] = {
            "rows": len(frame),
            "arm_share": (counts / max(len(frame), 1)).round(4).tolist(),
            "mean_revenue_by_arm": by_arm[REVENUE].round(4).tolist(),
            "mean_cost_by_arm": by_arm[COST].round(4).tolist(),
        }
    summary: dict[str, Any] = {
        "source": meta.source,
        "n_treatments": meta.n_treatments,
        "treatment_names": meta.treatment_names,
        "n_features": len(meta.feature_columns),
        "tables": tables,
    }
    budget = meta.extra.get("default_budget")
    if budget is not None:
        summary["default_budget"] = float(budget)
    truth = dataset.truth_for("rct_test")
    if truth is not None:
        summary["truth_rct_test"] = _truth_summary(truth, budget)
    return summary


def _truth_summary(truth: Truth, budget: float | None) -> dict:
    """True value and cost of reference policies on the held-out users."""
    n, m = truth.revenue.shape
    out: dict[str, Any] = {}
    for label, arm in (("all_control", 0), ("all_max_arm", m - 1)):
        value, spend = truth.policy_value(torch.full((n,), arm, dtype=torch.long))
        out[label] = {"revenue": value, "cost": spend}
    if budget is not None:
        oracle = solve_mckp(truth.revenue, truth.cost, float(budget))
        out["oracle_at_default_budget"] = {
            "revenue": oracle.mean_revenue,
            "cost": oracle.mean_cost,
            "lam": oracle.lam,
        }
    return out


def render_summary(summary: dict[str, Any]) -> str:
    """Plain-text rendering for the terminal."""
    names = summary["treatment_names"]
    lines = [
        f"source: {summary['source']}",
        f"treatments ({summary['n_treatments']}): {', '.join(names)}; "
        f"features: {summary['n_features']}",
        "",
        f"{'table':<10} {'rows':>8}  arm share / mean revenue / mean cost per arm",
    ]
    for name, info in summary["tables"].items():
        lines.append(f"{name:<10} {info['rows']:>8}  share   {_fmt(info['arm_share'])}")
        lines.append(f"{'':<20}revenue {_fmt(info['mean_revenue_by_arm'])}")
        lines.append(f"{'':<20}cost    {_fmt(info['mean_cost_by_arm'])}")
    if "default_budget" in summary:
        lines += ["", f"default budget (mean cost per user): {summary['default_budget']:.4f}"]
    truth = summary.get("truth_rct_test")
    if truth:
        lines.append("true policy values on rct_test (per user):")
        for label, vals in truth.items():
            lines.append(f"  {label:<26} revenue {vals['revenue']:.4f}  cost {vals['cost']:.4f}")
    return "\n".join(lines)


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:8.4f}" for v in values)
