"""The mini backend: feature cache, shared MLP, persistence, determinism (small inputs).

Images are drawn with Pillow (Chinese text in the project's CJK font) so that the real
extractors (RapidOCR, EfficientNet-Lite0, multilingual-e5-small) run, on a few tiny inputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from kdsl_utils.config import resolve
from kdsl_utils.data.labels import ALL_LABELS, LABELS
from kdsl_utils.data.records import AGENT, USER, Record, Turn
from kdsl_utils.features import (EXTRACTION_LOG, E5Embedder, EfficientNetEmbedder, FeatureCache,
                                 OcrParams, RapidOcr, embed_images, embed_texts, ocr_images,
                                 ocr_text)
from kdsl_utils.models.mini import (SHARED_PREFIXES, MiniBackend, candidate_mask,
                                    clean_dialog, shared_parameter_delta, split_by_input_block)

SCENES = {"退款页面": "退款详情 退款金额", "订单详情页面": "订单详情 收货地址",
          "物流页面-物流跟踪页面": "物流跟踪 已签收"}
INTENTS = {"商品材质": "这个是什么材质的呀", "用法用量": "这个怎么用，一次用多少",
           "发货数量": "一共发几个，数量对吗"}


def _draw(path: Path, text: str, color=(255, 255, 255)) -> Path:
    from kdsl_utils.fonts import cjk_font

    im = Image.new("RGB", (240, 96), color)
    ImageDraw.Draw(im).text((10, 30), text, fill=(0, 0, 0), font=cjk_font(20))
    im.save(path)
    return path


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[Record]:
    d = tmp_path_factory.mktemp("mini_imgs")
    recs = []
    for i in range(9):
        lab = list(SCENES)[i % 3]
        p = _draw(d / f"s{i}.png", f"{SCENES[lab]} {i}", (255, 255 - 20 * (i % 3), 255))
        recs.append(Record(id=f"img{i}", task="image", instruction="", label=lab, images=(p,),
                           candidates=LABELS["image"]))
    for i in range(9):
        lab = list(INTENTS)[i % 3]
        imgs = (recs[i].images[0],) if i % 2 == 0 else ()  # some dialogues without images
        turns = ((Turn(USER, "<image>", (0,)),) if imgs else ()) + (
            Turn(AGENT, "您好，请问有什么可以帮您"), Turn(USER, INTENTS[lab]))
        recs.append(Record(id=f"int{i}", task="intent", instruction="", label=lab, images=imgs,
                           candidates=LABELS["intent"], turns=turns))
    return recs


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature_cache")


def _cfg(**kw):
    return resolve("mini", **{"mini__epochs": 15, "mini__hidden": 32, "mini__workers": 1, **kw})


# ----------------------------------------------------------------------------- features


class CountingOcr(RapidOcr):
    calls = 0

    def __call__(self, data):
        CountingOcr.calls += 1
        return super().__call__(data)


class CountingEffnet(EfficientNetEmbedder):
    calls = 0

    def batch(self, items):
        CountingEffnet.calls += len(items)
        return super().batch(items)


class CountingE5(E5Embedder):
    calls = 0

    def batch(self, items):
        CountingE5.calls += len(items)
        return super().batch(items)


def test_ocr_cache_hit_on_second_call(tmp_path, records):
    paths = [r.images[0] for r in records[:3]]
    paths.append(paths[0])  # a duplicate is computed once
    cache = FeatureCache(tmp_path)
    CountingOcr.calls = 0
    EXTRACTION_LOG.clear()
    first = ocr_images(paths, cache, workers=1, extractor=CountingOcr(), progress=False)
    assert CountingOcr.calls == 3
    assert EXTRACTION_LOG["ocr"]["computed"] == 3 and EXTRACTION_LOG["ocr"]["cached"] == 0
    assert EXTRACTION_LOG["ocr"]["seconds"] > 0
    assert "退款" in ocr_text(first[paths[0]])  # the real OCR reads the drawn text
    again = ocr_images(paths, FeatureCache(tmp_path), workers=1, extractor=CountingOcr(),
                       progress=False)
    assert CountingOcr.calls == 3 and again == first
    assert EXTRACTION_LOG["ocr"]["computed"] == 3 and EXTRACTION_LOG["ocr"]["cached"] == 3
    # other parameters, other cache namespace
    other = CountingOcr(OcrParams(limit_side_len=640))
    assert other.namespace != CountingOcr().namespace
    ocr_images(paths[:1], cache, workers=1, extractor=other, progress=False)
    assert CountingOcr.calls == 4


def test_embedding_cache_hit_and_content_key(tmp_path, records):
    paths = [r.images[0] for r in records[:3]]
    cache = FeatureCache(tmp_path)
    CountingEffnet.calls = 0
    a = embed_images(paths, cache, extractor=CountingEffnet(), progress=False)
    assert a.shape == (3, 1280) and CountingEffnet.calls == 3
    copy = tmp_path / "copy.png"  # same bytes under another name: a cache hit
    copy.write_bytes(paths[1].read_bytes())
    b = embed_images([copy, *paths], cache, extractor=CountingEffnet(), progress=False)
    assert CountingEffnet.calls == 3
    np.testing.assert_array_equal(b[0], a[1])
    CountingE5.calls = 0
    t = embed_texts(["什么材质", "怎么用", "什么材质"], cache, extractor=CountingE5(),
                    progress=False)
    assert t.shape == (3, 384) and CountingE5.calls == 2
    np.testing.assert_array_equal(t[0], t[2])
    embed_texts(["怎么用"], cache, extractor=CountingE5(), progress=False)
    assert CountingE5.calls == 2


def test_corrupt_cache_entry_is_recomputed(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.put("ns", "ab" * 32, "json", {"x": 1})
    assert cache.get("ns", "ab" * 32, "json") == {"x": 1}
    (tmp_path / "ns" / "ab" / f"{'ab' * 32}.json").write_text("{torn")
    assert cache.get("ns", "ab" * 32, "json") is None
    assert not list((tmp_path / "ns").rglob(".tmp-*"))  # no temp files left behind


def test_clean_dialog():
    assert clean_dialog('<image>\n{"url":"<http>","size":1}\n看<http>') == "▣\n▶\n看◎"


# ---------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def fitted(records, cache_dir):
    b = MiniBackend(_cfg(), cache_dir, progress=False)
    info = b.fit(records, mix="joint", seed=0)
    return b, info


def test_fit_predict_shapes_and_candidate_masking(fitted, records):
    b, info = fitted
    assert len(info.losses) == 15 and info.losses[-1] < info.losses[0]
    assert info.extra["n_by_task"] == {"image": 9, "intent": 9} and info.wall_s > 0
    pred = b.predict_proba(records)
    assert pred.proba.shape == (len(records), len(ALL_LABELS))
    assert pred.ids == [r.id for r in records] and pred.gold == [r.label for r in records]
    np.testing.assert_allclose(pred.proba.sum(axis=1), 1.0, atol=1e-9)
    mask = candidate_mask(records)
    assert np.all(pred.proba[~mask] == 0.0)
    assert all(p in r.candidates for p, r in zip(pred.pred, records))
    acc = np.mean([p == r.label for p, r in zip(pred.pred, records)])
    assert acc > 0.8  # separable toy data: the training set is learnt


def test_save_load_roundtrip(fitted, records, cache_dir, tmp_path):
    b, _ = fitted
    b.save(tmp_path / "m")
    b2 = MiniBackend.load(tmp_path / "m", _cfg(), cache_dir, progress=False)
    np.testing.assert_array_equal(b2.predict_proba(records).proba, b.predict_proba(records).proba)
    for k, v in b.shared_parameters(initial=True).items():
        np.testing.assert_array_equal(b2.shared_parameters(initial=True)[k], v)
    with pytest.raises(ValueError, match="MiniCfg"):
        MiniBackend.load(tmp_path / "m", _cfg(mini__dropout=0.5), cache_dir)


def test_deterministic_for_a_seed(fitted, records, cache_dir, tmp_path):
    b, info = fitted
    b2 = MiniBackend(_cfg(), cache_dir, progress=False)
    info2 = b2.fit(records, mix="joint", seed=0, out_dir=tmp_path / "run")
    assert info2.losses == info.losses
    np.testing.assert_array_equal(b2.predict_proba(records).proba, b.predict_proba(records).proba)
    assert (tmp_path / "run" / "train_log.json").is_file()
    assert (tmp_path / "run" / "model" / "model.pt").is_file()
    b3 = MiniBackend(_cfg(), cache_dir, progress=False)
    assert b3.fit(records, mix="joint", seed=1).losses != info.losses


def test_task_mixes_share_init_and_trunk_updates(records, cache_dir):
    from kdsl_utils.interference import interference_table

    deltas, inits = {}, {}
    for mix in ("image", "intent", "joint"):
        b = MiniBackend(_cfg(), cache_dir, progress=False)
        info = b.fit(records, mix=mix, seed=3)
        assert info.n_train == (18 if mix == "joint" else 9)
        p = b.predict_proba(records)  # any mix still predicts both tasks within candidates
        assert np.all(p.proba[~candidate_mask(records)] == 0.0)
        deltas[mix] = shared_parameter_delta(b)
        inits[mix] = b.shared_parameters(initial=True)
    assert set(deltas["joint"]) and all(k.startswith(SHARED_PREFIXES) for k in deltas["joint"])
    for k in inits["joint"]:  # same seed, same featurizer input space => same start
        np.testing.assert_array_equal(inits["image"][k], inits["joint"][k])
    table = interference_table(deltas["image"], deltas["intent"], deltas["joint"])
    assert list(table["layer"])[-1] == "ALL"
    assert np.isfinite(table["cos_img_int"]).all() and (table["norm_joint"] > 0).all()


def test_step_budget_is_taken_exactly(records, cache_dir):
    """``steps`` trains exactly that many optimizer steps, across epoch boundaries (the last
    epoch cut), whatever the mix's size; FitLog.steps is the count taken."""
    cfg = _cfg(mini__batch_size=4)  # joint: 18 records = 5 batches per epoch, image: 3
    for mix, steps, epochs in (("joint", 7, 7 / 5), ("image", 7, 7 / 3), ("intent", 1, 1 / 3)):
        log = MiniBackend(cfg, cache_dir, progress=False).fit(records, mix=mix, seed=0, steps=steps)
        assert log.steps == steps, (mix, log.steps)
        assert log.extra["epochs"] == pytest.approx(epochs)
        assert len(log.losses) == -(-steps // (5 if mix == "joint" else 3))  # per (partial) epoch
    log = MiniBackend(cfg, cache_dir, progress=False).fit(records, mix="image", seed=0)
    assert log.steps == 15 * 3 and log.extra["epochs"] == 15  # the epochs schedule: 15 x 3
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps"):
            MiniBackend(cfg, cache_dir, progress=False).fit(records, mix="image", seed=0, steps=bad)


def test_epoch_run_equals_step_run_of_its_length(fitted, records, cache_dir):
    """A step budget equal to the epochs schedule's count is the same run, bit for bit (what
    lets the seesaw list the joint run under both schedules without refitting it)."""
    b, info = fitted
    b2 = MiniBackend(_cfg(), cache_dir, progress=False)
    info2 = b2.fit(records, mix="joint", seed=0, steps=info.steps)
    assert info2.steps == info.steps == 15 and info2.losses == info.losses
    for k, v in b.shared_parameters().items():
        np.testing.assert_array_equal(b2.shared_parameters()[k], v)


def test_input_blocks_are_task_disjoint_where_measured(records, cache_dir):
    """The trunk's update split by input block: OCR / image blocks are reached by image
    records only, dialogue blocks by intent records only (measured on the joint run), and
    the other task's run changes such a block by weight decay alone (AdamW: no gradient
    there, ever), so the blocks' cross-task interference is zero by construction."""
    from kdsl_utils.interference import group_row, interference_table

    cfg = _cfg()
    runs = {}
    for mix in ("image", "intent", "joint"):
        b = MiniBackend(cfg, cache_dir, progress=False)
        log = b.fit(records, mix=mix, seed=1)
        runs[mix] = {"split": b.update_delta(), "whole": shared_parameter_delta(b),
                     "inputs": b.update_inputs(), "steps": log.steps, "b": b}
    inputs = runs["joint"]["inputs"]
    assert {k: v for k, v in inputs.items() if "[" in k} == {
        "sparse.weight[ocr]": ("image",), "sparse.weight[dialog]": ("intent",),
        "sparse.weight[last]": ("intent",), "dense.weight[image]": ("image",),
        "dense.weight[layout]": ("image",), "dense.weight[e5_dialog]": ("intent",)}
    assert inputs["mid.weight"] == ("image", "intent")
    assert runs["image"]["inputs"]["mid.weight"] == ("image",)  # a one-task fit sees one task
    # the blocks tile their layers: the split update is the unsplit one, in views
    intent = runs["intent"]
    assert split_by_input_block(intent["whole"], intent["b"].featurizer).keys() == intent["split"].keys()
    sparse_cols, _ = intent["b"].featurizer.block_slices()
    np.testing.assert_array_equal(np.concatenate([intent["split"][f"sparse.weight[{k}]"]
                                                  for k in sparse_cols]), intent["whole"]["sparse.weight"])
    # the intent-only run's update of an image-only block: pure decoupled weight decay
    m = cfg.mini
    decay = 1.0 - (1.0 - m.learning_rate * m.weight_decay) ** intent["steps"]
    w0 = intent["b"].shared_parameters(initial=True)["sparse.weight"][sparse_cols["ocr"]]
    # exact up to float32 rounding: at most two roundings (of one ulp of the weight) per step
    err = np.abs(intent["split"]["sparse.weight[ocr]"] + decay * w0)
    assert np.all(err <= 2 * intent["steps"] * np.spacing(np.abs(w0))), err.max()
    assert np.abs(runs["image"]["split"]["sparse.weight[ocr]"]).max() > 1e3 * decay  # learned
    table = interference_table(*(runs[k]["split"] for k in ("image", "intent", "joint")), inputs=inputs)
    rows = table.set_index("layer")
    assert list(table.layer)[-4:] == [group_row("image only"), group_row("intent only"),
                                      group_row("both tasks"), "ALL"]
    assert set(table.inputs) == {"image only", "intent only", "both tasks", "all"}
    for g, other, own in (("image only", "norm_int", "norm_img"), ("intent only", "norm_img", "norm_int")):
        r = rows.loc[group_row(g)]
        assert r[other] < 1e-3 * r[own], (g, r[other], r[own])  # the other task: decay only
    # splitting changes no total: the ALL row equals the unsplit table's
    whole = interference_table(*(runs[k]["whole"] for k in ("image", "intent", "joint")))
    cols = ["cos_img_int", "r2_both", "norm_joint"]
    np.testing.assert_allclose(rows.loc["ALL", cols].astype(float),
                               whole.set_index("layer").loc["ALL", cols].astype(float), rtol=1e-9)


def test_seesaw_step_matched_control(records, cache_dir, tmp_path):
    """run_seesaw on mini: under ``steps`` every mix takes the joint run's step count (the
    single-task runs refit, the joint run listed under both), rows tagged by schedule, the
    metrics' variants named by schedule, the interference analysed per schedule by block."""
    from kdsl_utils import report, seesaw, seesaw_files

    cfg = _cfg(mini__batch_size=4)  # image / intent: 3 batches per epoch, joint: 5
    tests = {"test1": records}
    run = seesaw.run_seesaw(cfg, records, tests, seeds=[0],
                            backend_kwargs={"cache_dir": cache_dir, "progress": False})
    f = run.fits.set_index(["schedule", "variant"])
    assert f.steps["epochs"].to_dict() == {"image": 45, "intent": 45, "joint": 75}
    assert run.budgets == {0: 75} and f.steps["steps"].to_dict() == {"image": 75, "intent": 75, "joint": 75}
    assert f.reused["steps"].to_dict() == {"image": False, "intent": False, "joint": True}
    assert f.epochs["steps"].to_dict() == {"image": 25.0, "intent": 25.0, "joint": 15.0}
    p = run.predictions
    assert p.groupby(["schedule", "variant"]).size().to_dict() == {
        (s, v): 18 if v in ("joint", "single_pair") else 9
        for s in ("epochs", "steps") for v in ("image", "intent", "joint", "single_pair")}
    metrics = seesaw.metrics_from_predictions(p, "01_seesaw")
    assert {"joint", "joint[steps]", "single_pair[steps]", "image[steps]"} <= set(metrics.variant)
    assert set(run.interference.schedule) == {"epochs", "steps"}
    assert (run.interference.layer == "ALL[inputs: image only]").sum() == 2
    paths = seesaw.save_run(run, tmp_path)
    fits = pd.read_csv(paths["fits"])
    gain = report.seesaw_gain(metrics, fits)
    assert len(gain) == 2 * 2 and gain.schedule.str.startswith(("epoch-matched", "step-matched")).all()
    assert "step-matched (steps: image 75, intent 75, joint 75; epochs: image 25.0" in gain.schedule.iloc[-1]
    assert seesaw_files.FITS_FILE == paths["fits"].name


def test_seesaw_fits_side_by_side_equal_one_after_another(records, cache_dir):
    """Profile.fit_workers > 1 runs the fits in worker processes: predictions, fits and
    interference are those of the same fits run here one after another."""
    from kdsl_utils import seesaw

    def run(workers):
        cfg = _cfg(mini__batch_size=8, mini__workers=workers)
        return seesaw.run_seesaw(cfg, records, {"test1": records}, seeds=[0, 1],
                                 backend_kwargs={"cache_dir": cache_dir, "progress": False})

    one, two = run(1), run(2)
    assert two.budgets == one.budgets and set(one.predictions.seed) == {0, 1}
    pd.testing.assert_frame_equal(one.predictions, two.predictions)
    cols = [c for c in one.fits.columns if not c.endswith("_seconds")]
    pd.testing.assert_frame_equal(one.fits[cols], two.fits[cols])
    pd.testing.assert_frame_equal(one.interference, two.interference)


def test_run_jobs_names_the_failing_job():
    from kdsl_utils.workers import JobError, run_jobs

    assert run_jobs(abs, [-3, 2, -1], workers=2, desc="abs") == [3, 2, 1]
    with pytest.raises(JobError, match=r"abs: 'x' failed: bad operand"):
        run_jobs(abs, [1, "x"], workers=2, desc="abs")
    with pytest.raises(JobError, match=r"abs: 'x' failed"):
        run_jobs(abs, ["x"], workers=1, desc="abs")


def test_submitted_batches_share_the_pool_and_are_read_in_any_order():
    from kdsl_utils.workers import JobError, submit_jobs

    first = submit_jobs(abs, [-1, -2, -3], workers=2, desc="first")
    second = submit_jobs(abs, [-4, "x", -6], workers=2, desc="second")
    with pytest.raises(JobError, match=r"second: 'x' failed"):
        second.results()
    assert first.results() == [1, 2, 3] and first.results() is first.results()
    here = submit_jobs(abs, [-7, "y"], workers=1, desc="here")  # in this process, when read
    with pytest.raises(JobError, match=r"here: 'y' failed"):
        here.results()


def test_components_can_be_switched_off(records, cache_dir):
    b = MiniBackend(_cfg(mini__ocr=False, mini__image_encoder=False, mini__text_encoder=False),
                    cache_dir, progress=False)
    b.fit(records, mix="intent", seed=0)
    assert b.featurizer.n_dense == 7  # layout numbers only (zeros without OCR) + n_images
    assert "ocr" not in b.featurizer.vec
    p = b.predict_proba([r for r in records if r.task == "intent"])
    assert p.proba.shape == (9, len(ALL_LABELS))


def test_dialogue_images_are_used_only_when_asked(records, cache_dir):
    from kdsl_utils.features import FeatureCache
    from kdsl_utils.models.mini import extract_inputs

    intents = [r for r in records if r.task == "intent" and r.images]
    off = extract_inputs(intents, _cfg().mini, FeatureCache(cache_dir), progress=False)
    on = extract_inputs(intents, _cfg(mini__intent_images=True).mini, FeatureCache(cache_dir),
                        progress=False)
    assert not any(off.ocr) and not off.image.any()
    assert all("退款" in t or "订单" in t or "物流" in t for t in on.ocr) and on.image.any()
    assert off.e5_dialog is not None and np.abs(off.e5_dialog).sum(axis=1).min() > 0


# ---------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_data_subset_learns_both_tasks(real_mire):
    """A stratified slice of the real train/test1: well above chance on both tasks.

    Uses the project's feature cache: seconds after the notebooks ran once, about 2-3 min
    of OCR on a cold cache.
    """
    from sklearn.metrics import f1_score

    from kdsl_utils.data.mire import load_mire

    data = load_mire(real_mire, test_files=["test1"], decode_images=False)
    rng = np.random.default_rng(0)
    train = [data.train[i] for i in sorted(rng.choice(len(data.train), 200, replace=False))]
    test = data.tests["test1"][:50]
    b = MiniBackend(resolve("mini", mini__workers=min(2, os.cpu_count() or 1)), progress=False)
    b.fit(train, mix="joint", seed=0)
    p = b.predict_proba(test)
    y = np.array([r.label for r in test])
    pred = np.array(p.pred)
    for task, floor in (("image", 0.4), ("intent", 0.1)):
        m = np.array([r.task == task for r in test])
        if m.sum() >= 5:
            assert f1_score(y[m], pred[m], average="weighted") > floor, task
