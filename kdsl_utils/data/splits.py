"""Seeded, stratified splits of record lists: dev folds, k-folds and few-shot samples.

Stratification is by label (and so by task). Labels with too few examples to split are
kept whole on the training side, so a dev fold never steals the only example of a class.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from .records import Record


def _by_label(records: Sequence[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.label is None:
            raise ValueError(f"record {r.id!r} ({r.source}) has no label; splits need labelled data")
        groups[r.label].append(r)
    return dict(sorted(groups.items()))


def stratified_split(records: Sequence[Record], fraction: float, seed: int,
                     min_keep: int = 1) -> tuple[list[Record], list[Record]]:
    """Split into (rest, held) with about ``fraction`` of every label held out.

    Per label, ``round(n * fraction)`` records are held out, but at least ``min_keep`` stay
    in ``rest`` (labels with ``n <= min_keep`` are not held out at all). Input order is
    preserved inside each output list; the result depends only on ``seed`` and the ids.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = random.Random(seed)
    held_ids: set[str] = set()
    for _, group in _by_label(records).items():
        ids = sorted(r.id for r in group)
        rng.shuffle(ids)
        n_held = min(round(len(ids) * fraction), len(ids) - min_keep)
        held_ids.update(ids[:max(n_held, 0)])
    rest = [r for r in records if r.id not in held_ids]
    held = [r for r in records if r.id in held_ids]
    return rest, held


def kfold(records: Sequence[Record], k: int, seed: int) -> list[tuple[list[Record], list[Record]]]:
    """``k`` stratified (train, dev) folds; every record is in exactly one dev fold.

    Each label's records are shuffled and dealt round-robin to the folds, starting at a
    random fold so that rare labels do not all land in fold 0.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    rng = random.Random(seed)
    fold_of: dict[str, int] = {}
    for _, group in _by_label(records).items():
        ids = sorted(r.id for r in group)
        rng.shuffle(ids)
        offset = rng.randrange(k)
        for i, rid in enumerate(ids):
            fold_of[rid] = (i + offset) % k
    return [([r for r in records if fold_of[r.id] != f], [r for r in records if fold_of[r.id] == f])
            for f in range(k)]


def few_shot(records: Sequence[Record], k: int, seed: int) -> list[Record]:
    """At most ``k`` records per label, sampled with ``seed`` (input order preserved)."""
    rng = random.Random(seed)
    keep: set[str] = set()
    for _, group in _by_label(records).items():
        ids = sorted(r.id for r in group)
        keep.update(rng.sample(ids, min(k, len(ids))))
    return [r for r in records if r.id in keep]
