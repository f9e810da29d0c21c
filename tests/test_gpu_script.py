"""benchmarks/qwen_vl_gpu.py: its control flow on the CPU (--cpu-smoke), and what it carries."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdsl_utils.config import resolve
from kdsl_utils.models import memory_plan as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import qwen_vl_gpu as gpu  # noqa: E402


def test_builtin_records_have_mire_lengths():
    mcfg = resolve("paper").model
    med = gpu.builtin_shape(830, mcfg.max_pixels, [3] * 25)
    mx = gpu.builtin_shape(3464, mcfg.max_pixels, [4] * 23)
    assert (med.prompt_len, len(med.grids), med.visual) == (830, 1, 768)
    assert (mx.prompt_len, len(mx.grids), mx.visual) == (3464, 4, 4 * 768)
    assert med.patches == 4 * 768 and min(mx.text_chunks) > 0
    ids = gpu.make_inputs(mx, torch.device("cpu"), 152064, np.random.default_rng(0),
                          with_answer=False, dtype=torch.float32)
    assert ids["input_ids"].shape[1] == 3464 and int(ids["mm_token_type_ids"].sum()) == 3072
    assert ids["pixel_values"].shape == (4 * 3072, 3 * 2 * 14 * 14)


def test_step_flops():
    T, P = 3464, 4 * 3072
    lora, full = gpu.step_flops("7b", "lora", T, P), gpu.step_flops("7b", "full", T, P)
    c = mp.analytic_param_counts("7b")
    n = c.lm - 152064 * 3584  # the input embedding is a lookup, not a matmul
    assert full - lora == pytest.approx(2 * n * T)
    assert lora > 4 * n * T


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_refuses_without_cuda(capsys):
    assert gpu.main(["--readme", ""]) == 2
    assert "--cpu-smoke" in capsys.readouterr().err


def test_cpu_smoke_runs_every_stage_and_renders(tmp_path):
    out, readme = tmp_path / "r.json", tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n<!-- memory-plan:start -->\nplan\n<!-- memory-plan:end -->\n")
    assert gpu.main(["--cpu-smoke", "--out", str(out), "--readme", str(readme)]) == 0
    info = json.loads(out.read_text())
    benches = {(r["bench"], r["length"]) for r in info["rows"]}
    for b in ("lora train step", "full train step", "label scoring", "generate+parse b1",
              "generate+parse b2"):
        assert {(b, "median"), (b, "max")} <= benches, b
    assert info["smoke"] and any("QLoRA skipped" in s for s in info["skipped"])
    train = [r for r in info["rows"] if r["bench"] == "lora train step"]
    for r in train:  # the plan beside each measurement is the plan of that shape
        assert r["plan_gib"] == pytest.approx(mp.plan("dry", "lora", r["tokens"])["peak_train"] / mp.GiB)
        assert r["ms"] > 0 and r["trainable_params"] == mp.analytic_param_counts("dry").lora
    text = readme.read_text()
    assert "plan" in text and text.count(gpu.MARKERS[0]) == 1 and "not a measurement" in text
    assert re.search(r"\| dry \| label scoring \| max \| \d+ \|", text)
    assert gpu.main(["--render", str(out), "--readme", str(readme)]) == 0
    assert readme.read_text() == text


def test_carried_wheels_match_the_pins():
    """gpu_wheels.sh carries the versions pyproject pins (the GPU run measures that code)."""
    pins = dict(re.findall(r'"([a-z0-9_-]+)==([^"]+)"', (REPO / "pyproject.toml").read_text()))
    carried = dict(re.findall(r"([a-z0-9_-]+)==(\S+)", (REPO / "benchmarks/gpu_wheels.sh").read_text()))
    for name in ("transformers", "peft", "datasets", "bitsandbytes"):
        assert carried[name] == pins[name], name
