"""The ``paper`` profile's Qwen2-VL mICL encoder (kdsl_utils.models.qwen_repr), run on the
``tiny`` twin on the CPU: prompts and the positions read, the gate, the embeddings, one
contrastive step, the ablation variants, and notebook 04's run on this encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import synthetic_mire
from kdsl_utils import representations as R
from kdsl_utils.config import resolve
from kdsl_utils.contrastive import VARIANTS
from kdsl_utils.models import qwen_repr as Q
from kdsl_utils.models.sft import IMAGE_PAD, VISION_START

# LoRA dropout off: a loss computed twice on one batch is the same number (the step test)
CFG = resolve("tiny", model__lora_dropout=0.0)
pytestmark = pytest.mark.usefixtures("one_torch_thread")




@pytest.fixture(scope="module")
def mire(tmp_path_factory):
    return synthetic_mire(tmp_path_factory, per_label=3)


@pytest.fixture(scope="module")
def micl():
    return Q.MiclEncoder(CFG)


@pytest.fixture(scope="module")
def batch(mire):
    """The records (3 each) of 3 image labels and 3 intent labels (related pairs), with at
    least one dialogue that shows images."""
    out = []
    for task in ("image", "intent"):
        labels = sorted({r.label for r in mire.train if r.task == task})
        with_img = {r.label for r in mire.train if r.task == task and r.images}
        chosen = sorted(labels, key=lambda lab: (lab not in with_img, lab))[:3]
        out += [r for r in mire.train if r.label in chosen]
    assert any(r.task == "intent" and r.images for r in out)
    return out


def _dialogue_with_images(records):
    return next(r for r in records if r.task == "intent" and r.images)


def test_config_profiles_and_sources():
    assert resolve("paper").repr.encoder == "qwen_micl"
    assert resolve("tiny").repr.encoder == "qwen_micl"
    assert resolve("mini").repr.encoder == "features"
    assert Q.micl_source(resolve("paper")) == "Qwen/Qwen2-VL-7B-Instruct"
    assert Q.micl_source(resolve("paper", repr__llm="small")) == "Qwen/Qwen2-VL-2B-Instruct"
    assert Q.micl_source(CFG) == "tiny"


def test_micl_prompt_reads_the_right_positions(micl, batch):
    r = _dialogue_with_images(batch)
    p = micl.prompt(r, VARIANTS["full"])
    dec = micl.processor.tokenizer.decode
    ids = list(p.input_ids)
    head, rest = dec(ids[:p.visual_pos + 1]), dec(ids[p.visual_pos + 1:])
    # the visual position closes the image part: 笔记：{"图片":"<images>"}，压缩为一个词：“
    assert head.startswith(Q.NOTE + '{"图片":"') and head.endswith('"}' + Q.COMPRESS)
    assert head.count(VISION_START) == len(r.images) and "内容" not in head
    # ... right before the image's compression word; the note follows, the prompt ends open
    assert rest.startswith(Q.IMG_EMB + "”。" + Q.NOTE + '{"内容":"')
    assert IMAGE_PAD not in rest and "[图1]" in rest and r.turns[-1].text.split("<image>")[-1] in rest
    assert dec(ids).endswith(Q.COMPRESS) and p.status == "full"
    img = next(x for x in batch if x.task == "image")
    assert dec(list(micl.prompt(img, VARIANTS["full"]).input_ids)).endswith('{"内容":""}' + Q.COMPRESS)


def test_hidden_states_are_the_causal_states_at_those_positions(micl, batch):
    """h_v = the last state of the prompt cut after the visual position (it saw the images
    only); h = the last token's state, also for the shorter prompt of a padded batch."""
    rep = micl.new_representation("full", CFG.repr, seed=0)
    micl.activate(rep.adapter)
    r, img = _dialogue_with_images(batch), next(x for x in batch if x.task == "image")
    p, q = micl.prompt(r, rep.variant), micl.prompt(img, rep.variant)
    assert q.n_tokens < p.n_tokens
    cut = Q.MiclPrompt("cut", p.input_ids[:p.visual_pos + 1], -1, p.images, p.max_pixels, "full")
    with torch.no_grad():
        h, h_v, v, has_image = micl.hidden_states([p, q])
        h_cut, _, v_cut, _ = micl.hidden_states([cut])
        h_q, _, _, _ = micl.hidden_states([q])
    torch.testing.assert_close(h_v[0], h_cut[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h[1], h_q[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(h[0], h_v[0]) and has_image.tolist() == [True, True]
    torch.testing.assert_close(v[0], v_cut[0])  # tower features: the record's images only
    assert v.shape == (2, micl.vision_dim) and h.shape == (2, micl.hidden)


def test_gate_equals_the_formula():
    torch.manual_seed(0)
    head = Q.FusionHead(hidden=8, vision_dim=5, tau=0.07, late_fusion=True)
    assert head.gate.w.bias is None and head.proj.bias is None
    bound = (6 / (16 + 8)) ** 0.5  # Xavier-uniform bound of W: (8, 16)
    assert head.gate.w.weight.abs().max() <= bound
    h, v = torch.randn(3, 8), torch.randn(3, 5)
    pv = v @ head.proj.weight.T
    z = torch.sigmoid(torch.cat([h, pv], 1) @ head.gate.w.weight.T)
    torch.testing.assert_close(head(h, v), z * h + (1 - z) * pv)
    plain = Q.FusionHead(hidden=8, vision_dim=5, tau=0.07, late_fusion=False)
    assert torch.equal(plain(h, v), h) and plain.gate is None
    assert abs(Q.MiclRepresentation("full", None, "a", head).temperature - 0.07) < 1e-6


def test_embeddings_shape_and_normalisation(micl, batch):
    rep = micl.new_representation("full", CFG.repr, seed=0)
    e = rep.embed(Q.MiclInputs(batch))
    assert e.shape == (len(batch), micl.hidden) and e.dtype == np.float32
    assert np.isfinite(e).all() and np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


def test_one_contrastive_step_lowers_the_loss(micl, batch):
    rc = CFG.repr
    rep = micl.new_representation("full", rc, seed=0)
    params = micl.parameters(rep)
    lora_b = [p for n, p in micl.peft.named_parameters() if f"lora_B.{rep.adapter}." in n]
    assert lora_b and all(float(p.detach().abs().max()) == 0 for p in lora_b)  # fresh: the base model
    opt = torch.optim.AdamW(params, lr=rc.llm_learning_rate)
    micl.peft.train()
    loss = micl.batch_loss(rep, batch, rc)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = micl.batch_loss(rep, batch, rc)
    micl.peft.eval()
    assert float(after) < float(loss.detach())
    assert any(float(p.detach().abs().max()) > 0 for p in lora_b)  # the adapter moved, not just the head


def test_ablation_variants_differ(micl, batch):
    x = Q.MiclInputs(batch)
    emb = {v: micl.new_representation(v, CFG.repr, seed=0).embed(x) for v in VARIANTS}
    names = list(emb)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.allclose(emb[a], emb[b], atol=1e-4), (a, b)
    img = [i for i, r in enumerate(batch) if r.task == "image"]
    assert np.allclose(emb["text_only"][img], emb["text_only"][img[0]], atol=1e-5)  # no pixels
    r = _dialogue_with_images(batch)
    dec = micl.processor.tokenizer.decode
    assert IMAGE_PAD not in dec(list(micl.prompt(r, VARIANTS["text_only"]).input_ids))
    only_img = dec(list(micl.prompt(r, VARIANTS["image_only"]).input_ids))
    assert only_img.endswith('","内容":""}' + Q.COMPRESS) and only_img.count(VISION_START) == len(r.images)
    plain = micl.prompt(r, VARIANTS["no_micl"])
    assert plain.visual_pos == -1 and dec(list(plain.input_ids)).count(Q.NOTE) == 1


def test_long_prompts_downscale_then_cut_the_oldest_text(micl, batch):
    """Over max_length: images halve to min_pixels (never dropped), then the dialogue loses
    characters from its start (the latest turns stay)."""
    r = _dialogue_with_images(batch)
    full = micl.prompt(r, VARIANTS["full"])
    tk = micl.tokens
    saved = sum(tk.n_image_tokens(x) - tk.n_image_tokens(x, tk.min_pixels) for x in r.images)
    limit = full.n_tokens - saved - 5  # downscaling alone is not enough
    small = Q.MiclEncoder(resolve("tiny", model__max_length=limit))
    p = small.prompt(r, VARIANTS["full"])
    assert p.status == "text" and p.max_pixels == tk.min_pixels and p.n_tokens <= limit
    ids = list(p.input_ids)
    assert ids.count(tk.image_token_id) == sum(tk.n_image_tokens(x, tk.min_pixels) for x in r.images)
    text = small.processor.tokenizer.decode(ids)
    kept = text.split('{"内容":"')[1].removesuffix('"}' + Q.COMPRESS)
    whole = Q.note_text(r)
    assert 0 < len(kept) < len(whole) and whole.endswith(kept)  # a suffix: the oldest went


def test_run_representations_on_the_micl_encoder(mire):
    run = R.run_representations(CFG, mire.train, mire.tests, seed=0,
                                variants=("full", "no_late_fusion"), progress=False)
    m = run.metrics
    assert {"knn_full", "knn_no_late_fusion"} <= set(m.variant)
    assert m[m.metric.str.startswith("recall@")].value.between(0, 1).all()
    assert len(run.fits) == 2 and np.isfinite(run.fits.final_loss).all()
    assert (run.fits.n_train > len(mire.train) * (1 - CFG.dev_fraction)).all()  # + copies
    t = R.knn_table(m, "qwen_micl")
    assert any("Qwen2-VL" in i for i in t.index)
    rep = run.reps["full"]
    test = mire.tests["test1"]
    near = R.nearest_labels(rep, test, Q.MiclInputs(list(test)), mire.train, Q.MiclInputs(mire.train))
    assert len(near) == len(test) and all(lab is not None for lab in near)
