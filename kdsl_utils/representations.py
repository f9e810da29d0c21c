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

import numpy as np
import pandas as pd
import torch
from sklearn.manifold import TSNE
from torch import nn

from .config import Profile, ReprCfg
from .contrastive import VARIANTS, Gate, Variant, contrastive_loss
from .contrastive import partners as _partners
from .data.augment import dialogue_dropout
from .data.labels import ALL_LABELS, LABEL_INDEX, TASKS
from .data.records import Record
from .data.splits import stratified_split
from .features import E5Embedder, FeatureCache, embed_texts, torch_threads
from .metrics import POOLED, metric_rows
from .models.base import Predictions
from .models import qwen_repr
from .models.mini import Featurizer, candidate_mask, extract_inputs

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


@dataclass
class ReprInputs:
    """Frozen per-record inputs, aligned with a record list.

    ``word``: (n, 384) e5 of the OCR text of the record's images (zeros where none);
    ``note``: (n, 384) e5 of the customer's dialogue text (zeros where none);
    ``pooled``: (n, 384) e5 of both texts joined in one passage (the no-mICL input);
    ``visual``: (n, 1287) EfficientNet mean embedding + layout numbers, unscaled.
    """

    ids: list[str]
    word: np.ndarray
    note: np.ndarray
    pooled: np.ndarray
    visual: np.ndarray

    def take(self, rows: Sequence[int]) -> ReprInputs:
        rows = list(rows)
        return ReprInputs([self.ids[i] for i in rows], self.word[rows], self.note[rows],
                          self.pooled[rows], self.visual[rows])


def _e5(texts: list[str], cache: FeatureCache, progress: bool) -> np.ndarray:
    out = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if keep:  # an empty text gets no embedding (zeros), not the embedding of " "
        out[keep] = embed_texts([texts[i] for i in keep], cache, extractor=E5Embedder(),
                                progress=progress)
    return out


def extract(records: Sequence[Record], cfg: Profile, cache: FeatureCache, *,
            progress: bool = True) -> ReprInputs:
    """:class:`ReprInputs` of ``records`` from the cached extractors (OCR, EfficientNet, e5).

    The mini backend's extraction is reused with ``intent_images`` from ``ReprCfg``.
    """
    rc = cfg.repr
    mcfg = replace(cfg.mini, ocr=True, image_encoder=True, text_encoder=False,
                   intent_images=rc.intent_images)
    raw = extract_inputs(records, mcfg, cache, progress=progress)
    word = _e5(raw.ocr, cache, progress)
    note = _e5(raw.dialog, cache, progress)
    joined = ["\n".join(t for t in (o, d) if t.strip()) for o, d in zip(raw.ocr, raw.dialog)]
    pooled = _e5(joined, cache, progress)
    visual = np.concatenate([raw.image, raw.layout], axis=1).astype(np.float32)
    return ReprInputs([r.id for r in records], word, note, pooled, visual)


# ------------------------------------------------------------------------------- model


def _mlp(n_in: int, dim: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, 2 * dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(2 * dim, dim))


class RecordEncoder(nn.Module):
    """Trainable part: text-side MLP ``f``, visual-side MLP ``g``, the gate, the temperature.

    ``forward`` takes float tensors word/note/pooled (b, 384) and visual (b, 1287, already
    scaled) and returns (multimodal embedding (b, dim), visual-side embedding (b, dim) or
    None), both L2-normalised.
    """

    def __init__(self, variant: Variant, rc: ReprCfg, n_visual: int):
        super().__init__()
        self.variant = variant
        vt = variant
        n_text = (2 * TEXT_DIM if vt.micl else TEXT_DIM) + (0 if vt.late_fusion or not vt.visual
                                                             else n_visual)
        self.f = _mlp(n_text, rc.dim, rc.dropout) if vt.text else None
        self.g = _mlp(n_visual, rc.dim, rc.dropout) if vt.visual and (vt.late_fusion or not vt.text) else None
        self.gate = Gate(rc.dim) if vt.text and vt.visual and vt.late_fusion else None
        # learnable temperature, as log(1/τ) (CLIP's parametrisation)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / rc.temperature))))

    @property
    def temperature(self) -> float:
        return float(1.0 / self.logit_scale.detach().clamp(max=np.log(100.0)).exp())

    def forward(self, word, note, pooled, visual):
        vt = self.variant
        e_vis = None
        if vt.text:
            text = torch.cat([word, note], dim=1) if vt.micl else pooled
            extra = [visual] if vt.visual and not vt.late_fusion else []
            h = self.f(torch.cat([text, *extra], dim=1))
            if vt.micl:  # the image word read alone: the visual-side embedding of mICL
                alone = torch.cat([word, torch.zeros_like(note), *[torch.zeros_like(x) for x in extra]],
                                  dim=1)
                e_vis = nn.functional.normalize(self.f(alone), dim=1)
            e = self.gate(h, self.g(visual)) if self.gate is not None else h
        else:
            e = self.g(visual)
        return nn.functional.normalize(e, dim=1), e_vis


