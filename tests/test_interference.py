import re
import tracemalloc

import numpy as np
import pytest
import torch

from kdsl_utils.config import resolve
from kdsl_utils.interference import (Difference, LowRank, compare, gram, group_row, inner,
                                     input_group, interference_table, stats_from_gram)
from kdsl_utils.models.qwen_vl import (
    load_model, lora_deltas, lora_factors, lora_target_regex, prepare_for_finetune)
from kdsl_utils.models.tiny import tiny_model_dir


def test_sum_of_updates_is_fully_explained():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=200), rng.normal(size=200)
    s = compare(a, b, a + b)
    assert s["r2_both"] == pytest.approx(1.0)
    assert s["a_img"] == pytest.approx(1.0) and s["b_int"] == pytest.approx(1.0)
    assert abs(s["cos_img_int"]) < 0.25  # random directions are near orthogonal
    assert s["r2_img"] + s["r2_int"] == pytest.approx(1.0, abs=0.1)


def test_opposing_and_novel_updates():
    a = np.array([1.0, 0, 0])
    s = compare(a, -a, np.array([0, 0, 2.0]))
    assert s["cos_img_int"] == pytest.approx(-1.0)
    assert s["r2_both"] == pytest.approx(0.0) and s["r2_img"] == pytest.approx(0.0)
    assert s["norm_joint"] == pytest.approx(2.0)


def test_table_per_layer_and_all():
    rng = np.random.default_rng(1)
    img = {"l0": rng.normal(size=(4, 3)), "l1": rng.normal(size=5)}
    inn = {"l0": rng.normal(size=(4, 3)), "l1": rng.normal(size=5)}
    joint = {k: 0.5 * img[k] + 2 * inn[k] for k in img}
    t = interference_table(img, inn, joint)
    assert list(t["layer"]) == ["l0", "l1", "ALL"]
    assert np.allclose(t["a_img"], 0.5) and np.allclose(t["b_int"], 2.0)
    with pytest.raises(ValueError, match="same parameter names"):
        interference_table(img, {"l0": inn["l0"]}, joint)


def test_input_groups_are_reported_apart():
    """With ``inputs``, every row says which tasks' inputs reach it and each group gets its
    own total (the sum of its layers' Gram matrices), before ALL, which is unchanged."""
    rng = np.random.default_rng(3)
    shape = {"ocr": (6, 2), "dialog": (5, 2), "mid": (3, 3)}
    img = {k: rng.normal(size=s) for k, s in shape.items()}
    inn = {k: rng.normal(size=s) for k, s in shape.items()}
    img["dialog"] *= 0.0  # an image-only run never touches the dialogue block ...
    inn["ocr"] *= 0.0  # ... nor an intent-only run the OCR block
    joint = {k: img[k] + inn[k] for k in shape}
    inputs = {"ocr": ("image",), "dialog": ("intent",), "mid": ("image", "intent")}
    t = interference_table(img, inn, joint, inputs=inputs).set_index("layer")
    assert list(t.index) == ["ocr", "dialog", "mid", group_row("image only"),
                             group_row("intent only"), group_row("both tasks"), "ALL"]
    assert t.loc["ocr", "inputs"] == "image only" and t.loc["ALL", "inputs"] == "all"
    want = stats_from_gram(gram((img["mid"], inn["mid"], joint["mid"])))
    assert t.loc[group_row("both tasks"), "cos_img_int"] == pytest.approx(want["cos_img_int"])
    assert np.isnan(t.loc[group_row("image only"), "cos_img_int"])  # a zero update: no angle
    plain = interference_table(img, inn, joint).set_index("layer")
    assert "inputs" not in plain and plain.loc["ALL", "r2_both"] == pytest.approx(t.loc["ALL", "r2_both"])
    assert input_group(()) == "no task" and input_group(["intent", "image"]) == "both tasks"
    with pytest.raises(ValueError, match="inputs lacks"):
        interference_table(img, inn, joint, inputs={"ocr": ("image",)})


# --------------------------------------------------------------------------- low-rank form
def _dense_table(*runs):
    return interference_table(*({k: np.asarray(v.dense() if hasattr(v, "dense") else v)
                                 for k, v in run.items()} for run in runs))


