"""Crashes: a killed training resumes to the weights of an uninterrupted run, killed runs
leave nothing that breaks the next one, and a killed promotion is settled on the rerun.

Each kill is a real SIGKILL in a subprocess, at a fixed point (a training batch, a registry
write), so every test is deterministic.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from bidfcl import registry, stages
from bidfcl.contract import load_dataset
from bidfcl.gate import PromoteParams
from bidfcl.io import remove_stale_staging, replace_dir
from bidfcl.learner import CHECKPOINT_FILE, EpochSummary, observe_training
from bidfcl.methods import FITTED_DIR, train_model
from bidfcl.model import UpliftModel
from bidfcl.params import EvaluateParams, TrackingParams, TrainParams
from bidfcl.simulate import SimulatorConfig, simulate
from bidfcl.train_config import TrainConfig

TINY_DATA = {"n_obs": 2000, "n_rct": 1500, "seed": 11}
TINY = TrainConfig(
    max_epochs=4,
    warm_start_epochs=3,
    patience=10,
    batch_size=256,
    decision_batch_size=512,
    hidden=(16, 8),
    num_threads=1,
)
# Put in front of the code a subprocess runs: SIGKILL itself at the start of training batch
# BIDFCL_KILL_BATCH of epoch BIDFCL_KILL_EPOCH of the phase fitting method BIDFCL_KILL_PHASE.
KILL_HOOK = """
import os, signal
from bidfcl.bilevel import BilevelLearner
from bidfcl.learner import UpliftLearner

def _killing(step):
    def training_step(self, batch, batch_idx):
        if (self.config.method, self.current_epoch, batch_idx) == (
            os.environ.get("BIDFCL_KILL_PHASE"),
            int(os.environ.get("BIDFCL_KILL_EPOCH", -1)),
            int(os.environ.get("BIDFCL_KILL_BATCH", -1)),
        ):
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, batch, batch_idx)
    return training_step

for learner in (UpliftLearner, BilevelLearner):
    learner.training_step = _killing(learner.__dict__["training_step"])
"""
TRAIN_SCRIPT = """
import json, sys
from bidfcl.learner import observe_training
from bidfcl.methods import train_model
from bidfcl.simulate import SimulatorConfig, simulate
from bidfcl.train_config import TrainConfig

config = TrainConfig(**json.loads(sys.argv[1]))
seen = []
with observe_training(lambda summary: seen.append([summary.method, summary.epoch])):
    model = train_model(simulate(SimulatorConfig(**json.loads(sys.argv[2]))), config, False)
