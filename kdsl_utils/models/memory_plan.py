"""Memory plan of the ``paper`` profile's models without a GPU (and their real-size configs).

Qwen2-VL-2B/7B-Instruct are described here by the values of their public ``config.json``
(nothing is downloaded), built on PyTorch's ``meta`` device (shapes, no storage: a second or
so on a CPU) and planned per fine-tuning mode for MIRE's sequence lengths:

* https://huggingface.co/Qwen/Qwen2-VL-7B-Instruct/blob/main/config.json
* https://huggingface.co/Qwen/Qwen2-VL-2B-Instruct/blob/main/config.json

The same configs build the random-init real-size models of ``benchmarks/qwen_vl_gpu.py``,
whose measured peaks are reported beside this plan.

The plan, per model × mode (``lora`` / ``qlora`` / ``full``, as
:func:`kdsl_utils.models.qwen_vl.prepare_for_finetune` sets them up) × sequence length T
(tokens, visual tokens included; batch 1 as in the profile), in bytes:

* **weights** — bf16 (2 B/param); ``qlora``: the decoder's linear weights in NF4 with double
  quantisation (0.5 B + one 8-bit absmax per 64 values + one fp32 constant per 256 blocks),
  and every other parameter (embeddings, ``lm_head``, norms, biases, the vision tower) cast
  to float32 by peft's ``prepare_model_for_kbit_training`` (4 B/param);
* **trainable state** — parameters + gradients + AdamW's two moments. LoRA adapters are
  float32 (peft's ``autocast_adapter_dtype``): 4 + 4 + 8 B/param. ``full``: the language
  model's parameters (``freeze_vision``) train in bf16 as loaded, with gradients and AdamW
  moments in the parameter dtype (the Trainer keeps no fp32 master copy): 2 + 2 + 4 B/param
  on top of their weights;
* **activations** (gradient checkpointing, the profile's default) — the L checkpointed layer
  inputs (T·d bf16 each), one decoder layer recomputed in the backward pass (its saved
  tensors, counted per token below, twice: the recomputed activations and their gradients),
  and the loss head: bf16 logits, their float32 upcast and log-softmax (T·V·(2 + 4 + 4) B).
  The tensors one decoder layer saves for its backward pass, per token, as counted with
  ``torch.autograd.graph.saved_tensors_hooks`` on a bf16 Qwen2-VL layer (the test
  re-counts them): the two RMSNorms' float32 inputs (2 × 4·d B), q/k/v after RoPE and the
  attention output (bf16), the attention's log-sum-exp (4 B per head), and the MLP's gate,
  up and activation outputs (bf16). Full fine-tuning also keeps every projection's input
  (its weight gradient needs it): ``20·d + 8·d_kv + 8·I + 4·heads`` B. With LoRA the frozen
  base keeps no inputs, but each adapted projection keeps its input cast to the adapters'
  float32 and the dropout's output (2 × 4 B per input feature) and A's output (4·r B):
  ``12·d + 8·d_kv + 6·I + 4·heads + Σ(8·in + 4·r)`` B. Attention is assumed to run in a
  fused kernel (flash / memory-efficient SDPA: no T × T matrix);
* **peak (train)** — weights + trainable state + activations at the longest record;
* **scoring** — label scoring (:func:`kdsl_utils.models.scoring.score_candidates`): weights,
  the prompt's KV cache (2·L·T·d_kv bf16) and its copy repeated for the K candidates
  (``batch_repeat_interleave``), one layer's forward transients, and the candidates' float32
  logits.

Not modelled: the CUDA context (~0.5 GiB), allocator fragmentation, cuBLAS workspaces and the
vision tower's transient forward (frozen, no graph kept). The GPU benchmark measures them as
the gap to this plan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from ..config import ModelCfg, resolve
from .qwen_vl import lora_target_regex

GiB = 2**30
MODES = ("lora", "qlora", "full")
PAPER_MODEL = resolve("paper").model  # LoRA rank, targets, frozen vision of the paper profile

# Measured by notebook 00 on the real MIRE train split at the paper profile's pixel bounds
# (text + visual tokens per record, chat format included); lengths.csv overrides them.
MIRE_MEDIAN_TOKENS = 830
MIRE_MAX_TOKENS = 3464
MIRE_MAX_CANDIDATES = 25  # image scene labels (dialogue intent: 23)
LABEL_TOKENS = 8  # a candidate continuation: label tokens + <|im_end|> (padded batch)

# Qwen2-VL special-token ids (config.json; shared by 2B and 7B)
BOS, EOS, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = (
    151643, 151645, 151652, 151653, 151655, 151656)

VISION = {  # config.json "vision_config" (2B and 7B share the 675M-param tower)
    "depth": 32,
    "embed_dim": 1280,
    "num_heads": 16,
    "mlp_ratio": 4,
    "hidden_act": "quick_gelu",
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "in_channels": 3,
}
TEXT_COMMON = {  # config.json top-level values shared by 2B and 7B
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24],
                        "rope_theta": 1000000.0},
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "use_sliding_window": False,
}
ARCHS: dict[str, dict[str, Any]] = {
    "2b": {  # Qwen/Qwen2-VL-2B-Instruct config.json
        "text": {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                 "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                 "max_window_layers": 28},
        "vision_hidden": 1536,
        "tie": True,
    },
    "7b": {  # Qwen/Qwen2-VL-7B-Instruct config.json
        "text": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                 "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                 "max_window_layers": 28},
        "vision_hidden": 3584,
        "tie": False,
    },
    # smoke runs only (CPU checks of the scripts): the same layout with tiny widths
    "dry": {
        "text": {"vocab_size": 151936, "hidden_size": 64, "intermediate_size": 128,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "max_window_layers": 2,
                 "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3],
                                     "rope_theta": 1000000.0}},
        "vision": {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2},
        "vision_hidden": 64,
        "tie": False,
    },
}


def qwen2vl_config(name: str):
    """``transformers.Qwen2VLConfig`` of ``name`` in :data:`ARCHS` (``2b``, ``7b``, ``dry``)."""
    a = ARCHS[name]
    return Qwen2VLConfig(
        text_config={**TEXT_COMMON, **a["text"]},
        vision_config={**VISION, **a.get("vision", {}), "hidden_size": a["vision_hidden"]},
        image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
        tie_word_embeddings=a["tie"],
    )


def build_model(name: str, device: str | torch.device = "meta", *,
                dtype: torch.dtype = torch.bfloat16, attn: str = "sdpa"):
    """Qwen2VLForConditionalGeneration of ``name`` with random weights on ``device``
    (``meta``: shapes only, no memory)."""
    with torch.device(device):
        return Qwen2VLForConditionalGeneration._from_config(
            qwen2vl_config(name), dtype=dtype, attn_implementation=attn)


# --------------------------------------------------------------------------- parameter counts
@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one architecture (numbers of values, not bytes)."""

    total: int
    vision: int  # vision tower + merger
    lm: int  # everything else: embeddings, decoder layers, final norm, lm_head (if untied)
    lm_linear: int  # weights of the decoder layers' projections (what 4-bit quantises)
    lora: int  # LoRA A and B of the profile's targets
    largest_linear: int  # the largest projection weight (QLoRA dequantises one at a time)


