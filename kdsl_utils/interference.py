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

For LoRA the update of a weight is ``ΔW = B·A·scaling``; for the mini backend it is the
change of the shared parameters. Inputs are dicts ``name -> array`` with equal keys and
shapes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd


def _flat(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def compare(d_img: np.ndarray, d_int: np.ndarray, d_joint: np.ndarray) -> dict[str, float]:
    """The statistics above for three flat update vectors of equal length."""
    X = np.stack([d_img, d_int], axis=1)
    coef, *_ = np.linalg.lstsq(X, d_joint, rcond=None)
    resid = d_joint - X @ coef
    jj = float(d_joint @ d_joint)
    return {
        "cos_img_int": _cos(d_img, d_int),
        "cos_img_joint": _cos(d_img, d_joint),
        "cos_int_joint": _cos(d_int, d_joint),
        "r2_img": _cos(d_img, d_joint) ** 2,
        "r2_int": _cos(d_int, d_joint) ** 2,
        "r2_both": 1.0 - float(resid @ resid) / jj if jj > 0 else float("nan"),
        "a_img": float(coef[0]), "b_int": float(coef[1]),
        "norm_img": float(np.linalg.norm(d_img)), "norm_int": float(np.linalg.norm(d_int)),
        "norm_joint": float(np.sqrt(jj)),
    }


def interference_table(d_img: Mapping, d_int: Mapping, d_joint: Mapping) -> pd.DataFrame:
    """One row per layer (parameter name) plus an ``ALL`` row over the concatenation."""
    names = list(d_joint)
    if set(names) != set(d_img) or set(names) != set(d_int):
        raise ValueError("the three update dicts must have the same parameter names")
    rows, flats = [], {k: [] for k in ("img", "int", "joint")}
    for n in names:
        a, b, j = _flat(d_img[n]), _flat(d_int[n]), _flat(d_joint[n])
        if not (a.shape == b.shape == j.shape):
            raise ValueError(f"{n}: update shapes differ {a.shape} {b.shape} {j.shape}")
        rows.append({"layer": n, **compare(a, b, j)})
        flats["img"].append(a), flats["int"].append(b), flats["joint"].append(j)
    rows.append({"layer": "ALL", **compare(*(np.concatenate(flats[k]) for k in ("img", "int", "joint")))})
    return pd.DataFrame(rows)
