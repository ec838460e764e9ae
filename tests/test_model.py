"""The uplift network, its scaler and the saved-model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bidfcl.allocation import lagrangian_choice
from bidfcl.model import (
    MODEL_FILE,
    WEIGHTS_FILE,
    FeatureMismatchError,
    FeatureScaler,
    ModelConfig,
    UpliftModel,
    UpliftNet,
)

FEATURES = ["f0", "f1", "f2", "f3"]
ARMS = ["control", "coupon_5", "coupon_10"]


@pytest.fixture
def trained_like_model() -> tuple[UpliftModel, torch.Tensor]:
    """A model with non-trivial weights and scaler, plus raw features on another scale."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, len(FEATURES), generator=gen) * torch.tensor([1.0, 10.0, 0.1, 5.0]) + 3
    model = UpliftModel.build(
        x, FEATURES, ARMS, ModelConfig(hidden=(16, 8)), metadata={"method": "tsm-rct"}
    )
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model, x


def test_net_outputs_one_revenue_and_one_nonnegative_cost_per_arm() -> None:
    net = UpliftNet(5, 3, ModelConfig(hidden=(8, 4), dropout=0.1, activation="gelu"))
    x = 50 * torch.randn(64, 5)
    revenue_hat, cost_hat = net(x)
    assert revenue_hat.shape == cost_hat.shape == (64, 3)
    assert bool((cost_hat >= 0).all()) and bool((revenue_hat >= 0).all())
    (revenue_hat.sum() + cost_hat.sum()).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_default_config_is_the_papers_trunk() -> None:
    net = UpliftNet(4, 2)
    widths = [m.out_features for m in net.trunk if isinstance(m, torch.nn.Linear)]
    assert widths == [128, 64, 32]
    assert net.heads.out_features == 4


@pytest.mark.parametrize(
    "kwargs", [{"hidden": ()}, {"hidden": (8, 0)}, {"dropout": 1.0}, {"activation": "nope"}]
)
def test_config_rejects_nonsense(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ModelConfig(**kwargs)


def test_scaler_standardises_training_data_and_centres_constant_columns() -> None:
    x = torch.stack([torch.arange(10.0) * 3 + 7, torch.full((10,), 4.0)], dim=1)
    scaler = FeatureScaler(2).fit(x)
    z = scaler.transform(x)
    assert torch.allclose(z[:, 0].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(z[:, 0].std(unbiased=False), torch.tensor(1.0), atol=1e-6)
    assert scaler.std[1] == 1.0
    assert torch.equal(scaler.transform(torch.tensor([[7.0, 5.0]]))[0, 1], torch.tensor(1.0))


def test_scaler_refuses_non_finite_or_misshapen_features() -> None:
    with pytest.raises(ValueError, match="NaN"):
        FeatureScaler(2).fit(torch.tensor([[1.0, float("nan")], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="shape"):
        FeatureScaler(2).fit(torch.zeros(4, 3))


def test_predict_applies_the_scaler_and_leaves_training_mode_alone(
    trained_like_model: tuple[UpliftModel, torch.Tensor],
) -> None:
    model, x = trained_like_model
    model.net.train()
    revenue_hat, cost_hat = model.predict(x, batch_size=50)
    assert model.net.training
    assert not revenue_hat.requires_grad
    expected = model.net.eval()(model.scaler.transform(x))
    assert torch.allclose(revenue_hat, expected[0]) and torch.allclose(cost_hat, expected[1])


def test_save_load_round_trip_gives_identical_predictions_and_allocations(
    trained_like_model: tuple[UpliftModel, torch.Tensor], tmp_path: Path
) -> None:
    model, x = trained_like_model
    folder = model.save(tmp_path / "model")
    loaded = UpliftModel.load(folder, expected_features=FEATURES)

    before, after = model.predict(x), loaded.predict(x)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    for lam in (0.0, 0.5, 2.0):
        assert torch.equal(lagrangian_choice(*before, lam), lagrangian_choice(*after, lam))
    assert loaded.treatment_names == ARMS
    assert loaded.config == model.config
    assert loaded.metadata == {"method": "tsm-rct"}
    assert sorted(p.name for p in folder.iterdir()) == sorted([MODEL_FILE, WEIGHTS_FILE])


def test_weights_file_holds_only_tensors(
    trained_like_model: tuple[UpliftModel, torch.Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, _ = trained_like_model
    folder = model.save(tmp_path / "model")
    state = torch.load(folder / WEIGHTS_FILE, weights_only=True)
    assert set(state) == {"net", "scaler"}

    calls: list[object] = []
    real_load = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    UpliftModel.load(folder)
    assert calls == [True]


def test_save_replaces_an_existing_model_without_leftovers(
    trained_like_model: tuple[UpliftModel, torch.Tensor], tmp_path: Path
) -> None:
    model, x = trained_like_model
    model.save(tmp_path / "model")
    other = UpliftModel.build(x, FEATURES, ARMS, ModelConfig(hidden=(4,)), {"method": "dfcl-ppl"})
    other.save(tmp_path / "model")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert UpliftModel.load(tmp_path / "model").metadata == {"method": "dfcl-ppl"}
    assert json.loads((tmp_path / "model" / MODEL_FILE).read_text())["config"]["hidden"] == [4]


@pytest.mark.parametrize(
    ("given", "named"),
    [
        (["f0", "f1", "f2"], "missing from the data: ['f3']"),
        ([*FEATURES, "f9"], "not known to the model: ['f9']"),
        (["f0", "f2", "f1", "f3"], "another order; misplaced: ['f1', 'f2']"),
        (["f0", "f1", "f2", "f3", "f3"], "repeated in the data: ['f3']"),
    ],
)
def test_load_refuses_other_feature_columns_and_names_them(
    trained_like_model: tuple[UpliftModel, torch.Tensor],
    tmp_path: Path,
    given: list[str],
    named: str,
) -> None:
    model, _ = trained_like_model
    folder = model.save(tmp_path / "model")
    with pytest.raises(FeatureMismatchError) as err:
        UpliftModel.load(folder, expected_features=given)
    assert named in str(err.value)


def test_load_names_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=MODEL_FILE):
        UpliftModel.load(tmp_path)


@pytest.mark.gpu
def test_model_saved_from_the_gpu_loads_anywhere(
    trained_like_model: tuple[UpliftModel, torch.Tensor], tmp_path: Path
) -> None:
    model, x = trained_like_model
    model.to("cuda")
    on_gpu = model.predict(x)
    assert on_gpu[0].device.type == "cuda"
    folder = model.save(tmp_path / "model")
    back_on_gpu = UpliftModel.load(folder, map_location="cuda").predict(x)
    assert torch.equal(on_gpu[0], back_on_gpu[0]) and torch.equal(on_gpu[1], back_on_gpu[1])
    on_cpu = UpliftModel.load(folder).predict(x)
    assert on_cpu[0].device.type == "cpu"
    assert torch.allclose(on_cpu[0], on_gpu[0].cpu(), atol=1e-5)
