"""The results report's figures: each saved as a PNG and, beside it, the rows it plots as JSON
in DVC's flat "list of records" format, so ``dvc plots show`` draws the same numbers.

A figure is a bare :class:`matplotlib.figure.Figure`, drawn by the Agg backend when saved (no
pyplot state, no display), as in :mod:`bidfcl.plots`. Every method keeps one colour across all
figures, so a reader can follow it from the budget curves to the sweeps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bidfcl.io import atomic_write, write_json

DPI = 120
BUDGET_LABEL = "budget (mean cost per user)"
VALUE_LABEL = "revenue per user"
SD_BAND = "±1 sd over seeds"
CURVE_COLUMNS = ["method", "seed", "budget_multiple", "budget", "eom", "true_revenue"]
HISTORY_COLUMNS = ["method", "seed", "epoch", "train_loss", "val_loss", "val_eom", "best_epoch"]


@dataclass(frozen=True)
class ReportFigure:
    """A drawn figure and the rows it plots, saved side by side under one file stem."""

    name: str
    title: str
    figure: Any
    records: list[dict[str, Any]]

    def save(self, folder: Path) -> tuple[Path, Path]:
        """Write ``NAME.png`` and ``NAME.json`` atomically; return their paths."""
        png, data = folder / f"{self.name}.png", folder / f"{self.name}.json"
        atomic_write(png, lambda tmp: self.figure.savefig(tmp, format="png", dpi=DPI))
        write_json(data, self.records)
        return png, data


def method_colours(methods: Sequence[str]) -> dict[str, str]:
    """One colour of matplotlib's default cycle per method, fixed for the whole report."""
    return {method: f"C{index % 10}" for index, method in enumerate(methods)}


def _sorted_by_method(frame: pd.DataFrame, methods: Sequence[str], *then: str) -> pd.DataFrame:
    rank = {method: index for index, method in enumerate(methods)}
    by_rank = frame.assign(_rank=frame["method"].map(rank))
    return by_rank.sort_values(["_rank", *then], kind="stable").drop(columns="_rank")


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [dict(row) for row in frame.to_dict("records")]


# --- budget-value curves -----------------------------------------------------------------


