"""Tables that describe a loaded MIRE dataset (notebook 00): counts, lengths, validation,
its metric rows and the examples it shows."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from .labels import ALL_LABELS, LABEL_TO_TASK
from .records import LoadReport, Record
from .images import upright_size
from .tokens import qwen2_tokenizer, visual_tokens


def label_counts(splits: Mapping[str, Sequence[Record]]) -> pd.DataFrame:
    """One row per (split, label) of the registry, zero counts included: split, task, label, n."""
    rows = []
    for split, recs in splits.items():
        counts = pd.Series([r.label for r in recs if r.label is not None]).value_counts()
        for lab in ALL_LABELS:
            rows.append({"split": split, "task": LABEL_TO_TASK[lab], "label": lab,
                         "n": int(counts.get(lab, 0))})
    return pd.DataFrame(rows)


def validation_table(reports: Mapping[str, LoadReport]) -> pd.DataFrame:
    """Per split: records read, kept, skipped, and the count of each problem class."""
    rows = []
    for split, rep in reports.items():
        row = {"split": split, "read": rep.n_read, "kept": rep.n_kept, "skipped": rep.n_skipped}
        for p in rep.problems:
            row[p.kind] = row.get(p.kind, 0) + 1
        rows.append(row)
    return pd.DataFrame(rows).fillna(0)


def length_table(splits: Mapping[str, Sequence[Record]], min_pixels: int, max_pixels: int,
                 text_tokens: bool = True) -> pd.DataFrame:
    """One row per record: split, id, task, label, n_images, n_turns, chars (instruction),
    dialogue_chars, text_tokens (real Qwen2 BPE of the instruction without image
    placeholders), visual_tokens (sum over images at the given pixel bounds)."""
    tok = qwen2_tokenizer() if text_tokens else None
    rows = []
    for split, recs in splits.items():
        texts = [r.instruction.replace("<image>", "") for r in recs]
        n_tok = [len(x) for x in tok(texts)["input_ids"]] if tok and texts else [None] * len(recs)
        for r, nt in zip(recs, n_tok):
            vis = sum(visual_tokens(*upright_size(p), min_pixels, max_pixels) for p in r.images)
            rows.append({"split": split, "id": r.id, "task": r.task, "label": r.label,
                         "n_images": len(r.images), "n_turns": len(r.turns),
                         "chars": len(r.instruction), "dialogue_chars": len(r.dialogue_text),
                         "text_tokens": nt, "visual_tokens": vis})
    return pd.DataFrame(rows)


#: Notebook 00's ``metrics.csv``: metric -> its value for one (split, task) group of
#: :func:`length_table` (``total_tokens`` = text + visual tokens of a record).
DATASET_METRICS = {
    "n_records": lambda g: len(g),
    "n_labels_used": lambda g: g["label"].nunique(),
    "mean_images": lambda g: g["n_images"].mean(),
    "mean_text_tokens": lambda g: g["text_tokens"].mean(),
    "p95_total_tokens": lambda g: (g["text_tokens"] + g["visual_tokens"]).quantile(0.95),
    "mean_visual_tokens": lambda g: g["visual_tokens"].mean(),
}


def dataset_metric_rows(lengths: pd.DataFrame, seed: int,
                        experiment: str = "00_data") -> list[dict]:
    """Tidy metric rows (``variant="dataset"``) of :data:`DATASET_METRICS` per split and task."""
    rows = []
    for (split, task), g in lengths.groupby(["split", "task"]):
        base = {"experiment": experiment, "variant": "dataset", "seed": seed, "split": split,
                "task": task}
        rows += [{**base, "metric": m, "value": float(f(g))} for m, f in DATASET_METRICS.items()]
    return rows


def gallery_sample(records: Sequence[Record], seed: int, n_scene: int = 8,
                   n_dialogue: int = 4) -> tuple[list[tuple[Path, str]], list[Record]]:
    """Examples to show: ``n_scene`` image-scene records and ``n_dialogue`` dialogues with
    images, sampled with ``random.Random(seed)``. Returns (image, caption) items for
    :func:`kdsl_utils.plots.gallery` (scenes first, then each dialogue's first image with the
    caption ``[对话] label``) and the sampled dialogue records."""
    rng = random.Random(seed)
    scenes = [r for r in records if r.task == "image"]
    scenes = rng.sample(scenes, k=min(n_scene, len(scenes)))
    dialogues = [r for r in records if r.task == "intent" and r.images]
    dialogues = rng.sample(dialogues, k=min(n_dialogue, len(dialogues)))
    items = [(r.images[0], r.label) for r in scenes]
    items += [(r.images[0], f"[对话] {r.label}") for r in dialogues]
    return items, dialogues
