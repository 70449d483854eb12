"""Monitoring the service: Evidently drift reports over the prediction log, a dashboard, and acting on drift.

The features (image statistics, the model's answers, the frozen-PCA embedding) and the
reference are built by :mod:`btc.reference`; this package holds the reporting around them:

* :func:`monitoring.drift.drift_report`: one Evidently report, returns a :class:`DriftVerdict`;
* :func:`monitoring.run.run_monitoring`: a window of the prediction log end to end (+ MLflow);
* :func:`monitoring.dashboard.add_snapshot`: the snapshot into the Evidently workspace;
* :func:`monitoring.actions.act_on_drift`: alert and trigger retraining.
"""

from btc.reference import MonitoringError
from monitoring.actions import act_on_drift
from monitoring.dashboard import add_snapshot, default_workspace
from monitoring.drift import DriftVerdict, drift_report
from monitoring.run import run_monitoring

__all__ = ["MonitoringError", "DriftVerdict", "drift_report", "run_monitoring", "add_snapshot", "default_workspace",
           "act_on_drift"]
