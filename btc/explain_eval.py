"""How well Grad-CAM points at lesions, on synthetic data whose lesion boxes are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from btc.data.images import decode_gray, resize_gray
from btc.explain import gradcam, pointing_game
from btc.predict import Predictor


def pointing_game_on_folder(model: str | Path | Predictor, root: Path, *, max_images: int = 400) -> dict:
    """Pointing-game accuracy over the tumour images listed in ``root/lesions.csv``.

    Boxes are rescaled from each image's size to the model's input size.

    Returns:
        ``{"pointing_game": share, "n_images": n, "per_class": {class: share}}``.
    """
    root = Path(root)
    sidecar = root / "lesions.csv"
    if not sidecar.is_file():
        raise FileNotFoundError(f"{str(sidecar)!r} not found: the pointing game needs the lesion boxes of synthetic data")
    boxes = pd.read_csv(sidecar).dropna(subset=["x0"]).head(max_images)
    if boxes.empty:
        raise ValueError(f"{str(sidecar)!r} lists no lesion boxes")
    predictor = model if isinstance(model, Predictor) else Predictor.load(model)
    size = predictor.image_size
    arrays, scaled = [], []
    for row in boxes.itertuples():
        gray = decode_gray(root / row.path)[0]
        sy, sx = size / gray.shape[0], size / gray.shape[1]
        arrays.append(resize_gray(gray, size))
        scaled.append((row.x0 * sx, row.y0 * sy, row.x1 * sx, row.y1 * sy))
    heat = np.concatenate([gradcam(predictor.model, torch.from_numpy(np.stack(arrays[i:i + 32])))[0]
                           for i in range(0, len(arrays), 32)])
    scaled = np.array(scaled)
    labels = boxes["label"].to_numpy()
    per_class = {c: pointing_game(heat[labels == c], scaled[labels == c]) for c in sorted(set(labels))}
    return {"pointing_game": pointing_game(heat, scaled), "n_images": len(boxes), "per_class": per_class}
