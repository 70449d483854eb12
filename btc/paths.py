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


def usable_folder(folder: Path, what: str) -> Path:
    """``folder``, created if missing; one that cannot be a folder this process writes into is
    named in a ValueError (``what`` says which setting it is)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot use {folder} as the {what}: {err.strerror or err}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot use {folder} as the {what}: not writable")
    return folder
