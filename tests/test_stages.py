"""Pipeline stage functions without Prefect, and DVC's view of them.

The DVC test builds a throwaway project (git + DVC) in a tmp folder: nothing here touches
the checkout's own git or DVC state.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from bidfcl import stages
from bidfcl.params import IngestParams, ValidateParams, set_params

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "params.yaml", "data.dvc", ".dvcignore", "expectations", "src")
FAST_TRAIN = {"max_epochs": 2, "warm_start_epochs": 1, "patience": 1}


def make_project(dest: Path, **sections: dict) -> Path:
    """A throwaway copy of the project's pipeline files, with some params sections updated."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():  # src/: the code dvc.yaml lists as the stages' deps
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, dest / name)
    (dest / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(REPO / ".dvc" / name, dest / ".dvc" / name)
    (dest / ".gitignore").write_text("/mlruns/\n/mlflow.db\n")
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    set_params(
        dest / "params.yaml",
        {
            f"{name}.{key}": value
            for name, items in sections.items()
            for key, value in items.items()
        },
    )
    return dest


# --------------------------------------------------------------------------- DVC wiring

# The module each stage's work starts from; every stage also runs stages.py and params.py.
STAGE_ENTRY_MODULES = {
    "ingest": ("simulate",),
    "validate": ("validation",),
    "train": ("methods",),
    "evaluate": ("scoring",),
    "promote": ("registry", "gate", "scoring"),
}


def bidfcl_imports(module: str) -> set[str]:
    """The bidfcl modules ``module`` imports anywhere in its source (deferred imports too)."""
    tree = ast.parse((REPO / "src" / "bidfcl" / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "bidfcl":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bidfcl."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("bidfcl.")}
    return {m for m in found if (REPO / "src" / "bidfcl" / f"{m}.py").exists()}


def import_closure(modules: tuple[str, ...]) -> set[str]:
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(bidfcl_imports(module))
    return seen


def test_each_dvc_stage_lists_exactly_the_code_it_runs_as_deps() -> None:
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(declared) == set(STAGE_ENTRY_MODULES)
    for name, entry in STAGE_ENTRY_MODULES.items():
        listed = {Path(dep).stem for dep in declared[name]["deps"] if dep.startswith("src/bidfcl/")}
        assert all((REPO / "src" / "bidfcl" / f"{m}.py").exists() for m in listed), name
        assert listed == import_closure(entry) | {"stages", "params"}, name


# --------------------------------------------------------------------------- stages


def test_ingest_copies_a_batch_folder_into_landing(small_dataset_dir: Path, tmp_path: Path) -> None:
    landing = stages.ingest(tmp_path, IngestParams(source=str(small_dataset_dir)))
    assert landing == tmp_path / stages.LANDING_DIR
    assert sorted(p.name for p in landing.iterdir()) == sorted(
        p.name for p in small_dataset_dir.iterdir()
    )
    with pytest.raises(FileNotFoundError, match="is not a dataset folder"):
        stages.ingest(tmp_path, IngestParams(source=str(tmp_path / "missing")))
    assert (landing / "meta.json").exists()  # a failed ingest keeps the previous batch


def test_validate_stops_on_a_corrupt_batch_with_a_report(
    dataset_copy: Path, tmp_path: Path
) -> None:
    frame = pd.read_parquet(dataset_copy / "rct_test.parquet")
    frame.loc[frame.index[:3], "revenue"] = -1.0
    frame.to_parquet(dataset_copy / "rct_test.parquet", index=False)
    root = tmp_path / "project"
    stages.ingest(root, IngestParams(source=str(dataset_copy)))
    with pytest.raises(stages.ValidationFailed, match=r"rct_test\.parquet") as failure:
        stages.validate(root, ValidateParams(suites=str(REPO / "expectations")))
    assert "revenue" in str(failure.value)
    report = json.loads((root / stages.VALIDATION_REPORT).read_text())
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
