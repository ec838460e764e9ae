"""The registered MLflow model: portable (loads without bidfcl installed), pinned without
local version tags, and serving the allocation ``bidfcl allocate`` ships."""

from __future__ import annotations

import math
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from bidfcl import serving
from bidfcl.contract import RCT_TEST, TREATMENT, USER_ID, Dataset
from bidfcl.deployment import Calibration, deploy
from bidfcl.methods import train_model
from bidfcl.model import UpliftModel
from bidfcl.scoring import allocate_file
from bidfcl.train_config import TrainConfig

NAME = "bidfcl-serving-test"
TINY = TrainConfig(method="tsm-rct", max_epochs=1, batch_size=512, hidden=(16, 8), num_threads=1)

# Run with -I -S: no user site, no cwd, and no site-packages .pth files, so bidfcl's editable
# install hook never runs; the venv's site-packages is then appended by hand.
CHILD = """
import importlib.util, sys
sys.path.append(sys.argv[1])
assert importlib.util.find_spec("bidfcl") is None, "bidfcl is importable before loading"
import mlflow, pandas as pd
name, store, users, out = sys.argv[2:6]
low, high = map(float, sys.argv[6:])
mlflow.set_tracking_uri(store)
mlflow.set_registry_uri(store)
model = mlflow.pyfunc.load_model(f"models:/{name}/1")
users = pd.read_parquet(users).drop(columns="user_id")
model.predict(users).to_parquet(f"{out}/scores.parquet")
model.predict(users, params={"output": "allocation"}).to_parquet(f"{out}/default.parquet")
for part, budget in (("low", low), ("high", high)):
    shipped = model.predict(users, params={"output": "allocation", "budget": budget})
    shipped.to_parquet(f"{out}/{part}.parquet")
print(sys.modules["bidfcl"].__file__)
print("lightning" in sys.modules)
"""


@dataclass(frozen=True)
class Served:
    model: UpliftModel
    model_dir: Path
    store: str  # the sqlite tracking and registry URI
    local: Path  # the logged pyfunc, downloaded
    users: pd.DataFrame  # feature columns only, float32
    users_file: Path  # the same users with a user_id, as `bidfcl allocate` reads them


@contextmanager
def _store(uri: str) -> Iterator[None]:
    """Point MLflow at ``uri``, then put the caller's URIs and environment back."""
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)  # the setter exports it; restored on exit
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous[0])
            mlflow.set_registry_uri(previous[1])


