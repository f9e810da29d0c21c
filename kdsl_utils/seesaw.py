"""The seesaw experiment (notebook 01; the paper's Figure 1).

Same base model, same hyper-parameters, three fine-tunes per seed — image-only,
intent-only, joint — each evaluated on the held-out split(s) of its task(s). Beside the
three mixes we score ``single_pair``: the image-only model on image records and the
intent-only model on intent records, i.e. two specialists, which has a pooled score
comparable to the joint model's.

Outputs are tidy: a predictions frame (one row per seed × mix × split × record) from
which every metric is computed, and the weight updates of each run for
:mod:`kdsl_utils.interference`.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .config import Profile
from .data.records import Record
from .interference import interference_table
from .metrics import metric_rows
from .models.base import MIXES, Predictions, mix_tasks, select_mix
from .models.registry import make_backend


def predictions_frame(preds: Predictions, **keys) -> pd.DataFrame:
    """One row per record: ``keys`` columns, id, task, label (gold, None if unlabelled),
    pred, p_pred (its probability), p_label (probability of the gold label, NaN if none)."""
    gold_idx = preds.gold_idx
    rows = np.arange(len(preds.ids))
    p_label = np.where(gold_idx >= 0, preds.proba[rows, np.maximum(gold_idx, 0)], np.nan)
    return pd.DataFrame({**{k: [v] * len(rows) for k, v in keys.items()}, "id": preds.ids,
                         "task": preds.tasks, "label": preds.gold, "pred": preds.pred,
                         "p_pred": preds.proba.max(axis=1),
                         "p_label": p_label})


@dataclass
class SeesawRun:
    predictions: pd.DataFrame  # seed, variant, split, id, task, label, pred, p_pred, p_label
    fits: pd.DataFrame  # seed, variant, n_train, fit_seconds, predict_seconds, final_loss
    deltas: dict[tuple[int, str], Mapping[str, np.ndarray]] = field(default_factory=dict)


def release(backend) -> None:
    """Drop a fitted backend's model and free its memory (garbage collection for peft's
    reference cycles, then the CUDA cache), so that the next fit never finds a second large
    model alive: at 7B two would not fit on one GPU."""
    backend.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_seesaw(cfg: Profile, train: Sequence[Record], tests: Mapping[str, Sequence[Record]], *,
               seeds: Sequence[int], mixes: Sequence[str] = MIXES, work_dir: Path | None = None,
               backend_kwargs: Mapping | None = None) -> SeesawRun:
    """Fit every mix for every seed on ``train`` and predict the matching test records.

    One model at a time: each fitted backend is released (:func:`release`) once its
    predictions and weight update are taken."""
    preds, fits, deltas = [], [], {}
    jobs = [(s, m) for s in seeds for m in mixes]
    for seed, mix in tqdm(jobs, desc="seesaw fits", unit="fit"):
        backend = make_backend(cfg, **dict(backend_kwargs or {}))
        t0 = time.time()
        # The full list: the backend selects the mix itself, and fits its mix-independent
        # parts (mini's featurizer) on all of it, so every mix shares one input space.
        log = backend.fit(train, mix=mix, seed=seed,
                          out_dir=None if work_dir is None else Path(work_dir) / f"seed{seed}-{mix}")
        t_fit = time.time() - t0
        t0 = time.time()
        for split, recs in tests.items():
            recs = [r for r in recs if r.task in mix_tasks(mix)]
            preds.append(predictions_frame(backend.predict_proba(recs),
                                           seed=seed, variant=mix, split=split))
        fits.append({"seed": seed, "variant": mix, "n_train": len(select_mix(train, mix)),
                     "fit_seconds": round(t_fit, 2), "predict_seconds": round(time.time() - t0, 2),
                     "final_loss": log.final_loss, "steps": log.steps})
        deltas[(seed, mix)] = backend.update_delta()
        release(backend)
        del backend
    pred = pd.concat(preds, ignore_index=True)
    pair = pred[((pred.variant == "image") & (pred.task == "image"))
                | ((pred.variant == "intent") & (pred.task == "intent"))].assign(variant="single_pair")
    if set(mixes) >= {"image", "intent"}:
        pred = pd.concat([pred, pair], ignore_index=True)
    return SeesawRun(predictions=pred, fits=pd.DataFrame(fits), deltas=deltas)


def metrics_from_predictions(pred: pd.DataFrame, experiment: str) -> pd.DataFrame:
    """Tidy metric rows for every (variant, seed, split) group of a predictions frame.

    Single-task variants get only their task's rows (their ``pooled`` row equals the task's
    and is dropped to avoid reading it as a pooled score)."""
    rows = []
    for (variant, seed, split), g in pred.groupby(["variant", "seed", "split"], sort=True):
        r = metric_rows(list(g["label"]), list(g["pred"]), list(g["task"]), experiment=experiment,
                        variant=variant, seed=int(seed), split=split)
        if g["task"].nunique() == 1:
            r = [x for x in r if x["task"] != "pooled"]
        rows += r
    return pd.DataFrame(rows)


def interference_over_seeds(deltas: Mapping[tuple[int, str], Mapping[str, np.ndarray]],
                            seeds: Sequence[int]) -> pd.DataFrame:
    """:func:`kdsl_utils.interference.interference_table` of every seed's image-only,
    intent-only and joint updates (``SeesawRun.deltas``), stacked with a ``seed`` column."""
    tables = [interference_table(deltas[(s, "image")], deltas[(s, "intent")],
                                 deltas[(s, "joint")]).assign(seed=s) for s in seeds]
    return pd.concat(tables, ignore_index=True)
