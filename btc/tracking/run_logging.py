"""One training run in MLflow, with everything needed to audit and reproduce it.

:func:`log_training_run` records, in one MLflow run of the configured experiment:

* the whole config: flattened as params (``train.lr``, ``registry.gates.max_ece``, ...) and as
  ``config.yaml``;
* the data: an MLflow dataset input (the split table, named by the manifest digest, with the
  class counts per split as input tags), ``data/split.parquet`` and ``data/class_counts.json``;
* per-epoch metrics (``train_loss``, ``val_macro_f1``, ... with ``step=epoch``);
* the test metrics, on the whole test split (``test_*``) and on its clean subset without near
  duplicates of training (``test_clean_*``), and the evaluation plots under ``evaluation/``;
* the environment (``environment/requirements.lock`` when found, python/torch/mlflow versions)
  and the git commit as tags;
* the model (:func:`btc.tracking.model_io.log_model`) and its model card.

The training loop knows nothing of MLflow: this module logs what :func:`btc.training.train_model`
returned.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
import warnings
from importlib import metadata as importlib_metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric

from btc.config import Config, flatten_config
from btc.data.manifest import manifest_digest
from btc.data.split import given_test_rows
from btc.predict import Predictor
from btc.tracking import store
from btc.tracking.model_io import build_model_card, log_model, model_card_markdown
from btc.training import TrainResult

REPO_ROOT = Path(__file__).resolve().parents[2]
SUMMARY_METRICS = ("n_images", "accuracy", "macro_f1", "macro_precision", "macro_recall", "macro_roc_auc",
                   "ece", "ece_before_temperature")


def metrics_of_test_split(report: dict) -> dict[str, float]:
    """``test_*`` and ``test_clean_*`` metrics of an evaluation report (per class: ``test_recall_glioma``...)."""
    out: dict[str, float] = {}
    for prefix, part in (("test_", report), ("test_clean_", report.get("clean"))):
        if not part:
            continue
        out.update({f"{prefix}{k}": float(part[k]) for k in SUMMARY_METRICS if part.get(k) is not None})
        for cls, values in part["per_class"].items():
            out.update({f"{prefix}{k}_{cls}": float(values[k]) for k in ("precision", "recall", "f1", "roc_auc")
                        if values.get(k) is not None})
    return out


def epoch_metrics(history: list[dict]) -> list[Metric]:
    """One MLflow metric per numeric value of each epoch, at ``step=epoch``."""
    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, int(row["epoch"]))
            for row in history for key, value in row.items()
            if key != "epoch" and isinstance(value, (int, float)) and np.isfinite(value)]


def class_counts(split_df: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images per class in each split (``excluded`` rows left out)."""
    kept = split_df[split_df["split"] != "excluded"] if "split" in split_df else split_df
    column = "split" if "split" in kept else "source_split"
    return {str(s): {str(c): int(n) for c, n in g.groupby("label").size().items()} for s, g in kept.groupby(column)}


def describe_dataset(split_df: pd.DataFrame) -> dict:
    """Digest, class counts and location of the data a run used (also the model card's training data)."""
    paths = split_df["path"].astype(str)
    return {
        "digest": manifest_digest(split_df),
        "n_files": int(len(split_df)),
        "class_counts": class_counts(split_df),
        "root": os.path.commonpath(list(paths)) if len(paths) else "",
        "split_method": split_method(split_df),
    }


def split_method(split_df: pd.DataFrame) -> str:
    """How the split was made, in words (the model card's): a dataset's own test folder changes what holds."""
    method = "leakage-free: exact duplicates dropped, near-duplicate clusters kept within one split"
    if given_test_rows(split_df).any():
        method += (" of train and val; the dataset's own test folder kept whole as the test split, its images with a "
                   "near duplicate in training flagged (near_dup_in_train) and reported apart as not clean")
    return method


def find_requirements_lock() -> Path | None:
    """``requirements.lock`` of the repository btc runs from (or the working directory), if any."""
    for folder in (REPO_ROOT, Path.cwd()):
        if (folder / "requirements.lock").is_file():
            return folder / "requirements.lock"
    return None


def environment() -> dict:
    """Interpreter, platform and key package versions (no pip freeze: the lock file says the rest)."""
    versions = {}
    for package in ("torch", "torchvision", "mlflow", "numpy", "pandas", "btc"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            versions[package] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions}


