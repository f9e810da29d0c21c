"""Record representations the NoteLLM-2 way (seed 002; notebook 04): the CPU recipe, and
the run / uses / tables shared with the ``paper`` profile's Qwen2-VL mICL encoder
(:mod:`kdsl_utils.models.qwen_repr`, ``ReprCfg.encoder="qwen_micl"``).

NoteLLM-2 (multimodal large representation models for recommendation) makes a note
embedding with two ideas:

- **mICL** (multimodal in-context learning): the prompt keeps the modalities apart and
  asks the model to compress the image into one word first, then the whole note; the
  hidden state at the image's compression token is a *visual* embedding (causal attention:
  it has seen only the image), the last token's hidden state the *multimodal* one; both
  are trained, their contrastive losses mixed by weights.
- **late fusion**: a vision encoder's features ``v`` come back in after the LLM through a
  gate, ``z = σ(W[h; v])`` (``W`` bias-free, Xavier-initialised), ``e = z·h + (1−z)·v``.

Without an LLM (``mini``) the same recipe is built from the frozen, cached extractors of
:mod:`kdsl_utils.features` (read through :func:`kdsl_utils.models.mini.extract_inputs`, so
nothing is re-extracted that notebook 01 computed):

- text side: multilingual-e5 of the dialogue (the "note") and of the OCR text of the
  record's images (the image's "word": the text an image shows, compressed by the same
  text encoder into one vector). ``h = f([u; t])`` with ``f`` a small MLP, ``u`` the image
  word and ``t`` the note; the **mICL stand-in**'s visual embedding is ``f([u; 0])``: the
  same encoder reading the image word alone — what the hidden state at the image's
  compression token sees under causal attention.
- visual side: EfficientNet-Lite0 + layout numbers (mean over the record's images),
  standardised on the training records, projected to the common size by ``g``.
- ``e = z·h + (1−z)·g(v)``, L2-normalised.

Training: in-batch contrastive loss (multi-positive InfoNCE, i.e. supervised contrastive)
on L2-normalised embeddings with a learnable temperature; related pairs are records with
the same label, and a record with its augmented copy (turn-dropout copies of dialogues;
every batch pairs each anchor with its copy where it has one, else with another record of
its label). With mICL the loss is ``L(e) + visual_loss_weight · L(f([u; 0]))``.

Variants (the ablations of the issue) — :data:`VARIANTS`:

==================  ==========================================================
``full``            mICL stand-in + late fusion
``no_micl``         plain pooled text embedding: e5 of OCR text and dialogue
                    joined in one passage, no visual-side loss; late fusion
``no_late_fusion``  mICL stand-in, visual features read by ``f`` as extra
                    input (early fusion), no gate
``text_only``       mICL stand-in, no visual side
``image_only``      visual side only (``e = g(v)``)
==================  ==========================================================

Uses: :func:`knn_predict` (similarity-weighted label vote of the k nearest training
records of the same task, ``k`` chosen on the dev fold), :func:`recall_at_k` (same-label
retrieval), and :func:`nearest_labels` (the nearest training record's label, an
observable the rule conditions can test).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import pandas as pd
from sklearn.manifold import TSNE

from . import record_encoder, seesaw_files
from .config import Profile
from .contrastive import VARIANTS
from .data.augment import dialogue_dropout
from .data.labels import ALL_LABELS, LABEL_INDEX, TASKS, label_indices
from .data.records import Record
from .data.splits import stratified_folds, stratified_split
from .features import E5Embedder, FeatureCache, embed_texts
from .metrics import POOLED, metric_rows
from .models import qwen_repr
from .models.base import Predictions, select_mix
from .models.mini import MiniBackend, candidate_mask, extract_inputs
from .record_encoder import ReprInputs, Representation, train_job
from .report import ci_rows, paired_gain_ci
from .workers import Batch, prestart, submit_jobs

EXPERIMENT = "04_representations"
TEXT_DIM = E5Embedder.dim


VARIANT_NAMES = {
    "full": "mICL stand-in + late fusion",
    "no_micl": "without mICL (one pooled text embedding)",
    "no_late_fusion": "without late fusion (visual features as encoder input)",
    "text_only": "text side only",
    "image_only": "visual side only",
}

#: Row names per ``ReprCfg.encoder`` (the tables say what each row measured).
ENCODERS = {"features": VARIANT_NAMES, "qwen_micl": qwen_repr.VARIANT_NAMES}


# ------------------------------------------------------------------------------ inputs


def _e5(texts: list[str], cache: FeatureCache, progress: bool) -> np.ndarray:
    out = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if keep:  # an empty text gets no embedding (zeros), not the embedding of " "
        out[keep] = embed_texts([texts[i] for i in keep], cache, extractor=E5Embedder(),
                                progress=progress)
    return out


def _word(ocr: str, max_chars: int) -> str:
    """The OCR text of a record's images cut to ``max_chars`` characters (the image's "word";
    e5's cost grows with the passage, and the first lines of a screenshot carry its title)."""
    return ocr[:max_chars]


