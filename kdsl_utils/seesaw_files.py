"""Notebook 01's results files: their names, and how its two training schedules appear in them.

A light module (pandas only): :mod:`kdsl_utils.seesaw` writes these files, and
:mod:`kdsl_utils.report` and :mod:`kdsl_utils.plots` read them without importing the
training stack. File names live here once, never as strings copied between notebooks.

**Schedules.** Every task mix trains under two schedules (see :mod:`kdsl_utils.seesaw`):

* ``epochs`` — the profile's epochs for every mix (the paper's protocol, and the recipe
  notebook 03 compares against): mixes of different sizes take different numbers of
  optimizer steps, the joint run the most;
* ``steps`` — every mix trains for the same number of optimizer steps (the step budget),
  the control that separates "joint data" from "more updates of the shared weights".

``predictions.csv`` and ``fits.csv`` carry a ``schedule`` column. ``metrics.csv`` keeps the
project's tidy schema (``results.METRICS_COLUMNS``, no extra column), so there the schedule
is in the variant's name: plain (``joint``) under ``epochs`` — the names notebooks 03 and 04
read — and suffixed (``joint[steps]``) under ``steps``; :func:`with_schedule` splits it back.
"""

from __future__ import annotations

import pandas as pd

EPOCHS, STEPS = "epochs", "steps"
SCHEDULES = (EPOCHS, STEPS)

PREDICTIONS_FILE = "predictions.csv"  # seed, schedule, variant, split, id, task, label, pred, ...
FITS_FILE = "fits.csv"  # one row per seed × schedule × mix: steps taken, budget, epochs, ...
INTERFERENCE_FILE = "interference.csv"  # interference table per seed × schedule
GAIN_FILE = "seesaw_gain.csv"  # report.seesaw_gain of the run
FIGURE_FILE = "seesaw.png"  # Figure 1, both schedules
INTERFERENCE_FIGURE_FILE = "interference.png"


def variant_name(variant: str, schedule: str) -> str:
    """The ``metrics.csv`` variant of a mix (or ``single_pair``) under a schedule."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    return variant if schedule == EPOCHS else f"{variant}[{schedule}]"


def parse_variant(name: str) -> tuple[str, str]:
    """(variant, schedule) of a ``metrics.csv`` variant name (inverse of :func:`variant_name`)."""
    for schedule in SCHEDULES[1:]:
        if name.endswith(f"[{schedule}]"):
            return name[: -len(schedule) - 2], schedule
    return name, EPOCHS


def with_schedule(metrics: pd.DataFrame) -> pd.DataFrame:
    """Notebook 01's metrics with the variant name split: ``variant`` becomes the plain mix
    (``image``, ``intent``, ``joint``, ``single_pair``), ``schedule`` says which schedule."""
    parsed = [parse_variant(v) for v in metrics["variant"]]
    return metrics.assign(variant=[p[0] for p in parsed], schedule=[p[1] for p in parsed])


def schedule_label(fits: pd.DataFrame | None, schedule: str) -> str:
    """A row name saying what a schedule did: epoch- or step-matched, with each mix's
    optimizer steps and passes over its data as ``fits.csv`` records them (several values
    across seeds are joined by ``/``)."""
    kind = "epoch-matched" if schedule == EPOCHS else "step-matched"
    if fits is None or "schedule" not in fits or not (fits.schedule == schedule).any():
        return kind
    f = fits[fits.schedule == schedule]

    def per_mix(col: str, fmt: str) -> str:
        return ", ".join(f"{mix} " + "/".join(fmt.format(v) for v in sorted(g[col].unique()))
                         for mix, g in f.groupby("variant", sort=False))

    return f"{kind} (steps: {per_mix('steps', '{:.0f}')}; epochs: {per_mix('epochs', '{:.1f}')})"
