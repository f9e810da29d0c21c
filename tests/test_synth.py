"""The synthetic MIRE generator and the CJK font helper.

Small sizes only (a few seconds): per_label=2, test_per_label=1. The non-triviality tests
plan the default size without rendering images (text only, fast).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from kdsl_utils.data import synth
from kdsl_utils.data import synth_templates as T
from kdsl_utils.data.labels import IMAGE_LABELS, INTENT_LABELS
from kdsl_utils.data.prompts import image_instruction, intent_instruction, label_list_json
from kdsl_utils.data.records import AGENT, IMAGE_TOKEN, USER
from kdsl_utils.data.source import ensure_generated
from kdsl_utils.hashing import directory_digest

SMALL = {"per_label": 1, "test_per_label": 1}  # 46 labels x 3 splits = 138 records, ~150 images
#: A tiny dataset: every label but two image and two intent labels left out.
FEW = {"per_label": 1, "test_per_label": 1, "test_files": ("test1",),
       "absent_labels": IMAGE_LABELS[2:] + INTENT_LABELS[2:]}
IMAGE_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}-\d+$")
INTENT_ID = re.compile(r"^[0-9a-f]{30}$")


def file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return synth.generate_mire(tmp_path_factory.mktemp("synth") / "a", seed=0, **SMALL)


@pytest.fixture(scope="module")
def small_again(tmp_path_factory) -> Path:
    return synth.generate_mire(tmp_path_factory.mktemp("synth") / "b", seed=0, **SMALL)


def read(root: Path, split: str) -> list[dict]:
    return json.loads((root / f"{split}.json").read_text(encoding="utf-8"))


def dialogue_turns(instruction: str) -> list[tuple[str, str]]:
    body = instruction.split("<用户与客服的对话 START>\n", 1)[1].split("<用户与客服的对话 END>", 1)[0]
    turns = []
    for line in body.rstrip("\n").split("\n"):
        role, text = line.split(": ", 1)
        turns.append((role, text))
    return turns


# -- determinism -------------------------------------------------------------------------------
def test_same_seed_gives_byte_identical_files(small, small_again):
    a, b = file_hashes(small), file_hashes(small_again)
    assert a == b
    assert directory_digest(small) == directory_digest(small_again)
    assert any(k.startswith("images/") for k in a) and "train.json" in a


def test_different_seed_differs(tmp_path):
    a = file_hashes(synth.generate_mire(tmp_path / "s0", seed=0, **FEW))
    b = file_hashes(synth.generate_mire(tmp_path / "s1", seed=1, **FEW))
    assert a["train.json"] != b["train.json"] and a[synth.PARAMS_FILE] != b[synth.PARAMS_FILE]
    images_a = {k for k in a if k.startswith("images/")}
    assert images_a and images_a.isdisjoint(b)  # new ids, so new image names


def test_records_do_not_depend_on_rendering():
    first, specs = synth.plan_mire(seed=3, **SMALL)
    again, _ = synth.plan_mire(seed=3, **SMALL)
    assert first == again and len(specs) == sum(len(r["image"]) for recs in first.values() for r in recs)


def test_every_scene_renders_deterministically():
    rng = __import__("random").Random(0)
    for k, label in enumerate(IMAGE_LABELS):
        p = synth._product(rng)
        a, b = synth.render_scene(label, 100 + k, p), synth.render_scene(label, 100 + k, p)
        assert a.mode == "RGB" and a.size in synth.IMAGE_SIZES, label
        assert a.tobytes() == b.tobytes(), label
        assert len(set(a.resize((32, 64)).tobytes())) > 8, f"{label}: image is nearly blank"


# -- format ------------------------------------------------------------------------------------
def test_files_and_schema(small):
    names = sorted(p.name for p in small.iterdir())
    assert names == sorted([synth.PARAMS_FILE, "images", "test1.json", "test2.json", "train.json"])
    text = (small / "train.json").read_text(encoding="utf-8")
    assert "\\u" not in text and "分类标签" in text  # ensure_ascii=False: raw CJK
    referenced = []
    ids = set()
    for split in ("train", "test1", "test2"):
        for r in read(small, split):
            assert list(r) == ["id", "instruction", "input", "output", "image"]
            assert r["input"] == "" and isinstance(r["image"], list)
            assert r["id"] not in ids
            ids.add(r["id"])
            ins = r["instruction"]
            assert ins.count(IMAGE_TOKEN) == len(r["image"])
            for k, name in enumerate(r["image"]):
                assert re.fullmatch(re.escape(r["id"]) + rf"-{k}\.(jpg|png)", name)
            referenced += r["image"]
            if r["output"] in IMAGE_LABELS:
                assert IMAGE_ID.match(r["id"]), r["id"]
                assert ins == image_instruction(1) and len(r["image"]) == 1
                assert ins.endswith(f"分类标签:{label_list_json(IMAGE_LABELS)}。")
            else:
                assert r["output"] in INTENT_LABELS
                assert INTENT_ID.match(r["id"]), r["id"]
                turns = dialogue_turns(ins)
                assert ins == intent_instruction(turns)  # the exact challenge template
                assert label_list_json(INTENT_LABELS) in ins
                assert [role for role, _ in turns] == [USER, AGENT] * (len(turns) // 2)
                assert any(role == USER and text.strip() for role, text in turns)
                assert all("\n" not in text for _, text in turns)
    files = sorted(p.name for p in (small / "images").iterdir())
    assert files == sorted(referenced)


def test_counts_per_label_and_absent_labels(small):
    present = [lab for lab in IMAGE_LABELS + INTENT_LABELS if lab not in synth.REAL_ABSENT_LABELS]
    for split in ("train", "test1", "test2"):
        counts = Counter(r["output"] for r in read(small, split))
        assert counts == Counter({lab: 1 for lab in present}), split
    assert len(present) == 46
    planned, _ = synth.plan_mire(seed=0, per_label=3, test_per_label=2, test_files=("test1", "test2", "test3"))
    for split, n in (("train", 3), ("test1", 2), ("test2", 2), ("test3", 2)):
        assert Counter(r["output"] for r in planned[split]) == Counter({lab: n for lab in present}), split


def test_all_labels_when_nothing_is_absent():
    splits, _ = synth.plan_mire(seed=0, per_label=1, test_per_label=1, test_files=("test1",), absent_labels=())
    for recs in splits.values():
        assert Counter(r["output"] for r in recs) == Counter({lab: 1 for lab in IMAGE_LABELS + INTENT_LABELS})


def test_parameter_validation(tmp_path):
    with pytest.raises(ValueError):
        synth.plan_mire(absent_labels=("不存在的标签",))
    with pytest.raises(ValueError):
        synth.plan_mire(test_files=("dev",))
    splits, _specs = synth.plan_mire(seed=0, per_label=1, test_per_label=0, test_files=(), max_images_per_dialogue=0)
    assert list(splits) == ["train"]
    assert all(len(r["image"]) == 0 for r in splits["train"] if r["output"] in INTENT_LABELS)


def test_images_decode_with_documented_sizes(small):
    for p in sorted((small / "images").iterdir()):
        with Image.open(p) as im:
            assert im.format == ("PNG" if p.suffix == ".png" else "JPEG"), p.name
            assert im.size in synth.IMAGE_SIZES, (p.name, im.size)
            im.load()


def test_loads_strictly_with_the_mire_loader(small):
    mire = pytest.importorskip("kdsl_utils.data.mire")
    data = mire.load_mire(small, strict=True)
    assert sorted(data.tests) == ["test1", "test2"]
    assert all(not rep.problems for rep in data.reports.values())
    n_img = sum(r.task == "image" for r in data.train)
    assert n_img == 25 - 2 and len(data.train) - n_img == 23
    assert all(len(r.turns) >= 2 for r in data.train if r.task == "intent")


def test_overwrite_and_ensure(tmp_path):
    out = tmp_path / "d"
    synth.generate_mire(out, seed=0, **FEW)
    with pytest.raises(FileExistsError):
        synth.generate_mire(out, seed=0, **FEW)
    before = (out / "train.json").stat().st_mtime_ns
    ensure_generated(out, seed=0, **FEW)
    assert (out / "train.json").stat().st_mtime_ns == before  # reused, not regenerated
    ensure_generated(out, seed=1, **FEW)
    assert json.loads((out / synth.PARAMS_FILE).read_text())["seed"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted([synth.PARAMS_FILE, "images", "test1.json", "train.json"])
    (out / "test1.json").unlink()  # a split missing: the stamp alone does not make it reusable
    ensure_generated(out, seed=1, **FEW)
    assert (out / "test1.json").is_file()
    foreign = tmp_path / "real"
    foreign.mkdir()
    (foreign / "train.json").write_text("[]")
    with pytest.raises(FileExistsError):
        synth.generate_mire(foreign, overwrite=True)
    assert (foreign / "train.json").read_text() == "[]"


# -- realism and difficulty (text only, default size) ----------------------------------------
@pytest.fixture(scope="module")
def default_plan():
    splits, specs = synth.plan_mire(seed=0)
    return splits, specs


def _intent_docs(records):
    docs, labels = [], []
    for r in records:
        if r["output"] in INTENT_LABELS:
            turns = dialogue_turns(r["instruction"])
            docs.append("\n".join(f"{role}: {text}" for role, text in turns))
            labels.append(r["output"])
    return docs, labels


def test_dialogue_style_like_the_real_data(default_plan):
    splits, specs = default_plan
    recs = [r for r in splits["train"] if r["output"] in INTENT_LABELS]
    text = "\n".join(r["instruction"] for r in recs)
    for marker in ("<http>", '"<http>"', "/:", "客服: \n", '"duration":'):
        assert marker in text, marker
    n_images = Counter(len(r["image"]) for r in recs)
    assert n_images[1] > len(recs) / 2 and n_images[0] > 0 and n_images[2] + n_images[3] > 0
    assert {s.name.rsplit(".", 1)[1] for s in specs} == {"jpg", "png"}


def test_held_out_paraphrases_only_in_test(default_plan):
    splits, _ = default_plan
    train_text = "\n".join(r["instruction"] for r in splits["train"])
    test_text = "\n".join(r["instruction"] for k in ("test1", "test2") for r in splits[k])
    held = [q for lab in INTENT_LABELS for kind in ("clear", "vague")
            for q in set(T.INTENTS[lab][kind]) - set(synth._pool(lab, kind, "train"))
            if "{" not in q]
    assert held and not any(q in train_text for q in held)
    assert any(q in test_text for q in held)


def test_one_keyword_per_label_does_not_solve_intent(default_plan):
    """Best single character n-gram per label, as a decision list: must stay well below 0.9."""
    splits, _ = default_plan
    docs, ys = _intent_docs(splits["train"])
    user = ["\n".join(ln[4:] for ln in d.split("\n") if ln.startswith(USER)) for d in docs]
    grams_of = [{u[i:i + n] for n in (1, 2, 3, 4) for i in range(len(u) - n + 1)} for u in user]
    df, tp = Counter(), Counter()
    for grams, y in zip(grams_of, ys):
        for g in grams:
            df[g] += 1
            tp[g, y] += 1
    n_label = Counter(ys)
    rules = []
    for lab in INTENT_LABELS:
        best = max(sorted(g for g in df if tp[g, lab]), key=lambda g: 2 * tp[g, lab] / (df[g] + n_label[lab]))
        rules.append((tp[best, lab] / df[best], best, lab))
    rules.sort(key=lambda r: -r[0])
    default = n_label.most_common(1)[0][0]
    correct = total = 0
    for split in ("test1", "test2"):
        tdocs, tys = _intent_docs(splits[split])
        for d, y in zip(tdocs, tys):
            u = "\n".join(ln[4:] for ln in d.split("\n") if ln.startswith(USER))
            pred = next((lab for _, g, lab in rules if g in u), default)
            correct += pred == y
            total += 1
    acc = correct / total
    assert 0.15 < acc < 0.9, acc  # learnable, but no keyword table solves it


def test_char_ngram_baseline_is_far_from_perfect(default_plan):
    pytest.importorskip("sklearn")
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    splits, _ = default_plan
    docs, ys = _intent_docs(splits["train"])
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True)
    clf = LogisticRegression(C=10, solver="saga", max_iter=300, tol=1e-3).fit(vec.fit_transform(docs), ys)
    tdocs, tys = [], []
    for split in ("test1", "test2"):
        d, y = _intent_docs(splits[split])
        tdocs += d
        tys += y
    f1 = f1_score(tys, clf.predict(vec.transform(tdocs)), average="weighted")
    assert 0.4 < f1 < 0.9, f1


# -- the CJK font ------------------------------------------------------------------------------
def test_cjk_font_renders_chinese():
    from kdsl_utils import fonts

    path = fonts.cjk_font_path()
    assert path.is_file()
    f = fonts.cjk_font(24)
    assert fonts.cjk_font(24) is f  # cached
    masks = {ch: bytes(f.getmask(ch)) for ch in "退款物流"}
    assert all(m and any(m) for m in masks.values())
    assert len(set(masks.values())) == 4  # distinct glyphs, not one missing-glyph box
    if not os.environ.get(fonts.ENV_VAR):
        assert fonts.cjk_family_name() == fonts.FONT_FAMILY


def test_missing_font_names_the_package(monkeypatch):
    from kdsl_utils import fonts

    monkeypatch.delenv(fonts.ENV_VAR, raising=False)
    monkeypatch.setattr(fonts, "noto_cjk_sans_otc", None)
    with pytest.raises(fonts.CJKFontNotFoundError, match=re.escape(fonts.FONT_PIN)):
        fonts.cjk_font_path()
    monkeypatch.setenv(fonts.ENV_VAR, "/nonexistent/font.ttf")
    with pytest.raises(fonts.CJKFontNotFoundError):
        fonts.cjk_font_path()


def test_matplotlib_renders_chinese_without_missing_glyphs(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdsl_utils import plots

    family = plots.setup_matplotlib_cjk()
    assert plots.setup_matplotlib_cjk() == family
    fig, ax = plt.subplots()
    try:
        ax.bar(["退款页面", "商品头图", "实物拍摄(含售后)"], [1, -2, 3])
        ax.set_title("意图分类 加权F1")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fig.savefig(tmp_path / "f.png")
    finally:
        plt.close(fig)
