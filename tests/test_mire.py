"""Loader and validator of the MIRE format: one test per bad-input class, plus real data."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import image_record, intent_record, make_mire, write_image
from PIL import Image

from kdsl_utils.data.labels import ALL_LABELS, IMAGE_LABELS, INTENT_LABELS
from kdsl_utils.data.mire import (MireError, MireValidationError, load_mire, load_split,
                                  parse_dialogue)
from kdsl_utils.data.prompts import intent_instruction


def _problem_kinds(root, **kw):
    _, report = load_split(root / "train.json", strict=False, **kw)
    return [p.kind for p in report.problems], report


def _bad(tmp_path, rec, kind):
    """A directory with one good and one bad record: strict raises naming the bad id;
    lenient skips exactly the bad one and reports its class."""
    root = make_mire(tmp_path / "d", [image_record("good-1"), rec])
    with pytest.raises(MireValidationError) as e:
        load_split(root / "train.json")
    rid = rec.get("id") if isinstance(rec, dict) else None
    assert "train.json" in str(e.value) and (rid is None or rid in str(e.value))
    kinds, report = _problem_kinds(root)
    assert kinds == [kind] and report.n_kept == 1 and report.n_skipped == 1
    return root


def test_good_records_parse(tmp_path):
    root = make_mire(tmp_path / "d", [image_record("a-1"), intent_record("b" * 30, n_images=2)],
                     {"test1": [image_record("c-1", label="")]})
    data = load_mire(root)
    img, intent = data.train
    assert img.task == "image" and img.candidates == IMAGE_LABELS and img.turns == ()
    assert intent.task == "intent" and intent.candidates == INTENT_LABELS
    assert [t.role for t in intent.turns] == ["用户", "客服", "用户", "用户", "用户", "客服"]
    assert [t.images for t in intent.turns][2:4] == [(0,), (1,)]
    assert intent.last_user_turn == "这个杯子是什么材质的"
    assert data.tests["test1"][0].label is None  # unlabelled test record
    assert all(p.is_absolute() and p.exists() for r in data.train for p in r.images)
    assert img.to_raw() == image_record("a-1")


def test_malformed_json(tmp_path):
    root = make_mire(tmp_path / "d", [])
    (root / "train.json").write_text('[{"id": "x",}]', encoding="utf-8")
    with pytest.raises(MireError, match=r"train.json: malformed JSON at line 1, column"):
        load_split(root / "train.json")


def test_not_a_list_and_missing_file(tmp_path):
    root = make_mire(tmp_path / "d", [])
    (root / "train.json").write_text('{"id": "x"}', encoding="utf-8")
    with pytest.raises(MireError, match="expected a JSON list"):
        load_split(root / "train.json")
    with pytest.raises(MireError, match="file not found"):
        load_split(root / "nope.json")
    with pytest.raises(MireError, match="MIRE directory not found"):
        load_mire(tmp_path / "absent")


def test_missing_field(tmp_path):
    rec = image_record("bad-1")
    del rec["output"]
    _bad(tmp_path, rec, "missing_field")


def test_wrong_type(tmp_path):
    rec = image_record("bad-1")
    rec["image"] = "bad-1-0.jpg"
    _bad(tmp_path, rec, "wrong_type")


def test_unknown_label(tmp_path):
    _bad(tmp_path, image_record("bad-1", label="首页截图"), "unknown_label")


def test_wrong_bracket_width(tmp_path):
    root = _bad(tmp_path, image_record("bad-1", label="实物拍摄（含售后）"), "wrong_bracket_width")
    _, report = _problem_kinds(root)
    assert "实物拍摄(含售后)" in report.problems[0].message


def test_label_of_other_task(tmp_path):
    _bad(tmp_path, image_record("bad-1", label="商品材质"), "label_not_in_candidates")


def test_missing_image(tmp_path):
    root = make_mire(tmp_path / "d", [image_record("good-1"), image_record("bad-1")])
    (root / "images" / "bad-1-0.jpg").unlink()
    kinds, _ = _problem_kinds(root)
    assert kinds == ["missing_image"]


def test_corrupt_image(tmp_path):
    root = make_mire(tmp_path / "d", [image_record("good-1"), image_record("bad-1")])
    p = root / "images" / "bad-1-0.jpg"
    p.write_bytes(p.read_bytes()[:200])  # truncated JPEG
    kinds, _ = _problem_kinds(root)
    assert kinds == ["corrupt_image"]
    (root / "images" / "bad-1-0.jpg").write_bytes(b"not an image at all")
    assert _problem_kinds(root)[0] == ["corrupt_image"]


def test_decompression_bomb(tmp_path):
    root = make_mire(tmp_path / "d", [image_record("good-1"), image_record("bad-1")])
    # A 1-bit 8000x8000 PNG: tiny on disk, 64 Mpx once decoded.
    Image.new("1", (8000, 8000)).save(root / "images" / "bad-1-0.jpg", format="PNG")
    kinds, report = _problem_kinds(root)
    assert kinds == ["decompression_bomb"] and "8000x8000" in report.problems[0].message


def test_zero_image_intent_is_valid(tmp_path):
    # The real data has one intent record without any image: it must load.
    root = make_mire(tmp_path / "d", [intent_record("c" * 30, n_images=0)])
    (rec,), report = load_split(root / "train.json")
    assert rec.images == () and not report.problems


def test_image_record_without_image(tmp_path):
    rec = image_record("bad-1", n_images=0)
    _bad(tmp_path, rec, "no_image")


def test_placeholder_mismatch(tmp_path):
    rec = intent_record("d" * 30, n_images=2)
    rec["image"] = rec["image"][:1]
    _bad(tmp_path, rec, "placeholder_mismatch")


def test_empty_dialogue(tmp_path):
    rec = intent_record("e" * 30, n_images=0)
    rec["instruction"] = intent_instruction([])
    _bad(tmp_path, rec, "empty_dialogue")
    rec["instruction"] = intent_instruction([("客服", "您好")])
    _bad(tmp_path / "2", rec, "empty_dialogue")


def test_duplicate_ids(tmp_path):
    root = make_mire(tmp_path / "d", [image_record("good-1"), image_record("dup-1"),
                                      image_record("dup-1")])
    kinds, report = _problem_kinds(root)
    assert kinds == ["duplicate_id"] and report.n_kept == 2


def test_bad_candidates(tmp_path):
    rec = image_record("bad-1")
    rec["instruction"] = rec["instruction"].replace('"退款页面",', '"退钱页面",')
    _bad(tmp_path, rec, "unknown_candidate")
    rec["instruction"] = "Picture 1: <image>\n请分类。"
    _bad(tmp_path / "2", rec, "bad_candidates")


def test_not_an_object(tmp_path):
    root = make_mire(tmp_path / "d", [image_record("good-1")])
    (root / "train.json").write_text(json.dumps([image_record("good-1"), ["x"]]), encoding="utf-8")
    kinds, _ = _problem_kinds(root)
    assert kinds == ["not_an_object"]


def test_dialogue_continuation_lines():
    instr = intent_instruction([("用户", "第一行"), ("客服", "多行\n第二行"), ("用户", "<image>问题")])
    turns = parse_dialogue(instr)
    assert [t.text for t in turns] == ["第一行", "多行\n第二行", "<image>问题"]
    assert turns[2].images == (0,)


def test_strict_error_lists_every_problem(tmp_path):
    root = make_mire(tmp_path / "d", [image_record(f"bad-{i}", label="无") for i in range(30)])
    with pytest.raises(MireValidationError) as e:
        load_split(root / "train.json")
    assert len(e.value.problems) == 30 and "and 10 more" in str(e.value)


def test_external_test_file(tmp_path):
    root = make_mire(tmp_path / "d", [image_record("a-1")])
    other = make_mire(tmp_path / "elsewhere", [image_record("z-1")])
    data = load_mire(root, test_files=[other / "train.json"])
    assert [r.id for r in data.tests["train"]] == ["z-1"]


@pytest.mark.realdata
def test_real_mire_counts(real_mire):
    data = load_mire(real_mire)
    train, test1 = data.train, data.tests["test1"]
    assert len(train) == 692 and len(test1) == 154
    assert sum(r.task == "image" for r in train) == 488
    assert sum(r.task == "intent" for r in train) == 204
    assert all(r.label in ALL_LABELS for r in train + test1)
    assert sum(1 for r in train if r.task == "intent" and not r.images) == 1
    used = {r.label for r in train + test1}
    assert {"消费者与客服聊天页面", "个人信息页面"}.isdisjoint(used)
    assert all(r.instruction.count("<image>") == len(r.images) for r in train + test1)


def test_write_image_helper_roundtrip(tmp_path):
    assert Image.open(write_image(tmp_path / "x.png")).size == (64, 96)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "symlinked_dir"])
def test_image_outside_images_dir_is_rejected(tmp_path, how):
    # A valid image outside images/ must not be read: the error names file, record and target.
    outside = write_image(tmp_path / "secret" / "outside.jpg")
    rec = image_record("bad-1")
    root = make_mire(tmp_path / "d", [image_record("good-1")])
    if how == "dotdot":
        rec["image"] = ["../../secret/outside.jpg"]
    elif how == "absolute":
        rec["image"] = [str(outside)]
    elif how == "symlink":
        (root / "images" / "link.jpg").symlink_to(outside)
        rec["image"] = ["link.jpg"]
    else:
        (root / "images" / "sub").symlink_to(outside.parent, target_is_directory=True)
        rec["image"] = ["sub/outside.jpg"]
    (root / "train.json").write_text(json.dumps([image_record("good-1"), rec]), encoding="utf-8")
    with pytest.raises(MireValidationError) as e:
        load_split(root / "train.json")
    msg = str(e.value)
    assert "train.json" in msg and "bad-1" in msg and "image_outside_data" in msg
    assert str(outside.resolve()) in msg
    kinds, report = _problem_kinds(root)
    assert kinds == ["image_outside_data"] and report.n_kept == 1


def test_symlink_inside_images_dir_is_fine(tmp_path):
    root = make_mire(tmp_path / "d", [image_record("good-1")])
    (root / "images" / "alias.jpg").symlink_to(root / "images" / "good-1-0.jpg")
    rec = image_record("ok-2")
    rec["image"] = ["alias.jpg"]
    (root / "train.json").write_text(json.dumps([image_record("good-1"), rec]), encoding="utf-8")
    assert len(load_split(root / "train.json")[0]) == 2


def test_missing_images_folder_is_named(tmp_path):
    root = make_mire(tmp_path / "d", [image_record("good-1")])
    shutil.rmtree(root / "images")
    with pytest.raises(MireError, match=r"images folder .*d/images does not exist"):
        load_split(root / "train.json")
    with pytest.raises(MireError, match="images folder"):
        load_mire(root)


def test_leakage_is_reported(tmp_path):
    train = [image_record("a-1"), image_record("b-1")]
    clean = make_mire(tmp_path / "clean", train, {"test1": [image_record("c-1")]})
    for k, name in enumerate(["a-1", "b-1", "c-1"]):  # make_mire draws identical images
        write_image(clean / "images" / f"{name}-0.jpg", color=(k, 50, 50))
    data = load_mire(clean)
    assert data.leaks == [] and "test1 vs train: 0 record id(s) and 0" in data.leakage_summary()
    root = make_mire(tmp_path / "d", train, {"test1": [image_record("a-1"), image_record("c-1"),
                                                       image_record("d-1")]})
    for k, name in enumerate(["a-1", "b-1", "d-1"]):
        write_image(root / "images" / f"{name}-0.jpg", color=(k, 50, 50))
    shutil.copy(root / "images" / "b-1-0.jpg", root / "images" / "c-1-0.jpg")  # same bytes, new name
    with pytest.warns(UserWarning, match="leakage"):
        data = load_mire(root)
    assert [(p.record_id, p.kind) for p in data.leaks] == [("a-1", "id_in_train"), ("a-1", "image_in_train"),
                                                          ("c-1", "image_in_train")]
    assert "b-1-0.jpg" in data.leaks[2].message and "b-1" in data.leaks[2].message
    assert "test1 vs train: 1 record id(s) and 2 record(s)" in data.leakage_summary()


@pytest.mark.parametrize("name", ["a\x00.jpg", "a" * 5000 + ".jpg", "loop.jpg"])
def test_unusable_image_names_are_problems_not_crashes(tmp_path, name):
    root = make_mire(tmp_path / "d", [image_record("good-1")])
    (root / "images" / "loop.jpg").symlink_to("loop.jpg")
    rec = image_record("bad-1")
    rec["image"] = [name]
    (root / "train.json").write_text(json.dumps([image_record("good-1"), rec]), encoding="utf-8")
    kinds, report = _problem_kinds(root)
    assert kinds == ["bad_image_name"] and report.problems[0].record_id == "bad-1"


def test_unlabelled_train_record_is_a_problem(tmp_path):
    # An empty output is an unlabelled *test* record; in train it is a missing label.
    root = make_mire(tmp_path / "d", [image_record("good-1"), image_record("bad-1", label="")],
                     {"test1": [image_record("t-1", label="")]})
    with pytest.raises(MireValidationError, match=r"train.json: record 'bad-1' \[missing_label\]"):
        load_mire(root)
    data = load_mire(root, strict=False)
    assert [r.id for r in data.train] == ["good-1"] and data.tests["test1"][0].label is None
