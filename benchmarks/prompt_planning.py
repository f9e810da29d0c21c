"""Prompt planning time against dialogue length (issue 11 item 12: it must grow linearly).

Builds dialogue-intent records whose instruction is ``factor`` times as long (in characters)
as the longest real training dialogue (``--data-dir``'s train.json; 1,683 characters in the
MIRE train file; without data, that number), in two shapes:

* ``turns``: many short turns with an image every customer turn (the ``turns`` rule drops
  the oldest ones, then images are downscaled);
* ``last_turn``: one huge last customer turn (kept whole by the ``turns`` rule, so the
  ``text`` rule cuts characters from its start);

and times :meth:`RecordEncoder.plan` on each with the tiny twin's tokenizer and the
``paper`` profile's token budget (``ModelCfg.max_length``). Prints one row per (shape,
factor): characters, turns, images, the rule applied, seconds, and microseconds per
character (flat = linear). Run: ``python benchmarks/prompt_planning.py [--data-dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from kdsl_utils.config import resolve
from kdsl_utils.data.mire import load_split
from kdsl_utils.data.prompts import intent_instruction
from kdsl_utils.models.qwen_vl import load_processor
from kdsl_utils.models.sft import RecordEncoder
from kdsl_utils.models.tiny import tiny_model_dir

LONGEST_REAL_CHARS = 1683  # the longest instruction of the MIRE train file (measured)
FACTORS = (1, 3, 10, 30, 100)


def longest_real(data_dir: str | None) -> int:
    if data_dir and (Path(data_dir) / "train.json").is_file():
        raw = json.loads((Path(data_dir) / "train.json").read_text(encoding="utf-8"))
        return max(len(r["instruction"]) for r in raw)
    return LONGEST_REAL_CHARS


def long_record(tmp: Path, target_chars: int, shape: str, rid: str):
    """One intent record of about ``target_chars`` characters (written as a MIRE file)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "images").mkdir(exist_ok=True)
    turns, images = [], []
    if shape == "turns":
        k = 0
        while len(intent_instruction(turns)) < target_chars:
            turns.append(("用户", f"第{k}轮 请问这个能用多久呀 <image> 还有别的颜色吗"))
            images.append(f"{rid}-{k % 8}.png")
            turns.append(("客服", f"亲亲 第{k}次回复 这款是不锈钢材质的哦 欢迎下单"))
            k += 1
        turns.append(("用户", "最后的问题: 这个是什么材质的"))
    else:
        turns = [("用户", "你好"), ("客服", "您好, 在的")]
        n = target_chars - len(intent_instruction(turns + [("用户", "")]))
        unit = "这个商品的材质是什么 能不能便宜一点 "
        turns.append(("用户", (unit * (n // len(unit) + 1))[:max(n, 1)] + "<image>"))
        images.append(f"{rid}-0.png")
    rng = np.random.default_rng(0)
    for j, name in enumerate(sorted(set(images))):
        arr = (rng.random((120 + 10 * j, 160, 3)) * 255).astype("uint8")
        Image.fromarray(arr).save(tmp / "images" / name)
    raw = [{"id": rid, "instruction": intent_instruction(turns), "input": "", "output": "商品材质",
            "image": images}]
    (tmp / "train.json").write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    return load_split(tmp / "train.json")[0][0], len(turns), len(images)


def run(data_dir: str | None, factors=FACTORS, reps: int = 3) -> pd.DataFrame:
    longest = longest_real(data_dir)
    mcfg = resolve("paper").model
    tiny = resolve("tiny").model
    proc = load_processor(tiny_model_dir((), min_pixels=tiny.min_pixels, max_pixels=tiny.max_pixels),
                          min_pixels=mcfg.min_pixels, max_pixels=mcfg.max_pixels)
    enc = RecordEncoder(proc, max_length=mcfg.max_length, min_pixels=mcfg.min_pixels,
                        max_pixels=mcfg.max_pixels)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for shape in ("turns", "last_turn"):
            for f in factors:
                rec, n_turns, n_img = long_record(Path(d) / f"{shape}{f}", f * longest, shape,
                                                  f"{shape}{f}" + "x" * 24)
                ts = []
                for _ in range(reps):
                    enc._last_text = None  # no token count carried over from the last call
                    t0 = time.perf_counter()
                    plan = enc.plan(rec)
                    ts.append(time.perf_counter() - t0)
                s = float(np.median(ts))
                rows.append({"shape": shape, "factor": f, "chars": len(rec.instruction),
                             "turns": n_turns, "images": n_img, "status": plan.status,
                             "plan_tokens": plan.n_tokens, "seconds": round(s, 4),
                             "us_per_char": round(1e6 * s / len(rec.instruction), 2)})
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "mire"))
    p.add_argument("--factors", default=",".join(map(str, FACTORS)))
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    df = run(a.data_dir, tuple(int(x) for x in a.factors.split(",")), a.reps)
    print(f"longest real dialogue: {longest_real(a.data_dir)} characters; budget: "
          f"paper max_length {resolve('paper').model.max_length} tokens (tiny twin's tokenizer)")
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
