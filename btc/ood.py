"""Is this upload a brain MRI slice at all? A simple, documented out-of-distribution rule.

A classifier trained on four MRI classes answers *some* class for any picture, often with
high confidence. The service therefore flags an upload as out of distribution (``ood``)
when any of these holds, and says which (each reason is a sentence for the user):

* **colour**: mean colour saturation of the original above ``max_saturation`` (0.06). MRI
  is grey; stored as RGB its channels are equal (0 to 0.016 on the real Kaggle Training
  images, JPEG chroma noise included);
* **flat**: intensity ``std`` below ``min_std`` (0.06) or histogram ``entropy`` below
  ``min_entropy`` (2.0 bits): a blank, near-blank or two-level (document, drawing) image.
  Real MRI: std >= 0.08, entropy >= 2.2;
* **no dark background**: ``black_border_share`` below ``min_black_border_share`` (0.30). An
  MRI slice is a head on a black background, so the outer band of the image is mostly
  dark (median 0.91 on real MRI); a photo fills the frame;
* **too bright**: mean intensity above ``max_mean`` (0.60); real MRI stays below 0.55;
* **low confidence**: the model's top probability below ``min_confidence`` (the serving
  config's ``ood_min_confidence``, 0.5 by default), so no class clearly wins.

The statistics come from :func:`btc.data.stats.image_statistics` and the thresholds were
chosen on the 5,708 real Kaggle Training slices (224 px; ``benchmarks/ood_rates.py``
measures them again). Measured with the statistics part alone (no model):

* false alarms on real MRI: 14 of 5,708 (0.25 %), all from the "no dark background" test:
  FLAIR or windowed slices whose background is grey rather than black;
* detection: 100 % of colour photos, blank and near-blank images, documents, colour
  gradients and noise; 40 % of *grayscale* photos (40 random crops of three photos). A
  grayscale photo with dark edges passes the statistics; the confidence test is then the
  only line of defence, which is why the response carries the probabilities and a warning
  rather than a bare class.

With the confidence test added, on the 824 test-split slices of a compact CNN trained on the
real data (images it never trained on): 1.9 % flagged (14 low confidence, 2 statistics); it
caught 1 more of the 40 grayscale photos (42 %): the network is confidently wrong on the rest.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from btc.data.images import dicom_colour_frame, seek_middle_frame

# Modes whose pixels carry no colour: their saturation is 0 by definition.
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
_SATURATION_SIDE = 128


@dataclass(frozen=True)
class OodRule:
    """Thresholds of the out-of-distribution rule (see the module docstring for their origin)."""

    max_saturation: float = 0.06
    min_std: float = 0.06
    min_entropy: float = 2.0
    min_black_border_share: float = 0.30
    max_mean: float = 0.60
    min_confidence: float = 0.5

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def colour_saturation(data: bytes, mode: str) -> float:
    """Mean colour saturation of an image file, in [0, 1]: mean of (max - min) over RGB channels.

    Decodes a reduced copy (JPEG draft mode, at most about 128 px a side), so call it only
    on files that :func:`btc.data.images.decode_gray` has already accepted.

    Args:
        data: the file's bytes (JPEG, PNG, DICOM or another PIL format).
        mode: the PIL mode the header declared (``ImageInfo.mode``).

    Returns:
        0 for grey modes and grey DICOM; otherwise the mean chroma (of a reduced copy, or of a colour
        DICOM's middle frame).
    """
    if data[128:132] == b"DICM":  # a colour DICOM (a secondary capture, Doppler) is colour too
        rgb = dicom_colour_frame(data) if mode == "RGB" else None
        return 0.0 if rgb is None else float((rgb.max(axis=-1) - rgb.min(axis=-1)).mean())
    if mode in _GREY_MODES:
        return 0.0
    with Image.open(io.BytesIO(data)) as image:
        seek_middle_frame(image)  # the frame that is classified
        image.draft("RGB", (_SATURATION_SIDE, _SATURATION_SIDE))
        image.thumbnail((2 * _SATURATION_SIDE, 2 * _SATURATION_SIDE))
        rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    return float((rgb.max(axis=-1) - rgb.min(axis=-1)).mean() / 255.0)


def statistics_reasons(stats: dict[str, float], saturation: float, rule: OodRule = OodRule()) -> list[str]:
    """The model-free part of the rule: why the image statistics do not look like an MRI slice.

    Args:
        stats: :func:`btc.data.stats.image_statistics` of the grayscale image.
        saturation: :func:`colour_saturation` of the original file.
        rule: the thresholds.

    Returns:
        One sentence per failed test; empty when the image looks like an MRI slice.
    """
    reasons = []
    if saturation > rule.max_saturation:
        reasons.append(f"colour image (saturation {saturation:.2f} > {rule.max_saturation:.2f}); MRI slices are grey")
    if stats["std"] < rule.min_std or stats["entropy"] < rule.min_entropy:
        reasons.append(
            f"almost uniform image (std {stats['std']:.3f}, entropy {stats['entropy']:.2f} bits; "
            f"MRI has std >= {rule.min_std} and entropy >= {rule.min_entropy})"
        )
    if stats["black_border_share"] < rule.min_black_border_share:
        reasons.append(
            f"no dark background (dark share of the border {stats['black_border_share']:.2f} < "
            f"{rule.min_black_border_share:.2f}); an MRI slice shows a head on a black background"
        )
    if stats["mean"] > rule.max_mean:
        reasons.append(f"too bright for an MRI slice (mean intensity {stats['mean']:.2f} > {rule.max_mean:.2f})")
    return reasons


def ood_reasons(
    stats: dict[str, float], saturation: float, confidence: float, rule: OodRule = OodRule()
) -> list[str]:
    """The whole rule: the statistics tests plus the model's confidence.

    Args:
        stats: :func:`btc.data.stats.image_statistics` of the grayscale image.
        saturation: :func:`colour_saturation` of the original file.
        confidence: the model's top class probability.
        rule: the thresholds.

    Returns:
        One sentence per failed test; the upload is out of distribution when it is not empty.
    """
    reasons = statistics_reasons(stats, saturation, rule)
    if confidence < rule.min_confidence:
        reasons.append(f"low model confidence ({confidence:.2f} < {rule.min_confidence:.2f}); no class clearly wins")
    return reasons
