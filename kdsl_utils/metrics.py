"""Metrics of the replication (pure numpy / scikit-learn, fast).

* **Challenge metric**: weighted F1 over the pooled 48-label space, i.e. scikit-learn's
  ``f1_score(y_true, y_pred, average="weighted")`` over the whole test file (image and
  intent records together). Weights are true-label supports, so a label that is only ever
  predicted has weight 0 (it still costs the precision of nothing and the recall of the
  labels it was confused with).
* Per task: weighted F1 and macro F1 over that task's records. Macro F1 averages over the
  labels present in ``y_true`` or ``y_pred`` of those records (scikit-learn's default label
  set), so a label predicted but never true counts as an F1 of 0.
* Seeded percentile bootstrap confidence intervals (records resampled with replacement;
  pooled and per-task metrics of one resample are computed together). The F1s here are
  vectorised numpy
  re-implementations of scikit-learn's (tested equal) so that 1000 resamples take well under
  a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .data.labels import ALL_LABELS, LABEL_TO_TASK, LABELS, TASKS

POOLED = "pooled"


def _encode(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    y_true, y_pred = list(y_true), list(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items, y_pred {len(y_pred)}")
    if labels is None:
        seen = set(y_true) | set(y_pred)
        labels = [lab for lab in ALL_LABELS if lab in seen] + sorted(seen - set(ALL_LABELS))
    index = {lab: i for i, lab in enumerate(labels)}
    missing = sorted({y for y in y_true + y_pred if y not in index})
    if missing:
        raise ValueError(f"labels not in the label list: {missing[:5]}")
    return (
        np.array([index[y] for y in y_true], dtype=np.int64),
        np.array([index[y] for y in y_pred], dtype=np.int64),
        list(labels),
    )


def _per_class(t: np.ndarray, p: np.ndarray, n_labels: int, weights: np.ndarray | None = None):
    """(tp, support, predicted) per label; ``weights`` are per-record counts (bootstrap)."""
    w = np.ones(len(t)) if weights is None else weights
    support = np.bincount(t, weights=w, minlength=n_labels)
    predicted = np.bincount(p, weights=w, minlength=n_labels)
    tp = np.bincount(t[t == p], weights=w[t == p], minlength=n_labels)
    return tp, support, predicted


def _f1(tp, support, predicted):
    denom = support + predicted
    return np.divide(2 * tp, denom, out=np.zeros_like(tp, dtype=float), where=denom > 0)


def _weighted(tp, support, predicted) -> float:
    total = support.sum()
    return float((_f1(tp, support, predicted) * support).sum() / total) if total > 0 else 0.0


def _macro(tp, support, predicted) -> float:
    present = (support + predicted) > 0
    return float(_f1(tp, support, predicted)[present].mean()) if present.any() else 0.0


def weighted_f1(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """``f1_score(average="weighted")`` (the challenge metric when given the whole file)."""
    t, p, labels = _encode(y_true, y_pred)
    return _weighted(*_per_class(t, p, len(labels)))


def weighted_f1_idx(y_true: np.ndarray, y_pred: np.ndarray, n_labels: int = len(ALL_LABELS)) -> float:
    """:func:`weighted_f1` on label indices (the hot path of rule search); a prediction of
    -1 ("no label") counts as wrong."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if len(y_true) == 0:
        return 0.0
    y_pred = np.where(y_pred < 0, n_labels, y_pred)  # slot n_labels collects "no label"
    return _weighted(*_per_class(y_true, y_pred, n_labels + 1))


def labelled_only(y_true: Sequence[str | None], y_pred: Sequence[str],
                  tasks: Sequence[str] | None = None) -> tuple[list[str], list[str], list[str] | None]:
    """The records that have a gold label (None or NaN marks an unlabelled one, e.g. a
    challenge test file): an unlabelled record is predicted, never scored."""
    keep = [i for i, y in enumerate(y_true) if y is not None and not (isinstance(y, float) and y != y)]
    return ([y_true[i] for i in keep], [y_pred[i] for i in keep],
            None if tasks is None else [tasks[i] for i in keep])


def _tasks_of(y_true: Sequence[str], tasks: Sequence[str] | None) -> list[str]:
    if tasks is None:
        return [LABEL_TO_TASK[y] for y in y_true]
    if len(tasks) != len(y_true):
        raise ValueError("tasks must have one entry per record")
    return list(tasks)


