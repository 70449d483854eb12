"""What the HTTP service does with a request, as plain functions the tests can call directly.

``serving/service.py`` is a thin BentoML door onto this module: it receives uploaded files,
calls these functions and returns what they build. Here live the decoding of an upload
with the configured limits, the image statistics and out-of-distribution decision, the
JSON answer, the prediction-log record, the model card served at ``/metadata``, and the
settings adapter (the only function that sees the config object).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

from btc.data.images import ImageDecodeError, ImageInfo, decode_gray, resize_gray
from btc.data.stats import image_statistics
from btc.ood import OodRule, colour_saturation, ood_reasons

INTENDED_USE = "decision support for trained clinicians, not a diagnosis"
DEFAULT_MODEL_URI = "models:/btc-classifier@champion"
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ServingSettings:
    """Limits and switches of the service (built from the config by :func:`settings_from_env`)."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_batch_images: int = 32
    log_images: bool = False
    rule: OodRule = field(default_factory=OodRule)


def settings_from_env(environ: dict[str, str] | None = None) -> ServingSettings:
    """Settings from the config file named by ``$BTC_CONFIG`` (defaults without it).

    ``$BTC_LOG_IMAGES=1`` stores uploads in the prediction log even when the config does not.

    Raises:
        btc.config.ConfigError: the config file is missing or invalid.
    """
    from btc.config import load_config

    env = os.environ if environ is None else environ
    path = env.get("BTC_CONFIG")
    serving = load_config(Path(path) if path else None).serving
    return ServingSettings(
        max_upload_bytes=serving.max_upload_bytes,
        max_pixels=serving.max_pixels,
        max_batch_images=serving.max_batch_images,
        log_images=serving.log_images or env.get("BTC_LOG_IMAGES", "").strip().lower() in _TRUE,
        rule=OodRule(min_confidence=serving.ood_min_confidence),
    )


class UploadError(ValueError):
    """An upload the service refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    """One decoded upload: the grayscale pixels and what the service needs to know about them."""

    name: str
    gray: np.ndarray
    info: ImageInfo
    stats: dict[str, float]
    saturation: float
    data: bytes | None = None


UNNAMED = "(no file name)"


def upload_name(path: Path) -> str:
    """The client's file name, recovered from BentoML's temporary copy (``tmpXXXXXXXX<name>``).

    A client that sent no name (``filename=`` or a folder path) gets :data:`UNNAMED`, never the
    temporary file's own name.
    """
    name = Path(path).name
    if name.startswith("tmp") and len(name) >= 11:
        return name[11:] or UNNAMED
    return name


def read_upload(path: Path, *, max_bytes: int, max_pixels: int, keep_bytes: bool = False) -> Upload:
    """Read and decode one uploaded file (BentoML writes each file of the form to disk).

    The size is checked before the file is read. See :func:`decode_upload` for the rest.

    Raises:
        UploadError: empty, not an image, truncated, corrupt or over a limit.
    """
    name = upload_name(path)
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise UploadError(f"{name}: file is {size} bytes, over the limit of {max_bytes} bytes", status=413)
    return decode_upload(Path(path).read_bytes(), name, max_bytes=max_bytes, max_pixels=max_pixels,
                         keep_bytes=keep_bytes)


def decode_upload(data: bytes, name: str, *, max_bytes: int, max_pixels: int, keep_bytes: bool = False) -> Upload:
    """Decode one uploaded image, refusing it with a reason the client can act on.

    Args:
        data: the file's bytes.
        name: the client's file name, for messages.
        max_bytes: refuse larger files (413).
        max_pixels: refuse images whose header declares more pixels, before decoding (400).
        keep_bytes: keep the bytes on the result (for the prediction log).

    Raises:
        UploadError: empty, not an image, truncated, corrupt or over a limit.
    """
    if len(data) > max_bytes:
        raise UploadError(f"{name}: file is {len(data)} bytes, over the limit of {max_bytes} bytes", status=413)
    try:
        gray, info = decode_gray(data, max_bytes=max_bytes, max_pixels=max_pixels)
        saturation = colour_saturation(data, info.mode)
    except ImageDecodeError as err:
        raise UploadError(f"{name}: cannot use this image: {err}; accepted: JPEG, PNG or DICOM") from None
    except Exception as err:  # untrusted bytes: whatever the decoders raise is the file's fault
        raise UploadError(f"{name}: cannot use this image: corrupt or truncated file ({type(err).__name__}: {err}); "
                          "accepted: JPEG, PNG or DICOM") from None
    return Upload(name=name, gray=gray, info=info, stats=image_statistics(gray),
                  saturation=saturation, data=data if keep_bytes else None)


def model_inputs(uploads: list[Upload], image_size: int) -> np.ndarray:
    """The uploads resized to the model's input: uint8 ``[N, S, S]`` (what ``Predictor.to_array`` makes)."""
    return np.stack([resize_gray(u.gray, image_size) for u in uploads])


