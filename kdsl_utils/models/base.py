"""The interface every backend implements (qwen_vl for paper/tiny, mini for CPU).

Predictions live in the pooled 48-label space (``ALL_LABELS`` order) so that metrics, rule
fusion and result files never depend on which backend produced them. A record's
probability mass lies only on its own candidate labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..data.labels import ALL_LABELS, TASKS, label_indices
from ..data.records import Record
from ..interference import Update

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
    """Class probabilities for a list of records, with their gold labels where known.

    ``proba`` has shape (n_records, 48), columns in ``ALL_LABELS`` order, rows summing to 1
    over the record's candidate labels. ``gold`` holds each record's gold label string, or
    None for an unlabelled record (a challenge test file); ``pred`` is the argmax label.
    """

    ids: list[str]
    tasks: list[str]
    proba: np.ndarray
    gold: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.gold:
            self.gold = [None] * len(self.ids)
        if not (len(self.ids) == len(self.tasks) == len(self.gold) == len(self.proba)):
            raise ValueError(f"Predictions: {len(self.ids)} ids, {len(self.tasks)} tasks, "
                             f"{len(self.gold)} gold labels, {len(self.proba)} probability rows")

    @classmethod
    def for_records(cls, records: Sequence[Record], proba: np.ndarray) -> Predictions:
        """Predictions aligned with ``records`` (ids, tasks and gold labels taken from them)."""
        return cls(ids=[r.id for r in records], tasks=[r.task for r in records], proba=proba,
                   gold=[r.label for r in records])

    @property
    def pred(self) -> list[str]:
        return [ALL_LABELS[i] for i in self.proba.argmax(axis=1)]

    @property
    def pred_idx(self) -> np.ndarray:
        """(n,) int: argmax column per record."""
        return self.proba.argmax(axis=1)

    @property
    def gold_idx(self) -> np.ndarray:
        """(n,) int: gold label column per record, -1 where the record is unlabelled."""
        return label_indices(self.gold)

    @property
    def labelled(self) -> bool:
        """True when every record has a gold label (the split can be scored)."""
        return all(g is not None for g in self.gold)


@dataclass(frozen=True)
class FitLog:
    """What one ``Backend.fit`` did. ``losses`` is the training loss curve (per epoch for
    mini, per logging step for qwen_vl); ``extra`` holds backend-specific details."""

    mix: str
    seed: int
    n_train: int
    wall_s: float  # seconds, the whole fit (features included)
    losses: tuple[float, ...] = ()
    steps: int = 0  # optimizer steps
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        return float(self.losses[-1]) if self.losses else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Backend(Protocol):
    """``fit`` receives the whole training list and trains on ``select_mix(train, mix)``;
    parts that do not depend on labels (tokenizer, featurizer) may use all of it, so that
    the three task mixes share one input space and one initialisation per seed."""

    def fit(self, train: Sequence[Record], *, mix: str, seed: int,
            out_dir: Path | None = None) -> FitLog: ...

    def predict_proba(self, records: Sequence[Record]) -> Predictions: ...

    def save(self, path: Path) -> None: ...

    def update_delta(self) -> dict[str, Update]:
        """Per-layer (or per input block) weight update of the last ``fit``, for
        :mod:`kdsl_utils.interference`, in any of its forms: LoRA factors
        (:class:`~kdsl_utils.interference.LowRank`, ΔW = scaling·B·A), a full fine-tune's
        (after, before) pair (:class:`~kdsl_utils.interference.Difference`), or a dense
        array (mini: the shared trunk's change, split by input block)."""
        ...

    def update_inputs(self) -> dict[str, tuple[str, ...]]:
        """For each key of :meth:`update_delta`, the tasks whose training inputs reach that
        block (a block fed by one task's inputs only gets gradient from that task alone: its
        cross-task interference is zero by construction). Measured on the last ``fit``'s
        records where the backend can (mini); by construction where it cannot (qwen_vl:
        every token of both tasks passes every adapted layer)."""
        ...
