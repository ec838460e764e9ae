"""Pipeline stage functions without Prefect, and DVC's view of them.

The DVC test builds a throwaway project (git + DVC) in a tmp folder: nothing here touches
the checkout's own git or DVC state.
"""

from __future__ import annotations

import ast
import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from bidfcl import stages
from bidfcl.io import write_json
from bidfcl.methods import train_to_folder
from bidfcl.params import (
    EvaluateParams,
    IngestParams,
    TrainParams,
    ValidateParams,
    load_params,
)
from bidfcl.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = (
    "dvc.yaml",
    "params.yaml",
    "params.run.yaml",
    "data.dvc",
    ".dvcignore",
    "expectations",
    "src",
)
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
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for name, items in sections.items():
        params[name] |= items
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    return dest


# --------------------------------------------------------------------------- DVC wiring

# The module each stage's work starts from; every stage also runs stages.py and params.py.
STAGE_ENTRY_MODULES = {
    "ingest": ("simulate",),
    "validate": ("validation",),
    "train": ("methods", "learner", "registry"),
    "evaluate": ("scoring", "plots"),
    "promote": ("registry", "gate", "scoring"),
}


def bidfcl_imports(module: str) -> set[str]:
    """The bidfcl modules ``module`` imports anywhere in its source (deferred imports too),
    except under ``if TYPE_CHECKING:`` (for annotations only: that code never runs)."""
    tree = ast.parse((REPO / "src" / "bidfcl" / f"{module}.py").read_text())
    found: set[str] = set()
    for node in runtime_nodes(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "bidfcl":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bidfcl."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("bidfcl.")}
    return {m for m in found if (REPO / "src" / "bidfcl" / f"{m}.py").exists()}


def runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    yield node
    for child in ast.iter_child_nodes(node):
        test = child.test if isinstance(child, ast.If) else None
        if not (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"):
            yield from runtime_nodes(child)


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


def test_dvc_plots_and_metrics_are_the_files_evaluate_writes() -> None:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    evaluate, promote = spec["stages"]["evaluate"], spec["stages"]["promote"]
    declared = {
        kind: {next(iter(o)) if isinstance(o, dict) else o for o in evaluate.get(kind, [])}
        for kind in ("outs", "metrics", "plots")
    }
    assert declared == {
        "outs": {
            str(stages.SCORES_DIR),
            str(stages.CURVES_DIR),
            str(stages.BUDGET_VALUE_FILE),
        },
        "metrics": {str(stages.METRICS_FILE)},
        "plots": {str(stages.BUDGET_VALUE_PNG)},
    }
    assert {str(stages.SCORES_DIR), str(stages.CURVES_DIR)} <= set(promote["deps"])
    # one chart of every method, whatever train.method trained (the others are docs' figures)
    [props] = [plot["budget_value"] for plot in spec["plots"] if "budget_value" in plot]
    assert set(props["y"]) == {str(stages.BUDGET_VALUE_FILE)}
    assert (REPO / ".dvc" / "plots" / f"{props['template']}.json").exists()
    assert props["title"] and props["x_label"] and props["y_label"]


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


def test_methods_trained_at_once_open_their_mlflow_runs_in_turn(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow adds a dataset it has not seen by a look-up, then an insert: two runs opened at
    once on a new batch (the flow trains the methods in parallel processes) would both insert
    it, and one would fail. A method opens its run under a lock the others wait for."""
    from bidfcl import registry

    open_run = registry.training_run
    locked: list[bool] = []

    @contextmanager
    def training_run(method: str, lineage: registry.Lineage) -> Iterator[str]:
        fd = os.open(project / stages.RUNS_LOCK, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked.append(False)
        except BlockingIOError:
            locked.append(True)
        finally:
            os.close(fd)
        with open_run(method, lineage) as run_id:
            yield run_id

    monkeypatch.setattr(registry, "training_run", training_run)
    config = TrainParams(TrainConfig(method="tsm-rct", max_epochs=1, num_threads=1))
    run = stages.train_method(project, config, "tsm-rct", project / "staging")
    assert locked == [True]
    assert set(run) == {"run_id", "model_uri"}
    assert (project / "staging" / "tsm-rct").is_dir()


@pytest.fixture(scope="module")
def trained_root(small_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with data/raw and three quickly trained models: two candidates, one baseline."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(small_dataset_dir, root / stages.RAW_DIR)
    for method in ("tsm-obs", "tsm-both", "tsm-rct"):
        config = TrainConfig(method=method, max_epochs=2, num_threads=1)
        train_to_folder(root / stages.RAW_DIR, root / stages.MODELS_DIR / method, config, False)
    return root


def evaluate_candidate(root: Path, candidate: str) -> dict[str, Any]:
    """Evaluate ``candidate`` beside the tsm-rct baseline; metrics.json's leaves by DVC name."""
    manifest = {"candidate": candidate, "methods": [candidate, "tsm-rct"]}
    write_json(root / stages.MODELS_DIR / stages.MANIFEST_FILE, manifest)
    stages.evaluate(root, EvaluateParams())
    return dict(dotted(json.loads((root / stages.METRICS_FILE).read_text())))


def dotted(tree: dict[str, Any], prefix: str = "") -> Any:
    """(name, value) of every leaf, named the way DVC flattens nested metrics."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def template_fields(spec: Any) -> Any:
    """Every ``field`` a Vega-Lite spec encodes (DVC adds ``rev``; anchors are filled in)."""
    if isinstance(spec, dict):
        if isinstance(spec.get("field"), str):
            yield spec["field"]
        for value in spec.values():
            yield from template_fields(value)
    elif isinstance(spec, list):
        for value in spec:
            yield from template_fields(value)


def test_evaluate_metrics_keep_their_names_when_the_candidate_changes(trained_root: Path) -> None:
    first = evaluate_candidate(trained_root, "tsm-obs")
    second = evaluate_candidate(trained_root, "tsm-both")
    assert first.keys() == second.keys()
    assert {"budget", "candidate.paired_ci_low", "baselines.tsm-rct.deployed_value"} <= set(first)
    assert all(type(v) in (int, float) for v in [*first.values(), *second.values()])
    # every key applies on simulated data with a reference, so the default pipeline's three
    # methods give 1 + 3 * len(DVC_METRIC_KEYS) columns in `dvc exp show`
    assert len(first) == 1 + 2 * len(stages.DVC_METRIC_KEYS)
    default_methods = load_params(REPO / "params.yaml").train.methods
    assert 1 + len(default_methods) * len(stages.DVC_METRIC_KEYS) <= 40
    scores = stages.read_metrics(trained_root)  # the full records promote reads
    assert list(scores) == ["tsm-both", "tsm-rct"] and scores["tsm-both"].method == "tsm-both"
    assert scores["tsm-both"].deployed_value == second["candidate.deployed_value"]


def test_evaluate_draws_every_method_in_one_plot(trained_root: Path) -> None:
    evaluate_candidate(trained_root, "tsm-obs")
    rows = json.loads((trained_root / stages.BUDGET_VALUE_FILE).read_text())
    assert {row["method"] for row in rows} == {"tsm-obs", "tsm-rct"}
    assert len({tuple(row) for row in rows}) == 1  # DVC reads rows with the same fields only
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    [props] = [plot["budget_value"] for plot in plots if "budget_value" in plot]
    template = json.loads((REPO / ".dvc" / "plots" / f"{props['template']}.json").read_text())
    named = {f for f in template_fields(template) if not f.startswith("<DVC_") and f != "rev"}
    assert {props["x"], *props["y"].values(), *named} <= set(rows[0])
    assert "method" in named  # one colour per method
    png = (trained_root / stages.BUDGET_VALUE_PNG).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


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
    assert "Importing 'data/validated' -> 'data/raw'" in first
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
    assert (manifest["candidate"], manifest["methods"]) == ("dfcl-ppl", ["dfcl-ppl", "tsm-rct"])
    runs = json.loads((root / stages.TRAINING_RUNS_FILE).read_text())
    assert set(runs) == {"dfcl-ppl", "tsm-rct"}  # each trained in its MLflow run
    assert (root / stages.SCORES_DIR / "dfcl-ppl.json").exists()
    metrics = json.loads((root / stages.METRICS_FILE).read_text())
    assert set(metrics["baselines"]) == {"tsm-rct"}
