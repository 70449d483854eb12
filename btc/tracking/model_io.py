"""The registry model: the whole inference path as a ``torch.export`` graph, with its model card.

A model logged by :func:`log_model` is a directory in MLflow's format::

    MLmodel                     flavour, signature, metadata (preprocessing, classes, temperature,
                                checkpoint digest, intended use)
    data/model.pt2              InferenceModule exported with torch.export (MLflow 3's "pt2"
                                format, no pickled code): uint8 [batch, S, S] in, probabilities out
    input_example.json          two real (or seeded random) slices, uint8
    extra_files/model.pt        the btc checkpoint (weights only, ``torch.load(weights_only=True)``)
    extra_files/model_card.json the model card, and model_card.md for people

The exported graph needs neither btc nor Python class definitions to run. The checkpoint lets
:func:`load_predictor` rebuild a full :class:`btc.predict.Predictor`, whose ``nn.Module``
Grad-CAM and embeddings need. Both hold the same weights: the checkpoint is written from the
very module that is exported, and its SHA-256 is in the metadata and checked on load.

The exported graph does not resize: callers resize to ``S`` x ``S`` first (as
``Predictor.to_array`` does). The batch dimension is dynamic because the input example has
two images (``torch.export`` specialises a batch of one to a constant).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModel
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.models.model import ModelInfo
from mlflow.models.signature import ModelSignature
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.types.schema import Schema, TensorSpec

from btc.checkpoint import ModelSpec, save_model
from btc.evaluate import format_bands
from btc.predict import InferenceModule, Predictor
from btc.tables import read_parquet
from btc.tracking import store

MODEL_ARTIFACT = "model"
CHECKPOINT = "extra_files/model.pt"
INTENDED_USE = ("Decision support for trained clinicians reviewing brain MRI: a second read that flags likely "
                "glioma, meningioma or pituitary tumour. Not a diagnosis, and not for use without clinician review "
                "or on anything but single grayscale MRI slices.")
LIMITATIONS = [
    "Trained on 2D slices; says nothing about the other slices of a study.",
    "Four classes only: any other finding is forced into one of them; low-confidence outputs need extra scrutiny.",
    "Metrics come from one test set; performance on other scanners and populations is unknown until measured.",
    "No patient ids: the test split excludes near copies of training images as far as a perceptual hash can tell, "
    "not every slice of every training patient; accuracy by distance to the nearest training image shows the effect.",
]
NORMALISATION = "x / 255, then per-image standardisation: (x - mean) / (std + 1e-3)"


def model_signature(image_size: int, n_classes: int) -> ModelSignature:
    """uint8 ``[-1, S, S]`` slices in, float32 ``[-1, C]`` probabilities out (-1: any batch)."""
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_classes))]))


def example_batch(images: np.ndarray | None, image_size: int, seed: int = 0) -> np.ndarray:
    """A uint8 ``[2, S, S]`` input example: the first two of ``images``, or seeded noise."""
    if images is not None and len(images) >= 2 and images.shape[1:] == (image_size, image_size):
        return np.ascontiguousarray(images[:2], dtype=np.uint8)
    return np.random.default_rng(seed).integers(0, 256, (2, image_size, image_size), dtype=np.uint8)


def preprocessing_metadata(spec: ModelSpec) -> dict:
    """What a caller of the exported graph must know: input, normalisation, class order, temperature."""
    return {
        "input": {"kind": "grayscale MRI slice", "dtype": "uint8", "shape": ["batch", spec.image_size, spec.image_size],
                  "value_range": [0, 255],
                  "resize": f"bilinear to {spec.image_size}x{spec.image_size} by the caller (not in the graph)"},
        "image_size": spec.image_size,
        "normalisation": NORMALISATION,
        "classes": list(spec.classes),
        "temperature": float(spec.temperature),
        "output": "temperature-scaled softmax probabilities, one column per class in `classes` order",
        "preprocessing": spec.preprocessing,
    }


def build_model_card(spec: ModelSpec, *, model_name: str, report: dict | None, training_data: dict) -> dict:
    """The model card: input, classes, training data, metrics with their test set, intended use.

    Args:
        spec: the model's spec (architecture, input size, classes, temperature).
        model_name: registered model name it is meant for.
        report: :func:`btc.evaluate.evaluate_predictor` output on the test split, or None.
        training_data: dataset digest, class counts per split and where the data came from.
    """
    metrics: dict = {"test_set": "not evaluated"}
    if report is not None:
        clean = report.get("clean") or {}
        metrics = {
            "test_set": (f"test split of dataset {training_data.get('digest', '?')} ({report['n_images']} images; "
                         f"clean subset without near duplicates of training: {clean.get('n_images', 0)} images)"),
            "n_images": report["n_images"],
            "accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "macro_roc_auc": report.get("macro_roc_auc"),
            "ece": report["ece"], "ece_before_temperature": report.get("ece_before_temperature"),
            "recall": {c: v["recall"] for c, v in report["per_class"].items()},
            "precision": {c: v["precision"] for c, v in report["per_class"].items()},
            "clean": {k: clean.get(k) for k in ("n_images", "accuracy", "macro_f1", "ece")} if clean else None,
            "by_train_distance": report.get("by_train_distance"),
        }
    return {
        "model_name": model_name,
        "task": "classify one brain MRI slice as glioma, meningioma, notumor or pituitary",
        "input": preprocessing_metadata(spec)["input"] | {"normalisation": NORMALISATION},
        "classes": list(spec.classes),
        "architecture": {"arch": spec.arch, "width": spec.width, "depth": spec.depth, "dropout": spec.dropout},
        "calibration": {"temperature": float(spec.temperature), "fitted_on": "validation split"},
        "training_data": training_data,
        "metrics": metrics,
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS,
    }


def model_card_markdown(card: dict) -> str:
    """The model card as Markdown for people."""
    m = card["metrics"]
    lines = [f"# Model card: {card['model_name']}", "", card["task"], "",
             "## Intended use", "", card["intended_use"], "",
             "## Input", "", f"- {card['input']['kind']}, {card['input']['dtype']} "
             f"{card['input']['shape']}, values {card['input']['value_range']}",
             f"- {card['input']['resize']}", f"- normalisation: {card['input']['normalisation']}", "",
             "## Classes", "", ", ".join(card["classes"]), "",
             "## Training data", "", "```json", json.dumps(card["training_data"], indent=2), "```", "",
             "## Metrics", "", f"Test set: {m['test_set']}", ""]
    if "macro_f1" in m:
        lines += [f"- macro-F1 {m['macro_f1']:.4f}, accuracy {m['accuracy']:.4f}, ECE {m['ece']:.4f}",
                  "- recall: " + ", ".join(f"{c} {v:.3f}" for c, v in m["recall"].items())]
        if m.get("clean"):
            lines.append(f"- clean subset: macro-F1 {m['clean']['macro_f1']:.4f} on {m['clean']['n_images']} images")
        if m.get("by_train_distance"):
            lines.append("- accuracy by bits (256-bit pHash) to the nearest training image: "
                         + format_bands(m["by_train_distance"]))
    lines += ["", "## Limitations", ""] + [f"- {x}" for x in card["limitations"]]
    return "\n".join(lines) + "\n"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def log_model(predictor: Predictor, *, card: dict, example: np.ndarray | None = None,
              name: str = MODEL_ARTIFACT) -> ModelInfo:
    """Log ``predictor`` into the active MLflow run as an exported graph plus its checkpoint.

    Args:
        predictor: the model to log (its module is copied to the CPU; the predictor is untouched).
        card: the model card (:func:`build_model_card`), stored in the model and its metadata.
        example: real uint8 ``[N, S, S]`` slices for the input example (N >= 2), or None for noise.
        name: the model's name within the run.

    Returns:
        MLflow's ``ModelInfo`` (``model_uri`` is ``models:/<model_id>``).
    """
    spec = predictor.spec
    module = InferenceModule(copy.deepcopy(predictor.model).cpu().float(), spec.temperature).eval()
    with tempfile.TemporaryDirectory(prefix="btc-model-") as tmp:
        tmp = Path(tmp)
        checkpoint = save_model(tmp / "model.pt", module.model, spec)
        (tmp / "model_card.json").write_text(json.dumps(card, indent=2))
        (tmp / "model_card.md").write_text(model_card_markdown(card))
        metadata = {
            "btc_format": "btc-model/1",
            **preprocessing_metadata(spec),
            "checkpoint": {"path": CHECKPOINT, "sha256": _sha256(checkpoint), "arch": spec.arch, "width": spec.width,
                           "depth": spec.depth},
            "model_name": card.get("model_name"),
            "intended_use": INTENDED_USE,
        }
        with torch.no_grad():
            return mlflow.pytorch.log_model(
                module, name=name, signature=model_signature(spec.image_size, len(spec.classes)),
                input_example=example_batch(example, spec.image_size), serialization_format="pt2",
                metadata=metadata, extra_files=[str(tmp / f) for f in ("model.pt", "model_card.json", "model_card.md")],
                # Pinned explicitly: MLflow's requirement inference reloads the model in a subprocess.
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
            )


@dataclass
class ResolvedModel:
    """Where a model URI's files are, and the registry name and version it stands for."""

    location: str
    name: str | None
    version: str
    run_id: str | None = None  # the run that logged it (where its data/split.parquet is)


