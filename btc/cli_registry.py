"""``btc registry``: the MLflow model registry from the command line (a thin door onto btc.tracking).

Exit codes: 0 done (or nothing to do), 1 a gate failed and the champion is unchanged, 2 bad
input or an unusable store (nothing changed). Imports of MLflow and torch happen inside the
commands, so ``btc --help`` stays fast.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

registry_app = typer.Typer(help="MLflow model registry: register runs, promote through gates, roll back, list.",
                           no_args_is_help=True)

NameOpt = Annotated[Optional[str], typer.Option("--name", "-n", help="registered model name; default registry.model_name")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override, e.g. -s registry.gates.max_ece=0.05")]


from btc.cli_common import config_or_fail as _config  # noqa: E402
from btc.cli_common import fail as _fail  # noqa: E402


def _errors() -> tuple[type[Exception], ...]:
    from mlflow.exceptions import MlflowException

    from btc.tracking.registry import RegistryError
    from btc.tracking.store import TrackingError

    return RegistryError, TrackingError, MlflowException, ValueError, FileNotFoundError


def check_tracking() -> None:
    """Exit with a clear message now, before training, if the tracking store is unusable."""
    from btc.tracking.store import TrackingError, check_reachable, tracking_uri

    try:
        check_reachable(tracking_uri())
    except TrackingError as err:
        raise _fail(f"{err} (or train with --no-track)") from None


def track_training_run(cfg, result, split, report: dict | None, evaluation_dir: Path) -> str:
    """Log a finished ``btc train`` run to MLflow and say how to look at it."""
    from btc.tracking.run_logging import log_training_run
    from btc.tracking.store import tracking_uri, ui_hint

    try:
        run_id = log_training_run(cfg, result, split, report, artifacts_dir=evaluation_dir)
    except _errors() as err:
        raise _fail(f"training finished but logging to MLflow failed: {err}; "
                    f"the run folder {result.out_dir} is intact") from None
    typer.echo(f"MLflow run {run_id} in experiment {cfg.registry.experiment!r} at {tracking_uri()}")
    typer.echo(f"register it: btc registry register {run_id}   |   browse: {ui_hint(tracking_uri())}")
    return run_id


def _model_name(name: str | None, cfg=None, config: Path | None = None, set_: list[str] | None = None) -> str:
    """``--name`` as given (a blank one refused), else the config's ``registry.model_name``."""
    if name is None:
        return (cfg or _config(config, set_)).registry.model_name
    if not name.strip():
        raise _fail("--name is blank; give a registered model name, or leave --name out for registry.model_name")
    return name


def eval_rows_from(data: Path):
    """Rows of the frozen evaluation set: a split/manifest .parquet's test rows, or a dataset folder's Testing images."""
    from btc.data.manifest import build_manifest, load_manifest
    from btc.evaluate import rows_to_evaluate

    if not data.exists():
        raise _fail(f"--data {str(data)!r} does not exist; pass a dataset folder or a split/manifest .parquet")
    try:
        table = load_manifest(data) if data.is_file() else build_manifest(data, progress=False)
        return rows_to_evaluate(table, "test")
    except (ValueError, OSError) as err:
        raise _fail(f"--data {str(data)!r}: {err}") from None


@registry_app.command("register")
def register_cmd(
    run_id: Annotated[str, typer.Argument(help="MLflow run id printed by `btc train`")],
    name: NameOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Add a run's model as a new version and point the `challenger` alias at it."""
    from btc.tracking.registry import register

    name = _model_name(name, config=config, set_=set_)
    try:
        version = register(run_id, name)
    except _errors() as err:
        raise _fail(str(err)) from None
    typer.echo(f"registered run {run_id} as {name} v{version}; challenger -> v{version}")
    typer.echo(f"next: btc registry promote --name {shlex.quote(name)}")


@registry_app.command("promote")
def promote_cmd(
    name: NameOpt = None,
    data: Annotated[Optional[Path], typer.Option(
        help="frozen evaluation set: dataset folder (its Testing images, or all of them without a Testing folder) or "
             "split/manifest .parquet (its test rows); images the challenger trained on are refused; "
             "default the test split logged with the challenger's run")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Evaluate challenger and champion on the same set; move `champion` only if every gate passes."""
    from btc.tracking.registry import promote

    cfg = _config(config, set_)
    name = _model_name(name, cfg)
    rows = eval_rows_from(data) if data is not None else None
    try:
        result = promote(name, cfg, rows, eval_source=f"--data {data}" if data is not None else None)
    except _errors() as err:
        raise _fail(str(err)) from None
    typer.echo(result.table())
    if result.gates and not result.promoted:
        raise typer.Exit(1)


@registry_app.command("rollback")
def rollback_cmd(name: NameOpt = None, config: ConfigOpt = None, set_: SetOpt = None):
    """Move `champion` back to the previous champion."""
    from btc.tracking.registry import rollback

    name = _model_name(name, config=config, set_=set_)
    try:
        old, new = rollback(name)
    except _errors() as err:
        raise _fail(str(err)) from None
    typer.echo(f"{name}: champion v{old} -> v{new}")
    same_settings = "".join(f" -c {shlex.quote(str(config))}" if config else "") + \
        "".join(f" -s {shlex.quote(o)}" for o in set_ or [])  # the reference goes where monitoring reads it
    typer.echo(f"the monitoring reference was built for the champion at its promotion; rebuild it for v{new}, or "
               f"monitoring reports the mismatch: btc monitor-reference "
               f"{shlex.quote(f'models:/{name}@champion')}{same_settings}")


@registry_app.command("list")
def list_cmd(name: NameOpt = None, config: ConfigOpt = None, set_: SetOpt = None):
    """Versions with their aliases, run, key test metrics and last promotion decision."""
    from btc.tracking.registry import list_versions

    name = _model_name(name, config=config, set_=set_)
    try:
        rows = list_versions(name)
    except _errors() as err:
        raise _fail(str(err)) from None

    def num(v):
        return "-" if v is None else f"{v:.4f}"

    table = [("version", "aliases", "test macro-F1", "clean macro-F1", "test ECE", "decision", "run")]
    table += [(r["version"], ",".join(r["aliases"]) or "-", num(r["test_macro_f1"]), num(r["test_clean_macro_f1"]),
               num(r["test_ece"]), r["decision"] or "-", r["run_id"] or "-") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
