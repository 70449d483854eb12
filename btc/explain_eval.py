"""How well the heatmaps (LayerCAM, btc.explain) point at lesions, on synthetic data whose lesion boxes are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from btc.data.images import ImageDecodeError, decode_gray, resize_gray
from btc.data.synth import LESION_COLUMNS
from btc.explain import gradcam, pointing_game
from btc.predict import Predictor


HEAD_LEVEL = 30  # uint8 intensity above which a pixel is taken to be inside the head, not background


def pointing_game_on_folder(model: str | Path | Predictor, root: Path, *, max_images: int = 400,
                            under: str | None = None, method: str = "layercam") -> dict:
    """Pointing-game accuracy over the tumour images listed in ``root/lesions.csv``.

    At most ``max_images``, taken evenly from each tumour class (the sidecar lists the classes
    one after another). Boxes are rescaled from each image's size to the model's input size.
    ``chance`` is the mean share of the image the boxes cover: what a peak placed at random
    would score.

    Args:
        model: a Predictor, a ``model.pt`` path or an MLflow model URI.
        root: a synthetic dataset folder (with ``lesions.csv``).
        max_images: at most this many images.
        under: only images under this subfolder of ``root`` (e.g. ``Testing``, images the
            model did not train on).
        method: ``layercam`` or ``gradcam`` (see :func:`btc.explain.gradcam`).

    Returns:
        ``{"pointing_game": share, "chance": share, "n_images": n, "per_class": {class: share},
        "occlusion": {...}}``; ``occlusion`` checks that the model uses the lesion at all:
        accuracy before and after each box is painted over with the slice's median intensity
        inside the head, and the share then predicted ``notumor``.
    """
    root = Path(root)
    sidecar = root / "lesions.csv"
    if not sidecar.is_file():
        raise FileNotFoundError(f"{str(sidecar)!r} not found: the pointing game needs the lesion boxes of synthetic data")
    try:
        boxes = pd.read_csv(sidecar)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(sidecar)!r} cannot be read as CSV ({err})") from None
    missing = [c for c in LESION_COLUMNS if c not in boxes.columns]
    if missing:
        raise ValueError(f"{str(sidecar)!r} lacks the columns {', '.join(missing)}; expected "
                         f"{', '.join(LESION_COLUMNS)} (as `btc data synth` writes them)")
    boxes = boxes.dropna(subset=["x0"])
    if under:
        boxes = boxes[boxes["path"].str.startswith(f"{Path(under).as_posix().rstrip('/')}/")]
    if boxes.empty:
        raise ValueError(f"{str(sidecar)!r} lists no lesion boxes" + (f" under {under!r}" if under else ""))
    # round robin over the classes: the first of each class, then the second of each, ... (every class gets its turn)
    turn = boxes.groupby("label", sort=True).cumcount()
    boxes = boxes.assign(_turn=turn).sort_values(["_turn", "label"], kind="stable").head(max_images) \
        .drop(columns="_turn").sort_values(["label", "path"], kind="stable")
    predictor = model if isinstance(model, Predictor) else Predictor.load(model)
    size = predictor.image_size
    arrays, scaled, covered = [], [], []
    for row in boxes.itertuples():
        try:
            gray = decode_gray(root / row.path)[0]
        except ImageDecodeError as err:
            raise ImageDecodeError(f"{str(root / row.path)!r} (listed in {sidecar.name}): {err}") from None
        sy, sx = size / gray.shape[0], size / gray.shape[1]
        arrays.append(resize_gray(gray, size))
        scaled.append((row.x0 * sx, row.y0 * sy, row.x1 * sx, row.y1 * sy))
        covered.append((row.x1 - row.x0) * (row.y1 - row.y0) / gray.size)
    heat = np.concatenate([gradcam(predictor.model, torch.from_numpy(np.stack(arrays[i:i + 32])), method=method)[0]
                           for i in range(0, len(arrays), 32)])
    scaled = np.array(scaled)
    labels = boxes["label"].to_numpy()
    per_class = {c: pointing_game(heat[labels == c], scaled[labels == c]) for c in sorted(set(labels))}
    return {"pointing_game": pointing_game(heat, scaled), "chance": float(np.mean(covered)), "n_images": len(boxes),
            "per_class": per_class, "occlusion": _occlusion(predictor, arrays, scaled, labels)}


def _occlusion(predictor: Predictor, arrays: list[np.ndarray], boxes: np.ndarray, labels: np.ndarray) -> dict:
    painted = []
    for gray, (x0, y0, x1, y1) in zip(arrays, boxes):
        gray = gray.copy()
        head = gray[gray > HEAD_LEVEL]
        gray[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = np.median(head) if head.size else 0
        painted.append(gray)
    before = predictor.predict_proba(arrays).argmax(1)
    after = predictor.predict_proba(painted).argmax(1)
    truth = np.array([predictor.classes.index(c) for c in labels])
    return {"accuracy_before": float((before == truth).mean()), "accuracy_after": float((after == truth).mean()),
            "notumor_after": float((after == predictor.classes.index("notumor")).mean())}
