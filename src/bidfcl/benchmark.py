"""The experiment runner's library: a grid spec, its cells, their cache keys, one cell's run.

A spec (YAML, see benchmarks/specs/) names dataset recipes, methods, seeds and budget
scales; every combination is a :class:`Cell`. Running a cell trains the method on the
recipe's data for that seed (the training seed is the data seed, so the spread over seeds
includes the sampling noise of the trial), allocates and scores it on rct_test with
:func:`bidfcl.scoring.model_metrics` (ground truth where the data has it), and writes one
JSON record to ``OUT/cells/<key>.json``. The key hashes everything the record depends on:
the data (simulator settings and seed, or the raw file's md5 and the recipe), the method's
train settings, the budget scale and the source of every module a cell runs, so a rerun
skips exactly the cells whose record would come out the same. The Prefect flow in
flows/benchmark_flow.py fans the pending cells out; :mod:`bidfcl.report` reads the records.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import platform
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import torch
import yaml

from bidfcl.contract import RCT_TEST, TABLES, Dataset
from bidfcl.io import json_ready, write_json
from bidfcl.methods import method_spec, train_model
from bidfcl.params import load_params
from bidfcl.realdata import HybridFractions, fetch_hillstrom, load_hillstrom, split_hybrid
from bidfcl.scoring import model_metrics
from bidfcl.simulate import simulator_config
from bidfcl.train_config import TrainConfig

CELLS_DIR = "cells"
SOURCES_DIR = "sources"  # raw files a hybrid recipe needs, fetched once per output folder
RUN_FILE = "benchmark.json"  # the last run of a spec into the folder: plan, runner, wall time
SIMULATE = "simulate"
HYBRID = "hybrid"
HYBRID_SOURCES = ("hillstrom",)
SPEC_REQUIRED = {"name", "seeds", "methods"}
SPEC_OPTIONAL = {"description", "budget_scales", "train", "datasets", "sweeps"}
KEY_LENGTH = 16


class SpecError(ValueError):
    """A spec file that cannot be run: the message names the file and the entry."""


@dataclass(frozen=True)
class DatasetRecipe:
    """How to make one dataset for a seed: the simulator with settings, or the paper's
    hybrid recipe on a public RCT. ``sweep`` places a sweep's point on its x axis."""

    name: str
    kind: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    sweep: Mapping[str, Any] | None = None

    def identity(self, seed: int, sources: Path) -> dict[str, Any]:
        """What the data of ``seed`` is made from (hashed into every cell key)."""
        if self.kind == SIMULATE:
            return {"simulate": json_ready(asdict(simulator_config(self.settings, seed)))}
        return {
            "hybrid": dict(self.settings),
            "seed": seed,
            "source_md5": _file_md5(self.source_file(sources)),
        }

    def source_file(self, sources: Path) -> Path:
        """The raw file of a hybrid recipe, fetched into ``sources`` the first time."""
        return fetch_hillstrom(sources)

    def build(self, seed: int, sources: Path) -> Dataset:
        """The dataset of ``seed``, in memory."""
        from bidfcl.simulate import simulate

        if self.kind == SIMULATE:
            return simulate(simulator_config(self.settings, seed))
        fractions = HybridFractions(**self.settings.get("fractions", {}))
        raw = load_hillstrom(self.source_file(sources))
        split = split_hybrid(raw, seed=seed, fractions=fractions)
        return Dataset(meta=split.meta, tables=split.tables)


