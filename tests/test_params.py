"""params.yaml as typed sections: one loader, unknown keys named, defaults equal the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from bidfcl.methods import METHODS
from bidfcl.params import (
    RUN_PARAMS_FILE,
    load_params,
    parse_params,
    read_run_overrides,
    write_run_overrides,
)
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
    with pytest.raises(ValueError, match="upper_estimator dr needs upper_fraction > 0"):
        TrainConfig(upper_estimator="dr", upper_fraction=0)
    with pytest.raises(ValueError, match="not bidfcl-pifd's"):
        TrainConfig(method="bidfcl-pifd", upper_estimator="dr")


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
    for section in ("ingest", "evaluate", "promote", "tracking"):
        assert getattr(shipped_params, section) == getattr(defaults_params, section), section


def test_run_overrides_are_read_after_params_yaml_and_leave_it_untouched(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    shutil.copy(PARAMS_FILE, path)
    before = path.read_bytes()
    write_run_overrides(tmp_path, {"ingest.source": "/data/batch-7", "evaluate.budget": 2.5})
    assert path.read_bytes() == before
    params = load_params(path)
    assert params.ingest.source == "/data/batch-7"
    assert params.evaluate.budget == 2.5
    assert params.train == load_params(PARAMS_FILE).train
    # a new flow run starts from params.yaml alone; explicit overrides win over recorded ones
    assert load_params(path, run_overrides=False).evaluate.budget is None
    assert load_params(path, {"evaluate.budget": 1.0}).evaluate.budget == 1.0
    recorded = yaml.safe_load((tmp_path / RUN_PARAMS_FILE).read_text())
    assert recorded == {
        "ingest": {"source": "/data/batch-7"},
        "evaluate": {"budget": 2.5},
        "train": {},
    }


def test_only_the_flows_sections_can_be_overridden(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"promote\.margin"):
        write_run_overrides(tmp_path, {"promote.margin": 1.0})
    (tmp_path / RUN_PARAMS_FILE).write_text("promote: {margin: 1.0}\n")
    with pytest.raises(ValueError, match="promote"):
        read_run_overrides(tmp_path)
