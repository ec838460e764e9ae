"""The results report: its numbers equal a hand computation from the cells, data without
ground truth shows no true value, figures come with their data, the README block is
replaced, the GPU is named only when one ran, and a rerun writes the same page."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bidfcl.io import write_json
from bidfcl.report import (
    BEGIN_MARKER,
    END_MARKER,
    NO_GPU,
    ReportError,
    ReportSummary,
    cell_frame,
    paired_comparison,
    write_report,
)

SEEDS = (100, 101, 102)
CPU = "cpu: Test CPU (2 cores)"
GPU = "cuda: NVIDIA H200"
BOGUS_TRUTH = 999.123  # a true value a cell without ground truth must never show

# The simulated dataset: tsm-rct has the best EOM but tsm-both the best deployed true value,
# so a best baseline chosen on the wrong quantity shows.
TRUE_VALUE = {
    "tsm-rct": [21.00, 21.10, 20.95],
    "tsm-both": [21.30, 21.25, 21.40],
    "bidfcl-ppl": [21.50, 21.35, 21.60],
}
TRUE_COST = {
    "tsm-rct": [3.9, 4.0, 3.95],
    "tsm-both": [3.8, 3.85, 3.9],
    "bidfcl-ppl": [4.0, 3.9, 3.8],
}
EOM = {
    "tsm-rct": [22.50, 22.40, 22.60],
    "tsm-both": [22.00, 22.10, 21.90],
    "bidfcl-ppl": [22.20, 22.30, 22.25],
}
ORACLE = [22.00, 22.10, 21.90]
BUDGET = [3.96, 3.97, 3.95]  # each seed's data sets its own default budget

# The two-arm hybrid without truth: tsm-rct has the best EOM, tsm-both the best deployed
# estimate, so again the wrong quantity would pick another baseline.
HYBRID_EOM = {
    "tsm-rct": [5.00, 5.10, 4.90],
    "tsm-both": [4.80, 4.70, 4.90],
    "bidfcl-ppl": [5.05, 5.20, 4.95],
}
HYBRID_DEPLOYED = {"tsm-rct": 4.0, "tsm-both": 6.0, "bidfcl-ppl": 5.0}
SWEEP_GAP = {"tsm-rct": 0.05, "tsm-both": 0.03, "bidfcl-ppl": 0.02}  # share of the oracle lost
HELPFUL = [0.40, 0.50, 0.75]  # bidfcl-ppl's share of helpful Bridge steps, per seed
LAST_GATE = [0.6, 0.7, 0.8]


def _cell(
    dataset: str,
    method: str,
    index: int,
    *,
    has_truth: bool = True,
    n_treatments: int = 5,
    sweep: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    device: str = CPU,
    finished_at: str = "2026-12-01T20:00:00+00:00",
) -> dict[str, Any]:
    seed = SEEDS[index]
    budget = BUDGET[index]
    identity = f"{dataset}/{method}/{seed}/{finished_at}"
    curve = None
    if n_treatments > 2:
        curve = [
            {
                "budget": budget * multiple,
                "eom": EOM[method][index] * multiple**0.1,
                "eom_ci_low": EOM[method][index] * multiple**0.1 - 0.4,
                "eom_ci_high": EOM[method][index] * multiple**0.1 + 0.4,
                "cost": budget * multiple,
                "true_revenue": TRUE_VALUE[method][index] * multiple**0.1 if has_truth else None,
                "true_cost": budget * multiple if has_truth else None,
                "lam": 1.0 / multiple,
                "budget_met": True,
            }
            for multiple in (0.5, 1.0, 2.0)
        ]
    history = [  # the learner records no train loss: only the reference's history has one
        {"epoch": epoch, "val_loss": index + 2.5 / (epoch + 1), "val_eom": 20 - 1 / (epoch + 1)}
        | ({"train_loss": 2.0 / (epoch + 1)} if method == "tsm-rct" else {})
        for epoch in range(4)
    ]
    return {
        "key": hashlib.sha1(identity.encode()).hexdigest()[:12],
        "spec": "test",
        "dataset": dataset,
        "recipe": {"kind": "simulate" if has_truth else "hybrid", "settings": {}},
        "sweep": sweep,
        "method": method,
        "seed": seed,
        "budget_scale": 1.0,
        "budget": budget,
        "n_treatments": n_treatments,
        "has_truth": has_truth,
        "sizes": {"obs": 1000, "rct_train": 100, "rct_val": 50, "rct_test": 80},
        "metrics": metrics,
        "curve": curve,
        "training": {
            "history": history,
            "epochs_run": 4,
            "best_epoch": 2,
            "fit_seconds": 2.0,
            "seconds_per_epoch": 0.5,
        },
        "train_config": {},
        "bilevel": (
            {
                "hypergradient_steps": 20,
                "helpful_share": HELPFUL[index],
                "gate_mean_per_epoch": [0.5, LAST_GATE[index]],
            }
            if method.startswith("bidfcl")
            else None
        ),
        "code_version": "abc123def456",
        "git_commit": "fd08e77",
        "device": device,
        "seconds": 10.0,
        "finished_at": finished_at,
    }


def simulated_cells(device: str = CPU) -> list[dict[str, Any]]:
    return [
        _cell(
            "default",
            method,
            i,
            device=device,
            metrics={
                "eom": EOM[method][i],
                "eom_ci_low": EOM[method][i] - 0.4,
                "eom_ci_high": EOM[method][i] + 0.4,
                "deployed_value": TRUE_VALUE[method][i] + 0.1,
                "deployed_cost": TRUE_COST[method][i],
                "true_value": TRUE_VALUE[method][i] + 0.01,
                "deployed_true_value": TRUE_VALUE[method][i],
                "deployed_true_cost": TRUE_COST[method][i],
                "oracle_value": ORACLE[i],
                "budget_curve_area": 30.0,
                "some_future_metric": "ignored",
            },
        )
        for method in TRUE_VALUE
        for i in range(len(SEEDS))
    ]


def hybrid_cells() -> list[dict[str, Any]]:
    return [
        _cell(
            "hillstrom",
            method,
            i,
            has_truth=False,
            n_treatments=2,
            metrics={
                "eom": HYBRID_EOM[method][i],
                "deployed_value": HYBRID_DEPLOYED[method] + i / 10,
                "deployed_cost": 0.5,
                "aucc": 0.6 + i / 100,
                "deployed_true_value": BOGUS_TRUTH,
                "oracle_value": BOGUS_TRUTH,
                "true_value": None,
            },
        )
        for method in HYBRID_EOM
        for i in range(len(SEEDS))
    ]


def sweep_cells() -> list[dict[str, Any]]:
    """A bias sweep and an RCT-size sweep on simulated data: deployed true value is the
    oracle less a method's gap, which grows with the sweep value for the bias sweep."""
    cells = []
    for name, parameter, values in (("bias", "bias", (1.0, 4.0)), ("rct", "rct_size", (5e3, 2e4))):
        for x in values:
            for method, gap in SWEEP_GAP.items():
                for i in range(len(SEEDS)):
                    value = ORACLE[i] * (1 - gap * (x if name == "bias" else 1) + i / 1000)
                    metrics = {
                        "eom": value + 1,
                        "deployed_true_value": value,
                        "deployed_true_cost": 3.9,
                        "oracle_value": ORACLE[i],
                    }
                    sweep = {"name": name, "parameter": parameter, "value": x}
                    cells.append(_cell(f"{name}={x:g}", method, i, sweep=sweep, metrics=metrics))
    return cells


