"""Dynamic CoT (kdsl_utils.dynamic_cot): the rationale check and the dynamic selection as pure
functions, then every line of the paper path on the tiny Qwen2-VL twin (CPU): teacher
rationales from the model itself (cached), the target override and its masking, the
per-epoch re-decision inside one Trainer run, and inference that may think."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import synthetic_mire
from kdsl_utils import dynamic_cot as dc
from kdsl_utils import report
from kdsl_utils.config import resolve
from kdsl_utils.data.labels import IMAGE_LABELS, INTENT_LABELS
from kdsl_utils.models.qwen_vl import QwenVLBackend
from kdsl_utils.models.sft import IGNORE_INDEX, sft_dataset
from kdsl_utils.results import RunLog, write_metrics

pytestmark = [pytest.mark.xdist_group("qwen_vl"), pytest.mark.usefixtures("one_torch_thread")]
CANDS = tuple(INTENT_LABELS)
GOLD = INTENT_LABELS[3]


# --------------------------------------------------------------------------- rationale check
def test_check_rationale_accepts_a_rationale_ending_in_the_gold_label():
    chk = dc.check_rationale(f"客户在问发货时间。\n答案：{GOLD}", GOLD, CANDS)
    assert chk.ok and chk.label == GOLD and chk.rationale == "客户在问发货时间。"
    # normalised answer forms parse too (full-width colon variant, brackets, trailing stop)
    assert dc.check_rationale(f"理由。答案: 【{GOLD}】。", GOLD, CANDS).ok


@pytest.mark.parametrize("text,reason", [
    (f"理由。\n答案：{INTENT_LABELS[4]}", "wrong_label"),
    ("理由，但没有说是哪一类", "no_label"),
    # no answer line: the label mentioned last decides
    (f"不是{GOLD}，而是{INTENT_LABELS[4]}", "wrong_label"),
    ("理由。\n答案：不知道", "unparseable_answer"),
    (f"答案：{GOLD}", "empty_rationale"),
    # the *last* answer line decides: a rationale that changes its mind is judged by its end
    (f"答案：{GOLD}\n不对。\n答案：{INTENT_LABELS[4]}", "wrong_label"),
])
def test_check_rationale_rejects(text, reason):
    chk = dc.check_rationale(text, GOLD, CANDS)
    assert not chk.ok and chk.reason == reason


def test_check_rationale_without_answer_line_uses_the_last_mention():
    chk = dc.check_rationale(f"客户问的不是{INTENT_LABELS[4]}，因此分类结果为“{GOLD}”。", GOLD, CANDS)
    assert chk.ok and chk.form == "last_mention" and chk.label == GOLD
    assert dc.last_label_mentioned("退款页面", ["退款", "退款页面"]) == "退款页面"  # longest wins
    assert dc.last_label_mentioned("无", CANDS) is None


def test_parse_cot_answer_direct_and_reasoned():
    assert dc.parse_cot_answer(GOLD, CANDS) == (GOLD, "exact", False)
    assert dc.parse_cot_answer(f"先想一想。\n答案：{GOLD}", CANDS)[::2] == (GOLD, True)
    assert dc.parse_cot_answer("乱码", CANDS) == (None, "unparseable", False)


# --------------------------------------------------------------------------- dynamic selection
LOSSES = {"a": 0.1, "b": 0.5, "c": 0.9, "d": 2.0}


def test_select_cot_above_the_loss_quantile():
    ch = dc.select_cot(LOSSES, 0.5)
    assert ch.gamma == pytest.approx(0.7) and ch.ids == {"c", "d"}
    assert dc.select_cot(LOSSES, 1.0).ids == set()  # γ = max: nobody is strictly above
    assert dc.select_cot(LOSSES, 0.0).ids == {"b", "c", "d"}  # all but the minimum
    assert dc.select_cot(LOSSES, 0.75).ids == {"d"}


def test_select_cot_only_records_with_an_accepted_rationale():
    # γ is the quantile of *all* losses; ineligible records are not replaced by easier ones
    assert dc.select_cot(LOSSES, 0.5, eligible={"a", "d"}).ids == {"d"}
    assert dc.select_cot(LOSSES, 0.0, eligible=set()).ids == set()


def test_select_cot_rejects_bad_input():
    with pytest.raises(ValueError):
        dc.select_cot(LOSSES, 1.5)
    with pytest.raises(ValueError):
        dc.select_cot({"a": float("nan"), "b": 1.0}, 0.5)
    assert dc.select_cot({}, 0.5).ids == set()


def test_not_applicable_for_mini():
    cfg = resolve("mini")
    assert not dc.applicable(cfg) and dc.applicable(resolve("tiny"))
    rows = dc.not_applicable_rows(cfg, experiment="05_dynamic_cot", seed=0, splits=["test1"])
    assert {r["metric"] for r in rows} == {"applicable"} and {r["value"] for r in rows} == {0.0}
    with pytest.raises(ValueError, match="not applicable"):
        dc.run_cot(cfg, [], [], {}, seed=0, work_dir=".")


# --------------------------------------------------------------------------- tiny model path
CFG = resolve("tiny", cot__epochs=2.0, train__learning_rate=2e-2)




@pytest.fixture(scope="module")
def mire(tmp_path_factory):
    return synthetic_mire(tmp_path_factory, per_label=1)


@pytest.fixture(scope="module")
def train_set(mire):
    return ([r for r in mire.train if r.task == "image"][:3]
            + [r for r in mire.train if r.task == "intent"][:3])


def test_model_teacher_rationales_are_checked_and_cached(train_set, tmp_path):
    cfg = resolve("tiny", cot__teacher="large", cot__teacher_sample=2)
    cache = tmp_path / "rat.json"
    r1 = dc.teacher_rationales(cfg, train_set, cache_path=cache, seed=0)
    assert len(r1.rows) == 2 and not r1.rows.cached.any() and cache.is_file()
    # the random twin's text is checked like any other: a rejected one has its reason
    assert set(r1.rows.reason) <= {"ok", "no_label", "unparseable_answer", "wrong_label",
                                   "empty_rationale"}
    assert r1.rejected_share == pytest.approx(1 - r1.rows.ok.mean())
    r2 = dc.teacher_rationales(cfg, train_set, cache_path=cache, seed=0)
    assert r2.rows.cached.all() and r2.rows.text.tolist() == r1.rows.text.tolist()


def test_template_teacher_and_target_masking(train_set):
    rat = dc.teacher_rationales(CFG, train_set, teacher="template")
    assert rat.rows.ok.all() and rat.rejected_share == 0.0
    targets = rat.targets
    be = QwenVLBackend(CFG)
    be._ensure()
    ds, _ = sft_dataset(train_set, be.encoder, targets=targets)
    r = train_set[-1]
    ex = ds[len(train_set) - 1]
    ids, labels = ex["input_ids"], ex["labels"]
    trained = ids[labels != IGNORE_INDEX].tolist()
    assert trained == be.encoder.label_ids(targets[r.id])  # the whole CoT target, then <|im_end|>
    assert (labels[: ex["prompt_len"]] == IGNORE_INDEX).all()  # never the prompt
    targets.clear()  # read at access: the plain label again
    assert ds[len(train_set) - 1]["labels"][ex["prompt_len"]:].ne(IGNORE_INDEX).sum() == len(
        be.encoder.label_ids(r.label))


def test_three_variants_same_budget_and_dynamic_redecides(train_set, mire, tmp_path):
    rat = dc.teacher_rationales(CFG, train_set, teacher="template")
    fits = {v: dc.fit_variant(CFG, train_set, rat.targets, variant=v, seed=0,
                              quantile=0.5 if v == "dynamic_cot" else None,
                              out_dir=tmp_path / v)
            for v in dc.VARIANTS}
    steps = {v: f.steps for v, f in fits.items()}
    assert len(set(steps.values())) == 1 and steps["sft"] == 6  # 6 records, batch 2, 2 epochs
    dyn = fits["dynamic_cot"]
    assert [h["epoch"] for h in dyn.history] == [1]  # warm-up epoch 0 is plain SFT
    h = dyn.history[0]
    assert len(h["ids"]) == sum(v > h["gamma"] for v in h["losses"].values()) > 0
    assert fits["full_cot"].n_cot_targets == len(train_set) and fits["sft"].n_cot_targets == 0
    # a rerun loads the finished run and its decisions instead of training again
    again = dc.fit_variant(CFG, train_set, rat.targets, variant="dynamic_cot", seed=0, quantile=0.5,
                           out_dir=tmp_path / "dynamic_cot")
    assert again.history == dyn.history and again.n_cot_targets == dyn.n_cot_targets == len(h["ids"])
    test = list(mire.tests["test1"])[:4]
    res = dc.think_predict(fits["full_cot"].backend, test, max_new_tokens=12, token_limit=10)
    df = res.rows
    assert len(df) == 4 and df.n_tokens.between(0, 12).all()
    assert (df.fits == (df.stopped & (df.n_tokens <= 10))).all()
    assert df.scored.isin(IMAGE_LABELS + INTENT_LABELS).all()
    rows = dc.think_rows(res, experiment="x", variant="full_cot", seed=0, split="test1")
    got = {(r["variant"], r["metric"]) for r in rows if r["task"] == "pooled"}
    assert {("full_cot/parsed", "weighted_f1"), ("full_cot/scored_after_reasoning", "weighted_f1"),
            ("full_cot/generation", "fits_token_limit_rate")} <= got
    dec = dc.reasoning_by_label(pd.DataFrame([{"epoch": 1, "id": i, "label": "x", "task": "image",
                                               "cot": i in h["ids"]} for i in h["losses"]]))
    assert dec.n_cot.sum() == len(h["ids"])


def test_report_says_not_applicable_for_mini(tmp_path):
    run = tmp_path / "05_dynamic_cot"
    run.mkdir()
    write_metrics(dc.not_applicable_rows(resolve("mini"), experiment="05_dynamic_cot", seed=0,
                                         splits=["test1"]), run / "metrics.csv")
    RunLog(experiment="05_dynamic_cot", config={}, data_dir="", data_fingerprint="",
           extra={}).write(run / "run.json")
    md = report.readme_section("mini", {"05_dynamic_cot": run}, tmp_path / "fig", tmp_path)
    assert "Not applicable for this profile" in md and "| sft (parsed)" not in md



class FakeText:
    """A text teacher that answers the label it is told for image records, another intent
    label for intent records (a wrong final label)."""

    identity = "fake-v1"

    def __init__(self):
        self.prompts = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        label = prompt.split("已知正确答案是「")[1].split("」")[0]
        if label in INTENT_LABELS:
            label = INTENT_LABELS[INTENT_LABELS.index(label) - 1]
        return f"理由。\n答案：{label}"


def test_text_teacher_checked_cached_and_time_bounded(train_set, tmp_path):
    gen = FakeText()
    rat = dc.teacher_rationales(CFG, train_set, teacher="text", generator=gen,
                                cache_path=tmp_path / "c.json")
    assert len(gen.prompts) == len(train_set) and all("<image>" not in p for p in gen.prompts)
    assert (rat.rows.ok == (rat.rows.task == "image")).all()
    assert set(rat.rows[~rat.rows.ok].reason) == {"wrong_label"}
    assert rat.rejected_share == pytest.approx(1 - rat.rows.ok.mean())
    assert set(rat.targets) == set(rat.rows[rat.rows.ok].id)
    dc.teacher_rationales(CFG, train_set, teacher="text", generator=gen,
                          cache_path=tmp_path / "c.json")
    assert len(gen.prompts) == len(train_set)  # second call: all from the cache
    tiny_budget = resolve("tiny", cot__teacher_budget_s=1e-9)
    cut = dc.teacher_rationales(tiny_budget, train_set, teacher="text", generator=FakeText())
    assert set(cut.rows.reason) == {"not_generated"} and cut.targets == {}
    with pytest.raises(ValueError):
        dc.teacher_rationales(CFG, train_set, teacher="oracle")
