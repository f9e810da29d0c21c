"""Parts shared by the two record encoders of notebook 04 (NoteLLM-2's recipe).

The CPU recipe (:mod:`kdsl_utils.representations`, ``ReprCfg.encoder="features"``) and the
Qwen2-VL mICL encoder (:mod:`kdsl_utils.models.qwen_repr`, ``"qwen_micl"``) train with the
same pieces, which live here so that neither encoder imports the other:

- :class:`Variant` / :data:`VARIANTS`: the ablation flags (what each flag means for each
  encoder is in that encoder's docstring);
- :class:`Gate`: late fusion, ``z = σ(W[h; v])``, ``e = z·h + (1−z)·v``;
- :func:`contrastive_loss`: multi-positive in-batch InfoNCE with a learnable temperature;
- :func:`partners`: one related record per record (its augmented copy, else its label).

Moved here unchanged from ``representations`` (which re-exports them), except that the loss
builds its masks on the embeddings' device (the Qwen encoder trains on a GPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .data.records import Record

MAX_LOGIT_SCALE = float(np.log(100.0))  # temperature floor 0.01 (CLIP's clamp)


@dataclass(frozen=True)
class Variant:
    """Which parts of the recipe a representation uses."""

    micl: bool = True  # image word and note kept apart (+ visual-side loss); else one pooled text
    text: bool = True
    visual: bool = True
    late_fusion: bool = True  # gate after the encoders; False: visual features as input of f


VARIANTS: dict[str, Variant] = {
    "full": Variant(),
    "no_micl": Variant(micl=False),
    "no_late_fusion": Variant(late_fusion=False),
    "text_only": Variant(visual=False),
    "image_only": Variant(text=False, micl=False),
}


class Gate(nn.Module):
    """``z = σ(W[h; v])``, ``e = z·h + (1−z)·v``; ``W``: (dim, 2·dim), bias-free, Xavier."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = nn.Linear(2 * dim, dim, bias=False)
        nn.init.xavier_uniform_(self.w.weight)

    def forward(self, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        z = torch.sigmoid(self.w(torch.cat([h, v], dim=-1)))
        return z * h + (1 - z) * v


def temperature(logit_scale: torch.Tensor) -> float:
    """τ of a learnable ``log(1/τ)`` as :func:`contrastive_loss` uses it (clamped)."""
    return float(1.0 / logit_scale.detach().clamp(max=MAX_LOGIT_SCALE).exp())


def contrastive_loss(emb: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Multi-positive in-batch InfoNCE over L2-normalised ``emb`` (b, d): for each anchor,
    the mean over its positives (other items with the same label) of
    ``-log softmax_{j≠i}(s_ij / τ)``; anchors without a positive are skipped."""
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    sim = emb @ emb.T * scale
    eye = torch.eye(len(emb), dtype=torch.bool, device=emb.device)
    sim = sim.masked_fill(eye, float("-inf"))
    logp = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    labels = labels.to(emb.device)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    has = pos.any(dim=1)
    if not has.any():
        return emb.sum() * 0.0
    per = -(logp.masked_fill(~pos, 0.0).sum(dim=1)[has] / pos.sum(dim=1)[has])
    return per.mean()


def partners(records: Sequence[Record], rng: np.random.Generator) -> np.ndarray:
    """For every record, one related record: its augmented copy / original where one
    exists (chosen with probability 1/2), else another record of its label (itself only
    when its label has no other record, which the loss then skips)."""
    base = [r.id.split("#")[0] for r in records]
    by_base: dict[str, list[int]] = {}
    by_label: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_base.setdefault(base[i], []).append(i)
        by_label.setdefault(r.label, []).append(i)
    out = np.empty(len(records), dtype=np.int64)
    for i, r in enumerate(records):
        kin = [j for j in by_base[base[i]] if j != i]
        same = [j for j in by_label[r.label] if j != i]
        if kin and (not same or rng.random() < 0.5):
            out[i] = rng.choice(kin)
        else:
            out[i] = rng.choice(same) if same else i
    return out
