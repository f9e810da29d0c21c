"""Does augmentation help KDSL's large model, and which kinds? (mini profile, real data)

    python benchmarks/augment_realdata.py [MIRE_DIR] [--seeds 0 1 2]

For each seed: the dev split of notebook 02 (``knowledge.dev_split``); the mini backend is
fitted jointly on the fit part with no augmentation, with turn-dropout dialogue copies,
with random-resize image copies, and with both (``AugmentCfg`` defaults otherwise). The
choice is made on the **dev fold** (pooled and per-task weighted F1); test1 is printed too,
labelled, and not used for the choice. Image copies cost one OCR per copy (~0.7-1 s on 2
cores, cached afterwards); the table prints the wall time of each variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import pandas as pd

from kdsl_utils import knowledge
from kdsl_utils.config import resolve
from kdsl_utils.data.augment import augment_training_set
from kdsl_utils.data.mire import load_mire
from kdsl_utils.metrics import evaluate_predictions
from kdsl_utils.models.mini import MiniBackend

VARIANTS = {"none": {"image_copies": 0, "dialogue_copies": 0},
            "dialogue": {"image_copies": 0, "dialogue_copies": 1},
            "image": {"image_copies": 1, "dialogue_copies": 0},
            "both": {"image_copies": 1, "dialogue_copies": 1}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", nargs="?", default="../shared/mire")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    data = load_mire(args.data_dir)
    cfg = resolve("mini")
    rows = []
    img_dir = tempfile.mkdtemp(prefix="kdsl-aug-")
    for seed in args.seeds:
        fit, dev = knowledge.dev_split(data.train, cfg, seed)
        for name, kw in VARIANTS.items():
            acfg = dataclasses.replace(cfg.augment, **kw)
            t0 = time.perf_counter()
            train = augment_training_set(fit, acfg, seed=seed, image_dir=img_dir)
            model = MiniBackend(cfg)
            model.fit(train, mix="joint", seed=seed)
            wall = time.perf_counter() - t0
            for split, recs in {"dev": dev, **data.tests}.items():
                m = evaluate_predictions(model.predict_proba(recs), recs)
                rows.append({"seed": seed, "variant": name, "split": split, "n_train": len(train),
                             "wall_s": wall, **m})
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    cols = [c for c in df.columns if c.endswith("weighted_f1")]
    summary = df.groupby(["split", "variant"])[cols + ["wall_s", "n_train"]].agg(["mean", "std"]).round(4)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(f"\nmini profile, data {args.data_dir}, seeds {args.seeds}: mean and sd over seeds")
        print(summary)


if __name__ == "__main__":
    main()
