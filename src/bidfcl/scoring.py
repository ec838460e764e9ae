"""Use a trained model: score it on held-out RCT data, and allocate a budget over new users.

``evaluate_model`` is what the evaluate stage writes to ``metrics.json``: the EOM at the
budget with its interval, the estimated cost, the decision curve (budget-value curve for
M > 2 arms, AUCC for two arms) and, on simulated data, the true value and cost of the
very same policies beside the estimates. ``allocate_file`` streams a user table of any
size through the model, solves the budgeted allocation once over all users, and writes
``user_id, treatment``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bidfcl.allocation import AllocationResult, solve_mckp
from bidfcl.contract import (
    RCT_TEST,
    TREATMENT,
    USER_ID,
    DataContractError,
    Dataset,
    atomic_write,
    json_ready,
    load_dataset,
    write_json,
)
from bidfcl.evaluation import aucc, budget_value_curve, curve_area, expected_outcome_metric
from bidfcl.model import UpliftModel, check_feature_columns

CURVE_BUDGET_SCALES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
"""Budget-value curve grid, as multiples of the evaluated budget (area = mean height)."""


def model_metrics(
    model: UpliftModel,
    dataset: Dataset,
    budget: float,
    table: str = RCT_TEST,
    estimator: str = "ipw",
) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """Metrics of ``model`` on one RCT table, plus the budget-value curve (None for M = 2).

    Two policies are scored: the EOM policy (lambda set so the *estimated* cost on this RCT
    sample meets the budget, the paper's procedure) and the deployable allocation (exact
    MCKP on the model's *predicted* costs, what ``bidfcl allocate`` would ship).
    """
    check_feature_columns(model.feature_columns, dataset.meta.feature_columns)
    data = dataset.logged(table, device=model.device)
    truth = dataset.truth_for(table, device=model.device)
    revenue_pred, cost_pred = model.predict(data.x)
    eom = expected_outcome_metric(data, revenue_pred, cost_pred, budget, estimator, truth)
    deployed = solve_mckp(revenue_pred, cost_pred, budget)
    metrics: dict[str, Any] = {
        "table": table,
        "estimator": estimator,
        "n_users": len(data),
        "budget": budget,
        "eom": eom.eom.value,
        "eom_ci_low": eom.eom.ci_low,
        "eom_ci_high": eom.eom.ci_high,
        "eom_std_error": eom.eom.std_error,
        "mean_cost": eom.cost.value,
        "cost_ci_low": eom.cost.ci_low,
        "cost_ci_high": eom.cost.ci_high,
        "lam": eom.lam,
        "budget_met": eom.budget_met,
        "deployed_lam": deployed.lam,
        "deployed_status": deployed.status,
        "deployed_predicted_cost": deployed.mean_cost,
    }
    if truth is not None:
        deployed_value, deployed_cost = truth.policy_value(deployed.treatment)
        oracle = solve_mckp(truth.revenue, truth.cost, budget)
        metrics |= {
            "true_value": eom.true_revenue,
            "true_cost": eom.true_cost,
            "deployed_true_value": deployed_value,
            "deployed_true_cost": deployed_cost,
            "oracle_value": oracle.mean_revenue,
        }
    curve = None
    if model.n_treatments == 2:
        metrics["aucc"] = aucc(data, revenue_pred, cost_pred)
    else:
        budgets = [budget * scale for scale in CURVE_BUDGET_SCALES]
        curve = budget_value_curve(data, revenue_pred, cost_pred, budgets, estimator, truth)
        metrics["budget_curve_area"] = curve_area(curve)
        if truth is not None:
            metrics["true_budget_curve_area"] = curve_area(curve, value="true_revenue")
    return json_ready(metrics), curve


def evaluate_model(
    model_dir: Path | str,
    data_dir: Path | str,
    out: Path | str,
    budget: float | None = None,
    table: str = RCT_TEST,
    estimator: str = "ipw",
    curve_out: Path | str | None = None,
) -> dict[str, Any]:
    """Evaluate a saved model on a dataset folder and write ``metrics.json`` (and the curve)."""
    dataset = load_dataset(data_dir, tables=(table,))
    model = UpliftModel.load(model_dir, expected_features=dataset.meta.feature_columns)
    metrics, curve = model_metrics(
        model, dataset, dataset.meta.budget_or_default(budget), table, estimator
    )
    metrics["method"] = model.metadata.get("method")
    if curve is not None and curve_out is not None:
        atomic_write(Path(curve_out), lambda tmp: curve.to_csv(tmp, index=False))
    write_json(Path(out), metrics)
    return metrics


def allocate_file(
    model_dir: Path | str,
    users: Path | str,
    budget: float,
    out: Path | str,
    chunk_rows: int = 1_000_000,
) -> AllocationResult:
    """Allocate ``budget`` (mean predicted cost per user) over every user of a parquet table.

    Features are read ``chunk_rows`` at a time, so only the (N, M) predictions of the whole
    table are held in memory (about 40 bytes per user for M = 5); the exact MCKP solver then
    picks one arm per user and the result is written atomically as ``user_id, treatment``.
    """
    model = UpliftModel.load(model_dir)
    source = pq.ParquetFile(users)
    columns = source.schema_arrow.names
    if USER_ID not in columns:
        raise DataContractError(f"{users}: column {USER_ID!r} is required (rule: required column)")
    # columns are selected by name, so only missing features matter, not their order
    check_feature_columns(model.feature_columns, [c for c in model.feature_columns if c in columns])
    user_ids, revenue, cost = [], [], []
    for batch in source.iter_batches(
        batch_size=chunk_rows, columns=[USER_ID, *model.feature_columns]
    ):
        frame = batch.to_pandas()
        x = torch.from_numpy(np.array(frame[model.feature_columns].to_numpy(np.float32), copy=True))
        if not torch.isfinite(x).all():
            bad = frame.columns[frame[model.feature_columns].isna().any()].tolist()
            raise DataContractError(f"{users}: null or non-finite values in feature(s) {bad}")
        rev, cst = model.predict(x)
        user_ids.append(frame[USER_ID].to_numpy(np.int64))
        revenue.append(rev)
        cost.append(cst)
    if not user_ids:
        raise DataContractError(f"{users}: the table has no rows (rule: non-empty table)")
    result = solve_mckp(torch.cat(revenue), torch.cat(cost), float(budget))
    ids = np.concatenate(user_ids)
    arms = result.treatment.cpu().numpy()

    def write(tmp: Path) -> None:
        schema = pa.schema([(USER_ID, pa.int64()), (TREATMENT, pa.int64())])
        with pq.ParquetWriter(tmp, schema) as writer:
            for start in range(0, len(ids), chunk_rows):
                stop = start + chunk_rows
                writer.write_table(
                    pa.table({USER_ID: ids[start:stop], TREATMENT: arms[start:stop]}, schema)
                )

    atomic_write(Path(out), write)
    return result