def analytic_param_counts(name: str, mcfg: ModelCfg = PAPER_MODEL) -> ParamCounts:
    """The counts from the config values alone (by formula; the test checks them against the
    meta model)."""
    t = ARCHS[name]["text"]
    v = {**VISION, **ARCHS[name].get("vision", {})}
    d, inter, L, V = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
    kv = d // t["num_attention_heads"] * t["num_key_value_heads"]
    proj = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
            "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}  # (in, out)
    lin = sum(i * o for i, o in proj.values())
    layer = lin + (d + kv + kv) + 2 * d  # q/k/v biases, two RMSNorm weights
    lm = V * d * (1 if ARCHS[name]["tie"] else 2) + L * layer + d
    e, depth = v["embed_dim"], v["depth"]
    m = e * v["mlp_ratio"]
    block = 2 * 2 * e + (3 * e * e + 3 * e) + (e * e + e) + (e * m + m) + (m * e + e)
    patch = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2 * e
    merged = e * v["spatial_merge_size"] ** 2
    merger = 2 * e + (merged * merged + merged) + (merged * ARCHS[name]["vision_hidden"]
                                                   + ARCHS[name]["vision_hidden"])
    vision = patch + depth * block + merger
    r = mcfg.lora_r
    lora = L * sum(r * (i + o) for n, (i, o) in proj.items() if n in mcfg.lora_targets)
    if not mcfg.freeze_vision:
        raise ValueError("the plan covers the profile's frozen vision tower (freeze_vision=True)")
    return ParamCounts(total=lm + vision, vision=vision, lm=lm, lm_linear=L * lin, lora=lora,
                       largest_linear=max(i * o for i, o in proj.values()))


def model_param_counts(model, mcfg: ModelCfg = PAPER_MODEL) -> ParamCounts:
    """The same counts read from a built (e.g. ``meta``) model's modules."""
    params = dict(model.named_parameters())
    vision = sum(p.numel() for n, p in params.items() if ".visual." in f".{n}")
    total = sum(p.numel() for p in params.values())
    linear = [m.weight.numel() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and re.search(r"language_model\.layers\.\d+\.", n)]
    rx = lora_target_regex(mcfg)
    lora = sum(mcfg.lora_r * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and re.fullmatch(rx, n))
    return ParamCounts(total=total, vision=vision, lm=total - vision, lm_linear=sum(linear),
                       lora=lora, largest_linear=max(linear))


