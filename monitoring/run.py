"""One monitoring run: read a window of the prediction log, compare it with the reference, record the verdict.

:func:`run_monitoring` is what ``btc monitor`` and the Prefect ``monitoring`` flow call. It
refuses to report on too little: a missing reference, an absent or empty log, a window with
fewer than ``min_predictions`` predictions by the reference's model all raise
:class:`btc.reference.MonitoringError` instead of writing a report that looks meaningful.
"""

from __future__ import annotations

import contextlib
import logging
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd

from btc.paths import monitoring_dir
from btc.predlog import PredictionLog, utc
from btc.reference import MonitoringError, Reference, ReferenceMismatch, features_from_log, load_reference
from monitoring.drift import DriftVerdict, drift_report, save_verdict

log = logging.getLogger(__name__)
EXPERIMENT = "btc-monitoring"


def default_reference_dir() -> Path:
    return monitoring_dir() / "reference"


def reference_dir_of(cfg) -> Path:
    """The reference folder of a :class:`btc.config.Config`: ``monitoring.reference_dir``, else the default."""
    return Path(cfg.monitoring.reference_dir or default_reference_dir())


def window_bounds(window_hours: float, since: datetime | None = None, until: datetime | None = None,
                  now: datetime | None = None) -> tuple[datetime, datetime]:
    """``[since, until)`` in UTC: ``until`` defaults to now, ``since`` to ``until - window_hours``.

    Raises:
        ValueError: ``window_hours`` is not a finite positive number, or ``since`` is not before ``until``.
    """
    check_options(window_hours=window_hours)
    until = utc(until or now or datetime.now(timezone.utc))
    try:
        since = utc(since) if since is not None else until - timedelta(hours=window_hours)
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
                min_predictions: int) -> tuple[pd.DataFrame, dict[str, int]]:
    """The logged predictions of the reference's model in ``[since, until)``, and the count of those by
    other models (:func:`other_models`), which the report leaves out.

    Raises:
        MonitoringError: the log is absent or empty, or the window holds fewer than
            ``min_predictions`` rows; :class:`ReferenceMismatch` (a MonitoringError) when they
            are all by other models than the reference's.
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
        raise ReferenceMismatch(f"the reference is for model {name} v{version}, but the predictions between {span} "
                                f"are by {others}; build a reference for the served model (btc monitor-reference)")
    if len(ours) < min_predictions:
        raise MonitoringError(f"{len(ours)} predictions by {name} v{version} between {span}; at least "
                              f"{min_predictions} are needed for a meaningful drift report (monitoring.min_predictions)")
    return ours.reset_index(drop=True), other_models(rows, reference)


def other_models(rows: pd.DataFrame, reference: Reference) -> dict[str, int]:
    """Predictions in ``rows`` by other models than the reference's: ``{"<name> v<version>": count}``."""
    name, version = reference.metadata["model_name"], str(reference.metadata["model_version"])
    versions = rows["model_version"].astype(str)
    others = rows[(rows["model_name"] != name) | (versions != version)]
    counts = others.groupby([others["model_name"], versions[others.index]]).size()
    return {f"{n} v{v}": int(c) for (n, v), c in counts.items()}


