"""One monitoring run: read a window of the prediction log, compare it with the reference, record the verdict.

:func:`run_monitoring` is what ``btc monitor`` and the Prefect ``monitoring`` flow call. It
refuses to report on too little: a missing reference, an absent or empty log, a window with
fewer than ``min_predictions`` predictions by the reference's model all raise
:class:`btc.reference.MonitoringError` instead of writing a report that looks meaningful.
"""

from __future__ import annotations

import logging
import math
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd

from btc.paths import mlflow_artifacts, mlflow_db, monitoring_dir
from btc.predlog import PredictionLog
from btc.reference import MonitoringError, Reference, features_from_log, load_reference
from monitoring.drift import DriftVerdict, drift_report, save_verdict

log = logging.getLogger(__name__)
EXPERIMENT = "btc-monitoring"


def default_reference_dir() -> Path:
    return monitoring_dir() / "reference"


def window_bounds(window_hours: float, since: datetime | None = None, until: datetime | None = None,
                  now: datetime | None = None) -> tuple[datetime, datetime]:
    """``[since, until)`` in UTC: ``until`` defaults to now, ``since`` to ``until - window_hours``.

    Raises:
        ValueError: ``window_hours`` is not a finite positive number, or ``since`` is not before ``until``.
    """
    check_options(window_hours=window_hours)
    until = _utc(until or now or datetime.now(timezone.utc))
    try:
        since = _utc(since) if since is not None else until - timedelta(hours=window_hours)
    except OverflowError:
        raise ValueError(f"window_hours={window_hours} reaches back before the year 1 from {until.isoformat()}; "
                         "expected a shorter window") from None
    if since >= until:
        raise ValueError(f"window since {since.isoformat()} is not before until {until.isoformat()}")
    return since, until


def check_options(*, window_hours: float | None = None, min_predictions: int | None = None,
                  threshold: float | None = None) -> None:
    """Refuse monitoring options no report can be made with (those given; None is not checked).

    Called before anything is read, so a wrong option is told apart from a wrong file.

    Raises:
        ValueError: ``window_hours`` is not a finite number above 0, ``min_predictions`` is
            below 1, or ``threshold`` is not within [0, 1].
    """
    if window_hours is not None and not (math.isfinite(window_hours) and window_hours > 0):
        raise ValueError(f"window_hours={window_hours}; expected a finite number of hours above 0")
    if min_predictions is not None and not min_predictions >= 1:
        raise ValueError(f"min_predictions={min_predictions}; expected at least 1")
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold}; expected a drift share above 0, at most 1")


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def check_log_file(log_path: str | Path) -> None:
    """Refuse a ``log_path`` that exists but is no prediction log; an absent log is :func:`read_window`'s to report.

    Raises:
        ValueError: ``log_path`` is a folder, or a file that is not a prediction log.
    """
    log_path = Path(log_path)
    if log_path.is_dir():
        raise ValueError(f"prediction log {str(log_path)!r} is a folder; expected the SQLite file the service writes")
    if log_path.is_file():
        PredictionLog(log_path).count()


def read_window(log_path: str | Path, reference: Reference, since: datetime, until: datetime, *,
                min_predictions: int) -> pd.DataFrame:
    """The logged predictions of the reference's model in ``[since, until)``.

    Raises:
        MonitoringError: the log is absent or empty, the window holds only other models'
            predictions, or fewer than ``min_predictions`` rows.
        ValueError: ``log_path`` is a folder, or a file that is not a prediction log.
    """
    log_path = Path(log_path)
    check_log_file(log_path)
    if not log_path.is_file():
        raise MonitoringError(f"prediction log {str(log_path)!r} does not exist; the service writes it on its first prediction")
    prediction_log = PredictionLog(log_path)
    if prediction_log.count() == 0:
        raise MonitoringError(f"prediction log {str(log_path)!r} is empty; nothing to monitor yet")
    rows = prediction_log.read(since, until)
    span = f"{since.isoformat()} to {until.isoformat()}"
    if rows.empty:
        raise MonitoringError(f"no predictions between {span} in {str(log_path)!r}; "
                              f"at least {min_predictions} are needed for a drift report")
    name, version = reference.metadata["model_name"], str(reference.metadata["model_version"])
    ours = rows[(rows["model_name"] == name) & (rows["model_version"].astype(str) == version)]
    if ours.empty:
        others = ", ".join(f"{n} v{v} ({c})" for (n, v), c in rows.groupby(["model_name", "model_version"]).size().items())
        raise MonitoringError(f"the reference is for model {name} v{version}, but the predictions between {span} "
                              f"are by {others}; build a reference for the served model")
    if len(ours) < min_predictions:
        raise MonitoringError(f"{len(ours)} predictions by {name} v{version} between {span}; at least "
                              f"{min_predictions} are needed for a meaningful drift report (monitoring.min_predictions)")
    if len(ours) < len(rows):
        log.info("skipped %d predictions by other models than %s v%s", len(rows) - len(ours), name, version)
    return ours.reset_index(drop=True)


