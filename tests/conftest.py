"""Shared fixtures: one small simulated dataset per test session (tests copy it to corrupt it),
and the suite runs offline: no telemetry, and no connection leaves this machine."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from bidfcl import stages
from bidfcl.contract import Dataset
from bidfcl.io import write_json

# Set on import, before the test modules import the libraries (some read them at import);
# subprocesses (dvc, the Prefect and MLflow servers) inherit them.
OFFLINE_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
}
os.environ.update(OFFLINE_ENV)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
BLOCKED: list[str] = []  # every address a test tried to reach, listed at the end of the run


class NetworkBlockedError(OSError):
    """A test tried to connect to another machine (an OSError, as when offline)."""


def is_local(family: int, address: Any) -> bool:
    """Whether a connection to ``address`` stays on this machine: a unix socket, loopback,
    ``localhost`` (any other host name is refused before it is looked up)."""
    if family not in (socket.AF_INET, socket.AF_INET6):
        return True
    host = str(address[0])
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return ip.is_loopback or ip.is_unspecified


def _refuse(address: Any) -> None:
    BLOCKED.append(repr(address))
    raise NetworkBlockedError(errno.ENETUNREACH, f"network blocked in tests: {address!r}")


@pytest.fixture(scope="session", autouse=True)
def offline() -> Iterator[None]:
    """Block every connection (and host name lookup) that would leave this machine, for the
    whole session."""
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex
    create_connection, getaddrinfo = socket.create_connection, socket.getaddrinfo

    def guarded_connect(self: socket.socket, address: Any) -> None:
        if not is_local(self.family, address):
            _refuse(address)
        connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> int:
        if not is_local(self.family, address):
            _refuse(address)
        return connect_ex(self, address)

    def guarded_create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        if not is_local(socket.AF_INET, address):
            _refuse(address)
        return create_connection(address, *args, **kwargs)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not is_local(socket.AF_INET, (host, 0)):
            try:
                ipaddress.ip_address(str(host).split("%")[0])  # a literal address: no lookup
            except ValueError:
                _refuse((host, *args[:1]))  # a name lookup would ask the DNS server
        return getaddrinfo(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
        patch.setattr(socket.socket, "connect", guarded_connect)
        patch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
        patch.setattr(socket, "create_connection", guarded_create_connection)
        yield


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if BLOCKED:
        terminalreporter.write_sep("-", "connections blocked (the suite must run offline)")
        for address in sorted(set(BLOCKED)):
            terminalreporter.write_line(address)


SMALL = {"n_obs": 4000, "n_rct": 3000, "seed": 7}


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One Prefect API (a temporary server) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def pipeline_flow() -> ModuleType:
    """flows/bidfcl_flow.py, loaded once per session (flows/ is no package)."""
    path = Path(__file__).resolve().parents[1] / "flows" / "bidfcl_flow.py"
    spec = importlib.util.spec_from_file_location("bidfcl_flow", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Prefect finds a deployable flow's module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def small_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid simulated dataset folder, shared read-only by the whole session."""
    from bidfcl.simulate import SimulatorConfig, simulate_to_folder

    out = tmp_path_factory.mktemp("sim") / "data"
    simulate_to_folder(out, SimulatorConfig(**SMALL), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny() -> Dataset:
    """An in-memory simulated dataset small enough for one- or two-epoch training runs."""
    from bidfcl.simulate import SimulatorConfig, simulate

    return simulate(SimulatorConfig(n_obs=2000, n_rct=1500, seed=11))


@pytest.fixture
def dataset_copy(small_dataset_dir: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the small dataset."""
    dst = tmp_path / "data"
    shutil.copytree(small_dataset_dir, dst)
    return dst


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def project(small_dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project with validated data in data/raw and its own sqlite MLflow store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "project"
    shutil.copytree(small_dataset_dir, root / stages.RAW_DIR)
    write_json(root / stages.VALIDATION_REPORT, {"passed": True})
    return root


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def running_mlflow_server(
    backend_store_uri: str, home: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 and a free port, artifacts in ``home/artifacts``;
    yields its plain http URL once it answers, and stops it and its workers afterwards."""
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        *("--backend-store-uri", backend_store_uri),
        *("--artifacts-destination", str(home / "artifacts")),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    log_path = home / "server.log"
    log = log_path.open("w")
    server = subprocess.Popen(
        command,
        cwd=home,
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 240  # a first start creates MLflow's tables
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the MLflow server did not start in 240 s"
            with contextlib.suppress(OSError), direct.open(f"{url}/health", timeout=2):
                break
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):  # its own session: server and workers
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
