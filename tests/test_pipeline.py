"""Pipeline stage functions and the promotion gate, without Prefect.

The DVC test builds a throwaway project (git + DVC) in a tmp folder: nothing here touches
the checkout's own git or DVC state.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from bidfcl import pipeline
from bidfcl.allocation import STATUS_INFEASIBLE
from bidfcl.pipeline import GateDecision, PromoteParams, decide

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "params.yaml", "data.dvc", ".dvcignore", "expectations")
FAST_TRAIN = {"max_epochs": 2, "warm_start_epochs": 1, "patience": 1}


def make_project(dest: Path, **sections: dict) -> Path:
    """A throwaway copy of the project's pipeline files, with some params sections updated."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        source = REPO / name
        copy = shutil.copytree if source.is_dir() else shutil.copy
        copy(source, dest / name)
    (dest / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(REPO / ".dvc" / name, dest / ".dvc" / name)
    (dest / ".gitignore").write_text("/mlruns/\n/mlflow.db\n")
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    pipeline.set_params(
        dest / "params.yaml",
        {
            f"{name}.{key}": value
            for name, items in sections.items()
            for key, value in items.items()
        },
    )
    return dest


def challenger(**overrides: object) -> dict:
    base = {"method": "dfcl-ppl", "eom": 10.0, "eom_ci_low": 9.0, "mean_cost": 1.0, "budget": 1.0}
    return base | overrides


# --------------------------------------------------------------------------- the gate


def test_gate_promotes_a_challenger_whose_lower_bound_beats_the_champion() -> None:
    decision = decide(challenger(), True, PromoteParams(margin=0.5), 8.4, None)
    assert decision.promoted
    assert decision.reference == "champion"
    assert decision.tags()["decision"] == "promoted"


def test_gate_rejects_when_the_lower_bound_does_not_clear_champion_plus_margin() -> None:
    decision = decide(challenger(), True, PromoteParams(margin=0.5), 8.6, None)
    assert not decision.promoted
    assert "no better challenger" in decision.reason
    assert decision.tags()["decision"] == "rejected"


def test_gate_rejects_failed_validation_and_overspending_even_when_better() -> None:
    assert "validation" in decide(challenger(), False, PromoteParams(), 1.0, None).reason
    tolerant = PromoteParams(cost_tolerance=0.01)
    over = decide(challenger(mean_cost=1.02), True, tolerant, 1.0, None)
    assert not over.promoted
    assert "exceeds the budget" in over.reason
    within = decide(challenger(mean_cost=1.005), True, tolerant, 1.0, None)
    assert within.promoted


def test_gate_rejects_a_model_whose_deployed_allocation_would_be_all_control() -> None:
    infeasible = challenger(deployed_status=STATUS_INFEASIBLE)
    for champion_eom, baseline_eom in ((1.0, None), (None, 1.0)):
        decision = decide(infeasible, True, PromoteParams(), champion_eom, baseline_eom)
        assert not decision.promoted
        assert "all-control" in decision.reason
    assert decide(challenger(deployed_status="ok"), True, PromoteParams(), 1.0, None).promoted


def test_first_model_must_beat_the_baseline_point_estimate() -> None:
    config = PromoteParams(baseline="tsm-rct")
    assert decide(challenger(), True, config, None, 9.5).promoted
    beaten = decide(challenger(), True, config, None, 10.5)
    assert not beaten.promoted
    assert "does not beat tsm-rct" in beaten.reason
    assert decide(challenger(method="tsm-rct"), True, config, None, 10.0).promoted
    assert not decide(challenger(), True, config, None, None).promoted


def test_decision_tags_are_strings_naming_the_reason() -> None:
    tags = decide(challenger(), True, PromoteParams(), 9.5, None).tags()
    assert set(tags) == {"decision"} | {
        name for name in GateDecision.__dataclass_fields__ if name != "promoted"
    }
    assert all(isinstance(value, str) for value in tags.values())


# --------------------------------------------------------------------------- params


def test_training_methods_put_the_configured_method_first_without_repeats() -> None:
    params = {"train": {"method": "dfcl-ppl", "baselines": ["tsm-rct", "dfcl-ppl"]}}
    assert pipeline.training_methods(params) == ["dfcl-ppl", "tsm-rct"]
    with pytest.raises(ValueError, match="unknown method"):
        pipeline.training_methods({"train": {"method": "nope"}})


def test_unknown_stage_settings_are_named() -> None:
    with pytest.raises(ValueError, match=r"unknown promote setting\(s\) \['marign'\]"):
        pipeline.promote_params({"promote": {"marign": 0.1}})


def test_set_params_keeps_comments_and_other_sections(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    pipeline.set_params(path, {"ingest.source": "/data/batch-7", "evaluate.budget": 2.5})
    params = pipeline.read_params(path)
    assert params["ingest"]["source"] == "/data/batch-7"
    assert params["evaluate"]["budget"] == 2.5
    assert params["train"] == pipeline.read_params(REPO / "params.yaml")["train"]
    assert "# Sections below are read by the pipeline stages" in path.read_text()


def test_every_dvc_stage_reads_an_existing_params_section() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = pipeline.read_params(REPO / "params.yaml")
    for name, stage in stages.items():
        assert stage["cmd"] == f"bidfcl stage {name}"
        assert all(section in params for section in stage["params"])


# --------------------------------------------------------------------------- stages


def test_replace_dir_keeps_the_old_folder_when_building_fails(tmp_path: Path) -> None:
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / "kept.txt").write_text("old")

    def broken(tmp: Path) -> None:
        (tmp / "half.txt").write_text("new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        pipeline.replace_dir(dest, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    assert [p.name for p in dest.iterdir()] == ["kept.txt"]


def test_ingest_copies_a_batch_folder_into_landing(small_dataset_dir: Path, tmp_path: Path) -> None:
    landing = pipeline.ingest(tmp_path, {"ingest": {"source": str(small_dataset_dir)}})
    assert landing == tmp_path / pipeline.LANDING_DIR
    assert sorted(p.name for p in landing.iterdir()) == sorted(
        p.name for p in small_dataset_dir.iterdir()
    )
    with pytest.raises(FileNotFoundError, match="is not a dataset folder"):
        pipeline.ingest(tmp_path, {"ingest": {"source": str(tmp_path / "missing")}})
    assert (landing / "meta.json").exists()  # a failed ingest keeps the previous batch


def test_validate_stops_on_a_corrupt_batch_with_a_report(
    dataset_copy: Path, tmp_path: Path
) -> None:
    frame = pd.read_parquet(dataset_copy / "rct_test.parquet")
    frame.loc[frame.index[:3], "revenue"] = -1.0
    frame.to_parquet(dataset_copy / "rct_test.parquet", index=False)
    root = tmp_path / "project"
    pipeline.ingest(root, {"ingest": {"source": str(dataset_copy)}})
    with pytest.raises(pipeline.ValidationFailed, match=r"rct_test\.parquet") as failure:
        pipeline.validate(root, {"validate": {"suites": str(REPO / "expectations")}})
    assert "revenue" in str(failure.value)
    report = json.loads((root / pipeline.VALIDATION_REPORT).read_text())
    assert not report["passed"]


@pytest.mark.slow
def test_dvc_repro_runs_everything_then_nothing_and_exp_run_overrides(
    small_dataset_dir: Path, tmp_path: Path
) -> None:
    root = make_project(
        tmp_path / "project",
        ingest={"source": str(small_dataset_dir)},
        train={**FAST_TRAIN, "method": "tsm-rct", "baselines": ["tsm-rct"]},
    )
    dvc = [str(Path(sys.executable).with_name("dvc"))]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def run(*args: str) -> str:
        done = subprocess.run([*dvc, *args], cwd=root, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    first = run("repro")
    for stage in ("ingest", "validate", "train", "evaluate", "promote"):
        assert f"Running stage '{stage}'" in first
    assert "Importing 'data/landing' -> 'data/raw'" in first
    second = run("repro")
    assert "Running stage" not in second
    assert "Data and pipelines are up to date." in run("status")
    methods = json.loads((root / "models" / "manifest.json").read_text())["methods"]
    assert methods == ["tsm-rct"]

    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"],
        cwd=root,
        check=True,
    )
    run("exp", "run", "-S", "train.method=dfcl-ppl")
    manifest = json.loads((root / "models" / "manifest.json").read_text())
    assert manifest == {"candidate": "dfcl-ppl", "methods": ["dfcl-ppl", "tsm-rct"]}
    assert (root / "results" / "metrics" / "dfcl-ppl.json").exists()