def model_outputs(predictor, images: np.ndarray) -> list[dict]:
    """Probabilities and embedding of each image of one model batch (the model service's work).

    Args:
        predictor: a :class:`btc.predict.Predictor`.
        images: uint8 ``[N, S, S]`` at the model's input size.

    Returns:
        Per image: ``probabilities`` (list, class order of the model), ``embedding`` (list)
        and ``batch_size``, the number of images the model ran together.
    """
    probabilities, embeddings = predictor.proba_and_embed(images)
    n = len(images)
    return [{"probabilities": p.tolist(), "embedding": e.tolist(), "batch_size": n}
            for p, e in zip(probabilities, embeddings)]


def probability_entropy(probabilities: list[float]) -> float:
    """Shannon entropy of a probability vector, in bits."""
    return float(-sum(p * math.log2(p) for p in probabilities if p > 0))


def prediction(upload: Upload, output: dict, *, classes: list[str], model_name: str, model_version: str,
               rule: OodRule, elapsed_ms: float) -> dict:
    """The JSON answer for one image.

    Args:
        upload: the decoded upload.
        output: one item of :func:`model_outputs`.
        classes: class names in the model's order.
        model_name: registry name of the model.
        model_version: its version.
        rule: the out-of-distribution thresholds.
        elapsed_ms: time spent on the request so far.
    """
    probabilities = output["probabilities"]
    best = int(np.argmax(probabilities))
    confidence = float(probabilities[best])
    reasons = ood_reasons(upload.stats, upload.saturation, confidence, rule)
    warning = None
    if reasons:
        warning = ("This image does not look like the brain MRI slices the model was trained on ("
                   + "; ".join(reasons) + "). Do not rely on the predicted class.")
    return {
        "filename": upload.name,
        "predicted": classes[best],
        "confidence": round(confidence, 6),
        "probabilities": {c: round(float(p), 6) for c, p in zip(classes, probabilities)},
        "ood": bool(reasons),
        "ood_reasons": reasons,
        "warning": warning,
        "model_name": model_name,
        "model_version": model_version,
        "time_ms": round(elapsed_ms, 2),
        "batch_size": int(output.get("batch_size", 1)),
        "image": {"format": upload.info.format, "width": upload.info.width, "height": upload.info.height,
                  "mode": upload.info.mode},
    }


def log_record(upload: Upload, answer: dict, output: dict) -> dict:
    """The prediction-log record (:class:`btc.predlog.PredictionLog`) of one answered image."""
    return {
        "model_name": answer["model_name"],
        "model_version": answer["model_version"],
        "predicted": answer["predicted"],
        "confidence": answer["confidence"],
        "prob_entropy": probability_entropy(output["probabilities"]),
        "probabilities": answer["probabilities"],
        "stats": {**upload.stats, "saturation": upload.saturation},
        "embedding": output["embedding"],
        "ood": answer["ood"],
        "image": upload.data,
    }


def model_card(predictor, rule: OodRule | None = None) -> dict:
    """What ``GET /metadata`` answers: the model, its input, its intended use."""
    spec = predictor.spec
    card = {
        "model_name": predictor.name,
        "model_version": str(predictor.version),
        "classes": list(predictor.classes),
        "input": {
            "image": "one grayscale brain MRI slice (JPEG, PNG or DICOM); colour files are converted to grey",
            "size": [predictor.image_size, predictor.image_size],
            "value_range": "uint8 0-255 before preprocessing",
        },
        "preprocessing": spec.preprocessing,
        "temperature": float(spec.temperature),
        "architecture": spec.arch,
        "intended_use": INTENDED_USE,
    }
    if rule is not None:
        card["ood_rule"] = rule.as_dict()
    return card


def explanation(predictor, image: np.ndarray) -> dict:
    """What the model service answers for ``/explain``: the LayerCAM overlay and the prediction to log.

    Args:
        predictor: a :class:`btc.predict.Predictor`.
        image: uint8 ``[S, S]`` at the model's input size.

    Returns:
        ``png``: the overlay of the predicted class, PNG-encoded; ``output``: the image's item of
        :func:`model_outputs` (probabilities and embedding), so that the answer and its
        prediction-log record are built exactly as for ``/predict``.
    """
    _, overlay, _ = predictor.explain(image)
    return {"png": png_bytes(overlay), "output": model_outputs(predictor, image[None])[0]}


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an RGB (or grayscale) uint8 array as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def header_values(headers: dict[str, str]) -> dict[str, str]:
    """HTTP header values as HTTP can carry them: Latin-1 text as it is, anything else percent-encoded (UTF-8).

    A model version named after a run folder such as ``实验1`` would otherwise fail the response.
    """
    def one(value: str) -> str:
        value = " ".join(str(value).split())  # no line breaks inside a header
        try:
            value.encode("latin-1")
            return value
        except UnicodeEncodeError:
            return quote(value, safe=" !#$&'()*+,/:;=?@[]~<>.-_")

    return {name: one(value) for name, value in headers.items()}
