"""Use a trained model: score it on held-out RCT data, and allocate a budget over new users.

``evaluate_model`` is what the evaluate stage writes to ``metrics.json``: a :class:`Metrics`
record with the EOM at the budget and its interval, the estimated cost, the decision curve
(budget-value curve for M > 2 arms, AUCC for two arms) and, on simulated data, the true
value and cost of the very same policies beside the estimates. The gate, the registry and
the pipeline's summary read the same record back. ``allocate_file`` streams a user table of any
size through the model, solves the budgeted allocation once over all users, and writes
``user_id, treatment``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bidfcl.allocation import AllocationResult, solve_mckp
from bidfcl.contract import (
    META_FILE,
    RCT_TEST,
    TREATMENT,
    USER_ID,
    DataContractError,
    Dataset,
    LoggedData,
    check_budget,
    check_column_names,
    check_features,
    check_ids_unique_across_chunks,
    check_user_ids,
    load_dataset,
    parquet_columns,
    rule_message,
)
from bidfcl.deployment import deploy
from bidfcl.evaluation import (
    DoublyRobust,
    PairedComparison,
    PolicyValueEstimator,
    aucc,
    auuc,
    budget_value_curve,
    compare_policies,
    curve_area,
    evaluate_policy,
    expected_outcome_metric,
    make_estimator,
    qini_coefficient,
)
from bidfcl.io import atomic_write, json_ready, write_json
from bidfcl.model import FeatureMismatchError, UpliftModel, check_feature_columns
from bidfcl.outcome_model import crossfit_outcomes

CURVE_BUDGET_SCALES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
"""Budget-value curve grid, as multiples of the evaluated budget (area = mean height)."""


@dataclass(frozen=True)
class Metrics:
    """One model scored on one RCT table: the contents of ``metrics.json``.

    Two policies are scored: the EOM policy (lambda set so that its *estimated* cost on this
    RCT sample meets the budget, the paper's procedure, so its cost meets the budget by
    construction) and the deployed allocation (what ``bidfcl allocate`` ships: the model's
    calibrated lambda, or the exact MCKP on its predicted costs; see
    :mod:`bidfcl.deployment`), whose revenue and spend are estimated with intervals. With the
    ``dr`` estimator the direct model is cross-fitted on the scored table. A non-finite
    number is None (``null`` in JSON). The fields from ``true_value`` on exist only where
    they apply, and ``to_json`` leaves out those that do not.
    """

    table: str
    estimator: str
    n_users: int
    budget: float
    eom: float | None
    eom_ci_low: float | None
    eom_ci_high: float | None
    eom_std_error: float | None
    mean_cost: float | None
    cost_ci_low: float | None
    cost_ci_high: float | None
    lam: float | None
    budget_met: bool
    deployed_lam: float | None
    deployed_status: str
    deployed_predicted_cost: float | None
    deployed_value: float | None
    deployed_value_ci_low: float | None
    deployed_value_ci_high: float | None
    deployed_value_std_error: float | None
    deployed_cost: float | None
    deployed_cost_ci_low: float | None
    deployed_cost_ci_high: float | None
    deployed_cost_std_error: float | None
    # with ground truth (simulated data): true values of the EOM policy, the deployed
    # allocation and the truth-optimal allocation
    true_value: float | None = None
    true_cost: float | None = None
    deployed_true_value: float | None = None
    deployed_true_cost: float | None = None
    oracle_value: float | None = None
    # two arms: AUCC of the ROI ranking, and the Qini coefficient and AUUC of the revenue
    # uplift ranking; more arms: the budget-value curve's area (and its true area)
    aucc: float | None = None
    qini: float | None = None
    auuc: float | None = None
    budget_curve_area: float | None = None
    true_budget_curve_area: float | None = None
    # the deployed allocation against the reference method's on the same users
    # (PairedComparison, revenue per user; set by the evaluate stage)
    reference: str | None = None
    paired_difference: float | None = None
    paired_ci_low: float | None = None
    paired_ci_high: float | None = None
    paired_p_value: float | None = None
    paired_agreement: float | None = None
    paired_true_difference: float | None = None
    method: str | None = None

    FIRST_OPTIONAL: ClassVar[str] = "true_value"

    def to_json(self) -> dict[str, Any]:
        """The metrics.json mapping, keys in field order."""
        names = [f.name for f in fields(self)]
        optional = set(names[names.index(self.FIRST_OPTIONAL) :])
        values = asdict(self)
        return json_ready({k: v for k, v in values.items() if k not in optional or v is not None})

    def with_comparison(self, reference: str, paired: PairedComparison) -> Metrics:
        """These metrics with the paired comparison of the deployed allocation against
        ``reference``'s (revenue per user)."""
        return replace(
            self,
            reference=reference,
            paired_difference=paired.difference,
            paired_ci_low=paired.ci_low,
            paired_ci_high=paired.ci_high,
            paired_p_value=paired.p_value,
            paired_agreement=paired.agreement,
            paired_true_difference=paired.true_difference,
        )

    @classmethod
    def from_json(cls, raw: dict[str, Any], origin: str = "metrics.json") -> Metrics:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{origin}: unknown metric(s) {unknown}")
        return cls(**raw)

    @classmethod
    def read(cls, path: Path | str) -> Metrics:
        return cls.from_json(json.loads(Path(path).read_text()), origin=str(path))