model.save(sys.argv[3])
print(json.dumps(seen))
"""


def run_python(code: str, *args: str, kill_at: tuple[str, int, int] | None = None) -> Any:
    """Run ``code`` in a fresh interpreter, with the kill hook armed at ``kill_at`` if given."""
    env = dict(os.environ)
    if kill_at is not None:
        phase, epoch, batch = kill_at
        env |= {
            "BIDFCL_KILL_PHASE": phase,
            "BIDFCL_KILL_EPOCH": str(epoch),
            "BIDFCL_KILL_BATCH": str(batch),
        }
        code = KILL_HOOK + code
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def same_weights(a: UpliftModel, b: UpliftModel) -> bool:
    """Bit for bit (tolerance 0): the network's weights and the scaler's statistics."""
    pairs = [(a.net, b.net), (a.scaler, b.scaler)]
    return all(
        torch.equal(tensor, right.state_dict()[name])
        for left, right in pairs
        for name, tensor in left.state_dict().items()
    )


@pytest.mark.parametrize(
    ("method", "kill_at", "resumed"),
    [
        # the warm start finished and is reused; lambda* and Adam resume mid-way
        ("dfcl-ppl", ("dfcl-ppl", 2, 0), [["dfcl-ppl", 2], ["dfcl-ppl", 3]]),
        # the Teacher finished and is reused; Bridge, both optimisers and counters resume
        ("bidfcl-ppl", ("bidfcl-ppl", 2, 1), [["bidfcl-ppl", 2], ["bidfcl-ppl", 3]]),
        # killed in the Teacher phase (tsm-obs-ft): its own warm start (tsm-obs) finished and
        # is reused, the Teacher resumes, then the main phase runs
        (
            "bidfcl-ppl",
            ("tsm-obs-ft", 1, 1),
            [["tsm-obs-ft", 1], ["tsm-obs-ft", 2], *([["bidfcl-ppl", e] for e in range(4)])],
        ),
    ],
    ids=["dfcl-warm-start-done", "bidfcl-teacher-done", "bidfcl-killed-in-teacher"],
)
def test_a_training_killed_mid_epoch_resumes_to_the_uninterrupted_weights_resume(
    tmp_path: Path, method: str, kill_at: tuple[str, int, int], resumed: list[list[Any]]
) -> None:
    config = replace(TINY, method=method)
    reference = train_model(simulate(SimulatorConfig(**TINY_DATA)), config, progress=False)
    checkpoints = tmp_path / "checkpoints"
    args = (
        json.dumps({**config.to_dict(), "checkpoint_dir": str(checkpoints)}),
        json.dumps(TINY_DATA),
        str(tmp_path / "model"),
    )

    killed = run_python(TRAIN_SCRIPT, *args, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (checkpoints / kill_at[0] / CHECKPOINT_FILE).exists()

    rerun = run_python(TRAIN_SCRIPT, *args)
    assert rerun.returncode == 0, rerun.stderr
    # it trained only the epochs the killed run had not finished...
    assert json.loads(rerun.stdout) == resumed
    assert f"resuming after epoch {kill_at[1]}" in rerun.stderr
    # ...and ends exactly where an uninterrupted run without checkpoints does
    model = UpliftModel.load(tmp_path / "model")
    assert same_weights(model, reference)
    for key in ("history", "best_epoch", "bilevel", "warm_start"):
        assert model.metadata.get(key) == reference.metadata.get(key), key
    teacher, reference_teacher = (
        {k: v for k, v in (m.metadata.get("teacher") or {}).items() if k != "seconds_per_epoch"}
        for m in (model, reference)
    )
    assert teacher == reference_teacher
    for phase in {method, kill_at[0]}:  # finished phases keep their model, not a checkpoint
        assert (checkpoints / phase / FITTED_DIR).is_dir()
        assert not (checkpoints / phase / CHECKPOINT_FILE).exists()


def test_a_finished_run_is_reused_only_for_the_same_settings_and_data_resume(
    tmp_path: Path,
) -> None:
    dataset = simulate(SimulatorConfig(**TINY_DATA))
    config = replace(TINY, max_epochs=2, checkpoint_dir=str(tmp_path / "checkpoints"))
    seen: list[EpochSummary] = []

    def fit(config: TrainConfig, data: Any = dataset) -> tuple[UpliftModel, list[int]]:
        seen.clear()
        with observe_training(seen.append):
            model = train_model(data, config, progress=False)
        return model, [summary.epoch for summary in seen]

    first, epochs = fit(config)
    assert epochs == [0, 1]
    again, epochs = fit(config)
    assert epochs == [] and same_weights(again, first)  # nothing left to train
    other_seed, epochs = fit(replace(config, seed=1))
    assert epochs == [0, 1]
    assert same_weights(other_seed, train_model(dataset, replace(TINY, max_epochs=2, seed=1)))
    other_data = simulate(SimulatorConfig(**{**TINY_DATA, "seed": 12}))
    _, epochs = fit(replace(config, seed=1), other_data)
    assert epochs == [0, 1]


def test_a_killed_replace_dir_leaves_staging_the_next_one_removes_resume(tmp_path: Path) -> None:
    dest = tmp_path / "models"
    replace_dir(dest, lambda tmp: (tmp / "old.txt").write_text("old"))
    killed = run_python(
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from bidfcl.io import replace_dir\n"
        "def build(tmp):\n"
        "    (tmp / 'half.txt').write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "replace_dir(Path(sys.argv[1]), build)\n",
        str(dest),
    )
    assert killed.returncode == -signal.SIGKILL
    [left] = [p for p in tmp_path.iterdir() if p.name.startswith(".models.")]
    live = tmp_path / f".models.{os.getpid()}.abcd1234"  # a running writer's folder
    live.mkdir()
    unrelated = tmp_path / ".models.backup"
    unrelated.mkdir()

    replace_dir(dest, lambda tmp: (tmp / "new.txt").write_text("new"))

    assert not left.exists()
    assert live.is_dir() and unrelated.is_dir()
    assert [p.name for p in dest.iterdir()] == ["new.txt"]
    assert remove_stale_staging(dest) == []


# --------------------------------------------------------------------------- stages

FAST = {"max_epochs": 3, "patience": 10, "num_threads": 1}


TRAIN_STAGE_SCRIPT = """
import json, sys
from pathlib import Path
from bidfcl import stages
from bidfcl.params import TrainParams
from bidfcl.train_config import TrainConfig

