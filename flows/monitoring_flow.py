"""The monitoring flow: drift over the last window of the prediction log, and retraining when it drifted.

``monitoring()`` runs :func:`monitoring.run.run_monitoring` (Evidently report, snapshot in
the dashboard workspace) and :func:`monitoring.actions.act_on_drift`, then logs the verdict
to the MLflow experiment ``btc-monitoring`` in a task of its own (retried alone). Retraining is
the deployment ``training-pipeline/retrain``, started with ``run_deployment(..., timeout=0)`` (fire and
forget; the deployment's concurrency limit of 1 keeps drift alarms from stacking runs) only
when this run talks to a real Prefect server (``PREFECT_API_URL`` set) on which that
deployment exists. In Prefect's ephemeral mode no deployment is served, so the flow says
what it would have done instead.

Too little to judge (no reference yet, fewer predictions than ``monitoring.min_predictions``)
is not a failure: an hourly schedule on a quiet service must not page anyone. The run
completes with ``status: "skipped"`` and the reason.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows import tasks
from monitoring.actions import RETRAIN_DEPLOYMENT


def retrain_deployment_available(deployment: str = RETRAIN_DEPLOYMENT) -> tuple[bool, str]:
    """Whether ``deployment`` can be started from here, and why not if it cannot."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return False, "PREFECT_API_URL is not set: this run uses Prefect's ephemeral server, which serves no deployments"
    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(deployment)
    except ObjectNotFound:
        return False, (f"deployment {deployment!r} does not exist on {PREFECT_API_URL.value()}; "
                       "create it with `prefect deploy --all` or `python -m flows.serve`")
    except Exception as err:  # an unreachable server: report, do not fail the monitoring run
        return False, f"Prefect server {PREFECT_API_URL.value()} did not answer ({type(err).__name__}: {err})"
    return True, ""


def run_retrain(verdict, deployment: str = RETRAIN_DEPLOYMENT) -> str:
    """Trigger for :func:`monitoring.actions.act_on_drift`: schedule a run of the retrain deployment now."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, timeout=0, tags=["drift"])
    return f"flow run {run.name} ({run.id}) scheduled"


@flow(name="monitoring", log_prints=True)
def monitoring(window_hours: float | None = None, config_path: str | None = None, overrides: list[str] | None = None,
               log_path: str | None = None, reference_dir: str | None = None, retrain: bool = True) -> dict:
    """Drift report over the last ``window_hours`` of predictions; retrain on drift.

    Args:
        window_hours: length of the window ending now; default ``monitoring.window_hours`` (24).
        config_path: YAML config (``monitoring.*`` settings); None: the defaults.
        overrides: ``section.key=value`` settings applied over the config.
        log_path: the prediction log; default ``$BTC_HOME/predictions.sqlite``.
        reference_dir: the reference; default ``monitoring.reference_dir``, else
            ``$BTC_HOME/monitoring/reference`` (where the training pipeline writes it at promotion).
            The dashboard workspace is ``monitoring.workspace``, else ``$BTC_HOME/evidently``.
        retrain: start the retrain deployment on drift (when one is reachable).

    Returns:
        ``status`` (``skipped``, ``no drift``, ``drift``), ``action``, ``summary`` and the report paths.

    Raises:
        ReferenceMismatch: the window's predictions are all by another model than the reference's.
    """
    from prefect.artifacts import create_markdown_artifact

    from btc.config import load_config
    from btc.paths import prediction_log_path, reports_dir, usable_folder
    from btc.reference import MonitoringError, ReferenceMismatch
    from monitoring.dashboard import workspace_of
    from monitoring.run import check_options, reference_dir_of

    logger = get_run_logger()
    cfg = load_config(Path(config_path) if config_path else None, overrides or [])
    log_file = Path(log_path) if log_path else prediction_log_path()
    reference = Path(reference_dir) if reference_dir else reference_dir_of(cfg)
    hours = window_hours if window_hours is not None else cfg.monitoring.window_hours  # 0 is refused, not 24
    # Misuse is said before anything is read, in the setting's own name (as `btc monitor` does).
    check_options(window_hours=hours)
    workspace = usable_folder(workspace_of(cfg), "Evidently workspace (monitoring.workspace)")
    out_dir = usable_folder(reports_dir() / "monitoring", "report folder")  # where `btc monitor` writes them too
    try:
        verdict = tasks.drift_report(log_file, reference, cfg, hours, out_dir, workspace)
    except ReferenceMismatch as err:  # not "nothing to monitor yet": the served model goes unwatched
        create_markdown_artifact(f"## Monitoring FAILED\n\n{err}", key="drift-report")
        raise
    except MonitoringError as err:
        logger.warning("no drift report: %s", err)
        create_markdown_artifact(f"## Monitoring skipped\n\n{err}", key="drift-report")
        return {"status": "skipped", "action": "none", "summary": str(err)}

    if verdict.dashboard_error:  # the verdict stands and is acted on
        logger.warning("%s", verdict.dashboard_error)
    trigger, why_not = None, ""
    if retrain:
        available, why_not = retrain_deployment_available()
        trigger = run_retrain if available else None
    action = tasks.act_on_drift(verdict, trigger, RETRAIN_DEPLOYMENT)
    if verdict.drifted and trigger is None:
        action += f": {why_not}" if retrain else ": retrain=False"
    logger.info("%s", f"{verdict.summary()} -> {action}" if verdict.drifted else verdict.summary())
    status = "drift" if verdict.drifted else "no drift"
    create_markdown_artifact(
        f"## {status.upper()}\n\n{verdict.summary()}\n\n**action:** {action}\n\n"
        f"- Evidently report: [{verdict.html}]({Path(verdict.html).resolve().as_uri() if verdict.html else ''})\n"
        f"- dashboard: `evidently ui --workspace {workspace}`", key="drift-report")
    tasks.log_drift(verdict)  # after acting: an unreachable MLflow store fails the run, not the retrain
    return {"status": status, "action": action, "summary": verdict.summary(), "share": verdict.share,
            "html": str(verdict.html) if verdict.html else None,
            "snapshot": str(verdict.snapshot) if verdict.snapshot else None}
