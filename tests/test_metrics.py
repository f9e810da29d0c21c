"""Metrics against hand-computed values and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from kdsl_utils.data.labels import ALL_LABELS, IMAGE_LABELS, INTENT_LABELS, LABEL_TO_TASK
from kdsl_utils.metrics import (
    bootstrap_ci,
    evaluate,
    evaluate_predictions,
    metric_rows,
    weighted_f1,
)
from kdsl_utils.models.base import Predictions

A, B, C, D = IMAGE_LABELS[:4]
X, Y = INTENT_LABELS[:2]
# image: A: tp1 s2 p2 -> F1 1/2; B: tp1 s1 p2 -> 2/3; C: tp0 s1 p0 -> 0
# intent: X: tp1 s1 p2 -> 2/3; Y: 0
TRUE = [A, A, B, C, X, Y]
PRED = [A, B, B, A, X, X]


def test_hand_computed_values():
    ev = evaluate(TRUE, PRED)
    assert ev["image_weighted_f1"] == pytest.approx((2 * 0.5 + 2 / 3 + 0) / 4)  # 5/12
    assert ev["image_macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)  # 7/18
    assert ev["intent_weighted_f1"] == pytest.approx(1 / 3)
    assert ev["intent_macro_f1"] == pytest.approx(1 / 3)
    assert ev["weighted_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 6)  # 7/18, pooled 48 labels
    assert ev["accuracy"] == pytest.approx(3 / 6)
    assert ev["image_n"] == 4 and ev["intent_n"] == 2
    assert weighted_f1(TRUE, PRED) == pytest.approx(7 / 18)


def test_predicted_only_label_weight_zero_but_counts_in_macro():
    assert weighted_f1([A, A], [A, D]) == pytest.approx(2 / 3)
    assert evaluate([A, A], [A, D])["image_macro_f1"] == pytest.approx(1 / 3)


def test_equals_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    for n in (5, 60, 300):
        t = [ALL_LABELS[i] for i in rng.integers(0, 48, n)]
        # predictions mostly within the true label's task, sometimes right
        p = [
            y
            if rng.random() < 0.4
            else (IMAGE_LABELS if LABEL_TO_TASK[y] == "image" else INTENT_LABELS)[
                rng.integers(0, 5)
            ]
            for y in t
        ]
        assert weighted_f1(t, p) == pytest.approx(f1_score(t, p, average="weighted"), abs=1e-12)
        ev = evaluate(t, p)
        assert ev["accuracy"] == pytest.approx(accuracy_score(t, p))
        for task in ("image", "intent"):
            m = [LABEL_TO_TASK[y] == task for y in t]
            tt = [y for y, k in zip(t, m) if k]
            pp = [y for y, k in zip(p, m) if k]
            if tt:
                assert ev[f"{task}_weighted_f1"] == pytest.approx(
                    f1_score(tt, pp, average="weighted")
                )
                assert ev[f"{task}_macro_f1"] == pytest.approx(f1_score(tt, pp, average="macro"))


def test_bootstrap_seeded_and_sane():
    rng = np.random.default_rng(1)
    t = [ALL_LABELS[i] for i in rng.integers(0, 48, 150)]
    p = [y if rng.random() < 0.6 else ALL_LABELS[0] for y in t]
    a = bootstrap_ci(t, p, n_boot=300, seed=3)
    b = bootstrap_ci(t, p, n_boot=300, seed=3)
    assert a.equals(b)
    assert set(a["metric"]) == {
        "weighted_f1",
        "image_weighted_f1",
        "image_macro_f1",
        "intent_weighted_f1",
        "intent_macro_f1",
    }
    assert ((a["lo"] <= a["value"] + 1e-9) & (a["value"] <= a["hi"] + 1e-9)).all()
    assert (a["hi"] - a["lo"] > 0.01).all()
    perfect = bootstrap_ci(t, t, n_boot=50, seed=0)
    assert np.allclose(perfect[["value", "lo", "hi"]].to_numpy(), 1.0)


def test_bootstrap_weights_equal_explicit_resample():
    """The weighted per-class counts used by the bootstrap equal metrics of a real resample."""
    from kdsl_utils.metrics import _encode, _per_class, _weighted

    rng = np.random.default_rng(2)
    t = [ALL_LABELS[i] for i in rng.integers(0, 48, 40)]
    p = [ALL_LABELS[i] for i in rng.integers(0, 48, 40)]
    ti, pi, labels = _encode(t, p)
    idx = rng.integers(0, 40, 40)
    w = np.bincount(idx, minlength=40).astype(float)
    got = _weighted(*_per_class(ti, pi, len(labels), w))
    assert got == pytest.approx(
        f1_score([t[i] for i in idx], [p[i] for i in idx], average="weighted")
    )


def test_evaluate_predictions_and_rows():
    from types import SimpleNamespace

    recs = [SimpleNamespace(id=str(i), label=y) for i, y in enumerate(TRUE)]
    proba = np.zeros((6, 48))
    for i, y in enumerate(PRED):
        proba[i, ALL_LABELS.index(y)] = 1.0
    preds = Predictions(
        ids=[r.id for r in recs], tasks=[LABEL_TO_TASK[y] for y in TRUE], proba=proba
    )
    assert evaluate_predictions(preds, recs)["weighted_f1"] == pytest.approx(7 / 18)
    rows = metric_rows(TRUE, PRED, experiment="x", variant="v", seed=0, split="test1")
    got = {(r["task"], r["metric"]): r["value"] for r in rows}
    assert got[("pooled", "weighted_f1")] == pytest.approx(7 / 18)
    assert got[("intent", "macro_f1")] == pytest.approx(1 / 3)
    assert all(r["experiment"] == "x" and r["split"] == "test1" for r in rows)
