"""Safety (issue 13, parts 4 and 5): nothing user-supplied is executed or unpickled, model
references and batches cannot reach outside their roots, nothing written is world-writable,
registry lookups clean up after themselves, no password of a tracking URI reaches a file or
an output line, and the suite runs offline.

The pipeline tests share one run of every stage through the CLI, in a child process with
umask 000, against a live MLflow server on loopback whose URI carries a password.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from requests import HTTPError

from bidfcl import registry, stages
from bidfcl.cli import main
from bidfcl.contract import META_FILE, TABLES, table_file
from bidfcl.io import DIR_MODE, FILE_MODE, atomic_write, replace_dir, write_json
from bidfcl.model import WEIGHTS_FILE, UpliftModel
from bidfcl.params import IngestParams, load_params
from conftest import free_port, running_mlflow_server
from test_stages import REPO, make_project

SECRET = "s3cret"
MODEL_REF = "models:/bidfcl-uplift@champion"
FAST_TRAIN = {"method": "tsm-rct", "max_epochs": 2, "patience": 1, "baselines": []}


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture(autouse=True)
def kept_umask(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The CLI and the flow tighten the process umask: each test leaves it as it found it.
    Loopback (the MLflow server here) never goes through a proxy."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with umask(os.umask(0o022)):  # reads the umask, then restores it
        yield


def world_writable(root: Path) -> list[str]:
    """Every file or folder under ``root`` (itself included) with the o+w bit; links skipped."""
    paths = [root, *root.rglob("*")]
    return sorted(
        f"{p.relative_to(root)} {oct(p.lstat().st_mode & 0o777)}"
        for p in paths
        if not p.is_symlink() and p.lstat().st_mode & stat.S_IWOTH
    )


# ----------------------------------------------------------------- nothing is executed


class Payload:
    """Unpickling this creates ``path``: proof that a pickle's code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def test_safety_malicious_weights_are_refused_not_unpickled(tiny, tmp_path: Path) -> None:
    x = tiny.logged("rct_train").x
    model = UpliftModel.build(x, tiny.meta.feature_columns, tiny.meta.treatment_names)
    folder = model.save(tmp_path / "model")
    marker = tmp_path / "pwned"
    torch.save({"net": Payload(marker), "scaler": {}}, folder / WEIGHTS_FILE)

    with pytest.raises(ValueError, match=r"weights\.pt: holds objects other than tensors"):
        UpliftModel.load(folder)
    assert not marker.exists()