def test_inner_products_of_every_form_equal_dense():
    rng = np.random.default_rng(2)
    lr = [LowRank(rng.normal(size=(2500, 3)), rng.normal(size=(3, 7)), s) for s in (0.5, 2.0)]
    d = rng.normal(size=(2500, 7))  # > ROWS_PER_BLOCK rows: the blocked path
    w0 = torch.randn(2500, 7, dtype=torch.bfloat16)
    diff = Difference(after=w0 + torch.randn(2500, 7).to(torch.bfloat16), before=w0)
    forms = [*lr, d, diff, torch.from_numpy(d).float()]
    for u in forms:
        for v in forms:
            du = u.dense() if hasattr(u, "dense") else np.asarray(u)
            dv = v.dense() if hasattr(v, "dense") else np.asarray(v)
            want = float(np.sum(du.astype(np.float64) * dv.astype(np.float64)))
            assert inner(u, v) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="shapes differ"):
        inner(lr[0], LowRank(rng.normal(size=(2500, 3)), rng.normal(size=(3, 8))))


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Three LoRA fits' factors of the tiny twin (B drawn at random: a trained adapter's
    B is no longer zero) and the same for full fine-tuning (W = W0 + noise)."""
    cfg = resolve("tiny")
    src = tiny_model_dir((), cache_dir=tmp_path_factory.mktemp("tiny"),
                         min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    lora, dense = [], []
    for seed in range(3):
        m = prepare_for_finetune(load_model(src, cfg.model), cfg.model, seed=seed)
        g = torch.Generator().manual_seed(10 + seed)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        lora.append(lora_factors(m))
        dense.append({k: v.numpy() for k, v in lora_deltas(m).items()})
    base = load_model(src, cfg.model)
    w0 = {n: mod.weight.detach().clone() for n, mod in base.named_modules()
          if isinstance(mod, torch.nn.Linear) and re.fullmatch(lora_target_regex(cfg.model), n)}
    g = torch.Generator().manual_seed(0)
    full = [{n: Difference(after=w + 0.01 * torch.randn(w.shape, generator=g), before=w)
             for n, w in w0.items()} for _ in range(3)]
    return lora, dense, full


def test_factored_table_equals_dense_on_tiny_model(tiny_runs):
    lora, dense, full = tiny_runs
    assert all(isinstance(v, LowRank) for v in lora[0].values())
    got, want = interference_table(*lora), interference_table(*dense)
    assert list(got.columns) == list(want.columns) and list(got.layer) == list(want.layer)
    num = [c for c in got.columns if c != "layer"]
    np.testing.assert_allclose(got[num].to_numpy(), want[num].to_numpy(), rtol=1e-5, atol=1e-7)
    got_full = interference_table(*full)
    np.testing.assert_allclose(got_full[num].to_numpy(), _dense_table(*full)[num].to_numpy(),
                               rtol=1e-6, atol=1e-9)
    mixed = interference_table(lora[0], dense[1], lora[2])  # dense and factored together
    np.testing.assert_allclose(mixed[num].to_numpy(), want[num].to_numpy(), rtol=1e-5, atol=1e-7)


def _peak_bytes(width: int, layers: int = 3, r: int = 4) -> int:
    """Peak bytes traced while computing the table of three LoRA runs of ``layers`` square
    layers of ``width`` (float32 torch factors, as :func:`lora_factors` returns them)."""
    g = torch.Generator().manual_seed(0)
    runs = [{f"l{i}": LowRank(torch.randn(width, r, generator=g), torch.randn(r, width, generator=g), 2.0)
             for i in range(layers)} for _ in range(3)]
    tracemalloc.start()
    interference_table(*runs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def test_memory_held_is_independent_of_layer_width():
    _peak_bytes(64)  # first call: one-off allocations (imports, caches)
    narrow, wide = _peak_bytes(1024), _peak_bytes(8192)
    # 8x wider: one dense float64 update of a layer would grow 64x (0.5 GiB at 8192); the
    # table holds r×r products and one block of rows of a factor, whatever the width
    assert wide < 1.25 * narrow + 64 * 1024, (narrow, wide)
    assert wide < 8192 * 8192 * 8 / 1000
