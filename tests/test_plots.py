"""The budget-value figure: every curve labelled, and a readable figure when there is none."""

from __future__ import annotations

import io

import pandas as pd

from bidfcl.plots import NO_CURVE, budget_value_figure

CURVE = pd.DataFrame(
    {
        "budget": [1.0, 2.0],
        "eom": [1.0, 2.0],
        "eom_ci_low": [0.5, 1.5],
        "eom_ci_high": [1.5, 2.5],
        "true_revenue": [float("nan"), float("nan")],
    }
)


def test_every_curve_is_labelled_with_its_interval_and_truth() -> None:
    figure = budget_value_figure(
        {"a": CURVE, "b": CURVE.assign(true_revenue=[0.9, 1.8])}, "Budget-value curves"
    )
    [axes] = figure.axes
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert legend == ["a", "b", "95% interval", "true value"]
    assert axes.get_title() == "Budget-value curves"
    png = io.BytesIO()
    figure.savefig(png, format="png")
    assert png.getvalue().startswith(b"\x89PNG")


def test_without_truth_or_curves_the_figure_says_so() -> None:
    [axes] = budget_value_figure({"a": CURVE}, "t").axes
    assert "true value" not in [text.get_text() for text in axes.get_legend().get_texts()]
    [empty] = budget_value_figure({}, "t").axes
    assert empty.get_legend() is None
    assert [text.get_text() for text in empty.texts] == [NO_CURVE]
