"""The randomization check of an RCT table as two custom Great Expectations 1.x rules.

Assigning arms by chance with declared probabilities leaves two marks on a table: per arm,
the rows weighted by 1/propensity add up to the table size, and every feature has the same
distribution in every arm. Each mark is a column aggregate metric (statistics per arm) and
a :class:`ColumnAggregateExpectation` that judges it, so both run inside the RCT suite,
appear in Data Docs and report through the same path as the built-in rules.

The class names are chosen so that the GX types are the rule names the reports have always
used: ``treatment_frequency_matches_propensity`` and ``feature_balance_smd``.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from great_expectations.core.metric_domain_types import MetricDomainTypes
from great_expectations.execution_engine import PandasExecutionEngine
from great_expectations.expectations.expectation import ColumnAggregateExpectation
from great_expectations.expectations.metrics import ColumnAggregateMetricProvider
from great_expectations.expectations.metrics.metric_provider import metric_value
from great_expectations.render import (
    LegacyDiagnosticRendererType,
    LegacyRendererType,
    RenderedStringTemplateContent,
)
from great_expectations.render.renderer.renderer import renderer
from scipy import stats

from bidfcl.io import json_ready

FREQUENCY_MIN_P = 1e-4
"""Two-sided p-value below which an arm's frequency contradicts its declared propensity."""
SMD_MAX = 0.1
"""Largest standardized mean difference between a treated arm and control on big samples."""
SMD_NOISE_Z = 4.5
"""On small arms the limit widens to this many standard errors of a null SMD."""

ARM_FREQUENCIES = "column.arm_frequencies"
ARM_SMD = "column.arm_smd"


# ----------------------------------------------------------------------------- statistics


def arm_frequencies(
    onehot: np.ndarray, propensity: np.ndarray, arms: Sequence[int]
) -> list[dict[str, Any]]:
    """Per arm, a z-test that its inverse-propensity-weighted count estimates the table size.

    sum_i 1[t_i = j] / p_i is unbiased for N under the declared design, whatever the
    propensities are, with variance estimated by sum_i 1[t_i = j] (1 - p_i) / p_i^2. An
    arm never assigned has no rows to estimate that from; it borrows the table's mean
    propensity.
    """
    n = onehot.shape[0]
    weights = 1.0 / propensity
    weighted_count = weights @ onehot
    variance = ((1.0 - propensity) * weights**2) @ onehot
    arm_rows = onehot.sum(axis=0)
    if n:
        mean_p = float(propensity.mean())
        variance = np.where(arm_rows > 0, variance, n * (1 - mean_p) / mean_p)
    gap = weighted_count - n
    z = np.divide(gap, np.sqrt(variance), out=np.where(gap == 0, 0.0, np.inf), where=variance > 0)
    p_values = 2 * stats.norm.sf(np.abs(z))
    return [
        {
            "arm": int(arm),
            "rows": int(arm_rows[j]),
            "weighted_count": float(weighted_count[j]),
            "expected": n,
            "z": json_ready(float(z[j])),
            "p_value": float(p_values[j]),
        }
        for j, arm in enumerate(arms)
    ]


