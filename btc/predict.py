"""The Predictor: load a model once, then ``predict_proba(images)``.

``btc predict``, ``btc evaluate``, the BentoML service and monitoring all use this one
object, so preprocessing is the same everywhere. It loads a ``model.pt`` checkpoint or an
MLflow model URI (``models:/name@alias``, ``runs:/id/model``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from btc.checkpoint import ModelSpec, load_model
from btc.data.images import gray_of, resize_gray
from btc.transforms import preprocess

ImageLike = np.ndarray | Image.Image | bytes | str | Path


def is_mlflow_uri(source: str | Path) -> bool:
    """``models:/…`` or ``runs:/…`` (an MLflow model), as opposed to a ``model.pt`` path."""
    return str(source).startswith(("models:/", "runs:/"))


class InferenceModule(nn.Module):
    """Model + preprocessing + temperature-scaled softmax: uint8 ``[B, H, W]`` in, probabilities out.

    This is what is exported for the registry, so a registry model needs no btc code to run.
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(preprocess(images)) / self.temperature, dim=1)


class Predictor:
    """A loaded model with its preprocessing and calibration.

    Args:
        model: the network (eval mode).
        spec: architecture, input size, class order, temperature.
        device: where to run.
        name: model name for responses and logs.
        version: model version for responses and logs.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, device: str | torch.device = "cpu", *,
                 name: str = "btc-classifier", version: str = "local"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.spec, self.name, self.version = spec, name, version
        self.classes = tuple(spec.classes)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", **kw) -> "Predictor":
        model, spec = load_model(Path(path), device)
        return cls(model, spec, device, **kw)

    @classmethod
    def load(cls, source: str | Path, device: str = "cpu") -> "Predictor":
        """From a ``model.pt`` path or an MLflow model URI (``models:/…``, ``runs:/…``)."""
        text = str(source)
        if is_mlflow_uri(text):
            from btc.tracking.model_io import load_predictor

            return load_predictor(text, device)
        return cls.from_checkpoint(source, device, version=Path(text).parent.name or "local")

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    def to_array(self, image: ImageLike) -> np.ndarray:
        """Decode (if needed) and resize one image to the model's uint8 input."""
        return resize_gray(gray_of(image), self.image_size)

    def batch(self, images: Sequence[ImageLike]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.to_array(im) for im in images]))

    @torch.no_grad()
    def logits_of_batch(self, batch: torch.Tensor) -> torch.Tensor:
        x = preprocess(batch.to(self.device)).contiguous(memory_format=torch.channels_last)
        return self.model(x).float()

    def predict_proba(self, images: Sequence[ImageLike], *, calibrated: bool = True, batch_size: int = 64) -> np.ndarray:
        """Class probabilities ``[N, C]`` (temperature-scaled unless ``calibrated=False``)."""
        t = self.spec.temperature if calibrated else 1.0
        out = [torch.softmax(self.logits_of_batch(self.batch(images[i:i + batch_size])) / t, 1).cpu().numpy()
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def predict(self, images: Sequence[ImageLike]) -> list[dict]:
        """Per image: predicted ``label``, its ``confidence`` and all ``probabilities``."""
        probs = self.predict_proba(images)
        return [{"label": self.classes[int(p.argmax())], "confidence": float(p.max()),
                 "probabilities": {c: float(v) for c, v in zip(self.classes, p)}} for p in probs]

    @torch.no_grad()
    def embed(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Penultimate-layer embeddings ``[N, D]`` (what monitoring projects)."""
        x = preprocess(self.batch(images).to(self.device)).contiguous(memory_format=torch.channels_last)
        return self.model.features(x).float().cpu().numpy()

    @torch.no_grad()
    def proba_and_embed(self, images: Sequence[ImageLike], *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities ``[N, C]`` and embeddings ``[N, D]`` from one forward pass (what serving logs)."""
        probs, embs = [], []
        for i in range(0, len(images), batch_size):
            x = preprocess(self.batch(images[i:i + batch_size]).to(self.device)).contiguous(memory_format=torch.channels_last)
            features = self.model.features(x)
            probs.append(torch.softmax(self.model.head(features).float() / self.spec.temperature, 1).cpu().numpy())
            embs.append(features.float().cpu().numpy())
        if not probs:
            return np.zeros((0, len(self.classes)), dtype=np.float32), np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(probs), np.concatenate(embs)

    def explain(self, image: ImageLike) -> tuple[np.ndarray, np.ndarray, dict]:
        """LayerCAM (Grad-CAM family) for one image: heatmap ``[S, S]`` in [0, 1], RGB overlay, and the prediction."""
        from btc.explain import gradcam, overlay

        arr = self.to_array(image)
        heat, _ = gradcam(self.model, torch.from_numpy(arr[None].copy()))  # a decoded image may be read-only
        return heat[0], overlay(arr, heat[0]), self.predict([arr])[0]