def evaluate(
    y_true: Sequence[str], y_pred: Sequence[str], tasks: Sequence[str] | None = None
) -> dict[str, float]:
    """Pooled weighted F1 (``weighted_f1``) and accuracy, and per task
    ``{task}_weighted_f1``, ``{task}_macro_f1``, ``{task}_accuracy``, ``{task}_n``.

    ``tasks`` defaults to the task of each true label.
    """
    tasks = _tasks_of(y_true, tasks)
    t, p, labels = _encode(y_true, y_pred)
    out = {
        "weighted_f1": _weighted(*_per_class(t, p, len(labels))),
        "accuracy": float((t == p).mean()) if len(t) else 0.0,
        "n": float(len(t)),
    }
    tk = np.array(tasks)
    for task in TASKS:
        m = tk == task
        if not m.any():
            continue
        stats = _per_class(t[m], p[m], len(labels))
        out[f"{task}_weighted_f1"] = _weighted(*stats)
        out[f"{task}_macro_f1"] = _macro(*stats)
        out[f"{task}_accuracy"] = float((t[m] == p[m]).mean())
        out[f"{task}_n"] = float(m.sum())
    return out


def evaluate_predictions(preds, records) -> dict[str, float]:
    """:func:`evaluate` of a :class:`~kdsl_utils.models.base.Predictions` against records."""
    gold = {r.id: r.label for r in records}
    y_true = [gold[i] for i in preds.ids]
    if any(y is None for y in y_true):
        raise ValueError("records without a label cannot be evaluated")
    return evaluate(y_true, preds.pred, preds.tasks)


def bootstrap_ci(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    tasks: Sequence[str] | None = None,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """Percentile bootstrap CIs of the pooled and per-task F1s.

    Rows: ``metric, value, lo, hi, n_boot`` for ``weighted_f1`` (pooled) and each task's
    ``{task}_weighted_f1`` / ``{task}_macro_f1``. Resampling is over records (stratified by
    nothing, as the test file itself), seeded. Unlabelled records are left out; none
    labelled: an empty frame.
    """
    y_true, y_pred, tasks = labelled_only(y_true, y_pred, tasks)
    if not y_true:
        return pd.DataFrame(columns=["metric", "value", "lo", "hi", "n_boot"])
    tasks = _tasks_of(y_true, tasks)
    t, p, labels = _encode(y_true, y_pred)
    n, L = len(t), len(labels)
    point = evaluate(y_true, y_pred, tasks)
    rng = np.random.default_rng(seed)
    tk = np.array(tasks)
    names = ["weighted_f1"] + [
        f"{task}_{m}" for task in TASKS if (tk == task).any() for m in ("weighted_f1", "macro_f1")
    ]
    samples = {k: np.empty(n_boot) for k in names}
    masks = {task: tk == task for task in TASKS}
    for b in range(n_boot):
        w = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
        samples["weighted_f1"][b] = _weighted(*_per_class(t, p, L, w))
        for task, m in masks.items():
            if f"{task}_weighted_f1" in samples:
                stats = _per_class(t[m], p[m], L, w[m])
                samples[f"{task}_weighted_f1"][b] = _weighted(*stats)
                samples[f"{task}_macro_f1"][b] = _macro(*stats)
    rows = []
    for k in names:
        lo, hi = np.quantile(samples[k], [alpha / 2, 1 - alpha / 2])
        rows.append(
            {"metric": k, "value": point[k], "lo": float(lo), "hi": float(hi), "n_boot": n_boot}
        )
    return pd.DataFrame(rows)


def metric_rows(
    y_true: Sequence[str], y_pred: Sequence[str], tasks: Sequence[str] | None = None, **ids: Any
) -> list[dict[str, Any]]:
    """Tidy rows (``metrics.csv`` schema: ``experiment, variant, seed, split, task, metric,
    value``) for :func:`evaluate`'s numbers; ``ids`` fill the identifying columns.
    Unlabelled records (gold None) are left out; a split with no label gives no rows."""
    y_true, y_pred, tasks = labelled_only(y_true, y_pred, tasks)
    if not y_true:
        return []
    ev = evaluate(y_true, y_pred, tasks)
    rows = []
    for key, value in ev.items():
        task, metric = POOLED, key
        for tname in TASKS:
            if key.startswith(tname + "_"):
                task, metric = tname, key[len(tname) + 1 :]
        rows.append({**ids, "task": task, "metric": metric, "value": value})
    return rows


__all__ = [
    "LABELS",
    "POOLED",
    "bootstrap_ci",
    "evaluate",
    "evaluate_predictions",
    "metric_rows",
    "weighted_f1",
]
