"""The allocation a model ships: spend calibration on rct_val, and when it applies."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bidfcl.allocation import lagrangian_choice, solve_mckp
from bidfcl.contract import RCT_VAL, Dataset
from bidfcl.deployment import STATUS_CALIBRATED, Calibration, calibrate, deploy
from bidfcl.evaluation import make_estimator
from bidfcl.methods import train_model
from bidfcl.outcome_model import crossfit_outcomes
from bidfcl.train_config import TrainConfig

TINY = TrainConfig(method="tsm-obs", max_epochs=2, batch_size=512, hidden=(16, 8), num_threads=1)


def test_calibration_never_allocates_over_the_budget_on_rct_val(tiny: Dataset) -> None:
    model = train_model(tiny, replace(TINY, calibrate_spend=False), progress=False)
    rows = tiny.logged(RCT_VAL)
    revenue_pred, cost_pred = model.predict(rows.x)
    estimator = make_estimator("dr", crossfit_outcomes(rows))
    default = tiny.meta.extra["default_budget"]
    for budget in (0.5 * default, default, 1.5 * default):
        calibration = calibrate(model, rows, budget)
        assert calibration.budget_met
        policy = lagrangian_choice(revenue_pred, cost_pred, calibration.lam)
        assert float(estimator.point(rows, policy, "cost")) <= budget + 1e-9


def test_training_saves_the_calibration_and_deploy_applies_it_at_its_budget(
    tiny: Dataset,
) -> None:
    model = train_model(tiny, TINY, progress=False)
    calibration = Calibration.of(model)
    budget = tiny.meta.extra["default_budget"]
    assert calibration is not None and calibration.budget == pytest.approx(budget)
    assert calibration.table == RCT_VAL and calibration.estimator == "dr"

    x = tiny.logged("rct_test").x
    revenue_pred, cost_pred = model.predict(x)
    shipped = deploy(model, revenue_pred, cost_pred, budget)
    assert shipped.status == STATUS_CALIBRATED and shipped.lam == calibration.lam
    assert shipped.treatment.equal(lagrangian_choice(revenue_pred, cost_pred, calibration.lam))
    # at another budget the calibration does not apply: the MCKP on predicted costs does
    other = deploy(model, revenue_pred, cost_pred, 0.5 * budget)
    assert other.treatment.equal(solve_mckp(revenue_pred, cost_pred, 0.5 * budget).treatment)
    uncalibrated = train_model(tiny, replace(TINY, calibrate_spend=False), progress=False)
    assert Calibration.of(uncalibrated) is None
