"""How single-task updates interfere inside a joint fine-tune (beyond the paper).

The paper explains the seesaw — joint training helps one task and hurts the other — by the
superposition of task knowledge in shared weights. We measure it on the weight updates
``Δ = W_after − W_before`` of three runs from the same start: image-only, intent-only and
joint. Per layer (and over all layers):

* ``cos_img_int`` — cosine of the two single-task updates: ≈ 0 means they touch
  orthogonal directions, < 0 that they pull against each other;
* ``r2_img`` / ``r2_int`` — share of the joint update's squared norm explained by
  projecting it onto one single-task update alone (= cos² with the joint update);
* ``r2_both`` — the same for the best combination ``a·Δ_img + b·Δ_int`` (least squares),
  with the coefficients ``a`` and ``b``: a joint update that is the plain sum of the two
  single-task updates has ``a = b = 1`` and ``r2_both = 1``; the part it leaves
  unexplained is what joint training learns that neither single-task run does.

Every statistic is a function of the 3 × 3 Gram matrix ``G[i, j] = ⟨Δ_i, Δ_j⟩_F`` of the
three updates (cosines and norms directly; the least-squares fit from the normal equations
``G[:2, :2]·(a, b) = G[:2, 2]``, its residual ``G[2, 2] − (a, b)·G[:2, 2]``), and the ``ALL``
row's Gram matrix is the sum of the layers'. So the updates are never concatenated, and a
layer's update is never materialised when it is low-rank:

* :class:`LowRank` — a LoRA update ``ΔW = s·B·A`` (``B``: out × r, ``A``: r × in), kept as
  its factors. ``⟨s₁B₁A₁, s₂B₂A₂⟩_F = s₁s₂·tr((B₁ᵀB₂)(A₂A₁ᵀ))`` costs two r × r products
  (accumulated in float64 over blocks of rows); against a dense ``D``,
  ``⟨sBA, D⟩_F = s·Σ(B ⊙ (D·Aᵀ))``. Memory beyond the factors: r × r and one block,
  independent of the layer's width. Qwen2-VL-7B's dense LoRA updates would be ~6.5e9
  float32 values (~24 GiB) per run.
* :class:`Difference` — a full fine-tune's update ``W_after − W_before`` of one layer, kept
  as the two weights (e.g. bf16 on the CPU) and subtracted block by block in float64.
* a dense array (numpy or torch, any shape) — e.g. the mini backend's trunk deltas; products
  are taken block by block of rows in float64, so no float64 copy of a whole layer is made.

Inputs are mappings ``name -> update`` with equal keys and shapes, one per run.

**Task-disjoint and shared input blocks.** A block of weights that only one task's inputs
reach (mini: the rows of the OCR n-gram embedding, read by image records only; the columns
of the dialogue embedding, read by intent records only) gets gradient from that task alone,
so the other single-task run leaves it unchanged (up to weight decay) and ``cos_img_int`` is
≈ 0 there *by construction*, not because the tasks learned to stay apart. Mixed into the
``ALL`` row such blocks pull it towards 0. Given ``inputs`` (``Backend.update_inputs``:
the tasks whose inputs reach each block), :func:`interference_table` labels every row with
its group (``image only``, ``intent only``, ``both tasks``) and adds one total row per group
(``ALL[inputs: both tasks]`` ...) before ``ALL``: the interference of shared weights is read
on the ``both tasks`` row.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import pandas as pd

ROWS_PER_BLOCK = 1024  # dense products in float64 blocks of this many rows (bounded memory)
RUNS = ("img", "int", "joint")
TOTAL = "ALL"  # the layer name of the row over all layers
SHARED = "both tasks"  # input group of a block both tasks' inputs reach


def _np64(x) -> np.ndarray:
    """A float64 numpy copy of a (small) tensor or array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _rows(x) -> Any:
    """``x`` as a 2-D (rows × cols) view without copying (a vector becomes one column)."""
    if hasattr(x, "detach"):
        x = x.detach()
        return x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(-1, 1)
    x = np.asarray(x)
    return x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(-1, 1)


