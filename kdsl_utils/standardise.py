"""One home for standardising a dense feature block (the mini backend's dense inputs, the
CPU record encoder's visual side).

A block is fitted on training rows: per column mean and standard deviation over the rows
that have the input (a record without images has an all-zero image row, which stays zero and
does not pull the mean), then one scale so that a standardised row has unit mean L2 norm
(every block then weighs about the same, whatever its width). Imports numpy only, so the
fit workers that use it start fast.
"""

from __future__ import annotations

import numpy as np

#: (mean (d,), standard deviation + 1e-6 (d,), row-norm scale), float32 arrays.
Stats = tuple[np.ndarray, np.ndarray, float]


def _present(x: np.ndarray) -> np.ndarray:
    """(n,) rows that carry the input (not all zero)."""
    return np.abs(x).sum(axis=1) > 0


def fit_stats(x: np.ndarray) -> Stats | None:
    """:data:`Stats` of the block ``x`` (n, d); None where no row carries the input."""
    nz = _present(x)
    if not nz.any():
        return None
    mu = x[nz].mean(axis=0)
    sd = x[nz].std(axis=0) + 1e-6
    scale = float(np.linalg.norm((x[nz] - mu) / sd, axis=1).mean()) or 1.0
    return mu.astype(np.float32), sd.astype(np.float32), scale


def apply_stats(x: np.ndarray, stats: Stats | None) -> np.ndarray:
    """(n, d) float32: ``(x − mean) / sd / scale`` on rows that carry the input, zeros on the
    others (and everywhere where ``stats`` is None: the fit rows had none)."""
    if stats is None:
        return np.zeros(x.shape, dtype=np.float32)
    mu, sd, scale = stats
    return np.where(_present(x)[:, None], (x - mu) / sd / scale, 0.0).astype(np.float32)

