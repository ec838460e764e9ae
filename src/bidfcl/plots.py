"""The budget-value figure: the evaluate stage's PNG of every method, and each MLflow run's.

The figure is a bare :class:`matplotlib.figure.Figure`, drawn by the Agg backend when saved
as PNG: no pyplot state and no display, so a headless stage or a server can draw it, and
matplotlib is imported only when a figure is made.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

X_LABEL = "budget (mean cost per user)"
Y_LABEL = "revenue per user"
NO_CURVE = "no budget-value curve (two arms: see the AUCC metric)"


def budget_value_figure(curves: Mapping[str, pd.DataFrame], title: str) -> Any:
    """Each curve's estimated value at each budget as a line labelled with its key, its 95%
    interval as a band and, on data with ground truth, its true value dashed in the same
    colour: the methods are compared where the interval says the difference is real."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    with_truth = False
    for label, curve in curves.items():
        (line,) = axes.plot(curve["budget"], curve["eom"], marker="o", markersize=3, label=label)
        colour = line.get_color()
        axes.fill_between(
            curve["budget"], curve["eom_ci_low"], curve["eom_ci_high"], color=colour, alpha=0.15
        )
        if curve["true_revenue"].notna().any():
            axes.plot(curve["budget"], curve["true_revenue"], color=colour, linestyle="--")
            with_truth = True
    handles, _ = axes.get_legend_handles_labels()
    if handles:
        handles.append(Patch(color="grey", alpha=0.3, label="95% interval"))
        if with_truth:
            handles.append(Line2D([], [], color="grey", linestyle="--", label="true value"))
        axes.legend(handles=handles, fontsize="small")
    else:
        axes.text(0.5, 0.5, NO_CURVE, ha="center", transform=axes.transAxes)
    axes.set(xlabel=X_LABEL, ylabel=Y_LABEL)
    axes.set_title(title, fontsize="medium")
    axes.grid(alpha=0.3)
    return figure
