"""The interface every backend implements (qwen_vl for paper/tiny, mini for CPU).

Predictions live in the pooled 48-label space (``ALL_LABELS`` order) so that metrics, rule
fusion and result files never depend on which backend produced them. A record's
probability mass lies only on its own candidate labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..data.labels import ALL_LABELS, TASKS
from ..data.records import Record

MIXES = ("image", "intent", "joint")  # task mixes of the seesaw experiment


def select_mix(records: Sequence[Record], mix: str) -> list[Record]:
    """Training records of a task mix: one task's records, or all of them for ``joint``."""
    if mix not in MIXES:
        raise ValueError(f"unknown task mix {mix!r}; choose one of {MIXES}")
    return [r for r in records if mix == "joint" or r.task == mix]


def mix_tasks(mix: str) -> tuple[str, ...]:
    """The tasks a model trained on ``mix`` is evaluated on."""
    return TASKS if mix == "joint" else (mix,)


@dataclass
class Predictions:
    """Class probabilities for a list of records.

    ``proba`` has shape (n_records, 48), columns in ``ALL_LABELS`` order, rows summing to 1
    over the record's candidate labels. ``pred`` is the argmax label string per record.
    """

    ids: list[str]
    tasks: list[str]
    proba: np.ndarray

    @property
    def pred(self) -> list[str]:
        return [ALL_LABELS[i] for i in self.proba.argmax(axis=1)]


class Backend(Protocol):
    """``fit`` receives the whole training list and trains on ``select_mix(train, mix)``;
    parts that do not depend on labels (tokenizer, featurizer) may use all of it, so that
    the three task mixes share one input space and one initialisation per seed."""

    def fit(self, train: Sequence[Record], *, mix: str, seed: int,
            out_dir: Path | None = None) -> dict: ...

    def predict_proba(self, records: Sequence[Record]) -> Predictions: ...

    def save(self, path: Path) -> None: ...

    def update_delta(self) -> dict[str, np.ndarray]:
        """Per-layer weight update of the last ``fit`` (LoRA: ΔW = B·A·scaling; mini: the
        shared trunk's change), for :mod:`kdsl_utils.interference`."""
        ...
