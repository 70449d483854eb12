"""Grad-CAM explanations, overlays, and the pointing game on data with known lesion boxes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from torch import nn

from btc.transforms import preprocess


def gradcam(model: nn.Module, batch: torch.Tensor, target: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps for uint8 images ``[B, H, W]``.

    Args:
        model: a btc model (exposes ``cam_layer``).
        batch: uint8 images at the model's input size.
        target: class index per image; default the predicted class.

    Returns:
        Heatmaps ``[B, H, W]`` in [0, 1] and the predicted class indices ``[B]``.
    """
    store: dict[str, torch.Tensor] = {}
    layer = model.cam_layer
    h1 = layer.register_forward_hook(lambda m, i, o: store.__setitem__("act", o))
    h2 = layer.register_full_backward_hook(lambda m, gi, go: store.__setitem__("grad", go[0]))
    was_training = model.training
    model.eval()
    try:
        x = preprocess(batch.to(next(model.parameters()).device)).requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)
            pred = logits.argmax(1)
            chosen = pred if target is None else target.to(logits.device)
            model.zero_grad(set_to_none=True)
            logits.gather(1, chosen[:, None]).sum().backward()
    finally:
        h1.remove()
        h2.remove()
        model.train(was_training)
    act, grad = store["act"].detach(), store["grad"].detach()
    cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=batch.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = cam.amin(dim=(1, 2), keepdim=True)
    hi = cam.amax(dim=(1, 2), keepdim=True)
    return ((cam - lo) / (hi - lo).clamp_min(1e-8)).cpu().numpy(), pred.cpu().numpy()


def overlay(gray: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a [0, 1] heatmap (jet colours) over a uint8 grayscale image; returns RGB uint8."""
    base = np.repeat(gray[..., None].astype(np.float32) / 255, 3, axis=2)
    colours = colormaps["jet"](heatmap)[..., :3]
    return (np.clip((1 - alpha) * base + alpha * colours, 0, 1) * 255).astype(np.uint8)


def pointing_game(heatmaps: np.ndarray, boxes: np.ndarray) -> float:
    """Share of heatmaps whose maximum falls inside the lesion box ``(x0, y0, x1, y1)``."""
    if len(heatmaps) == 0:
        raise ValueError("pointing game needs at least one heatmap with a lesion box")
    hits = 0
    for cam, (x0, y0, x1, y1) in zip(heatmaps, boxes):
        y, x = np.unravel_index(int(cam.argmax()), cam.shape)
        hits += int(x0 <= x <= x1 and y0 <= y <= y1)
    return hits / len(heatmaps)
