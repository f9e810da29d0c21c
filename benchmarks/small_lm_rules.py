"""Rule quality and speed of the CPU small LM as a rule proposer, on real MIRE data
(development only; the data is read from a path and nothing of it is written to the repo).

    python benchmarks/small_lm_rules.py MIRE_DIR [--weights qwen2.5-coder-1.5b] [--labels N]
        [--k 3] [--out FILE.json]

Intent task. train.json is split (stratified, seed 0) into a proposal fold A and a held-out
fold B. A TF-IDF + logistic-regression model fitted on A gives the "current errors" (its
cross-validated mistakes on A). For each of the N intent labels with the most records, the
LLMProposer (1 call, k rules, JSON-schema grammar) writes rules from A's typical records and
errors; semantic thresholds are tuned on A. Every rule, and every condition kind on its own,
is scored on B (held-out train fold) and on test1: records matched, precision.

Measured 2026-12-01 on 2 shared cores (under load: load average 7-26 from other work), xllamacpp,
1 thread, 4 most frequent intent labels (适用季节, 单品推荐, 版本款型区别, 反馈密封性不好), k=3:

| weights | calls | prompt tok | generated tok | generate s | kind | B matched / correct | test1 matched / correct |
|---|---|---|---|---|---|---|---|
| 1.5B | 4 | 2560 | 808 | 311 | semantic (4 rules) | 8 / 6 (0.75) | 5 / 2 (0.40) |
| 1.5B | | | | | keyword (7 rules) | 5 / 1 (0.20) | 4 / 0 |
| 0.5B | 4 | 2560 | 338 | 34 | semantic (4 rules) | 183 / 18 (0.10) | 86 / 9 (0.10) |

The 0.5B writes label names as its "questions" (e.g. 商品材质 for 版本款型区别); the 1.5B's keywords
are mostly question fragments that occur nowhere (``夏季商品?``), its semantic questions carry
the label's meaning where the label is concrete (适用季节: 4 of 4 right on B).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_predict

from kdsl_utils.data.labels import LABEL_INDEX
from kdsl_utils.data.mire import load_mire
from kdsl_utils.data.splits import stratified_split
from kdsl_utils.models.small_lm import LlamaGenerator
from kdsl_utils.rules import build_observables
from kdsl_utils.rules.engine import RuleEngine, semantic_embedder, with_embedder
from kdsl_utils.rules.propose import LLMProposer, errors_from
from kdsl_utils.rules.schema import SEMANTIC_OPS


def score(engine: RuleEngine, rule, y) -> dict:
    m = engine.rule_mask(rule)
    n = int(m.sum())
    return {"matched": n, "correct": int((y[m] == LABEL_INDEX[rule.label]).sum()),
            "positives": int((y == LABEL_INDEX[rule.label]).sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mire")
    ap.add_argument("--weights", default="qwen2.5-coder-1.5b")
    ap.add_argument("--labels", type=int, default=6)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--out", default="/tmp/small_lm_rules.json")
    a = ap.parse_args()
    data = load_mire(a.mire, test_files=["test1"], decode_images=False)
    train = [r for r in data.train if r.task == "intent"]
    test = [r for r in data.tests["test1"] if r.task == "intent"]
    A, B = stratified_split(train, 0.5, seed=0)
    embed = semantic_embedder()
    obs = {n: with_embedder(build_observables(rs), embed) for n, rs in
           (("A", A), ("B", B), ("test1", test))}
    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True)
    XA = vec.fit_transform([r.user_text for r in A])
    yA = [r.label for r in A]
    oof = cross_val_predict(LogisticRegression(C=10.0, max_iter=2000), XA, yA, cv=3)
    pred = np.array([LABEL_INDEX[p] for p in oof])
    errors = errors_from(obs["A"], obs["A"].labels, pred)
    gen = LlamaGenerator(a.weights, threads=a.threads, max_tokens=a.max_tokens)
    prop = LLMProposer(gen, train=obs["A"], max_examples=4, max_chars=120, n_typical=2,
                       fields=["user_text"], answer_cache=Path("/work/cache/small_lm_answers"))
    labels = [lab for lab, _ in Counter(r.label for r in train).most_common(a.labels)]
    engines = {n: RuleEngine(o) for n, o in obs.items() if n != "A"}
    rows = []
    for lab in labels:
        t0 = time.perf_counter()
        rules = prop.propose(lab, errors, k=a.k)
        c = prop.log[-1]
        print(f"{lab}: {len(rules)} rules, {c['prompt_tokens']} prompt + {c['generated_tokens']} "
              f"generated tokens, {c['seconds']} s (cached={c['cached']}), "
              f"{time.perf_counter() - t0:.1f} s incl. parsing/tuning", flush=True)
        for r in rules:
            kinds = sorted({"semantic" if cnd.op in SEMANTIC_OPS else "keyword"
                            for cnd in r.conditions})
            row = {"label": lab, "rule": r.describe(), "kind": "+".join(kinds),
                   "train_A": dict(r.stats)}
            for n, e in engines.items():
                row[n] = score(e, r, obs[n].labels)
            print("   ", row["kind"], r.describe()[:150], "| B", row["B"], "| test1",
                  row["test1"], flush=True)
            rows.append(row)
    summary = {}
    for kind in sorted({r["kind"] for r in rows}) + ["all"]:
        sel = [r for r in rows if kind == "all" or r["kind"] == kind]
        s = {}
        for n in engines:
            mt = sum(r[n]["matched"] for r in sel)
            co = sum(r[n]["correct"] for r in sel)
            s[n] = {"rules": len(sel), "matched": mt, "correct": co,
                    "precision": round(co / mt, 3) if mt else None}
        summary[kind] = s
    out = {"weights": a.weights, "threads": a.threads, "labels": labels, "rows": rows,
           "summary": summary, "generator": gen.totals(), "proposer": prop.cost(),
           "log": prop.log}
    Path(a.out).write_text(json.dumps(out, ensure_ascii=False, indent=1))
    print(json.dumps({"summary": summary, "generator": gen.totals()}, ensure_ascii=False,
                     indent=1))


if __name__ == "__main__":
    main()
