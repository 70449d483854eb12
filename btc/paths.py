"""Where btc keeps its embedded state when nothing else is configured.

Everything lives under ``$BTC_HOME`` (default ``.btc`` in the working directory): the MLflow
SQLite store and artifacts, the prediction log, the monitoring reference and the Evidently
workspace. Nothing is created at import; callers create what they write.
"""

from __future__ import annotations

import os
from pathlib import Path


def btc_home() -> Path:
    return Path(os.environ.get("BTC_HOME", ".btc")).resolve()


def mlflow_db() -> Path:
    return btc_home() / "mlflow.db"


def mlflow_artifacts() -> Path:
    return btc_home() / "mlartifacts"


def prediction_log_path() -> Path:
    return Path(os.environ.get("BTC_PREDICTION_LOG", btc_home() / "predictions.sqlite"))


def monitoring_dir() -> Path:
    return btc_home() / "monitoring"


def reports_dir() -> Path:
    return btc_home() / "reports"
