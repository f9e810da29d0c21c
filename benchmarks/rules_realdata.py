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

import numpy as np
import pandas as pd

from kdsl_utils import collab, kdsl_eval, knowledge, report
from kdsl_utils.config import resolve
from kdsl_utils.data.augment import augment_training_set
from kdsl_utils.data.mire import load_mire
from kdsl_utils.data.splits import stratified_split
from kdsl_utils.rules import EvalSet, RuleEngine, concat_observables, mcts_search


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
    obs_all = knowledge.observables_for(data.train + data.tests["test1"], cfg)
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


def run_one(cfg, prepared: dict, seed: int) -> list[dict]:
    """MCTS and matched top-N (data proposer) on one evaluation set; per method the search
    report and the test-part predictions (label indices) of model and KDSL."""
    dev = evalset(*prepared["dev"])
    t_obs, t_pred = prepared["test"]
    hold = dev.split(cfg.rules.holdout_fraction, seed)[1]
    make = lambda teach: knowledge.make_proposer(cfg, teach, kind="data", seed=seed)  # noqa: E731
    mcts, topn = knowledge.search_rules(cfg, prepared["fit_obs"], dev, seed=seed, make=make,
                                        progress=False)
    out = []
    for res in (mcts, topn):
        rs = kdsl_eval.as_rule_set(res.method, res, "kdsl")
        found = RuleEngine(t_obs).apply(res.found or [])  # trust in the rules' stats
        shipped = RuleEngine(t_obs).apply(rs.rules)
        h_with, h_model = kdsl_eval.holdout_check(rs, hold)
        # the found rules under their best strategy, shipped or not: what the gate withheld
        out.append({"method": res.method, "res": res, "y": t_pred.gold_idx,
                    "tasks": np.asarray(t_pred.tasks), "model": t_pred.pred_idx,
                    "kdsl": rs.predict(t_pred.proba, shipped),
                    "unshipped": collab.strategy_grid()[res.params["ungated_strategy"]](
                        t_pred.proba, found),
                    "fired": found.fired >= 0, "rule_label": found.label_idx,
                    "holdout_with": h_with, "holdout_model": h_model})
    return out


def summarise(name: str, runs: list[dict], n_boot: int, seed: int) -> dict:
    """One table row from one or more runs of a method (cv folds are pooled)."""
    cat = {k: np.concatenate([r[k] for r in runs]) for k in
           ("y", "tasks", "model", "kdsl", "unshipped", "fired", "rule_label")}
    ci = report.paired_gain_ci(cat["y"], cat["kdsl"], cat["model"], cat["tasks"],
                               n_boot=n_boot, seed=seed).set_index("task")
    ci_u = report.paired_gain_ci(cat["y"], cat["unshipped"], cat["model"], cat["tasks"],
                                 n_boot=n_boot, seed=seed).set_index("task")
    f = cat["fired"]
    res = [r["res"] for r in runs]
    return {
        "eval": name, "method": runs[0]["method"],
        "found": "/".join(str(len(r.found or ())) for r in res),
        "shipped": "/".join(str(len(r.rules)) for r in res),
        "strategy": "/".join(str(r.strategy) for r in res),
        "requests": "/".join(str(r.cost["requests"]) for r in res),
        "calls": "/".join(str(r.cost["calls"]) for r in res),
        "seconds": "/".join(f"{r.cost['wall_s']:.0f}" for r in res),
        "held-out Δ": "/".join(f"{100 * (r['holdout_with'] - r['holdout_model']):+.1f}"
                               for r in runs),
        "test n": len(cat["y"]), "covered": int(f.sum()),
        "rule prec": round(float((cat["rule_label"][f] == cat["y"][f]).mean()), 3)
        if f.any() else None,
        "model prec same": round(float((cat["model"][f] == cat["y"][f]).mean()), 3)
        if f.any() else None,
        "KDSL−model": f"{100 * ci.loc['pooled', 'gain']:+.2f} [{100 * ci.loc['pooled', 'lo']:+.2f}, "
                      f"{100 * ci.loc['pooled', 'hi']:+.2f}]",
        "found rules, no gate": f"{100 * ci_u.loc['pooled', 'gain']:+.2f} "
                                f"[{100 * ci_u.loc['pooled', 'lo']:+.2f}, "
                                f"{100 * ci_u.loc['pooled', 'hi']:+.2f}]",
    }