def model_metrics(
    model: UpliftModel,
    dataset: Dataset,
    budget: float,
    table: str = RCT_TEST,
    estimator: str = "dr",
) -> tuple[Metrics, pd.DataFrame | None]:
    """Metrics of ``model`` on one RCT table, plus the budget-value curve (None for M = 2)."""
    check_feature_columns(model.feature_columns, dataset.meta.feature_columns)
    data = dataset.logged(table, device=model.device)
    truth = dataset.truth_for(table, device=model.device)
    revenue_pred, cost_pred = model.predict(data.x)
    estimate = estimator_for(estimator, data)
    eom = expected_outcome_metric(data, revenue_pred, cost_pred, budget, estimate, truth)
    deployed = deploy(model, revenue_pred, cost_pred, budget)
    shipped = evaluate_policy(data, deployed.treatment, estimate, revenue_pred, cost_pred)
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
        "deployed_value": shipped.revenue.value,
        "deployed_value_ci_low": shipped.revenue.ci_low,
        "deployed_value_ci_high": shipped.revenue.ci_high,
        "deployed_value_std_error": shipped.revenue.std_error,
        "deployed_cost": shipped.cost.value,
        "deployed_cost_ci_low": shipped.cost.ci_low,
        "deployed_cost_ci_high": shipped.cost.ci_high,
        "deployed_cost_std_error": shipped.cost.std_error,
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
        revenue_uplift = revenue_pred[:, 1] - revenue_pred[:, 0]
        metrics["aucc"] = aucc(data, revenue_pred, cost_pred)
        metrics["qini"] = qini_coefficient(data, revenue_uplift)
        metrics["auuc"] = auuc(data, revenue_uplift)
    else:
        budgets = [budget * scale for scale in CURVE_BUDGET_SCALES]
        curve = budget_value_curve(data, revenue_pred, cost_pred, budgets, estimate, truth)
        metrics["budget_curve_area"] = curve_area(curve)
        if truth is not None:
            metrics["true_budget_curve_area"] = curve_area(curve, value="true_revenue")
    return Metrics(**json_ready(metrics)), curve


def estimator_for(name: str, data: LoggedData) -> PolicyValueEstimator:
    """The estimator ``name`` for scoring on ``data``; DR's direct model is cross-fitted on
    ``data`` itself, so it belongs to none of the models scored or compared."""
    direct = crossfit_outcomes(data) if name == DoublyRobust.name else None
    return make_estimator(name, direct)


def compare_models(
    model_a: UpliftModel,
    model_b: UpliftModel,
    dataset: Dataset,
    budget: float,
    table: str = RCT_TEST,
    estimator: str = "dr",
    alpha: float = 0.05,
    interval: str = "clt",
) -> PairedComparison:
    """The deployed allocation of ``model_a`` minus that of ``model_b``, estimated on the same
    users of ``table`` (revenue and spend per user; the truth too on simulated data)."""
    for model in (model_a, model_b):
        check_feature_columns(model.feature_columns, dataset.meta.feature_columns)
    data = dataset.logged(table)
    policies = [deploy(m, *m.predict(data.x), budget).treatment.cpu() for m in (model_a, model_b)]
    return compare_policies(
        data,
        *policies,
        estimator=estimator_for(estimator, data),
        truth=dataset.truth_for(table),
        interval=interval,
        alpha=alpha,
    )


def compare_saved_models(
    model_a: Path | str,
    model_b: Path | str,
    data_dir: Path | str,
    budget: float | None = None,
    table: str = RCT_TEST,
    estimator: str = "dr",
    alpha: float = 0.05,
    interval: str = "clt",
) -> PairedComparison:
    """:func:`compare_models` for two saved model folders and a dataset folder (budget None:
    the dataset's default)."""
    dataset = load_dataset(data_dir, tables=(table,))
    models = [load_model_for(m, dataset) for m in (model_a, model_b)]
    return compare_models(
        *models, dataset, dataset.meta.budget_or_default(budget), table, estimator, alpha, interval
    )


def load_model_for(model_dir: Path | str, dataset: Dataset) -> UpliftModel:
    """A saved model that reads exactly ``dataset``'s feature columns: scores computed from
    other columns would be silently wrong, so a mismatch names the data, the model and the
    columns."""
    try:
        return UpliftModel.load(model_dir, expected_features=dataset.meta.feature_columns)
    except FeatureMismatchError as err:
        detail = f"model {model_dir}: {err}"
        file = dataset.file(META_FILE)
        message = rule_message(file, "model_features", detail, "feature_columns", kind="key")
        raise FeatureMismatchError(message) from err


