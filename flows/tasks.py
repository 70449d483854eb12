"""Thin Prefect tasks: each calls one btc (or :mod:`flows.service`) function and nothing else.

The flows decide what runs when; the tasks only add what Prefect adds: a name in the UI, a
state, and the policies below.

* **Retries** only where a failure can be transient: reading the dataset from disk, the MLflow
  store (a busy SQLite file, a tracking server restarting), the registry, building the Bento.
  A deterministic failure (bad data, bad config, an unknown model name: a ``ValueError`` in
  btc) is not retried, except :class:`btc.tracking.TrackingError` (an unreachable store,
  which may come back).
* **No caching** (``cache_policy=NONE``) for every task: their inputs are data frames,
  models and configs that are slow or impossible to hash, and a cached model or report
  would silently hide a retrain. Results are not persisted either (they live in MLflow and
  the run folder).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from btc.config import Config
from btc.tracking.store import TrackingError


def transient(task_, task_run, state) -> bool:
    """Retry condition: retry unless the failure is a deterministic btc error (a ``ValueError``)."""
    err = state.result(raise_on_failure=False)
    return isinstance(err, TrackingError) or not isinstance(err, ValueError)


IO = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": transient}
PLAIN = {"cache_policy": NONE, "persist_result": False}


@task(name="build-manifest", **PLAIN, **IO)
def build_manifest(data_dir: str) -> pd.DataFrame:
    from btc.data.manifest import build_manifest

    return build_manifest(Path(data_dir), progress=False)


@task(name="split-without-leakage", **PLAIN)
def split_dataset(manifest: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    from btc.data.split import split_without_leakage

    d = cfg.data
    return split_without_leakage(manifest, val_fraction=d.val_fraction, test_fraction=d.test_fraction,
                                 near_duplicate_distance=d.near_duplicate_distance, seed=d.seed)


@task(name="validate-data", **PLAIN)
def validate_data(split: pd.DataFrame, cfg: Config, data_docs_dir: Path):
    from btc.validation import validate_dataset

    return validate_dataset(split, config=cfg.validation, data_docs_dir=data_docs_dir,
                            near_duplicate_distance=cfg.data.near_duplicate_distance)


@task(name="train", **PLAIN)
def train(cfg: Config, split: pd.DataFrame, out_dir: Path):
    from btc.training import train_model

    return train_model(cfg, split, out_dir, progress=False)


@task(name="load-model", **PLAIN, **IO)
def load_model(source: str):
    from btc.predict import Predictor

    return Predictor.load(source)


@task(name="evaluate", **PLAIN)
def evaluate(predictor, rows: pd.DataFrame, out_dir: Path, history: list[dict], cfg: Config) -> dict:
    from btc.reports import evaluation_artifacts

    return evaluation_artifacts(predictor, rows, out_dir, history=history, n_bins=cfg.eval.ece_bins,
                                gradcam_per_class=cfg.eval.gradcam_per_class)


@task(name="log-to-mlflow", **PLAIN, **IO)
def log_run(cfg: Config, result, split: pd.DataFrame, report: dict, artifacts_dir: Path) -> str:
    from btc.tracking.run_logging import log_training_run

    return log_training_run(cfg, result, split, report, artifacts_dir=artifacts_dir)


@task(name="register-challenger", **PLAIN, **IO)
def register(run_id: str, name: str) -> str:
    from btc.tracking.registry import register

    return register(run_id, name, reuse_undecided=True)  # a retry reuses the version its first try added


@task(name="promotion-gates", **PLAIN, **IO)
def promote(name: str, cfg: Config, version: str):
    from btc.tracking.registry import promote

    return promote(name, cfg, expected_challenger=version)


@task(name="deploy-service", **PLAIN, **IO)
def deploy_service(name: str, version: str, run_id: str, bento: bool) -> dict:
    from flows.service import deploy_champion

    return deploy_champion(name, version, run_id, bento=bento)


@task(name="monitoring-reference", **PLAIN)
def build_monitoring_reference(predictor, rows: pd.DataFrame, out_dir: Path, source: str, pca_components: int) -> Path:
    from btc.reference import build_reference, components_for

    # PCA needs more images than components: tiny validation sets get fewer components.
    components = components_for(pca_components, len(rows))
    return build_reference(predictor, rows, pca_components=components, source=source).save(out_dir)


@task(name="drift-report", **PLAIN)  # local files only; a retry would write the reports again for a later "now"
def drift_report(log_path: Path, reference_dir: Path, cfg: Config, window_hours: float, out_dir: Path,
                 workspace: Path | None):
    from monitoring.run import run_monitoring

    m = cfg.monitoring
    return run_monitoring(log_path, reference_dir, window_hours=window_hours, min_predictions=m.min_predictions,
                          threshold=m.drift_share_threshold, out_dir=out_dir, workspace=workspace)


@task(name="log-drift-to-mlflow", **PLAIN, **IO)
def log_drift(verdict) -> str:
    from monitoring.run import log_to_mlflow

    return log_to_mlflow(verdict)


@task(name="act-on-drift", **PLAIN)
def act_on_drift(verdict, trigger, deployment: str) -> str:
    from monitoring.actions import act_on_drift

    return act_on_drift(verdict, trigger=trigger, deployment=deployment)
