"""Evaluation artifacts: the JSON report plus every plot, written into one folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from btc import plots
from btc.evaluate import evaluate_predictor, write_report
from btc.explain import gradcam, overlay
from btc.labels import CLASSES
from btc.predict import Predictor


def gradcam_examples(predictor: Predictor, rows: pd.DataFrame, per_class: int, seed: int = 0) -> dict:
    """Up to ``per_class`` Grad-CAM overlays per true class, titled with the prediction."""
    out: dict[str, list] = {}
    for cls in CLASSES:
        pick = rows[rows["label"] == cls]
        pick = pick.sample(min(per_class, len(pick)), random_state=seed) if len(pick) else pick
        if pick.empty:
            continue
        arrays = np.stack([predictor.to_array(p) for p in pick["path"]])
        heat, pred = gradcam(predictor.model, torch.from_numpy(arrays))
        out[cls] = [(overlay(a, h), predictor.classes[int(k)]) for a, h, k in zip(arrays, heat, pred)]
    return out


def evaluation_artifacts(predictor: Predictor, rows: pd.DataFrame, out_dir: Path, *, history: list[dict] | None = None,
                         n_bins: int = 15, gradcam_per_class: int = 4, progress: bool = False) -> dict:
    """Evaluate and write ``metrics.json`` and the plots into ``out_dir``; returns the report with their paths."""
    out_dir = Path(out_dir)
    report = evaluate_predictor(predictor, rows, n_bins=n_bins, progress=progress)
    y = np.array([CLASSES.index(p["label"]) for p in report["predictions"]])
    after = np.array([p["probabilities"] for p in report["predictions"]])
    before = torch.softmax(torch.log(torch.from_numpy(after).clamp_min(1e-12)) * report["temperature"], 1).numpy()
    files = {
        "confusion_matrix": plots.confusion_matrix_plot(report["confusion_matrix"], CLASSES, out_dir / "confusion_matrix.png"),
        "roc": plots.roc_plot(y, after, CLASSES, out_dir / "roc_curves.png"),
        "reliability": plots.reliability_plot(y, before, after, out_dir / "reliability.png", n_bins),
    }
    if history:
        files["training_curves"] = plots.training_curves_plot(history, out_dir / "training_curves.png")
    if gradcam_per_class:
        files["gradcam_grid"] = plots.gradcam_grid_plot(gradcam_examples(predictor, rows, gradcam_per_class),
                                                        out_dir / "gradcam_grid.png")
    for optional in ("training_curves", "gradcam_grid"):  # an earlier evaluation's, if not made this time:
        if optional not in files:  # one folder never mixes two evaluations
            (out_dir / f"{optional}.png").unlink(missing_ok=True)
    report["artifacts"] = {k: str(v) for k, v in files.items()}
    report["artifacts"]["metrics"] = str(write_report(report, out_dir / "metrics.json"))
    return report


def load_history(model_path: Path) -> list[dict] | None:
    path = Path(model_path).parent / "history.json"
    return json.loads(path.read_text()) if path.is_file() else None
