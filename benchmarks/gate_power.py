"""Power and size of the ship gate (``collab.gate_gain``) at the held-out sizes of ``mini``.

    python benchmarks/gate_power.py [--reps 150] [--sizes 41 69] [--seed 0] [--readme]

The gate decides whether a rule set ships on the held-out part of the dev fold (~41 records
in ``mini`` on real MIRE: 692 train records, dev fraction 0.2, held-out fraction 0.3). This
script measures, on simulated held-out parts of that size, how often each gate ships a rule
set (``insample``: strategy chosen and scored on the same records; ``split``: choose on half,
verify on the other half; ``crossfit`` with K = 5 and K = 10) and what the shipped decision
is worth on a large test draw from the same process (the decision's true gain; 0 when the
gate refuses).

Simulated world (why simulated: the real held-out part has no rule set whose true gain is
known): 20 intent labels, the model right on 60% of records; 4 rules, each firing on a record
with probability 0.07 (~3 firings on 41 records, as the mined rules do there). Where a rule
fires, the gold label is the rule's with probability ``q`` and the model is right with
probability ``a``: ``helpful`` q = 0.8, a = 0.3; ``moderate`` q = 0.65, a = 0.4; ``even``
q = a = 0.5 (no accuracy gain where the rules fire; weighted F1 can still move a little);
``harmful`` q = 0.35, a = 0.6 (shipping loses: a ship there is a false positive). Every rule arrives with training precision 0.9 (the search believed in it) and its
held-out trust measured on the held-out part, as ``rules.mcts._finalise`` leaves it.
Each replicate draws a new held-out part and a new test draw; everything is seeded.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from readme_sections import write_section

from kdsl_utils import collab
from kdsl_utils.data.labels import ALL_LABELS, INTENT_LABELS
from kdsl_utils.data.prompts import intent_instruction
from kdsl_utils.data.records import Record, Turn
from kdsl_utils.metrics import weighted_f1_idx
from kdsl_utils.report import to_markdown
from kdsl_utils.rules.engine import build_observables
from kdsl_utils.rules.mcts import EvalSet, SearchResult, trust
from kdsl_utils.rules.schema import Condition, make_rule

LABELS = [ALL_LABELS.index(x) for x in INTENT_LABELS]
N_LAB, N_RULES, FIRE, MODEL_ACC, PRIOR = 20, 4, 0.07, 0.6, 0.9
WORLDS = {"helpful": (0.8, 0.3), "moderate": (0.65, 0.4), "even": (0.5, 0.5),
          "harmful": (0.35, 0.6)}
KW = ("甲", "乙", "丙", "丁")
GATES = {"insample": {"gate": "insample"}, "split 50/50": {"gate": "split"},
         "crossfit K=5": {"gate": "crossfit", "folds": 5},
         "crossfit K=10": {"gate": "crossfit", "folds": 10}}


def draw(n: int, world: str, rule_labels: np.ndarray, rng: np.random.Generator) -> EvalSet:
    """``n`` records of the simulated world: texts carry the keywords of the rules that fire."""
    q, a = WORLDS[world]
    labs = np.array(LABELS[:N_LAB])
    fires = rng.random((n, N_RULES)) < FIRE
    first = np.where(fires.any(1), fires.argmax(1), -1)
    y = rng.choice(labs, n)
    right = rng.random(n) < MODEL_ACC
    for i in np.flatnonzero(first >= 0):
        lab = rule_labels[first[i]]
        y[i] = lab if rng.random() < q else rng.choice(labs[labs != lab])
        right[i] = rng.random() < a
    pred = np.where(right, y, [rng.choice(labs[labs != t]) for t in y])
    proba = np.full((n, len(ALL_LABELS)), 0.0)
    proba[:, LABELS] = 1e-3
    top = rng.uniform(0.35, 0.9, n)
    proba[np.arange(n), pred] = top
    second = np.where(right, [rng.choice(labs[labs != t]) for t in y], y)  # gold 2nd if wrong
    proba[np.arange(n), second] += (1 - top) * 0.6
    proba /= proba.sum(1, keepdims=True)
    texts = ["".join(KW[j] for j in np.flatnonzero(fires[i])) + "随便问问" for i in range(n)]
    recs = [Record(id=f"r{i}", task="intent", instruction=intent_instruction([("用户", t)]),
                   label=None, images=(), candidates=tuple(INTENT_LABELS),
                   turns=(Turn("用户", t),)) for i, t in enumerate(texts)]
    return EvalSet(build_observables(recs), y, proba)


def replicate(n: int, world: str, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rule_labels = rng.choice(LABELS[:N_LAB], N_RULES, replace=False)
    hold, test = draw(n, world, rule_labels, rng), draw(3000, world, rule_labels, rng)
    rules = [make_rule("intent", ALL_LABELS[lab], [Condition("user_text", "keyword_any", (k,))],
                       provenance={"train_stats": {"precision": PRIOR}})
             for lab, k in zip(rule_labels, KW)]
    meas = hold.engine.apply(rules, y=hold.y)  # held-out trust, as _finalise measures it
    tr = trust(meas.correct, meas.support, np.full(N_RULES, PRIOR))
    rules = [r.replace(stats={"support": int(meas.support[j]), "precision": float(tr[j])})
             for j, r in enumerate(rules)]
    found = SearchResult("mcts", rules, 0, 0, 0, 0, pd.DataFrame(), {}, pd.DataFrame())
    base = weighted_f1_idx(test.y, test.base_pred)
    rows = []
    for name, kw in GATES.items():
        res = collab.ship(found, hold, seed=seed, **kw)
        pred = collab.strategy_grid()[res.strategy](test.proba, test.engine.apply(res.rules))
        rows.append({"n": n, "world": world, "gate": name, "shipped": bool(res.shipped),
                     "true_gain": weighted_f1_idx(test.y, pred) - base})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=150)
    ap.add_argument("--sizes", type=int, nargs="+", default=[41, 69])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--readme", action="store_true", help="write the tables into README.md")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = [r for n in args.sizes for w in WORLDS for k in range(args.reps)
            for r in replicate(n, w, args.seed * 100_000 + k)]
    df = pd.DataFrame(rows)
    ship_rate = df.pivot_table(index=["n", "gate"], columns="world", values="shipped",
                               aggfunc="mean").round(3)[list(WORLDS)]
    value = (100 * df.pivot_table(index=["n", "gate"], columns="world", values="true_gain",
                                  aggfunc="mean")).round(2)[list(WORLDS)]
    text = "\n".join([
        f"### Ship gate power (`gate_power.py --reps {args.reps} --seed {args.seed}`; "
        f"{time.perf_counter() - t0:.0f} s)", "",
        "Simulated held-out parts of n records (the worlds in the script's docstring). Ship "
        "rate: in the harmful world a false positive, in the helpful / moderate worlds the "
        "power.", "", to_markdown(ship_rate.reset_index()), "",
        "Mean true gain of the gate's decision on a 3000-record test draw (weighted-F1 "
        "points; a refusal counts 0):", "", to_markdown(value.reset_index())])
    print(text)
    if args.readme:
        write_section("gate_power", text)


if __name__ == "__main__":
    main()
