"""NoteLLM-2-style representations (kdsl_utils.representations) on hand-made inputs.

The frozen extractors are not run here (their cache and outputs are tested in test_mini);
the inputs are random vectors with a label signal in chosen blocks, so each test can say
which side of the recipe must carry it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from kdsl_utils import report
from kdsl_utils import contrastive as C
from kdsl_utils import record_encoder as E
from kdsl_utils import representations as R
from kdsl_utils.config import ConfigError, ReprCfg, resolve
from kdsl_utils.data.labels import IMAGE_LABELS, INTENT_LABELS, LABEL_INDEX, LABELS
from kdsl_utils.data.records import Record
from kdsl_utils.features import E5Embedder, FeatureCache
from kdsl_utils.models import mini as M
from kdsl_utils.metrics import metric_rows
from kdsl_utils.models.registry import make_backend
from kdsl_utils.rules.engine import RuleEngine, build_observables
from kdsl_utils.rules.propose import DataProposer
from kdsl_utils.rules.schema import Condition, RuleBase, RuleValidationError, make_rule

E5_DIM = E5Embedder.dim  # the text-side width of the CPU recipe's inputs

N_VIS = 1287


def rec(rid: str, task: str, label: str) -> Record:
    return Record(id=rid, task=task, instruction="", label=label, images=(),
                  candidates=LABELS[task])


def dataset(n_per_label: int = 8, n_labels: int = 4, signal: str = "word", seed: int = 0,
            noise: float = 1.0):
    """Records of 4 image labels and 4 intent labels, inputs with the label in ``signal``."""
    rng = np.random.default_rng(seed)
    labs = [("image", lab) for lab in IMAGE_LABELS[:n_labels]]
    labs += [("intent", lab) for lab in INTENT_LABELS[:n_labels]]
    centres = {lab: rng.normal(size=E5_DIM if signal != "visual" else N_VIS) * 3
               for _, lab in labs}
    recs, rows = [], []
    for task, lab in labs:
        for i in range(n_per_label):
            recs.append(rec(f"{lab}-{i}", task, lab))
            rows.append(centres[lab])
    n = len(recs)
    word, note, pooled = (rng.normal(size=(n, E5_DIM)).astype(np.float32) * noise
                          for _ in range(3))
    visual = rng.normal(size=(n, N_VIS)).astype(np.float32) * noise
    sig = np.asarray(rows, dtype=np.float32)
    {"word": word, "note": note, "pooled": pooled, "visual": visual}[signal] += sig
    if signal == "word":
        pooled += sig  # the pooled passage contains the image's text too
    x = E.ReprInputs([r.id for r in recs], word, note, pooled, visual)
    return recs, x


RC = ReprCfg(epochs=15, dim=32, batch_size=16, learning_rate=3e-3)


def test_config_section():
    cfg = resolve("mini", repr__epochs=3)
    assert cfg.repr.epochs == 3 and cfg.repr.encoder == "features"
    assert resolve("tiny").repr.epochs < resolve("mini").repr.epochs
    with pytest.raises(ConfigError):
        resolve("mini", repr__epoch=3)


def test_gate_is_bias_free_xavier_and_convex():
    torch.manual_seed(0)
    g = C.Gate(16)
    assert g.w.bias is None and g.w.weight.shape == (16, 32)
    bound = np.sqrt(6 / (16 + 32))  # Xavier-uniform bound for fan_in 32, fan_out 16
    assert g.w.weight.abs().max() <= bound and g.w.weight.abs().max() > 0.5 * bound
    h, v = torch.randn(5, 16), torch.randn(5, 16)
    e = g(h, v)
    lo, hi = torch.minimum(h, v), torch.maximum(h, v)
    assert ((e >= lo - 1e-6) & (e <= hi + 1e-6)).all()  # z in (0, 1): e between h and v


def test_contrastive_loss_rewards_clusters_and_skips_lonely_anchors():
    labels = torch.tensor([0, 0, 1, 1, 2])  # label 2 has no positive: skipped
    scale = torch.tensor(np.log(1 / 0.1), requires_grad=True)
    clustered = torch.nn.functional.normalize(torch.tensor(
        [[1, 0, 0], [1, 0.1, 0], [0, 1, 0], [0.1, 1, 0], [0, 0, 1.0]]), dim=1)
    mixed = clustered[[0, 2, 1, 3, 4]]
    good = C.contrastive_loss(clustered, labels, scale)
    bad = C.contrastive_loss(mixed, labels, scale)
    assert good < bad
    good.backward()
    assert scale.grad is not None and scale.grad != 0  # the temperature is learnable
    assert C.contrastive_loss(clustered, torch.tensor([0, 1, 2, 3, 4]), scale) == 0


@pytest.mark.parametrize("name", list(R.VARIANTS))
def test_every_variant_reads_what_it_should(name):
    recs, x = dataset(n_per_label=2)
    rep = E.train(recs, x, name, ReprCfg(epochs=1, dim=8, batch_size=8), seed=0)
    e = rep.embed(x)
    assert e.shape == (len(recs), 8)
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    v = R.VARIANTS[name]
    other_text = E.ReprInputs(x.ids, x.word[::-1].copy(), x.note[::-1].copy(),
                              x.pooled[::-1].copy(), x.visual)
    other_vis = E.ReprInputs(x.ids, x.word, x.note, x.pooled, x.visual[::-1].copy())
    assert np.allclose(rep.embed(other_text), e) == (not v.text)
    assert np.allclose(rep.embed(other_vis), e) == (not v.visual)
    # pooled is read only without mICL, word/note only with it
    other_pooled = E.ReprInputs(x.ids, x.word, x.note, x.pooled[::-1].copy(), x.visual)
    assert np.allclose(rep.embed(other_pooled), e) == (v.micl or not v.text)


def test_training_clusters_labels_and_knn_recovers_them():
    recs, x = dataset(signal="word", seed=1, noise=2.0)
    test_recs, xt = dataset(signal="word", seed=1, noise=2.0)  # same centres, fresh noise below
    rng = np.random.default_rng(7)
    xt = E.ReprInputs([f"t{i}" for i in xt.ids], xt.word + rng.normal(size=xt.word.shape).astype(
        np.float32), xt.note, xt.pooled, rng.normal(size=xt.visual.shape).astype(np.float32))
    test_recs = [rec(f"t{r.id}", r.task, r.label) for r in test_recs]
    rep = E.train(recs, x, "full", RC, seed=0)
    assert rep.losses[-1] < rep.losses[0] - 0.5  # the multi-positive loss has a floor > 0
    sim = R._similarities(rep.embed(xt), test_recs, rep.embed(x), recs)
    hits = R.recall_at_k(sim, test_recs, recs, (1, 5))
    assert hits[1].mean() > 0.9 and hits[5].mean() >= hits[1].mean()
    proba = R.knn_proba(sim, recs, test_recs, 5, rep.temperature)
    pred = proba.argmax(axis=1)
    gold = np.array([LABEL_INDEX[r.label] for r in test_recs])
    assert (pred == gold).mean() > 0.9
    # the image-only variant cannot see a signal that lives in the OCR text's embedding
    rep_img = E.train(recs, x, "image_only", RC, seed=0)
    sim_img = R._similarities(rep_img.embed(xt), test_recs, rep_img.embed(x), recs)
    assert R.recall_at_k(sim_img, test_recs, recs, (1,))[1].mean() < 0.6


def test_knn_proba_respects_tasks_candidates_and_k():
    g = [rec("a", "image", IMAGE_LABELS[0]), rec("b", "image", IMAGE_LABELS[1]),
         rec("c", "intent", INTENT_LABELS[0])]
    q = [rec("q", "image", IMAGE_LABELS[1]), rec("r", "intent", INTENT_LABELS[3])]
    emb_g = np.eye(3, dtype=np.float32)
    emb_q = np.array([[0.9, 0.1, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    sim = R._similarities(emb_q, q, emb_g, g)
    assert np.isinf(sim[0, 2]) and np.isinf(sim[1, :2]).all()  # other task: never a neighbour
    p1 = R.knn_proba(sim, g, q, 1, 0.1)
    assert np.allclose(p1.sum(axis=1), 1)
    assert p1[0].argmax() == LABEL_INDEX[IMAGE_LABELS[0]]
    assert p1[1].argmax() == LABEL_INDEX[INTENT_LABELS[0]]  # the only intent neighbour
    assert p1[0, LABEL_INDEX[INTENT_LABELS[0]]] == 0  # outside the candidates
    hits = R.recall_at_k(sim, q, g, (1, 2))
    assert hits[1].tolist() == [0.0, 0.0] and hits[2].tolist() == [1.0, 0.0]


def test_leave_one_out_excludes_self_and_augmented_copies():
    g = [rec("a", "image", IMAGE_LABELS[0]), rec("a#dlg0", "image", IMAGE_LABELS[0]),
         rec("b", "image", IMAGE_LABELS[1])]
    sim = R._similarities(np.eye(3, dtype=np.float32), g, np.eye(3, dtype=np.float32), g)
    assert np.isinf(sim[0, :2]).all() and np.isinf(sim[1, :2]).all() and np.isinf(sim[2, 2])


def test_nearest_labels_and_choose_k():
    recs, x = dataset(signal="visual", seed=2, noise=0.5)
    rep = E.train(recs, x, "image_only", RC, seed=0)
    near = R.nearest_labels(rep, recs, x, recs, x)  # leave-one-out on the training set
    assert np.mean([n == r.label for n, r in zip(near, recs)]) > 0.9
    sim = R._similarities(rep.embed(x), recs, rep.embed(x), recs)
    k, scores = R.choose_k(sim, recs, recs, (1, 3, 31), rep.temperature)
    assert set(scores) == {1, 3, 31} and scores[k] == max(scores.values())


def test_partners_prefer_copies_and_stay_in_label():
    recs = [rec("a", "intent", INTENT_LABELS[0]), rec("a#dlg0", "intent", INTENT_LABELS[0]),
            rec("b", "intent", INTENT_LABELS[0]), rec("c", "intent", INTENT_LABELS[1])]
    rng = np.random.default_rng(0)
    draws = np.stack([C.partners(recs, rng) for _ in range(200)])
    assert (draws[:, 3] == 3).all()  # alone in its label, no copy: itself (skipped by the loss)
    assert set(draws[:, 0]) == {1, 2} and (draws[:, 0] == 1).mean() > 0.4
    assert set(draws[:, 2]) <= {0, 1}


# ------------------------------------------------------------- retrieval augmentation


def _fake_extract(table: dict[str, tuple]):
    """A stand-in for ``R.extract``: each record's inputs looked up by id (copies: their base)."""
    def extract(records, cfg, cache, progress=False):
        rows = [table[R.base_id(r.id)] for r in records]
        return E.ReprInputs([r.id for r in records], *(np.stack(c).astype(np.float32)
                                                        for c in zip(*rows)))
    return extract