@dataclass(frozen=True)
class Cell:
    """One (dataset, method, seed, budget scale) point of a grid, with its train settings."""

    spec: str
    dataset: DatasetRecipe
    method: str
    seed: int
    budget_scale: float
    config: TrainConfig

    @property
    def label(self) -> str:
        scale = "" if self.budget_scale == 1.0 else f" budget x{self.budget_scale:g}"
        return f"{self.dataset.name} {self.method} seed {self.seed}{scale}"

    def key(self, sources: Path) -> str:
        """The cache key: a hash of the data, the settings, the seed and the code. The
        recipe's name is part of it: two sweeps may meet at the same data, and each keeps
        its own record."""
        payload = {
            "dataset": self.dataset.name,
            "data": self.dataset.identity(self.seed, sources),
            "method": self.method,
            "seed": self.seed,
            "budget_scale": self.budget_scale,
            "train": json_ready(self.config.to_dict()),
            "code": code_version(),
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


@dataclass(frozen=True)
class BenchmarkSpec:
    """A grid: dataset recipes (sweeps expanded into one recipe per value) x methods x
    seeds x budget scales, each trained with params.yaml's ``train:`` settings plus the
    spec's ``train:`` overrides."""

    name: str
    description: str
    datasets: tuple[DatasetRecipe, ...]
    methods: tuple[MethodVariant, ...]
    seeds: tuple[int, ...]
    budget_scales: tuple[float, ...] = (1.0,)
    train: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | str) -> BenchmarkSpec:
        """Read and check a spec file; a mistake is one :class:`SpecError` naming it."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise SpecError(f"{path}: cannot read the spec ({error})") from error
        return cls.parse(raw, str(path))

    @classmethod
    def parse(cls, raw: Any, origin: str) -> BenchmarkSpec:
        if not isinstance(raw, dict):
            raise SpecError(f"{origin}: a spec is a mapping with keys {sorted(SPEC_REQUIRED)}")
        unknown = sorted(set(raw) - SPEC_REQUIRED - SPEC_OPTIONAL)
        missing = sorted(SPEC_REQUIRED - set(raw))
        if unknown or missing:
            raise SpecError(f"{origin}: unknown keys {unknown}, missing keys {missing}")
        methods = tuple(
            _variant(entry, f"{origin}: methods[{i}]") for i, entry in enumerate(raw["methods"])
        )
        labels = [variant.name for variant in methods]
        if len(set(labels)) < len(labels):
            raise SpecError(f"{origin}: methods need distinct names, got {labels}")
        datasets = [
            _recipe(entry, f"{origin}: datasets[{i}]")
            for i, entry in enumerate(raw.get("datasets") or [])
        ]
        for i, sweep in enumerate(raw.get("sweeps") or []):
            datasets += _sweep_recipes(sweep, f"{origin}: sweeps[{i}]")
        names = [d.name for d in datasets]
        if not datasets or len(set(names)) < len(names):
            raise SpecError(f"{origin}: needs datasets with distinct names, got {names}")
        spec = cls(
            name=str(raw["name"]),
            description=str(raw.get("description", "")),
            datasets=tuple(datasets),
            methods=methods,
            seeds=tuple(int(s) for s in raw["seeds"]),
            budget_scales=tuple(float(b) for b in raw.get("budget_scales", (1.0,))),
            train=dict(raw.get("train") or {}),
        )
        for recipe in spec.datasets:  # a bad simulator setting fails now, not in a worker
            if recipe.kind == SIMULATE:
                try:
                    simulator_config(recipe.settings, 0)
                except (TypeError, ValueError) as error:
                    raise SpecError(f"{origin}: dataset {recipe.name!r}: {error}") from None
        return spec

    def only(self, names: Sequence[str]) -> BenchmarkSpec:
        """The spec restricted to the named datasets (all of them when ``names`` is empty):
        one regime can run now and the rest later, into the same folder."""
        if not names:
            return self
        known = [d.name for d in self.datasets]
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise SpecError(f"{self.name}: no dataset(s) {unknown}; the spec has {known}")
        return replace(self, datasets=tuple(d for d in self.datasets if d.name in names))

    def cells(self, params_file: Path) -> list[Cell]:
        """Every cell, dataset-major; ``params_file``'s train section is the base config."""
        configs = {}
        for variant in self.methods:
            settings = {**self.train, **variant.train, "method": variant.method}
            overrides = {f"train.{key}": value for key, value in settings.items()}
            try:
                configs[variant.name] = load_params(
                    params_file, overrides, run_overrides=False
                ).train.config
            except (KeyError, TypeError, ValueError) as error:
                raise SpecError(f"{self.name}: {variant.name}: train: {error}") from None
        return [
            Cell(
                spec=self.name,
                dataset=dataset,
                method=variant.name,
                seed=seed,
                budget_scale=scale,
                config=replace(configs[variant.name], seed=seed, budget=None),
            )
            for dataset in self.datasets
            for scale in self.budget_scales
            for seed in self.seeds
            for variant in self.methods
        ]


