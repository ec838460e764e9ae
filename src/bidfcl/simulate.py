"""Synthetic coupon marketplace: users, M coupon arms, an RCT and a biased OBS log, with truth.

The simulator is the default data source. It writes a dataset folder that follows
:mod:`bidfcl.contract`, plus ``truth.parquet`` holding every user's expected revenue and
cost under every arm, so the true value and cost of any allocation can be computed.

Generative model (user i, arm j = 0..M-1; arm 0 is the control, no coupon)

* Hidden trait ``u_i ~ N(0, 1)`` ("engagement"). It enters the outcomes and the old
  targeting policy with weight ``confounding``; feature ``x8 = 0.7 u + 0.71 e`` reveals it
  only partly. ``confounding = 0`` removes it everywhere (x8 is then irrelevant).
* Features ``x0..x{d-1}`` (d >= 9): x0..x7 drive the user traits below (x6 is binary,
  x4 acts through a sine, x3 * x4 interact), x8 is the proxy of u, x9.. are distractors.
* Arm j is a coupon of face value ``v_j = 20 * j / (M - 1)``.
* Per-user traits, non-linear in the features: baseline appetite ``a_i``, coupon
  responsiveness ``s_i >= 0``, deal aversion ``h_i >= 0``, mean basket ``m_i`` and a
  redemption tendency ``b_i``.
* Expected outcomes (the truth):

      purchase  p_ij = sigmoid(a_i + s_i * log(1 + v_j / 5) - h_i * (v_j / 20)^2)
      redeem    q_ij = sigmoid(b_i + 1.5 * v_j / 20)          (given a purchase)
      revenue_ij = p_ij * m_i          cost_ij = v_j * p_ij * q_ij   (control costs 0)

  The coupon's lift is concave in its value (diminishing returns) while deal aversion
  grows with its square, so users with a high ``h_i`` buy less under big coupons (they
  are harmed) and the best arm differs between users. Cost is driven by redemption,
  which rises with the face value and with the user's tendency to redeem.
* Observed outcomes: purchase ~ Bernoulli(p), basket ~ lognormal with mean m_i,
  redemption ~ Bernoulli(q) given a purchase; revenue = purchase * basket and
  cost = v_j * purchase * redemption, so E[observed | x, u, t] equals the truth exactly.
* RCT: arms drawn uniformly, ``propensity = 1 / M``; split into rct_train / rct_val /
  rct_test by ``rct_split``.
* OBS: the old policy aims each user at a coupon level ``tau_i in [0, M-1]`` (more for
  users who look valuable or churn-prone, and for high-u users) and logs arm j with
  probability ``softmax_j(-bias * (j - tau_i)^2 / 2)``: ``bias = 0`` is uniform random
  logging, ``bias = 1`` the default, ``bias >= 4`` nearly deterministic. The OBS
  ``propensity`` column is that true logging probability, known only because the data is
  simulated; models must not rely on it (real logs rarely carry it).

What the truth is built to show: the most expensive coupon adds less revenue than it
costs, some users buy less under a big coupon than under none, and the arm maximising
revenue minus cost differs across users, so the truth-optimal allocation at a middling
budget mixes arms. ``meta.json`` records the all-control and all-biggest-coupon policies
under ``truth_summary`` and sets ``default_budget`` midway between their mean costs.
Naive per-arm means on OBS overstate the big coupons' lift (selection plus hidden
confounding): the bias a method has to overcome. ``bidfcl summarize DIR`` prints these
numbers for any simulated folder; the README quotes them at the defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bidfcl.contract import (
    COST,
    OBS,
    PROPENSITY,
    RCT_TABLES,
    REVENUE,
    TREATMENT,
    USER_ID,
    Dataset,
    DatasetMeta,
    save_dataset,
    truth_cost_columns,
    truth_revenue_columns,
)

MAX_FACE_VALUE = 20.0
HALF_LIFT_FACE_VALUE = 5.0
REDEEM_SLOPE = 1.5
BASKET_LOG_SIGMA = 0.6
PROXY_WEIGHT = 0.7
N_TRAIT_FEATURES = 8
PROXY_FEATURE = N_TRAIT_FEATURES
MIN_FEATURES = N_TRAIT_FEATURES + 1
SOURCE = "bidfcl.simulate: synthetic coupon marketplace"


@dataclass(frozen=True)
class SimulatorConfig:
    """Size, difficulty and seed of one simulated dataset."""

    n_obs: int = 200_000
    n_rct: int = 40_000
    n_treatments: int = 5
    n_features: int = 12
    bias: float = 1.0
    confounding: float = 1.0
    seed: int = 0
    rct_split: tuple[float, float, float] = (0.5, 0.2, 0.3)

    def __post_init__(self) -> None:
        if self.n_treatments < 2:
            raise ValueError(
                f"n_treatments must be >= 2 (control plus a coupon), got {self.n_treatments}"
            )
        if self.n_features < MIN_FEATURES:
            raise ValueError(f"n_features must be >= {MIN_FEATURES}, got {self.n_features}")
        if self.n_obs < 1:
            raise ValueError(f"n_obs must be >= 1, got {self.n_obs}")
        if self.bias < 0 or self.confounding < 0:
            raise ValueError("bias and confounding must be >= 0")
        if len(self.rct_split) != 3 or min(self.rct_split) <= 0:
            raise ValueError(f"rct_split needs three positive fractions, got {self.rct_split}")
        if not np.isclose(sum(self.rct_split), 1.0):
            raise ValueError(f"rct_split must sum to 1, got {self.rct_split}")
        if min(_rct_sizes(self.n_rct, self.rct_split)) < 1:
            raise ValueError(f"n_rct={self.n_rct} leaves an empty RCT table with {self.rct_split}")


DEFAULT_RCT_TEST_ROWS = (
    12_000  # rct_test at the defaults: presets keep it, so scores stay as precise
)
RCT_VAL_PER_TRAIN_ROW = 0.4  # rct_val / rct_train at the default split (0.2 / 0.5)


def rct_rows(train: int, test: int = DEFAULT_RCT_TEST_ROWS) -> dict[str, Any]:
    """Simulator settings for an RCT of ``train`` training rows (rct_val in the default
    proportion) and ``test`` held-out rows: a scarce trial is scarce where models learn,
    while the evaluation keeps the precision of the default one."""
    val = round(RCT_VAL_PER_TRAIN_ROW * train)
    n_rct = train + val + test
    return {"n_rct": n_rct, "rct_split": (train / n_rct, val / n_rct, test / n_rct)}


SIMULATOR_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "scarce-rct-2k": rct_rows(2_000),
    "scarce-rct-5k": rct_rows(5_000),
    "strong-bias": {"bias": 4.0, "confounding": 2.0},
}
"""Named regimes: the default, a scarce trial, and a strongly biased, confounded log."""
RCT_TRAIN_ROWS = "rct_train_rows"  # a setting that stands for rct_rows(value)


def simulator_config(settings: Mapping[str, Any], seed: int) -> SimulatorConfig:
    """The simulator config of ``settings``: an optional ``preset`` name, then any
    :class:`SimulatorConfig` field, or ``rct_train_rows`` for :func:`rct_rows`."""
    values = dict(settings)
    preset = values.pop("preset", "default")
    if preset not in SIMULATOR_PRESETS:
        raise ValueError(
            f"unknown simulator preset {preset!r}; choose one of {list(SIMULATOR_PRESETS)}"
        )
    values = {**SIMULATOR_PRESETS[preset], **values}
    if RCT_TRAIN_ROWS in values:
        values |= rct_rows(int(values.pop(RCT_TRAIN_ROWS)))
    known = {f.name for f in fields(SimulatorConfig)} - {"seed"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown simulator setting(s) {unknown}; known: {sorted(known)}")
    if "rct_split" in values:
        values["rct_split"] = tuple(values["rct_split"])
    return SimulatorConfig(**values, seed=seed)


def face_values(n_treatments: int) -> np.ndarray:
    """Coupon face value of each arm, evenly spaced from 0 (control) to the maximum."""
    return np.linspace(0.0, MAX_FACE_VALUE, n_treatments)


def treatment_names(n_treatments: int) -> list[str]:
    """Arm names for meta.json: arm 0 is the control, arm j the j-th coupon by face value."""
    return ["control", *(f"coupon_{j}" for j in range(1, n_treatments))]


@dataclass(frozen=True)
class _OutcomeModel:
    """Purchase and redemption probabilities (N, M) and mean basket (N,) of every user."""

    purchase: np.ndarray
    redeem: np.ndarray
    mean_basket: np.ndarray
    value: np.ndarray

    @property
    def revenue(self) -> np.ndarray:
        return self.purchase * self.mean_basket[:, None]

    @property
    def cost(self) -> np.ndarray:
        return self.value[None, :] * self.purchase * self.redeem


def _outcome_model(
    features: np.ndarray, hidden: np.ndarray, config: SimulatorConfig
) -> _OutcomeModel:
    """User traits from the features and the hidden trait, turned into per-arm probabilities."""
    x = np.asarray(features, dtype=np.float64)
    u = config.confounding * np.asarray(hidden, dtype=np.float64)
    appetite = (
        -1.0
        + 0.8 * np.tanh(1.5 * x[:, 0])
        + 0.4 * x[:, 1]
        + 0.35 * x[:, 3] * x[:, 4]
        + 0.3 * x[:, 6]
        + 0.5 * u
    )
    responsiveness = _softplus(
        0.9 * x[:, 2] - 0.6 * x[:, 0] + 0.6 * np.sin(2.0 * x[:, 4]) + 0.5 * u - 0.2
    )
    aversion = 2.5 * _sigmoid(3.0 * (x[:, 5] - 0.7))
    mean_basket = np.exp(np.log(40.0) + 0.3 * x[:, 3] + 0.15 * np.abs(x[:, 7]) - 0.1 * x[:, 1])
    redeem_tendency = 0.3 + 0.8 * x[:, 7] - 0.5 * x[:, 5] + 0.4 * u

    value = face_values(config.n_treatments)
    lift = np.log1p(value / HALF_LIFT_FACE_VALUE)[None, :]
    scaled_value = (value / MAX_FACE_VALUE)[None, :]
    purchase = _sigmoid(
        appetite[:, None] + responsiveness[:, None] * lift - aversion[:, None] * scaled_value**2
    )
    redeem = _sigmoid(redeem_tendency[:, None] + REDEEM_SLOPE * scaled_value)
    return _OutcomeModel(purchase=purchase, redeem=redeem, mean_basket=mean_basket, value=value)


def expected_outcomes(
    features: np.ndarray, hidden: np.ndarray, config: SimulatorConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Expected revenue and cost, each (N, M), of every arm for users with these traits.

    This is the ground truth of the model above; with ``confounding = 0`` it depends on
    the visible features only, so it can be checked against ``truth.parquet``.
    """
    model = _outcome_model(features, hidden, config)
    return model.revenue, model.cost


