"""The experiment runner: specs, cache keys, one cell's record, and the flow on Dask."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from bidfcl import benchmark
from bidfcl.benchmark import BenchmarkSpec, SpecError
from bidfcl.cli import main
from bidfcl.simulate import SIMULATOR_PRESETS, _rct_sizes, simulator_config

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
SPECS = REPO / "benchmarks" / "specs"
TINY_TRAIN = {"max_epochs": 2, "warm_start_epochs": 1}
TINY_DATA = {"n_obs": 1500, "n_rct": 1500}


def tiny_spec(**changes: Any) -> dict[str, Any]:
    spec = {
        "name": "tiny",
        "seeds": [3],
        "methods": ["tsm-rct", "tsm-obs"],
        "train": TINY_TRAIN,
        "datasets": [{"name": "small", "simulate": TINY_DATA}],
    }
    return spec | changes


def write_spec(folder: Path, spec: dict[str, Any]) -> Path:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("name", ["quick", "paper", "sweeps"])
def test_the_shipped_specs_parse_and_expand_to_a_full_grid(name: str) -> None:
    spec = BenchmarkSpec.load(SPECS / f"{name}.yaml")
    cells = spec.cells(PARAMS)
    assert len(cells) == len(spec.datasets) * len(spec.seeds) * len(spec.methods)
    assert {c.config.method for c in cells} == {variant.method for variant in spec.methods}
    assert all(c.config.seed == c.seed for c in cells)


def test_the_paper_spec_reports_on_held_out_seeds_only() -> None:
    spec = BenchmarkSpec.load(SPECS / "paper.yaml")
    assert len(spec.seeds) >= 10 and min(spec.seeds) >= 100
    assert {"tsm-rct", "tsm-both", "bidfcl-ppl"} <= {variant.name for variant in spec.methods}
    assert any(d.kind == benchmark.HYBRID for d in spec.datasets)


def test_a_sweep_expands_into_one_recipe_per_value() -> None:
    spec = BenchmarkSpec.load(SPECS / "sweeps.yaml")
    rct = [d for d in spec.datasets if d.sweep and d.sweep["name"] == "rct"]
    rows = [_rct_sizes(*_rct_args(d)) for d in rct]
    assert [train for train, _, _ in rows] == [d.sweep["value"] for d in rct]
    assert {test for _, _, test in rows} == {12_000}  # the evaluation stays as precise


def _rct_args(recipe: benchmark.DatasetRecipe) -> tuple[int, tuple[float, float, float]]:
    config = simulator_config(recipe.settings, 0)
    return config.n_rct, config.rct_split


def test_presets_name_the_regimes_with_headroom() -> None:
    scarce = simulator_config({"preset": "scarce-rct-2k"}, 0)
    assert _rct_sizes(scarce.n_rct, scarce.rct_split)[0] == 2_000
    biased = simulator_config({"preset": "strong-bias", "n_obs": 10}, 5)
    assert (biased.bias, biased.confounding, biased.n_obs, biased.seed) == (4.0, 2.0, 10, 5)
    assert set(SIMULATOR_PRESETS) >= {"default", "scarce-rct-2k", "scarce-rct-5k", "strong-bias"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"methods": ["tsm-nope"]}, "unknown method 'tsm-nope'"),
        ({"methods": [{"name": "x", "method": "tsm-rct", "lr": 1}]}, "name, method and train"),
        ({"methods": ["tsm-rct", {"name": "tsm-rct", "method": "tsm-obs"}]}, "distinct names"),
        ({"colour": "red"}, "unknown keys ['colour']"),
        ({"datasets": [{"name": "a", "simulate": {"bias": -1}}]}, "bias and confounding"),
        ({"datasets": [{"name": "a", "simulate": {"preset": "huge"}}]}, "unknown simulator preset"),
        ({"datasets": [{"name": "a", "simulate": {"n_rows": 3}}]}, "unknown simulator setting"),
        ({"datasets": [{"name": "a", "hybrid": {"source": "criteo"}}]}, "hybrid takes source"),
        ({"datasets": [{"name": "a", "simulate": {}}] * 2}, "distinct names"),
    ],
)
def test_a_bad_spec_is_one_error_naming_the_file(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    path = write_spec(tmp_path, tiny_spec(**change))
    with pytest.raises(SpecError, match=r"spec\.yaml") as error:
        BenchmarkSpec.load(path)
    assert message in str(error.value)


def test_a_bad_train_setting_fails_before_anything_runs(tmp_path: Path, capsys: Any) -> None:
    path = write_spec(tmp_path, tiny_spec(train={"max_epochs": 2, "learning_speed": 3}))
    assert main(["benchmark", str(path), "--out", str(tmp_path / "out")]) == 1
    assert "learning_speed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_named_variant_trains_its_method_with_its_own_settings() -> None:
    variant = {"name": "bidfcl-lr", "method": "bidfcl-ppl", "train": {"bridge_lr": 0.02}}
    spec = BenchmarkSpec.parse(tiny_spec(methods=["bidfcl-ppl", variant]), "test")
    plain, tuned = spec.cells(PARAMS)
    assert (plain.method, tuned.method) == ("bidfcl-ppl", "bidfcl-lr")
    assert plain.config.method == tuned.config.method == "bidfcl-ppl"
    assert (plain.config.bridge_lr, tuned.config.bridge_lr) == (0.03, 0.02)
    assert plain.config.max_epochs == tuned.config.max_epochs  # the spec's settings stay
    bad = {**variant, "train": {"bridge_lr": -1}}
    with pytest.raises(SpecError, match=r"bidfcl-lr: train: .*bridge_lr"):
        BenchmarkSpec.parse(tiny_spec(methods=[bad]), "test").cells(PARAMS)


def test_the_cache_key_follows_data_settings_seed_and_code(tmp_path: Path) -> None:
    cell = BenchmarkSpec.parse(tiny_spec(), "test").cells(PARAMS)[0]
    key = cell.key(tmp_path)
    assert cell.key(tmp_path) == key
    assert replace(cell, seed=4).key(tmp_path) != key
    assert replace(cell, config=replace(cell.config, lr=0.01)).key(tmp_path) != key
    other_data = replace(cell.dataset, settings={**TINY_DATA, "bias": 2.0})
    assert replace(cell, dataset=other_data).key(tmp_path) != key


def test_the_recorded_commit_says_when_the_sources_differ_from_it(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "learner.py").write_text("step = 1\n")
    git("add", "learner.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    recorded = benchmark.git_commit.__wrapped__  # uncached: a worker caches it at its start
    commit = recorded(tmp_path)
    assert commit and "dirty" not in commit
    (tmp_path / "notes.txt").write_text("untracked files do not count")
    assert recorded(tmp_path) == commit
    (tmp_path / "learner.py").write_text("step = 2\n")
    assert recorded(tmp_path) == f"{commit}+dirty"


def test_the_code_version_covers_every_module_a_cell_runs() -> None:
    modules = benchmark._package_imports(Path(benchmark.__file__).parent, "benchmark")
    assert {"methods", "bilevel", "learner", "scoring", "simulate", "allocation"} <= modules
    assert not {"cli", "stages", "report", "registry"} & modules


def test_a_cell_records_scores_truth_curve_and_history(tmp_path: Path) -> None:
    cell = BenchmarkSpec.parse(tiny_spec(), "test").cells(PARAMS)[0]
    record = benchmark.run_cell(cell, tmp_path)
    saved = json.loads((tmp_path / "cells" / f"{record['key']}.json").read_text())
    assert saved["key"] == cell.key(tmp_path / benchmark.SOURCES_DIR)
    assert (saved["dataset"], saved["method"], saved["seed"]) == ("small", "tsm-rct", 3)
    metrics = saved["metrics"]
    assert metrics["oracle_value"] >= metrics["deployed_true_value"]
    assert saved["has_truth"] and saved["budget"] == pytest.approx(metrics["budget"])
    assert len(saved["curve"]) == 8 and len(saved["training"]["history"]) == 2
    assert saved["device"].startswith(("cpu: ", "cuda: "))
    assert benchmark.pending_cells([cell], tmp_path) == []


@pytest.fixture(scope="module")
def flow_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "benchmark_flow", REPO / "flows/benchmark_flow.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_dask_processes_give_the_sequential_results_and_a_rerun_computes_nothing(
    tmp_path: Path, prefect_harness: None, flow_module: ModuleType
) -> None:
    """Two cells on a LocalCluster of two worker processes, against the local runner."""
    path = write_spec(tmp_path, tiny_spec())
    sequential = flow_module.run(path, tmp_path / "seq", PARAMS)
    on_dask = flow_module.run(path, tmp_path / "dask", PARAMS, workers=2)
    assert (sequential["computed"], on_dask["computed"]) == (2, 2)
    assert on_dask["runner"].startswith("dask LocalCluster, 2 processes")
    by_key = {r["key"]: r for r in benchmark.read_cells(tmp_path / "seq")}
    for record in benchmark.read_cells(tmp_path / "dask"):
        assert record["metrics"] == by_key[record["key"]]["metrics"]
        assert record["training"]["history"] == by_key[record["key"]]["training"]["history"]
    rerun = flow_module.run(path, tmp_path / "seq", PARAMS)
    assert (rerun["computed"], rerun["cached"]) == (0, 2)


def test_one_regime_can_run_alone_and_an_unknown_one_is_an_error() -> None:
    spec = BenchmarkSpec.load(SPECS / "paper.yaml")
    cells = spec.only(["strong-bias"]).cells(PARAMS)
    assert {c.dataset.name for c in cells} == {"strong-bias"}
    assert len(cells) == len(spec.seeds) * len(spec.methods)
    assert spec.only([]) == spec
    with pytest.raises(SpecError, match="no dataset"):
        spec.only(["strong-bias", "mars"])