def score_saved_model(
    model_dir: Path | str,
    data_dir: Path | str,
    budget: float | None = None,
    table: str = RCT_TEST,
    estimator: str = "dr",
) -> tuple[Metrics, pd.DataFrame | None]:
    """Score a saved model folder on one table of a dataset folder (budget None: the
    dataset's default); the metrics name the model's method."""
    dataset = load_dataset(data_dir, tables=(table,))
    model = load_model_for(model_dir, dataset)
    metrics, curve = model_metrics(
        model, dataset, dataset.meta.budget_or_default(budget), table, estimator
    )
    return replace(metrics, method=model.metadata.get("method")), curve


def evaluate_model(
    model_dir: Path | str,
    data_dir: Path | str,
    out: Path | str,
    budget: float | None = None,
    table: str = RCT_TEST,
    estimator: str = "dr",
    curve_out: Path | str | None = None,
) -> Metrics:
    """Evaluate a saved model on a dataset folder and write ``metrics.json`` (and the curve)."""
    metrics, curve = score_saved_model(model_dir, data_dir, budget, table, estimator)
    if curve is not None and curve_out is not None:
        atomic_write(Path(curve_out), lambda tmp: curve.to_csv(tmp, index=False))
    write_json(Path(out), metrics.to_json())
    return metrics


def allocate_file(
    model_dir: Path | str,
    users: Path | str,
    budget: float,
    out: Path | str,
    chunk_rows: int = 1_000_000,
) -> AllocationResult:
    """Allocate ``budget`` (mean cost per user) over every user of a parquet table.

    Memory is bounded by the predictions, never the feature table: features are read
    ``chunk_rows`` rows at a time (pyarrow record batches), each batch is checked and
    predicted, and only its float32 revenue and cost are kept, in (N, M) arrays allocated
    once. That is 8 M + 16 bytes per user with the ids and the chosen arms, plus one batch
    of features and the solver's scratch (a few (N,) vectors).
    The model's deployed allocation is then solved once over all users, exactly as for an
    in-memory table, and ``user_id, treatment`` is written ``chunk_rows`` at a time into a
    temporary file renamed into place when complete. The table is refused, before anything
    is written, unless every row has a unique integer id and finite values of every feature
    the model reads: a missing feature is not guessed.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    budget = check_budget(budget)
    model = UpliftModel.load(model_dir)
    file = str(users)
    _check_user_columns(Path(users), model.feature_columns, file)
    ids, revenue, cost = _predict_batches(Path(users), model, file, chunk_rows)
    # Arrow's allocator keeps freed batch memory for reuse; the solver needs it more.
    pa.default_memory_pool().release_unused()
    check_ids_unique_across_chunks(ids, file)
    result = deploy(model, revenue, cost, budget)
    arms = result.treatment.cpu().numpy()
    atomic_write(Path(out), lambda tmp: _write_allocation(tmp, ids, arms, chunk_rows))
    return result


def _predict_batches(
    path: Path, model: UpliftModel, file: str, chunk_rows: int
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Every row's user id and predicted (revenue, cost), one checked record batch at a time.
    A function of its own so that the reader and the last batch, with their Arrow buffers,
    are freed on return, before the solver needs the memory."""
    with pq.ParquetFile(path) as source:
        n_users = source.metadata.num_rows
        if n_users == 0:
            raise DataContractError.broken(file, "non_empty_table", "the table has no rows")
        ids = np.empty(n_users, dtype=np.int64)
        revenue = torch.empty(n_users, model.n_treatments)
        cost = torch.empty(n_users, model.n_treatments)
        start = 0
        for batch in source.iter_batches(
            batch_size=chunk_rows, columns=[USER_ID, *model.feature_columns]
        ):
            frame = batch.to_pandas()
            check_user_ids(frame[USER_ID], file)
            check_features(frame, model.feature_columns, file)
            stop = start + len(frame)
            ids[start:stop] = frame[USER_ID].to_numpy(np.int64)
            features = np.require(frame[model.feature_columns].to_numpy(np.float32), None, "CW")
            revenue[start:stop], cost[start:stop] = model.predict(torch.from_numpy(features))
            start = stop
    return ids, revenue, cost


def _check_user_columns(path: Path, features: list[str], file: str) -> None:
    """From the footer alone: unique column names, a user_id and every feature the model
    reads (picked by name, so their order does not matter)."""
    columns = parquet_columns(path)
    check_column_names(columns, file)
    if USER_ID not in columns:
        raise DataContractError.broken(file, "required_columns", f"missing {[USER_ID]}", USER_ID)
    missing = [c for c in features if c not in columns]
    if missing:
        detail = f"missing from the data: {missing}; the model reads {features}"
        raise FeatureMismatchError(rule_message(file, "model_features", detail, missing[0]))


def _write_allocation(path: Path, ids: np.ndarray, arms: np.ndarray, chunk_rows: int) -> None:
    schema = pa.schema([(USER_ID, pa.int64()), (TREATMENT, pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, len(ids), chunk_rows):
            rows = slice(start, start + chunk_rows)
            writer.write_table(pa.table({USER_ID: ids[rows], TREATMENT: arms[rows]}, schema))