def logging_probabilities(
    features: np.ndarray, hidden: np.ndarray, config: SimulatorConfig
) -> np.ndarray:
    """Probability (N, M) that the old targeting policy behind OBS gives each user each arm.

    The policy aims at a coupon level that grows with apparent basket size and low
    activity (and with the hidden trait), with sharpness ``bias``.
    """
    x = np.asarray(features, dtype=np.float64)
    u = config.confounding * np.asarray(hidden, dtype=np.float64)
    eagerness = 0.9 * x[:, 3] - 0.7 * x[:, 0] + 0.6 * x[:, 6] + 0.4 * x[:, 2] + 0.8 * u - 0.3
    target_level = (config.n_treatments - 1) * _sigmoid(eagerness)
    arms = np.arange(config.n_treatments)[None, :]
    logits = -config.bias * (arms - target_level[:, None]) ** 2 / 2.0
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def simulate(config: SimulatorConfig, progress: bool = False) -> Dataset:
    """Generate a dataset in memory (``path=None``); deterministic for ``config.seed``."""
    rng = np.random.default_rng(config.seed)
    n_users = config.n_obs + config.n_rct
    m = config.n_treatments
    with tqdm(total=4, desc="simulate", disable=not progress) as bar:
        bar.set_postfix_str("users")
        hidden = rng.standard_normal(n_users)
        features = _draw_features(rng, hidden, config.n_features)
        model = _outcome_model(features, hidden, config)
        revenue, cost = model.revenue, model.cost
        bar.update()

        bar.set_postfix_str("assignment")
        obs_probs = logging_probabilities(features[: config.n_obs], hidden[: config.n_obs], config)
        obs_arm = _sample_categorical(rng, obs_probs)
        rct_arm = rng.integers(0, m, size=config.n_rct)
        treatment = np.concatenate([obs_arm, rct_arm])
        obs_propensity = np.take_along_axis(obs_probs, obs_arm[:, None], 1)[:, 0]
        propensity = np.concatenate([obs_propensity, np.full(config.n_rct, 1 / m)])
        bar.update()

        bar.set_postfix_str("outcomes")
        observed_revenue, observed_cost = _draw_outcomes(rng, model, treatment)
        bar.update()

        bar.set_postfix_str("tables")
        feature_columns = [f"x{k}" for k in range(config.n_features)]
        rows = pd.DataFrame(features, columns=feature_columns)
        rows.insert(0, USER_ID, np.arange(n_users, dtype=np.int64))
        rows[TREATMENT] = treatment.astype(np.int64)
        rows[REVENUE] = observed_revenue
        rows[COST] = observed_cost
        rows[PROPENSITY] = propensity
        tables = _split_tables(rows, config)
        truth = _truth_frame(revenue, cost)
        meta = DatasetMeta(
            n_treatments=m,
            treatment_names=treatment_names(m),
            feature_columns=feature_columns,
            source=SOURCE,
            extra=_meta_extra(revenue, cost, config),
        )
        bar.update()
    return Dataset(meta=meta, tables=tables, truth=truth, path=None)


