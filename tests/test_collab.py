"""Collaboration strategies on hand-checkable cases."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

import pytest

from kdsl_utils.collab import (choose_on_dev, decisions, fusion, inject_rules, make_fusion,
                               make_override, ship)
from kdsl_utils.data.labels import ALL_LABELS, INTENT_LABELS
from kdsl_utils.data.prompts import intent_instruction
from kdsl_utils.data.records import Record, Turn
from kdsl_utils.metrics import weighted_f1_idx
from kdsl_utils.report import gain_rows, paired_gain_ci
from kdsl_utils.rules.engine import RuleEngine, build_observables
from kdsl_utils.rules.mcts import EvalSet, SearchResult
from kdsl_utils.rules.schema import Condition, make_rule

A, B = INTENT_LABELS[0], INTENT_LABELS[7]  # 反馈密封性不好, 商品材质
IA, IB = ALL_LABELS.index(A), ALL_LABELS.index(B)


def _records(texts):
    out = []
    for i, t in enumerate(texts):
        turns = (Turn("用户", t),)
        out.append(Record(id=f"r{i}", task="intent", instruction=intent_instruction([("用户", t)]),
                          label=A, images=(), candidates=INTENT_LABELS, turns=turns))
    return out


def _proba(n, p_a=0.6):
    p = np.zeros((n, len(ALL_LABELS)))
    idx = [ALL_LABELS.index(x) for x in INTENT_LABELS]
    p[:, idx] = (1 - p_a - 0.3) / (len(idx) - 2)
    p[:, IA], p[:, IB] = p_a, 0.3
    return p


def _result(records, rules, precision):
    eng = RuleEngine(build_observables(records))
    return eng.apply(rules, precision=precision)


def test_fusion_needs_strong_rule_to_flip():
    recs = _records(["这是什么材质", "漏水了"])
    rule = make_rule("intent", B, [Condition("user_text", "keyword_any", ("材质",))])
    proba = _proba(2)
    # precision 0.9 → +2.2 nats for B on record 0: log .3 + 2.2 > log .6
    out = fusion(proba, _result(recs, [rule], [0.9]), weight=1.0)
    assert list(out) == [IB, IA]
    # weak rule (0.55 → logit 0.2) cannot beat a log-odds gap of log 2 = 0.69
    assert list(fusion(proba, _result(recs, [rule], [0.55]), weight=1.0)) == [IA, IA]
    # below min_precision: no vote at all, whatever the weight
    assert list(fusion(proba, _result(recs, [rule], [0.6]), weight=100, min_precision=0.7)) == [IA, IA]


def test_fusion_never_picks_a_non_candidate():
    image_label = ALL_LABELS[0]
    rule = SimpleNamespace(label=image_label)
    res = SimpleNamespace(rules=[rule], masks=np.ones((1, 1), bool), precision=np.array([0.99]))
    assert fusion(_proba(1), res, weight=100)[0] == IA


def test_override_and_choose_on_dev():
    recs = _records(["材质", "材质", "漏水"])
    rule = make_rule("intent", B, [Condition("user_text", "keyword_any", ("材质",))])
    proba, y = _proba(3), np.array([IB, IB, IA])
    res = RuleEngine(build_observables(recs)).apply([rule], y=y)
    assert list(make_override(0.8)(proba, res)) == [IB, IB, IA]
    best, table = choose_on_dev(proba, res, y, {"none": lambda p, r: p.argmax(1),
                                                "fusion": make_fusion(1.0)})
    assert best == "fusion" and table.set_index("strategy").loc["none", "dev_weighted_f1"] < 1
    d = decisions(proba, res, make_override(0.8)(proba, res))
    assert list(d.source) == ["rule", "rule", "model"] and pd.isna(d.fired_rule[2])


def test_inject_rules_keeps_label_list_last():
    rec = _records(["这个是什么材质"])[0]
    rule = make_rule("intent", B, [Condition("user_text", "keyword_any", ("材质", "面料"))])
    out = inject_rules(rec, [rule])
    assert "参考规则" in out.instruction and "材质、面料" in out.instruction
    assert out.instruction.rstrip().endswith(rec.instruction.rstrip()[-30:])
    assert out.instruction.index("参考规则") > out.instruction.index("<用户与客服的对话 END>")
    assert inject_rules(rec, []) is rec


def _ship_case(rule_word):
    """A held-out part of 6 records where the model says A everywhere and half are B."""
    recs = _records(["这是什么材质", "材质如何", "材质呢", "漏水了", "漏了", "又漏"])
    y = np.array([IB, IB, IB, IA, IA, IA])
    obs = build_observables(recs)
    ev = EvalSet(obs, y, _proba(6))
    rule = make_rule("intent", B, [Condition("user_text", "keyword_any", (rule_word,))],
                     stats={"support": 5, "precision": 0.9})
    res = SearchResult("mcts", [rule], 0, 0, 0, 0, pd.DataFrame(), {}, pd.DataFrame())
    return res, ev


def test_ship_only_what_gains_on_the_held_out_part():
    good, ev = _ship_case("材质")
    shipped = ship(good, ev)
    assert shipped.shipped and shipped.rules == good.rules and shipped.strategy != "model"
    assert shipped.params["holdout_gain_chosen"] > 0
    bad, ev = _ship_case("漏")  # fires on the A records only: every strategy loses or ties
    kept = ship(bad, ev)
    assert not kept.shipped and kept.rules == [] and kept.found == bad.rules
    assert kept.strategy == "model" and kept.params["holdout_gain_chosen"] <= 0


def test_paired_gain_ci():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    base = np.where(rng.random(300) < 0.6, y, (y + 1) % 5)
    better = np.where(rng.random(300) < 0.5, y, base)  # fixes about half of base's errors
    tasks = ["intent"] * 300
    ci = paired_gain_ci(y, better, base, tasks, n_boot=300, seed=0).set_index("task")
    assert ci.loc["pooled", "gain"] == pytest.approx(weighted_f1_idx(y, better)
                                                     - weighted_f1_idx(y, base))
    assert 0 < ci.loc["pooled", "lo"] <= ci.loc["pooled", "gain"] <= ci.loc["pooled", "hi"]
    same = paired_gain_ci(y, base, base, tasks, n_boot=50).set_index("task")
    assert (same[["gain", "lo", "hi"]] == 0).all().all()  # paired: no spread of a null change
    rows = gain_rows(y, better, base, tasks, n_boot=50, variant="kdsl")
    assert {r["metric"] for r in rows} == {"gain_vs_model", "gain_vs_model_lo",
                                           "gain_vs_model_hi"}
