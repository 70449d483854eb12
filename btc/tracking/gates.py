"""Promotion gates: what a challenger must show before it may become champion.

Every gate is measured on one frozen evaluation set, in the command that decides:

* ``macro_f1``: macro-F1 at least ``gates.min_macro_f1``;
* ``recall_<class>``: recall of each tumour class at least its floor in ``gates.min_tumour_recall``
  (a missed tumour is the costly error);
* ``beats_champion``: challenger macro-F1 minus the current champion's, both evaluated here on
  the same images, at least ``gates.min_margin_over_champion`` (passes with "no champion" for
  the first promotion);
* ``ece``: expected calibration error (after temperature scaling) at most ``gates.max_ece``;
* ``flip_change``: share of images whose predicted class changes under a horizontal flip at
  most ``gates.max_flip_change`` (anatomy is left-right symmetric; tumours occur on both sides);
* ``intensity_change``: share whose predicted class changes when brightness is scaled by 0.95
  or 1.05 (clipped to uint8) at most ``gates.max_intensity_change``. Per-image standardisation
  makes the network nearly invariant to this by construction, so the gate guards against a
  preprocessing regression more than it tests the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from btc.config import GatesConfig
from btc.predict import Predictor

INTENSITY_SHIFT = 0.05


@dataclass
class GateResult:
    """One gate's verdict: ``value`` and ``threshold`` as shown, ``number`` the raw value if any."""

    name: str
    threshold: str
    value: str
    passed: bool
    number: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def predicted_classes(predictor: Predictor, images: np.ndarray) -> np.ndarray:
    """Argmax class of each uint8 ``[N, S, S]`` image."""
    return predictor.predict_proba(list(images)).argmax(1)


def flip_change_share(predictor: Predictor, images: np.ndarray) -> float:
    """Share of images whose predicted class changes when flipped left-right."""
    if len(images) == 0:
        return 0.0
    flipped = np.ascontiguousarray(images[:, :, ::-1])
    return float((predicted_classes(predictor, images) != predicted_classes(predictor, flipped)).mean())


def scale_brightness(images: np.ndarray, factor: float) -> np.ndarray:
    """uint8 images times ``factor``, rounded and clipped to [0, 255]."""
    return np.clip(np.rint(images.astype(np.float32) * factor), 0, 255).astype(np.uint8)


def intensity_change_share(predictor: Predictor, images: np.ndarray, shift: float = INTENSITY_SHIFT) -> float:
    """Share of images whose predicted class changes at brightness ``1 - shift`` or ``1 + shift``."""
    if len(images) == 0:
        return 0.0
    base = predicted_classes(predictor, images)
    changed = np.zeros(len(images), dtype=bool)
    for factor in (1 - shift, 1 + shift):
        changed |= predicted_classes(predictor, scale_brightness(images, factor)) != base
    return float(changed.mean())


def behaviour(predictor: Predictor, images: np.ndarray) -> dict[str, float]:
    """The behavioural measures the gates check: ``flip_change`` and ``intensity_change``."""
    return {"flip_change": flip_change_share(predictor, images),
            "intensity_change": intensity_change_share(predictor, images)}


def _at_least(name: str, value: float, floor: float) -> GateResult:
    return GateResult(name, f">= {floor:.4f}", f"{value:.4f}", bool(value >= floor), float(value))


def _at_most(name: str, value: float, ceiling: float) -> GateResult:
    return GateResult(name, f"<= {ceiling:.4f}", f"{value:.4f}", bool(value <= ceiling), float(value))


def evaluate_gates(challenger: dict, champion: dict | None, measured: dict[str, float],
                   gates: GatesConfig) -> list[GateResult]:
    """Every gate's verdict.

    Args:
        challenger: :func:`btc.evaluate.evaluate_predictor` report of the challenger.
        champion: the current champion's report on the same rows, or None if there is none.
        measured: :func:`behaviour` of the challenger.
        gates: the thresholds.
    """
    results = [_at_least("macro_f1", challenger["macro_f1"], gates.min_macro_f1)]
    for cls, floor in sorted(gates.min_tumour_recall.items()):
        per_class = challenger["per_class"].get(cls)
        if per_class is None:
            results.append(GateResult(f"recall_{cls}", f">= {floor:.4f}",
                                      f"unknown class; expected one of {', '.join(challenger['per_class'])}", False))
        elif per_class["support"] == 0:
            results.append(GateResult(f"recall_{cls}", f">= {floor:.4f}", "no images of this class", False))
        else:
            results.append(_at_least(f"recall_{cls}", per_class["recall"], floor))
    margin = gates.min_margin_over_champion
    if champion is None:
        results.append(GateResult("beats_champion", f"margin >= {margin:+.4f}", "no champion", True))
    else:
        diff = challenger["macro_f1"] - champion["macro_f1"]
        results.append(GateResult("beats_champion", f"margin >= {margin:+.4f}",
                                  f"{challenger['macro_f1']:.4f} vs {champion['macro_f1']:.4f} ({diff:+.4f})",
                                  bool(diff >= margin), float(diff)))
    results.append(_at_most("ece", challenger["ece"], gates.max_ece))
    results.append(_at_most("flip_change", measured["flip_change"], gates.max_flip_change))
    results.append(_at_most("intensity_change", measured["intensity_change"], gates.max_intensity_change))
    return results


def gates_table(results: list[GateResult]) -> str:
    """``gate | threshold | value | pass/fail`` as aligned text."""
    rows = [("gate", "threshold", "value", "result")] + [
        (g.name, g.threshold, g.value, "pass" if g.passed else "FAIL") for g in results]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