def arm_smd(onehot: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows per arm, and the standardized mean difference of each treated arm from control.

    Control is the first arm; rows with a missing value are left out. The SMD is
    |mean_j - mean_0| / sqrt((var_j + var_0) / 2), infinite for a gap between constant arms.
    """
    complete = ~np.isnan(values)
    values, onehot = values[complete], onehot[complete].astype(np.float64)
    counts = onehot.sum(axis=0)
    safe_counts = np.maximum(counts, 1.0)
    means = (values @ onehot) / safe_counts
    variances = np.maximum((values**2 @ onehot) / safe_counts - means**2, 0.0)
    pooled_sd = np.sqrt((variances[1:] + variances[0]) / 2)
    gap = np.abs(means[1:] - means[0])
    smd = np.divide(gap, pooled_sd, out=np.where(gap == 0, 0.0, np.inf), where=pooled_sd > 0)
    return counts, smd


def smd_limits(counts: np.ndarray, smd_max: float, noise_z: float) -> np.ndarray:
    """Largest SMD each treated arm may show: ``smd_max``, widened on small arms.

    Chance alone gives an SMD of about sqrt(1/n_j + 1/n_0) standard errors, so a valid
    small trial is allowed ``noise_z`` of them; an arm or a control with fewer than two
    rows has no limit.
    """
    enough = (counts[1:] >= 2) & (counts[0] >= 2)
    with np.errstate(divide="ignore"):
        noise = np.sqrt(1.0 / counts[1:] + 1.0 / counts[0])
    return np.where(enough, np.maximum(smd_max, noise_z * noise), np.inf)


def _trial_rows(
    execution_engine: PandasExecutionEngine,
    domain_kwargs: dict,
    value_kwargs: dict,
    propensity_column: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The domain column, the arm indicators and the propensities of the usable rows.

    Rows with an unknown arm or a propensity outside (0, 1] break other rules of the
    suite, which report them; they are left out here.
    """
    frame, _, accessor = execution_engine.get_compute_domain(
        domain_kwargs, domain_type=MetricDomainTypes.COLUMN
    )
    arms = np.asarray(value_kwargs["arms"])
    arm = _numeric(frame[value_kwargs["treatment_column"]])
    propensity = _numeric(frame[propensity_column])
    keep = np.isin(arm, arms) & (propensity > 0) & (propensity <= 1)
    onehot = arm[keep, None] == arms[None, :]
    return _numeric(frame[accessor["column"]])[keep], onehot, propensity[keep]


def _numeric(column: pd.Series) -> np.ndarray:
    """A column as float64, with NaN where a value is missing or not a number."""
    return pd.to_numeric(column, errors="coerce").to_numpy(np.float64, na_value=np.nan)


# ----------------------------------------------------------------------------- metrics


class ColumnArmFrequencies(ColumnAggregateMetricProvider):
    """Per arm: rows, inverse-propensity-weighted count, z and p-value; the column holds p."""

    metric_name = ARM_FREQUENCIES
    value_keys = ("treatment_column", "arms")

    @metric_value(engine=PandasExecutionEngine)
    def _pandas(
        cls,
        execution_engine: PandasExecutionEngine,
        metric_domain_kwargs: dict,
        metric_value_kwargs: dict,
        metrics: dict[str, Any],
        runtime_configuration: dict,
    ) -> list[dict[str, Any]]:
        column = metric_domain_kwargs["column"]
        _, onehot, propensity = _trial_rows(
            execution_engine, metric_domain_kwargs, metric_value_kwargs, column
        )
        return arm_frequencies(onehot, propensity, metric_value_kwargs["arms"])


class ColumnArmSmd(ColumnAggregateMetricProvider):
    """Rows per arm and the column's standardized mean difference of each treated arm."""

    metric_name = ARM_SMD
    value_keys = ("treatment_column", "propensity_column", "arms")

    @metric_value(engine=PandasExecutionEngine)
    def _pandas(
        cls,
        execution_engine: PandasExecutionEngine,
        metric_domain_kwargs: dict,
        metric_value_kwargs: dict,
        metrics: dict[str, Any],
        runtime_configuration: dict,
    ) -> tuple[np.ndarray, np.ndarray]:
        values, onehot, _ = _trial_rows(
            execution_engine,
            metric_domain_kwargs,
            metric_value_kwargs,
            metric_value_kwargs["propensity_column"],
        )
        return arm_smd(onehot, values)


# ----------------------------------------------------------------------------- expectations


class _RandomizationExpectation(ColumnAggregateExpectation, ABC):
    """What both rules share: arms by ``treatment_column``, ids ``arms`` (control first)."""

    treatment_column: str
    arms: list[int]
    catch_exceptions: bool = True

    template: ClassVar[str]
    """Data Docs text; ``$name`` is a kwarg of the rule, ``$expectation_type`` its name."""
    observed: ClassVar[str]
    """What the observed value is, for Data Docs."""

    @classmethod
    @renderer(renderer_type=LegacyRendererType.PRESCRIPTIVE)
    def _prescriptive_renderer(
        cls,
        configuration: Any = None,
        result: Any = None,
        runtime_configuration: dict | None = None,
        **kwargs: Any,
    ) -> list[RenderedStringTemplateContent]:
        """The rule in words, its name first, so Data Docs match the one-line failures."""
        configuration = configuration or result.expectation_config
        defaults = {
            name: field.default for name, field in cls.__fields__.items() if not field.required
        }
        params = {**defaults, **configuration.kwargs, "expectation_type": configuration.type}
        return [
            RenderedStringTemplateContent(
                content_block_type="string_template",
                string_template={"template": cls.template, "params": params},
            )
        ]

    @classmethod
    @renderer(renderer_type=LegacyDiagnosticRendererType.OBSERVED_VALUE)
    def _diagnostic_observed_value_renderer(
        cls,
        configuration: Any = None,
        result: Any = None,
        runtime_configuration: dict | None = None,
    ) -> str:
        """The observed value with its name: a bare number does not say what it is."""
        value = ((result and result.result) or {}).get("observed_value")
        return "--" if value is None else f"{cls.observed} {value:.3g}"

    @staticmethod
    def _verdict(
        observed: float,
        details: dict[str, Any],
        rows_checked: int,
        unexpected_rows: int,
        examples: list[str],
        explanation: str,
    ) -> dict[str, Any]:
        """A GX result: success, observed value, and on failure the offending arms' rows."""
        result: dict[str, Any] = {"observed_value": json_ready(observed), "details": details}
        if examples:
            details["explanation"] = explanation
            result |= {
                "element_count": rows_checked,
                "unexpected_count": unexpected_rows,
                "unexpected_percent": 100 * unexpected_rows / max(rows_checked, 1),
                "partial_unexpected_list": examples,
            }
        return {"success": not examples, "result": result}


class TreatmentFrequencyMatchesPropensity(_RandomizationExpectation):
    """Arm frequencies agree with the declared propensities (``column``).

    Fails when some arm's inverse-propensity-weighted count is further from the table
    size than a two-sided p-value of ``min_p_value`` allows; observed value: the smallest
    p-value over the arms.
    """

    min_p_value: float = FREQUENCY_MIN_P

    metric_dependencies = (ARM_FREQUENCIES,)
    success_keys = ("treatment_column", "arms", "min_p_value")
    observed: ClassVar[str] = "smallest p-value"
    template: ClassVar[str] = (
        "$expectation_type: in each arm of $treatment_column ($arms), the rows weighted by "
        "1/$column add up to the table size (two-sided z-test, p-value at least $min_p_value)."
    )

    def _validate(
        self,
        metrics: dict[str, Any],
        runtime_configuration: dict | None = None,
        execution_engine: Any = None,
    ) -> dict[str, Any]:
        arms = metrics[ARM_FREQUENCIES]
        rows = sum(arm["rows"] for arm in arms)
        bad = [arm for arm in arms if arm["p_value"] < self.min_p_value]
        examples = [
            f"arm {a['arm']}: {a['rows']} rows weigh {a['weighted_count']:.0f} "
            f"(p={a['p_value']:.1e})"
            for a in bad
        ]
        explanation = (
            f"inverse-propensity-weighted arm counts differ from the {rows} rows, "
            f"p < {self.min_p_value:g}"
        )
        smallest_p = min((arm["p_value"] for arm in arms), default=1.0)
        details = {"rows_checked": rows, "arms": arms}
        bad_rows = sum(arm["rows"] for arm in bad)
        return self._verdict(smallest_p, details, rows, bad_rows, examples, explanation)


class FeatureBalanceSmd(_RandomizationExpectation):
    """A feature (``column``) is balanced between each treated arm and control.

    Fails when a treated arm's standardized mean difference from control exceeds
    ``smd_max``, widened on small arms to ``noise_z`` standard errors (see
    :func:`smd_limits`); observed value: the largest SMD over the arms that have a limit.
    """

    propensity_column: str
    smd_max: float = SMD_MAX
    noise_z: float = SMD_NOISE_Z

    metric_dependencies = (ARM_SMD,)
    success_keys = ("treatment_column", "propensity_column", "arms", "smd_max", "noise_z")
    observed: ClassVar[str] = "largest SMD"
    template: ClassVar[str] = (
        "$expectation_type: $column has a standardized mean difference of at most $smd_max "
        "between each treated arm of $treatment_column ($arms) and control, or $noise_z "
        "standard errors on small arms."
    )

    def _validate(
        self,
        metrics: dict[str, Any],
        runtime_configuration: dict | None = None,
        execution_engine: Any = None,
    ) -> dict[str, Any]:
        counts, smd = metrics[ARM_SMD]
        limit = smd_limits(counts, self.smd_max, self.noise_z)
        broken = smd > limit
        treated = np.asarray(self.arms[1:])
        examples = [
            f"arm {arm} vs control: SMD {value:.2f} > {bound:.2f}"
            for arm, value, bound in zip(treated[broken], smd[broken], limit[broken], strict=True)
        ]
        worst = float(np.where(np.isfinite(limit), smd, 0.0).max(initial=0.0))
        names = [str(arm) for arm in treated]
        details = {
            "smd_by_arm": json_ready(dict(zip(names, smd.tolist(), strict=True))),
            "limit_by_arm": json_ready(dict(zip(names, limit.tolist(), strict=True))),
        }
        explanation = "standardized mean difference between a treated arm and control"
        rows = int(counts.sum())
        bad_rows = int(counts[1:][broken].sum())
        return self._verdict(worst, details, rows, bad_rows, examples, explanation)
