"""Which MLflow store btc tracks into, checked before any work is done.

With nothing configured, btc tracks into an embedded store that needs no server:
``sqlite:///<btc_home>/mlflow.db`` with artifacts in ``<btc_home>/mlartifacts``
(``$BTC_HOME``, default ``./.btc``). The usual MLflow settings override it: a URI set in this
process with ``mlflow.set_tracking_uri`` or ``MLFLOW_TRACKING_URI`` (and
``MLFLOW_REGISTRY_URI`` for the registry). For a local SQLite or file store the experiment's
artifacts go to ``MLFLOW_ARTIFACTS_DESTINATION`` when set, else to ``mlartifacts`` beside the
database, never to MLflow's ``./mlruns`` in the working directory.

A remote server is probed with a short timeout first, because MLflow's own client retries
an unreachable server for minutes before it gives up.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from btc.paths import mlflow_artifacts, mlflow_db

REACHABILITY_TIMEOUT_S = 3.0


class TrackingError(ValueError):
    """The tracking store cannot be used: unreachable, unwritable or in an unusable state."""


def embedded_uri() -> str:
    """The default store: SQLite under ``$BTC_HOME``."""
    return f"sqlite:///{mlflow_db()}"


def tracking_uri() -> str:
    """The tracking URI in force: MLflow's own setting if any, else the embedded store."""
    return mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else embedded_uri()


def registry_uri(tracking: str | None = None) -> str:
    """The registry URI: ``MLFLOW_REGISTRY_URI`` when set, else the tracking URI."""
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking or tracking_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path not in ("", ":memory:") else None


def local_artifact_root(uri: str) -> Path | None:
    """Where a local store's experiment artifacts go (None: a server decides)."""
    db = sqlite_path(uri)
    if db is None:
        return None
    if os.environ.get("MLFLOW_ARTIFACTS_DESTINATION"):
        return Path(os.environ["MLFLOW_ARTIFACTS_DESTINATION"]).resolve()
    return mlflow_artifacts() if db.resolve() == mlflow_db() else db.resolve().parent / "mlartifacts"


def check_reachable(uri: str, timeout: float = REACHABILITY_TIMEOUT_S) -> None:
    """Fail fast when the store at ``uri`` cannot be used.

    Raises:
        TrackingError: an HTTP server does not answer within ``timeout`` seconds, or a
            SQLite store's folder cannot be created.
    """
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        import requests

        try:
            # Any HTTP answer (even 401 or 404) means a server is there; MLflow reports the rest.
            requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as err:
            raise TrackingError(
                f"cannot reach MLflow tracking server at {uri}: {type(err).__name__} within {timeout:g}s; "
                f"start it (mlflow server ...) or unset MLFLOW_TRACKING_URI to use the embedded store "
                f"{embedded_uri()}") from None
    elif (db := sqlite_path(uri)) is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"cannot use MLflow store {uri}: cannot create {str(db.parent)!r} "
                                f"({err.strerror})") from None
        if db.exists() and not os.access(db, os.R_OK | os.W_OK):
            raise TrackingError(f"cannot use MLflow store {uri}: {str(db)!r} is not readable and writable")


def client(uri: str | None = None, *, check: bool = True, must_exist: bool = False) -> MlflowClient:
    """An ``MlflowClient`` on the resolved tracking and registry URIs, checked first.

    The URIs are passed explicitly, so no global MLflow state is changed.

    Args:
        must_exist: only reading from the store (models, versions, aliases): refuse a SQLite store
            whose file does not exist, rather than create an empty one from a mistyped URI.

    Raises:
        TrackingError: unreachable, or (``must_exist``) no such SQLite store.
    """
    uri = uri or tracking_uri()
    reg = registry_uri(uri)
    if check:
        for one in dict.fromkeys((uri, reg)):
            db = sqlite_path(one)
            if must_exist and db is not None and not db.is_file():
                raise TrackingError(f"no MLflow store at {one}: {str(db)!r} does not exist; train with tracking "
                                    "first, or point MLFLOW_TRACKING_URI at your store")
            check_reachable(one)
    return MlflowClient(tracking_uri=uri, registry_uri=reg)


def experiment_id(mlflow_client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created (with a local artifact root where needed) if missing.

    Raises:
        TrackingError: the experiment exists but is deleted.
    """
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        root = local_artifact_root(mlflow_client.tracking_uri)
        try:
            return mlflow_client.create_experiment(name, artifact_location=root.as_uri() if root else None)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it first
                raise
            experiment = mlflow_client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(f"experiment {name!r} is deleted in {mlflow_client.tracking_uri}; restore it "
                            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) "
                            "or choose another with -s registry.experiment=NAME")
    return experiment.experiment_id


_fluent = {"lock": threading.Lock(), "users": 0, "owned": False, "previous": None}


@contextmanager
def fluent_tracking(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``mlflow.start_run``, ``log_model``) at ``uri`` for a block.

    Only when nothing is configured (the embedded default) is MLflow's global URI set, and the
    last block to leave unsets it again, so a configured ``MLFLOW_TRACKING_URI`` is never
    overwritten and threads of one process share the setting safely.

    Raises:
        TrackingError: another thread of this process tracks into a different URI right now.
    """
    state = _fluent
    with state["lock"]:
        if state["users"] == 0:
            state["owned"] = not (mlflow.is_tracking_uri_set() and mlflow.get_tracking_uri() == uri)
            if state["owned"]:
                state["previous"] = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
                mlflow.set_tracking_uri(uri)
        elif mlflow.get_tracking_uri() != uri:
            raise TrackingError(f"cannot track into {uri} while another thread tracks into {mlflow.get_tracking_uri()}")
        state["users"] += 1
    try:
        yield
    finally:
        with state["lock"]:
            state["users"] -= 1
            if state["users"] == 0 and state["owned"]:
                mlflow.set_tracking_uri(state["previous"])
                state["owned"] = False


def ui_hint(uri: str) -> str:
    """How to look at the store: the ``mlflow ui`` command, or the server's address."""
    if urlparse(uri).scheme in ("http", "https"):
        return f"open {uri}"
    root = local_artifact_root(uri)
    extra = f" --default-artifact-root {root.as_uri()}" if root else ""
    return f"mlflow ui --backend-store-uri {uri}{extra}"