def logged_model_of_run(mlflow_client: MlflowClient, run_id: str, name: str = MODEL_ARTIFACT) -> LoggedModel:
    """The model named ``name`` that run ``run_id`` logged.

    Raises:
        MlflowException: no such run.
        ValueError: the run logged no model of that name.
    """
    run = mlflow_client.get_run(run_id)
    for output in run.outputs.model_outputs if run.outputs else []:
        logged = mlflow_client.get_logged_model(output.model_id)
        if logged.name == name:
            return logged
    raise ValueError(f"run {run_id!r} has no logged model named {name!r}; only runs logged by `btc train` "
                     "(tracking on) carry one")


def resolve_model_uri(uri: str, mlflow_client: MlflowClient) -> ResolvedModel:
    """Resolve ``models:/name@alias``, ``models:/name/version``, ``models:/<model_id>`` or ``runs:/<run_id>/model``.

    Resolution uses ``mlflow_client`` only: MLflow's own ``models:/`` resolver reads the global
    tracking URI, which the embedded default store does not set.

    Raises:
        ValueError: the URI is malformed or names nothing in the store.
    """
    try:
        if uri.startswith("runs:/"):
            run_id, _, path = uri[len("runs:/"):].partition("/")
            logged = logged_model_of_run(mlflow_client, run_id, path.strip("/") or MODEL_ARTIFACT)
            return ResolvedModel(logged.artifact_location, None, f"run-{run_id[:8]}", run_id)
        body = uri[len("models:/"):] if uri.startswith("models:/") else ""
        if re.fullmatch(r"m-[0-9a-f]{32}", body):
            logged = mlflow_client.get_logged_model(body)
            return ResolvedModel(logged.artifact_location, None, body, logged.source_run_id)
        if "@" in body:
            name, alias = body.split("@", 1)
            version = mlflow_client.get_model_version_by_alias(name, alias)
        elif re.fullmatch(r"[^/]+/\d+", body):
            name, number = body.rsplit("/", 1)
            version = mlflow_client.get_model_version(name, number)
        else:
            raise ValueError(f"{uri!r} is not a model URI btc reads; expected models:/NAME@ALIAS, "
                             "models:/NAME/VERSION, models:/<model_id> or runs:/RUN_ID/model")
        location = (mlflow_client.get_logged_model(version.model_id).artifact_location if version.model_id
                    else mlflow_client.get_model_version_download_uri(name, version.version))
        return ResolvedModel(location, name, str(version.version), version.run_id)
    except MlflowException as err:
        raise ValueError(f"cannot load model {uri!r}: {err.message}") from None