def _noise_table(recs, seed=0):
    rng = np.random.default_rng(seed)
    return {r.id: tuple(rng.normal(size=d) for d in (E5_DIM, E5_DIM, E5_DIM, N_VIS))
            for r in recs}


TINY_RC = dict(repr__epochs=2, repr__dim=16, repr__k_grid=[1, 3], mini__retrieval=True,
               mini__retrieval_folds=3, mini__workers=1)  # fits in order: no process start per test


def test_neighbour_votes_never_vote_for_the_record_itself(monkeypatch):
    # 4 labels x 6 records per task, one singleton label per task with a turn-dropout copy:
    # its own label can only come from itself or its copy, so its vote must be ~0 there
    recs, _ = dataset(n_per_label=6, n_labels=4)
    lone = [rec("lone-img", "image", IMAGE_LABELS[5]), rec("lone-int", "intent", INTENT_LABELS[5])]
    table = _noise_table(recs + lone)
    train_recs = recs + lone + [rec("lone-int#dlg0", "intent", INTENT_LABELS[5])]
    monkeypatch.setattr(R, "extract", _fake_extract(table))
    cfg = resolve("mini", **TINY_RC)
    nv = R.NeighbourVotes(cfg).fit(train_recs, seed=0)
    v = nv.votes(train_recs)
    assert v.shape == (len(train_recs), 48) and np.allclose(v.sum(axis=1), 1)
    for i, r in enumerate(train_recs):
        if r.label in (IMAGE_LABELS[5], INTENT_LABELS[5]):
            assert v[i, LABEL_INDEX[r.label]] < 1e-6, r.id  # no self / copy vote
            assert nv.nearest([r])[0] != r.label
    # on pure noise, out-of-fold votes are near chance; a self vote would be right every time
    own = np.mean([v[i].argmax() == LABEL_INDEX[r.label] for i, r in enumerate(train_recs)])
    assert own < 0.6, own
    # a new record (not in training) is voted by the full gallery, originals only
    new = rec("new", "image", IMAGE_LABELS[0])
    table["new"] = table[recs[0].id]  # the same inputs as a training record: it is found
    assert nv.nearest([new])[0] == recs[0].label and len(nv.gallery) == len(recs) + 2
    assert nv.k in (1, 3) and set(nv.info["oof_weighted_f1"]) == {1, 3}
    b = nv.block(train_recs)
    assert np.isclose(np.linalg.norm(b, axis=1).mean(), 1.0, atol=1e-4)


