"""Records as a Hugging Face ``datasets.Dataset``: the data interchange of the qwen_vl backend
(:mod:`kdsl_utils.models.sft` adds the token plan with ``map`` and encodes pixels lazily with
``with_transform``; the Trainer and label scoring read the result)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import datasets

from .records import Record

RECORD_FEATURES = {
    "id": datasets.Value("string"), "task": datasets.Value("string"),
    "instruction": datasets.Value("string"), "label": datasets.Value("string"),
    "candidates": datasets.List(datasets.Value("string")),
    "n_images": datasets.Value("int32"),
    "user_text": datasets.Value("string"), "dialogue": datasets.Value("string"),
}


def to_hf_dataset(records: Sequence[Record], *, decode_images: bool = False) -> datasets.Dataset:
    """A ``datasets.Dataset`` with one row per record, in order.

    Columns: id, task, instruction, label (None if unlabelled), candidates (list[str]),
    n_images, images (list of file paths, or of ``datasets.Image`` features when
    ``decode_images`` — decoded lazily on access), user_text, dialogue.
    """
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
    image = datasets.Image() if decode_images else datasets.Value("string")
    features = datasets.Features({**RECORD_FEATURES, "images": datasets.List(image)})
    return datasets.Dataset.from_dict(rows, features=features)


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """No ``datasets`` progress bars inside the block (a ``map`` over a few hundred in-memory
    rows would print one per call into every notebook); the global setting is restored."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