def mean_budget_curves(cells: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> pd.DataFrame:
    """Each method's curve averaged over seeds. Points are matched by their budget as a
    multiple of the cell's own budget, since each seed's data can set a slightly different
    default budget; the plotted budget is the seeds' mean."""
    points = pd.DataFrame(
        [
            {
                "method": cell["method"],
                "seed": cell["seed"],
                "budget_multiple": round(point["budget"] / cell["budget"], 3),
                "budget": point["budget"],
                "eom": point.get("eom"),
                "true_revenue": point.get("true_revenue"),
            }
            for cell in cells
            for point in cell.get("curve") or []
        ],
        columns=CURVE_COLUMNS,
    )
    points[["budget", "eom", "true_revenue"]] = points[["budget", "eom", "true_revenue"]].astype(
        float
    )
    curves = (
        points.groupby(["method", "budget_multiple"])
        .agg(
            budget=("budget", "mean"),
            eom=("eom", "mean"),
            eom_sd=("eom", "std"),
            true_revenue=("true_revenue", "mean"),
            true_revenue_sd=("true_revenue", "std"),
            n_seeds=("seed", "nunique"),
        )
        .reset_index()
    )
    return _sorted_by_method(curves, methods, "budget_multiple")


def budget_value_figure(
    name: str, title: str, curves: pd.DataFrame, colours: Mapping[str, str], budget: float
) -> ReportFigure:
    """Mean estimated value (EOM) per budget with a ±1 sd band over seeds, and the mean true
    value dashed where the data has ground truth; the dotted line is the table's budget."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    with_truth = False
    for method, curve in curves.groupby("method", sort=False):
        colour = colours[method]
        axes.plot(curve["budget"], curve["eom"], marker="o", markersize=3, color=colour)
        spread = curve["eom_sd"].fillna(0.0)
        axes.fill_between(
            curve["budget"], curve["eom"] - spread, curve["eom"] + spread, color=colour, alpha=0.15
        )
        if curve["true_revenue"].notna().any():
            axes.plot(curve["budget"], curve["true_revenue"], color=colour, linestyle="--")
            with_truth = True
    handles: list[Any] = [
        Line2D([], [], color=colours[m], label=m) for m in curves["method"].unique()
    ]
    handles.append(Patch(color="grey", alpha=0.3, label=f"EOM {SD_BAND}"))
    if with_truth:
        handles.append(Line2D([], [], color="grey", linestyle="--", label="true value"))
    axes.axvline(budget, color="grey", linestyle=":", linewidth=1)
    axes.legend(handles=handles, fontsize="small")
    axes.set(xlabel=BUDGET_LABEL, ylabel=VALUE_LABEL)
    axes.set_title(title, fontsize="medium")
    axes.grid(alpha=0.3)
    return ReportFigure(name, title, figure, _records(curves))


# --- sweeps ------------------------------------------------------------------------------


def sweep_figure(
    name: str,
    title: str,
    points: pd.DataFrame,
    parameter: str,
    y_label: str,
    colours: Mapping[str, str],
) -> ReportFigure:
    """``points`` (method, x, mean, sd, n_seeds): the mean per sweep value with ±1 sd error
    bars. A sweep spanning a factor of ten or more (an RCT size) gets a log x axis."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for method, rows in points.groupby("method", sort=False):
        axes.errorbar(
            rows["x"],
            rows["mean"],
            yerr=rows["sd"].fillna(0.0),
            marker="o",
            markersize=4,
            capsize=3,
            color=colours[method],
            label=method,
        )
    x = points["x"]
    if len(x) and x.min() > 0 and x.max() / x.min() >= 10:
        axes.set_xscale("log")
    axes.legend(fontsize="small", title=f"mean {SD_BAND}", title_fontsize="small")
    axes.set(xlabel=parameter, ylabel=y_label)
    axes.set_title(title, fontsize="medium")
    axes.grid(alpha=0.3)
    records = points.rename(columns={"x": parameter, "mean": "value"})
    return ReportFigure(name, title, figure, _records(records))


# --- training curves ---------------------------------------------------------------------


def first_seed_histories(
    cells: Sequence[Mapping[str, Any]], methods: Sequence[str]
) -> pd.DataFrame:
    """Per-epoch losses of each method's smallest seed that has a history: one run shows the
    shape of training, where a mean over seeds that stop at different epochs would blur it."""
    rank = {method: index for index, method in enumerate(methods)}
    chosen: dict[str, Mapping[str, Any]] = {}
    for cell in sorted(cells, key=lambda c: (rank[c["method"]], c["seed"])):
        if cell["method"] not in chosen and _history(cell):
            chosen[cell["method"]] = cell
    rows = [
        {
            "method": cell["method"],
            "seed": cell["seed"],
            "epoch": entry.get("epoch", index),
            "train_loss": entry.get("train_loss"),
            "val_loss": entry.get("val_loss"),
            "val_eom": entry.get("val_eom"),
            "best_epoch": (cell.get("training") or {}).get("best_epoch"),
        }
        for cell in chosen.values()
        for index, entry in enumerate(_history(cell))
    ]
    frame = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    numeric = ["train_loss", "val_loss", "val_eom", "best_epoch"]
    frame[numeric] = frame[numeric].astype(float)
    return frame


def _history(cell: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list((cell.get("training") or {}).get("history") or [])


def training_figure(
    name: str, title: str, history: pd.DataFrame, colours: Mapping[str, str]
) -> ReportFigure:
    """One panel per method (their losses differ in kind and scale): validation loss solid,
    training loss dashed where the history records it, the epoch whose weights were kept
    dotted."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    methods = list(history["method"].unique())
    columns = min(3, len(methods))
    rows = math.ceil(len(methods) / columns)
    figure = Figure(figsize=(3.4 * columns, 2.6 * rows + 0.5), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes, (method, runs) in zip(grid.flat, history.groupby("method", sort=False), strict=False):
        colour = colours[method]
        axes.plot(runs["epoch"], runs["val_loss"], color=colour, label="val loss")
        if runs["train_loss"].notna().any():
            axes.plot(
                runs["epoch"], runs["train_loss"], color=colour, linestyle="--", label="train loss"
            )
        best = runs["best_epoch"].iloc[0]
        if pd.notna(best):
            axes.axvline(best, color="grey", linestyle=":", linewidth=1)
        axes.set_title(f"{method} (seed {runs['seed'].iloc[0]})", fontsize="small")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.tick_params(labelsize="small")
    for unused in list(grid.flat)[len(methods) :]:
        unused.set_visible(False)
    grid.flat[0].legend(fontsize="x-small")  # the line styles; each panel's title names its method
    figure.suptitle(title, fontsize="medium")
    figure.supxlabel("epoch", fontsize="small")
    figure.supylabel("loss", fontsize="small")
    return ReportFigure(name, title, figure, _records(history))
