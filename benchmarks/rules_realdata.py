"""The rule half of KDSL on real MIRE data (development only; the data is read from a path,
never copied): per proposer, MCTS vs matched top-N, and KDSL − model with a paired CI.

    python benchmarks/rules_realdata.py [MIRE_DIR] [--seed 0] [--folds 4] [--cache DIR]
        [--iterations N] [--prepare-only]

Model: the ``mini`` profile's large model (``knowledge.fit_and_score``), exactly as notebook
02 trains it (fit part + augmentation). Two evaluations, reported separately:

* **test1** — the model fitted on train minus the dev fold (``Profile.dev_fraction``); the
  dev fold is split into the search part and the held-out part
  (``RulesCfg.holdout_fraction``); test1 is only scored. test1 holds 1-4 records per intent
  label, so its numbers are noisy;
* **cv** — ``--folds`` stratified folds of train: for fold k the model is fitted on the
  other folds, fold k's records are split 60/40 into a dev fold (search + held-out) and a
  cv-test part; the cv-test parts of all folds are pooled (every train record is scored
  once by a model that did not see it, and by rules chosen without it).

Probabilities and observables are cached under ``--cache`` (OCR through the shared feature
cache); a warm run only searches.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd

from kdsl_utils import knowledge
from kdsl_utils.config import resolve
from kdsl_utils.data.augment import augment_training_set
from kdsl_utils.data.mire import load_mire
from kdsl_utils.data.splits import stratified_split
from kdsl_utils.rules import EvalSet


def folds_of(records, k: int, seed: int) -> list[list[int]]:
    """``k`` label-stratified folds (indices into ``records``), rare labels dealt round-robin
    from a random fold."""
    rng = random.Random(seed)
    by: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by[r.label].append(i)
    out: list[list[int]] = [[] for _ in range(k)]
    for lab in sorted(by):
        idx = by[lab][:]
        rng.shuffle(idx)
        off = rng.randrange(k)
        for j, i in enumerate(idx):
            out[(off + j) % k].append(i)
    return [sorted(f) for f in out]


def prepare(mire: str, seed: int, n_folds: int, cache: Path) -> dict:
    """Model probabilities and observables of every evaluation set (cached in ``cache``)."""
    path = cache / f"prepared_seed{seed}_folds{n_folds}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    cfg = resolve("mini")
    data = load_mire(mire, decode_images=False)
    t0 = time.perf_counter()
    obs_all = knowledge.observables_for(data.train + data.tests["test1"], ocr=cfg.rules_ocr,
                                        workers=cfg.ocr_workers)
    pos = {rid: i for i, rid in enumerate(obs_all.ids)}
    sub = lambda recs: obs_all.subset([pos[r.id] for r in recs])  # noqa: E731
    print(f"observables (OCR {cfg.rules_ocr}) in {time.perf_counter() - t0:.0f} s", flush=True)
    sets = {}
    fit, dev = knowledge.dev_split(data.train, cfg, seed)
    test = data.tests["test1"]
    aug = augment_training_set(fit, cfg.augment, seed=seed, image_dir=cache / "augment")
    _, proba = knowledge.fit_and_score(cfg, aug, {"dev": dev, "test": test}, seed=seed,
                                       out_dir=cache / "work")
    sets["test1"] = {"fit_obs": sub(fit), "dev": (sub(dev), proba["dev"]),
                     "test": (sub(test), proba["test"])}
    print(f"test1 evaluation prepared ({time.perf_counter() - t0:.0f} s)", flush=True)
    for k, fold in enumerate(folds_of(data.train, n_folds, seed)):
        inside = set(fold)
        fit_k = [r for i, r in enumerate(data.train) if i not in inside]
        held = [data.train[i] for i in fold]
        dev_k, test_k = stratified_split(held, 0.4, seed + k)
        aug_k = augment_training_set(fit_k, cfg.augment, seed=seed, image_dir=cache / "augment")
        _, pk = knowledge.fit_and_score(cfg, aug_k, {"dev": dev_k, "test": test_k}, seed=seed,
                                        out_dir=cache / f"work{k}")
        sets[f"cv{k}"] = {"fit_obs": sub(fit_k), "dev": (sub(dev_k), pk["dev"]),
                          "test": (sub(test_k), pk["test"])}
        print(f"fold {k} prepared ({time.perf_counter() - t0:.0f} s)", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(sets))
    return sets


def evalset(obs, preds) -> EvalSet:
    return EvalSet(obs, preds.gold_idx, preds.proba)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mire", nargs="?", default=os.environ.get("KDSL_MIRE_DIR", "../shared/mire"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--cache", default="/tmp/kdsl_rules_bench")
    ap.add_argument("--prepare-only", action="store_true")
    args = ap.parse_args()
    sets = prepare(args.mire, args.seed, args.folds, Path(args.cache))
    if args.prepare_only:
        return
    pd.set_option("display.width", 200)


if __name__ == "__main__":
    main()