# --------------------------------------------------------------------------- lengths
@dataclass(frozen=True)
class Lengths:
    median: int
    max: int
    source: str


def mire_lengths(lengths_csv: Path | str | None = None) -> Lengths:
    """Median and max tokens per record (text + visual): from notebook 00's ``lengths.csv``
    (columns ``text_tokens``, ``visual_tokens``) where given, else its real-MIRE values."""
    if lengths_csv is None:
        return Lengths(MIRE_MEDIAN_TOKENS, MIRE_MAX_TOKENS, "notebook 00 on real MIRE train")
    t = pd.read_csv(lengths_csv)
    tot = t["text_tokens"] + t["visual_tokens"]
    return Lengths(int(round(float(tot.median()))), int(tot.max()), str(lengths_csv))


# --------------------------------------------------------------------------- the plan
def nf4_bytes_per_value(blocksize: int = 64, double_quant_block: int = 256) -> float:
    """bitsandbytes NF4 with double quantisation: 4 bits + an 8-bit absmax per block + an
    fp32 constant per ``double_quant_block`` blocks."""
    return 0.5 + 1.0 / blocksize + 4.0 / (blocksize * double_quant_block)


def _layer_bytes_per_token(name: str, lora: bool, mcfg: ModelCfg) -> float:
    """Bytes one decoder layer saves for backward per token (see the module docstring)."""
    t = ARCHS[name]["text"]
    d, inter, h = t["hidden_size"], t["intermediate_size"], t["num_attention_heads"]
    kv = d // h * t["num_key_value_heads"]
    small = 4 * h + 8  # log-sum-exp per head, the two norms' rsqrt
    if not lora:
        return 20 * d + 8 * kv + 8 * inter + small
    ins = {"q_proj": d, "k_proj": d, "v_proj": d, "o_proj": d,
           "gate_proj": d, "up_proj": d, "down_proj": inter}
    adapters = sum(8 * ins[n] + 4 * mcfg.lora_r for n in mcfg.lora_targets if n in ins)
    return 12 * d + 8 * kv + 6 * inter + small + adapters


def plan(name: str, mode: str, tokens: int, mcfg: ModelCfg = PAPER_MODEL, *,
         candidates: int = MIRE_MAX_CANDIDATES, label_tokens: int = LABEL_TOKENS) -> dict:
    """The memory plan (bytes) of ``name`` fine-tuned in ``mode`` on a ``tokens``-long record."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    c = analytic_param_counts(name, mcfg)
    t = ARCHS[name]["text"]
    d, L, V = t["hidden_size"], t["num_hidden_layers"], t["vocab_size"]
    kv = d // t["num_attention_heads"] * t["num_key_value_heads"]
    lora = mode in ("lora", "qlora")
    if mode == "qlora":
        weights = c.lm_linear * nf4_bytes_per_value() + (c.total - c.lm_linear) * 4
    else:
        weights = 2 * c.total
    trainable = c.lora if lora else c.lm
    state = trainable * (16 if lora else 6)  # full: weights already counted; + grad + 2 moments
    layer = _layer_bytes_per_token(name, lora, mcfg) * tokens
    act = L * tokens * d * 2 + 2 * layer + tokens * V * 10
    if mode == "qlora":
        act += 2 * c.largest_linear  # one projection dequantised to bf16 at a time
    kv_cache = 2 * L * tokens * kv * 2
    score_weights = weights + (c.lora * 4 if lora else 0)
    scoring = (score_weights + kv_cache * (1 + candidates)
               + tokens * (4 * d + 2 * t["intermediate_size"]) * 2
               + candidates * label_tokens * V * 4)
    return {
        "model": name, "mode": mode, "tokens": tokens,
        "params_total": c.total, "params_trainable": trainable,
        "weights": weights, "trainable_state": state, "activations": act,
        "peak_train": weights + state + act, "scoring": scoring,
    }


def plan_table(models=("2b", "7b"), modes=MODES, lengths: Lengths | None = None,
               mcfg: ModelCfg = PAPER_MODEL) -> pd.DataFrame:
    """One row per model × mode × length (median and max), sizes in GiB (3 decimals)."""
    lengths = lengths or mire_lengths()
    rows = []
    for name in models:
        for mode in modes:
            for which, T in (("median", lengths.median), ("max", lengths.max)):
                p = plan(name, mode, T, mcfg)
                rows.append({**{k: p[k] for k in ("model", "mode")}, "length": which,
                             "tokens": T, "params_total": p["params_total"],
                             "params_trainable": p["params_trainable"],
                             **{f"{k}_gib": round(p[k] / GiB, 3) for k in
                                ("weights", "trainable_state", "activations", "peak_train",
                                 "scoring")}})
    return pd.DataFrame(rows)
