"""Training every method: it runs, runs repeat exactly, the best validation epoch is kept."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bidfcl.allocation import solve_mckp
from bidfcl.contract import OBS, RCT_TRAIN, RCT_VAL, Dataset, load_dataset
from bidfcl.datamodule import ShuffledBatches
from bidfcl.evaluation import expected_outcome_metric
from bidfcl.losses import factual_mse
from bidfcl.methods import METHODS, train_model, train_to_folder
from bidfcl.model import UpliftModel
from bidfcl.propensity import ips_weights
from bidfcl.train_config import TrainConfig

TINY = TrainConfig(
    max_epochs=2,
    warm_start_epochs=1,
    batch_size=512,
    decision_batch_size=512,
    hidden=(16, 8),
    num_threads=1,
)


def _state(model: UpliftModel) -> dict[str, torch.Tensor]:
    return model.net.state_dict()


def _same_weights(a: UpliftModel, b: UpliftModel) -> bool:
    return all(torch.equal(a.net.state_dict()[k], v) for k, v in b.net.state_dict().items())


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_a_fast_dev_run(tiny: Dataset, method: str) -> None:
    config = replace(TINY, method=method, fast_dev_run=True)
    model = train_model(tiny, config, progress=False)

    revenue_hat, cost_hat = model.predict(tiny.logged(RCT_VAL).x)
    assert revenue_hat.shape == cost_hat.shape == (len(tiny.table(RCT_VAL)), 5)
    assert torch.isfinite(revenue_hat).all() and torch.isfinite(cost_hat).all()
    meta = model.metadata
    assert meta["method"] == method
    assert meta["budget"] == pytest.approx(tiny.meta.extra["default_budget"])
    assert len(meta["val_eom_history"]) == 1 and math.isfinite(meta["val_eom_history"][0])
    if method.startswith("dfcl-"):
        assert meta["warm_start"]["method"] == "tsm-rct"
        assert meta["history"][0]["lambda"] >= 0
    elif method == "tsm-obs-ft":  # pre-trained on OBS, fine-tuned on the RCT
        assert meta["warm_start"]["method"] == "tsm-obs"
        assert meta["training_tables"] == [RCT_TRAIN]
    else:
        assert meta["warm_start"] is None


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tiny: Dataset) -> None:
    config = replace(TINY, method="dfcl-pifd", num_threads=1)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    first = train_model(tiny, config, progress=False)
    second = train_model(tiny, config, progress=False)
    other = train_model(tiny, replace(config, seed=1), progress=False)

    # Global torch settings changed for training are put back.
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert _same_weights(first, second)
    assert first.metadata["history"] == second.metadata["history"]
    assert not _same_weights(first, other)


@pytest.mark.parametrize("select_by", ["loss", "eom"])
def test_returned_model_is_the_best_validation_epoch(tiny: Dataset, select_by: str) -> None:
    config = replace(TINY, max_epochs=4, patience=10, select_by=select_by)
    model = train_model(tiny, config, progress=False)

    history = model.metadata["history"]
    assert len(history) == 4
    val = tiny.logged(RCT_VAL)
    revenue_hat, cost_hat = model.predict(val.x)
    if select_by == "eom":
        scores = [row["val_eom"] for row in history]
        assert model.metadata["best_epoch"] == max(range(4), key=scores.__getitem__)
        again = expected_outcome_metric(val, revenue_hat, cost_hat, model.metadata["budget"])
        assert again.eom.value == pytest.approx(max(scores), rel=1e-5)
    else:
        scores = [row["val_loss"] for row in history]
        assert model.metadata["best_epoch"] == min(range(4), key=scores.__getitem__)
        again = factual_mse(revenue_hat, cost_hat, val.treatment, val.revenue, val.cost)
        assert float(again) == pytest.approx(min(scores), rel=1e-5)
    assert model.metadata["selected_by"] == f"val_{select_by}"


def test_decision_method_uses_lambda_star_of_the_warm_start_and_leaves_it_alone(
    tiny: Dataset,
) -> None:
    warm = train_model(tiny, replace(TINY, method="tsm-rct"), progress=False)
    warm_weights = {k: v.clone() for k, v in _state(warm).items()}
    revenue_hat, cost_hat = warm.predict(tiny.logged(RCT_TRAIN).x)
    # Halfway between the predicted cheapest and revenue-maximising policies: lambda* > 0.
    richest = cost_hat.gather(1, revenue_hat.argmax(1, keepdim=True))
    budget = float((cost_hat.min(1).values.mean() + richest.mean()) / 2)
    config = replace(TINY, method="dfcl-ppl", budget=budget, fast_dev_run=True)

    model = train_model(tiny, config, progress=False, warm_start=warm)

    expected = solve_mckp(revenue_hat, cost_hat, budget).lam
    assert expected > 0
    assert model.metadata["history"][0]["lambda"] == pytest.approx(expected)
    assert model.metadata["warm_start"]["method"] == "tsm-rct"
    assert all(torch.equal(_state(warm)[k], v) for k, v in warm_weights.items())
    assert not _same_weights(model, warm)


def test_train_to_folder_saves_a_model_that_loads_back(
    small_dataset_dir: Path, tmp_path: Path
) -> None:
    config = replace(TINY, method="tsm-obs", max_epochs=1, budget=2.5)
    out = train_to_folder(small_dataset_dir, tmp_path / "model", config, progress=False)

    loaded = UpliftModel.load(out)
    dataset = load_dataset(small_dataset_dir, tables=(OBS, RCT_TRAIN, RCT_VAL))
    trained = train_model(dataset, config, progress=False)
    x = dataset.logged(RCT_VAL).x
    for got, want in zip(loaded.predict(x), trained.predict(x), strict=True):
        assert torch.equal(got, want)
    assert loaded.metadata["method"] == "tsm-obs"
    assert loaded.metadata["budget"] == 2.5
    assert loaded.metadata["dataset"]["feature_columns"] == dataset.meta.feature_columns
    assert loaded.metadata["train_config"]["hidden"] == [16, 8]


def test_missing_budget_is_a_clear_error(tiny: Dataset) -> None:
    no_default = Dataset(meta=replace(tiny.meta, extra={}), tables=tiny.tables)

    with pytest.raises(ValueError, match="no budget"):
        train_model(no_default, replace(TINY, fast_dev_run=True), progress=False)


@pytest.mark.gpu
def test_trains_on_the_gpu_and_returns_a_cpu_model(tiny: Dataset) -> None:
    config = replace(TINY, method="dfcl-pifd", accelerator="gpu", max_epochs=1)
    model = train_model(tiny, config, progress=False)

    assert model.device == torch.device("cpu")
    assert math.isfinite(model.metadata["best_val_eom"])


def test_ips_weights_track_the_true_logging_policy(tiny: Dataset) -> None:
    obs = tiny.logged(OBS)
    weights = ips_weights(obs, clip=0.05, steps=100)

    assert bool((weights >= 1).all()) and bool((weights <= 20).all())
    true_p = obs.propensity
    fitted_error = (1 / weights - true_p).abs().mean()
    uniform_error = (1 / obs.n_treatments - true_p).abs().mean()
    assert fitted_error < 0.5 * uniform_error


def test_shuffled_batches_cover_every_row_once_in_near_equal_chunks() -> None:
    sampler = ShuffledBatches(n_rows=1001, batch_size=300, seed=0)
    epoch_one, epoch_two = list(sampler), list(sampler)

    assert len(epoch_one) == len(sampler) == 4
    assert {len(chunk) for chunk in epoch_one} <= {250, 251}
    assert torch.equal(torch.cat(epoch_one).sort().values, torch.arange(1001))
    assert not torch.equal(torch.cat(epoch_one), torch.cat(epoch_two))
    replay = list(ShuffledBatches(n_rows=1001, batch_size=300, seed=0))
    assert all(torch.equal(a, b) for a, b in zip(epoch_one, replay, strict=True))


def test_an_unknown_method_is_named_with_the_known_ones(tiny: Dataset) -> None:
    with pytest.raises(ValueError, match=r"unknown method 'tsm-magic'.*'tsm-rct'"):
        train_model(tiny, replace(TINY, method="tsm-magic"), progress=False)