def _start_mlflow_experiment(mlflow, name: str) -> str:
    """The experiment's id, creating it with local artifacts under BTC_HOME when the store is local."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(f"sqlite:///{mlflow_db()}")
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://", "databricks")):
        return mlflow.create_experiment(name)  # the server decides where artifacts go
    root = Path(os.environ.get("MLFLOW_ARTIFACTS_DESTINATION") or mlflow_artifacts())
    return mlflow.create_experiment(name, artifact_location=(root / name).resolve().as_uri())


def log_to_mlflow(verdict: DriftVerdict, reference: Reference, *, experiment: str = EXPERIMENT) -> str:
    """Log the verdict's metrics, the HTML report and the verdict JSON as one MLflow run; returns its id."""
    import mlflow

    experiment_id = _start_mlflow_experiment(mlflow, experiment)
    until = verdict.window[1] if verdict.window else datetime.now(timezone.utc).isoformat()
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"drift-{until}") as run:
        mlflow.set_tags({"model_name": reference.metadata["model_name"],
                         "model_version": str(reference.metadata["model_version"]), "drifted": str(verdict.drifted)})
        mlflow.log_params({"threshold": verdict.threshold, "window_since": verdict.window[0] if verdict.window else "",
                           "window_until": until, "reference_images": verdict.n_reference})
        mlflow.log_metrics({"drift_share": verdict.share, "drifted": float(verdict.drifted),
                            "predictions": float(verdict.n_current), "drifted_columns": float(len(verdict.drifted_columns)),
                            **{f"drift_share_{g}": s for g, s in verdict.group_shares.items()}})
        if verdict.html is not None:
            mlflow.log_artifact(str(verdict.html), artifact_path="drift")
        mlflow.log_dict(verdict.to_dict(), "drift/verdict.json")
        return run.info.run_id


def run_monitoring(log_path: str | Path, reference_dir: str | Path, *, window_hours: float = 24.0,
                   since: datetime | None = None, until: datetime | None = None, min_predictions: int = 30,
                   threshold: float = 0.3, out_dir: str | Path, mlflow: bool = False,
                   workspace: str | Path | None = None) -> DriftVerdict:
    """Drift report for one window of the prediction log.

    Args:
        log_path: the prediction log (SQLite, :class:`btc.predlog.PredictionLog`).
        reference_dir: the reference folder (:meth:`btc.reference.Reference.save`).
        window_hours: window length when ``since`` is not given.
        since: window start (inclusive, UTC when naive); default ``until - window_hours``.
        until: window end (exclusive, UTC when naive); default now.
        min_predictions: fewest predictions a report is made from.
        threshold: drifted-column share at or above which the window is drifted.
        out_dir: where ``drift-<until>.html``, ``.json`` (snapshot) and ``.verdict.json`` go.
        mlflow: also log metrics and the report to the MLflow experiment ``btc-monitoring``.
        workspace: an Evidently workspace folder to add the snapshot to (the dashboard); None skips it.

    Raises:
        MonitoringError: missing or unreadable reference, absent or empty log, too few predictions in the window.
        ValueError: an invalid option (checked before any file is read), or ``log_path`` is not a prediction log.
    """
    check_options(window_hours=window_hours, min_predictions=min_predictions, threshold=threshold)
    since, until = window_bounds(window_hours, since, until)
    check_log_file(log_path)  # a misused option is refused before the reference's Parquet is read
    reference = load_reference(reference_dir)
    rows = read_window(log_path, reference, since, until, min_predictions=min_predictions)
    current = features_from_log(rows, reference)
    stem = Path(out_dir) / f"drift-{until:%Y%m%dT%H%M%SZ}"
    verdict = drift_report(reference.features, current, out_html=stem.with_suffix(".html"), threshold=threshold,
                           timestamp=until, metadata={"model_name": reference.metadata["model_name"],
                                                      "model_version": str(reference.metadata["model_version"]),
                                                      "since": since.isoformat(), "until": until.isoformat()})
    verdict.window = [since.isoformat(), until.isoformat()]
    save_verdict(verdict, stem.with_suffix(".verdict.json"))
    if workspace is not None:
        from monitoring.dashboard import add_snapshot

        add_snapshot(workspace, verdict.snapshot)
    if mlflow:
        log_to_mlflow(verdict, reference)
    log.info("%s", verdict.summary())
    return verdict


def monitoring_options(cfg) -> dict:
    """The keyword arguments :func:`run_monitoring` takes from a :class:`btc.config.Config`."""
    m = cfg.monitoring
    return {"window_hours": m.window_hours, "min_predictions": m.min_predictions, "threshold": m.drift_share_threshold}