def extract(records: Sequence[Record], cfg: Profile, cache: FeatureCache, *,
            progress: bool = True) -> ReprInputs:
    """:class:`ReprInputs` of ``records`` from the cached extractors (OCR, EfficientNet, e5).

    The mini backend's extraction is reused with ``intent_images`` from ``ReprCfg``; the
    OCR text is cut to ``ReprCfg.word_max_chars`` characters before e5 reads it.
    """
    rc = cfg.repr
    mcfg = replace(cfg.mini, ocr=True, image_encoder=True, text_encoder=False,
                   intent_images=rc.intent_images)
    raw = extract_inputs(records, mcfg, cache, progress=progress)
    words = [_word(t, rc.word_max_chars) for t in raw.ocr]
    word = _e5(words, cache, progress)
    note = _e5(raw.dialog, cache, progress)
    # the same cut OCR text: an image record's pooled passage is its word (one embedding)
    joined = ["\n".join(t for t in (o, d) if t.strip()) for o, d in zip(words, raw.dialog)]
    pooled = _e5(joined, cache, progress)
    visual = np.concatenate([raw.image, raw.layout], axis=1).astype(np.float32)
    return ReprInputs([r.id for r in records], word, note, pooled, visual)


# -------------------------------------------------------------------------------- uses


def _similarities(q: np.ndarray, q_records: Sequence[Record], g: np.ndarray,
                  g_records: Sequence[Record]) -> np.ndarray:
    """(nq, ng) cosine similarities; -inf for a gallery record of another task, and for
    the query itself and its augmented copies (leave-one-out when the gallery holds it)."""
    s = (q @ g.T).astype(np.float64)
    qt = np.array([r.task for r in q_records])
    gt = np.array([r.task for r in g_records])
    s[qt[:, None] != gt[None, :]] = -np.inf
    qb = np.array([r.id.split("#")[0] for r in q_records])
    gb = np.array([r.id.split("#")[0] for r in g_records])
    s[qb[:, None] == gb[None, :]] = -np.inf
    return s


def knn_proba(sim: np.ndarray, g_records: Sequence[Record], q_records: Sequence[Record], k: int,
              temperature: float) -> np.ndarray:
    """(nq, 48) similarity-weighted vote of the ``k`` nearest gallery records: weight
    ``exp(s / τ)`` (τ the trained temperature), normalised over the query's candidates."""
    g_lab = np.array([LABEL_INDEX[r.label] for r in g_records])
    k = min(k, sim.shape[1])
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    s_top = np.take_along_axis(sim, top, axis=1)
    w = np.where(np.isfinite(s_top), np.exp((s_top - 1.0) / temperature), 0.0)
    proba = np.zeros((len(sim), len(ALL_LABELS)))
    np.add.at(proba, (np.repeat(np.arange(len(sim)), k), g_lab[top].ravel()), w.ravel())
    mask = candidate_mask(q_records)
    proba = np.where(mask, proba + 1e-12, 0.0)  # no neighbour vote: uniform over candidates
    return proba / proba.sum(axis=1, keepdims=True)


def recall_at_k(sim: np.ndarray, q_records: Sequence[Record], g_records: Sequence[Record],
                ks: Sequence[int]) -> dict[int, np.ndarray]:
    """Per query and ``k``: 1.0 if one of the ``k`` nearest gallery records (same task) has
    the query's label, else 0.0 — the hit rate of same-label retrieval."""
    g_lab = np.array([r.label for r in g_records], dtype=object)
    q_lab = np.array([r.label for r in q_records], dtype=object)
    order = np.argsort(-sim, axis=1, kind="stable")
    hit = (g_lab[order] == q_lab[:, None]) & np.isfinite(np.take_along_axis(sim, order, axis=1))
    return {k: hit[:, :k].any(axis=1).astype(float) for k in ks}


