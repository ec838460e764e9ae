"""Races: runs at once on one project take turns through the project lock, so the registry
and the tree stay consistent (one champion, each decision judged against the champion the
run before it left) and no sqlite lock error reaches the user.

The flow holds the same lock for its whole run, and its stages take it again (it is
re-entrant), so two flows queue as the stage-level runs here do.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bidfcl import registry, stages
from bidfcl.gate import PromoteParams
from bidfcl.io import LOCK_FILE, project_lock
from bidfcl.params import EvaluateParams, TrackingParams, TrainParams
from bidfcl.train_config import TrainConfig

FAST = TrainParams(TrainConfig(method="tsm-rct", max_epochs=2, patience=10, num_threads=1))
PROMOTE_SCRIPT = """
import sys, time
from pathlib import Path
from bidfcl import stages
from bidfcl.gate import PromoteParams

root, ready, go, key = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
ready.write_text("ready")
while not go.exists():
    time.sleep(0.005)
print(stages.promote(root, PromoteParams(), promotion_key=key)["decision"])
"""
HOLD_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
from bidfcl.io import project_lock

with project_lock(Path(sys.argv[1])):
    Path(sys.argv[2]).write_text("held")
    if sys.argv[3] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(sys.argv[3]))
    Path(sys.argv[2]).write_text(repr(time.time()))  # about to release
"""


def python(script: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_two_promotions_at_once_race_to_exactly_one_champion(project: Path) -> None:
    # tsm-rct is the candidate and the baseline: a first model is promoted on its checks
    # alone, a second equal one must then be judged against it and rejected
    stages.train(project, FAST)
    stages.evaluate(project, EvaluateParams())
    go = project.parent / "go"
    ready = [project.parent / f"ready-{i}" for i in range(2)]
    runs = [python(PROMOTE_SCRIPT, project, ready[i], go, f"flow-run-{i}") for i in range(2)]
    for path in ready:
        wait_for(path)
    go.write_text("go")  # both start promoting within milliseconds
    outputs = [run.communicate(timeout=300) for run in runs]

    for run, (out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err
        assert "database is locked" not in out + err
    assert sorted(out.split()[-1] for out, _ in outputs) == ["promoted", "rejected"]
    uri = registry.tracking_uri(project, TrackingParams().uri)
    client = MlflowClient(uri, uri)
    name = PromoteParams().model_name
    tags = {str(v.version): v.tags for v in client.search_model_versions(f"name='{name}'")}
    promoted = [v for v, t in tags.items() if t["decision"] == "promoted"]
    rejected = [v for v, t in tags.items() if t["decision"] == "rejected"]
    assert len(promoted) == len(rejected) == 1
    assert str(client.get_model_version_by_alias(name, "champion").version) == promoted[0]
    assert tags[promoted[0]]["reference"] == "nothing"  # the first found no champion...
    assert tags[rejected[0]]["reference"] == f"champion v{promoted[0]}"  # ...the second did
    assert tags[rejected[0]]["previous_champion"] == promoted[0]


def test_a_run_waits_for_the_project_lock_another_holds_race(
    project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tracking = TrackingParams()
    with registry.tracking(project, tracking.uri, tracking.experiment):
        pass  # the store exists, so training would start at once if nothing held it back
    signal_file = project.parent / "held"
    holder = python(HOLD_SCRIPT, project, signal_file, 5.0)
    wait_for(signal_file)
    epochs: list[float] = []

    with caplog.at_level(logging.WARNING, logger="bidfcl.io"):
        stages.train(project, FAST, on_epoch=lambda method, summary: epochs.append(time.time()))

    assert holder.wait(timeout=60) == 0
    released = float(signal_file.read_text())
    assert epochs and min(epochs) > released  # trained only once the holder let go
    assert f"waiting for the project lock, held by pid {holder.pid}" in caplog.text


def test_the_project_lock_is_reentrant_and_dies_with_its_holder_race(tmp_path: Path) -> None:
    def nested() -> None:
        with project_lock(tmp_path), project_lock(tmp_path):  # as a flow runs its stages
            pass

    thread = threading.Thread(target=nested, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "a process deadlocked on its own lock"

    signal_file = tmp_path / "held"
    holder = python(HOLD_SCRIPT, tmp_path, signal_file, "kill")
    assert holder.wait(timeout=60) == -9 and signal_file.exists()
    started = time.monotonic()
    with project_lock(tmp_path):  # a SIGKILLed holder never leaves the project locked
        assert time.monotonic() - started < 1.0
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")
