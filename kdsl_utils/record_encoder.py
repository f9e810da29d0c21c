"""The CPU recipe's trainable record encoder (notebook 04, ``ReprCfg.encoder="features"``):
its inputs, the model, contrastive training, and the job a fit worker runs.

:mod:`kdsl_utils.representations` explains the recipe and drives it; this module holds what
a fit worker (:mod:`kdsl_utils.workers`) needs to train one encoder, and imports only torch,
numpy and small modules of this package: a worker starts in about 2 s instead of the 9 s of
importing ``representations`` (e5, OCR, sklearn, the Qwen path), measured on this 2-core
machine with ``python -c "import ..."``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .config import ReprCfg
from .contrastive import VARIANTS, Gate, Variant, contrastive_loss, temperature
from .contrastive import partners as _partners
from .data.labels import LABEL_INDEX
from .data.records import Record
from .standardise import Stats, apply_stats, fit_stats
from .threads import torch_threads


# ------------------------------------------------------------------------------ inputs


@dataclass
class ReprInputs:
    """Frozen per-record inputs, aligned with a record list.

    ``word``: (n, 384) e5 of the OCR text of the record's images (zeros where none);
    ``note``: (n, 384) e5 of the customer's dialogue text (zeros where none);
    ``pooled``: (n, 384) e5 of both texts joined in one passage (the no-mICL input);
    ``visual``: (n, 1287) EfficientNet mean embedding + layout numbers, unscaled.
    """

    ids: list[str]
    word: np.ndarray
    note: np.ndarray
    pooled: np.ndarray
    visual: np.ndarray

    def take(self, rows: Sequence[int]) -> ReprInputs:
        rows = list(rows)
        return ReprInputs([self.ids[i] for i in rows], self.word[rows], self.note[rows],
                          self.pooled[rows], self.visual[rows])


# ------------------------------------------------------------------------------- model


def _mlp(n_in: int, dim: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, 2 * dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(2 * dim, dim))


class RecordEncoder(nn.Module):
    """Trainable part: text-side MLP ``f``, visual-side MLP ``g``, the gate, the temperature.

    ``forward`` takes float tensors word/note/pooled (b, ``text_dim``; e5: 384) and visual
    (b, ``n_visual``; EfficientNet + layout: 1287, already scaled) and returns (multimodal
    embedding (b, dim), visual-side embedding (b, dim) or None), both L2-normalised.
    """

    def __init__(self, variant: Variant, rc: ReprCfg, text_dim: int, n_visual: int):
        super().__init__()
        self.variant = variant
        vt = variant
        n_text = (2 * text_dim if vt.micl else text_dim) + (0 if vt.late_fusion or not vt.visual
                                                             else n_visual)
        self.f = _mlp(n_text, rc.dim, rc.dropout) if vt.text else None
        self.g = _mlp(n_visual, rc.dim, rc.dropout) if vt.visual and (vt.late_fusion or not vt.text) else None
        self.gate = Gate(rc.dim) if vt.text and vt.visual and vt.late_fusion else None
        # learnable temperature, as log(1/τ) (CLIP's parametrisation)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / rc.temperature))))

    @property
    def temperature(self) -> float:
        return temperature(self.logit_scale)

    def forward(self, word, note, pooled, visual):
        vt = self.variant
        e_vis = None
        if vt.text:
            text = torch.cat([word, note], dim=1) if vt.micl else pooled
            extra = [visual] if vt.visual and not vt.late_fusion else []
            h = self.f(torch.cat([text, *extra], dim=1))
            if vt.micl:  # the image word read alone: the visual-side embedding of mICL
                alone = torch.cat([word, torch.zeros_like(note), *[torch.zeros_like(x) for x in extra]],
                                  dim=1)
                e_vis = nn.functional.normalize(self.f(alone), dim=1)
            e = self.gate(h, self.g(visual)) if self.gate is not None else h
        else:
            e = self.g(visual)
        return nn.functional.normalize(e, dim=1), e_vis


@dataclass
class Representation:
    """A trained encoder with its visual scaling (fitted on the training records)."""

    variant_name: str
    encoder: RecordEncoder
    visual_stats: Stats | None  # standardisation of the training records' visual features
    losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def embed(self, x: ReprInputs) -> np.ndarray:
        """(n, dim) L2-normalised embeddings."""
        vis = apply_stats(x.visual, self.visual_stats)
        self.encoder.eval()
        with torch.inference_mode(), torch_threads(1):
            e, _ = self.encoder(*(torch.from_numpy(a) for a in (x.word, x.note, x.pooled, vis)))
        return e.numpy().astype(np.float32)

    @property
    def temperature(self) -> float:
        return self.encoder.temperature


def train(records: Sequence[Record], x: ReprInputs, variant_name: str, rc: ReprCfg, *,
          seed: int) -> Representation:
    """Train one variant contrastively on labelled ``records`` (aligned with ``x``)."""
    if any(r.label is None for r in records):
        raise ValueError("representation training needs labelled records")
    t0 = time.perf_counter()
    variant = VARIANTS[variant_name]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    enc = RecordEncoder(variant, rc, x.word.shape[1], x.visual.shape[1])
    visual_stats = fit_stats(x.visual)
    vis = apply_stats(x.visual, visual_stats)
    tens = [torch.from_numpy(a) for a in (x.word, x.note, x.pooled, vis)]
    y = torch.tensor([LABEL_INDEX[r.label] for r in records])
    opt = torch.optim.AdamW(enc.parameters(), lr=rc.learning_rate, weight_decay=rc.weight_decay)
    losses = []
    n = len(records)
    with torch_threads(1):
        enc.train()
        for _ in range(rc.epochs):
            perm = rng.permutation(n)
            partner = _partners(records, rng)
            tot = 0.0
            for j in range(0, n, rc.batch_size):
                a = perm[j:j + rc.batch_size]
                rows = torch.from_numpy(np.concatenate([a, partner[a]]))
                e, e_vis = enc(*(t[rows] for t in tens))
                loss = contrastive_loss(e, y[rows], enc.logit_scale)
                if e_vis is not None and rc.visual_loss_weight:
                    loss = loss + rc.visual_loss_weight * contrastive_loss(e_vis, y[rows],
                                                                           enc.logit_scale)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += loss.item() * len(a)
            losses.append(tot / n)
    enc.eval()
    return Representation(variant_name, enc, visual_stats, losses, time.perf_counter() - t0)


def train_job(records: Sequence[Record], x: ReprInputs, rc: ReprCfg,
              job: tuple[str, Sequence[int] | None, int]) -> Representation:
    """``job`` = (variant, rows of ``records`` to train on (None: all), seed): one
    :func:`train`, module level so that a worker process can run it."""
    variant, rows, seed = job
    if rows is None:
        return train(records, x, variant, rc, seed=seed)
    return train([records[i] for i in rows], x.take(rows), variant, rc, seed=seed)
