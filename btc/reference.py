"""The monitoring reference: what the model saw at promotion, as features drift is measured on.

Monitoring compares the predictions the service logged with a reference built from the
validation images when the model was promoted. Both sides are turned into the same
features, by the same code:

* image statistics (:func:`btc.data.stats.image_statistics` of the grayscale image at its
  original size: intensity mean, std, percentiles, entropy, contrast, black-border share,
  width, height, aspect);
* the model's view: predicted class, confidence, entropy of the class probabilities and
  the probability of each class (``p_<class>``);
* the penultimate-layer embedding projected onto a PCA (``emb_pc1`` … ``emb_pcK``) fitted
  once on the reference embeddings and then frozen, so a change of the projected values
  means the inputs changed, not the projection.

:func:`log_records` builds prediction-log records exactly as the service does, so the
reference, the tests and the service share one record shape. A reference is a folder:
``features.parquet``, ``pca.npz`` (components, mean) and ``reference.json`` (model name and
version, column groups, counts).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from btc.data.images import ImageDecodeError, gray_of
from btc.data.stats import image_statistics
from btc.predlog import utc_text
from btc.tables import read_parquet_bytes

REFERENCE_FORMAT = "btc-monitoring-reference/1"
PREDICTION_COLUMNS = ("predicted", "confidence", "prob_entropy")
CATEGORICAL_COLUMNS = ("predicted",)
PROBABILITY_PREFIX = "p_"
EMBEDDING_PREFIX = "emb_pc"
FEATURES_FILE, PCA_FILE, METADATA_FILE = "features.parquet", "pca.npz", "reference.json"
#: What monitoring reads from ``reference.json`` besides its format.
METADATA_KEYS = ("model_name", "model_version", "image_columns", "prediction_columns")


class MonitoringError(ValueError):
    """Monitoring cannot give a meaningful answer (no reference, too few predictions…); the message says why."""


class ReferenceMismatch(MonitoringError):
    """The window's predictions are all by another model than the reference's (after a promotion or a
    rollback without a new reference): monitoring is blind until the reference is rebuilt."""


def probability_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy of each row of class probabilities, in bits (0: certain; log2 C: uniform).

    Bits, as the service's :func:`btc.serving_logic.probability_entropy` logs it.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    terms = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(axis=-1) + 0.0  # + 0.0: a certain answer is 0.0, not -0.0


def log_records(predictor, images: Sequence, *, ts: datetime | Sequence[datetime] | None = None,
                ood: Sequence[bool] | None = None, batch_size: int = 64) -> list[dict]:
    """Prediction-log records for ``images``, in the shape :meth:`btc.predlog.PredictionLog.append` takes.

    One record per image: ``model_name``, ``model_version``, ``predicted``, ``confidence``,
    ``prob_entropy`` (bits), ``probabilities`` ({class: p}), ``stats`` (image statistics of
    the image at its original size), ``embedding`` (penultimate layer, list of floats),
    ``ood`` and, when given, ``ts`` (ISO-8601 UTC).

    Args:
        predictor: a loaded :class:`btc.predict.Predictor`.
        images: uploads as bytes, paths, PIL images or arrays.
        ts: one time for all records or one per image (naive means UTC); None lets the log stamp them.
        ood: per image, whether the service judged it not to be a brain MRI (default all False).
        batch_size: images per forward pass.

    Raises:
        ValueError: ``ts`` or ``ood`` is a sequence of the wrong length.
    """
    n = len(images)
    stamps = [ts] * n if ts is None or isinstance(ts, datetime) else list(ts)
    flags = [False] * n if ood is None else [bool(f) for f in ood]
    if len(stamps) != n or len(flags) != n:
        raise ValueError(f"{n} images but {len(stamps)} timestamps and {len(flags)} ood flags; expected one per image")
    records = []
    for start in range(0, n, batch_size):
        grays = [_gray_named(im) for im in images[start:start + batch_size]]
        probs, embeddings = predictor.proba_and_embed(grays, batch_size=batch_size)
        records += [prediction_record(predictor, gray, p, e, ts=stamps[start + i], ood=flags[start + i])
                    for i, (gray, p, e) in enumerate(zip(grays, probs, embeddings))]
    return records


def _gray_named(image) -> np.ndarray:
    """:func:`gray_of`, naming the file in the error when ``image`` is a path (one of many rows)."""
    try:
        return gray_of(image)
    except ImageDecodeError as err:
        if isinstance(image, (str, Path)):
            raise ImageDecodeError(f"{image}: {err}") from None
        raise


def prediction_record(predictor, gray: np.ndarray, probabilities: np.ndarray, embedding: np.ndarray, *,
                      ts: datetime | None = None, ood: bool = False) -> dict:
    """One log record from what the service already has (no second forward pass).

    Args:
        predictor: gives ``name``, ``version`` and ``classes``.
        gray: the upload as a 2-D uint8 array at its original size (:func:`grayscale`).
        probabilities: the image's class probabilities ``[C]``.
        embedding: the image's penultimate-layer embedding ``[D]`` (``predictor.embed``).
        ts: the prediction time (naive means UTC); None lets the log stamp it.
        ood: whether the service judged the image not to be a brain MRI.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    record = {
        "model_name": predictor.name, "model_version": str(predictor.version),
        "predicted": predictor.classes[int(p.argmax())], "confidence": float(p.max()),
        "prob_entropy": float(probability_entropy(p)),
        "probabilities": {c: float(v) for c, v in zip(predictor.classes, p)},
        "stats": image_statistics(gray), "embedding": [float(v) for v in np.ravel(embedding)], "ood": bool(ood),
    }
    if ts is not None:
        record["ts"] = utc_text(ts)
    return record


