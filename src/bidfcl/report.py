"""The results report: the finished benchmark cells as one markdown page of Table-2-style
tables, figures and the runs behind them.

``bidfcl benchmark`` writes one JSON file per finished grid cell (``DIR/cells/<key>.json``).
:func:`write_report` reads them all and writes the markdown, a JSON holding every number the
markdown shows (the markdown is rendered from that JSON, so the two cannot disagree), each
figure as a PNG beside its plotted rows for DVC, and optionally a short block in the README
taken from the same JSON. Every number comes from the cells: data without ground truth shows
no true value, and runs that never touched a GPU say so instead of naming one.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from bidfcl.io import atomic_write, write_json
from bidfcl.report_figures import (
    ReportFigure,
    budget_value_figure,
    first_seed_histories,
    mean_budget_curves,
    method_colours,
    sweep_figure,
    training_figure,
)

REFERENCE = "tsm-rct"  # every EOM is normalised to it and the oracle gap is measured from it
OWN_PREFIX = "bidfcl"  # the project's own methods; every other method is a baseline
BEGIN_MARKER = "<!-- results:begin -->"
END_MARKER = "<!-- results:end -->"
NO_GPU = "GPU: not measured (no GPU was available for these runs)"
METRICS = (
    "eom",
    "deployed_value",
    "deployed_cost",
    "deployed_true_value",
    "deployed_true_cost",
    "oracle_value",
    "aucc",
)
TRUTH_METRICS = ("deployed_true_value", "deployed_true_cost", "oracle_value")
BRIDGE = ("helpful_share", "final_gate", "chosen_gate")  # see _bridge_numbers
REQUIRED = ("key", "spec", "dataset", "method", "seed", "budget", "n_treatments", "has_truth")
GRID_POINT = ["spec", "dataset", "sweep_name", "sweep_value", "budget_scale", "method", "seed"]
NOT_AVAILABLE = "n/a"
EMPTY = "–"


class ReportError(ValueError):
    """The inputs cannot make a report: no cells, an unreadable cell, a README without markers."""


@dataclass(frozen=True)
class ReportSummary:
    """What :func:`write_report` wrote, for the command line to print."""

    markdown: Path
    json: Path
    figures: tuple[Path, ...]  # each figure's PNG and its data JSON
    readme: Path | None
    n_cells: int
    datasets: tuple[str, ...]


def write_report(
    result_dirs: Sequence[Path],
    out: Path,
    figures_dir: Path | None = None,
    readme: Path | None = None,
) -> ReportSummary:
    """Write the results markdown ``out``, its numbers as ``out.with_suffix('.json')``, the
    figures under ``figures_dir`` (default ``out.parent / 'figures'``) and, if ``readme`` is
    given, the summary between its results markers. A README without both markers fails
    before anything is written."""
    out = Path(out)
    figures_dir = Path(figures_dir) if figures_dir is not None else out.parent / "figures"
    if readme is not None:
        _marker_lines(Path(readme))
    cells = load_cells(result_dirs)
    frame = cell_frame(cells)
    report, figures = build_report(
        frame,
        {cell["key"]: cell for cell in cells},
        figures_prefix=_relative(figures_dir, out.parent),
        sources=[_relative(Path(folder), out.parent) for folder in result_dirs],
    )
    report["runs"]["superseded"] = len(cells) - len(frame)
    report["json"] = out.with_suffix(".json").name
    figure_paths = [path for figure in figures for path in figure.save(figures_dir)]
    json_path = out.with_suffix(".json")
    write_json(json_path, report)
    written = json.loads(json_path.read_text())
    atomic_write(out, lambda tmp: tmp.write_text(render_markdown(written)))
    if readme is not None:
        update_readme(Path(readme), readme_block(written, _relative(out, Path(readme).parent)))
    return ReportSummary(
        markdown=out,
        json=json_path,
        figures=tuple(figure_paths),
        readme=Path(readme) if readme is not None else None,
        n_cells=len(frame),
        datasets=tuple(sorted(frame["dataset"].unique())),
    )


# --- reading the cells -------------------------------------------------------------------


def load_cells(result_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """Every ``cells/*.json`` of each result folder, once per key: a folder listed twice, or
    copied into another, repeats its cells."""
    cells: dict[str, dict[str, Any]] = {}
    for folder in result_dirs:
        cell_dir = Path(folder) / "cells"
        if not cell_dir.is_dir():
            raise ReportError(f"{folder}: no cells/ folder (not a `bidfcl benchmark` output?)")
        for path in sorted(cell_dir.glob("*.json")):
            if not path.name.startswith("."):
                cell = _read_cell(path)
                cells.setdefault(str(cell["key"]), cell)
    if not cells:
        raise ReportError(f"no finished cells in {', '.join(str(d) for d in result_dirs)}")
    return list(cells.values())


def _read_cell(path: Path) -> dict[str, Any]:
    try:
        cell = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReportError(f"{path}: unreadable cell: {error}") from error
    missing = [name for name in REQUIRED if not isinstance(cell, dict) or name not in cell]
    if missing:
        raise ReportError(f"{path}: not a benchmark cell (missing {', '.join(missing)})")
    return cell


def cell_frame(cells: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per grid point: identity, metrics (missing as NaN) and run facts. A grid point
    run again under another key (a rerun) keeps its latest run."""
    frame = pd.DataFrame([_cell_row(cell) for cell in cells])
    frame = frame.sort_values(["finished_at", "key"], kind="stable")
    return frame.drop_duplicates(GRID_POINT, keep="last").reset_index(drop=True)


def _cell_row(cell: Mapping[str, Any]) -> dict[str, Any]:
    """The cell's numbers; on data without ground truth any true metric is dropped, so no
    true value can reach the report by mistake."""
    has_truth = bool(cell["has_truth"])
    metrics = cell.get("metrics") or {}
    sweep = cell.get("sweep") or {}
    training = cell.get("training") or {}
    return {
        "key": str(cell["key"]),
        "spec": str(cell["spec"]),
        "dataset": str(cell["dataset"]),
        "method": str(cell["method"]),
        "seed": int(cell["seed"]),
        "budget_scale": float(cell.get("budget_scale") or 1.0),
        "budget": float(cell["budget"]),
        "n_treatments": int(cell["n_treatments"]),
        "has_truth": has_truth,
        "sweep_name": sweep.get("name"),
        "sweep_parameter": sweep.get("parameter") or sweep.get("name"),
        "sweep_value": _number(sweep.get("value")),
        "device": str(cell.get("device") or "not recorded"),
        "code_version": str(cell.get("code_version") or "not recorded"),
        "git_commit": cell.get("git_commit"),
        "seconds": _number(cell.get("seconds")),
        "seconds_per_epoch": _number(training.get("seconds_per_epoch")),
        "finished_at": str(cell.get("finished_at") or ""),
        **_bridge_numbers(cell),
        **{
            name: _number(metrics.get(name)) if has_truth or name not in TRUTH_METRICS else math.nan
            for name in METRICS
        },
    }


def _bridge_numbers(cell: Mapping[str, Any]) -> dict[str, float]:
    """What a bidfcl-* cell says about its Bridge: the share of Bridge steps that lowered
    the held-out upper loss, the mean gate of its last epoch and the gate bidfcl-fixed chose
    (NaN where the cell has none)."""
    bilevel = cell.get("bilevel") or {}
    gates = bilevel.get("gate_mean_per_epoch") or [math.nan]
    learned = bool(bilevel.get("hypergradient_steps"))
    return {
        "helpful_share": _number(bilevel.get("helpful_share")) if learned else math.nan,
        "final_gate": _number(gates[-1]),
        "chosen_gate": _number((cell.get("fixed_gate") or {}).get("chosen")),
    }


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# --- the numbers -------------------------------------------------------------------------


def is_own(method: str) -> bool:
    """A method of this project (bidfcl-*), never a baseline."""
    return method.startswith(OWN_PREFIX)


def method_rank(method: str) -> tuple[int, str]:
    """Table order: the reference first, then the baselines, then the project's methods."""
    return (0 if method == REFERENCE else 2 if is_own(method) else 1, method)


def ordered_methods(methods: Iterable[str]) -> list[str]:
    return sorted(set(methods), key=method_rank)


def mean_sd(values: pd.Series) -> dict[str, Any]:
    """Mean and sample sd (ddof 1) over the values present; sd is NaN below two values."""
    present = values.dropna()
    return {
        "mean": float(present.mean()) if len(present) else math.nan,
        "sd": float(present.std(ddof=1)) if len(present) > 1 else math.nan,
        "n": len(present),
    }


def ratio_to_reference(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Each seed's value over tsm-rct's on the same seed (all NaN without tsm-rct)."""
    if REFERENCE not in per_seed:
        return per_seed * math.nan
    return per_seed.div(per_seed[REFERENCE], axis=0).replace([np.inf, -np.inf], np.nan)


def gap_closed(values: pd.DataFrame, oracle: pd.Series) -> pd.DataFrame:
    """Each seed's share of the tsm-rct → oracle gap closed: (v − v_ref) / (oracle − v_ref)."""
    if REFERENCE not in values:
        return values * math.nan
    reference = values[REFERENCE]
    shares = values.sub(reference, axis=0).div(oracle - reference, axis=0)
    return shares.replace([np.inf, -np.inf], np.nan)


def best_baseline(scores: pd.Series, exclude: str | None = None) -> str | None:
    """The non-bidfcl method (tsm-rct included), other than ``exclude``, with the highest
    score; ties go to the earlier method in table order."""
    candidates = [m for m, s in scores.items() if not is_own(m) and m != exclude and pd.notna(s)]
    if not candidates:
        return None
    return min(candidates, key=lambda method: (-scores[method], method_rank(method)))


def paired_comparison(
    per_seed: pd.DataFrame, method: str, baseline: str | None
) -> dict[str, Any] | None:
    """``method`` minus ``baseline`` on the seeds both ran: mean difference, paired t-test
    p-value (NaN with fewer than two pairs or differences without variance), wins and
    ties (seeds where both shipped the same value: often the very same model)."""
    if baseline is None:
        return None
    pairs = per_seed[[method, baseline]].dropna()
    difference = pairs[method] - pairs[baseline]
    varies = len(difference) > 1 and difference.std(ddof=1) > 1e-12 * max(
        1.0, float(difference.abs().max())
    )
    p_value = stats.ttest_rel(pairs[method], pairs[baseline]).pvalue if varies else math.nan
    return {
        "baseline": baseline,
        "n": len(difference),
        "mean_diff": float(difference.mean()) if len(difference) else math.nan,
        "p_value": float(p_value),
        "wins": int((difference > 0).sum()),
        "ties": int((difference == 0).sum()),
    }


def dataset_table(group: pd.DataFrame) -> dict[str, Any]:
    """One dataset's rows, one per method. Methods are compared in deployed true value where
    the data has ground truth, else in EOM; without truth no true number appears."""
    has_truth = bool(group["has_truth"].all())
    two_arms = bool((group["n_treatments"] == 2).all())
    metric = "deployed_true_value" if has_truth else "eom"
    per_seed = group.pivot(index="seed", columns="method", values=[*METRICS, *BRIDGE, "budget"])
    scores = per_seed[metric].mean()
    eom_ratio = ratio_to_reference(per_seed["eom"])
    if has_truth:
        oracle = per_seed["oracle_value"].mean(axis=1)
        columns = {
            "deployed_true_value": per_seed["deployed_true_value"],
            "gap_closed": gap_closed(per_seed["deployed_true_value"], oracle),
            "true_spend_ratio": per_seed["deployed_true_cost"] / per_seed["budget"],
        }
    else:
        columns = {
            "deployed_value": per_seed["deployed_value"],
            "spend_ratio": per_seed["deployed_cost"] / per_seed["budget"],
        }
    if two_arms:
        columns["aucc"] = per_seed["aucc"]
    best = best_baseline(scores)
    rows = [
        {
            "method": method,
            "n_seeds": int((group["method"] == method).sum()),
            "eom_ratio": mean_sd(eom_ratio[method]),
            **{name: mean_sd(values[method]) for name, values in columns.items()},
            "versus": paired_comparison(per_seed[metric], method, best_baseline(scores, method)),
        }
        for method in ordered_methods(group["method"])
    ]
    own = [method for method in ordered_methods(group["method"]) if is_own(method)]
    pairs = [
        {
            "method": method,
            "helpful_share": mean_sd(per_seed["helpful_share"][method]),
            "final_gate": mean_sd(per_seed["final_gate"][method]),
            "chosen_gates": _gate_counts(per_seed["chosen_gate"][method]),
            "spend_range": _range(
                columns.get("true_spend_ratio", columns.get("spend_ratio"))[method]
            ),
            "versus": [
                paired_comparison(per_seed[metric], method, other)
                for other in ordered_methods(group["method"])
                if other != method
            ],
        }
        for method in own
    ]
    return {
        "has_truth": has_truth,
        "two_arms": two_arms,
        "n_treatments": int(group["n_treatments"].max()),
        "seeds": sorted(int(seed) for seed in group["seed"].unique()),
        "budget": mean_sd(per_seed["budget"].mean(axis=1)),
        "comparison_metric": metric,
        "reference_present": REFERENCE in scores.index,
        "best_baseline": best,
        "runner_up": best_baseline(scores, best) if best is not None else None,
        "rows": rows,
        "pairs": pairs,
        "oracle": mean_sd(oracle) if has_truth else None,
    }


def _gate_counts(chosen: pd.Series) -> dict[str, int]:
    """How many seeds bidfcl-fixed chose each constant gate on (empty for other methods)."""
    counts = chosen.dropna().value_counts()
    return {f"{gate:g}": int(counts[gate]) for gate in sorted(counts.index)}


def _range(values: pd.Series) -> dict[str, float]:
    present = values.dropna()
    if present.empty:
        return {"min": math.nan, "max": math.nan}
    return {"min": float(present.min()), "max": float(present.max())}


def sweep_points(group: pd.DataFrame) -> tuple[pd.DataFrame, str, bool]:
    """Per method and sweep value: mean, sd and seed count of the deployed true value over
    the oracle on the same seed (EOM where the data has no ground truth)."""
    has_truth = bool(group["has_truth"].all())
    if has_truth:
        y = group["deployed_true_value"] / group["oracle_value"]
        label = "deployed true value / oracle"
    else:
        y = group["eom"]
        label = "EOM (estimated revenue per user)"
    points = (
        group.assign(x=group["sweep_value"], y=y)
        .groupby(["method", "x"])["y"]
        .agg(mean="mean", sd="std", n_seeds="count")
        .reset_index()
    )
    rank = {method: index for index, method in enumerate(ordered_methods(points["method"]))}
    points = points.sort_values(
        ["method", "x"], key=lambda c: c.map(rank) if c.name == "method" else c
    )
    return points.reset_index(drop=True), label, has_truth


def sweep_table(points: pd.DataFrame, label: str, has_truth: bool) -> dict[str, Any]:
    return {
        "y": label,
        "has_truth": has_truth,
        "values": sorted(float(x) for x in points["x"].unique()),
        "rows": [
            {"method": method, "points": rows.drop(columns="method").to_dict("records")}
            for method, rows in points.groupby("method", sort=False)
        ],
    }


def code_versions(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The code versions the cells ran (with their git commits) and how many cells each:
    tables of one page may come from different versions, and each says which."""
    commits = frame["git_commit"].fillna("not recorded")
    counts = frame.assign(git_commit=commits).groupby(["code_version", "git_commit"]).size()
    return [
        {"code_version": version, "git_commit": commit, "cells": int(n)}
        for (version, commit), n in counts.items()
    ]


def _code_text(code: Sequence[Mapping[str, Any]]) -> str:
    return "; ".join(
        f"`{c['code_version']}` (git {c['git_commit']}, {c['cells']} cells)" for c in code
    )


def device_counts(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {"device": d, "cells": int(n)} for d, n in sorted(frame["device"].value_counts().items())
    ]


def gpu_names(devices: Iterable[str]) -> list[str]:
    """The GPUs named in the cells' device strings (``cuda: NAME``)."""
    names = {d.partition(":")[2].strip() or d for d in devices if d.lower().startswith("cuda")}
    return sorted(names)


def runs_summary(frame: pd.DataFrame) -> dict[str, Any]:
    """Where, with what code and at what cost the cells ran."""
    versions = Counter(zip(frame["code_version"], frame["git_commit"], strict=True))
    compute = frame.groupby("method").agg(
        cells=("key", "size"),
        seconds=("seconds", "sum"),
        seconds_per_epoch=("seconds_per_epoch", "mean"),
    )
    finished = sorted(t for t in frame["finished_at"] if t)
    return {
        "cells": len(frame),
        "specs": sorted(frame["spec"].unique()),
        "seeds": sorted(int(seed) for seed in frame["seed"].unique()),
        "code_versions": [
            {"code_version": version, "git_commit": commit, "cells": n}
            for (version, commit), n in sorted(
                versions.items(), key=lambda i: (i[0][0], str(i[0][1]))
            )
        ],
        "devices": device_counts(frame),
        "gpus": gpu_names(frame["device"]),
        "total_seconds": float(frame["seconds"].sum()),
        "cells_without_seconds": int(frame["seconds"].isna().sum()),
        "first_finished": finished[0] if finished else None,
        "last_finished": finished[-1] if finished else None,
        "methods": [
            {
                "method": method,
                "cells": int(compute.at[method, "cells"]),
                "seconds": float(compute.at[method, "seconds"]),
                "seconds_per_epoch": float(compute.at[method, "seconds_per_epoch"]),
            }
            for method in ordered_methods(compute.index)
        ],
    }


# --- assembling the report -----------------------------------------------------------------


def build_report(
    frame: pd.DataFrame,
    cells_by_key: Mapping[str, Mapping[str, Any]],
    figures_prefix: str,
    sources: Sequence[str],
) -> tuple[dict[str, Any], list[ReportFigure]]:
    """The report's numbers (the JSON the markdown is rendered from) and its figures."""
    colours = method_colours(ordered_methods(frame["method"]))
    several_specs = frame["spec"].nunique() > 1
    figures: list[ReportFigure] = []

    def link(figure: ReportFigure, group: pd.DataFrame) -> dict[str, Any]:
        figures.append(figure)
        return {
            "title": figure.title,
            "png": f"{figures_prefix}/{figure.name}.png",
            "data": f"{figures_prefix}/{figure.name}.json",
            "devices": device_counts(group),
            "gpus": gpu_names(group["device"]),
        }

    tables = []
    plain = frame[frame["sweep_name"].isna()]
    for (spec, dataset, scale), group in plain.groupby(["spec", "dataset", "budget_scale"]):
        ident = _section_ident(spec, dataset, scale, several_specs)
        cells = [cells_by_key[key] for key in group["key"]]
        table = {**ident, "spec": spec, "dataset": dataset, "budget_scale": scale}
        table |= dataset_table(group)
        table["code"] = code_versions(group)
        table["figures"] = [link(f, group) for f in _dataset_figures(table, cells, colours)]
        tables.append(table)
    sweeps = []
    swept = frame[frame["sweep_name"].notna()]
    for (spec, name, scale), group in swept.groupby(["spec", "sweep_name", "budget_scale"]):
        ident = _section_ident(spec, f"{name} sweep", scale, several_specs)
        parameter = str(group["sweep_parameter"].iloc[0])
        points, label, has_truth = sweep_points(group)
        title = f"{ident['title']}: {label} by {parameter}"
        figure = sweep_figure(f"sweep-{ident['id']}", title, points, parameter, label, colours)
        sweep = {**ident, "spec": spec, "sweep": name, "parameter": parameter}
        sweep |= sweep_table(points, label, has_truth)
        sweep["code"] = code_versions(group)
        sweep["figures"] = [link(figure, group)]
        sweeps.append(sweep)
    report = {
        "sources": list(sources),
        "tables": tables,
        "sweeps": sweeps,
        "runs": runs_summary(frame),
    }
    return report, figures


def _dataset_figures(
    table: Mapping[str, Any], cells: Sequence[Mapping[str, Any]], colours: Mapping[str, str]
) -> list[ReportFigure]:
    """The dataset's budget-value curves (none on two-arm data) and training curves."""
    methods = ordered_methods(cell["method"] for cell in cells)
    figures = []
    curves = mean_budget_curves(cells, methods)
    if len(curves):
        title = f"Budget-value curves: {table['title']} (mean over seeds)"
        budget = table["budget"]["mean"]
        figures.append(
            budget_value_figure(f"budget-value-{table['id']}", title, curves, colours, budget)
        )
    history = first_seed_histories(cells, methods)
    if len(history):
        title = f"Training curves: {table['title']} (smallest seed per method)"
        figures.append(training_figure(f"training-{table['id']}", title, history, colours))
    return figures


def _section_ident(spec: str, name: str, scale: float, several_specs: bool) -> dict[str, str]:
    """A section's title and its file-name-safe id, unique across specs and budget scales."""
    title = f"{name} (spec {spec})" if several_specs else name
    if scale != 1.0:
        title += f", budget ×{scale:g}"
    ident = re.sub(r"[^a-z0-9.]+", "-", f"{spec}-{name}-x{scale:g}".lower()).strip("-")
    return {"id": ident, "title": title}


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


# --- the markdown ----------------------------------------------------------------------------


def render_markdown(report: Mapping[str, Any]) -> str:
    """The results page, from the report's JSON (so it shows no number the JSON lacks)."""
    runs = report["runs"]
    sources = ", ".join(f"`{source}`" for source in report["sources"])
    lines = [
        "# Results",
        "",
        f"Generated by `bidfcl report` from {runs['cells']} benchmark cells in {sources}; every "
        f"number below comes from those cells and is also in [`{report['json']}`]"
        f"({report['json']}). Do not edit by hand: rerun `bidfcl report`.",
        "",
        *_conventions(),
    ]
    for table in report["tables"]:
        lines += _table_section(table)
    for sweep in report["sweeps"]:
        lines += _sweep_section(sweep)
    lines += _runs_section(runs)
    return "\n".join(lines).rstrip() + "\n"


def _conventions() -> list[str]:
    return [
        "## How to read the tables",
        "",
        f"- **EOM / {REFERENCE}**: each seed's EOM (doubly robust estimate on `rct_test` of the "
        "revenue per user of the model's budget-meeting Lagrangian policy) divided by "
        f"{REFERENCE}'s on the same seed; mean ± sd (sample sd) over seeds. n/a without "
        f"{REFERENCE} cells.",
        "- **deployed true value**: true revenue per user of the allocation that ships "
        "(simulated data only; data without ground truth shows the estimate instead).",
        f"- **oracle gap closed**: mean over seeds of (v − v_{REFERENCE}) / (oracle − "
        f"v_{REFERENCE}), v the deployed true value on that seed: 0% is {REFERENCE}, 100% the "
        "oracle.",
        "- **spend / budget**: mean ± sd over seeds of the deployed allocation's cost over the "
        "budget (true cost on simulated data, estimated otherwise); the sd over the square root "
        "of the seeds is how far the mean may sit from the budget by chance.",
        "- **vs best baseline**: the best baseline is the non-bidfcl method "
        f"({REFERENCE} included), other than the row's own, with the highest mean deployed true "
        "value (mean EOM on data without ground truth). Δ is the row minus it in that quantity, "
        "paired by seed; p from a paired t-test over seeds (`scipy.stats.ttest_rel`), n/a with "
        "fewer than two paired seeds or differences without variance; wins counts the seeds "
        "where the row is higher.",
        "- AUCC is shown on two-arm data, which has no budget-value curve.",
        "- Under each table, every bidfcl-* method against every other method, paired the "
        "same way, then its Bridge: the share of Bridge steps after which the upper (RCT "
        "decision) loss on the held-out RCT batch was lower (mean over seeds), the mean gate "
        "in the last epoch, the constant gate bidfcl-fixed chose on rct_val (seeds per gate), "
        "and the lowest and highest spend / budget over seeds.",
        "",
    ]


def _table_section(table: Mapping[str, Any]) -> list[str]:
    truth = table["has_truth"]
    metric_name = "deployed true value" if truth else "EOM"
    seeds = ", ".join(str(seed) for seed in table["seeds"])
    lines = [
        f"## {table['title']}",
        "",
        f"Spec `{table['spec']}`; {table['n_treatments']} arms; budget "
        f"{_mean_sd(table['budget'], 3)} per user ({table['budget_scale']:g}× the default); "
        f"seeds {seeds}; ground truth: {'yes' if truth else 'no (estimates only)'}; code "
        f"{_code_text(table['code'])}.",
        "",
    ]
    if table["best_baseline"] is None:
        lines += ["Best baseline: none (no non-bidfcl method with a value).", ""]
    else:
        runner_up = table["runner_up"] or "none"
        lines += [
            f"Best baseline: **{table['best_baseline']}** (highest mean {metric_name} among "
            f"non-bidfcl methods); its own row is compared with the runner-up, {runner_up}.",
            "",
        ]
    columns = _table_columns(table)
    rows = [[render(row) for _, render in columns] for row in table["rows"]]
    if table["oracle"] is not None:
        rows.append([_oracle_cell(name, table["oracle"]) for name, _ in columns])
    lines += _markdown_table([name for name, _ in columns], rows)
    lines += _pairs_section(table)
    for figure in table["figures"]:
        lines += _figure_block(figure)
    return lines


def _table_columns(table: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(header, row → text) for each column the table's data supports."""
    delta = "Δ true value" if table["has_truth"] else "Δ EOM"
    columns: list[tuple[str, Any]] = [
        ("method", lambda r: r["method"]),
        ("seeds", lambda r: str(r["n_seeds"])),
        (f"EOM / {REFERENCE}", lambda r: _mean_sd(r["eom_ratio"], 4)),
    ]
    if table["has_truth"]:
        columns += [
            ("deployed true value", lambda r: _mean_sd(r["deployed_true_value"], 3)),
            ("oracle gap closed", lambda r: _mean_sd(r["gap_closed"], 1, percent=True)),
            ("true spend / budget", lambda r: _mean_sd(r["true_spend_ratio"], 3)),
        ]
    else:
        columns += [
            ("deployed value (est.)", lambda r: _mean_sd(r["deployed_value"], 3)),
            ("spend / budget (est.)", lambda r: _mean_sd(r["spend_ratio"], 3)),
        ]
    if table["two_arms"]:
        columns.append(("AUCC", lambda r: _mean_sd(r["aucc"], 4)))
    columns += [
        ("vs", lambda r: r["versus"]["baseline"] if r["versus"] else EMPTY),
        (delta, lambda r: _signed(r["versus"]["mean_diff"], 3) if r["versus"] else EMPTY),
        ("p", lambda r: _p_value(r["versus"]["p_value"]) if r["versus"] else EMPTY),
        ("wins", lambda r: f"{r['versus']['wins']}/{r['versus']['n']}" if r["versus"] else EMPTY),
    ]
    return columns


def _pairs_section(table: Mapping[str, Any]) -> list[str]:
    """Each bidfcl-* method against every other method, paired by seed, with what its
    Bridge did and the spread of its spend over seeds."""
    if not table["pairs"]:
        return []
    others = [row["method"] for row in table["rows"]]
    metric = "deployed true value" if table["has_truth"] else "EOM"
    lines = [
        f"Paired by seed, each bidfcl-* method minus each other method in {metric}: "
        "Δ (p, wins / seeds).",
        "",
    ]
    rows = []
    for pair in table["pairs"]:
        cells = {c["baseline"]: c for c in pair["versus"]}
        rows.append(
            [pair["method"]]
            + [_pair_text(cells[other]) if other in cells else EMPTY for other in others]
        )
    lines += _markdown_table(["method", *others], rows)
    lines += _markdown_table(
        [
            "method",
            "Bridge steps that helped",
            "last-epoch mean gate",
            "fixed gate chosen",
            "spend / budget, seed range",
        ],
        [
            [
                pair["method"],
                _mean_sd(pair["helpful_share"], 1, percent=True),
                _mean_sd(pair["final_gate"], 2),
                ", ".join(f"{g}: {n}" for g, n in pair["chosen_gates"].items()) or EMPTY,
                f"{_number_text(pair['spend_range']['min'], 3)} – "
                f"{_number_text(pair['spend_range']['max'], 3)}",
            ]
            for pair in table["pairs"]
        ],
    )
    return lines


def _pair_text(comparison: Mapping[str, Any]) -> str:
    return (
        f"{_signed(comparison['mean_diff'], 3)} ({_p_value(comparison['p_value'])}, "
        f"{comparison['wins']}/{comparison['n']})"
    )


def _oracle_cell(column: str, oracle: Mapping[str, Any]) -> str:
    """The oracle row: the true value of the best allocation under the budget, which closes
    its own gap by definition."""
    cells = {
        "method": "oracle (truth)",
        "seeds": str(oracle["n"]),
        "deployed true value": _mean_sd(oracle, 3),
        "oracle gap closed": "100%",
    }
    return cells.get(column, EMPTY)


def _sweep_section(sweep: Mapping[str, Any]) -> list[str]:
    values = sweep["values"]
    lines = [
        f"## {sweep['title']}",
        "",
        f"Spec `{sweep['spec']}`; x = `{sweep['parameter']}`; y = {sweep['y']}, mean ± sd over "
        "seeds (seeds in brackets)"
        + ("" if sweep["has_truth"] else "; no ground truth, so estimates only")
        + f"; code {_code_text(sweep['code'])}.",
        "",
    ]
    header = ["method", *(f"{sweep['parameter']} = {value:g}" for value in values)]
    rows = []
    for row in sweep["rows"]:
        by_x = {point["x"]: point for point in row["points"]}
        rows.append([row["method"], *(_sweep_cell(by_x.get(value)) for value in values)])
    lines += _markdown_table(header, rows)
    for figure in sweep["figures"]:
        lines += _figure_block(figure)
    return lines


def _sweep_cell(point: Mapping[str, Any] | None) -> str:
    if point is None:
        return EMPTY
    return f"{_mean_sd(point, 4)} ({point['n_seeds']})"


def _figure_block(figure: Mapping[str, Any]) -> list[str]:
    """The figure, its data file and, beside it, where its cells ran."""
    return [
        f"![{figure['title']}]({figure['png']})",
        "",
        f"*{figure['title']}.* Data for `dvc plots`: [`{figure['data']}`]({figure['data']}). "
        f"Ran on: {_devices_text(figure['devices'])}. {_gpu_text(figure['gpus'])}.",
        "",
    ]


def _runs_section(runs: Mapping[str, Any]) -> list[str]:
    versions = "; ".join(
        f"`{v['code_version']}` (git {v['git_commit'] or 'not recorded'}, {v['cells']} cells)"
        for v in runs["code_versions"]
    )
    superseded = runs.get("superseded", 0)
    hours = runs["total_seconds"] / 3600
    lines = [
        "## Runs",
        "",
        f"- Cells: {runs['cells']}"
        + (f" ({superseded} earlier runs of the same grid points not shown)" if superseded else "")
        + ".",
        f"- Specs: {', '.join(runs['specs'])}.",
        f"- Seeds: {', '.join(str(seed) for seed in runs['seeds'])}.",
        f"- Code versions: {versions}.",
        f"- Devices: {_devices_text(runs['devices'])}.",
        f"- {_gpu_text(runs['gpus'])}.",
        f"- Total compute: {runs['total_seconds']:.0f} s ({hours:.2f} h)"
        + (
            f"; {runs['cells_without_seconds']} cells recorded no time."
            if runs["cells_without_seconds"]
            else "."
        ),
        f"- Finished: {runs['first_finished'] or 'not recorded'} to "
        f"{runs['last_finished'] or 'not recorded'}.",
        "",
    ]
    rows = [
        [
            m["method"],
            str(m["cells"]),
            _number_text(m["seconds"], 0),
            _number_text(m["seconds_per_epoch"], 2),
        ]
        for m in runs["methods"]
    ]
    return lines + _markdown_table(["method", "cells", "compute (s)", "s / epoch (mean)"], rows)


def _devices_text(devices: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(f"{d['device']} ({d['cells']} cells)" for d in devices)


def _gpu_text(gpus: Sequence[str]) -> str:
    return f"GPU: {', '.join(gpus)}" if gpus else NO_GPU


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def _number_text(value: Any, digits: int) -> str:
    return NOT_AVAILABLE if _missing(value) else f"{value:.{digits}f}"


def _mean_sd(stat: Mapping[str, Any], digits: int, percent: bool = False) -> str:
    """``mean ± sd``; the mean alone from one seed; n/a with none."""
    scale, unit = (100.0, "%") if percent else (1.0, "")
    mean, sd = stat.get("mean"), stat.get("sd")
    if _missing(mean):
        return NOT_AVAILABLE
    text = f"{mean * scale:.{digits}f}{unit}"
    return text if _missing(sd) else f"{text} ± {sd * scale:.{digits}f}{unit}"


def _signed(value: Any, digits: int) -> str:
    return NOT_AVAILABLE if _missing(value) else f"{value:+.{digits}f}"


def _p_value(value: Any) -> str:
    if _missing(value):
        return NOT_AVAILABLE
    return "<0.001" if value < 0.001 else f"{value:.3f}"


# --- the README block ------------------------------------------------------------------------


def readme_block(report: Mapping[str, Any], link: str) -> str:
    """A few key numbers for the README: each bidfcl-* method's EOM relative to tsm-rct and
    its paired difference from the best baseline, per dataset, with a link to the full page."""
    runs = report["runs"]
    lines = [
        f"Generated by `bidfcl report` from {runs['cells']} cells of spec "
        f"{', '.join(runs['specs'])}; all tables, figures and runs in [{link}]({link}). "
        "Δ is the paired difference by seed from the best baseline in deployed true value "
        f"(† in EOM: no ground truth). {_gpu_text(runs['gpus'])}.",
        "",
    ]
    rows = [
        [
            table["title"] + ("" if table["has_truth"] else " †"),
            row["method"],
            _mean_sd(row["eom_ratio"], 4),
            row["versus"]["baseline"] if row["versus"] else EMPTY,
            _signed(row["versus"]["mean_diff"], 3) if row["versus"] else EMPTY,
            _p_value(row["versus"]["p_value"]) if row["versus"] else EMPTY,
            f"{row['versus']['wins']}/{row['versus']['n']}" if row["versus"] else EMPTY,
        ]
        for table in report["tables"]
        for row in table["rows"]
        if is_own(row["method"])
    ]
    if not rows:
        return "\n".join(
            [*lines, "No bidfcl-* method on a dataset outside the sweeps in these runs.", ""]
        )
    header = ["dataset", "method", f"EOM / {REFERENCE}", "best baseline", "Δ", "p", "wins"]
    return "\n".join(lines + _markdown_table(header, rows))


def update_readme(readme: Path, block: str) -> None:
    """Replace the lines between the README's results markers with ``block``."""
    lines, begin, end = _marker_lines(readme)
    text = "".join([*lines[: begin + 1], "\n", block, "\n", *lines[end:]])
    atomic_write(readme, lambda tmp: tmp.write_text(text))


def _marker_lines(readme: Path) -> tuple[list[str], int, int]:
    """The README's lines and the indices of its begin and end marker lines."""
    try:
        lines = readme.read_text().splitlines(keepends=True)
    except OSError as error:
        raise ReportError(f"{readme}: cannot read the README: {error}") from error
    stripped = [line.strip() for line in lines]
    for marker in (BEGIN_MARKER, END_MARKER):
        if stripped.count(marker) != 1:
            found = "no" if marker not in stripped else "more than one"
            raise ReportError(
                f"{readme}: {found} '{marker}' line; the generated results go between one "
                f"'{BEGIN_MARKER}' line and one '{END_MARKER}' line"
            )
    begin, end = stripped.index(BEGIN_MARKER), stripped.index(END_MARKER)
    if end < begin:
        raise ReportError(f"{readme}: '{END_MARKER}' comes before '{BEGIN_MARKER}'")
    return lines, begin, end
