"""Seeded, optional augmentation of MIRE records.

* **Image**: random-resize copies — the augmentation the challenge's solutions used. Each
  copy rescales every image of a record by a factor in ``scale`` (aspect kept) and writes
  it under ``out_dir``; the copy gets id ``<id>#aug<k>``.
* **Dialogue**: turn dropout — each agent (客服) turn without an image is dropped with
  probability ``p_agent``, each earlier customer turn without an image with ``p_user``;
  the last customer turn (the intent is usually stated there) and every turn carrying an
  image are always kept. Agent turns in this domain are often boilerplate (marketing
  broadcasts, greetings) and early customer turns are often links or video cards, so this
  teaches the model not to lean on them. The instruction is rebuilt with the challenge's
  template and the record's own candidate list.

:func:`augment_training_set` applies both as a profile's ``AugmentCfg`` says: KDSL's large
model is fine-tuned on the augmented fit set (the paper fine-tunes "with data
augmentation"); notebook 02's ``no_aug`` ablation fits the same model without it.

Augmented records are new Record objects; the originals are never modified. Every
function is deterministic given ``seed`` and the record id.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ..hashing import stable_int
from .images import load_rgb
from .labels import INTENT_TASK
from .prompts import intent_instruction
from .records import AGENT, USER, Record
from ..results import atomic_path


def _rng(seed: int, record_id: str, k: int) -> random.Random:
    return random.Random(f"{seed}:{stable_int(record_id)}:{k}")


def resize_copies(records: Sequence[Record], out_dir: Path | str, *, copies: int = 1,
                  scale: tuple[float, float] = (0.5, 1.5), seed: int = 0) -> list[Record]:
    """``copies`` random-resize copies of every record that has images (others are skipped)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out: list[Record] = []
    for r in records:
        if not r.images:
            continue
        for k in range(copies):
            rng = _rng(seed, r.id, k)
            new_paths = []
            for j, p in enumerate(r.images):
                f = rng.uniform(*scale)
                # Seed and copy in the name: a file left by another seed is never reused.
                target = out_dir / f"{p.stem}-s{seed}-aug{k}-{j}{p.suffix}"
                if not target.exists():
                    im = load_rgb(p)  # the one decoder: upright, 8-bit RGB, alpha on white
                    w, h = im.size
                    with atomic_path(target) as tmp:  # a killed run leaves no torn copy to reuse
                        im.resize((max(8, round(w * f)), max(8, round(h * f))),
                                  Image.Resampling.BICUBIC).save(tmp)
                new_paths.append(target)
            out.append(dataclasses.replace(r, id=f"{r.id}#aug{k}", images=tuple(new_paths)))
    return out


def dialogue_dropout(records: Sequence[Record], *, p_agent: float = 0.3, p_user: float = 0.0,
                     copies: int = 1, seed: int = 0) -> list[Record]:
    """Dialogue copies of intent records with image-free turns dropped: agent turns at
    ``p_agent``, customer turns other than the last one at ``p_user`` (image records are
    skipped). A copy identical to its original is not emitted."""
    out: list[Record] = []
    for r in records:
        if r.task != INTENT_TASK:
            continue
        last_user = max((i for i, t in enumerate(r.turns) if t.role == USER), default=-1)
        for k in range(copies):
            rng = _rng(seed, r.id, 1000 + k)
            keep = []
            for i, t in enumerate(r.turns):
                u = rng.random()  # one draw per turn, so p_agent and p_user stay independent
                p = {AGENT: p_agent, USER: p_user if i != last_user else 0.0}.get(t.role, 0.0)
                if t.images or u >= p:
                    keep.append(t)
            turns = tuple(keep)
            if turns == r.turns:
                continue
            # Dropped turns never carry images, so the inline image order is unchanged.
            instr = intent_instruction([(t.role, t.text) for t in turns], r.candidates)
            out.append(dataclasses.replace(r, id=f"{r.id}#dlg{k}", instruction=instr, turns=turns))
    return out


def augment_training_set(records: Sequence[Record], acfg, *, seed: int,
                         image_dir: Path | str) -> list[Record]:
    """``records`` followed by their augmented copies, as ``acfg`` (an ``AugmentCfg``) says:
    ``image_copies`` random-resize copies of image-task records (written under
    ``image_dir``) and ``dialogue_copies`` turn-dropout copies of intent records."""
    images = [r for r in records if r.task != INTENT_TASK]
    out = list(records)
    if acfg.image_copies:
        out += resize_copies(images, image_dir, copies=acfg.image_copies, scale=tuple(acfg.scale),
                             seed=seed)
    if acfg.dialogue_copies:
        out += dialogue_dropout(records, p_agent=acfg.p_agent, p_user=acfg.p_user,
                                copies=acfg.dialogue_copies, seed=seed)
    return out