@dataclass(frozen=True)
class MethodVariant:
    """A column of the grid: a method under its own name, with train settings of its own on
    top of the spec's (an ablation or a tuning point). A plain method name is the method
    with no settings of its own."""

    name: str
    method: str
    train: Mapping[str, Any] = field(default_factory=dict)


def _variant(entry: Any, origin: str) -> MethodVariant:
    """A method name, or ``{name, method, train}`` for a named variant of one."""
    if isinstance(entry, str):
        entry = {"name": entry, "method": entry}
    if not isinstance(entry, dict) or not {"name", "method"} <= set(entry) <= {
        "name",
        "method",
        "train",
    }:
        raise SpecError(f"{origin}: a method is a name or a mapping of name, method and train")
    try:
        method_spec(entry["method"])
    except ValueError as error:
        raise SpecError(f"{origin}: {error}") from None
    train = entry.get("train") or {}
    if not isinstance(train, dict):
        raise SpecError(f"{origin}: train must be a mapping of train settings")
    return MethodVariant(str(entry["name"]), str(entry["method"]), dict(train))


def _recipe(entry: Any, origin: str, sweep: Mapping[str, Any] | None = None) -> DatasetRecipe:
    if not isinstance(entry, dict) or "name" not in entry:
        raise SpecError(f"{origin}: a dataset needs a name and one of {SIMULATE!r}, {HYBRID!r}")
    kinds = [kind for kind in (SIMULATE, HYBRID) if kind in entry]
    if len(kinds) != 1 or set(entry) - {"name", kinds[0]}:
        raise SpecError(f"{origin}: a dataset has a name and exactly one of simulate, hybrid")
    settings = dict(entry[kinds[0]] or {})
    if kinds[0] == HYBRID:
        source = settings.get("source")
        if source not in HYBRID_SOURCES or set(settings) - {"source", "fractions"}:
            raise SpecError(
                f"{origin}: hybrid takes source (one of {HYBRID_SOURCES}) and fractions"
            )
        try:
            HybridFractions(**settings.get("fractions", {}))
        except (TypeError, ValueError) as error:
            raise SpecError(f"{origin}: {error}") from None
    return DatasetRecipe(str(entry["name"]), kinds[0], settings, sweep)


def _sweep_recipes(sweep: Any, origin: str) -> list[DatasetRecipe]:
    """``{name, parameter, values, simulate}``: one simulator recipe per value."""
    if not isinstance(sweep, dict) or set(sweep) != {"name", "parameter", "values", SIMULATE}:
        raise SpecError(f"{origin}: a sweep has exactly name, parameter, values and simulate")
    recipes = []
    for value in sweep["values"]:
        point = {"name": sweep["name"], "parameter": sweep["parameter"], "value": value}
        settings = {**(sweep[SIMULATE] or {}), sweep["parameter"]: value}
        entry = {"name": f"{sweep['name']}={value}", SIMULATE: settings}
        recipes.append(_recipe(entry, origin, sweep=point))
    return recipes