def records_frame(records: list[dict]) -> pd.DataFrame:
    """Records as :meth:`btc.predlog.PredictionLog.read` returns them (stats and ``p_<class>`` as columns)."""
    base = pd.DataFrame([{k: v for k, v in r.items() if k not in ("stats", "probabilities")} for r in records])
    probs = pd.DataFrame([r["probabilities"] for r in records]).add_prefix("p_")
    stats = pd.DataFrame([r["stats"] for r in records])
    return pd.concat([base, probs, stats], axis=1)


def prediction_columns(classes: Sequence[str]) -> list[str]:
    """The model's answers as features: predicted class, confidence, entropy and ``p_<class>`` per class."""
    return list(PREDICTION_COLUMNS) + [f"{PROBABILITY_PREFIX}{c}" for c in classes]


def embedding_columns(k: int) -> list[str]:
    return [f"{EMBEDDING_PREFIX}{i}" for i in range(1, k + 1)]


@dataclass
class Reference:
    """Reference features and the frozen PCA that projects embeddings onto ``emb_pc*``.

    Args:
        features: one row per reference image, columns ``image_columns + prediction_columns + embedding_columns``.
        components: PCA components ``[K, D]``.
        mean: embedding mean ``[D]`` subtracted before projecting.
        metadata: model name/version, column groups, counts (``reference.json``).
    """

    features: pd.DataFrame
    components: np.ndarray
    mean: np.ndarray
    metadata: dict = field(default_factory=dict)

    @property
    def image_columns(self) -> list[str]:
        return list(self.metadata["image_columns"])

    @property
    def prediction_columns(self) -> list[str]:
        return list(self.metadata["prediction_columns"])

    @property
    def embedding_columns(self) -> list[str]:
        return embedding_columns(len(self.components))

    @property
    def groups(self) -> dict[str, list[str]]:
        """Feature columns by group: ``image``, ``prediction``, ``embedding``."""
        return {"image": self.image_columns, "prediction": self.prediction_columns, "embedding": self.embedding_columns}

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """Embeddings ``[N, D]`` onto the reference PCA: ``[N, K]``.

        Raises:
            MonitoringError: the embedding dimension is not the one the PCA was fitted on.
        """
        embeddings = np.asarray(embeddings, dtype=np.float64)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.mean.shape[0]:
            raise MonitoringError(
                f"embeddings of shape {embeddings.shape} do not fit the reference PCA, which expects "
                f"[N, {self.mean.shape[0]}] from model {self.metadata.get('model_name')} "
                f"version {self.metadata.get('model_version')}; build a reference for the model that logged them"
            )
        return (embeddings - self.mean) @ self.components.T

    def save(self, directory: str | Path) -> Path:
        """Write ``features.parquet``, ``pca.npz`` and ``reference.json`` into ``directory``.

        Each file replaces its old self whole (written aside, then renamed), and ``reference.json``,
        written last, holds the SHA-256 of the other two: a monitor that reads while a new
        reference is written gets an error, never one build's PCA with another's features.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        sha256 = {FEATURES_FILE: _replace(directory / FEATURES_FILE, lambda p: self.features.to_parquet(p, index=False)),
                  PCA_FILE: _replace(directory / PCA_FILE, lambda p: np.savez(p, components=self.components, mean=self.mean))}
        text = json.dumps({**self.metadata, "sha256": sha256}, indent=2) + "\n"
        _replace(directory / METADATA_FILE, lambda p: p.write_text(text))
        return directory


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _replace(path: Path, write) -> str:
    """Write ``path`` whole (``write(tmp)`` to a file beside it, then renamed over it); returns its SHA-256."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{path.suffix}")  # created with the usual permissions
    try:
        write(tmp)
        digest = _sha256(tmp.read_bytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def _features(frame: pd.DataFrame, columns: list[str], projected: np.ndarray) -> pd.DataFrame:
    """``columns`` of ``frame`` (image statistics, then the model's answers) and the projected embedding."""
    features = frame[columns].reset_index(drop=True).copy()
    for j, name in enumerate(embedding_columns(projected.shape[1])):
        features[name] = projected[:, j]
    features["predicted"] = features["predicted"].astype(str)
    return features


def _images_of(rows_or_images) -> list:
    if isinstance(rows_or_images, pd.DataFrame):
        if "path" not in rows_or_images.columns:
            raise ValueError(f"rows have the columns {', '.join(map(str, rows_or_images.columns))}; expected a 'path' column")
        return list(rows_or_images["path"])
    return list(rows_or_images)


def build_reference(predictor, rows_or_images, *, pca_components: int = 8, batch_size: int = 64,
                    source: str = "") -> Reference:
    """Build the reference from images the model is known to handle (the validation split at promotion).

    Args:
        predictor: the promoted :class:`btc.predict.Predictor`.
        rows_or_images: split rows with a ``path`` column, or a sequence of images.
        pca_components: K, the number of ``emb_pc*`` columns.
        batch_size: images per forward pass.
        source: what the images were, recorded in the metadata.

    Raises:
        ValueError: fewer images than ``pca_components + 1``, or K above the embedding dimension.
    """
    images = _images_of(rows_or_images)
    _check_components(pca_components, len(images))
    return reference_from_records(log_records(predictor, images, batch_size=batch_size),
                                  pca_components=pca_components, source=source)


def components_for(asked: int, n_images: int) -> int:
    """The ``pca_components`` a reference of ``n_images`` can have: ``asked``, lowered to ``n_images - 1``
    (at least 1) when there are too few images for it."""
    return max(1, min(asked, n_images - 1))


def _check_components(pca_components: int, n: int) -> None:
    if pca_components < 1 or n <= pca_components:
        raise ValueError(f"pca_components={pca_components} with {n} reference images; "
                         "expected 1 <= pca_components < number of images")


def reference_from_records(records: list[dict], *, pca_components: int = 8, source: str = "") -> Reference:
    """Build the reference from records made by :func:`log_records` (one model's predictions).

    Args:
        records: prediction records, all by the same model.
        pca_components: K, the number of ``emb_pc*`` columns.
        source: what the images were, recorded in the metadata.

    Raises:
        ValueError: too few records, K above the embedding dimension, or records by several models.
    """
    from sklearn.decomposition import PCA

    _check_components(pca_components, len(records))
    models = sorted({(r["model_name"], str(r["model_version"])) for r in records})
    if len(models) != 1:
        raise ValueError(f"records by {len(models)} models ({', '.join(f'{n} v{v}' for n, v in models)}); "
                         "expected one model's predictions")
    frame, image_cols = records_frame(records), list(records[0]["stats"])
    classes = list(records[0]["probabilities"])
    embeddings = np.asarray(frame["embedding"].tolist(), dtype=np.float64)
    if pca_components > embeddings.shape[1]:
        raise ValueError(f"pca_components={pca_components} exceeds the embedding dimension {embeddings.shape[1]}")
    distinct = len(np.unique(embeddings, axis=0))
    if distinct <= pca_components:  # copies of a few images: no spread for the PCA to describe (NaN ratios)
        raise ValueError(f"only {distinct} distinct embeddings among {len(records)} reference images; "
                         f"expected more than pca_components={pca_components} (are the images copies of each other?)")
    pca = PCA(n_components=pca_components, random_state=0).fit(embeddings)
    reference = Reference(pd.DataFrame(), pca.components_.astype(np.float64), pca.mean_.astype(np.float64), {
        "format": REFERENCE_FORMAT, "model_name": models[0][0], "model_version": models[0][1], "classes": classes,
        "images": len(records), "source": source, "created": datetime.now(timezone.utc).isoformat(),
        "embedding_dim": int(embeddings.shape[1]), "pca_components": pca_components,
        "explained_variance_ratio": [round(float(v), 5) for v in pca.explained_variance_ratio_],
        "image_columns": image_cols, "prediction_columns": prediction_columns(classes),
    })
    reference.features = _features(frame, image_cols + reference.prediction_columns, reference.project(embeddings))
    return reference


def load_reference(directory: str | Path) -> Reference:
    """Read a reference written by :meth:`Reference.save`.

    Raises:
        MonitoringError: the folder or one of its files is missing or cannot be read (the message
            names the file), or it is not a btc reference.
    """
    directory = Path(directory)
    missing = [name for name in (FEATURES_FILE, PCA_FILE, METADATA_FILE) if not (directory / name).is_file()]
    if missing:
        raise MonitoringError(f"monitoring reference {str(directory)!r} lacks {', '.join(missing)}; "
                              "build one with btc monitor-reference MODEL (the training pipeline builds it when it "
                              "promotes a model)")
    rebuild = "rebuild the reference with btc monitor-reference"
    path = directory / METADATA_FILE
    try:
        metadata = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MonitoringError(f"{str(path)!r} cannot be read as JSON ({err}); {rebuild}") from None
    if not isinstance(metadata, dict):
        raise MonitoringError(f"{str(path)!r} holds a JSON {type(metadata).__name__}; expected an object with "
                              f"format {REFERENCE_FORMAT!r}; {rebuild}")
    if metadata.get("format") != REFERENCE_FORMAT:
        raise MonitoringError(f"{str(path)!r} has format {metadata.get('format')!r}; expected {REFERENCE_FORMAT!r}")
    lacking = [k for k in METADATA_KEYS if k not in metadata]
    if lacking:
        raise MonitoringError(f"{str(path)!r} lacks {', '.join(lacking)}; {rebuild}")
    path = directory / PCA_FILE
    try:
        with np.load(io.BytesIO(_checked_bytes(path, metadata))) as pca:
            components, mean = pca["components"], pca["mean"]
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:  # TypeError: a bare .npy array
        raise MonitoringError(f"{str(path)!r} cannot be read as the reference PCA ({err}); {rebuild}") from None
    path = directory / FEATURES_FILE
    try:
        features = read_parquet_bytes(_checked_bytes(path, metadata))
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise MonitoringError(f"{str(path)!r} cannot be read as Parquet ({err}); {rebuild}") from None
    return Reference(features, components, mean, {k: v for k, v in metadata.items() if k != "sha256"})


def _checked_bytes(path: Path, metadata: dict) -> bytes:
    """The file's bytes, checked against the SHA-256 ``reference.json`` recorded for it (when it has one).

    Raises:
        MonitoringError: the bytes differ: the file was rewritten by another build (or damaged).
    """
    data = path.read_bytes()
    expected = (metadata.get("sha256") or {}).get(path.name)
    if expected is not None and _sha256(data) != expected:
        raise MonitoringError(f"{str(path)!r} is not the file {METADATA_FILE} was written with (its SHA-256 "
                              "differs): the reference is being rewritten, or was damaged; run again, or rebuild "
                              "it with btc monitor-reference")
    return data


def features_from_log(log_df: pd.DataFrame, reference: Reference) -> pd.DataFrame:
    """Logged predictions as features with exactly the reference's columns.

    Args:
        log_df: rows from :meth:`btc.predlog.PredictionLog.read` (or :func:`records_frame`).
        reference: gives the columns and the frozen PCA.

    Raises:
        MonitoringError: a needed column is absent, or the embeddings do not fit the PCA.
    """
    needed = reference.image_columns + reference.prediction_columns + ["embedding"]
    missing = [c for c in needed if c not in log_df.columns]
    if missing:
        raise MonitoringError(f"the prediction log lacks the columns {', '.join(missing)}; "
                              f"the reference needs {', '.join(needed)}")
    embeddings = np.asarray(log_df["embedding"].tolist(), dtype=np.float64)
    features = _features(log_df, reference.image_columns + reference.prediction_columns, reference.project(embeddings))
    return features[list(reference.features.columns)]