def git_commit(folder: Path = REPO_ROOT) -> tuple[str, bool] | None:
    """``(commit, dirty)`` of the git checkout holding ``folder``, or None outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit, dirty


def _evaluation_files(report: dict | None, artifacts_dir: Path | None) -> list[Path]:
    if artifacts_dir is not None and Path(artifacts_dir).is_dir():
        return sorted(p for p in Path(artifacts_dir).iterdir() if p.is_file())
    return [Path(p) for p in ((report or {}).get("artifacts") or {}).values() if Path(p).is_file()]


def _example_images(predictor: Predictor, split_df: pd.DataFrame) -> np.ndarray | None:
    rows = split_df[split_df["split"] == "test"] if "split" in split_df else split_df
    rows = rows.sort_values("path").head(2)
    try:
        return predictor.batch(list(rows["path"])).numpy() if len(rows) == 2 else None
    except Exception:  # an unreadable example only costs realism: example_batch falls back to noise
        return None


def log_training_run(cfg: Config, result: TrainResult, split_df: pd.DataFrame, report: dict | None, *,
                     artifacts_dir: Path | None = None, run_name: str | None = None) -> str:
    """Log a finished training run and its model to MLflow; returns the run id.

    Args:
        cfg: the config the run was trained with.
        result: what :func:`btc.training.train_model` returned (``model.pt`` and history in ``out_dir``).
        split_df: the split it was trained on (train/val/test rows).
        report: the test-split evaluation (:func:`btc.reports.evaluation_artifacts`), or None if not evaluated.
        artifacts_dir: the evaluation folder (metrics.json, plots) to log under ``evaluation/``;
            default the files named in ``report["artifacts"]``.
        run_name: MLflow run name; default the run folder's name.

    Raises:
        TrackingError: the tracking store is unreachable or unusable (checked before anything is logged).
    """
    uri = store.tracking_uri()
    mlflow_client = store.client(uri)
    experiment = store.experiment_id(mlflow_client, cfg.registry.experiment)
    out_dir = Path(result.out_dir)
    predictor = Predictor.from_checkpoint(result.model_path, name=cfg.registry.model_name, version=out_dir.name)
    dataset = describe_dataset(split_df)
    card = build_model_card(predictor.spec, model_name=cfg.registry.model_name, report=report, training_data=dataset)

    with store.fluent_tracking(uri), mlflow.start_run(experiment_id=experiment, run_name=run_name or out_dir.name) as run:
        run_id = run.info.run_id
        mlflow.log_params(flatten_config(cfg))
        tags = {"btc.run_dir": str(out_dir), "btc.device": result.device, "btc.train_seconds": f"{result.seconds:.1f}",
                "btc.dataset_digest": dataset["digest"], "python_version": platform.python_version(),
                "torch_version": environment()["packages"]["torch"] or ""}
        if (commit := git_commit()) is not None:
            tags.update({"mlflow.source.git.commit": commit[0], "git_commit": commit[0], "git_dirty": str(commit[1])})
        mlflow.set_tags(tags)

        config_file = out_dir / "config.yaml"
        mlflow.log_artifact(str(config_file if config_file.is_file() else cfg.save(out_dir / "config.yaml")))
        columns = [c for c in ("path", "label", "split", "source_split", "sha256", "near_dup_in_train") if c in split_df]
        with warnings.catch_warnings():
            # MLflow registers two local-path source types and warns that it picked one of them.
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            data_input = mlflow.data.from_pandas(split_df[columns].reset_index(drop=True), source=dataset["root"] or None,
                                                 name=f"btc-mri-{dataset['digest']}", digest=dataset["digest"],
                                                 targets="label")
        mlflow.log_input(
            data_input, context="training",
            tags={"class_counts": json.dumps(dataset["class_counts"]), "n_files": str(dataset["n_files"])})
        mlflow.log_dict(dataset, "data/class_counts.json")
        split_file = out_dir / "split.parquet"
        if not split_file.is_file():
            split_df.to_parquet(split_file, index=False)
        mlflow.log_artifact(str(split_file), "data")

        metrics = epoch_metrics(result.history)
        for start in range(0, len(metrics), 900):  # log_batch takes at most 1000 metrics
            mlflow_client.log_batch(run_id, metrics=metrics[start:start + 900])
        mlflow.log_metric("temperature", float(result.temperature))
        if report is not None:
            mlflow.log_metrics(metrics_of_test_split(report))
        for path in _evaluation_files(report, artifacts_dir):
            mlflow.log_artifact(str(path), "evaluation")
        if (out_dir / "history.json").is_file():
            mlflow.log_artifact(str(out_dir / "history.json"))

        if (lock := find_requirements_lock()) is not None:
            mlflow.log_artifact(str(lock), "environment")
        mlflow.log_dict(environment(), "environment/environment.json")

        mlflow.log_dict(card, "model_card.json")
        mlflow.log_text(model_card_markdown(card), "model_card.md")
        log_model(predictor, card=card, example=_example_images(predictor, split_df))
    return run_id