def write_cells(folder: Path, cells: list[dict[str, Any]]) -> Path:
    for cell in cells:
        write_json(folder / "cells" / f"{cell['key']}.json", cell)
    return folder


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return write_cells(tmp_path / "run", simulated_cells() + hybrid_cells() + sweep_cells())


@dataclass(frozen=True)
class Written:
    out: Path
    markdown: str
    report: dict[str, Any]
    summary: ReportSummary


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Written:
    """One report of every kind of cell, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("report")
    cells = write_cells(root / "run", simulated_cells() + hybrid_cells() + sweep_cells())
    out = root / "docs" / "results.md"
    summary = write_report([cells], out)
    report = json.loads(out.with_suffix(".json").read_text())
    return Written(out, out.read_text(), report, summary)


def report_of(results: Path, out: Path, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    write_report([results], out, **kwargs)
    return out.read_text(), json.loads(out.with_suffix(".json").read_text())


def table_of(report: dict[str, Any], dataset: str) -> dict[str, Any]:
    [table] = [t for t in report["tables"] if t["dataset"] == dataset]
    return table


def row_of(table: dict[str, Any], method: str) -> dict[str, Any]:
    [row] = [r for r in table["rows"] if r["method"] == method]
    return row


def section_of(markdown: str, title: str) -> str:
    """The markdown from heading ``## title`` to the next heading."""
    return markdown.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_tsm_rct_normalised_eom_is_exactly_one(written: Written) -> None:
    markdown, report = written.markdown, written.report
    for dataset in ("default", "hillstrom"):
        ratio = row_of(table_of(report, dataset), "tsm-rct")["eom_ratio"]
        assert (ratio["mean"], ratio["sd"], ratio["n"]) == (1.0, 0.0, 3)
        assert "| tsm-rct | 3 | 1.0000 ± 0.0000 |" in section_of(markdown, dataset)
    expected = np.array(EOM["bidfcl-ppl"]) / np.array(EOM["tsm-rct"])
    ratio = row_of(table_of(report, "default"), "bidfcl-ppl")["eom_ratio"]
    assert ratio["mean"] == pytest.approx(expected.mean(), abs=1e-12)
    assert ratio["sd"] == pytest.approx(expected.std(ddof=1), abs=1e-12)