def load_predictor(uri: str, device: str = "cpu") -> Predictor:
    """A full :class:`Predictor` from a registry or run URI, rebuilt from the logged checkpoint.

    Args:
        uri: ``models:/name@alias``, ``models:/name/version``, ``models:/<model_id>`` or ``runs:/<run_id>/model``.
        device: where to run.

    Raises:
        TrackingError: the tracking server is unreachable.
        ValueError: the URI does not resolve, or the model was not logged by btc or is corrupted.
    """
    mlflow_client = store.client(must_exist=True)
    resolved = resolve_model_uri(uri, mlflow_client)
    repo = get_artifact_repository(resolved.location, tracking_uri=mlflow_client.tracking_uri,
                                   registry_uri=store.registry_uri(mlflow_client.tracking_uri))
    with tempfile.TemporaryDirectory(prefix="btc-load-") as tmp:
        try:
            metadata = Model.load(repo.download_artifacts("MLmodel", tmp)).metadata or {}
            checkpoint = Path(repo.download_artifacts(CHECKPOINT, tmp))
        except (MlflowException, OSError) as err:
            message = err.message if isinstance(err, MlflowException) else str(err)
            raise ValueError(f"cannot load model {uri!r}: {message} (expected a model logged by `btc train`, "
                             f"with {CHECKPOINT})") from None
        expected = (metadata.get("checkpoint") or {}).get("sha256")
        if expected and _sha256(checkpoint) != expected:
            raise ValueError(f"model {uri!r}: {CHECKPOINT} does not match the SHA-256 in its MLmodel metadata; "
                             "the stored model is corrupted or was altered")
        return Predictor.from_checkpoint(checkpoint, device, version=resolved.version,
                                         name=resolved.name or metadata.get("model_name") or "btc-classifier")


def run_split(mlflow_client: MlflowClient, run_id: str, instead: str = "pass --data DIR|split.parquet") -> pd.DataFrame:
    """The split (``data/split.parquet``) that run ``run_id`` logged: what it was trained and tested on.

    ``instead`` ends an error message: what the user can do without the logged split.

    Raises:
        ValueError: the run logged no readable split (the message names the run).
    """
    with tempfile.TemporaryDirectory(prefix="btc-split-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="data/split.parquet", dst_path=tmp,
                                                       tracking_uri=mlflow_client.tracking_uri,
                                                       registry_uri=store.registry_uri(mlflow_client.tracking_uri))
            return read_parquet(local)
        except (MlflowException, OSError, ValueError) as err:
            message = err.message if isinstance(err, MlflowException) else str(err)
            raise ValueError(f"run {run_id!r} has no data/split.parquet ({message}); {instead}") from None


def logged_split(uri: str, instead: str = "pass --data DIR|split.parquet") -> pd.DataFrame:
    """The split logged by the run behind a model URI (``instead``: as in :func:`run_split`).

    Raises:
        TrackingError: the tracking server is unreachable.
        ValueError: the URI does not resolve, or its run logged no split.
    """
    mlflow_client = store.client(must_exist=True)
    run_id = resolve_model_uri(uri, mlflow_client).run_id
    if not run_id:
        raise ValueError(f"model {uri!r} names no run that logged it, so no split; {instead}")
    return run_split(mlflow_client, run_id, instead)
