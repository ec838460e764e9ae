"""The methods a user can train, by name, and the one entry point that trains any of them.

Every method trains the same :class:`~bidfcl.model.UpliftNet`; methods differ only in the
rows they learn from, the per-row weights, the loss and how they are fitted, so a method
is one entry of :data:`METHOD_SPECS`.

- ``tsm-rct`` / ``tsm-obs`` / ``tsm-both``: factual MSE (per-arm weighted) on RCT train,
  OBS, or both.
- ``tsm-ips``: factual MSE on OBS weighted by 1 / p, with p from a multinomial logistic
  propensity model fitted on OBS features and clipped from below.
- ``dfcl-ppl`` / ``dfcl-pifd``: primal decision losses on RCT train at lambda*, which is
  re-solved from the current predictions at the start of every epoch, plus alpha * MSE;
  warm-started from a ``tsm-rct`` model.
- ``dfcl-pl`` / ``dfcl-ifd``: DFCL's dual losses over a lambda grid (scales of the current
  lambda*), plus alpha * MSE; warm-started the same way.
- ``tsm-obs-ft``: tsm-obs, then fine-tuned by the factual MSE on RCT train (the first
  data-fusion baseline practitioners reach for with a big biased log and a small trial).
- ``bidfcl-ppl`` / ``bidfcl-pifd``: the bi-level learner of :mod:`bidfcl.bilevel` (a Bridge
  tuned by the RCT decision loss mixes a frozen Teacher into the Target's OBS labels); the
  Teacher (``teacher``: tsm-obs-ft, tsm-rct or tsm-both, on the RCT rows the upper level
  does not score on) is trained here and is also the Target's start.
- ``bidfcl-fixed``: the same Target with the Bridge frozen at a constant gate chosen on
  rct_val (the ablation that shows what learning the Bridge adds).

A run with ``checkpoint_dir`` checkpoints each phase (the warm start or Teacher, then the
method) in its own subfolder ``<checkpoint_dir>/<phase method>/``: a rerun reuses a phase
that finished (its model is kept there) and resumes the one that was interrupted. A phase's
checkpoint is used only for the same settings, data and starting weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch

from bidfcl.bilevel import fit_bilevel, upper_level_split
from bidfcl.contract import (
    OBS,
    RCT_TRAIN,
    RCT_VAL,
    Dataset,
    LoggedData,
    concat_logged,
    load_dataset,
)
from bidfcl.datamodule import UpliftDataModule
from bidfcl.decision import (
    DecisionLoss,
    dual_ifd_decision,
    dual_pl_decision,
    pifd_decision,
    ppl_decision,
)
from bidfcl.deployment import DEPLOYMENT_KEY, calibrate
from bidfcl.distributed import is_main_process
from bidfcl.io import atomic_write
from bidfcl.learner import CHECKPOINT_FILE, UpliftLearner, fit_learner, scoped_torch_settings
from bidfcl.model import UpliftModel
from bidfcl.propensity import ips_weights
from bidfcl.streaming import fit_streaming, streamed_obs_key, streams_obs
from bidfcl.train_config import SELECT_BY, TrainConfig

log = logging.getLogger(__name__)

# (spec, dataset, config, budget, start_from, progress) -> the fitted model (on the CPU)
Fit = Callable[["MethodSpec", Dataset, TrainConfig, float, UpliftModel | None, bool], UpliftModel]
# the metadata kept of the model a method started from
START_SUMMARY_KEYS = ("method", "best_epoch", "best_val_eom", "best_val_loss", "epochs_run")
FITTED_DIR = "fitted"  # in a phase's checkpoint folder: the phase's model once it finished
PHASE_KEY_FILE = "phase.key"  # what the phase's checkpoints were made from (see _phase_key)


def fit_single_level(
    spec: MethodSpec,
    dataset: Dataset,
    config: TrainConfig,
    budget: float,
    start_from: UpliftModel | None,
    progress: bool,
) -> UpliftModel:
    """One Lightning fit of one method on its source tables, from ``start_from`` (copied)
    or a fresh network (OBS streamed from the folder when it was left unloaded)."""
    if OBS in spec.sources and OBS not in dataset.tables:
        return fit_streaming(spec.sources, dataset, config, budget, start_from, progress)
    L.seed_everything(config.seed, workers=True, verbose=False)
    train_rows = _training_rows(dataset, spec, config)
    if start_from is None:
        model = UpliftModel.build(
            train_rows.x,
            dataset.meta.feature_columns,
            dataset.meta.treatment_names,
            config.model_config,
        )
    else:
        model = copy.deepcopy(start_from).to("cpu")
    learner = UpliftLearner(
        model,
        spec.decision_loss,
        config,
        budget,
        lr=config.decision_lr if spec.decision else config.lr,
        decision_x=train_rows.x if spec.decision else None,
        val_truth=dataset.truth_for(RCT_VAL),
    )
    batch_size = config.decision_batch_size if spec.decision else config.batch_size
    data = UpliftDataModule(
        train_rows, dataset.logged(RCT_VAL), batch_size, config.seed, config.num_workers
    )
    return fit_learner(
        learner, data, dataset, config, budget, progress, spec.sources, len(train_rows)
    )


def fit_bilevel_method(
    spec: MethodSpec,
    dataset: Dataset,
    config: TrainConfig,
    budget: float,
    start_from: UpliftModel | None,
    progress: bool,
) -> UpliftModel:
    """A bidfcl-* fit: ``start_from`` is the Teacher (see :attr:`MethodSpec.teacher`)."""
    if start_from is None or spec.decision_loss is None:
        raise ValueError(f"{config.method}: a bi-level fit needs a Teacher and a decision loss")
    return fit_bilevel(dataset, config, budget, spec.decision_loss, start_from, progress)


FIXED_GATES = (0.0, 0.25, 0.5, 1.0)
"""The constant gates bidfcl-fixed chooses among on rct_val: from no Teacher at all (the logged
labels, the RCT rows and the anchor) to the Teacher alone."""


def fit_fixed_gate_method(
    spec: MethodSpec,
    dataset: Dataset,
    config: TrainConfig,
    budget: float,
    start_from: UpliftModel | None,
    progress: bool,
) -> UpliftModel:
    """bidfcl-fixed: the bi-level Target with its Bridge frozen at each gate of
    :data:`FIXED_GATES` (``fixed_gate`` if set), keeping the one whose best rct_val score
    (``select_by``) is best. A learned Bridge has to beat this to earn its compute."""
    monitor, maximize = SELECT_BY[config.select_by]
    gates = FIXED_GATES if config.fixed_gate is None else (config.fixed_gate,)
    fits = {}
    for gate in gates:
        # each gate's fit checkpoints in its own folder, so one never resumes another's
        folder = config.checkpoint_dir and str(Path(config.checkpoint_dir) / f"gate-{gate}")
        gate_config = replace(config, fixed_gate=gate, checkpoint_dir=folder)
        fits[gate] = fit_bilevel_method(spec, dataset, gate_config, budget, start_from, progress)
    scores = {gate: fits[gate].metadata[f"best_{monitor}"] for gate in gates}
    best = (max if maximize else min)(gates, key=lambda gate: scores[gate])
    model = fits[best]
    model.metadata["fixed_gate"] = {"chosen": best, f"best_{monitor}_by_gate": scores}
    return model


@dataclass(frozen=True)
class MethodSpec:
    """How one method trains: its rows, their weights, its loss and its fit function.

    Every method fits the factual MSE on ``sources``; a ``decision_loss`` makes it a
    decision method: it must train on RCT rows (the loss needs known propensities), uses
    ``decision_batch_size`` and ``decision_lr``, re-solves lambda* every epoch and adds
    alpha * MSE. ``warm_start`` names the method whose model it is fine-tuned from;
    ``teacher``: a bi-level fit, whose frozen Teacher (also the Target's start) is a model
    of the method the ``teacher`` setting names. Either is trained first, for
    ``warm_start_epochs``.
    """

    sources: tuple[str, ...]
    decision_loss: DecisionLoss | None = None
    ips_weighted: bool = False
    warm_start: str | None = None
    teacher: bool = False
    fit: Fit = fit_single_level

    @property
    def decision(self) -> bool:
        return self.decision_loss is not None


METHOD_SPECS: dict[str, MethodSpec] = {
    "tsm-rct": MethodSpec((RCT_TRAIN,)),
    "tsm-obs": MethodSpec((OBS,)),
    "tsm-both": MethodSpec((RCT_TRAIN, OBS)),
    "tsm-ips": MethodSpec((OBS,), ips_weighted=True),
    "tsm-obs-ft": MethodSpec((RCT_TRAIN,), warm_start="tsm-obs"),
    "dfcl-ppl": MethodSpec((RCT_TRAIN,), ppl_decision, warm_start="tsm-rct"),
    "dfcl-pifd": MethodSpec((RCT_TRAIN,), pifd_decision, warm_start="tsm-rct"),
    "dfcl-pl": MethodSpec((RCT_TRAIN,), dual_pl_decision, warm_start="tsm-rct"),
    "dfcl-ifd": MethodSpec((RCT_TRAIN,), dual_ifd_decision, warm_start="tsm-rct"),
    "bidfcl-ppl": MethodSpec((OBS, RCT_TRAIN), ppl_decision, teacher=True, fit=fit_bilevel_method),
    "bidfcl-pifd": MethodSpec(
        (OBS, RCT_TRAIN), pifd_decision, teacher=True, fit=fit_bilevel_method
    ),
    "bidfcl-fixed": MethodSpec(
        (OBS, RCT_TRAIN), ppl_decision, teacher=True, fit=fit_fixed_gate_method
    ),
}
METHODS: tuple[str, ...] = tuple(METHOD_SPECS)
STREAMING_METHODS: tuple[str, ...] = tuple(
    name
    for name, spec in METHOD_SPECS.items()
    if all(
        OBS not in METHOD_SPECS[phase].sources
        or (METHOD_SPECS[phase].fit is fit_single_level and not METHOD_SPECS[phase].ips_weighted)
        for phase in filter(None, (name, spec.warm_start))
    )
)
"""Methods that train with OBS streamed (``stream_obs_above_mb``): every phase reads OBS by
single-level batches or not at all. Bi-level fits pair OBS with RCT batches and tsm-ips fits
its propensity model on all of OBS, both in memory."""


def method_spec(method: str) -> MethodSpec:
    """The spec of ``method``; an unknown name is a clear error listing the known ones."""
    if method not in METHOD_SPECS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    return METHOD_SPECS[method]


def train_model(
    dataset: Dataset,
    config: TrainConfig,
    progress: bool = True,
    warm_start: UpliftModel | None = None,
) -> UpliftModel:
    """Train ``config.method`` and return the model of its best validation epoch.

    Training starts from ``warm_start`` when one is given (it is copied, not modified; a
    Teacher given so should be trained on ``upper_level_split(dataset, config).lower``);
    otherwise a method with a warm-start or Teacher method first trains that method for
    ``warm_start_epochs`` (a Teacher on that split). With ``calibrate_spend`` the model
    then gets the lambda it ships with (:mod:`bidfcl.deployment`). The returned model is on
    the CPU; its metadata records the method, seed, budget, best epoch, per-epoch validation
    history, the warm start (the Teacher of a bi-level method is under ``teacher``), the
    calibration and the dataset's metadata.
    """
    spec = method_spec(config.method)
    budget = dataset.meta.budget_or_default(config.budget)
    data_key = _dataset_key(dataset) if config.checkpoint_dir is not None else ""
    with scoped_torch_settings(config.num_threads):
        start_from = warm_start
        first = spec.warm_start or (config.teacher if spec.teacher else None)
        if start_from is None and first is not None:
            # a Teacher never sees the rows its Bridge is judged on (cross-fitting)
            first_data = upper_level_split(dataset, config).lower if spec.teacher else dataset
            start_from = _fit_start(first, first_data, config, budget, progress, data_key)
        model = _fit_phase(dataset, config, budget, start_from, progress, data_key)
        if config.calibrate_spend:
            calibration = calibrate(model, dataset.logged(RCT_VAL), budget, seed=config.seed)
            model.metadata[DEPLOYMENT_KEY] = calibration.to_dict()
    fine_tuned_from = warm_start if spec.warm_start is None else start_from
    model.metadata["warm_start"] = _summary(fine_tuned_from)
    return model


def train_to_folder(
    data_dir: Path | str, out_dir: Path | str, config: TrainConfig, progress: bool = True
) -> Path:
    """Load a dataset folder, train ``config.method`` and save the model folder atomically
    (under DDP, from the first process only: every process ends with the same model)."""
    streamed = streams_obs(data_dir, config, STREAMING_METHODS)  # OBS too large to load
    tables = (RCT_TRAIN, RCT_VAL) if streamed else (OBS, RCT_TRAIN, RCT_VAL)
    dataset = load_dataset(data_dir, tables=tables)
    model = train_model(dataset, config, progress)
    return model.save(out_dir) if is_main_process() else Path(out_dir)


def _fit_start(
    method: str,
    dataset: Dataset,
    config: TrainConfig,
    budget: float,
    progress: bool,
    data_key: str,
) -> UpliftModel:
    """Fit ``method`` as a warm start or Teacher, for ``warm_start_epochs``, after its own
    warm start if it has one (a tsm-obs-ft Teacher first fits tsm-obs)."""
    spec = method_spec(method)
    start_from = None
    if spec.warm_start is not None:
        start_from = _fit_start(spec.warm_start, dataset, config, budget, progress, data_key)
    phase_config = replace(config, method=method, max_epochs=config.warm_start_epochs)
    return _fit_phase(dataset, phase_config, budget, start_from, progress, data_key)


def _fit_phase(
    dataset: Dataset,
    config: TrainConfig,
    budget: float,
    start_from: UpliftModel | None,
    progress: bool,
    data_key: str,
) -> UpliftModel:
    """Fit ``config.method`` from ``start_from``; with ``checkpoint_dir``, in its phase folder,
    reusing the model of a finished phase or resuming an interrupted one (see module doc)."""
    spec = method_spec(config.method)
    if config.checkpoint_dir is None:
        return check_fitted(spec.fit(spec, dataset, config, budget, start_from, progress))
    folder = Path(config.checkpoint_dir) / config.method
    key = _phase_key(config, data_key, start_from)
    key_file = folder / PHASE_KEY_FILE
    if not key_file.exists() or key_file.read_text() != key:
        shutil.rmtree(folder, ignore_errors=True)  # another run's: never resume from it
        folder.mkdir(parents=True)
        atomic_write(key_file, lambda tmp: tmp.write_text(key))
    elif (folder / FITTED_DIR).exists():
        log.warning("%s: reusing the model this phase left in %s", config.method, folder)
        return UpliftModel.load(folder / FITTED_DIR)
    phase_config = replace(config, checkpoint_dir=str(folder))
    model = check_fitted(spec.fit(spec, dataset, phase_config, budget, start_from, progress))
    model.save(folder / FITTED_DIR)
    (folder / CHECKPOINT_FILE).unlink(missing_ok=True)
    return model


class TrainingDiverged(RuntimeError):
    """A fit ended without a model worth saving (non-finite weights, no scored epoch)."""


def check_fitted(model: UpliftModel) -> UpliftModel:
    """``model`` if its weights are finite and some validation epoch scored; otherwise raise,
    so a diverged fit fails loudly instead of saving NaN weights and reporting success."""
    broken = [
        name for name, tensor in model.net.state_dict().items() if not torch.isfinite(tensor).all()
    ]
    method = model.metadata.get("method")
    if broken:
        raise TrainingDiverged(
            f"{method}: training diverged, non-finite weights in {broken[:3]} (lower the "
            "learning rate, or check the data for extreme values)"
        )
    if model.metadata.get("best_epoch", 0) < 0:
        raise TrainingDiverged(f"{method}: no validation epoch gave a finite score")
    return model


def _phase_key(config: TrainConfig, data_key: str, start_from: UpliftModel | None) -> str:
    """MD5 of what a phase's result depends on: its settings (except where checkpoints go),
    the data, and the weights it starts from."""
    digest = hashlib.md5()
    settings = {k: v for k, v in config.to_dict().items() if k != "checkpoint_dir"}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(data_key.encode())
    if start_from is not None:
        for module in (start_from.net, start_from.scaler):
            for name, tensor in module.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def _dataset_key(dataset: Dataset) -> str:
    """MD5 of a dataset's metadata and of the contents of every table it holds."""
    meta = json.dumps(dataset.meta.to_dict(), sort_keys=True, default=str)
    digest = hashlib.md5(meta.encode())
    frames = {**dataset.tables, **({"truth": dataset.truth} if dataset.truth is not None else {})}
    for name in sorted(frames):
        digest.update(json.dumps([name, *map(str, frames[name].columns)]).encode())
        digest.update(pd.util.hash_pandas_object(frames[name], index=False).to_numpy().tobytes())
    digest.update(streamed_obs_key(dataset).encode())  # OBS left on disk: its file
    return digest.hexdigest()


def _summary(model: UpliftModel | None) -> dict[str, Any] | None:
    if model is None:
        return None
    return {key: model.metadata.get(key) for key in START_SUMMARY_KEYS}


def _training_rows(dataset: Dataset, spec: MethodSpec, config: TrainConfig) -> LoggedData:
    parts = []
    for table in spec.sources:
        logged = dataset.logged(table)
        if spec.ips_weighted:
            logged = logged.with_weight(
                ips_weights(logged, config.ips_clip, config.propensity_steps)
            )
        parts.append(logged)
    return concat_logged(parts)
