"""The one seeded, stratified splitter of the package (dev folds of notebooks 02-03, the
search / held-out parts of the MCTS dev fold), and its K-fold form (the ship gate's folds,
the retriever's cross-fitting folds).

Stratification is by label (and so by task). Labels with too few examples to split are
kept whole on the training side, so a held-out part never steals the only example of a class.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np

from .records import Record


def stratified_indices(labels: Sequence[Hashable], fraction: float, seed: int, *,
                       keys: Sequence[str] | None = None, min_keep: int = 1,
                       carry: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..n-1`` into (rest, held) with about ``fraction`` of every label held.

    Per label (labels in sorted order), the group's ``keys`` (default: the positions) are
    sorted, shuffled by one ``random.Random(seed)`` shared across the groups, and the first
    ``round(n * fraction)`` are held out, but at least ``min_keep`` stay in rest (a label with
    ``n <= min_keep`` records is not held out at all). With ``carry`` the count is
    ``floor(n * fraction + c)`` where ``c`` carries the rounding remainder from label to label,
    so a set of many one-record labels still holds out about ``fraction`` of them (the MCTS
    search / held-out split of a small dev fold). The result depends only on ``seed``, the
    labels and the keys, not on the input order. Returns two sorted int64 index arrays.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    keys = [str(k) for k in keys] if keys is not None else [f"{i:012d}" for i in range(len(labels))]
    if len(keys) != len(labels):
        raise ValueError(f"{len(keys)} keys for {len(labels)} labels")
    groups: dict[Hashable, list[tuple[str, int]]] = defaultdict(list)
    for i, (lab, key) in enumerate(zip(labels, keys)):
        groups[lab].append((key, i))
    rng = random.Random(seed)
    held: list[int] = []
    remainder = 0.0
    for lab in sorted(groups):
        members = sorted(groups[lab])
        rng.shuffle(members)
        if carry:
            exact = len(members) * fraction + remainder
            n_held = math.floor(exact)
            remainder = exact - n_held
        else:
            n_held = round(len(members) * fraction)
        n_held = min(n_held, len(members) - min_keep)
        held += [i for _, i in members[:max(n_held, 0)]]
    held_arr = np.sort(np.asarray(held, dtype=np.int64))
    return np.setdiff1d(np.arange(len(labels), dtype=np.int64), held_arr), held_arr


def stratified_split(records: Sequence[Record], fraction: float, seed: int,
                     min_keep: int = 1) -> tuple[list[Record], list[Record]]:
    """Split labelled records into (rest, held) with :func:`stratified_indices` keyed by
    record id; input order is preserved inside each output list."""
    for r in records:
        if r.label is None:
            raise ValueError(f"record {r.id!r} ({r.source}) has no label; splits need labelled data")
    rest, held = stratified_indices([r.label for r in records], fraction, seed,
                                    keys=[r.id for r in records], min_keep=min_keep)
    return [records[i] for i in rest], [records[i] for i in held]


def stratified_folds(labels: Sequence[Hashable], k: int, seed: int = 0) -> np.ndarray:
    """(n,) fold number 0..k-1 per item, stratified: items ordered by label (randomly within
    a label, seeded) and dealt round-robin, so each label's items spread over the folds and
    fold sizes differ by at most one."""
    y = np.asarray(list(labels))
    order = np.lexsort((np.random.default_rng(seed).random(len(y)), y))
    folds = np.empty(len(y), dtype=np.int64)
    folds[order] = np.arange(len(y)) % max(1, k)
    return folds
