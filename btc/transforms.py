"""Preprocessing (fixed) and augmentation (random), side by side so they cannot drift apart.

Both work on whole batches of tensors, on whatever device the model is on:

* ``preprocess``: uint8 ``[B, H, W]`` (or ``[B, 1, H, W]``) -> float ``[B, 1, H, W]``, scaled to
  [0, 1] then standardised per image (zero mean, unit variance). Per-image standardisation
  makes the network indifferent to the global brightness and contrast of a scanner.
* ``augment``: the random part used in training only, applied to the [0, 1] image before
  standardisation: small rotations and scalings, horizontal flips (brain anatomy is
  left-right symmetric; tumours occur on either side), and brightness, contrast and gamma
  jitter. Evaluation = ``preprocess`` without ``augment``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def to_unit(batch: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1] with a channel axis."""
    if batch.ndim == 3:
        batch = batch.unsqueeze(1)
    return batch.float().div_(255.0)


def standardise(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Per-image zero mean, unit variance."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / (std + eps)


def preprocess(batch: torch.Tensor) -> torch.Tensor:
    """The fixed transform, shared by training, evaluation and serving."""
    return standardise(to_unit(batch))


@dataclass(frozen=True)
class Augment:
    """Random MRI-suited augmentation of a [0, 1] batch ``[B, 1, H, W]``."""

    rotation_degrees: float = 10.0
    scale_jitter: float = 0.08
    hflip: bool = True
    intensity_jitter: float = 0.15
    gamma_jitter: float = 0.2
    translate: float = 0.05

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, dev = x.shape[0], x.device

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(b, generator=generator).to(dev) * (hi - lo) + lo

        angle = uniform(-self.rotation_degrees, self.rotation_degrees) * math.pi / 180
        scale = uniform(1 - self.scale_jitter, 1 + self.scale_jitter)
        flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if self.hflip else torch.ones(b, device=dev)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        shift = uniform(-self.translate, self.translate), uniform(-self.translate, self.translate)
        theta = torch.stack([
            torch.stack([cos * flip, -sin, shift[0]], dim=1),
            torch.stack([sin * flip, cos, shift[1]], dim=1),
        ], dim=1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        gamma = torch.exp(uniform(-self.gamma_jitter, self.gamma_jitter)).view(b, 1, 1, 1)
        x = x.clamp(0, 1).pow(gamma)
        contrast = uniform(1 - self.intensity_jitter, 1 + self.intensity_jitter).view(b, 1, 1, 1)
        brightness = uniform(-self.intensity_jitter, self.intensity_jitter).view(b, 1, 1, 1) * 0.5
        return (x * contrast + brightness).clamp(0, 1)


def train_transform(batch: torch.Tensor, augment: Augment, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training transform: to [0, 1], random augmentation, then the same standardisation as eval."""
    return standardise(augment(to_unit(batch), generator))
