"""Throughput of the vectorised rule engine: rule-set evaluations per second.

    python benchmarks/rules_engine.py [--records 300] [--rules 30] [--evals 3000]

Synthetic dialogue records (random CJK text, 0-2 images); rule sets are random subsets of a
pool of keyword/regex/numeric rules, as the tree search produces them. One evaluation =
decision list + override collaboration + weighted F1, the MCTS reward. Condition masks are
cached, as in a search, so the first pass (cold) and later passes (warm) are both reported.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from kdsl_utils.collab import make_override
from kdsl_utils.data.labels import ALL_LABELS, INTENT_LABELS
from kdsl_utils.data.records import USER, Record, Turn
from kdsl_utils.metrics import weighted_f1_idx as weighted_f1
from kdsl_utils.rules import Condition, RuleEngine, build_observables, make_rule


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=300)
    ap.add_argument("--rules", type=int, default=30)
    ap.add_argument("--evals", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    chars = list("漏水材质冬天能用吗怎么这个多少钱颜色尺寸发货包装版本推荐")
    recs = [Record(f"r{i}", "intent", "", INTENT_LABELS[i % len(INTENT_LABELS)],
                   tuple(Path(f"{i}-{j}.jpg") for j in range(int(rng.integers(0, 3)))),
                   INTENT_LABELS, (Turn(USER, "".join(rng.choice(chars, 30))),))
            for i in range(a.records)]
    obs = build_observables(recs)
    pool = []
    for j in range(a.rules):
        lab = INTENT_LABELS[j % len(INTENT_LABELS)]
        kw = "".join(rng.choice(chars, 2))
        conds = [Condition("user_text", "keyword_any", (kw,))]
        if j % 3 == 1:
            conds.append(Condition("image_count", "ge", 1.0))
        if j % 5 == 2:
            conds = [Condition("last_user_turn", "regex", f"{kw[0]}.{{0,3}}{kw[1]}")]
        pool.append(make_rule("intent", lab, conds))
    proba = rng.random((a.records, len(ALL_LABELS)))
    combine = make_override(0.5)
    sets = [[pool[j] for j in np.flatnonzero(rng.random(a.rules) < 0.5)] for _ in range(a.evals)]
    for label in ("cold", "warm"):
        eng = RuleEngine(obs) if label == "cold" else eng  # noqa: F821
        t0 = time.perf_counter()
        for s in sets:
            weighted_f1(obs.labels, combine(proba, eng.apply(s, y=obs.labels)))
        dt = time.perf_counter() - t0
        print(f"{label}: {a.evals / dt:,.0f} rule-set evaluations/s ({a.records} records, "
              f"~{a.rules // 2} rules per set, {eng.stats['condition_evals']} distinct conditions)")


if __name__ == "__main__":
    main()
