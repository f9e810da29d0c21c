"""The seesaw experiment (notebook 01; the paper's Figure 1).

Same base model, same hyper-parameters, three fine-tunes per seed — image-only,
intent-only, joint — each evaluated on the held-out split(s) of its task(s). Beside the
three mixes we score ``single_pair``: the image-only model on image records and the
intent-only model on intent records, i.e. two specialists, which has a pooled score
comparable to the joint model's.

Two training schedules (:mod:`kdsl_utils.seesaw_files`):

* ``epochs`` — every mix trains the profile's epochs (the paper's protocol). The mixes then
  take different numbers of optimizer steps (mini, real MIRE: image 16 × 30 = 480, intent
  7 × 30 = 210, joint 22 × 30 = 660), so the joint run also gets more updates of the
  shared weights;
* ``steps`` — the control: every mix trains for the same number of optimizer steps,
  :func:`step_budget` (the joint run's count under ``epochs``; why there).

Outputs are tidy: a predictions frame (one row per seed × schedule × mix × split × record)
from which every metric is computed, a fits frame (one row per run: the steps it took),
and the interference table of each seed and schedule (:mod:`kdsl_utils.interference`),
computed as each seed's runs end (one model at a time: only one seed's weight updates are
ever held; side by side on the CPU: all seeds', see :func:`run_seesaw`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .config import Profile
from .data.records import Record
from .interference import interference_table
from .metrics import metric_rows
from .models.base import MIXES, Predictions, mix_tasks, select_mix
from .models.registry import make_backend, release
from .results import atomic_path
from .seesaw_files import (EPOCHS, FITS_FILE, INTERFERENCE_FILE, PREDICTIONS_FILE, SCHEDULES,
                           STEPS, variant_name)
from .workers import prestart, run_jobs


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
    predictions: pd.DataFrame  # seed, schedule, variant, split, id, task, label, pred, p_pred, ...
    fits: pd.DataFrame  # seed, schedule, variant, n_train, steps, budget, epochs, reused, ...
    interference: pd.DataFrame  # seed, schedule, layer, inputs, statistics (interference_table)
    budgets: dict[int, int]  # seed -> the step budget of its ``steps`` schedule


def step_budget(epoch_steps: Mapping[str, int]) -> int:
    """The optimizer steps every mix trains for under ``steps``, from the steps each mix took
    under ``epochs``: the joint run's count (without a joint run, the largest).

    Why the joint run's count: the control asks whether joint training's effect comes from
    the joint *data* or from the extra *updates* the joint run gives the shared weights.
    Raising the single-task runs to the joint run's count removes that difference and leaves
    the joint run — the challenge's baseline recipe, which notebooks 03 and 04 compare
    against — exactly as it was, so it is not refit (at 7B, one fine-tune fewer per seed).
    Lowering the joint run to a single-task count, or moving all three to the mean, would
    change that recipe and cut its epochs below the profile's. The price, to read the
    results with: under ``steps`` the single-task runs pass over their data more often than
    the joint run does (mini, real MIRE: image ≈ 41, intent ≈ 94 epochs against joint's 30),
    so a single-task run that overfits its small data shows up as a joint "gain"."""
    if not epoch_steps:
        raise ValueError("no epoch-schedule runs to take the step budget from")
    return int(epoch_steps["joint"] if "joint" in epoch_steps else max(epoch_steps.values()))


@dataclass
class _Fit:
    """One finished run: its prediction frames, fits row, weight update and input blocks."""

    frames: list[pd.DataFrame]
    row: dict
    delta: Mapping
    inputs: Mapping[str, tuple[str, ...]]

    def as_schedule(self, schedule: str, budget: int) -> _Fit:
        """The same run listed under another schedule (its steps already equal ``budget``)."""
        return _Fit([f.assign(schedule=schedule) for f in self.frames],
                    {**self.row, "schedule": schedule, "budget": budget, "reused": True},
                    self.delta, self.inputs)


def _fit_and_predict(cfg: Profile, train: Sequence[Record], tests: Mapping[str, Sequence[Record]],
                     *, mix: str, seed: int, schedule: str, steps: int | None,
                     work_dir: Path | None, backend_kwargs: Mapping | None) -> _Fit:
    """Fit one mix (``steps`` None: the epochs schedule), predict its tasks' test records,
    take its weight update, and release the model before returning."""
    backend = make_backend(cfg, **dict(backend_kwargs or {}))
    out_dir = None
    if work_dir is not None:
        out_dir = Path(work_dir) / f"seed{seed}-{mix}{'' if steps is None else f'-steps{steps}'}"
    t0 = time.time()
    # The full list: the backend selects the mix itself, and fits its mix-independent
    # parts (mini's featurizer) on all of it, so every mix shares one input space.
    log = backend.fit(train, mix=mix, seed=seed, out_dir=out_dir, steps=steps)
    t_fit = time.time() - t0
    t0 = time.time()
    frames = [predictions_frame(backend.predict_proba([r for r in recs
                                                       if r.task in mix_tasks(mix)]),
                                seed=seed, schedule=schedule, variant=mix, split=split)
              for split, recs in tests.items()]
    row = {"seed": seed, "schedule": schedule, "variant": mix,
           "n_train": len(select_mix(train, mix)), "steps": log.steps,
           "budget": steps, "epochs": round(float(log.extra.get("epochs") or np.nan), 3),
           "reused": False, "fit_seconds": round(t_fit, 2),
           "predict_seconds": round(time.time() - t0, 2), "final_loss": log.final_loss}
    fit = _Fit(frames, row, backend.update_delta(), backend.update_inputs())
    release(backend)
    return fit


def _fit_job(kw: Mapping, job: tuple[int, str, str, int | None]) -> _Fit:
    """One fit of :func:`run_seesaw` (module level, so a worker process can run it)."""
    seed, mix, schedule, steps = job
    return _fit_and_predict(mix=mix, seed=seed, schedule=schedule, steps=steps, **kw)


def _job_name(job: tuple[int, str, str, int | None]) -> str:
    seed, mix, schedule, steps = job
    return f"seed {seed}, mix {mix}, schedule {schedule}" + (f" ({steps} steps)" if steps else "")


def run_seesaw(cfg: Profile, train: Sequence[Record], tests: Mapping[str, Sequence[Record]], *,
               seeds: Sequence[int], mixes: Sequence[str] = MIXES,
               schedules: Sequence[str] = SCHEDULES, work_dir: Path | None = None,
               backend_kwargs: Mapping | None = None) -> SeesawRun:
    """Fit every mix for every seed and schedule on ``train`` and predict the matching test
    records.

    Per seed, the ``epochs`` runs come first; their step counts give the seed's
    :func:`step_budget`, and under ``steps`` every mix trains for exactly that many optimizer
    steps. A mix whose ``epochs`` run already took the budget (the joint run, by the
    budget's choice; every mix where a ``max_steps`` cap binds them all, e.g. ``tiny``) is
    not refit: a fit of the same data, hyper-parameters, seed and number of steps is the
    same run (mini: bit for bit, tested). Its rows are listed under ``steps`` too, with
    ``reused`` True in the fits frame.

    ``Profile.fit_workers`` > 1 (mini): the fits of all seeds run side by side in that many
    worker processes (:func:`kdsl_utils.workers.run_jobs`; the same results as one after
    another), after the features of every record are computed once here, so that no two
    workers compute the same OCR. 1 (the GPU profiles): one model at a time, seed after
    seed; each fitted backend is released (:func:`release`) once its predictions and weight
    update are taken, and each seed's updates are reduced to its interference tables and
    dropped before the next seed."""
    unknown = [s for s in schedules if s not in SCHEDULES]
    if unknown or EPOCHS not in schedules:
        raise ValueError(f"schedules must include {EPOCHS!r} (the step budget comes from it) and "
                         f"be among {SCHEDULES}; got {tuple(schedules)}")
    preds, fits, tables, budgets = [], [], [], {}
    bar = tqdm(total=len(seeds) * len(mixes) * len(schedules), desc="seesaw fits", unit="fit")
    kw = {"cfg": cfg, "train": list(train), "tests": {k: list(v) for k, v in tests.items()},
          "work_dir": work_dir, "backend_kwargs": backend_kwargs}
    workers = cfg.fit_workers
    if workers > 1:  # features once, here (mini: OCR, encoders -> the feature cache)
        prestart(workers, __name__)  # the workers import while the features are read
        make_backend(cfg, **dict(backend_kwargs or {})).inputs(
            kw["train"] + [r for recs in kw["tests"].values() for r in recs])
    job = partial(_fit_job, kw)

    def fit_all(jobs):
        return zip(jobs, run_jobs(job, jobs, workers=workers, bar=bar, desc="seesaw fits",
                                  name=_job_name))

    for chunk in ([list(seeds)] if workers > 1 else [[s] for s in seeds]):
        runs: dict[int, dict[str, dict[str, _Fit]]] = {s: {EPOCHS: {}} for s in chunk}
        for (s, m, _, _), fit in fit_all([(s, m, EPOCHS, None) for s in chunk for m in mixes]):
            runs[s][EPOCHS][m] = fit
        if STEPS in schedules:
            second = []
            for s in chunk:
                budgets[s] = step_budget({m: r.row["steps"] for m, r in runs[s][EPOCHS].items()})
                runs[s][STEPS] = {}
                for m in mixes:
                    done = runs[s][EPOCHS][m]
                    if done.row["steps"] == budgets[s]:
                        runs[s][STEPS][m] = done.as_schedule(STEPS, budgets[s])
                        bar.update()
                    else:
                        second.append((s, m, STEPS, budgets[s]))
            for (s, m, _, _), fit in fit_all(second):
                runs[s][STEPS][m] = fit
        for s in chunk:
            for schedule, by_mix in runs[s].items():
                by_mix = {m: by_mix[m] for m in mixes}  # mix order, whatever finished first
                preds += [f for r in by_mix.values() for f in r.frames]
                fits += [r.row for r in by_mix.values()]
                if set(by_mix) >= {"image", "intent", "joint"}:
                    # which tasks reach each block: measured on the joint run (the only
                    # one that sees both tasks' records)
                    t = interference_table(by_mix["image"].delta, by_mix["intent"].delta,
                                           by_mix["joint"].delta,
                                           inputs=by_mix["joint"].inputs)
                    tables.append(t.assign(seed=s, schedule=schedule))
        del runs  # these seeds' weight updates
    bar.close()
    pred = pd.concat(preds, ignore_index=True)
    if set(mixes) >= {"image", "intent"}:
        own = ((pred.variant == "image") & (pred.task == "image")) | (
            (pred.variant == "intent") & (pred.task == "intent"))
        pair = pred[own].assign(variant="single_pair")
        pred = pd.concat([pred, pair], ignore_index=True)
    inter = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    if len(inter):
        keys = ["seed", "schedule"]
        inter = inter[keys + [c for c in inter.columns if c not in keys]]
    return SeesawRun(predictions=pred, fits=pd.DataFrame(fits), interference=inter, budgets=budgets)


def save_run(run: SeesawRun, out: Path | str) -> dict[str, Path]:
    """Write a run's predictions, fits and interference tables into ``out`` (each atomically,
    names from :mod:`kdsl_utils.seesaw_files`); returns the paths by kind."""
    paths = {"predictions": Path(out) / PREDICTIONS_FILE, "fits": Path(out) / FITS_FILE,
             "interference": Path(out) / INTERFERENCE_FILE}
    for kind, frame in (("predictions", run.predictions), ("fits", run.fits),
                        ("interference", run.interference)):
        with atomic_path(paths[kind]) as tmp:
            frame.to_csv(tmp, index=False)
    return paths


def metrics_from_predictions(pred: pd.DataFrame, experiment: str) -> pd.DataFrame:
    """Tidy metric rows for every (schedule, variant, seed, split) group of a predictions
    frame; the variant column holds :func:`~kdsl_utils.seesaw_files.variant_name` (the
    schedule in the name: ``metrics.csv`` keeps the tidy schema). A frame without a
    ``schedule`` column is read as the ``epochs`` schedule.

    Single-task variants get only their task's rows (their ``pooled`` row equals the task's
    and is dropped to avoid reading it as a pooled score)."""
    if "schedule" not in pred:
        pred = pred.assign(schedule=EPOCHS)
    rows = []
    groups = pred.groupby(["schedule", "variant", "seed", "split"], sort=True)
    for (schedule, variant, seed, split), g in groups:
        r = metric_rows(list(g["label"]), list(g["pred"]), list(g["task"]), experiment=experiment,
                        variant=variant_name(variant, schedule), seed=int(seed), split=split)
        if g["task"].nunique() == 1:
            r = [x for x in r if x["task"] != "pooled"]
        rows += r
    return pd.DataFrame(rows)


def steps_table(fits: pd.DataFrame) -> pd.DataFrame:
    """Optimizer steps and passes over the data (epochs) of every mix under each schedule
    (rows schedule × variant, mean over seeds; ``seeds`` counts them), from a fits frame."""
    g = fits.groupby(["schedule", "variant"], sort=False)
    return g.agg(n_train=("n_train", "first"), steps=("steps", "mean"), epochs=("epochs", "mean"),
                 refit=("reused", lambda r: int((~r.astype(bool)).sum())),
                 seeds=("seed", "nunique")).reset_index()
