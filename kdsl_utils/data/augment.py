"""Seeded, optional augmentation of MIRE records.

* **Image**: random-resize copies — the augmentation the challenge's solutions used. Each
  copy rescales every image of a record by a factor in ``scale`` (aspect kept) and writes
  it under ``out_dir``; the copy gets id ``<id>#aug<k>``.
* **Dialogue**: agent-turn dropout — each agent (客服) turn without an image is dropped
  with probability ``p_drop``; customer turns, and so the intent evidence, are kept. Agent
  turns in this domain are often boilerplate (marketing broadcasts, greetings), so this
  teaches the model not to lean on them. The instruction is rebuilt with the challenge's
  template and the record's own candidate list.

Augmented records are new Record objects; the originals are never modified. Both
functions are deterministic given ``seed`` and the record id.
"""

from __future__ import annotations

import dataclasses
import random
import zlib
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .labels import INTENT_TASK
from .prompts import intent_instruction
from .records import AGENT, Record


def _rng(seed: int, record_id: str, k: int) -> random.Random:
    return random.Random(f"{seed}:{zlib.crc32(record_id.encode())}:{k}")


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
                target = out_dir / f"{p.stem}-aug{k}-{j}{p.suffix}"
                if not target.exists():
                    with Image.open(p) as im:
                        w, h = im.size
                        im = im.convert("RGB") if p.suffix.lower() in (".jpg", ".jpeg") else im
                        im.resize((max(8, round(w * f)), max(8, round(h * f))),
                                  Image.Resampling.BICUBIC).save(target)
                new_paths.append(target)
            out.append(dataclasses.replace(r, id=f"{r.id}#aug{k}", images=tuple(new_paths)))
    return out


def drop_agent_turns(records: Sequence[Record], *, p_drop: float = 0.3, copies: int = 1,
                     seed: int = 0) -> list[Record]:
    """Dialogue copies of intent records with image-free agent turns dropped at ``p_drop``."""
    out: list[Record] = []
    for r in records:
        if r.task != INTENT_TASK:
            continue
        for k in range(copies):
            rng = _rng(seed, r.id, 1000 + k)
            turns = tuple(t for t in r.turns
                          if not (t.role == AGENT and not t.images and rng.random() < p_drop))
            # Re-number inline images: dropped turns never carry any, so order is unchanged.
            instr = intent_instruction([(t.role, t.text) for t in turns], r.candidates)
            out.append(dataclasses.replace(r, id=f"{r.id}#dlg{k}", instruction=instr, turns=turns))
    return out