def test_safety_yaml_tags_in_params_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    params = tmp_path / "params.yaml"
    params.write_text(f"train: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(yaml.YAMLError):
        load_params(params)
    assert not marker.exists()


def test_safety_feature_names_are_data_never_code(
    dataset_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bidfcl.contract import load_dataset
    from bidfcl.validation import validate_dataset

    monkeypatch.chdir(tmp_path)
    payload = "__import__('pathlib').Path('pwned').touch()"
    meta = json.loads((dataset_copy / META_FILE).read_text())
    renamed = {meta["feature_columns"][0]: payload}
    meta["feature_columns"] = [renamed.get(c, c) for c in meta["feature_columns"]]
    (dataset_copy / META_FILE).write_text(json.dumps(meta))
    for table in TABLES:
        path = dataset_copy / table_file(table)
        pd.read_parquet(path).rename(columns=renamed).to_parquet(path, index=False)

    with contextlib.suppress(ValueError):  # refusing the name is fine; running it is not
        load_dataset(dataset_copy)
    validate_dataset(dataset_copy, data_docs=tmp_path / "docs")
    assert not (tmp_path / "pwned").exists()


def forbidden_calls(tree: ast.AST) -> Iterator[str]:
    """Calls that would run or unpickle what they read."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func, keywords = node.func, {k.arg: k.value for k in node.keywords}
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
        if isinstance(func, ast.Name) and name in {"eval", "exec", "__import__"}:
            yield name
        elif owner in {"pickle", "cloudpickle", "joblib", "dill"} and name.startswith("load"):
            yield f"{owner}.{name}"
        elif owner == "yaml" and name in {"load", "load_all", "unsafe_load", "full_load"}:
            yield f"yaml.{name}"
        elif name in {"eval", "query"} and node.args:  # pandas evaluates the string
            yield f".{name}(...)"
        elif name == "read_pickle" or (name == "load" and owner == "np"):
            yield name
        elif owner == "torch" and name == "load":
            weights_only = keywords.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                yield "torch.load without weights_only=True"
        elif "shell" in keywords:
            yield f"{name}(shell=...)"


def test_safety_no_code_evaluates_or_unpickles_what_it_reads() -> None:
    sources = [*(REPO / "src" / "bidfcl").glob("*.py"), REPO / "flows" / "bidfcl_flow.py"]
    found = {
        f"{path.name}: {call}"
        for path in sources
        for call in forbidden_calls(ast.parse(path.read_text()))
    }
    assert found == set()
    assert list(forbidden_calls(ast.parse("torch.load(f)\npd.eval('a + b')\nyaml.load(s)")))


# ----------------------------------------------------------------- batches stay in their roots


def test_safety_ingest_copies_only_the_contracts_files(dataset_copy: Path, tmp_path: Path) -> None:
    (dataset_copy / "notes.txt").write_text("not part of the contract")
    (dataset_copy / "extra").mkdir()
    landing = stages.ingest(tmp_path, IngestParams(source=str(dataset_copy)))
    assert "notes.txt" not in {p.name for p in landing.iterdir()}
    assert {p.name for p in landing.iterdir()} <= {
        META_FILE,
        "truth.parquet",
        *map(table_file, TABLES),
    }
    assert (landing / META_FILE).read_bytes() == (dataset_copy / META_FILE).read_bytes()


@pytest.mark.parametrize("link_name", ["rct_test.parquet", "passwd"])
def test_safety_ingest_refuses_a_batch_holding_a_symlink(
    dataset_copy: Path, small_dataset_dir: Path, tmp_path: Path, link_name: str
) -> None:
    root = tmp_path / "project"
    stages.ingest(root, IngestParams(source=str(small_dataset_dir)))  # the previous batch
    before = {p.name: p.read_bytes() for p in (root / stages.LANDING_DIR).iterdir()}
    secret = tmp_path / "secret.parquet"
    secret.write_text(SECRET)
    target = secret if link_name.endswith(".parquet") else Path("/etc/passwd")
    (dataset_copy / link_name).unlink(missing_ok=True)
    (dataset_copy / link_name).symlink_to(target)

    with pytest.raises(ValueError, match=f"symbolic links \\({link_name}\\)") as refused:
        stages.ingest(root, IngestParams(source=str(dataset_copy)))

    assert "\n" not in str(refused.value)
    after = {p.name: p.read_bytes() for p in (root / stages.LANDING_DIR).iterdir()}
    assert after == before
    assert not any(SECRET.encode() in data for data in after.values())
    assert not list(root.glob("data/.landing.*"))  # no staging folder left behind


# ----------------------------------------------------------------- modes


def test_safety_io_writes_are_not_world_writable_under_umask_000(tmp_path: Path) -> None:
    def build(folder: Path) -> None:
        (folder / "sub").mkdir()
        (folder / "sub" / "file.bin").write_bytes(b"x")  # a builder's own writes

    with umask(0):
        replace_dir(tmp_path / "a" / "b" / "model", build)
        atomic_write(tmp_path / "c" / "d" / "f.txt", lambda tmp: tmp.write_text("x"))
        write_json(tmp_path / "e.json", {})
    assert world_writable(tmp_path) == []
    assert (tmp_path / "a" / "b" / "model" / "sub" / "file.bin").stat().st_mode & 0o777 == FILE_MODE
    assert (tmp_path / "a").stat().st_mode & 0o777 == DIR_MODE


# ----------------------------------------------------------------- a pipeline run


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tracking server on loopback (sqlite store); yields its plain http URL."""
    home = tmp_path_factory.mktemp("mlflow-server")
    with running_mlflow_server(f"sqlite:///{home / 'mlflow.db'}", home) as url:
        yield url


# The child: umask 000 (the CLI must tighten it itself), every stage, the registry lookups,
# then one error against a store that cannot be reached, all with a password in the URI.
DRIVER = """
import contextlib, io, os, sys, tempfile
from bidfcl.cli import main
os.umask(0)
store, unreachable, kept = sys.argv[1:4]
os.environ["MLFLOW_TRACKING_URI"] = store
for stage in ("ingest", "validate", "version", "train", "evaluate", "promote"):
    print("exit", stage, main(["stage", stage]), flush=True)
tempfile.tempdir = kept
for step, dest in (("resolve", []), ("resolve-dest", ["--dest", "resolved"])):
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        status = main(["resolve-model", "models:/bidfcl-uplift@champion", *dest])
    print("exit", step, status, flush=True)
    print("printed", printed.getvalue().strip().splitlines()[-1], flush=True)
os.environ |= {"MLFLOW_TRACKING_URI": unreachable, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
print("exit unreachable", main(["allocate", "models:/bidfcl-uplift@champion",
      "data/raw/rct_test.parquet", "--budget", "1", "--out", "plan.parquet"]), flush=True)
"""


@dataclass(frozen=True)
class PipelineRun:
    root: Path
    output: str  # the child's stdout and stderr
    kept: Path  # the temporary folder resolve-model downloads into without --dest
    server: str  # the plain URL of the tracking server


def with_password(url: str) -> str:
    return url.replace("http://", f"http://user:{SECRET}@", 1)


@pytest.fixture(scope="module")
def pipeline(
    mlflow_server: str, small_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> PipelineRun:
    base = tmp_path_factory.mktemp("safety")
    with umask(0o022):  # the scaffolding is the test's, not the pipeline's
        root = make_project(
            base / "project", ingest={"source": str(small_dataset_dir)}, train=FAST_TRAIN
        )
        kept = base / "tmp"
        kept.mkdir()
    env = {
        **os.environ,
        "PYTHONDONTWRITEBYTECODE": "1",  # no umask-000 .pyc files in the checkout
        "NO_PROXY": "127.0.0.1,localhost",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    unreachable = f"http://user:{SECRET}@127.0.0.1:{free_port()}/"
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, with_password(mlflow_server), unreachable, str(kept)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    steps = ("ingest", "validate", "version", "train", "evaluate", "promote", "resolve")
    for step in (*steps, "resolve-dest"):
        assert f"exit {step} 0" in output, output[-5000:]
    return PipelineRun(root, output, kept, mlflow_server)


def test_safety_no_password_in_any_output_or_written_file(pipeline: PipelineRun) -> None:
    assert SECRET not in pipeline.output
    leaked = [
        str(p.relative_to(pipeline.root))
        for p in pipeline.root.rglob("*")
        if p.is_file() and not p.is_symlink() and SECRET.encode() in p.read_bytes()
    ]
    assert leaked == []
    promotion = json.loads((pipeline.root / stages.PROMOTION_FILE).read_text())
    assert promotion["tracking_uri"] == with_password(pipeline.server).replace(SECRET, "***")


def test_safety_an_unreachable_store_is_one_redacted_error_line(pipeline: PipelineRun) -> None:
    [line] = [x for x in pipeline.output.splitlines() if x.startswith("bidfcl: error:")]
    assert "user:***@127.0.0.1" in line
    assert "exit unreachable 1" in pipeline.output


def test_safety_nothing_the_pipeline_wrote_is_world_writable(pipeline: PipelineRun) -> None:
    written = [pipeline.root / name for name in ("data", "models", "results", "reports")]
    assert all(path.is_dir() for path in written)
    assert (pipeline.root / "params.run.yaml").exists()
    assert world_writable(pipeline.root) == []  # .dvc's cache and the Data Docs included


def test_safety_resolve_model_keeps_its_copy_where_asked(pipeline: PipelineRun) -> None:
    lines = pipeline.output.splitlines()
    kept, chosen = (Path(x.removeprefix("printed ")) for x in lines if x.startswith("printed "))
    assert kept.is_relative_to(pipeline.kept) and (kept / "model.json").exists()
    resolved = pipeline.root / "resolved"
    chosen = pipeline.root / chosen
    assert chosen.is_relative_to(resolved) and (chosen / "model.json").exists()
    with (
        pytest.raises(FileExistsError, match="not empty"),
        registry.local_model(MODEL_REF, resolved),
    ):
        pass


def test_safety_a_registry_lookup_leaves_no_temporary_folder(
    pipeline: PipelineRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setenv("TMPDIR", str(private))
    monkeypatch.setattr(tempfile, "tempdir", None)  # recomputed from TMPDIR
    monkeypatch.setenv("MLFLOW_TRACKING_URI", pipeline.server)
    monkeypatch.chdir(pipeline.root)
    plan = tmp_path / "plan.parquet"
    argv = [MODEL_REF, "data/raw/rct_test.parquet", "--budget", "1", "--out", str(plan)]

    assert main(["allocate", *argv]) == 0
    assert tempfile.gettempdir() == str(private)
    assert plan.exists()
    assert list(private.glob("bidfcl-model-*")) == []


@pytest.mark.parametrize(
    "ref",
    [
        "models:/../x@champion",
        "models:/bidfcl-uplift@../x",
        "models:/bidfcl-uplift/../../etc",
        "models:/bidfcl-uplift/1/../../../../etc/passwd",
        "models:/bidfcl-uplift/1/sub",
        "models:/bidfcl-uplift\\..\\x@champion",
        "models:/bidfcl-uplift%2f..@champion",
        "models:/bidfcl-uplift",
    ],
)
def test_safety_model_references_cannot_leave_the_model(
    ref: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(**_: object) -> None:
        raise AssertionError("the registry was asked")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", must_not_run)
    with pytest.raises(ValueError, match="not a model reference"), registry.local_model(ref):
        pass
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    assert main(["allocate", ref, "users.parquet", "--budget", "1", "--out", "x.parquet"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no store opened


def test_safety_mlflow_refuses_traversal_too(
    pipeline: PipelineRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", pipeline.server)
    dest = tmp_path / "dest"
    dest.mkdir()
    refs = [
        "models:/../x@champion",
        "models:/bidfcl-uplift@../x",
        "models:/bidfcl-uplift/1/../../../..",
        "models:/bidfcl-uplift/1/../../../../etc/passwd",
    ]
    with registry.tracking(pipeline.root, "unused", "bidfcl"):
        for ref in refs:
            with pytest.raises((MlflowException, HTTPError)):  # the server says "Invalid path"
                mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(dest))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]
    assert not any(p.is_file() for p in dest.rglob("*"))


# ----------------------------------------------------------------- the flow's summary


def test_safety_the_flow_prints_no_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("safety_flow", REPO / "flows" / "bidfcl_flow.py")
    assert spec is not None and spec.loader is not None
    flow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flow)
    promotion = {
        "method": "tsm-rct",
        "version": "1",
        "decision": "promoted",
        "reason": "first model",
        "model_name": "bidfcl-uplift",
        "champion_version": "1",
        "holdout": {"table": "rct_test", "md5": "0" * 32, "decisions": 1},
        "tracking_uri": f"postgresql://user:{SECRET}@127.0.0.1:1/db",
    }
    result = {"rows": [], "promotion": promotion, "metrics": "m.json", "curves": "c.png"}
    monkeypatch.setattr(flow, "bidfcl_pipeline", lambda *args: result)
    monkeypatch.setattr(flow.stages, "render_table", lambda rows: "")
    monkeypatch.setattr(sys, "argv", ["bidfcl_flow.py"])
    flow.main()
    printed = capsys.readouterr()
    assert "mlflow ui --backend-store-uri postgresql://user:***@127.0.0.1:1/db" in printed.out
    assert SECRET not in printed.out + printed.err


# ----------------------------------------------------------------- offline


@pytest.mark.parametrize(
    "connect",
    [
        lambda: socket.create_connection(("1.1.1.1", 53), timeout=1),
        lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).connect(("8.8.8.8", 53)),
        lambda: socket.socket(socket.AF_INET6).connect_ex(("2606:4700:4700::1111", 443)),
        lambda: socket.getaddrinfo("pypi.org", 443),
        lambda: urllib.request.urlopen("https://pypi.org/simple/", timeout=1),
    ],
)
def test_safety_the_suite_cannot_reach_the_network(connect) -> None:
    from conftest import BLOCKED

    before = len(BLOCKED)
    with pytest.raises(OSError, match="network blocked in tests"):
        connect()
    assert len(BLOCKED) == before + 1
    del BLOCKED[before:]  # deliberate: not a finding for the end-of-run list
    with socket.socket() as server:  # loopback still works
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=1):
            pass
    for name, value in {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}.items():
        assert os.environ[name] == value