def test_retrieval_backend_needs_and_gets_a_retriever():
    cfg = resolve("mini", **TINY_RC)
    with pytest.raises(ValueError, match="retriever"):
        M.MiniBackend(cfg)
    be = make_backend(cfg)
    assert isinstance(be.retriever, R.NeighbourVotes)
    assert make_backend(resolve("mini")).retriever is None  # off by default


def test_nearest_label_observable_in_rules_and_proposer():
    a, b = INTENT_LABELS[0], INTENT_LABELS[1]
    recs = [Record(id=f"r{i}", task="intent", instruction="", label=[a, b][i % 2], images=(),
                   candidates=LABELS["intent"]) for i in range(12)]
    near = [r.label if i < 10 else [b, a][i % 2] for i, r in enumerate(recs)]  # 10/12 right
    obs = build_observables(recs, nearest_label=near)
    assert "nearest_label" in obs.available and obs.fields["nearest_label"] == near
    assert "nearest_label" not in build_observables(recs).available
    rule = make_rule("intent", a, [Condition("nearest_label", "keyword_any", (a,))])
    eng = RuleEngine(obs)
    res = eng.apply([rule], y=obs.labels)
    assert res.masks[0].tolist() == [n == a for n in near] and res.precision[0] == 5 / 6
    eng.apply([rule])
    assert eng.stats["condition_evals"] == 1  # the mask is cached per condition
    assert RuleBase([rule]).to_dict()["rules"][0]["conditions"][0]["field"] == "nearest_label"
    with pytest.raises(RuleValidationError, match="not labels of task"):
        make_rule("intent", a, [Condition("nearest_label", "keyword_any", (IMAGE_LABELS[0],))])
    with pytest.raises(RuleValidationError, match="bad_op"):
        make_rule("intent", a, [Condition("nearest_label", "regex", a)])
    # the data-driven miner proposes it where it discriminates (here: the only signal)
    rules = DataProposer(obs, min_support=2).propose(a, k=3)
    assert any(c.field == "nearest_label" for r in rules for c in r.conditions)


