"""Accuracy, confusion matrix and precision/recall/F1 against hand counts
(and scikit-learn where installed)."""

from __future__ import annotations

import numpy as np
import pytest

from convkern.app import metrics


def test_confusion_and_report_by_hand():
    t = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    p = np.array([0, 1, 0, 1, 2, 2, 2, 0, 2])
    cm = metrics.confusion_matrix(t, p, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    rep = metrics.report(cm, ["a", "b", "c"])
    assert rep["accuracy"] == pytest.approx(6 / 9)
    a = rep["per_class"]["a"]
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == pytest.approx(2 / 3) and a["support"] == 3
    c = rep["per_class"]["c"]
    assert c["precision"] == pytest.approx(3 / 4) and c["recall"] == pytest.approx(3 / 4)
    b = rep["per_class"]["b"]
    assert b["f1"] == pytest.approx(2 * 0.5 * 0.5 / 1.0)
    assert rep["macro"]["recall"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    assert metrics.accuracy(t, p) == pytest.approx(6 / 9)
    assert "macro" in metrics.format_report(rep)


def test_never_predicted_class_scores_zero_not_nan():
    rep = metrics.report(metrics.confusion_matrix([0, 1, 1], [0, 0, 0], 3))
    assert rep["per_class"]["1"]["precision"] == 0.0 and rep["per_class"]["2"]["f1"] == 0.0
    assert all(np.isfinite(v) for v in rep["macro"].values())


def test_against_scikit_learn(rng):
    sk = pytest.importorskip("sklearn.metrics", reason="scikit-learn is in the train extra")
    t, p = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    cm = metrics.confusion_matrix(t, p, 5)
    np.testing.assert_array_equal(cm, sk.confusion_matrix(t, p, labels=range(5)))
    rep = metrics.report(cm)
    pr, rc, f1, _ = sk.precision_recall_fscore_support(t, p, labels=range(5), zero_division=0)
    np.testing.assert_allclose([rep["per_class"][str(i)]["f1"] for i in range(5)], f1)
    np.testing.assert_allclose(rep["macro"]["precision"], pr.mean())
    np.testing.assert_allclose(rep["macro"]["recall"], rc.mean())


def test_bad_labels():
    with pytest.raises(ValueError, match=r"y_pred has labels outside \[0, 2\)"):
        metrics.confusion_matrix([0, 1], [0, 2], 2)
    with pytest.raises(ValueError, match="differ in length"):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="integer class labels"):
        metrics.confusion_matrix([0.5], [0], 2)