def test_a_paired_comparison_counts_wins_and_exact_ties_apart() -> None:
    per_seed = pd.DataFrame({"learned": [1.0, 2.0, 3.0, 4.0], "frozen": [1.0, 2.5, 2.0, 4.0]})

    versus = paired_comparison(per_seed, "learned", "frozen")

    assert (versus["wins"], versus["ties"], versus["n"]) == (1, 2, 4)


def test_gap_closed_and_paired_test_equal_a_hand_computation(written: Written) -> None:
    markdown, report = written.markdown, written.report
    own, reference, best = (np.array(TRUE_VALUE[m]) for m in ("bidfcl-ppl", "tsm-rct", "tsm-both"))
    shares = (own - reference) / (np.array(ORACLE) - reference)
    row = row_of(table_of(report, "default"), "bidfcl-ppl")
    assert row["gap_closed"]["mean"] == pytest.approx(shares.mean(), abs=1e-12)
    assert row["gap_closed"]["sd"] == pytest.approx(shares.std(ddof=1), abs=1e-12)
    versus = row["versus"]
    assert versus["baseline"] == "tsm-both"
    assert versus["mean_diff"] == pytest.approx((own - best).mean(), abs=1e-12)
    assert versus["p_value"] == pytest.approx(stats.ttest_rel(own, best).pvalue, abs=1e-12)
    assert (versus["wins"], versus["n"]) == (int((own > best).sum()), 3)
    spend = np.array(TRUE_COST["bidfcl-ppl"]) / np.array(BUDGET)
    assert row["true_spend_ratio"]["mean"] == pytest.approx(spend.mean(), abs=1e-12)
    gap = f"{shares.mean() * 100:.1f}% ± {shares.std(ddof=1) * 100:.1f}%"
    p_value = f"{stats.ttest_rel(own, best).pvalue:.3f}"
    assert (
        f"| {gap} | {spend.mean():.3f} ± {spend.std(ddof=1):.3f} | tsm-both "
        f"| {(own - best).mean():+.3f} | {p_value} |" in (section_of(markdown, "default"))
    )
    assert row_of(table_of(report, "default"), "tsm-rct")["gap_closed"]["mean"] == 0.0
    oracle = table_of(report, "default")["oracle"]
    assert oracle["mean"] == pytest.approx(np.mean(ORACLE), abs=1e-12)


def test_each_bidfcl_method_is_paired_with_every_other_and_its_bridge_is_shown(
    written: Written,
) -> None:
    markdown, report = written.markdown, written.report
    [pair] = table_of(report, "default")["pairs"]
    own = np.array(TRUE_VALUE["bidfcl-ppl"])
    for other in ("tsm-rct", "tsm-both"):
        [versus] = [c for c in pair["versus"] if c["baseline"] == other]
        theirs = np.array(TRUE_VALUE[other])
        assert versus["mean_diff"] == pytest.approx((own - theirs).mean(), abs=1e-12)
        assert versus["p_value"] == pytest.approx(stats.ttest_rel(own, theirs).pvalue, abs=1e-12)
    assert pair["helpful_share"]["mean"] == pytest.approx(np.mean(HELPFUL), abs=1e-12)
    assert pair["final_gate"]["mean"] == pytest.approx(np.mean(LAST_GATE), abs=1e-12)
    spend = np.array(TRUE_COST["bidfcl-ppl"]) / np.array(BUDGET)
    assert (pair["spend_range"]["min"], pair["spend_range"]["max"]) == (spend.min(), spend.max())
    reference = np.array(TRUE_VALUE["tsm-rct"])
    p_value = stats.ttest_rel(own, reference).pvalue
    wins = int((own > reference).sum())
    section = section_of(markdown, "default")
    assert f"| bidfcl-ppl | {(own - reference).mean():+.3f} ({p_value:.3f}, {wins}/3) |" in section
    assert f"| bidfcl-ppl | {np.mean(HELPFUL) * 100:.1f}% ± " in section


