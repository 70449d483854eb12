"""The trained-model file: weights plus everything needed to use them (no pickled code).

``model.pt`` holds only tensors and plain values, so it loads with ``weights_only=True``:
architecture, width and depth, class order, input size, preprocessing name and the temperature
fitted on validation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from btc.labels import CLASSES
from btc.models import build_model

PREPROCESSING = "grayscale uint8 -> resize to image_size (bilinear) -> /255 -> per-image standardisation"


@dataclass
class ModelSpec:
    """What a set of weights needs to be rebuilt and fed correctly."""

    arch: str = "compact_cnn"
    width: int = 32
    depth: int = 1
    dropout: float = 0.2
    image_size: int = 128
    classes: tuple[str, ...] = CLASSES
    temperature: float = 1.0
    preprocessing: str = PREPROCESSING
    extra: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        return build_model(self.arch, num_classes=len(self.classes), width=self.width, depth=self.depth,
                           dropout=self.dropout)


def save_model(path: Path, model: nn.Module, spec: ModelSpec) -> Path:
    """Write weights and spec to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    spec_dict = asdict(spec)
    spec_dict["classes"] = list(spec.classes)
    tmp = path.with_suffix(".tmp")
    torch.save({"format": "btc-model/1", "spec": spec_dict, "state_dict": state}, tmp)
    tmp.replace(path)
    return path


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Load a model written by :func:`save_model`, in eval mode.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a btc model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise ValueError(f"{str(path)!r} is not a readable btc model file ({err})") from None
    if not isinstance(blob, dict) or blob.get("format") != "btc-model/1":
        raise ValueError(f"{str(path)!r} is not a btc model file (expected format btc-model/1, e.g. runs/<run>/model.pt)")
    try:
        spec_dict = dict(blob["spec"])
        spec_dict["classes"] = tuple(spec_dict["classes"])
        spec = ModelSpec(**spec_dict)
        model = spec.build()
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # a missing or extra key, weights of another shape
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{str(path)!r} is not a usable btc model file: its spec and weights do not fit together "
                         f"({type(err).__name__}: {first})") from None
    return model.to(device).eval(), spec