@dataclass(frozen=True)
class LowRank:
    """A low-rank update ``ΔW = scale·B·A`` (``B``: out × r, ``A``: r × in; torch or numpy)."""

    B: Any
    A: Any
    scale: float = 1.0

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.B.shape[0]), int(self.A.shape[1]))

    def dense(self) -> np.ndarray:
        """The materialised ΔW as float32 (out × in) — for tests and small models only."""
        return (self.scale * (_np64(self.B) @ _np64(self.A))).astype(np.float32)


@dataclass(frozen=True)
class Difference:
    """A dense update kept as two weights: ``ΔW = after − before`` (equal shapes)."""

    after: Any
    before: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.after.shape)

    def dense(self) -> np.ndarray:
        return (_np64(self.after) - _np64(self.before)).astype(np.float32)


Update = Union[LowRank, Difference, np.ndarray, Any]  # Any: a torch tensor


def _shape(u: Update) -> tuple[int, ...]:
    return tuple(int(s) for s in u.shape)


def _dense_blocks(u: Update):
    """Yield ``(row_slice, float64 block)`` of a dense update (an array/tensor or a Difference)."""
    if isinstance(u, Difference):
        a, b = _rows(u.after), _rows(u.before)
        for i in range(0, a.shape[0], ROWS_PER_BLOCK):
            s = slice(i, i + ROWS_PER_BLOCK)
            yield s, _np64(a[s]) - _np64(b[s])
    else:
        x = _rows(u)
        for i in range(0, x.shape[0], ROWS_PER_BLOCK):
            s = slice(i, i + ROWS_PER_BLOCK)
            yield s, _np64(x[s])


def _cross(x, y) -> np.ndarray:
    """``xᵀ·y`` (k × k') in float64 for tall ``x`` (n × k), ``y`` (n × k'), summed over blocks
    of rows so that only a block is ever copied to float64 (memory independent of n)."""
    out = np.zeros((x.shape[1], y.shape[1]))
    for i in range(0, x.shape[0], ROWS_PER_BLOCK):
        out += _np64(x[i:i + ROWS_PER_BLOCK]).T @ _np64(y[i:i + ROWS_PER_BLOCK])
    return out


def inner(u: Update, v: Update) -> float:
    """Frobenius inner product ``⟨u, v⟩`` of two updates of one layer, in float64."""
    if isinstance(u, LowRank) and isinstance(v, LowRank):
        if u.shape != v.shape:
            raise ValueError(f"update shapes differ {u.shape} {v.shape}")
        # tr((B1ᵀB2)(A2A1ᵀ)): two r×r products, nothing of size out×in
        bb = _cross(u.B, v.B)  # B1ᵀB2
        aa = _cross(v.A.T, u.A.T)  # A2A1ᵀ
        return float(u.scale * v.scale * np.sum(bb * aa.T))
    if isinstance(v, LowRank):
        u, v = v, u
    if isinstance(u, LowRank):  # ⟨sBA, D⟩ = s·Σ B ⊙ (D Aᵀ), D taken in row blocks
        At, B = _np64(u.A).T, _np64(u.B)
        if _shape(v) != u.shape:
            raise ValueError(f"update shapes differ {_shape(u)} {_shape(v)}")
        return float(u.scale * sum(np.sum(B[s] * (blk @ At)) for s, blk in _dense_blocks(v)))
    if _shape(u) != _shape(v):
        raise ValueError(f"update shapes differ {_shape(u)} {_shape(v)}")
    return float(sum(np.sum(bu * bv) for (_, bu), (_, bv) in zip(_dense_blocks(u), _dense_blocks(v))))


def gram(updates: tuple[Update, ...]) -> np.ndarray:
    """The Gram matrix ``G[i, j] = ⟨u_i, u_j⟩_F`` (float64) of one layer's updates."""
    k = len(updates)
    g = np.zeros((k, k))
    for i in range(k):
        for j in range(i, k):
            g[i, j] = g[j, i] = inner(updates[i], updates[j])
    return g