def test_best_baseline_is_chosen_on_true_value_or_on_eom_without_truth(written: Written) -> None:
    markdown, report = written.markdown, written.report
    simulated, hybrid = table_of(report, "default"), table_of(report, "hillstrom")
    assert (simulated["best_baseline"], simulated["runner_up"]) == ("tsm-both", "tsm-rct")
    assert (hybrid["best_baseline"], hybrid["runner_up"]) == ("tsm-rct", "tsm-both")
    # the best baseline's own row is compared with the runner-up, never with itself
    assert row_of(simulated, "tsm-both")["versus"]["baseline"] == "tsm-rct"
    assert row_of(simulated, "tsm-rct")["versus"]["baseline"] == "tsm-both"
    assert row_of(hybrid, "bidfcl-ppl")["versus"]["baseline"] == "tsm-rct"
    diff = np.array(HYBRID_EOM["bidfcl-ppl"]) - np.array(HYBRID_EOM["tsm-rct"])
    assert row_of(hybrid, "bidfcl-ppl")["versus"]["mean_diff"] == pytest.approx(diff.mean())
    assert "Best baseline: **tsm-both** (highest mean deployed true value" in markdown
    assert "Best baseline: **tsm-rct** (highest mean EOM" in markdown


def test_data_without_truth_shows_no_true_numbers(written: Written) -> None:
    markdown, report = written.markdown, written.report
    hybrid = table_of(report, "hillstrom")
    assert hybrid["has_truth"] is False and hybrid["oracle"] is None
    for row in hybrid["rows"]:
        assert not {"deployed_true_value", "gap_closed", "true_spend_ratio"} & row.keys()
        assert row["deployed_value"]["n"] == 3 and row["aucc"]["n"] == 3
    section = section_of(markdown, "hillstrom")
    assert "true" not in section.split("\n|---")[0].split("\n")[-1]  # the table header
    assert "oracle" not in section
    assert f"{BOGUS_TRUTH}" not in json.dumps(report) and f"{BOGUS_TRUTH:.3f}" not in markdown
    assert "| AUCC |" in section and "| AUCC |" not in section_of(markdown, "default")
    frame = cell_frame(hybrid_cells())  # a stray true metric is dropped as it is read
    assert frame[["deployed_true_value", "oracle_value"]].isna().all().all()


def test_figures_are_pngs_with_dvc_data_and_are_linked(written: Written) -> None:
    out, summary, markdown, report = written.out, written.summary, written.markdown, written.report
    figures = [f for section in report["tables"] + report["sweeps"] for f in section["figures"]]
    names = sorted(Path(f["png"]).stem for f in figures)
    assert names == [
        "budget-value-test-default-x1",  # none for the two-arm hillstrom data
        "sweep-test-bias-sweep-x1",
        "sweep-test-rct-sweep-x1",
        "training-test-default-x1",
        "training-test-hillstrom-x1",
    ]
    for figure in figures:
        png, data = out.parent / figure["png"], out.parent / figure["data"]
        assert png.parent == out.parent / "figures"
        assert png.read_bytes().startswith(b"\x89PNG")
        records = json.loads(data.read_text())
        assert records and all(isinstance(r, dict) and "method" in r for r in records)
        assert f"]({figure['png']})" in markdown and f"]({figure['data']})" in markdown
        assert png in summary.figures and data in summary.figures
    curves = json.loads((out.parent / "figures/budget-value-test-default-x1.json").read_text())
    at_budget = [r for r in curves if r["method"] == "tsm-rct" and r["budget_multiple"] == 1.0]
    assert [r["eom"] for r in at_budget] == [pytest.approx(np.mean(EOM["tsm-rct"]))]
    assert [r["budget"] for r in at_budget] == [pytest.approx(np.mean(BUDGET))]
    training = json.loads((out.parent / "figures/training-test-default-x1.json").read_text())
    assert {(r["method"], r["seed"]) for r in training} == {(m, SEEDS[0]) for m in TRUE_VALUE}
    losses = [r["val_loss"] for r in training if r["method"] == "bidfcl-ppl"]
    assert losses == [pytest.approx(2.5 / (epoch + 1)) for epoch in range(4)]
    sweep = json.loads((out.parent / "figures/sweep-test-rct-sweep-x1.json").read_text())
    assert sorted({r["rct_size"] for r in sweep}) == [5000.0, 20000.0]
    assert summary.n_cells == 9 + 9 + 36
    assert summary.datasets[:2] == ("bias=1", "bias=4") and "hillstrom" in summary.datasets