def log_to_mlflow(verdict: DriftVerdict, *, experiment: str = EXPERIMENT) -> str:
    """Log the verdict's metrics, the HTML report and the verdict JSON as one MLflow run; returns its id.

    The store is btc's (:mod:`btc.tracking.store`): ``MLFLOW_TRACKING_URI`` or the embedded one.

    Raises:
        TrackingError: the store is unreachable or refused the run; the verdict's own files are untouched.
    """
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    from btc.tracking import store

    failures = (MlflowException, OSError, SQLAlchemyError)  # SQLAlchemyError: a store file that is no database
    try:
        mlflow_client = store.client()  # fails in seconds where MLflow's own client would retry for minutes
    except failures as err:
        raise store.TrackingError(f"the drift verdict could not be logged to MLflow at {store.tracking_uri()} "
                                  f"({type(err).__name__}: {' '.join(str(err).split())[:300]})") from None
    since, until = verdict.window or ["", datetime.now(timezone.utc).isoformat()]
    run_id = None
    try:
        run = mlflow_client.create_run(store.experiment_id(mlflow_client, experiment), run_name=f"drift-{until}",
                                       tags={"model_name": verdict.model.get("name", ""),
                                             "model_version": verdict.model.get("version", ""),
                                             "drifted": str(verdict.drifted)})
        run_id = run.info.run_id
        for key, value in {"threshold": verdict.threshold, "window_since": since, "window_until": until,
                           "reference_images": verdict.n_reference}.items():
            mlflow_client.log_param(run_id, key, value)
        for key, value in {"drift_share": verdict.share, "drifted": float(verdict.drifted),
                           "predictions": float(verdict.n_current), "drifted_columns": float(len(verdict.drifted_columns)),
                           **{f"drift_share_{g}": s for g, s in verdict.group_shares.items()}}.items():
            mlflow_client.log_metric(run_id, key, value)
        if verdict.html is not None:
            mlflow_client.log_artifact(run_id, str(verdict.html), artifact_path="drift")
        mlflow_client.log_dict(run_id, verdict.to_dict(), "drift/verdict.json")
        mlflow_client.set_terminated(run_id)
        return run_id
    except failures as err:
        if run_id is not None:  # not left "running" for ever, if the store still answers
            with contextlib.suppress(*failures):
                mlflow_client.set_terminated(run_id, "FAILED")
        raise store.TrackingError(f"the drift verdict could not be logged to MLflow at {mlflow_client.tracking_uri} "
                                  f"({type(err).__name__}: {err})") from None


def run_monitoring(log_path: str | Path, reference_dir: str | Path, *, window_hours: float = 24.0,
                   since: datetime | None = None, until: datetime | None = None, min_predictions: int = 30,
                   threshold: float = 0.3, out_dir: str | Path,
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
        out_dir: where ``drift-<since>-<until>.html``, ``.json`` (snapshot) and ``.verdict.json`` go.
        workspace: an Evidently workspace folder to add the snapshot to (the dashboard); None skips it.

    Raises:
        MonitoringError: missing or unreadable reference, absent or empty log, too few predictions in the window.
        ValueError: an invalid option (checked before any file is read), or ``log_path`` is not a prediction log.
    """
    check_options(window_hours=window_hours, min_predictions=min_predictions, threshold=threshold)
    since, until = window_bounds(window_hours, since, until)
    check_log_file(log_path)  # a misused option is refused before the reference's Parquet is read
    reference = load_reference(reference_dir)
    rows, left_out = read_window(log_path, reference, since, until, min_predictions=min_predictions)
    current = features_from_log(rows, reference)
    stem = Path(out_dir) / f"drift-{since:%Y%m%dT%H%M%SZ}-{until:%Y%m%dT%H%M%SZ}"  # two windows never share files
    verdict = drift_report(reference.features, current, out_html=stem.with_suffix(".html"), threshold=threshold,
                           timestamp=until, metadata={"model_name": reference.metadata["model_name"],
                                                      "model_version": str(reference.metadata["model_version"]),
                                                      "since": since.isoformat(), "until": until.isoformat()})
    verdict.window = [since.isoformat(), until.isoformat()]
    verdict.model = {"name": reference.metadata["model_name"], "version": str(reference.metadata["model_version"])}
    verdict.other_models = left_out
    if left_out:
        log.warning("left out of the drift report: %s", ", ".join(f"{m} ({n} predictions)" for m, n in left_out.items()))
    if workspace is not None:
        from monitoring.dashboard import add_snapshot

        try:
            add_snapshot(workspace, verdict.snapshot)
        except Exception as err:  # a damaged workspace: the dashboard misses a point, the verdict stands
            verdict.dashboard_error = (f"the snapshot was not added to the dashboard workspace {str(workspace)!r} "
                                       f"({type(err).__name__}: {' '.join(str(err).split())[:300]})")
            log.warning("%s", verdict.dashboard_error)
    save_verdict(verdict, stem.with_suffix(".verdict.json"))
    log.info("%s", verdict.summary())
    return verdict


def monitoring_options(cfg) -> dict:
    """The keyword arguments :func:`run_monitoring` takes from a :class:`btc.config.Config`."""
    m = cfg.monitoring
    return {"window_hours": m.window_hours, "min_predictions": m.min_predictions, "threshold": m.drift_share_threshold}
