"""The memory plan of the paper profile's models (no GPU, no download)."""

import sys
from pathlib import Path

import pandas as pd
import torch
import pytest

from kdsl_utils.config import ModelCfg
from kdsl_utils.models import memory_plan as mp
from kdsl_utils.models.memory_plan import (
    GiB, MODES, PAPER_MODEL, analytic_param_counts, build_model, mire_lengths, model_param_counts,
    nf4_bytes_per_value, plan, plan_table)
from kdsl_utils.models.qwen_vl import prepare_for_finetune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import memory_plan as bench  # noqa: E402


@pytest.fixture(scope="module")
def meta7b():
    return build_model("7b", "meta")


def test_plan_counts_equal_the_meta_models(meta7b):
    c = analytic_param_counts("7b")
    assert c == model_param_counts(meta7b)
    assert c.total == sum(p.numel() for p in meta7b.parameters())
    assert 8.2e9 < c.total < 8.4e9 and 0.6e9 < c.vision < 0.7e9  # "8.3B with the vision tower"
    assert all(p.device.type == "meta" for p in meta7b.parameters())
    two = analytic_param_counts("2b")
    assert two == model_param_counts(build_model("2b", "meta")) and 2.1e9 < two.total < 2.3e9


def test_lora_count_is_what_peft_trains():
    mcfg = ModelCfg()
    model = prepare_for_finetune(build_model("2b", "meta"), mcfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == analytic_param_counts("2b", mcfg).lora
    # the plan charges float32 adapters: peft's autocast_adapter_dtype makes them so
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_plan_terms():
    c = analytic_param_counts("7b")
    lo, hi = plan("7b", "lora", 830), plan("7b", "lora", 3464)
    assert lo["weights"] == hi["weights"] == 2 * c.total
    assert lo["activations"] < hi["activations"] and lo["peak_train"] < hi["peak_train"]
    assert lo["trainable_state"] == 16 * c.lora
    full = plan("7b", "full", 3464)
    assert full["params_trainable"] == c.lm and full["trainable_state"] == 6 * c.lm
    q = plan("7b", "qlora", 3464)
    assert q["weights"] == pytest.approx(c.lm_linear * nf4_bytes_per_value()
                                         + 4 * (c.total - c.lm_linear))
    assert q["weights"] < lo["weights"] < full["peak_train"]
    for p in (lo, hi, full, q):
        assert p["peak_train"] == p["weights"] + p["trainable_state"] + p["activations"]
        assert p["scoring"] > p["weights"]
    # the loss head alone at the longest record: bf16 logits + float32 upcast + log-softmax
    assert hi["activations"] > 3464 * 152064 * 10
    with pytest.raises(ValueError, match="unknown mode"):
        plan("7b", "adapter", 10)


def test_lengths_from_notebook00_csv(tmp_path):
    assert (mire_lengths().median, mire_lengths().max) == (830, 3464)
    p = tmp_path / "lengths.csv"
    pd.DataFrame({"text_tokens": [100, 200, 300], "visual_tokens": [0, 50, 700]}).to_csv(p)
    got = mire_lengths(p)
    assert (got.median, got.max, got.source) == (250, 1000, str(p))
    t = plan_table(("2b",), lengths=got)
    assert len(t) == len(MODES) * 2 and set(t.tokens) == {250, 1000}


def test_benchmark_writes_csv_and_readme_section(tmp_path, capsys):
    out, readme = tmp_path / "plan.csv", tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    assert bench.main(["--models", "2b", "--out", str(out), "--readme", str(readme)]) == 0
    t = pd.read_csv(out)
    assert len(t) == 6 and (t.lengths_source == "notebook 00 on real MIRE train").all()
    row = t[(t["mode"] == "lora") & (t.length == "max")].iloc[0]
    assert row.peak_train_gib == pytest.approx(plan("2b", "lora", 3464)["peak_train"] / GiB, abs=1e-3)
    text = readme.read_text()
    assert "kept" in text and text.count(bench.MARKERS[0]) == 1 and "| 2b | qlora | max |" in text
    assert bench.main(["--models", "2b", "--out", str(out), "--readme", str(readme)]) == 0
    assert readme.read_text() == text  # regenerated in place, not appended twice
    assert "equal to the meta model" in capsys.readouterr().out


PROBE = {  # Qwen2-VL's layer at a width a CPU runs in a second (7B's I/d ratio, GQA)
    "text": {"vocab_size": 151936, "hidden_size": 256, "intermediate_size": 1344,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
             "max_window_layers": 2,
             "rope_parameters": {"rope_type": "default", "mrope_section": [8, 12, 12],
                                 "rope_theta": 1e6}},
    "vision": {"depth": 1, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2},
    "vision_hidden": 256, "tie": False,
}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_layer_activation_bytes_are_what_autograd_saves(mode, monkeypatch):
    """The plan's per-token layer activations equal the tensors a bf16 decoder layer saves
    for backward (counted once per storage, parameters excluded)."""
    monkeypatch.setitem(mp.ARCHS, "probe", PROBE)
    torch.manual_seed(0)
    mcfg = PAPER_MODEL
    model = build_model("probe", "cpu", dtype=torch.bfloat16)
    if mode == "lora":
        model = prepare_for_finetune(model, mcfg)
    model.train()
    mods = {type(m).__name__: m for m in model.modules()}
    layer, text = mods["Qwen2VLDecoderLayer"], mods["Qwen2VLTextModel"]
    T = 256
    x = torch.randn(1, T, 256, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(T).view(1, 1, T).expand(3, 1, T)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params and t is not x:  # the layer input is the checkpoint, counted apart
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.no_grad():
        emb = text.rotary_emb(x, pos)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, position_ids=pos, position_embeddings=emb)
    got = sum(saved.values()) / T
    want = mp._layer_bytes_per_token("probe", mode == "lora", mcfg)
    assert got == pytest.approx(want, rel=0.02), (got, want)
