"""The pipeline against real services: an MLflow tracking server whose store is a throwaway
PostgreSQL cluster.

The cluster (initdb into a temporary folder, loopback and a unix socket in that folder only)
and the server (127.0.0.1, artifacts in a temporary folder) live for this module and are
stopped and deleted afterwards, also when a test or their start fails. As root, the cluster
runs as the unprivileged ``postgres`` (else ``nobody``) user: PostgreSQL refuses root.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from bidfcl import registry
from bidfcl.cli import app
from bidfcl.model import WEIGHTS_FILE
from conftest import free_port, running_mlflow_server
from test_stages import make_project

MODEL_NAME = "bidfcl-uplift"
SUPERUSER = "bidfcl"
DATABASE = "mlflow"
GIT_COMMIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q"]


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs: initdb's on PATH, else the newest
    /usr/lib/postgresql/VERSION/bin (Debian installs them off PATH)."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent  # pg_ctl and postgres of the same version
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0,
    )
    return found[-1].parent if found else None


def cluster_owner() -> str | None:
    """The user the cluster runs as when this process is root (initdb and postgres refuse
    root): ``postgres`` where it exists, else ``nobody``; None when not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name).pw_name
    pytest.fail("running as root and neither a postgres nor a nobody user exists")


@dataclass(frozen=True)
class Postgres:
    uri: str  # postgresql://bidfcl@127.0.0.1:PORT/mlflow (trust auth, loopback only)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL cluster of its own on 127.0.0.1 and a free port, with an empty database."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb) are not installed")
    owner = cluster_owner()
    as_owner = ["runuser", "-u", owner, "--"] if owner else []
    # Not under pytest's tmp folders: those are private to this user, the cluster's owner
    # must reach its data and socket folder.
    home = Path(tempfile.mkdtemp(prefix="bidfcl-pg-"))
    data = home / "data"
    if owner:
        account = pwd.getpwnam(owner)
        os.chown(home, account.pw_uid, account.pw_gid)
    port = free_port()

    def run(*command: str) -> None:
        done = subprocess.run(
            [*as_owner, *command], cwd=home, capture_output=True, text=True, check=False
        )
        log = home / "postgres.log"
        assert done.returncode == 0, (
            done.stdout + done.stderr + (log.read_text() if log.exists() else "")
        )

    try:
        run(
            str(bin_dir / "initdb"),
            *("-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync"),
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {home} -c fsync=off"
        run(
            str(bin_dir / "pg_ctl"),
            *("-D", str(data), "-l", str(home / "postgres.log"), "-o", options),
            *("-w", "-t", "120", "start"),
        )
        import psycopg  # SQLAlchemy's driver for postgresql:// URIs

        server = f"postgresql://{SUPERUSER}@127.0.0.1:{port}"
        # CREATE DATABASE runs outside a transaction
        with psycopg.connect(f"{server}/postgres", autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {DATABASE}")
        yield Postgres(f"{server}/{DATABASE}")
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [*as_owner, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                cwd=home,
                capture_output=True,
                check=False,
            )
        shutil.rmtree(home, ignore_errors=True)


@dataclass(frozen=True)
class TrackingServer:
    url: str
    artifacts: Path


@pytest.fixture(scope="module")
def mlflow_on_postgres(
    postgres: Postgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TrackingServer]:
    """``mlflow server`` on 127.0.0.1 and a free port, its runs and registry in the
    PostgreSQL database, its artifacts in a temporary folder it serves."""
    home = tmp_path_factory.mktemp("mlflow-server")
    # No job runner: its worker processes serve GenAI jobs the pipeline never submits.
    no_jobs = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with running_mlflow_server(postgres.uri, home, no_jobs) as url:
        yield TrackingServer(url, home / "artifacts")


@dataclass(frozen=True)
class ServedRun:
    root: Path
    result: dict[str, Any]


@pytest.fixture(scope="module")
def served_run(
    prefect_harness: None,
    pipeline_flow: ModuleType,
    mlflow_on_postgres: TrackingServer,
    small_dataset_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServedRun]:
    """One flow run whose params.yaml points ``tracking.uri`` at the server (tsm-rct as the
    candidate, two epochs: a first model, promoted on the validation and spend checks)."""
    root = make_project(
        tmp_path_factory.mktemp("served") / "project",
        train={"method": "tsm-rct", "max_epochs": 2, "patience": 1, "baselines": []},
        tracking={"uri": mlflow_on_postgres.url},
    )
    subprocess.run([*GIT_COMMIT, "--allow-empty", "-m", "project"], cwd=root, check=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)  # params.yaml decides
        result = pipeline_flow.bidfcl_pipeline(
            project_dir=str(root), data_path=str(small_dataset_dir)
        )
        yield ServedRun(root, result)


def test_postgres_backed_mlflow_server_holds_the_runs_registry_and_champion(
    served_run: ServedRun,
    mlflow_on_postgres: TrackingServer,
    postgres: Postgres,
    small_dataset_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    promotion = served_run.result["promotion"]
    assert promotion["decision"] == "promoted", promotion
    assert promotion["tracking_uri"] == mlflow_on_postgres.url  # used as it is
    version = promotion["version"]

    # the server's registry and runs
    server = MlflowClient(mlflow_on_postgres.url, mlflow_on_postgres.url)
    assert str(server.get_model_version_by_alias(MODEL_NAME, "champion").version) == version
    assert str(server.get_model_version_by_alias(MODEL_NAME, "challenger").version) == version
    run = server.get_run(promotion["runs"]["tsm-rct"]["run_id"])
    assert run.data.tags["method"] == "tsm-rct"
    assert "deployed_value" in run.data.metrics and "val_loss" in run.data.metrics

    # kept in PostgreSQL: the same registry read from the database itself, and its rows
    database = MlflowClient(postgres.uri, postgres.uri)
    assert str(database.get_model_version_by_alias(MODEL_NAME, "champion").version) == version
    import psycopg

    with psycopg.connect(postgres.uri) as connection:
        query = "SELECT name, alias, version FROM registered_model_aliases"
        aliases = set(connection.execute(query).fetchall())
    assert (MODEL_NAME, "champion", int(version)) in aliases
    # the model's files went to the server's artifact store, nothing to the project's
    assert list(mlflow_on_postgres.artifacts.rglob(WEIGHTS_FILE))
    assert not (served_run.root / "mlflow.db").exists()
    assert not (served_run.root / "mlruns").exists()

    # the champion loads from the server and allocates (`bidfcl allocate`, which finds the
    # registry through the project's params.yaml)
    users = tmp_path / "users.parquet"
    frame = pd.read_parquet(small_dataset_dir / "rct_test.parquet")
    frame.to_parquet(users)
    plan = tmp_path / "plan.parquet"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(served_run.root)
    reference = f"models:/{MODEL_NAME}@champion"
    result = CliRunner().invoke(
        app, ["allocate", reference, str(users), "--budget", "1.0", "--out", str(plan)]
    )
    assert result.exit_code == 0, result.output
    allocated = pd.read_parquet(plan)
    assert len(allocated) == len(frame)
    assert allocated["treatment"].between(0, 4).all()


def test_postgres_uri_in_params_is_the_store_with_artifacts_under_the_project(
    postgres: Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tracking.uri: postgresql://...`` (no server): MLflow opens the database itself, and
    the artifacts go to the project's mlruns/, not to the working folder's."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "project"
    root.mkdir()
    assert registry.tracking_uri(root, postgres.uri) == postgres.uri
    with registry.tracking(root, postgres.uri, "direct") as client:
        experiment = client.get_experiment_by_name("direct")
        assert experiment is not None
        assert experiment.artifact_location == (root / "mlruns").resolve().as_uri()
    import psycopg

    with psycopg.connect(postgres.uri) as connection:
        names = connection.execute("SELECT name FROM experiments").fetchall()
    assert ("direct",) in names