def test_versus_joint_rows_and_the_representation_table():
    rng = np.random.default_rng(0)
    labs = [("image", lab) for lab in IMAGE_LABELS[:4]] + [("intent", lab) for lab in INTENT_LABELS[:4]]
    n = 80
    gold = [labs[i % 8] for i in range(n)]
    ids = [f"t{i}" for i in range(n)]

    def noisy(p_right):
        return [g[1] if rng.random() < p_right else labs[(labs.index(g) + 1) % 4 + 4 * (g[0] == "intent")][1]
                for g in gold]
    def frame(variant, pred):
        return pd.DataFrame({"variant": variant, "split": "test1", "id": ids,
                             "task": [g[0] for g in gold], "gold": [g[1] for g in gold], "pred": pred})

    joint = frame("joint", noisy(0.6)).assign(seed=0, schedule="epochs")
    other_seed = frame("joint", [g[1] for g in gold]).assign(seed=1, schedule="epochs")  # unused
    steps = frame("joint", [g[1] for g in gold]).assign(seed=0, schedule="steps")  # unused
    uses = pd.concat([frame("knn_full", noisy(0.7)), frame(R.RETRIEVAL_VARIANT, noisy(0.8))])
    uses = uses.sample(frac=1, random_state=0)  # order must not matter: aligned by id
    rows = pd.DataFrame(R.versus_joint_rows(uses, pd.concat([joint, other_seed, steps]), seed=0,
                                            n_boot=200))
    pooled = rows[rows.task == "pooled"].pivot_table(index="variant", columns="metric", values="value")
    assert set(pooled.index) == {"01:joint", "knn_full", R.RETRIEVAL_VARIANT}
    # the paired gain is the difference of the F1s (the kNN F1 rows come from run_representations)
    assert np.isclose(pooled.loc[R.RETRIEVAL_VARIANT, "gain_vs_joint"],
                      pooled.loc[R.RETRIEVAL_VARIANT, "weighted_f1"] - pooled.loc["01:joint", "weighted_f1"])
    assert (pooled.loc[["knn_full", R.RETRIEVAL_VARIANT], "gain_vs_joint_lo"]
            <= pooled.loc[["knn_full", R.RETRIEVAL_VARIANT], "gain_vs_joint_hi"]).all()
    assert np.isnan(pooled.loc["knn_full", "weighted_f1"])  # not written twice
    # the kNN F1 rows come from run_representations; add them and the chosen k as it writes them
    knn = uses[uses.variant == "knn_full"]
    m = pd.concat([rows, pd.DataFrame(metric_rows(list(knn.gold), list(knn.pred), list(knn.task),
                                                  experiment=R.EXPERIMENT, variant="knn_full",
                                                  seed=0, split="test1")),
                   pd.DataFrame([{"experiment": R.EXPERIMENT, "variant": "knn_full", "seed": 0,
                                  "split": "dev", "task": "pooled", "metric": "k_chosen",
                                  "value": 5.0}])], ignore_index=True)
    t = report.representation_table(m)
    assert t.row.str.startswith("knn[k=5]").sum() == 1 and t.row.str.startswith("model+retrieval").sum() == 1
    assert t.row.iloc[0].startswith("Joint fine-tune") and "Δ test1" in t.columns
    assert t["Δ test1"].notna().sum() == 2  # the joint has no gain over itself
    with pytest.raises(ValueError, match="seed 7"):
        R.versus_joint_rows(uses, joint, seed=7)


