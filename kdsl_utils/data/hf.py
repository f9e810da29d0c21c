"""Conversion of records to a Hugging Face ``datasets.Dataset``."""

from __future__ import annotations

from collections.abc import Sequence

from .records import Record


def to_hf_dataset(records: Sequence[Record], *, decode_images: bool = False):
    """A ``datasets.Dataset`` with one row per record.

    Columns: id, task, instruction, label (None if unlabelled), candidates (list[str]),
    n_images, images (list of file paths, or of ``datasets.Image`` features when
    ``decode_images`` — decoded lazily on access), user_text, dialogue.
    """
    import datasets

    rows = {
        "id": [r.id for r in records],
        "task": [r.task for r in records],
        "instruction": [r.instruction for r in records],
        "label": [r.label for r in records],
        "candidates": [list(r.candidates) for r in records],
        "n_images": [len(r.images) for r in records],
        "images": [[str(p) for p in r.images] for r in records],
        "user_text": [r.user_text for r in records],
        "dialogue": [r.dialogue_text for r in records],
    }
    features = datasets.Features({
        "id": datasets.Value("string"), "task": datasets.Value("string"),
        "instruction": datasets.Value("string"), "label": datasets.Value("string"),
        "candidates": datasets.Sequence(datasets.Value("string")),
        "n_images": datasets.Value("int32"),
        "images": datasets.Sequence(datasets.Image() if decode_images else datasets.Value("string")),
        "user_text": datasets.Value("string"), "dialogue": datasets.Value("string"),
    })
    return datasets.Dataset.from_dict(rows, features=features)