@dataclass
class Representation:
    """A trained encoder with its visual scaling (fitted on the training records)."""

    variant_name: str
    encoder: RecordEncoder
    visual_fit: np.ndarray  # the training records' raw visual features (for scaling)
    losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def embed(self, x: ReprInputs) -> np.ndarray:
        """(n, dim) L2-normalised embeddings."""
        vis = Featurizer.scale_like(x.visual, self.visual_fit)
        self.encoder.eval()
        with torch.inference_mode(), torch_threads(1):
            e, _ = self.encoder(*(torch.from_numpy(a) for a in (x.word, x.note, x.pooled, vis)))
        return e.numpy().astype(np.float32)

    @property
    def temperature(self) -> float:
        return self.encoder.temperature


def train(records: Sequence[Record], x: ReprInputs, variant_name: str, rc: ReprCfg, *,
          seed: int) -> Representation:
    """Train one variant contrastively on labelled ``records`` (aligned with ``x``)."""
    if any(r.label is None for r in records):
        raise ValueError("representation training needs labelled records")
    t0 = time.perf_counter()
    variant = VARIANTS[variant_name]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    enc = RecordEncoder(variant, rc, x.visual.shape[1])
    vis = Featurizer.scale_like(x.visual, x.visual)
    tens = [torch.from_numpy(a) for a in (x.word, x.note, x.pooled, vis)]
    y = torch.tensor([LABEL_INDEX[r.label] for r in records])
    opt = torch.optim.AdamW(enc.parameters(), lr=rc.learning_rate, weight_decay=rc.weight_decay)
    losses = []
    n = len(records)
    with torch_threads(1):
        enc.train()
        for _ in range(rc.epochs):
            perm = rng.permutation(n)
            partner = _partners(records, rng)
            tot = 0.0
            for j in range(0, n, rc.batch_size):
                a = perm[j:j + rc.batch_size]
                rows = torch.from_numpy(np.concatenate([a, partner[a]]))
                e, e_vis = enc(*(t[rows] for t in tens))
                loss = contrastive_loss(e, y[rows], enc.logit_scale)
                if e_vis is not None and rc.visual_loss_weight:
                    loss = loss + rc.visual_loss_weight * contrastive_loss(e_vis, y[rows],
                                                                           enc.logit_scale)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += loss.item() * len(a)
            losses.append(tot / n)
    enc.eval()
    return Representation(variant_name, enc, x.visual.copy(), losses, time.perf_counter() - t0)


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


# ---------------------------------------------------------------------------- the run


@dataclass
class ReprRun:
    """Everything notebook 04 reports: tidy metrics, per-record predictions, embeddings."""

    metrics: pd.DataFrame
    predictions: pd.DataFrame  # variant, split, id, task, gold, pred, nearest_label
    projection: pd.DataFrame  # variant, split, id, task, label, x, y (2-D test embeddings)
    fits: pd.DataFrame  # variant, k, temperature, final_loss, wall_s, n_train
    reps: dict[str, Representation]


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
                        variants: Sequence[str] = tuple(VARIANTS),
                        cache: FeatureCache | None = None, progress: bool = True) -> ReprRun:
    """Train every variant on the fit part of ``train_records`` (plus turn-dropout copies of
    its dialogues), choose k on the dev fold (gallery: the fit part), then score the kNN
    vote and recall@k on every test split with the whole training set as gallery.

    Metrics rows: variant ``<v>`` for recall@k, ``knn_<v>`` for the kNN classifier's
    :func:`~kdsl_utils.metrics.evaluate` numbers, ``k_chosen`` / ``dev_f1@k`` on split dev.
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
    if rc.encoder == "qwen_micl":  # the LLM reads the records: its inputs are the records
        micl = qwen_repr.MiclEncoder(cfg, progress=progress)
        x_all, train_fn = qwen_repr.MiclInputs(all_recs), micl.train
    else:
        x_all, train_fn = extract(all_recs, cfg, cache, progress=progress), train
    n_fa, n_dev = len(fit_aug), len(dev)
    x_fit = x_all.take(range(n_fa))
    x_dev = x_all.take(range(n_fa, n_fa + n_dev))
    x_train = x_all.take([*range(len(fit)), *range(n_fa, n_fa + n_dev)])  # originals only
    gallery = fit + dev
    x_tests, start = {}, n_fa + n_dev
    for name, recs in tests.items():
        x_tests[name] = x_all.take(range(start, start + len(recs)))
        start += len(recs)
    metrics, preds, proj, fits, reps = [], [], [], [], {}
    for v in variants:
        rep = train_fn(fit_aug, x_fit, v, rc, seed=seed)
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
                   pd.concat(proj, ignore_index=True), pd.DataFrame(fits), reps)


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