def test_nearest_labels_reach_the_rules_of_notebooks_02_and_03(monkeypatch, tmp_path):
    """knowledge.nearest_labels: the fit part's own labels out of fold, other splits looked up
    in the fit part; saved by notebook 02, read back by 03 (a record missing is named)."""
    from kdsl_utils import kdsl_eval, knowledge

    recs, _ = dataset(n_per_label=6, n_labels=4)
    test = [rec(f"t{i}", r.task, r.label) for i, r in enumerate(recs[:8])]
    table = _noise_table(recs)
    table.update({t.id: table[r.id] for t, r in zip(test, recs[:8])})  # a test record = a fit record
    monkeypatch.setattr(R, "extract", _fake_extract(table))
    monkeypatch.setattr(knowledge, "FeatureCache", lambda: None)
    cfg = resolve("mini", **TINY_RC)
    assert knowledge.nearest_labels(resolve("tiny"), recs, {"test1": test}, seed=0) == {}
    near = knowledge.nearest_labels(cfg, recs, {"test1": test}, seed=0)
    assert set(near) == {"fit", "test1"} and len(near["fit"]) == len(recs)
    assert near["test1"] == [r.label for r in recs[:8]]  # found its twin in the fit part
    knowledge.save_nearest(tmp_path, near, {"test1": test})
    assert knowledge.load_nearest(tmp_path, {"test1": test}) == {"test1": near["test1"]}
    assert knowledge.load_nearest(tmp_path / "none", {"test1": test}) == {}
    with pytest.raises(ValueError, match=r"no nearest label for 1 record\(s\) of split 'test1' \(first: 'x'\)"):
        knowledge.load_nearest(tmp_path, {"test1": test + [rec("x", "image", IMAGE_LABELS[0])]})
    monkeypatch.setattr(knowledge, "ocr_texts", lambda *a, **k: {})
    obs = knowledge.observables_for(test, replace_rules_ocr(cfg), near["test1"])
    assert obs.fields["nearest_label"] == near["test1"] and "nearest_label" in obs.available
    rule = make_rule(test[0].task, test[0].label, [Condition("nearest_label", "keyword_any", (test[0].label,))])
    assert kdsl_eval.condition_kind(rule) == "nearest_label"