def test_sweep_points_are_means_over_seeds_relative_to_the_oracle(written: Written) -> None:
    markdown, report = written.markdown, written.report
    [bias] = [s for s in report["sweeps"] if s["sweep"] == "bias"]
    [row] = [r for r in bias["rows"] if r["method"] == "tsm-both"]
    [point] = [p for p in row["points"] if p["x"] == 4.0]
    expected = [1 - SWEEP_GAP["tsm-both"] * 4 + i / 1000 for i in range(3)]
    assert point["mean"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert point["sd"] == pytest.approx(np.std(expected, ddof=1), abs=1e-12)
    assert "| method | bias = 1 | bias = 4 |" in markdown
    assert f"| {np.mean(expected):.4f} ± {np.std(expected, ddof=1):.4f} (3) |" in markdown


def test_readme_block_is_replaced_from_the_report_json(results: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Project\n\nintro\n\n{BEGIN_MARKER}\nold numbers\n{END_MARKER}\n\nend\n")
    out = tmp_path / "docs" / "results.md"
    summary = write_report([results], out, readme=readme)
    text = readme.read_text()
    assert summary.readme == readme
    assert "old numbers" not in text
    assert text.startswith(f"# Project\n\nintro\n\n{BEGIN_MARKER}\n")
    assert text.endswith(f"{END_MARKER}\n\nend\n")
    block = text.split(BEGIN_MARKER)[1].split(END_MARKER)[0]
    assert "[docs/results.md](docs/results.md)" in block
    report = json.loads(out.with_suffix(".json").read_text())
    row = row_of(table_of(report, "default"), "bidfcl-ppl")
    ratio = f"{row['eom_ratio']['mean']:.4f} ± {row['eom_ratio']['sd']:.4f}"
    assert f"| default | bidfcl-ppl | {ratio} | tsm-both | {row['versus']['mean_diff']:+.3f} |" in (
        block
    )
    assert "| hillstrom † | bidfcl-ppl |" in block
    assert "tsm-both |" not in block.replace("| tsm-both |", "")  # only bidfcl-* rows
    write_report([results], out, readme=readme)
    assert readme.read_text() == text  # the block is replaced, not appended


def test_readme_without_markers_fails_before_writing(results: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Project\n{BEGIN_MARKER}\nno end marker\n")
    out = tmp_path / "docs" / "results.md"
    with pytest.raises(ReportError, match=END_MARKER) as failure:
        write_report([results], out, readme=readme)
    assert str(readme) in str(failure.value)
    assert not out.exists() and not (tmp_path / "docs").exists()
    readme.write_text("# Project\n")
    with pytest.raises(ReportError, match=f"{readme}: no '{BEGIN_MARKER}' line"):
        write_report([results], out, readme=readme)


def test_without_a_gpu_the_report_says_not_measured(written: Written) -> None:
    markdown, report = written.markdown, written.report
    assert report["runs"]["gpus"] == []
    assert f"- {NO_GPU}." in section_of(markdown, "Runs")
    figure_lines = [line for line in markdown.splitlines() if line.startswith("*")]
    assert len(figure_lines) == 5
    assert all(f"Ran on: {CPU} (" in line and f"{NO_GPU}." in line for line in figure_lines)
    assert "H200" not in markdown


def test_a_gpu_is_named_beside_the_figures_of_its_cells(tmp_path: Path) -> None:
    results = write_cells(tmp_path / "run", simulated_cells(device=GPU) + hybrid_cells())
    markdown, report = report_of(results, tmp_path / "results.md")
    assert report["runs"]["gpus"] == ["NVIDIA H200"]
    assert "- GPU: NVIDIA H200." in section_of(markdown, "Runs")
    assert NO_GPU not in section_of(markdown, "Runs")
    for line in section_of(markdown, "default").splitlines():
        if line.startswith("*"):
            assert f"Ran on: {GPU} (9 cells). GPU: NVIDIA H200." in line
    for line in section_of(markdown, "hillstrom").splitlines():
        if line.startswith("*"):
            assert f"{NO_GPU}." in line and "H200" not in line


def test_rerun_is_identical_and_repeated_cells_count_once(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    first = report_of(results, out)
    copy = tmp_path / "copy"
    shutil.copytree(results, copy)
    summary = write_report([results, copy], out)
    assert summary.n_cells == 54
    second = out.read_text(), json.loads(out.with_suffix(".json").read_text())
    assert second[0] == first[0].replace("`run`", "`run`, `copy`")
    assert second[1]["tables"] == first[1]["tables"] and second[1]["sweeps"] == first[1]["sweeps"]
    assert report_of(results, out) == first


def test_a_rerun_grid_point_keeps_its_latest_run(results: Path, tmp_path: Path) -> None:
    rerun = _cell(
        "default",
        "bidfcl-ppl",
        0,
        metrics={**simulated_cells()[6]["metrics"], "eom": 30.0},
        finished_at="2026-12-02T00:00:00+00:00",
    )
    write_cells(results, [rerun])
    markdown, report = report_of(results, tmp_path / "results.md")
    assert report["runs"]["cells"] == 54 and report["runs"]["superseded"] == 1
    row = row_of(table_of(report, "default"), "bidfcl-ppl")
    assert row["n_seeds"] == 3
    expected = np.array([30.0, *EOM["bidfcl-ppl"][1:]]) / np.array(EOM["tsm-rct"])
    assert row["eom_ratio"]["mean"] == pytest.approx(expected.mean())
    assert "1 earlier runs of the same grid points not shown" in markdown


def test_without_tsm_rct_the_normalised_columns_are_not_available(tmp_path: Path) -> None:
    cells = [c for c in simulated_cells() if c["method"] != "tsm-rct"]
    markdown, report = report_of(write_cells(tmp_path / "run", cells), tmp_path / "results.md")
    table = table_of(report, "default")
    assert table["reference_present"] is False
    for row in table["rows"]:
        assert row["eom_ratio"]["n"] == 0 and row["gap_closed"]["n"] == 0
    assert "| bidfcl-ppl | 3 | n/a |" in markdown
    # one baseline left: bidfcl-ppl is compared with it, and it has no baseline of its own
    assert row_of(table, "tsm-both")["versus"] is None
    assert row_of(table, "bidfcl-ppl")["versus"]["baseline"] == "tsm-both"


def test_one_seed_gives_no_p_value(tmp_path: Path) -> None:
    cells = [c for c in simulated_cells() if c["seed"] == SEEDS[0]]
    markdown, report = report_of(write_cells(tmp_path / "run", cells), tmp_path / "results.md")
    versus = row_of(table_of(report, "default"), "bidfcl-ppl")["versus"]
    assert versus["n"] == 1 and versus["p_value"] is None
    assert "| tsm-both | +0.200 | n/a | 1/1 |" in markdown


def test_missing_or_empty_result_folders_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no cells/ folder"):
        write_report([tmp_path / "nowhere"], tmp_path / "results.md")
    (tmp_path / "empty" / "cells").mkdir(parents=True)
    with pytest.raises(ReportError, match="no finished cells"):
        write_report([tmp_path / "empty"], tmp_path / "results.md")


def test_the_committed_report_and_readme_block_are_what_the_saved_cells_give(
    tmp_path: Path,
) -> None:
    """docs/results.md and the README's block are regenerated, never edited by hand."""
    repo = Path(__file__).resolve().parents[1]
    runs = sorted((repo / "benchmarks" / "runs").iterdir())
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "runs").symlink_to(repo / "benchmarks" / "runs")
    readme = tmp_path / "README.md"
    readme.write_text((repo / "README.md").read_text())
    dirs = [tmp_path / "benchmarks" / "runs" / d.name for d in runs]  # as `make results`
    write_report(dirs, tmp_path / "docs" / "results.md", readme=readme)
    assert readme.read_text() == (repo / "README.md").read_text()
    committed = (repo / "docs" / "results.json").read_text()
    assert json.loads((tmp_path / "docs" / "results.json").read_text()) == json.loads(committed)