def stats_from_gram(g: np.ndarray) -> dict[str, float]:
    """The module's statistics from the 3 × 3 Gram matrix of (img, int, joint)."""
    n = np.sqrt(np.clip(np.diag(g), 0.0, None))

    def cos(i, j):
        return float(g[i, j] / (n[i] * n[j])) if n[i] > 0 and n[j] > 0 else float("nan")

    # least squares on the normal equations; lstsq gives the minimum-norm solution, which is
    # pinv(X)·y as the dense fit would (one single-task update zero or both collinear)
    coef, *_ = np.linalg.lstsq(g[:2, :2], g[:2, 2], rcond=None)
    jj = float(g[2, 2])
    # ‖y − Xc‖² = yᵀy − cᵀXᵀy at the optimum; rounding can take it a hair below 0
    resid = max(jj - float(coef @ g[:2, 2]), 0.0)
    return {
        "cos_img_int": cos(0, 1),
        "cos_img_joint": cos(0, 2),
        "cos_int_joint": cos(1, 2),
        "r2_img": cos(0, 2) ** 2,
        "r2_int": cos(1, 2) ** 2,
        "r2_both": 1.0 - resid / jj if jj > 0 else float("nan"),
        "a_img": float(coef[0]), "b_int": float(coef[1]),
        "norm_img": float(n[0]), "norm_int": float(n[1]), "norm_joint": float(n[2]),
    }


def compare(d_img: Update, d_int: Update, d_joint: Update) -> dict[str, float]:
    """The statistics above for three updates of one layer (or three flat vectors)."""
    return stats_from_gram(gram((d_img, d_int, d_joint)))


def input_group(tasks: Collection[str]) -> str:
    """The group of a block from the tasks whose inputs reach it: ``"<task> only"``,
    :data:`SHARED` (``"both tasks"``) or ``"no task"`` (a block no input reaches)."""
    tasks = sorted(set(tasks))
    if not tasks:
        return "no task"
    return f"{tasks[0]} only" if len(tasks) == 1 else SHARED


def group_row(group: str) -> str:
    """The layer name of the total row of one input group, e.g. ``ALL[inputs: both tasks]``."""
    return f"{TOTAL}[inputs: {group}]"


def interference_table(d_img: Mapping, d_int: Mapping, d_joint: Mapping,
                       inputs: Mapping[str, Collection[str]] | None = None) -> pd.DataFrame:
    """One row per layer (parameter name or input block) plus an ``ALL`` row over all
    layers together.

    ``inputs`` (layer -> tasks whose inputs reach it, e.g. ``Backend.update_inputs()``) adds
    an ``inputs`` column (:func:`input_group`) and, before ``ALL``, one total row per group
    present (:func:`group_row`; order: one-task groups, then shared, then unreached).
    Streams layer by layer: only the 3 × 3 Gram matrices are kept (totals = their sums)."""
    names = list(d_joint)
    if set(names) != set(d_img) or set(names) != set(d_int):
        raise ValueError("the three update dicts must have the same parameter names")
    if inputs is not None and set(names) - set(inputs):
        raise ValueError(f"inputs lacks layers {sorted(set(names) - set(inputs))[:5]}")
    rows, total, by_group = [], np.zeros((3, 3)), {}
    for n in names:
        ups = (d_img[n], d_int[n], d_joint[n])
        if not (_shape(ups[0]) == _shape(ups[1]) == _shape(ups[2])):
            raise ValueError(f"{n}: update shapes differ {[_shape(u) for u in ups]}")
        g = gram(ups)
        total += g
        row = {"layer": n, **stats_from_gram(g)}
        if inputs is not None:
            row["inputs"] = input_group(inputs[n])
            by_group[row["inputs"]] = by_group.get(row["inputs"], 0.0) + g
        rows.append(row)
    order = sorted(by_group, key=lambda k: (k == "no task", k == SHARED, k))
    rows += [{"layer": group_row(k), **stats_from_gram(by_group[k]), "inputs": k} for k in order]
    rows.append({"layer": TOTAL, **stats_from_gram(total),
                 **({"inputs": "all"} if inputs is not None else {})})
    return pd.DataFrame(rows)