VARIANTS = {  # search settings compared on the same data (issue 15, item 2: measure)
    "default": {},
    "raw UCT c=1": {"normalise_rewards": False, "uct_c": 1.0},
    "target=most": {"target": "most"},
    "old (raw c=1, depth 5, most, batch 1)": {"normalise_rewards": False, "uct_c": 1.0,
                                              "depth": 5, "target": "most", "add_batch": 1},
}


def search_variants(sets: dict, seed: int) -> pd.DataFrame:
    """MCTS under each ``VARIANTS`` setting on every evaluation set: rules found, root-child
    visits, depth, requests / calls / cache hits, search and held-out gain (override)."""
    rows = []
    for vname, over in VARIANTS.items():
        cfg = resolve("mini", **{f"rules__{k}": v for k, v in over.items()})
        for ename, prep in sets.items():
            dev = evalset(*prep["dev"])
            teach = concat_observables(prep["fit_obs"],
                                       dev.split(cfg.rules.holdout_fraction, seed)[0].obs)
            res = mcts_search(knowledge.make_proposer(cfg, teach, kind="data", seed=seed), dev,
                              cfg.rules, combine=collab.make_override(
                                  cfg.rules.precision_threshold), seed=seed)
            c = res.cost
            rows.append({"variant": vname, "eval": ename, "found": len(res.rules),
                         "root visits": c["root_child_visits"], "max depth": c["max_depth"],
                         "requests": c["requests"], "calls": c["calls"],
                         "cache hits": c["cache_hits"],
                         "search Δ": round(100 * (res.search_reward - res.search_base), 2),
                         "held-out Δ": round(100 * (res.holdout_reward - res.holdout_base), 2),
                         "targets": len(res.params["targets"])})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mire", nargs="?", default=os.environ.get("KDSL_MIRE_DIR", "../shared/mire"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--cache", default="/tmp/kdsl_rules_bench")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--no-variants", action="store_true")
    ap.add_argument("--holdout", type=float, nargs="+", default=None,
                    help="RulesCfg.holdout_fraction values to compare (the gate's sample size; "
                         "default: the mini profile's)")
    args = ap.parse_args()
    sets = prepare(args.mire, args.seed, args.folds, Path(args.cache))
    if args.prepare_only:
        return
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    for hf in args.holdout or [resolve("mini").rules.holdout_fraction]:
        cfg = resolve("mini", rules__holdout_fraction=hf)
        t0 = time.perf_counter()
        runs = {name: run_one(cfg, prep, args.seed) for name, prep in sets.items()}
        rows = []
        for j in range(2):  # mcts, top_n
            rows.append(summarise("test1", [runs["test1"][j]], args.n_boot, args.seed))
            rows.append(summarise(f"cv ({args.folds} folds pooled)",
                                  [runs[n][j] for n in runs if n.startswith("cv")],
                                  args.n_boot, args.seed))
        print(f"# proposer: data (DataProposer); mini profile; seed {args.seed}; "
              f"RulesCfg {cfg.rules}; searches {time.perf_counter() - t0:.0f} s")
        print("# x/y/z: one value per fold; covered / precisions: the found rules' first firing "
              "rule on the test part (trust-ungated), model prec same = the model on those "
              "records; last column: the found rules at their best non-model strategy, gate "
              "skipped")
        print(pd.DataFrame(rows).to_string(index=False), flush=True)
    if not args.no_variants:
        print("\n# search settings (MCTS only, data proposer; held-out Δ with override at the "
              "search threshold, points)")
        print(search_variants(sets, args.seed).to_string(index=False))


if __name__ == "__main__":
    main()
