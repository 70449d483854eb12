"""Evaluating a model on a set of images: metrics (raw and clean subset), calibration, plots.

The clean subset drops test images that have a near duplicate in training
(``near_dup_in_train``), so leakage cannot flatter the number that matters. Where the split
gives each test image its distance to the nearest training image (``train_distance``),
accuracy is also reported per distance band: a perceptual hash cannot tell every adjacent
slice of one patient from another patient's slice, so this shows how much of the accuracy
comes from images close to ones the model was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from btc.data.cache import decode_rows
from btc.labels import CLASSES
from btc.metrics import classification_metrics, expected_calibration_error, softmax
from btc.predict import Predictor

#: Bands of ``train_distance`` (bits of the 256-bit pHash) for the accuracy-by-distance table.
TRAIN_DISTANCE_BANDS = ((0, 40), (41, 48), (49, 56), (57, 64), (65, 256))


def rows_to_evaluate(table: pd.DataFrame, split: str | None = "test") -> pd.DataFrame:
    """Readable rows of a manifest or split to evaluate (``split`` None: all readable rows a split did not
    exclude). A manifest or folder has no train/val split: with a Testing folder its test images are
    the rows, whatever ``split`` says (its Training images are what a model learns from); without
    one, every row."""
    rows = table[table["readable"]] if "readable" in table else table
    if "split" in rows:  # excluded by the split (exact copies, label conflicts): never evaluated
        rows = rows[rows["split"] != "excluded"]
    if "split" in rows:
        if split is not None:
            rows = rows[rows["split"] == split]
    elif "source_split" in rows and (rows["source_split"] == "test").any():
        rows = rows[rows["source_split"] == "test"]  # a folder or manifest: its test images, whatever is asked
    if rows.empty:
        raise ValueError(f"no readable images to evaluate (split={split!r}); check the data folder or manifest")
    unknown = set(rows["label"]) - set(CLASSES)
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not classes; expected one of {', '.join(CLASSES)}")
    return rows.sort_values("path")


def predict_rows(predictor: Predictor, rows: pd.DataFrame, progress: bool = False) -> np.ndarray:
    """Uncalibrated logits-equivalent: log-probabilities at temperature 1 for ``rows``."""
    images = decode_rows(rows, predictor.image_size, progress=progress)
    return predictor.predict_proba(list(images), calibrated=False)


def _metrics(probs_raw: np.ndarray, y: np.ndarray, temperature: float, n_bins: int) -> dict:
    # Recover logits up to a constant from temperature-1 probabilities, then rescale.
    logits = np.log(np.clip(probs_raw, 1e-12, 1))
    calibrated = softmax(logits, temperature)
    out = classification_metrics(y, calibrated, CLASSES, n_bins)
    out["ece_before_temperature"] = expected_calibration_error(probs_raw, y, n_bins) if len(y) else 0.0
    return out


def evaluate_predictor(predictor: Predictor, rows: pd.DataFrame, *, n_bins: int = 15, progress: bool = False) -> dict:
    """Metrics of ``predictor`` on ``rows``, with the clean subset and the predictions.

    Returns:
        A JSON-ready dict: ``n_images, accuracy, macro_f1, ece, ece_before_temperature,
        per_class, macro_roc_auc, confusion_matrix, temperature, clean{...}, model`` and
        ``predictions`` (path, label, predicted, probabilities) for plots and audits.
    """
    probs_raw = predict_rows(predictor, rows, progress)
    y = rows["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    t = predictor.spec.temperature
    report = _metrics(probs_raw, y, t, n_bins)
    report["temperature"] = t
    report["model"] = {"name": predictor.name, "version": predictor.version}
    if "near_dup_in_train" in rows:
        near = rows["near_dup_in_train"].to_numpy(bool)
        # A split's own train and val images (evaluated with split "train", "val" or all) are what the
        # model learnt from or was chosen on: never clean, though no flag marks them.
        trained_on = rows["split"].isin(["train", "val"]).to_numpy() if "split" in rows else np.zeros(len(rows), bool)
        clean = ~near & ~trained_on
        report["clean"] = _metrics(probs_raw[clean], y[clean], t, n_bins) if clean.any() else None
        report["n_near_duplicates_of_train"] = int((near & ~trained_on).sum())
        report["n_train_val_images"] = int(trained_on.sum())
    else:  # a folder or manifest: nothing says which images resemble the model's training data
        report["clean"] = report["n_near_duplicates_of_train"] = report["n_train_val_images"] = None
    if "train_distance" in rows:
        correct = probs_raw.argmax(1) == y
        report["by_train_distance"] = accuracy_by_band(rows["train_distance"], correct)
    calibrated = softmax(np.log(np.clip(probs_raw, 1e-12, 1)), t)
    report["predictions"] = [
        {"path": p, "label": lab, "predicted": CLASSES[int(q.argmax())], "probabilities": [float(v) for v in q]}
        for p, lab, q in zip(rows["path"], rows["label"], calibrated)
    ]
    return report


def accuracy_by_band(distance: pd.Series, correct: np.ndarray, bands=TRAIN_DISTANCE_BANDS) -> list[dict]:
    """Accuracy of the images whose ``distance`` lies in each band (empty bands and missing distances left out)."""
    d = pd.to_numeric(distance, errors="coerce").to_numpy(dtype=float)
    out = []
    for lo, hi in bands:
        inside = (d >= lo) & (d <= hi)
        if inside.any():
            out.append({"bits": f"{lo}-{hi}", "n_images": int(inside.sum()), "accuracy": float(correct[inside].mean())})
    return out


def format_bands(bands: list[dict]) -> str:
    """``41-48: 0.989 (n=175), ...``: the accuracy-by-distance table on one line."""
    return ", ".join(f"{b['bits']}: {b['accuracy']:.3f} (n={b['n_images']})" for b in bands)


def write_report(report: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path


def summary_lines(report: dict) -> list[str]:
    """A few lines a person reads in a terminal."""
    lines = [f"images {report['n_images']}  accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  "
             f"ECE {report['ece_before_temperature']:.4f} -> {report['ece']:.4f} (T={report['temperature']:.3f})"]
    not_clean = (report.get("n_near_duplicates_of_train") or 0) + (report.get("n_train_val_images") or 0)
    if report.get("clean") and not_clean:
        c = report["clean"]
        lines.append(f"clean subset {c['n_images']}  accuracy {c['accuracy']:.4f}  macro-F1 {c['macro_f1']:.4f}  ECE {c['ece']:.4f}")
    elif not_clean:  # every image is a training or validation image or has a near copy among them
        lines.append(f"clean subset empty: all {report['n_images']} images are the model's training or validation "
                     "images or near duplicates of them")
    elif report.get("n_near_duplicates_of_train") is None:
        lines.append("clean subset unknown: these images carry no near-duplicate flags against the model's training "
                     "data (evaluate the run's split.parquet, or pass --against SPLIT for a folder)")
    if report.get("by_train_distance"):
        lines.append(f"accuracy by bits to the nearest training image  {format_bands(report['by_train_distance'])}")
    for cls, m in report["per_class"].items():
        lines.append(f"  {cls:<11} precision {m['precision']:.3f}  recall {m['recall']:.3f}  f1 {m['f1']:.3f}  n={m['support']}")
    return lines
