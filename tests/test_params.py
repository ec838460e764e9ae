"""params.yaml as typed sections: one loader, unknown keys named, defaults equal the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from bidfcl.methods import METHODS
from bidfcl.params import load_params, parse_params, set_params
from bidfcl.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
PARAMS_FILE = REPO / "params.yaml"


def test_training_methods_put_the_configured_method_first_without_repeats() -> None:
    params = parse_params({"train": {"method": "dfcl-ppl", "baselines": ["tsm-rct", "dfcl-ppl"]}})
    assert params.train.methods == ["dfcl-ppl", "tsm-rct"]
    assert [params.train.config_for(m).method for m in params.train.methods] == params.train.methods
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['nope'\]"):
        parse_params({"train": {"method": "nope"}})
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['tsm-magic'\].*tsm-rct"):
        parse_params({"train": {"baselines": ["tsm-magic"]}})


def test_unknown_settings_and_sections_are_named() -> None:
    with pytest.raises(ValueError, match=r"unknown promote setting\(s\) \['marign'\]"):
        parse_params({"promote": {"marign": 0.1}})
    with pytest.raises(ValueError, match=r"unknown train setting\(s\) \['learning_rate'\]"):
        parse_params({"train": {"learning_rate": 0.1}})
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['trian'\]"):
        parse_params({"trian": {}})
    with pytest.raises(ValueError, match="section 'ingest' must be a mapping"):
        parse_params({"ingest": [1, 2]})


def test_train_settings_are_checked_when_built() -> None:
    with pytest.raises(ValueError, match="ips_clip"):
        TrainConfig(ips_clip=0.0)
    with pytest.raises(ValueError, match=r"curvature must be one of \['gauss_newton', 'hessian'\]"):
        TrainConfig(curvature="newton")
    with pytest.raises(ValueError, match="select_by must be one of"):
        TrainConfig(select_by="val_eom")


def test_params_file_loads_with_overrides_and_none_keeps_the_file_value() -> None:
    params = load_params(PARAMS_FILE, {"train.method": "dfcl-pl", "train.seed": 5})
    config = params.train.config
    assert (config.method, config.seed) == ("dfcl-pl", 5)
    assert isinstance(config.hidden, tuple)
    assert config.method in METHODS
    kept = load_params(PARAMS_FILE, {"train.budget": None}).train.config
    assert kept.budget == load_params(PARAMS_FILE).train.config.budget
    with pytest.raises(FileNotFoundError, match="params file not found"):
        load_params(REPO / "missing.yaml")


def test_library_defaults_are_the_shipped_params() -> None:
    # The library's defaults and params.yaml differ only where the pipeline chooses its job.
    defaults, shipped = TrainConfig().to_dict(), load_params(PARAMS_FILE).train.config.to_dict()
    differing = {key for key in defaults if defaults[key] != shipped[key]}
    assert differing <= {"method", "num_threads"}
    shipped_params = load_params(PARAMS_FILE)
    defaults_params = parse_params({})
    for section in ("ingest", "evaluate", "promote"):
        assert getattr(shipped_params, section) == getattr(defaults_params, section), section


def test_set_params_keeps_comments_and_other_sections(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    shutil.copy(PARAMS_FILE, path)
    set_params(path, {"ingest.source": "/data/batch-7", "evaluate.budget": 2.5})
    params = load_params(path)
    assert params.ingest.source == "/data/batch-7"
    assert params.evaluate.budget == 2.5
    assert params.train == load_params(PARAMS_FILE).train
    assert "# Sections below are read by the pipeline stages" in path.read_text()


def test_every_dvc_stage_reads_an_existing_params_section() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    sections = set(yaml.safe_load(PARAMS_FILE.read_text()))
    for name, stage in stages.items():
        assert stage["cmd"] == f"bidfcl stage {name}"
        assert stage["params"] == [name]
        assert name in sections