config = TrainParams(TrainConfig(**json.loads(sys.argv[2])), ("tsm-obs",))
stages.train(Path(sys.argv[1]), config, on_epoch=lambda m, s: print(m, s.method, s.epoch))
"""


def test_a_killed_train_stage_resumes_and_cleans_up_on_rerun_resume(project: Path) -> None:
    params = TrainParams(TrainConfig(method="tsm-rct", **FAST), ("tsm-obs",))
    settings = json.dumps(params.config.to_dict())
    killed = run_python(TRAIN_STAGE_SCRIPT, str(project), settings, kill_at=("tsm-obs", 1, 0))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (project / stages.CHECKPOINTS_DIR / "tsm-rct" / "tsm-rct" / FITTED_DIR).is_dir()
    assert [p.name[:8] for p in project.iterdir() if p.name.startswith(".models")] == [".models."]
    assert not (project / stages.MODELS_DIR).exists()

    seen: list[tuple[str, int]] = []
    stages.train(project, params, on_epoch=lambda m, s: seen.append((s.method, s.epoch)))

    assert seen == [("tsm-obs", 1), ("tsm-obs", 2)]  # tsm-rct was done, tsm-obs resumes
    data = load_dataset(project / stages.RAW_DIR)
    for method in params.methods:
        saved = UpliftModel.load(project / stages.MODELS_DIR / method)
        assert same_weights(saved, train_model(data, params.config_for(method), progress=False))
    # the checkpoints and the killed run's staging folder are gone; the lock file stays
    assert [p.name for p in project.iterdir() if p.name.startswith(".")] == [".bidfcl.lock"]


KILLED_PROMOTE_SCRIPT = """
import os, signal, sys
from pathlib import Path
from mlflow.tracking import MlflowClient
from bidfcl import stages
from bidfcl.gate import PromoteParams

set_tag = MlflowClient.set_model_version_tag

def dying(self, name, version, key, value):
    if key == "decision":  # the last write of a decision: everything else is done
        os.kill(os.getpid(), signal.SIGKILL)
    return set_tag(self, name, version, key, value)

MlflowClient.set_model_version_tag = dying
stages.promote(Path(sys.argv[1]), PromoteParams(margin=-1.0), promotion_key="flow-run-2")
"""


def test_a_promotion_killed_before_its_decision_is_settled_by_the_rerun_resume(
    project: Path,
) -> None:
    params = TrainParams(TrainConfig(method="tsm-rct", **FAST))
    stages.train(project, params)
    stages.evaluate(project, EvaluateParams())
    first = stages.promote(project, PromoteParams(), promotion_key="flow-run-1")
    assert (first["version"], first["decision"]) == ("1", "promoted")

    # v2 clears a margin of -1 against v1, takes the champion alias, and dies before the
    # decision tag that would have committed it
    killed = run_python(KILLED_PROMOTE_SCRIPT, str(project))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    uri = registry.tracking_uri(project, TrackingParams().uri)
    client = MlflowClient(uri, uri)
    name = PromoteParams().model_name
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert "decision" not in client.get_model_version(name, "2").tags

    rerun = stages.promote(project, PromoteParams(), promotion_key="flow-run-3")

    assert rerun["abandoned_versions"] == ["2"]
    assert rerun["version"] == "3" and rerun["reference"] == "champion v1"
    assert (rerun["decision"], rerun["champion_version"]) == ("rejected", "1")
    assert rerun["holdout"]["decisions"] == 2  # v1 and v3 decided; v2 decided nothing
    tags = {str(v.version): v.tags for v in client.search_model_versions(f"name='{name}'")}
    assert {v: t["decision"] for v, t in tags.items()} == {
        "1": "promoted",
        "2": "abandoned",
        "3": "rejected",
    }
    aliases = client.get_registered_model(name).aliases
    assert aliases == {"champion": 1, "challenger": 3}