def simulate_to_folder(out_dir: Path | str, config: SimulatorConfig, progress: bool = True) -> Path:
    """Generate a dataset and write it as a contract folder (tables, truth, meta.json)."""
    data = simulate(config, progress=progress)
    return save_dataset(out_dir, data.meta, data.tables, truth=data.truth)


def _draw_features(rng: np.random.Generator, hidden: np.ndarray, n_features: int) -> np.ndarray:
    """Correlated, mixed-type features, rounded to float32 precision.

    Models read features as float32; rounding here means the truth is computed from
    exactly the values they see.
    """
    z = rng.standard_normal((hidden.shape[0], n_features))
    x = z.copy()
    x[:, 1] = 0.5 * z[:, 0] + np.sqrt(0.75) * z[:, 1]
    x[:, 4] = 2.0 * np.tanh(z[:, 4])
    x[:, 6] = (z[:, 6] > 0.5).astype(np.float64)
    x[:, PROXY_FEATURE] = PROXY_WEIGHT * hidden + np.sqrt(1 - PROXY_WEIGHT**2) * z[:, PROXY_FEATURE]
    return x.astype(np.float32).astype(np.float64)


def _sample_categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One arm per row drawn from its probability row (inverse CDF, vectorised)."""
    cdf = np.cumsum(probs, axis=1)
    draws = rng.random((probs.shape[0], 1))
    return np.minimum((draws > cdf).sum(axis=1), probs.shape[1] - 1)


def _draw_outcomes(
    rng: np.random.Generator, model: _OutcomeModel, treatment: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy revenue and cost of each row's logged arm, whose means are exactly the truth."""
    n = treatment.shape[0]
    arm = treatment[:, None]
    purchased = rng.random(n) < np.take_along_axis(model.purchase, arm, 1)[:, 0]
    redeemed = rng.random(n) < np.take_along_axis(model.redeem, arm, 1)[:, 0]
    basket = model.mean_basket * np.exp(
        BASKET_LOG_SIGMA * rng.standard_normal(n) - BASKET_LOG_SIGMA**2 / 2
    )
    return purchased * basket, model.value[treatment] * (purchased & redeemed)


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _rct_sizes(n_rct: int, split: tuple[float, float, float]) -> tuple[int, int, int]:
    n_train = round(split[0] * n_rct)
    n_val = round(split[1] * n_rct)
    return n_train, n_val, n_rct - n_train - n_val


