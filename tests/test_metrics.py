"""Metrics equal scikit-learn's on the same predictions; calibration behaves."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, roc_auc_score

from btc.labels import CLASSES
from btc.metrics import classification_metrics, expected_calibration_error, fit_temperature, macro_f1, softmax


@pytest.fixture
def predictions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 4)) + 2.5 * np.eye(4)[y] * rng.uniform(0, 1, (300, 1))
    return y, softmax(logits)


def test_metrics_equal_sklearn(predictions):
    y, probs = predictions
    pred = probs.argmax(1)
    m = classification_metrics(y, probs, CLASSES)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    for i, c in enumerate(CLASSES):
        pc = m["per_class"][c]
        assert (pc["precision"], pc["recall"], pc["f1"], pc["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
        assert pc["roc_auc"] == pytest.approx(roc_auc_score(y == i, probs[:, i]))
    assert m["macro_roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["n_images"] == 300


def test_class_never_predicted_has_zero_precision():
    y = np.array([0, 1, 2, 3, 3])
    probs = np.eye(4)[[0, 1, 2, 2, 2]]
    m = classification_metrics(y, probs, CLASSES)
    assert m["per_class"]["pituitary"]["precision"] == 0.0
    assert m["macro_f1"] == pytest.approx(f1_score(y, probs.argmax(1), average="macro", zero_division=0))


@pytest.mark.parametrize("y, pred", [
    ([0, 1, 2, 0], [0, 1, 2, 0]),  # pituitary neither in the labels nor predicted
    ([0, 1, 2, 0], [0, 1, 3, 0]),  # pituitary only predicted
    ([0, 0, 0, 0], [0, 0, 0, 0]),  # one class only
])
def test_macro_averages_equal_sklearn_when_a_class_is_absent(y, pred):
    y, pred = np.array(y), np.array(pred)
    m = classification_metrics(y, np.eye(4)[pred], CLASSES)
    p, r, f, _ = precision_recall_fscore_support(y, pred, average="macro", zero_division=0)
    assert (m["macro_precision"], m["macro_recall"], m["macro_f1"]) == pytest.approx((p, r, f))
    assert macro_f1(y, pred, 4) == pytest.approx(f)


def test_ece_zero_when_calibrated_and_temperature_reduces_it():
    y = np.zeros(100, dtype=int)
    assert expected_calibration_error(np.tile([1.0, 0, 0, 0], (100, 1)), y) == pytest.approx(0.0)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 2000)
    logits = rng.normal(size=(2000, 4)) + 1.5 * np.eye(4)[y]
    # With unit Gaussian noise the Bayes posterior's logits are 1.5 * logits, so scaling by 4
    # is overconfident and the fitted temperature should be near 4 / 1.5.
    overconfident = logits * 4
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(4 / 1.5, rel=0.15)
    assert expected_calibration_error(softmax(overconfident, t), y) < expected_calibration_error(softmax(overconfident), y) / 2
    # Every validation image right: the NLL has no minimum (it falls as T -> 0); no temperature is made up.
    separable = rng.normal(size=(60, 4))
    right = rng.integers(0, 4, 60)
    separable[np.arange(60), right] += 6
    assert fit_temperature(separable, right) == 1.0 and fit_temperature(2 * separable, right) == 1.0
