"""Collaboration strategies on hand-checkable cases."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

import pytest

from kdsl_utils.collab import (choose_on_dev, decisions, fusion, gate_gain,
                               inject_rules, make_fusion, make_override, ship)
from kdsl_utils.data.labels import ALL_LABELS, INTENT_LABELS
from kdsl_utils.data.splits import stratified_folds
from kdsl_utils.data.prompts import intent_instruction
from kdsl_utils.data.records import Record, Turn
from kdsl_utils.metrics import weighted_f1_idx
from kdsl_utils import report
from kdsl_utils.report import gain_rows, paired_gain_ci
from kdsl_utils.rules.engine import RuleEngine, build_observables
from kdsl_utils.rules.mcts import EvalSet, SearchResult, trust
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


def _gate_case(cases):
    """A held-out part whose model says A everywhere. ``cases``: (text, gold) per record; a
    rule per keyword in ``KW`` predicts B. Rules arrive as ``rules.mcts._finalise`` leaves
    them: training precision 0.9 in provenance, held-out trust (measured on these very
    records) in their stats."""
    recs = _records([t for t, _ in cases])
    y = np.array([g for _, g in cases])
    ev = EvalSet(build_observables(recs), y, _proba(len(y)))
    rules = [make_rule("intent", B, [Condition("user_text", "keyword_any", (k,))],
                       provenance={"train_stats": {"precision": 0.9}}) for k in KW]
    meas = ev.engine.apply(rules, y=y)
    tr = trust(meas.correct, meas.support, np.full(len(rules), 0.9))
    rules = [r.replace(stats={"support": int(meas.support[j]), "precision": float(tr[j])})
             for j, r in enumerate(rules)]
    return SearchResult("mcts", rules, 0, 0, 0, 0, pd.DataFrame(), {}, pd.DataFrame()), ev


KW = ("甲", "乙", "丙", "丁", "戊")


def test_gate_folds_are_stratified_and_seeded():
    y = np.array([0] * 5 + [1] * 5 + [2] * 3)
    f = stratified_folds(y, 5, seed=1)
    assert sorted(np.bincount(f)) == [2, 2, 3, 3, 3]
    assert all(len(set(f[y == lab])) == (y == lab).sum() for lab in (0, 1, 2))  # spread out
    assert (f == stratified_folds(y, 5, seed=1)).all() and not (f == stratified_folds(y, 5, seed=2)).all()


def test_crossfit_gate_refuses_a_rule_set_that_wins_only_in_sample():
    # Five rules, each firing on one held-out record: right on 1 (the model is wrong there),
    # wrong on 4 (the model is right there). Measured on these same records, the right one
    # earns trust 0.93 and the wrong ones 0.6, so an override threshold between them "wins"
    # in sample: a rule's trust on its own record comes from the very record that judges it.
    cases = [("甲", IB), ("乙", IA), ("丙", IA), ("丁", IA), ("戊", IA)]
    cases += [("漏水", IA)] * 6 + [("没法说", IB)] * 2
    res, ev = _gate_case(cases)
    insample, _ = gate_gain(res.rules, ev, gate="insample")
    assert insample > 0  # the old gate's number: it would ship
    old = ship(res, ev, gate="insample")
    assert old.shipped and old.strategy.startswith("override")
    for seed in range(4):  # whichever folds: the out-of-fold choice loses
        gain, folds = gate_gain(res.rules, ev, gate="crossfit", folds=5, seed=seed)
        assert gain < 0 and len(folds) == 5 and folds.n.sum() == len(cases), seed
        new = ship(res, ev, gate="crossfit", folds=5, seed=seed)
        assert not new.shipped and new.rules == [] and new.found == res.rules
        assert new.strategy == "model"
        assert new.params["holdout_gain_insample"] > 0 > new.params["holdout_gain_chosen"]
        assert new.params["gate"] == "crossfit" and len(new.params["gate_folds"]) == 5


def test_crossfit_gate_ships_a_genuinely_helpful_rule_set():
    # Three rules that are right on 3 of the 4 records each fires on, where the model is wrong
    # on all of them: every fold's choice part holds enough firings to trust them.
    cases = []
    for k in KW[:3]:
        cases += [(f"{k}材质", IB)] * 3 + [(f"{k}漏了", IA)]
    cases += [("漏水", IA)] * 8
    res, ev = _gate_case(cases)
    for gate in ("crossfit", "split"):
        gain, _ = gate_gain(res.rules, ev, gate=gate, folds=5, seed=0)
        assert gain > 0, gate
    shipped = ship(res, ev, gate="crossfit", folds=5, seed=0)
    assert shipped.shipped and shipped.rules == res.rules and shipped.strategy != "model"
    assert shipped.params["holdout_gain_chosen"] > 0


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


def _wf1(variants, value=0.5):
    return pd.DataFrame([{"experiment": "03_collaborative", "variant": v, "seed": 0,
                          "split": "test1", "task": "pooled", "metric": "weighted_f1",
                          "value": value} for v in variants])


def test_results_table_has_a_row_per_proposer_or_says_it_was_not_run():
    data_run = _wf1(["model", "kdsl", "kdsl[mcts@data]", "rules+majority[mcts@data]"])
    llm_run = pd.concat([_wf1(["model", "kdsl[mcts@llm]", "rules+majority[mcts@llm]",
                               "kdsl[mcts@data]"], 0.6),
                         _wf1(["kdsl[mcts@llm]"], 0.02).assign(metric="gain_vs_model"),
                         _wf1(["kdsl[mcts@llm]"], -0.01).assign(metric="gain_vs_model_lo"),
                         _wf1(["kdsl[mcts@llm]"], 0.05).assign(metric="gain_vs_model_hi")])
    assert report.llm_companion("mini").startswith("mini-ov") and report.llm_companion("tiny") is None
    shown, not_run = report.proposer_rows(data_run, None, "results/mini-ovX/mire/seed0")
    table = report.results_table(shown, not_run=not_run).set_index("row")
    for v in report.PROPOSER_ROWS["llm"]:
        assert table.loc[report.ROWS[v], "seeds"] == 0
        assert "not run" in table.loc[report.ROWS[v], "note"] and "RULES=llm" in table.loc[report.ROWS[v], "note"]
    assert table.loc[report.ROWS["kdsl[mcts@data]"], "test1 · pooled"] == "0.5000"
    shown, not_run = report.proposer_rows(data_run, llm_run, "results/mini-ovX/mire/seed0")
    table = report.results_table(shown, not_run=not_run).set_index("row")
    assert not not_run and "note" not in table.columns
    row = table.loc[report.ROWS["llm-run:kdsl[mcts@llm]"]]
    assert row["test1 · pooled"] == "0.6000" and row["Δ test1"] == "+2.00 [-1.00, +5.00]"
    assert report.ROWS["llm-run:model"] in table.index  # the llm run's own model, beside
    assert table.loc[report.ROWS["kdsl[mcts@data]"], "test1 · pooled"] == "0.5000"  # not the llm run's