def _split_tables(rows: pd.DataFrame, config: SimulatorConfig) -> dict[str, pd.DataFrame]:
    """OBS users first, then the RCT users cut into train / val / test (users are i.i.d.)."""
    bounds = np.cumsum([config.n_obs, *_rct_sizes(config.n_rct, config.rct_split)])
    starts = [0, *bounds[:-1]]
    names = [OBS, *RCT_TABLES]
    return {
        name: rows.iloc[start:stop].reset_index(drop=True)
        for name, start, stop in zip(names, starts, bounds, strict=True)
    }


def _truth_frame(revenue: np.ndarray, cost: np.ndarray) -> pd.DataFrame:
    m = revenue.shape[1]
    truth = pd.DataFrame(
        np.concatenate([revenue, cost], axis=1),
        columns=[*truth_revenue_columns(m), *truth_cost_columns(m)],
    )
    truth.insert(0, USER_ID, np.arange(revenue.shape[0], dtype=np.int64))
    return truth


def _meta_extra(revenue: np.ndarray, cost: np.ndarray, config: SimulatorConfig) -> dict[str, Any]:
    """Truth summary over all users, the default budget and the generating config."""
    all_control = {"revenue": float(revenue[:, 0].mean()), "cost": float(cost[:, 0].mean())}
    all_max = {"revenue": float(revenue[:, -1].mean()), "cost": float(cost[:, -1].mean())}
    return {
        "default_budget": (all_control["cost"] + all_max["cost"]) / 2,
        "truth_summary": {"all_control": all_control, "all_max": all_max},
        "face_values": face_values(config.n_treatments).tolist(),
        "obs_propensity": (
            "true logging probability of the logged arm, known only because the data is "
            "simulated; models must not rely on it"
        ),
        "simulator": asdict(config),
    }
