"""The ``tiny`` profile's Qwen2-VL twin: every line of the ``paper`` path, on CPU, in seconds.

A tiny randomly initialised :class:`~transformers.Qwen2VLForConditionalGeneration` (2 text
layers, hidden 64, a 2-block vision tower with the real patch 14 / merge 2 geometry), a real
Qwen2-VL image processor, and a tokenizer that exists offline: a byte-level BPE trained with
``tokenizers`` on the label strings, the prompt templates and the texts of the records given,
with Qwen2's own normaliser/pre-tokeniser, Qwen2-VL's special tokens and chat template. It is
written to a directory laid out like a hub checkpoint (``config.json``, safetensors,
tokenizer files, ``preprocessor_config.json``, ``chat_template.json``) and then loaded back
through exactly the loaders the ``paper`` profile uses
(:func:`kdsl_utils.models.qwen_vl.load_processor`
and :func:`~kdsl_utils.models.qwen_vl.load_model`).

Built once per content hash (corpus, seed, architecture, library versions) under
``$KDSL_CACHE_DIR/tiny-qwen2vl/<hash>`` (default ``<repo>/.cache``), atomically, so parallel
test workers and re-runs reuse it. Byte-level BPE means any text (unseen Chinese included)
is encodable, so a twin built from the training records also reads held-out records.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (GenerationConfig, Qwen2Tokenizer, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..data import synth_templates
from ..data.labels import ALL_LABELS
from ..data.prompts import image_instruction, intent_instruction
from ..data.records import Record
from ..hashing import json_digest
from .sft import SYSTEM_PROMPT, format_answer, format_prompt

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_FORMAT = 3  # bump when the twin's construction changes (invalidates caches)

#: Qwen2-VL's special tokens, in the order of its tokenizer (ids 0.. in the twin).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Qwen2-VL-Instruct's chat template (as shipped with Qwen/Qwen2-VL-{2B,7B}-Instruct).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyArch:
    """Sizes of the twin. Geometry that the data path depends on (patch 14, merge 2,
    temporal patch 2, M-RoPE) is the real one; only widths and depths shrink."""

    vocab_size: int = 2000  # BPE target; the trained vocabulary may be smaller
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # sums to head_dim / 2 = 8
    vision_depth: int = 2
    vision_dim: int = 32
    vision_heads: int = 2
    vision_mlp_ratio: int = 2
    # Qwen's own 0.02 leaves a frozen random lm_head so flat (logits within about +-1) that
    # LoRA cannot move the loss visibly in a few steps; 0.1 gives it room.
    initializer_range: float = 0.1


def _strings(obj) -> Iterable[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _strings(v)


def builtin_texts() -> list[str]:
    """Every string of the synthetic generator's text material (Chinese e-commerce speech,
    product words, screenshot vocabulary): a fixed corpus, independent of any data split."""
    return [
        s
        for name in sorted(vars(synth_templates))
        if name.isupper()
        for s in _strings(getattr(synth_templates, name))
    ]


def tiny_corpus(records: Iterable[Record] = ()) -> list[str]:
    """Tokenizer training texts: labels, templates, chat scaffolding, the synthetic
    generator's text material, and the texts of ``records`` if any."""
    texts = list(ALL_LABELS) + builtin_texts()
    texts += [image_instruction(n) for n in (1, 2, 3, 4)]
    texts.append(intent_instruction([("用户", "<image>"), ("客服", "您好"), ("用户", "你好")]))
    texts.append(format_prompt("你好<image>", SYSTEM_PROMPT) + format_answer(ALL_LABELS[0]))
    for r in records:
        texts.append(r.instruction)
        if r.label:
            texts.append(r.label)
    return sorted(set(texts))


def train_tokenizer(corpus: Sequence[str], vocab_size: int = 2000):
    """A Qwen2 tokenizer (byte-level BPE, Qwen2's regex and NFC) trained on ``corpus``."""
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # max_token_length=6 (bytes shown as chars): at most two CJK characters per token, like
    # most of Qwen's CJK vocabulary, so labels stay multi-token (2-17 tokens) as with Qwen.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        max_token_length=6,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(list(corpus), trainer)
    state = json.loads(tk.to_str())
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]
    ]
    tok = Qwen2Tokenizer(
        vocab=tk.get_vocab(),
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    tok.chat_template = QWEN2VL_CHAT_TEMPLATE
    return tok


def tiny_config(tokenizer, arch: TinyArch = TinyArch()):
    """A Qwen2VLConfig of the twin's sizes with the tokenizer's special-token ids."""
    tid = tokenizer.convert_tokens_to_ids
    head_dim = arch.hidden // arch.heads
    if 2 * sum(arch.mrope_section) != head_dim:
        raise ValueError(
            f"mrope_section {arch.mrope_section} must sum to head_dim/2 = {head_dim // 2}"
        )
    return Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": arch.hidden,
            "intermediate_size": arch.intermediate,
            "num_hidden_layers": arch.layers,
            "num_attention_heads": arch.heads,
            "num_key_value_heads": arch.kv_heads,
            "max_position_embeddings": 8192,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": list(arch.mrope_section),
                "rope_theta": 1000000.0,
            },
            "bos_token_id": tid("<|endoftext|>"),
            "eos_token_id": tid("<|im_end|>"),
            "pad_token_id": tid("<|endoftext|>"),
            "max_window_layers": arch.layers,
            "initializer_range": arch.initializer_range,
        },
        vision_config={
            "depth": arch.vision_depth,
            "embed_dim": arch.vision_dim,
            "hidden_size": arch.hidden,
            "num_heads": arch.vision_heads,
            "mlp_ratio": arch.vision_mlp_ratio,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
            "initializer_range": arch.initializer_range,
        },
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=False,
        initializer_range=arch.initializer_range,
    )


def build_tiny_qwen2vl(
    out_dir: Path | str,
    records: Iterable[Record] = (),
    *,
    seed: int = 0,
    min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 16 * 28 * 28,
    arch: TinyArch = TinyArch(),
) -> Path:
    """Write the twin (model, tokenizer, image processor, chat template) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(tiny_corpus(records), arch.vocab_size)
    config = tiny_config(tok, arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).to(torch.float32)
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, eot], pad_token_id=eot, bos_token_id=eot, do_sample=False
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(out)
    (out / "chat_template.json").write_text(
        json.dumps({"chat_template": QWEN2VL_CHAT_TEMPLATE}, ensure_ascii=False, indent=1),
        encoding="utf-8",
    )
    return out


def cache_root() -> Path:
    return Path(os.environ.get("KDSL_CACHE_DIR", REPO_ROOT / ".cache"))


def tiny_key(records: Iterable[Record] = (), *, seed: int = 0, arch: TinyArch = TinyArch()) -> str:
    payload = {
        "format": TINY_FORMAT,
        "seed": seed,
        "arch": asdict(arch),
        "corpus": tiny_corpus(records),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    return json_digest(payload, 16)


def tiny_model_dir(
    records: Iterable[Record] = (),
    *,
    seed: int = 0,
    min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 16 * 28 * 28,
    arch: TinyArch = TinyArch(),
    cache_dir: Path | str | None = None,
) -> Path:
    """The cached twin for these records (built on first use), as a local model path."""
    records = list(records)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / "tiny-qwen2vl" / tiny_key(records, seed=seed, arch=arch)
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        build_tiny_qwen2vl(
            tmp, records, seed=seed, min_pixels=min_pixels, max_pixels=max_pixels, arch=arch
        )
        try:
            tmp.rename(final)
        except OSError:  # another process won the race; its copy is identical
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