def replace_rules_ocr(cfg):
    """The profile without OCR observables (the fake extractor has no images to read)."""
    from dataclasses import replace
    return replace(cfg, mini=replace(cfg.mini, ocr=False))


def test_one_fan_out_equals_the_stages_one_after_another(monkeypatch, tmp_path):
    """run_representations(retrieval_model=True) hands the retriever's and the variants' fits to
    two workers at once and trains the joint fine-tune beside them: the same numbers as the
    variants, then the retrieval model, fitted one after another in this process."""
    recs, _ = dataset(n_per_label=6, n_labels=3)
    tests = {"test1": [rec(f"t-{r.id}", r.task, r.label) for r in recs[::3]]}
    table = _noise_table(recs + tests["test1"], seed=1)
    for r in recs + tests["test1"]:  # a label signal in the image "word", as in dataset()
        table[r.id][0][:8] += 3.0 * (LABEL_INDEX[r.label] % 8 == np.arange(8))
    monkeypatch.setattr(R, "extract", _fake_extract(table))
    small = dict(TINY_RC, mini__retrieval=False, mini__epochs=2, mini__ocr=False,
                 mini__image_encoder=False, mini__text_encoder=False)
    variants = ("full", "image_only")
    kw = dict(seed=0, variants=variants, cache=FeatureCache(tmp_path / "c"), progress=False)
    serial = resolve("mini", **small)
    assert serial.fit_workers == 1
    one = R.run_representations(serial, recs, tests, **kw)
    retr, info = R.retrieval_model_predictions(serial, recs, tests, seed=0, cache=kw["cache"],
                                               progress=False)
    fanned = resolve("mini", **{**small, "mini__workers": 2})
    assert fanned.fit_workers == 2
    both = R.run_representations(fanned, recs, tests, retrieval_model=True, **kw)
    pd.testing.assert_frame_equal(one.metrics, both.metrics)
    pd.testing.assert_frame_equal(one.predictions, both.predictions)
    pd.testing.assert_frame_equal(retr, both.retrieval)
    assert both.retrieval_info["k"] == info["k"] and len(both.retrieval) == len(tests["test1"])
    assert one.retrieval is None and one.retrieval_info == {}
    with pytest.raises(ValueError, match="mini backend only"):
        R.run_representations(resolve("tiny"), recs, tests, retrieval_model=True, **kw)


def test_a_fit_for_other_records_than_submitted_refits(monkeypatch):
    recs, _ = dataset(n_per_label=4, n_labels=3)
    monkeypatch.setattr(R, "extract", _fake_extract(_noise_table(recs)))
    cfg = resolve("mini", **TINY_RC)
    direct = R.NeighbourVotes(cfg).fit(recs, seed=0)
    nv = R.NeighbourVotes(cfg)
    nv.submit(recs[:-3], seed=0)  # other records: not used
    nv.fit(recs, seed=0)
    np.testing.assert_array_equal(nv.votes(recs), direct.votes(recs))
    nv.submit(recs, seed=1)  # another seed: not used either
    nv.fit(recs, seed=0)
    np.testing.assert_array_equal(nv.votes(recs), direct.votes(recs))
    assert nv._pending is None and len(nv.gallery) == len(recs)
