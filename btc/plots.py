"""Plots a person would rather look at than read: confusion matrix, curves, ROC, reliability, Grad-CAM grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

from btc.metrics import reliability_table, roc_curves

# Figures are built as Figure objects, not through pyplot: no GUI backend is chosen (servers and
# CI have no display), no global figure state is kept, and importing this module changes nothing.


def _subplots(*grid: int, **kw):
    fig = Figure(figsize=kw.pop("figsize"))
    return fig, fig.subplots(*grid, **kw)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def confusion_matrix_plot(cm: np.ndarray, classes: tuple[str, ...], path: Path, title: str = "Confusion matrix") -> Path:
    cm = np.asarray(cm)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    labels = np.array([[f"{n}\n{s:.0%}" for n, s in zip(r1, r2)] for r1, r2 in zip(cm, share)])
    fig, ax = _subplots(figsize=(5.5, 4.5))
    sns.heatmap(share, annot=labels, fmt="", cmap="Blues", vmin=0, vmax=1, xticklabels=classes, yticklabels=classes,
                cbar_kws={"label": "share of true class"}, ax=ax)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def training_curves_plot(history: list[dict], path: Path) -> Path:
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = _subplots(1, 2, figsize=(10, 3.8))
    a.plot(epochs, [h["train_loss"] for h in history], label="train")
    a.plot(epochs, [h["val_loss"] for h in history], label="validation")
    a.set(xlabel="epoch", ylabel="loss", title="Loss")
    a.legend()
    series = {"train accuracy": "train_accuracy", "validation accuracy": "val_accuracy",
              "validation macro-F1": "val_macro_f1"}
    for label, key in series.items():
        b.plot(epochs, [h[key] for h in history], label=label)
    lowest = min(h[key] for h in history for key in series.values())  # every plotted point stays in view
    b.set(xlabel="epoch", ylim=(max(0, lowest - 0.05), 1.0), title="Accuracy")
    b.legend()
    return _save(fig, path)


def roc_plot(y_true: np.ndarray, probs: np.ndarray, classes: tuple[str, ...], path: Path) -> Path:
    fig, ax = _subplots(figsize=(5, 4.5))
    for cls, (fpr, tpr) in roc_curves(y_true, probs, classes).items():
        ax.plot(fpr, tpr, label=cls)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, one vs rest")
    ax.legend(loc="lower right")
    return _save(fig, path)


def reliability_plot(y_true: np.ndarray, probs_before: np.ndarray, probs_after: np.ndarray, path: Path, n_bins: int = 15) -> Path:
    fig, ax = _subplots(figsize=(5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    for name, probs in (("before temperature", probs_before), ("after temperature", probs_after)):
        rows = [r for r in reliability_table(probs, y_true, n_bins) if r["count"]]
        ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o-", label=name)
    ax.set(xlabel="confidence", ylabel="accuracy", title="Reliability diagram", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    return _save(fig, path)


def gradcam_grid_plot(overlays: dict[str, list[tuple[np.ndarray, str]]], path: Path) -> Path:
    """Rows = true class, columns = examples; each title is the prediction."""
    n_rows = len(overlays)
    n_cols = max((len(v) for v in overlays.values()), default=1) or 1
    fig, axes = _subplots(n_rows, n_cols, figsize=(2.2 * n_cols, 2.3 * n_rows), squeeze=False)
    for r, (cls, items) in enumerate(overlays.items()):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(items):
                ax.imshow(items[c][0])
                ax.set_title(items[c][1], fontsize=8)
        axes[r][0].text(-0.1, 0.5, cls, transform=axes[r][0].transAxes, rotation=90, va="center", ha="right")
    fig.suptitle("LayerCAM (Grad-CAM family) by true class (title: prediction)")
    return _save(fig, path)