def run_cell(cell: Cell, out_dir: Path) -> dict[str, Any]:
    """Train, allocate and score one cell, write its record and return it.

    The budget is ``budget_scale`` times the dataset's default budget. The record holds the
    scores on rct_test (:class:`bidfcl.scoring.Metrics`), the budget-value curve, the
    training history, the settings, the code version and the device it ran on.
    """
    started = time.perf_counter()
    sources = out_dir / SOURCES_DIR
    key = cell.key(sources)
    dataset = cell.dataset.build(cell.seed, sources)
    budget = cell.budget_scale * dataset.meta.budget_or_default(None)
    model = train_model(dataset, replace(cell.config, budget=budget), progress=False)
    metrics, curve = model_metrics(model, dataset, budget, RCT_TEST, "dr")
    meta = model.metadata
    record = {
        "key": key,
        "spec": cell.spec,
        "dataset": cell.dataset.name,
        "recipe": {"kind": cell.dataset.kind, "settings": dict(cell.dataset.settings)},
        "sweep": None if cell.dataset.sweep is None else dict(cell.dataset.sweep),
        "method": cell.method,
        "seed": cell.seed,
        "budget_scale": cell.budget_scale,
        "budget": budget,
        "n_treatments": dataset.meta.n_treatments,
        "has_truth": dataset.truth is not None,
        "sizes": {table: len(dataset.table(table)) for table in TABLES},
        "metrics": metrics.to_json(),
        "curve": None if curve is None else curve.to_dict(orient="records"),
        "training": {
            name: meta.get(name)
            for name in ("history", "epochs_run", "best_epoch", "fit_seconds", "seconds_per_epoch")
        },
        "train_config": cell.config.to_dict(),
        "bilevel": json_ready(meta.get("bilevel")),
        "fixed_gate": json_ready(meta.get("fixed_gate")),
        "code_version": code_version(),
        "git_commit": git_commit(),
        "device": device_name(),
        "seconds": time.perf_counter() - started,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json(out_dir / CELLS_DIR / f"{key}.json", json_ready(record))
    return record


def pending_cells(cells: Sequence[Cell], out_dir: Path) -> list[Cell]:
    """The cells without a record in ``out_dir`` (a changed setting or module changes the
    key, so its cell is pending again)."""
    done = {path.stem for path in (out_dir / CELLS_DIR).glob("*.json")}
    sources = out_dir / SOURCES_DIR
    return [cell for cell in cells if cell.key(sources) not in done]


def read_cells(out_dir: Path) -> list[dict[str, Any]]:
    """Every record in ``out_dir``, in file-name order."""
    return [json.loads(path.read_text()) for path in sorted((out_dir / CELLS_DIR).glob("*.json"))]


@cache
def code_version() -> str:
    """A hash of the code a cell's record comes from: :func:`run_cell`'s source, the source
    of every bidfcl module this module imports (transitively) and the torch version. Editing
    a learner or the scoring reruns the cells; editing the CLI, the report or the spec
    parsing here does not."""
    package = Path(__file__).parent
    digest = hashlib.sha256(torch.__version__.encode())
    digest.update(inspect.getsource(run_cell).encode())
    for module in sorted(_package_imports(package, "benchmark") - {"benchmark"}):
        digest.update(module.encode())
        digest.update((package / f"{module}.py").read_bytes())
    return digest.hexdigest()[:12]


def _package_imports(package: Path, start: str) -> set[str]:
    """``start`` and the bidfcl modules it imports, transitively (read from the source)."""
    seen: set[str] = set()
    queue = [start]
    while queue:
        module = queue.pop()
        if module in seen or not (package / f"{module}.py").exists():
            continue
        seen.add(module)
        tree = ast.parse((package / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            queue += [name.split(".")[1] for name in names if name.startswith("bidfcl.")]
    return seen


@cache
def git_commit(package: Path = Path(__file__).parent) -> str | None:
    """The checkout's commit, for the record (not part of the key: see code_version), with
    ``+dirty`` when the package's tracked sources differ from it: the cell then ran code no
    commit holds, and only its code version identifies it."""
    done = subprocess.run(
        ["git", "-C", str(package), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    commit = done.stdout.strip()
    if not commit:
        return None
    changed = subprocess.run(
        ["git", "-C", str(package), "status", "--porcelain", "--untracked-files=no", "."],
        capture_output=True,
        text=True,
        check=False,
    )
    return f"{commit}+dirty" if changed.stdout.strip() else commit


def device_name() -> str:
    """The accelerator a cell trained on: the GPU's name, else the CPU model and cores."""
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        model = names[0].split(":", 1)[1].strip() if names else model
    return f"cpu: {model} ({os.cpu_count()} cores)"


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
