"""``btc monitor`` and ``btc monitor-reference``: drift monitoring as commands.

Registered by :mod:`btc.cli` with ``app.command("monitor")(monitor_command)`` and
``app.command("monitor-reference")(reference_command)``.

``btc monitor`` reads a window of the prediction log, compares it with the reference in an
Evidently report, adds the snapshot to the dashboard workspace, logs the verdict to MLflow
and prints what it would do about drift (retraining itself is started by the Prefect
``monitoring`` flow). Exit codes: 0 no drift, 3 drift, 1 no meaningful report was possible
(missing or unreadable reference, absent or empty log, too few predictions in the window), 2
the command was misused (invalid option or config, a ``--log`` that is no prediction log, an
``--out`` or ``--workspace`` that cannot be a folder). Options are checked before any file is
read, so a misuse is told at once.

``btc monitor-reference`` builds the reference from a model and the validation images.

``btc rotate-log ARCHIVE`` moves the prediction log's rows into an archive log, safely while the
service writes (:meth:`btc.predlog.PredictionLog.rotate`); exit 2 names a log or archive that
cannot be used.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer

EXIT_DRIFT = 3
DATE_FORMATS = ["%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]


from btc.cli_common import config_or_fail as _load_config  # noqa: E402
from btc.cli_common import fail as _error  # noqa: E402
from btc.cli_common import writable_folder  # noqa: E402


def monitor_command(
    window_hours: Annotated[Optional[float], typer.Option(
        "--window-hours", help="window length ending at --until; default monitoring.window_hours")] = None,
    since: Annotated[Optional[datetime], typer.Option(formats=DATE_FORMATS, help="window start, UTC")] = None,
    until: Annotated[Optional[datetime], typer.Option(formats=DATE_FORMATS, help="window end, UTC; default now")] = None,
    log: Annotated[Optional[Path], typer.Option("--log", help="prediction log; default $BTC_HOME/predictions.sqlite")] = None,
    reference: Annotated[Optional[Path], typer.Option(
        "--reference", help="reference folder; default monitoring.reference_dir or $BTC_HOME/monitoring/reference")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="report folder; default $BTC_HOME/reports/monitoring")] = None,
    workspace: Annotated[Optional[Path], typer.Option(
        "--workspace", help="Evidently workspace; default monitoring.workspace or $BTC_HOME/evidently")] = None,
    dashboard: Annotated[bool, typer.Option("--dashboard/--no-dashboard", help="add the snapshot to the workspace")] = True,
    mlflow: Annotated[bool, typer.Option("--mlflow/--no-mlflow", help="log the verdict to experiment btc-monitoring")] = True,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", "-s", help="override, e.g. -s monitoring.min_predictions=50")] = None,
) -> None:
    """Drift report over a window of the prediction log. Exit 0: no drift, 3: drift, 1: no meaningful report."""
    from btc.paths import prediction_log_path, reports_dir
    from btc.reference import MonitoringError
    from btc.tracking.store import TrackingError
    from monitoring.actions import act_on_drift
    from monitoring.dashboard import workspace_of
    from monitoring.run import (check_log_file, check_options, log_to_mlflow, monitoring_options, reference_dir_of,
                                run_monitoring, window_bounds)

    cfg = _load_config(config, set_)
    options = monitoring_options(cfg)
    if window_hours is not None:
        try:
            check_options(window_hours=window_hours)
        except ValueError as err:
            raise _error(f"invalid --window-hours: {err}") from None
        options["window_hours"] = window_hours
    # every option is checked before the reference's Parquet is read (a misuse exits 2, never after work)
    log = log or prediction_log_path()
    try:
        check_options(**options)
        window_bounds(options["window_hours"], since, until)
        check_log_file(log)
    except ValueError as err:
        raise _error(str(err), 2) from None
    out = writable_folder(out or reports_dir() / "monitoring", "report folder (--out)")
    workspace = (workspace or workspace_of(cfg)) if dashboard else None
    if workspace is not None:
        writable_folder(workspace, "Evidently workspace (--workspace)")
    reference = reference or reference_dir_of(cfg)
    try:
        verdict = run_monitoring(log, reference, since=since, until=until, out_dir=out, workspace=workspace,
                                 **options)
    except MonitoringError as err:
        raise _error(str(err), 1) from None
    except ValueError as err:
        raise _error(str(err), 2) from None
    typer.echo(verdict.summary())
    typer.echo(f"report: {verdict.html}")
    if verdict.dashboard_error:  # the verdict and its exit code stand
        typer.echo(f"warning: {verdict.dashboard_error}", err=True)
    if mlflow:
        try:
            typer.echo(f"MLflow run: {log_to_mlflow(verdict)} (experiment btc-monitoring)")
        except TrackingError as err:  # the verdict stands (and is on disk): drift is still reported below
            typer.echo(f"warning: {err}; the verdict is kept in {verdict.html.with_suffix('.verdict.json')}", err=True)
    if workspace is not None:
        typer.echo(f"dashboard: evidently ui --workspace {workspace} --port 8000")
    if verdict.drifted:
        typer.echo(act_on_drift(verdict, trigger=None))
        raise typer.Exit(EXIT_DRIFT)


def reference_command(
    model: Annotated[str, typer.Argument(help="model.pt path or MLflow URI (models:/btc-classifier@champion)")],
    split: Annotated[Optional[Path], typer.Option(
        help="split Parquet (path, label, split); its validation rows are used; default the split the model's "
             "MLflow run logged, or the split.parquet beside a model.pt")] = None,
    out: Annotated[Optional[Path], typer.Option(help="reference folder; default $BTC_HOME/monitoring/reference")] = None,
    split_name: Annotated[str, typer.Option("--split-name", help="which split's rows to use")] = "val",
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override, e.g. -s monitoring.pca_components=6")] = None,
) -> None:
    """Build the monitoring reference from a model and the validation images (run at promotion)."""
    from btc.predict import Predictor, is_mlflow_uri
    from btc.reference import build_reference, components_for
    from btc.tables import read_parquet
    from btc.tracking.model_io import logged_split
    from btc.tracking.store import TrackingError
    from monitoring.run import reference_dir_of

    cfg = _load_config(config, set_)
    if split is None and not is_mlflow_uri(model):
        split = Path(model).parent / "split.parquet"
        if not split.is_file():
            raise _error(f"no --split given and no split.parquet beside {model!r}; pass --split SPLIT.parquet", 2)
    if split is not None and not split.is_file():
        raise _error(f"split file {str(split)!r} does not exist; write one with btc data split", 2)
    out = writable_folder(out or reference_dir_of(cfg), "reference folder (--out)")
    try:
        rows = read_parquet(split) if split is not None else logged_split(model, instead="pass --split SPLIT.parquet")
    except TrackingError as err:
        raise _error(str(err), 2) from None
    except ValueError as err:
        raise _error(f"{err}" if split is None else f"split file {str(split)!r} cannot be read as Parquet "
                     f"({err}); write one with btc data split", 2) from None
    except OSError as err:
        raise _error(f"split file {str(split)!r} cannot be read ({err})", 2) from None
    split = split or f"the split logged with {model}"
    if "split" not in rows.columns or (rows["split"] == split_name).sum() == 0:
        found = sorted(rows["split"].unique()) if "split" in rows.columns else []
        raise _error(f"no rows with split {split_name!r} in {str(split)!r}; found {', '.join(map(str, found)) or 'none'}", 2)
    chosen = rows[rows["split"] == split_name]
    components = components_for(cfg.monitoring.pca_components, len(chosen))  # as the training pipeline does
    if components != cfg.monitoring.pca_components:
        typer.secho(f"monitoring.pca_components={cfg.monitoring.pca_components} lowered to {components}: "
                    f"only {len(chosen)} {split_name} images", fg=typer.colors.YELLOW, err=True)
    try:
        predictor = Predictor.load(model)
        built = build_reference(predictor, chosen, pca_components=components, source=f"{split}:{split_name}")
    except (FileNotFoundError, ValueError) as err:
        raise _error(str(err), 2) from None
    target = built.save(out)
    typer.echo(f"reference of {len(built.features)} images for {predictor.name} v{predictor.version} -> {target}")


def rotate_log_command(
    archive: Annotated[Path, typer.Argument(help="archive prediction log to move the rows into (created or appended to)")],
    log: Annotated[Optional[Path], typer.Option("--log", help="prediction log; default $BTC_HOME/predictions.sqlite")] = None,
) -> None:
    """Move every row of the prediction log into ARCHIVE; safe while the service runs."""
    from btc.paths import prediction_log_path
    from btc.predlog import PredictionLog

    log = log or prediction_log_path()
    for path, what in ((log, "prediction log (--log)"), (archive, "archive")):
        if path.is_dir():
            raise _error(f"{what} {str(path)!r} is a folder; expected a SQLite file", 2)
    try:
        moved = PredictionLog(log).rotate(archive)
    except ValueError as err:
        raise _error(str(err), 2) from None
    except (OSError, sqlite3.Error) as err:  # a folder that cannot be made, a file SQLite cannot open, a lock
        raise _error(f"cannot rotate {str(log)!r} into {str(archive)!r}: {err}; any rows already copied stay in "
                     "both files, and running the command again finishes the job without copying them twice", 2) from None
    typer.echo(f"moved {moved} predictions from {log} to {archive}")
