"""Retrieval augmentation of the mini large model (issue 13): joint fine-tune with and without
the neighbour-label block (``MiniCfg.retrieval``), on test1 and by 4-fold CV of train.

    python benchmarks/retrieval_mini.py --data ../shared/mire [--seeds 0] [--folds 4] [--readme]

Both models see the same records, seed and hyper-parameters; the only difference is the
48-column block of out-of-fold neighbour-label votes (``representations.NeighbourVotes``).
Gains are weighted F1 (points) with a paired bootstrap 95% CI (``report.paired_gain_ci``,
1000 resamples): on test1 per seed, and on the pooled out-of-fold predictions of a 4-fold
stratified CV of train (test1 holds 1-4 records per intent label, too few to decide on).
Needs a real MIRE directory; the project never ships one. Wall times are under whatever load
the machine has (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from readme_sections import write_section
from sklearn.model_selection import StratifiedKFold

from kdsl_utils.config import resolve
from kdsl_utils.data.labels import label_indices
from kdsl_utils.data.mire import load_mire
from kdsl_utils.metrics import weighted_f1_idx
from kdsl_utils.models.registry import make_backend
from kdsl_utils.report import paired_gain_ci, to_markdown

OUT = Path(__file__).parent / "results" / "retrieval_mini.json"


def fit_predict(cfg, train, test, seed):
    t0 = time.perf_counter()
    be = make_backend(cfg, progress=False)
    be.fit(train, mix="joint", seed=seed)
    p = be.predict_proba(test)
    info = dict(be.retriever.info) if be.retriever is not None else {}
    return p.pred_idx, time.perf_counter() - t0, info


def gain_table(y, a, b, tasks, **ids):
    ci = paired_gain_ci(y, a, b, tasks, n_boot=1000, seed=0)
    return [{**ids, "task": r.task, "n": r.n, "gain (points)": round(100 * r.gain, 2),
             "95% CI": f"[{100 * r.lo:+.2f}, {100 * r.hi:+.2f}]"} for _, r in ci.iterrows()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "mire"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--readme", action="store_true")
    a = ap.parse_args()
    data = load_mire(a.data, test_files=["test1"])
    base, aug = resolve("mini"), resolve("mini", mini__retrieval=True)
    train, test = list(data.train), list(data.tests["test1"])
    rows, f1s, times = [], [], []
    for seed in a.seeds:
        y = label_indices([r.label for r in test])
        tasks = [r.task for r in test]
        p0, t0, _ = fit_predict(base, train, test, seed)
        p1, t1, info = fit_predict(aug, train, test, seed)
        times.append({"seed": seed, "where": "test1", "joint_s": round(t0, 1),
                      "joint+retrieval_s": round(t1, 1), "k": info.get("k")})
        f1s.append({"seed": seed, "split": "test1", "joint": weighted_f1_idx(y, p0),
                    "joint+retrieval": weighted_f1_idx(y, p1)})
        rows += gain_table(y, p1, p0, tasks, seed=seed, split="test1")
        # CV: out-of-fold predictions of both models, pooled over folds
        labs = [r.label for r in train]
        skf = StratifiedKFold(n_splits=a.folds, shuffle=True, random_state=seed)
        o0 = np.full(len(train), -1)
        o1 = o0.copy()
        for k, (tr, te) in enumerate(skf.split(np.zeros(len(train)), labs)):
            fit = [train[i] for i in tr]
            held = [train[i] for i in te]
            o0[te], s0, _ = fit_predict(base, fit, held, seed)
            o1[te], s1, info = fit_predict(aug, fit, held, seed)
            times.append({"seed": seed, "where": f"cv fold {k}", "joint_s": round(s0, 1),
                          "joint+retrieval_s": round(s1, 1), "k": info.get("k")})
        y = label_indices(labs)
        tasks = [r.task for r in train]
        f1s.append({"seed": seed, "split": f"cv{a.folds} (train, out of fold)",
                    "joint": weighted_f1_idx(y, o0), "joint+retrieval": weighted_f1_idx(y, o1)})
        rows += gain_table(y, o1, o0, tasks, seed=seed, split=f"cv{a.folds}")
    f1 = pd.DataFrame(f1s).round(4)
    gains, tt = pd.DataFrame(rows), pd.DataFrame(times)
    load = os.getloadavg()[0]
    text = "\n\n".join([
        "Joint fine-tune of the mini large model with and without the neighbour-label block "
        "(`MiniCfg.retrieval`: out-of-fold similarity-weighted label votes of the k nearest "
        "training records in notebook 04's `full` representation; k chosen on the training "
        f"records' own out-of-fold votes). Real MIRE, seeds {a.seeds}, "
        "`python benchmarks/retrieval_mini.py --readme`.",
        "Weighted F1 (pooled over both tasks):", to_markdown(f1),
        "Gain of retrieval (joint+retrieval − joint), paired bootstrap 95% CI (1000 resamples):",
        to_markdown(gains),
        f"Wall seconds per fit + prediction (load average {load:.1f} at the end; under load):",
        to_markdown(tt)])
    print(text)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"f1": f1s, "gains": rows, "times": times}, indent=1))
    if a.readme:
        write_section("retrieval_mini", text)


if __name__ == "__main__":
    main()
