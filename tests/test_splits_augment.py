"""Splits, augmentation and the datasets conversion."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from conftest import image_record, intent_record, make_mire
from PIL import Image

from kdsl_utils.data.augment import augment_training_set, dialogue_dropout, resize_copies
from kdsl_utils.data.hf import to_hf_dataset
from kdsl_utils.data.labels import IMAGE_LABELS, INTENT_LABELS
from kdsl_utils.data.mire import load_split, parse_dialogue
from kdsl_utils.data.splits import stratified_indices, stratified_split


def _records(tmp_path, per_label=5):
    raw = [image_record(f"img{i}-{j}", label=lab) for i, lab in enumerate(IMAGE_LABELS[:6])
           for j in range(per_label)]
    raw += [intent_record(f"{i:02d}{j:028x}", label=lab) for i, lab in enumerate(INTENT_LABELS[:4])
            for j in range(per_label)]
    raw.append(image_record("single-0", label=IMAGE_LABELS[10]))  # a label with one example
    root = make_mire(tmp_path / "d", raw)
    return load_split(root / "train.json")[0]


def test_stratified_split(tmp_path):
    recs = _records(tmp_path)
    rest, held = stratified_split(recs, 0.2, seed=1)
    assert {r.id for r in rest}.isdisjoint(r.id for r in held) and len(rest) + len(held) == len(recs)
    per_label = collections.Counter(r.label for r in held)
    assert set(per_label.values()) == {1} and IMAGE_LABELS[10] not in per_label
    assert [r.id for r in stratified_split(recs, 0.2, seed=1)[1]] == [r.id for r in held]
    assert [r.id for r in stratified_split(recs, 0.2, seed=2)[1]] != [r.id for r in held]


def test_stratified_indices_is_order_free_and_keeps_rare_labels():
    labels = [0] * 10 + [1] * 4 + [2]
    rest, held = stratified_indices(labels, 0.3, seed=0)
    assert held.dtype == np.int64 and np.all(np.diff(held) > 0)
    assert len(np.intersect1d(rest, held)) == 0 and len(rest) + len(held) == len(labels)
    assert collections.Counter(labels[i] for i in held) == {0: 3, 1: 1}  # label 2: one record, kept
    # Keyed, the split follows the keys, not the positions: reversing the input reverses it.
    keys = [f"k{i:02d}" for i in range(len(labels))]
    _, h1 = stratified_indices(labels, 0.3, seed=0, keys=keys)
    _, h2 = stratified_indices(labels[::-1], 0.3, seed=0, keys=keys[::-1])
    assert sorted(keys[i] for i in h1) == sorted(keys[::-1][i] for i in h2)
    with pytest.raises(ValueError, match="fraction"):
        stratified_indices(labels, 1.0, seed=0)


def test_stratified_indices_carry_holds_out_from_one_record_labels():
    labels = list(range(8))  # eight labels, one record each
    assert len(stratified_indices(labels, 0.25, seed=0)[1]) == 0  # min_keep=1 keeps them all
    rest, held = stratified_indices(labels, 0.25, seed=0, min_keep=0, carry=True)
    assert len(held) == 2 and len(rest) == 6  # floor(0.25 + carry) over the labels


def test_resize_copies(tmp_path):
    recs = _records(tmp_path)[:3]
    aug = resize_copies(recs, tmp_path / "aug", copies=2, scale=(0.5, 0.5), seed=0)
    assert len(aug) == 6 and aug[0].id == recs[0].id + "#aug0"
    assert Image.open(aug[0].images[0]).size == (32, 48)
    assert recs[0].images[0].exists() and aug[0].label == recs[0].label


def test_dialogue_dropout_drops_agent_turns_only(tmp_path):
    recs = [r for r in _records(tmp_path) if r.task == "intent"]
    aug = dialogue_dropout(recs, p_agent=1.0, p_user=0.0, seed=0)
    assert len(aug) == len(recs) and aug[0].id == recs[0].id + "#dlg0"
    for a, r in zip(aug, recs):
        assert all(t.role == "用户" for t in a.turns)
        assert a.user_text == r.user_text and a.candidates == r.candidates and a.label == r.label
        assert parse_dialogue(a.instruction) == a.turns  # the rebuilt prompt parses back
        assert a.instruction.count("<image>") == len(a.images)
    assert dialogue_dropout(recs, p_agent=0.0, p_user=0.0, seed=0) == []  # no identical copies


def test_dialogue_dropout_keeps_last_customer_turn_and_images(tmp_path):
    recs = [r for r in _records(tmp_path) if r.task == "intent"]
    aug = dialogue_dropout(recs, p_agent=0.0, p_user=1.0, seed=0)
    assert aug, "the synthetic dialogues have earlier customer turns to drop"
    by_id = {r.id: r for r in recs}
    for a in aug:
        r = by_id[a.id.split("#")[0]]
        assert a.last_user_turn == r.last_user_turn
        kept_users = [t for t in a.turns if t.role == "用户"]
        assert all(t.images for t in kept_users[:-1])  # earlier customer turns survive only with images
        assert sum(len(t.images) for t in a.turns) == sum(len(t.images) for t in r.turns)
    again = dialogue_dropout(recs, p_agent=0.3, p_user=0.3, seed=0)
    assert again == dialogue_dropout(recs, p_agent=0.3, p_user=0.3, seed=0)  # deterministic


def test_augment_training_set(tmp_path):
    from kdsl_utils.config import AugmentCfg

    recs = _records(tmp_path)
    acfg = AugmentCfg(image_copies=1, scale=(0.5, 0.5), dialogue_copies=1, p_agent=1.0, p_user=0.0)
    out = augment_training_set(recs, acfg, seed=0, image_dir=tmp_path / "aug")
    assert out[:len(recs)] == recs
    copies = out[len(recs):]
    n_img = sum(r.task == "image" for r in recs)
    assert sum(c.id.endswith("#aug0") for c in copies) == n_img
    assert {c.task for c in copies if "#dlg" in c.id} == {"intent"}
    none = AugmentCfg(image_copies=0, dialogue_copies=0)
    assert augment_training_set(recs, none, seed=0, image_dir=tmp_path / "x") == recs
    # a resize copy made with another seed is never reused
    a = resize_copies(recs[:1], tmp_path / "r", scale=(0.5, 1.5), seed=0)
    b = resize_copies(recs[:1], tmp_path / "r", scale=(0.5, 1.5), seed=1)
    assert a[0].images[0] != b[0].images[0]


def test_hf_dataset(tmp_path):
    recs = _records(tmp_path)[:4]
    ds = to_hf_dataset(recs)
    assert ds.num_rows == 4 and ds[0]["images"] == [str(recs[0].images[0])]
    ds_img = to_hf_dataset(recs, decode_images=True)
    assert ds_img[0]["images"][0].size == (64, 96)


def test_stratified_folds_spread_each_label_and_balance_sizes():
    from kdsl_utils.data.splits import stratified_folds

    labels = ["a"] * 7 + ["b"] * 5 + ["c"] * 2
    f = stratified_folds(labels, 3, seed=4)
    assert f.shape == (14,) and set(f) == {0, 1, 2}
    sizes = np.bincount(f)
    assert sizes.max() - sizes.min() <= 1
    for lab in "abc":
        per = np.bincount(f[np.array(labels) == lab], minlength=3)
        assert per.max() - per.min() <= 1, lab  # a label's items spread over the folds
    assert (f == stratified_folds(labels, 3, seed=4)).all()
    assert not all((stratified_folds(labels, 3, seed=s) == f).all() for s in range(5, 9))