def nearest_labels(rep: Representation, records: Sequence[Record], x: ReprInputs,
                   gallery: Sequence[Record], xg: ReprInputs) -> list[str]:
    """The label of each record's nearest gallery record of the same task (the record itself
    and its augmented copies excluded): an observable a rule condition can test."""
    sim = _similarities(rep.embed(x), records, rep.embed(xg), gallery)
    best = sim.argmax(axis=1)
    return [gallery[j].label for j in best]


def base_id(record_id: str) -> str:
    """The id of the original a record derives from (``x#dlg1`` / ``x#aug1`` -> ``x``)."""
    return record_id.split("#")[0]


@dataclass
class _Submitted:
    """What :meth:`NeighbourVotes.submit` handed to the fit workers, for its ``fit``."""

    key: tuple[list[str], int]  # (record ids, seed) it was submitted for
    records: list[Record]
    x: ReprInputs
    fold: np.ndarray  # (n,) cross-fitting fold of each record
    used: list[int]  # the folds with a fold encoder, in the batch's order
    batch: Batch  # fold encoders, then the final one
    seconds: float  # reading features and submitting


class NeighbourVotes:
    """Neighbour-label features of the ``mini`` large model (retrieval augmentation).

    For a record, the similarity-weighted label vote (:func:`knn_proba`) of its ``k`` nearest
    labelled training records of the same task in the ``variant`` representation: a (48,)
    distribution over the record's candidates. ``fit`` trains the representation on the
    training records; **no record votes for itself**: a training record's vote comes from a
    representation trained without it, over a gallery without it (cross-fitting,
    ``MiniCfg.retrieval_folds`` folds grouped by original, so augmented copies stay with their
    original), and any other record's vote excludes gallery records of the same original
    (:func:`_similarities`). ``k`` is chosen from ``ReprCfg.k_grid`` by the out-of-fold
    weighted F1 of the vote itself (no test or dev record is looked at).

    ``block(records)`` gives the votes scaled to unit mean row norm over the training
    records' out-of-fold votes (not standardised per column: a label no training record was
    voted for would get a near-zero spread), ``nearest(records)`` the nearest training
    record's label (the rule observable ``nearest_label``).
    """

    dim = len(ALL_LABELS)

    def __init__(self, cfg: Profile, cache: FeatureCache | None = None, *,
                 variant: str = "full", progress: bool = False):
        self.cfg, self.variant, self.progress = cfg, variant, progress
        self.cache = cache or FeatureCache()
        self.rep: Representation | None = None
        self.gallery: list[Record] = []
        self.e_gal: np.ndarray | None = None
        self.k = 0
        self.oof: dict[str, tuple[np.ndarray, str]] = {}  # id -> (vote, nearest label)
        self._fit_block: np.ndarray | None = None
        self.info: dict = {}
        self._pending: _Submitted | None = None

    def __getstate__(self):  # pickled with the model; the feature cache is re-opened on load
        return {k: v for k, v in self.__dict__.items() if k not in ("cache", "_pending")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.cache = FeatureCache()
        self._pending = None

    def _votes(self, rep: Representation, q: Sequence[Record], xq: ReprInputs,
               g: Sequence[Record], eg: np.ndarray, ks: Sequence[int]):
        sim = _similarities(rep.embed(xq), q, eg, g)
        near = [g[j].label if np.isfinite(sim[i, j]) else "" for i, j in
                enumerate(sim.argmax(axis=1))]
        return {k: knn_proba(sim, g, q, k, rep.temperature) for k in ks}, near

    def submit(self, records: Sequence[Record], *, seed: int) -> None:
        """Read the features of ``records`` and hand :meth:`fit`'s encoder fits (one per fold,
        and the final one) to the fit workers, then return: a later ``fit`` of the same
        records and seed collects them, so the caller can work while they train."""
        t0 = time.perf_counter()
        records = list(records)
        rc, folds = self.cfg.repr, self.cfg.mini.retrieval_folds
        prestart(self.cfg.fit_workers, record_encoder.__name__)  # imports while features are read
        x = extract(records, self.cfg, self.cache, progress=self.progress)
        # out-of-fold votes: folds over originals, stratified by label; copies follow theirs
        groups = np.array([base_id(r.id) for r in records])
        bases = sorted(set(groups))
        lab = {base_id(r.id): r.label for r in records}
        fold_of = dict(zip(bases, stratified_folds([lab[b] for b in bases], folds, seed)))
        fold = np.array([fold_of[g] for g in groups])
        used = [f for f in range(folds) if (fold == f).any() and (fold != f).any()]
        # the fold representations and the final one: independent fits, side by side
        jobs = [(self.variant, np.flatnonzero(fold != f), seed + 1 + f) for f in used]
        batch = submit_jobs(partial(train_job, records, x, rc), jobs + [(self.variant, None, seed)],
                            workers=self.cfg.fit_workers, desc="retrieval encoders",
                            name=lambda j: f"{j[0]} (seed {j[2]})")
        self._pending = _Submitted(([r.id for r in records], seed), records, x, fold, used, batch,
                                   time.perf_counter() - t0)

    def fit(self, records: Sequence[Record], *, seed: int) -> NeighbourVotes:
        """Train on labelled ``records`` (originals and their augmented copies); collects
        the fits of a :meth:`submit` of the same records and seed, else submits them now."""
        records = list(records)
        pending, self._pending = self._pending, None
        if pending is None or pending.key != ([r.id for r in records], seed):
            if pending is not None:  # submitted for other records or another seed
                pending.batch.cancel()
            self.submit(records, seed=seed)
            pending, self._pending = self._pending, None
        records, x, fold, used = pending.records, pending.x, pending.fold, pending.used
        t0 = time.perf_counter()
        ks = tuple(self.cfg.repr.k_grid)
        orig = [i for i, r in enumerate(records) if "#" not in r.id]  # the gallery: originals
        votes = {k: np.zeros((len(records), self.dim)) for k in ks}
        near = [""] * len(records)
        reps = pending.batch.results()
        for f, rep in zip(used, reps):
            te = np.flatnonzero(fold == f)
            g = [i for i in orig if fold[i] != f]
            vs, nr = self._votes(rep, [records[i] for i in te], x.take(te),
                                 [records[i] for i in g], rep.embed(x.take(g)), ks)
            for k in ks:
                votes[k][te] = vs[k]
            for i, lbl in zip(te, nr):
                near[i] = lbl
        y = [r.label for r in records]
        tasks = [r.task for r in records]
        f1 = {k: metric_rows(y, [ALL_LABELS[i] for i in votes[k].argmax(axis=1)], tasks)[0]["value"]
              for k in ks}
        self.k = max(ks, key=lambda k: (f1[k], -k))
        self.oof = {r.id: (votes[self.k][i].astype(np.float32), near[i])
                    for i, r in enumerate(records)}
        self._fit_block = votes[self.k].astype(np.float32)
        self.rep = reps[-1]
        self.gallery = [records[i] for i in orig]
        self.e_gal = self.rep.embed(x.take(orig))
        # wall_s: reading features and submitting, plus waiting for the fits and voting
        self.info = {"k": self.k, "oof_weighted_f1": f1, "folds": self.cfg.mini.retrieval_folds,
                     "variant": self.variant, "n_gallery": len(orig),
                     "wall_s": pending.seconds + time.perf_counter() - t0}
        return self

    def _lookup(self, records: Sequence[Record]) -> tuple[np.ndarray, list[str]]:
        if self.rep is None:
            raise RuntimeError("NeighbourVotes: fit() first")
        records = list(records)
        out = np.zeros((len(records), self.dim), dtype=np.float32)
        near = [""] * len(records)
        new = [i for i, r in enumerate(records) if r.id not in self.oof]
        for i, r in enumerate(records):
            if r.id in self.oof:
                out[i], near[i] = self.oof[r.id]
        if new:
            q = [records[i] for i in new]
            vs, nr = self._votes(self.rep, q, extract(q, self.cfg, self.cache,
                                                      progress=self.progress),
                                 self.gallery, self.e_gal, (self.k,))
            out[new] = vs[self.k]
            for i, lbl in zip(new, nr):
                near[i] = lbl
        return out, near

    def votes(self, records: Sequence[Record]) -> np.ndarray:
        """(n, 48) neighbour-label votes (rows sum to 1 over each record's candidates)."""
        return self._lookup(records)[0]

    def block(self, records: Sequence[Record]) -> np.ndarray:
        """(n, 48) the votes divided by the mean row norm of the out-of-fold votes."""
        scale = float(np.linalg.norm(self._fit_block, axis=1).mean()) or 1.0
        return (self.votes(records) / scale).astype(np.float32)

    def nearest(self, records: Sequence[Record]) -> list[str]:
        """The label of each record's nearest training record of its task ("" where none)."""
        return self._lookup(records)[1]


# ---------------------------------------------------------------------------- the run


@dataclass
class ReprRun:
    """Everything notebook 04 reports: tidy metrics, per-record predictions, embeddings."""

    metrics: pd.DataFrame
    predictions: pd.DataFrame  # variant, split, id, task, gold, pred, nearest_label
    projection: pd.DataFrame  # variant, split, id, task, label, x, y (2-D test embeddings)
    fits: pd.DataFrame  # variant, k, temperature, final_loss, wall_s, n_train
    reps: dict[str, Representation]
    # the row model+retrieval (variant, split, id, task, gold, pred) and its fit info, where
    # run_representations(retrieval_model=True); else None / {}
    retrieval: pd.DataFrame | None = None
    retrieval_info: dict = field(default_factory=dict)


def _retrieval_rows(variant: str, seed: int, split: str, sim: np.ndarray,
                    q: Sequence[Record], g: Sequence[Record], ks: Sequence[int]) -> list[dict]:
    hits = recall_at_k(sim, q, g, ks)
    tasks = np.array([r.task for r in q])
    rows = []
    for k, h in hits.items():
        for task in (POOLED, *TASKS):
            m = np.ones(len(q), bool) if task == POOLED else tasks == task
            if m.any():
                rows.append({"experiment": EXPERIMENT, "variant": variant, "seed": seed,
                             "split": split, "task": task, "metric": f"recall@{k}",
                             "value": float(h[m].mean())})
    return rows


def _knn_rows(variant: str, seed: int, split: str, q: Sequence[Record], pred: Sequence[str]):
    return metric_rows([r.label for r in q], pred, [r.task for r in q], experiment=EXPERIMENT,
                       variant=f"knn_{variant}", seed=seed, split=split)


def choose_k(sim: np.ndarray, q: Sequence[Record], g: Sequence[Record], ks: Sequence[int],
             temperature: float) -> tuple[int, dict[int, float]]:
    """The k of ``ks`` with the best pooled weighted F1 of the kNN vote (ties: smaller k)."""
    scores = {}
    for k in ks:
        p = Predictions.for_records(q, knn_proba(sim, g, q, k, temperature))
        scores[k] = metric_rows(p.gold, p.pred, p.tasks)[0]["value"]  # pooled weighted F1
    best = max(ks, key=lambda k: (scores[k], -k))
    return best, scores


def projection_2d(emb: np.ndarray, seed: int) -> np.ndarray:
    """(n, 2) t-SNE of L2-normalised embeddings (cosine metric, PCA init, seeded)."""
    perplexity = float(min(30, max(2, (len(emb) - 1) // 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", metric="cosine",
                random_state=seed).fit_transform(emb)


def run_representations(cfg: Profile, train_records: Sequence[Record],
                        tests: dict[str, Sequence[Record]], *, seed: int,
                        variants: Sequence[str] = tuple(VARIANTS), retrieval_model: bool = False,
                        cache: FeatureCache | None = None, progress: bool = True) -> ReprRun:
    """Train every variant on the fit part of ``train_records`` (plus turn-dropout copies of
    its dialogues), choose k on the dev fold (gallery: the fit part), then score the kNN
    vote and recall@k on every test split with the whole training set as gallery.

    Metrics rows: variant ``<v>`` for recall@k, ``knn_<v>`` for the kNN classifier's
    :func:`~kdsl_utils.metrics.evaluate` numbers, ``k_chosen`` / ``dev_f1@k`` on split dev.

    ``retrieval_model`` (mini backend only): also the row ``model+retrieval``
    (:func:`retrieval_model_predictions`, in ``ReprRun.retrieval``). Its retriever's encoder
    fits go to the fit workers first, then the variants'; the joint fine-tune trains here
    while the workers fit the variants (one fan-out, no worker waits for another stage).
    Every fit depends only on its own arguments, so the results equal those of the two
    run one after the other.
    """
    rc = cfg.repr
    if rc.encoder not in ENCODERS:
        raise ValueError(f"repr.encoder={rc.encoder!r}; choose one of {', '.join(ENCODERS)}")
    cache = cache or FeatureCache()
    train_records = list(train_records)
    fit, dev = stratified_split(train_records, cfg.dev_fraction, seed)
    copies = dialogue_dropout(fit, p_agent=cfg.augment.p_agent, p_user=cfg.augment.p_user,
                              copies=rc.dialogue_copies, seed=seed) if rc.dialogue_copies else []
    fit_aug = fit + copies
    all_recs = fit_aug + dev + [r for t in tests.values() for r in t]
    # first: the retriever's encoder fits start in the workers while the features are read
    backend = (retrieval_backend(cfg, train_records, seed=seed, cache=cache, progress=progress)
               if retrieval_model else None)
    if rc.encoder == "qwen_micl":  # the LLM reads the records: its inputs are the records
        micl = qwen_repr.MiclEncoder(cfg, progress=progress)
        x_all = qwen_repr.MiclInputs(all_recs)
    else:
        prestart(cfg.fit_workers, record_encoder.__name__)  # imports while the features are read
        x_all = extract(all_recs, cfg, cache, progress=progress)
    n_fa, n_dev = len(fit_aug), len(dev)
    x_fit = x_all.take(range(n_fa))
    x_dev = x_all.take(range(n_fa, n_fa + n_dev))
    x_train = x_all.take([*range(len(fit)), *range(n_fa, n_fa + n_dev)])  # originals only
    gallery = fit + dev
    x_tests, start = {}, n_fa + n_dev
    for name, recs in tests.items():
        x_tests[name] = x_all.take(range(start, start + len(recs)))
        start += len(recs)
    if rc.encoder == "qwen_micl":  # one adapter after another on the one GPU model
        batch = None
        trained = [micl.train(fit_aug, x_fit, v, rc, seed=seed) for v in variants]
    else:  # independent CPU fits, side by side (Profile.fit_workers)
        batch = submit_jobs(partial(train_job, fit_aug, x_fit, rc), [(v, None, seed) for v in variants],
                            workers=cfg.fit_workers, desc="representations", name=lambda j: j[0])
    retrieval: tuple[pd.DataFrame | None, dict] = (None, {})
    if backend is not None:  # here, while the workers fit the variants
        retrieval = retrieval_model_predictions(cfg, train_records, tests, seed=seed, backend=backend)
    if batch is not None:
        trained = batch.results()
    metrics, preds, proj, fits, reps = [], [], [], [], {}
    for v, rep in zip(variants, trained):
        reps[v] = rep
        tau = rep.temperature
        e_fit = rep.embed(x_fit.take(range(len(fit))))
        sim_dev = _similarities(rep.embed(x_dev), dev, e_fit, fit)
        k, dev_scores = choose_k(sim_dev, dev, fit, rc.k_grid, tau)
        metrics.append({"experiment": EXPERIMENT, "variant": f"knn_{v}", "seed": seed,
                        "split": "dev", "task": POOLED, "metric": "k_chosen", "value": float(k)})
        metrics += [{"experiment": EXPERIMENT, "variant": f"knn_{v}", "seed": seed, "split": "dev",
                     "task": POOLED, "metric": f"weighted_f1@k={kk}", "value": f}
                    for kk, f in dev_scores.items()]
        e_gal = rep.embed(x_train)
        for name, recs in tests.items():
            recs = list(recs)
            e_q = rep.embed(x_tests[name])
            sim = _similarities(e_q, recs, e_gal, gallery)
            p = Predictions.for_records(recs, knn_proba(sim, gallery, recs, k, tau))
            nearest = [gallery[j].label for j in sim.argmax(axis=1)]
            preds.append(pd.DataFrame({"variant": v, "split": name, "id": p.ids, "task": p.tasks,
                                       "gold": p.gold, "pred": p.pred, "nearest_label": nearest}))
            if p.labelled:
                metrics += _knn_rows(v, seed, name, recs, p.pred)
                metrics += _retrieval_rows(v, seed, name, sim, recs, gallery, rc.recall_ks)
            xy = projection_2d(e_q, seed)
            proj.append(pd.DataFrame({"variant": v, "split": name, "id": p.ids, "task": p.tasks,
                                      "label": p.gold, "x": xy[:, 0], "y": xy[:, 1]}))
        fits.append({"variant": v, "k": k, "temperature": tau, "final_loss": rep.losses[-1],
                     "first_loss": rep.losses[0], "wall_s": rep.wall_s, "n_train": len(fit_aug),
                     "n_copies": len(copies)})
    return ReprRun(pd.DataFrame(metrics), pd.concat(preds, ignore_index=True),
                   pd.concat(proj, ignore_index=True), pd.DataFrame(fits), reps, *retrieval)


# ---------------------------------------------------------------------------- tables


def knn_table(metrics: pd.DataFrame, encoder: str = "features") -> pd.DataFrame:
    """kNN weighted F1 per variant (rows, named for ``encoder``) and split · task (columns),
    with the chosen k."""
    m = metrics[(metrics.metric == "weighted_f1") & metrics.variant.str.startswith("knn_")
                & (metrics.split != "dev")]
    t = m.pivot_table(index="variant", columns=["split", "task"], values="value", aggfunc="mean")
    t.columns = [f"{s} · {k}" for s, k in t.columns]
    k = metrics[metrics.metric == "k_chosen"].groupby("variant")["value"].mean().astype(int)
    t.insert(0, "k (dev)", k)
    t.index = [f"kNN · {ENCODERS[encoder][v[len('knn_'):]]}" for v in t.index]
    return t


def recall_table(metrics: pd.DataFrame, task: str = POOLED, encoder: str = "features") -> pd.DataFrame:
    """Recall@k per variant (rows, named for ``encoder``) and split · k (columns) for one task."""
    m = metrics[metrics.metric.str.startswith("recall@") & (metrics.task == task)]
    t = m.pivot_table(index="variant", columns=["split", "metric"], values="value", aggfunc="mean")
    t = t[sorted(t.columns, key=lambda c: (c[0], int(c[1].split("@")[1])))]
    t.columns = [f"{s} · {k}" for s, k in t.columns]
    t.index = [ENCODERS[encoder][v] for v in t.index]
    return t


def versus_joint(metrics: pd.DataFrame, seesaw_metrics: pd.DataFrame) -> pd.DataFrame:
    """kNN weighted F1 of every variant beside notebook 01's joint fine-tune (mean over its
    seeds), per split and task, and the difference."""
    j = seesaw_metrics[(seesaw_metrics.variant == "joint") & (seesaw_metrics.metric == "weighted_f1")]
    joint = j.groupby(["split", "task"])["value"].agg(["mean", "count"])
    k = metrics[(metrics.metric == "weighted_f1") & metrics.variant.str.startswith("knn_")]
    rows = []
    for (v, split, task), val in k.groupby(["variant", "split", "task"])["value"].mean().items():
        if (split, task) in joint.index:
            jm, jn = joint.loc[(split, task)]
            rows.append({"variant": v, "split": split, "task": task, "knn_f1": val,
                         "joint_f1": jm, "joint_seeds": int(jn), "knn − joint": val - jm})
    return pd.DataFrame(rows)


# --------------------------------------------------------------- uses in the results table

#: Variant name of the retrieval-augmented large model in notebook 04's metrics.
RETRIEVAL_VARIANT = "model+retrieval"


def retrieval_backend(cfg: Profile, train_records: Sequence[Record], *, seed: int,
                      cache: FeatureCache | None = None, progress: bool = True) -> MiniBackend:
    """The ``mini`` backend with the neighbour-label block (``MiniCfg.retrieval``), whose
    retriever has already handed the encoder fits of the joint mix of ``train_records`` to
    the fit workers (:meth:`NeighbourVotes.submit`): its fit in
    :func:`retrieval_model_predictions` collects them."""
    if cfg.backend != "mini":
        raise ValueError(f"profile {cfg.name!r}: retrieval-augmented prediction is built for the "
                         "mini backend only (the paper form puts neighbours in the prompt)")
    rcfg = replace(cfg, mini=replace(cfg.mini, retrieval=True))
    retriever = NeighbourVotes(rcfg, cache)
    retriever.submit(select_mix(list(train_records), "joint"), seed=seed)
    return MiniBackend(rcfg, progress=progress, retriever=retriever)


def retrieval_model_predictions(cfg: Profile, train_records: Sequence[Record],
                                tests: dict[str, Sequence[Record]], *, seed: int,
                                cache: FeatureCache | None = None, progress: bool = True,
                                backend: MiniBackend | None = None
                                ) -> tuple[pd.DataFrame, dict]:
    """The ``mini`` joint fine-tune of notebook 01 (whole training set, same seed and
    hyper-parameters) with the neighbour-label block (``MiniCfg.retrieval``), scored on every
    test split. ``backend``: one from :func:`retrieval_backend` (same records and seed), else
    one is made. Returns (predictions: variant, split, id, task, gold, pred; fit info: the
    retriever's k, out-of-fold F1 by k, seconds)."""
    model = backend or retrieval_backend(cfg, train_records, seed=seed, cache=cache,
                                         progress=progress)
    t0 = time.perf_counter()
    model.fit(list(train_records), mix="joint", seed=seed)
    frames = []
    for split, recs in tests.items():
        p = model.predict_proba(list(recs))
        frames.append(pd.DataFrame({"variant": RETRIEVAL_VARIANT, "split": split, "id": p.ids,
                                    "task": p.tasks, "gold": p.gold, "pred": p.pred}))
    info = {**model.retriever.info, "fit_and_predict_s": time.perf_counter() - t0}
    return pd.concat(frames, ignore_index=True), info


def versus_joint_rows(preds: pd.DataFrame, seesaw_preds: pd.DataFrame, *, seed: int,
                      n_boot: int = 1000) -> list[dict]:
    """Rows of the results table for the representation uses (``preds``: variant, split, id,
    task, gold, pred — the kNN votes ``knn_<variant>`` and ``model+retrieval``) beside
    notebook 01's joint fine-tune of the same seed and the epochs schedule (its
    ``predictions.csv``), on the labelled
    test records: weighted F1 with bootstrap CI rows per variant (the joint as ``01:joint``)
    and ``gain_vs_joint`` (+ ``_lo``/``_hi``), the paired bootstrap gain over the joint
    (:func:`~kdsl_utils.report.paired_gain_ci`, the same resampled records for both)."""
    j = seesaw_preds[(seesaw_preds.variant == "joint") & (seesaw_preds.seed == seed)]
    if "schedule" in j.columns:  # the joint of the epochs schedule: the plain recipe's row
        j = j[j.schedule == seesaw_files.EPOCHS]
    if j.empty:
        raise ValueError(f"notebook 01 has no joint predictions for seed {seed}")
    rows: list[dict] = []
    ids = {"experiment": EXPERIMENT, "seed": seed}
    for split, g in preds[preds.gold.notna()].groupby("split"):
        base = j[j.split == split].set_index("id").pred
        if base.empty:
            continue
        first = g[g.variant == g.variant.iloc[0]]
        gold, tasks = list(first.gold), list(first.task)
        jp = list(base.loc[list(first.id)])
        rows += metric_rows(gold, jp, tasks, variant="01:joint", split=split, **ids)
        rows += ci_rows(gold, jp, tasks, n_boot=n_boot, boot_seed=seed, variant="01:joint",
                        split=split, **ids)
        for variant, gv in g.groupby("variant"):
            gv = gv.set_index("id").loc[list(first.id)]
            pred = list(gv.pred)
            if variant == RETRIEVAL_VARIANT:  # kNN rows are written by run_representations
                rows += metric_rows(gold, pred, tasks, variant=variant, split=split, **ids)
            rows += ci_rows(gold, pred, tasks, n_boot=n_boot, boot_seed=seed, variant=variant,
                            split=split, **ids)
            ci = paired_gain_ci(label_indices(gold), label_indices(pred), label_indices(jp), tasks,
                                n_boot=n_boot, seed=seed)
            rows += [{**ids, "variant": variant, "split": split, "task": r.task,
                      "metric": f"gain_vs_joint{sfx}", "value": float(r[col])}
                     for _, r in ci.iterrows() for sfx, col in (("", "gain"), ("_lo", "lo"),
                                                                 ("_hi", "hi"))]
    return rows
