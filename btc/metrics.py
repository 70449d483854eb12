"""Classification metrics, calibration error and temperature scaling.

Precision, recall and F1 come from the confusion matrix (zero where undefined, as
scikit-learn's ``zero_division=0``); macro averages run over the classes that occur in the
labels or the predictions, as scikit-learn's do, so a small test set without one class is not
marked down for it. ROC-AUC is scikit-learn's one-vs-rest.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix, rows = true class, columns = predicted class."""
    return np.bincount(np.asarray(y_true) * n_classes + np.asarray(y_pred), minlength=n_classes**2).reshape(n_classes, n_classes)


def _prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tp = np.diag(cm).astype(float)
    predicted, actual = cm.sum(0), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1


def _present(cm: np.ndarray) -> np.ndarray:
    """Classes that occur as a label or a prediction (scikit-learn's macro-average set)."""
    return (cm.sum(0) + cm.sum(1)) > 0


def _macro(values: np.ndarray, present: np.ndarray) -> float:
    return float(values[present].mean()) if present.any() else 0.0


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of the per-class F1 scores over the classes present."""
    cm = confusion(y_true, y_pred, n_classes)
    return _macro(_prf(cm)[2], _present(cm))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """ECE: confidence-vs-accuracy gap over equal-width confidence bins, weighted by bin size."""
    conf, correct = probs.max(1), (probs.argmax(1) == y_true).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def reliability_table(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> list[dict]:
    """Per-bin confidence, accuracy and count, for the reliability diagram."""
    conf, correct = probs.max(1), (probs.argmax(1) == y_true).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    return [{"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int((bins == b).sum()),
             "confidence": float(conf[bins == b].mean()) if (bins == b).any() else None,
             "accuracy": float(correct[bins == b].mean()) if (bins == b).any() else None} for b in range(n_bins)]


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature minimising validation NLL (Guo et al., 2017); 1.0 when it cannot be fitted.

    When every validation image is classified right, the NLL keeps falling as the temperature
    goes to 0: there is no minimum, only wherever the optimiser stops, so 1.0 is kept.
    """
    if len(y_true) < 2 or (np.asarray(logits).argmax(1) == np.asarray(y_true)).all():
        return 1.0
    z, y = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(y_true, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return t if np.isfinite(t) and 0.05 < t < 20 else 1.0


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: tuple[str, ...], n_bins: int = 15) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro averages, OvR ROC-AUC and ECE."""
    y_true = np.asarray(y_true)
    n = len(classes)
    y_pred = probs.argmax(1)
    cm = confusion(y_true, y_pred, n)
    precision, recall, f1 = _prf(cm)
    present = _present(cm)
    per_class = {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                     "support": int(cm[i].sum())} for i, c in enumerate(classes)}
    aucs = {}
    for i, c in enumerate(classes):
        positives = y_true == i
        if positives.any() and not positives.all():
            aucs[c] = float(roc_auc_score(positives, probs[:, i]))
            per_class[c]["roc_auc"] = aucs[c]
    return {
        "n_images": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else 0.0,
        "macro_precision": _macro(precision, present),
        "macro_recall": _macro(recall, present),
        "macro_f1": _macro(f1, present),
        "macro_roc_auc": float(np.mean(list(aucs.values()))) if aucs else None,
        "ece": expected_calibration_error(probs, y_true, n_bins) if len(y_true) else 0.0,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def roc_curves(y_true: np.ndarray, probs: np.ndarray, classes: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One-vs-rest ROC curve (fpr, tpr) per class present with both outcomes."""
    out = {}
    for i, c in enumerate(classes):
        positives = np.asarray(y_true) == i
        if positives.any() and not positives.all():
            fpr, tpr, _ = roc_curve(positives, probs[:, i])
            out[c] = (fpr, tpr)
    return out