@pytest.fixture(scope="module")
def served(tiny: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Served:
    """A calibrated tiny model, logged with serving.log_model and registered as version 1."""
    root = tmp_path_factory.mktemp("serving")
    model = train_model(tiny, TINY, progress=False)
    model_dir = model.save(root / "model")
    x = tiny.logged(RCT_TEST).x.numpy()
    users = pd.DataFrame(x, columns=model.feature_columns)
    users_file = root / "users.parquet"
    users.assign(**{USER_ID: np.arange(len(users), dtype=np.int64)}).to_parquet(users_file)
    store = f"sqlite:///{root / 'mlflow.db'}"
    with _store(store):
        experiment = mlflow.create_experiment("serving", (root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            model_uri = serving.log_model(model, model_dir, {"method": TINY.method})
        mlflow.register_model(model_uri, NAME)
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(root / "dl")))
    return Served(model, model_dir, store, local, users, users_file)


def _load(local: Path, monkeypatch: pytest.MonkeyPatch) -> mlflow.pyfunc.PyFuncModel:
    monkeypatch.setattr(sys, "path", list(sys.path))  # loading prepends the model's code dir
    return mlflow.pyfunc.load_model(str(local))


def _budgets(model: UpliftModel, users: pd.DataFrame) -> tuple[float, float]:
    """Two budgets strictly between the users' cheapest and dearest mean predicted spend."""
    _, cost = model.predict(torch.tensor(users.to_numpy(np.float32)))
    cheapest, dearest = float(cost.min(1).values.mean()), float(cost.max(1).values.mean())
    return cheapest + 0.25 * (dearest - cheapest), cheapest + 0.75 * (dearest - cheapest)


def test_the_registered_model_loads_and_allocates_where_bidfcl_is_not_installed(
    served: Served, tmp_path: Path
) -> None:
    low, high = _budgets(served.model, served.users)
    trained_at = serving.training_budget(served.model)
    assert not any(math.isclose(b, trained_at) for b in (low, high))  # MCKP, not calibration
    purelib = sysconfig.get_paths()["purelib"]
    args = [purelib, NAME, served.store, str(served.users_file), str(tmp_path), str(low), str(high)]
    child = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CHILD, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    bidfcl_file, lightning_loaded = child.stdout.split()[-2:]
    assert Path(bidfcl_file).parent.parent.name == "code"  # the copy logged with the model
    assert lightning_loaded == "False"  # serving pulls in none of the training stack

    scores = pd.read_parquet(tmp_path / "scores.parquet")
    m = served.model.n_treatments
    assert scores.shape == (len(served.users), 2 * m)
    assert np.isfinite(scores.to_numpy()).all()
    pd.testing.assert_frame_equal(scores, serving.predictions_frame(served.model, served.users))

    revenue, cost = served.model.predict(torch.tensor(served.users.to_numpy(np.float32)))
    spend = {}
    for name, budget in (("low", low), ("high", high), ("default", trained_at)):
        shipped = pd.read_parquet(tmp_path / f"{name}.parquet")
        assert list(shipped.columns) == [TREATMENT, "revenue", "cost"]
        assert len(shipped) == len(served.users) and shipped.index.equals(served.users.index)
        arms = shipped[TREATMENT].to_numpy()
        assert ((arms >= 0) & (arms < m)).all()
        expected = deploy(served.model, revenue, cost, budget).treatment.numpy()
        np.testing.assert_array_equal(arms, expected)
        users = np.arange(len(arms))
        np.testing.assert_array_equal(shipped["cost"], cost.numpy()[users, arms])
        spend[name] = float(shipped["cost"].astype(np.float64).mean())
    assert spend["low"] <= low + 1e-6 and spend["high"] <= high + 1e-6
    assert spend["low"] <= spend["high"] + 1e-9


def test_the_pyfunc_allocation_is_what_bidfcl_allocate_ships(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained_at = serving.training_budget(served.model)
    calibration = Calibration.of(served.model)
    assert calibration is not None and calibration.applies_to(trained_at)
    model = _load(served.local, monkeypatch)
    for budget in (trained_at, _budgets(served.model, served.users)[0]):  # calibrated; MCKP
        plan = allocate_file(served.model_dir, served.users_file, budget, tmp_path / "plan.pq")
        shipped = model.predict(served.users, params={"output": "allocation", "budget": budget})
        np.testing.assert_array_equal(shipped[TREATMENT], plan.treatment.numpy())
        np.testing.assert_array_equal(
            shipped[TREATMENT], pd.read_parquet(tmp_path / "plan.pq")[TREATMENT]
        )


def test_the_logged_model_pins_public_versions_and_declares_its_params(served: Served) -> None:
    for name in ("requirements.txt", "python_env.yaml", "conda.yaml"):
        assert "+" not in (served.local / name).read_text(), name
    pins = dict(
        line.split("==") for line in (served.local / "requirements.txt").read_text().split()
    )
    assert pins["torch"] == installed_version("torch").split("+")[0]
    signature = mlflow.models.Model.load(str(served.local)).signature
    assert signature.inputs.input_names() == served.model.feature_columns
    assert {spec.name: spec.default for spec in signature.params.params} == {
        serving.BUDGET: serving.training_budget(served.model),
        serving.OUTPUT: serving.SCORES,
    }


@pytest.mark.parametrize(
    "params",
    [
        {"output": "ranking"},
        {"output": "allocation", "budget": 0.0},
        {"output": "allocation", "budget": -1.0},
        {"output": "allocation", "budget": math.inf},
        {"output": "scores", "budget": math.nan},
    ],
)
def test_invalid_params_are_refused_with_a_clear_error(
    served: Served, monkeypatch: pytest.MonkeyPatch, params: dict[str, object]
) -> None:
    model = _load(served.local, monkeypatch)
    wrong = next(iter(params)) if params["output"] == "ranking" else "budget"
    with pytest.raises(ValueError, match=rf"params\['{wrong}'\]"):
        model.predict(served.users.head(3), params=params)
