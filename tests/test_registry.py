"""The MLflow registry side: models registered by earlier releases keep loading."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from bidfcl import registry, serving
from bidfcl.gate import PromoteParams
from bidfcl.model import UpliftModel

# A pyfunc model exactly as `bidfcl stage promote` logged it at commit b9e82cb, before the
# package was split by job (its python_model.pkl names bidfcl.registry.UpliftPyfunc and the
# bidfcl.model classes by module path).
LEGACY_MODEL = Path(__file__).resolve().parent / "fixtures" / "pyfunc-b9e82cb"


def test_a_model_registered_before_the_restructure_loads_as_champion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = PromoteParams()
    logged = shutil.copytree(LEGACY_MODEL, tmp_path / "logged")
    with registry.tracking(tmp_path, "sqlite:///mlflow.db", "bidfcl") as client:
        client.create_registered_model(config.model_name)
        version = client.create_model_version(config.model_name, source=str(logged))
        client.set_registered_model_alias(config.model_name, registry.CHAMPION, version.version)

        loaded = mlflow.pyfunc.load_model(f"models:/{config.model_name}@champion")

    assert isinstance(loaded.unwrap_python_model(), registry.UpliftPyfunc)
    saved = UpliftModel.load(LEGACY_MODEL / "artifacts" / "model")
    users = pd.DataFrame(
        [[0.0] * len(saved.feature_columns), [1.0] * len(saved.feature_columns)],
        columns=saved.feature_columns,
    )
    predicted = loaded.predict(users)
    pd.testing.assert_frame_equal(predicted, serving.predictions_frame(saved, users))
    assert list(predicted.columns) == [
        f"{kind}_{arm}" for kind in ("revenue", "cost") for arm in range(saved.n_treatments)
    ]
