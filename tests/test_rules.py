"""Rule schema, observables, vectorised engine, override collaboration and both proposers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from sklearn.metrics import f1_score

from kdsl_utils.data.labels import ALL_LABELS, IMAGE_LABELS, INTENT_LABELS
from kdsl_utils.data.records import AGENT, USER, Record, Turn
from kdsl_utils.collab import make_override, override
from kdsl_utils.metrics import weighted_f1_idx as weighted_f1
from kdsl_utils.models.base import Predictions
from kdsl_utils.rules import (Condition, DataProposer, ErrorExample, LLMProposer, RuleBase,
                              RuleEngine, RuleValidationError, build_observables, label_indices,
                              load_rulebase, make_rule, parse_rules, rulebase_json_schema,
                              rules_table, validate_rule)

SEAL, MATERIAL, SEASON = "反馈密封性不好", "商品材质", "适用季节"
ORDER, REFUND = "订单详情页面", "退款页面"


def intent(rid: str, text: str, label: str | None = None, n_images: int = 0) -> Record:
    turns = (Turn(USER, "你好"), Turn(AGENT, "您好"), Turn(USER, text))
    return Record(rid, "intent", "", label, tuple(Path(f"{rid}-{i}.jpg") for i in range(n_images)),
                  INTENT_LABELS, turns)


def image(rid: str, label: str | None = None) -> Record:
    return Record(rid, "image", "", label, (Path(f"{rid}.jpg"),), IMAGE_LABELS)


def C(field, op, value, negate=False) -> Condition:  # noqa: N802
    return Condition(field, op, tuple(value) if isinstance(value, list) else value, negate)


@pytest.fixture()
def toy():
    recs = [intent("a", "盖子漏水了怎么办", SEAL, 1),
            intent("b", "这是什么材质的？", MATERIAL, 0),
            intent("c", "冬天能用吗 Winter", SEASON, 2),
            intent("d", "漏水，材质也不好", SEAL, 3),
            image("e", ORDER), image("f", REFUND)]
    ocr = {"a": ["漏水"], "e": ["订单详情", "漏水"], "f": "退款金额"}
    scene = {"a": [REFUND], "c": [ORDER, REFUND], "e": ORDER, "f": REFUND}
    return recs, build_observables(recs, ocr_texts=ocr, image_scene=scene)


# ------------------------------------------------------------------------------ observables

def test_build_observables(toy):
    recs, obs = toy
    assert obs.ids == ["a", "b", "c", "d", "e", "f"]
    assert list(obs.tasks) == ["intent"] * 4 + ["image"] * 2
    assert obs.fields["user_text"][0] == "你好\n盖子漏水了怎么办"
    assert obs.fields["last_user_turn"][2] == "冬天能用吗 Winter"
    assert obs.fields["ocr_text"][4] == "订单详情\n漏水" and obs.fields["ocr_text"][1] == ""
    assert obs.fields["image_count"].tolist() == [1, 0, 2, 3, 1, 1]
    assert obs.fields["image_scene"][2] == (ORDER, REFUND) and obs.fields["image_scene"][4] == (ORDER,)
    assert obs.available == {"user_text", "last_user_turn", "image_count", "ocr_text",
                             "image_scene"}
    assert obs.labels.tolist() == label_indices([r.label for r in recs]).tolist()
    sub = obs.subset([5, 0])
    assert sub.ids == ["f", "a"] and sub.fields["image_count"].tolist() == [1, 1]
    assert build_observables([intent("x", "t")]).labels is None  # unlabelled
    with pytest.raises(ValueError, match="ocr_texts"):
        build_observables(recs, ocr_texts=["only one"])


# ------------------------------------------------------------------------------ engine

def test_condition_operators(toy):
    _, obs = toy
    eng = RuleEngine(obs)
    m = lambda *a, **k: eng.condition_mask(C(*a, **k)).tolist()  # noqa: E731
    assert m("user_text", "keyword_any", ["漏水", "材质"]) == [1, 1, 0, 1, 0, 0]
    assert m("user_text", "keyword_all", ["漏水", "材质"]) == [0, 0, 0, 1, 0, 0]
    assert m("user_text", "keyword_any", ["winter"]) == [0, 0, 1, 0, 0, 0]  # case-insensitive
    assert m("user_text", "keyword_any", ["漏水"], negate=True) == [0, 1, 1, 0, 1, 1]
    assert m("user_text", "regex", r"什么.{0,2}质") == [0, 1, 0, 0, 0, 0]
    assert m("user_text", "regex", r"^winter") == [0] * 6  # regex is case-sensitive
    assert m("image_count", "ge", 2.0) == [0, 0, 1, 1, 0, 0]
    assert m("image_count", "eq", 0.0) == [0, 1, 0, 0, 0, 0]
    assert m("image_count", "lt", 1.0, negate=True) == [1, 0, 1, 1, 1, 1]
    assert m("image_scene", "keyword_any", [ORDER]) == [0, 0, 1, 0, 1, 0]
    assert m("image_scene", "keyword_all", [ORDER, REFUND]) == [0, 0, 1, 0, 0, 0]
    assert m("ocr_text", "keyword_any", ["漏水"]) == [1, 0, 0, 0, 1, 0]
    n = eng.stats["condition_evals"]
    m("image_count", "ge", 2.0)
    assert eng.stats["condition_evals"] == n  # cached


def test_decision_list_order_task_restriction_and_stats(toy):
    recs, obs = toy
    eng = RuleEngine(obs)
    leak = make_rule("intent", SEAL, [C("ocr_text", "keyword_any", ["漏水"])], id="leak")
    mat = make_rule("intent", MATERIAL, [C("user_text", "keyword_any", ["材质"])], id="mat")
    many = make_rule("intent", SEASON, [C("image_count", "ge", 2.0)], id="many")
    img = make_rule("image", ORDER, [C("ocr_text", "keyword_any", ["订单"])], id="img")
    res = eng.apply([mat, leak, many, img], y=obs.labels)
    # d matches mat (first) and many; e's OCR has 漏水 but leak is an intent rule
    assert res.fired_ids == ["leak", "mat", "many", "mat", "img", None]
    assert res.labels == [SEAL, MATERIAL, SEASON, MATERIAL, ORDER, None]
    assert res.masks.sum(axis=1).tolist() == [2, 1, 2, 1]
    assert res.support.tolist() == [2, 1, 1, 1] and res.correct.tolist() == [1, 1, 1, 1]
    assert res.precision.tolist() == [0.5, 1.0, 1.0, 1.0]
    assert res.coverage == pytest.approx(5 / 6)
    res2 = eng.apply([many, leak, mat, img])  # order changes who fires on d
    assert res2.fired_ids[3] == "many" and res2.fired_ids[0] == "leak"
    assert np.isnan(res2.precision).all()  # no gold, no stats
    empty = eng.apply([])
    assert empty.fired.tolist() == [-1] * 6 and empty.masks.shape == (0, 6)
    t = res.table()
    assert t["rule"].tolist() == ["mat", "leak", "many", "img"] and t["fired"].sum() == 5
    df = rules_table([mat, leak])
    assert df["conditions"].tolist() == ["user_text any {材质}", "ocr_text any {漏水}"]
    neg = make_rule("intent", SEAL, [C("user_text", "keyword_any", ["漏水"]),
                                     C("user_text", "keyword_any", ["材质"], negate=True)])
    assert eng.apply([neg]).fired_ids[:4] == [neg.id, None, None, None]
    assert "NOT user_text any {材质}" in neg.describe()


def test_override_and_weighted_f1(toy):
    _, obs = toy
    eng = RuleEngine(obs)
    proba = np.zeros((6, len(ALL_LABELS)))
    proba[:, ALL_LABELS.index(SEASON)] = 1.0  # the model says SEASON everywhere
    good = make_rule("intent", SEAL, [C("user_text", "keyword_any", ["漏水"])], id="good")
    res = eng.apply([good], y=obs.labels)  # fires on a, d: both right -> precision 1
    preds = Predictions(obs.ids, list(obs.tasks), proba)
    out = override(preds, res, 0.8)
    assert [ALL_LABELS[i] for i in out[:4]] == [SEAL, SEASON, SEASON, SEAL]
    res.precision[:] = 0.5
    assert (override(proba, res, 0.8) == proba.argmax(1)).all()  # untrusted rule ignored
    res.precision[:] = 1.0
    assert (make_override(0.8, min_support=3)(proba, res) == proba.argmax(1)).all()
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 48, 200)
        p = np.where(rng.random(200) < 0.5, y, rng.integers(-1, 48, 200))
        assert weighted_f1(y, p) == pytest.approx(f1_score(y, p, average="weighted"))


def test_engine_speed_print():
    """Not a timed assertion: prints rule-set evaluations per second (see benchmarks/)."""
    rng = np.random.default_rng(0)
    chars = list("漏水材质冬天能用吗怎么这个多少钱颜色尺寸发货")
    recs = [intent(f"r{i}", "".join(rng.choice(chars, 20)), INTENT_LABELS[i % 23],
                   int(rng.integers(0, 3))) for i in range(300)]
    obs = build_observables(recs)
    eng = RuleEngine(obs)
    rules = [make_rule("intent", INTENT_LABELS[j % 23],
                       [C("user_text", "keyword_any", ["".join(rng.choice(chars, 2))])])
             for j in range(30)]
    proba = rng.random((300, 48))
    comb = make_override(0.5)
    t0, n = time.perf_counter(), 500
    for i in range(n):
        sub = [rules[j] for j in range(30) if (i >> (j % 10)) & 1]
        weighted_f1(obs.labels, comb(proba, eng.apply(sub, y=obs.labels)))
    print(f"\n[engine] {n / (time.perf_counter() - t0):.0f} rule-set evaluations/s "
          f"(300 records, <=30 rules, reward included)")


# ------------------------------------------------------------------------------ schema

def _rule(**kw):
    d = {"id": "r1", "task": "intent", "label": SEAL,
         "conditions": [{"field": "user_text", "op": "keyword_any", "value": ["漏水"]}]}
    d.update(kw)
    return d


def test_rulebase_roundtrip(tmp_path):
    r = validate_rule(_rule(rationale="leaks", stats={"support": 3, "precision": 0.9,
                                                      "fold": "train"}))
    r2 = make_rule("intent", MATERIAL, [C("image_count", "ge", 1),
                                        C("user_text", "regex", r"材.", negate=True)])
    path = RuleBase([r, r2], meta={"seed": 0}).save(tmp_path / "rb.json")
    raw = json.loads(path.read_text("utf-8"))
    assert raw["schema_version"] == "1.0" and "材" in path.read_text("utf-8")
    rb = load_rulebase(path)
    assert [x.id for x in rb] == ["r1", r2.id] and rb.meta == {"seed": 0}
    assert rb.rules[0].stats["precision"] == 0.9 and rb.rules[1].key == r2.key
    assert make_rule("intent", SEAL, r2.conditions).id == make_rule("intent", SEAL,
                                                                    r2.conditions).id
    jsonschema.validate(raw, rulebase_json_schema())  # the file also passes the full schema


@pytest.mark.parametrize("rule, kind, fragment", [
    (_rule(conditions=[]), "schema", "conditions"),
    (_rule(conditions=[{"field": "user_text", "op": "contains", "value": ["x"]}]), "schema", "op"),
    (_rule(conditions=[{"field": "dialogue", "op": "keyword_any", "value": ["x"]}]),
     "unknown_field", "dialogue"),
    (_rule(conditions=[{"field": "user_text", "op": "ge", "value": 2}]), "bad_op", "ge"),
    (_rule(conditions=[{"field": "image_count", "op": "keyword_any", "value": ["2"]}]),
     "bad_op", "image_count"),
    (_rule(conditions=[{"field": "user_text", "op": "keyword_any", "value": []}]),
     "bad_value", "non-empty"),
    (_rule(conditions=[{"field": "image_count", "op": "ge", "value": "two"}]), "bad_value", "two"),
    (_rule(conditions=[{"field": "image_scene", "op": "keyword_any", "value": ["截图"]}]),
     "bad_value", "截图"),
    (_rule(label="密封不好"), "unknown_label", "密封不好"),
    (_rule(label="实物拍摄（含售后）", task="image"), "unknown_label", "did you mean"),
    (_rule(label=ORDER), "wrong_task", "image"),
    (_rule(conditions=[{"field": "user_text", "op": "regex", "value": "漏("}]), "bad_regex",
     "漏("),
])
def test_validation_errors_name_rule(rule, kind, fragment):
    rule = {**rule, "id": "bad-7"}
    with pytest.raises(RuleValidationError) as ei:
        validate_rule(rule)
    assert ei.value.kind == kind and ei.value.rule_id == "bad-7"
    assert "'bad-7'" in str(ei.value) and fragment in str(ei.value)


def test_rulebase_file_errors(tmp_path):
    p = tmp_path / "rb.json"
    p.write_text(json.dumps({"schema_version": "9.9", "rules": []}))
    with pytest.raises(RuleValidationError, match="schema_version") as ei:
        load_rulebase(p)
    assert ei.value.kind == "version"
    p.write_text(json.dumps({"schema_version": "1.0", "rules": [_rule(), _rule()]}))
    with pytest.raises(RuleValidationError, match="'r1'.*duplicate_id"):
        load_rulebase(p)
    p.write_text(json.dumps({"schema_version": "1.0", "rules": [_rule(), _rule(id="r2",
                                                                              label="x")]}))
    with pytest.raises(RuleValidationError, match=r"rb.json rules\[1\]: rule 'r2'"):
        load_rulebase(p)
    p.write_text("{not json")
    with pytest.raises(RuleValidationError, match="not valid JSON"):
        load_rulebase(p)


# ------------------------------------------------------------------------------ LLM parsing

GOOD = {"label": SEAL, "conditions": [{"field": "user_text", "op": "keyword_any",
                                       "value": ["漏水", "漏气"]}], "rationale": "leaks"}


def test_parse_fenced_list():
    text = "Here are the rules:\n```json\n" + json.dumps([GOOD, {**GOOD, "conditions": [
        {"field": "image_count", "op": "ge", "value": 2}]}], ensure_ascii=False) + "\n```\nDone."
    rep = parse_rules(text, SEAL, id_prefix="t")
    assert rep.n_valid == 2 and rep.n_invalid == 0
    assert [r.id for r in rep.rules] == ["t-0", "t-1"] and rep.rules[0].task == "intent"
    assert rep.rules[0].rationale == "leaks" and rep.rules[0].provenance["proposer"] == "llm"


def test_parse_several_objects_repairs_and_defaults():
    text = ('{"conditions": [{"field": "user_text", "op": "keyword_any", "value": "漏水",},]}\n'
            "then {'label': '" + SEAL + "', 'conditions': [{'field': 'image_count', "
            "'op': 'eq', 'value': 0, 'negate': True}]} and trailing words {"
            '"rules": [' + json.dumps(GOOD, ensure_ascii=False) + "]}")
    rep = parse_rules(text, SEAL)
    assert rep.n_valid == 3 and rep.n_invalid == 0
    assert rep.rules[0].label == SEAL  # label defaulted to the target
    assert rep.rules[0].conditions[0].value == ("漏水",)  # string promoted to a keyword list
    assert rep.rules[1].conditions[0].negate is True


def test_parse_partly_valid_counts_reasons():
    bad_field = {**GOOD, "id": "m1", "conditions": [{"field": "title", "op": "keyword_any",
                                                     "value": ["x"]}]}
    bad_label = {**GOOD, "label": "密封"}
    bad_regex = {**GOOD, "conditions": [{"field": "user_text", "op": "regex", "value": "("}]}
    text = "```\n" + json.dumps([GOOD, bad_field, bad_label, bad_regex],
                                ensure_ascii=False) + "\n```"
    text += '\n{"label": "' + SEAL + '", "conditions": [{"field": "user_text", "op": "rege'
    rep = parse_rules(text, SEAL)
    assert rep.n_valid == 1
    assert [i["kind"] for i in rep.invalid] == ["unknown_field", "unknown_label", "bad_regex"]
    assert rep.n_fragments == 1 and rep.n_invalid == 4  # + the truncated rule


@pytest.mark.parametrize("garbage", ["", "I cannot help with that.", "[1, 2, 3] {}",
                                     "```json\n{{{\n```", '{"foo": "bar"}'])
def test_parse_garbage(garbage):
    rep = parse_rules(garbage, SEAL)
    assert rep.n_valid == 0 and rep.invalid == []


def _errors():
    return [ErrorExample("e1", "intent", SEAL, MATERIAL,
                         {"user_text": "水杯漏水了", "last_user_turn": "水杯漏水了",
                          "image_count": 1, "image_scene": [REFUND]}),
            ErrorExample("e2", "intent", MATERIAL, SEAL,
                         {"user_text": "什么材质", "last_user_turn": "什么材质", "image_count": 0})]


def test_llm_proposer_prompt_cache_and_counts():
    answers = ["```json\n" + json.dumps([GOOD, {**GOOD, "label": "??"}], ensure_ascii=False)
               + "\n```", "no rules, sorry"]
    prompts = []

    def generate(prompt: str) -> str:
        prompts.append(prompt)
        return answers[len(prompts) - 1]

    prop = LLMProposer(generate, descriptions={SEAL: "the product leaks"}, count_tokens=len,
                       seed=1)
    rules = prop.propose(SEAL, _errors(), k=3)
    assert len(rules) == 1 and rules[0].id.startswith("l") and rules[0].label == SEAL
    p = prompts[0]
    assert SEAL in p and "the product leaks" in p and "水杯漏水了" in p and "predicted: 商品材质" in p
    assert "keyword_any" in p and "```json" in p
    assert prop.propose(SEAL, _errors(), k=3) == rules  # cached: no new call
    assert prop.calls == 1 and prop.cache_hits == 1 and len(prompts) == 1
    assert prop.propose(MATERIAL, _errors(), k=3) == []
    c = prop.cost()
    assert c["calls"] == 2 and c["valid_rules"] == 1 and c["invalid_rules"] == 1
    assert c["invalid_kinds"] == {"unknown_label": 1}
    assert c["tokens"] == sum(map(len, prompts)) + sum(map(len, answers))


def test_llm_proposer_with_training_fold():
    train = _mining_set()
    seen = []

    def generate(prompt):
        seen.append(prompt)
        return json.dumps([GOOD])

    prop = LLMProposer(generate, train=train, n_typical=2, seed=0)
    (rule,) = prop.propose(SEAL, _errors(), k=2)
    assert rule.stats == {"support": 6, "precision": 5 / 6, "fold": "train"}  # measured
    assert "Typical records with this label" in seen[0]
    assert "image_scene" not in seen[0].split("Fields:")[1]  # not available in this fold


# ------------------------------------------------------------------------------ data proposer

def _mining_set():
    texts = {SEAL: ["瓶盖漏水", "漏水严重", "一直漏水啊", "杯子漏水", "密封漏水了"],
             MATERIAL: ["什么材质", "材质是啥", "材质安全吗", "是不锈钢材质吗"],
             SEASON: ["冬天能用吗", "夏天用", "冬天穿冷吗", "四季通用吗"]}
    recs = [intent(f"{lab}{i}", t, lab, i % 2) for lab, ts in texts.items()
            for i, t in enumerate(ts)]
    recs.append(intent("noise", "漏水吗？什么材质", MATERIAL))
    return build_observables(recs)


def test_data_proposer_mines_keywords():
    prop = DataProposer(_mining_set(), min_df=1, seed=0)
    rules = prop.propose(SEAL, [], k=3)
    assert 2 <= len(rules) <= 3 and all(r.label == SEAL and r.task == "intent" for r in rules)
    top = rules[0]
    assert top.stats["fold"] == "train" and top.stats["precision"] == 1.0
    assert any("漏水" in c.value[0] or c.value[0] in "漏水" for c in top.conditions
               if c.op == "keyword_any" and not c.negate)
    assert top.provenance["proposer"] == "data" and top.provenance["call"] == 0
    # an error example steers the ranking towards rules that cover it
    err = [ErrorExample("x", "intent", SEASON, MATERIAL,
                        {"user_text": "冬天冷吗", "last_user_turn": "冬天冷吗"})]
    steer = prop.propose(SEASON, err, k=2)
    assert steer[0].provenance["covers_errors"] == 1
    assert prop.calls == 2 and prop.propose(SEAL, [], k=3) == rules and prop.cache_hits == 1
    # widen a keyword condition with another good n-gram of the same label
    single = next(r for r in prop.propose(MATERIAL, [], k=10) if len(r.conditions) == 1)
    wide = prop.widen(single, 0)
    assert wide is None or len(wide.conditions[0].value) == 2
    assert prop.cost()["calls"] == 3


def test_data_proposer_needs_labels():
    with pytest.raises(ValueError, match="labelled"):
        DataProposer(build_observables([intent("x", "t")]))
