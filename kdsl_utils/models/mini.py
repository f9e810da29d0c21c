"""The ``mini`` backend: frozen pretrained features + a small shared model trained on CPU.

(Component choice: see "Why these components" below; measurements: ``benchmarks/README.md``.)

Architecture
------------
Frozen, cached extractors (:mod:`kdsl_utils.features`) turn a record into

- ``ocr``: the OCR text of its image(s) (RapidOCR PP-OCRv6); for an intent record the
  images the customer sent are used only where ``MiniCfg.intent_images`` (see below);
- ``dialog``: the customer's turns (``Record.user_text``; ``<image>`` and video/card blobs
  replaced by marker characters) and, separately, the last customer turn;
- ``image``: the mean EfficientNet-Lite0 embedding of its images (zero if none) plus a few
  layout numbers per image (aspect ratio, number of text lines, text area, ...);
- ``e5``: the multilingual-e5-small embedding of the dialogue's customer text (where
  ``MiniCfg.text_encoder``).

A *featurizer* fitted without labels on every training record of both tasks (so the input
space is the same for every task mix) maps these to character n-gram TF-IDF blocks (sparse)
and standardised dense blocks. On top sits the trainable model — the part that is
"fine-tuned" per task mix::

    x ─► EmbeddingBag(sparse n-grams) + Linear(dense) ─► GELU ─► dropout      (trunk,
      ─► Linear(hidden, hidden) ─► GELU ─► dropout                           shared)
      ─► head: Linear(hidden, 48), logits outside the record's candidates set to -inf

The trunk is **shared** by the two tasks (its first layer reads blocks that are mostly
task-specific, its second layer is fully shared); the head rows of one task's labels only receive
gradient from that task's records (candidate masking), so the head is in effect per task.
Image-only, intent-only and joint runs use identical hyper-parameters (``MiniCfg``), the
same featurizer and, for the same seed, the same initial weights, which is what the
interference analysis (:meth:`MiniBackend.update_delta`, the trunk's update split by input
block, and :meth:`MiniBackend.update_inputs`, which tasks reach each block, for
:mod:`kdsl_utils.interference`) needs. ``fit`` trains ``MiniCfg.epochs`` epochs or, given
``steps``, exactly that many optimizer steps (the seesaw's step-matched control). Training
is full-precision AdamW with seeded mini-batches; on CPU it is bit-for-bit deterministic
for a given seed and thread count.

Why these components
--------------------
OCR + EfficientNet + layout for images, n-grams + e5 for dialogues, and a dialogue's images
not used: chosen by 4-fold cross-validation on real training data. The measurements (cost
per item, each feature block's contribution, the CV choice, the result on test1 and the
ablations) are tables in ``benchmarks/README.md``, written there by
``benchmarks/mini_components.py --readme``.
"""

from __future__ import annotations

import copy
import json
import pickle
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from torch import nn

from ..config import MiniCfg, Profile
from ..data.labels import ALL_LABELS, LABEL_INDEX, TASKS
from ..data.records import Record
from ..features import (E5Embedder, EfficientNetEmbedder, FeatureCache, embed_images,
                        embed_texts, ocr_images, ocr_text)
from ..standardise import apply_stats, fit_stats
from ..threads import torch_threads
from .base import FitLog, Predictions, select_mix

N_LAYOUT = 6
_BLOB = re.compile(r"\{[^{}]*\}")


# ------------------------------------------------------------------------ raw inputs


def clean_dialog(text: str) -> str:
    """Dialogue text for n-grams: inline images -> '▣', links -> '◎', JSON cards -> '▶'."""
    text = _BLOB.sub("▶", text)
    return text.replace("<image>", "▣").replace("<http>", "◎").strip()


def layout_features(res: dict | None) -> np.ndarray:
    """Per-image numbers from the OCR result: log aspect (h/w), log1p(lines), text area,
    vertical centre and spread of the text, mean confidence."""
    v = np.zeros(N_LAYOUT, dtype=np.float32)
    if not res:
        return v
    v[0] = np.log(max(res["h"], 1) / max(res["w"], 1))
    lines = res["lines"]
    v[1] = np.log1p(len(lines))
    if lines:
        b = np.asarray([ln["box"] for ln in lines], dtype=np.float32)
        v[2] = float(np.clip(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum(), 0, 1))
        yc = (b[:, 1] + b[:, 3]) / 2
        v[3], v[4] = float(yc.mean()), float(yc.std())
        v[5] = float(np.mean([ln["score"] for ln in lines]))
    return v


@dataclass
class RawInputs:
    """What the frozen extractors give for a list of records (aligned lists / arrays)."""

    ocr: list[str]
    dialog: list[str]
    last_turn: list[str]
    image: np.ndarray  # (n, 1280) mean image embedding, zeros where disabled / no image
    layout: np.ndarray  # (n, N_LAYOUT + 1) mean layout numbers + log1p(n_images)
    e5_dialog: np.ndarray | None  # (n, 384) e5 embedding of the dialogue text


def extract_inputs(records: Sequence[Record], mcfg: MiniCfg, cache: FeatureCache, *,
                   progress: bool = True) -> RawInputs:
    """Run (or read from the cache) the frozen extractors that ``mcfg`` switches on.

    Images of intent records are used only where ``mcfg.intent_images``.
    """
    n = len(records)
    imgs = [r.images if (r.task != "intent" or mcfg.intent_images) else () for r in records]
    paths = [p for im in imgs for p in im]
    ocr_res: dict = {}
    if mcfg.ocr and paths:
        ocr_res = ocr_images(paths, cache, workers=mcfg.workers, progress=progress)
    img = np.zeros((n, EfficientNetEmbedder.dim), dtype=np.float32)
    if mcfg.image_encoder and paths:
        emb = embed_images(paths, cache, extractor=EfficientNetEmbedder(), progress=progress)
        k = 0
        for i, im in enumerate(imgs):
            if im:
                img[i] = emb[k:k + len(im)].mean(axis=0)
            k += len(im)
    layout = np.zeros((n, N_LAYOUT + 1), dtype=np.float32)
    ocr_txt = []
    for i, im in enumerate(imgs):
        res = [ocr_res.get(p) for p in im]
        if res:
            layout[i, :N_LAYOUT] = np.mean([layout_features(x) for x in res], axis=0)
        layout[i, N_LAYOUT] = np.log1p(len(im))
        ocr_txt.append("\n".join(ocr_text(x) for x in res if x))
    dialog = [clean_dialog(r.user_text) for r in records]
    last = [clean_dialog(r.last_user_turn) for r in records]
    e5_d = None
    if mcfg.text_encoder:
        e5_d = embed_texts(dialog, cache, extractor=E5Embedder(), progress=progress)
        e5_d[[not t.strip() for t in dialog]] = 0.0  # no dialogue: no embedding
    return RawInputs(ocr_txt, dialog, last, img, layout, e5_d)


# ---------------------------------------------------------------------------- featurizer


class Featurizer:
    """Unsupervised, fitted once on all training records: TF-IDF vocabularies and the
    standardisation of dense blocks. Output: a CSR matrix of n-gram weights and a dense
    matrix, each block scaled to unit mean row norm."""

    def __init__(self, ngram=(1, 3), min_df: int = 2, max_features: int = 40000):
        self.ngram, self.min_df, self.max_features = ngram, min_df, max_features
        self.vec: dict = {}
        self.dense_stats: dict = {}

    def _vectorizer(self):
        return TfidfVectorizer(analyzer="char_wb", ngram_range=self.ngram, min_df=self.min_df,
                               max_features=self.max_features, sublinear_tf=True, lowercase=True)

    @staticmethod
    def _text_blocks(raw: RawInputs) -> dict[str, list[str]]:
        return {"ocr": raw.ocr, "dialog": raw.dialog, "last": raw.last_turn}

    @staticmethod
    def _dense_blocks(raw: RawInputs) -> dict[str, np.ndarray]:
        out = {"image": raw.image, "layout": raw.layout}
        if raw.e5_dialog is not None:
            out["e5_dialog"] = raw.e5_dialog
        return out

    def fit(self, raw: RawInputs) -> Featurizer:
        for name, texts in self._text_blocks(raw).items():
            if any(t.strip() for t in texts):
                v = self._vectorizer()
                try:
                    v.fit(texts)
                except ValueError:  # too few documents for min_df: keep every n-gram
                    v.set_params(min_df=1)
                    v.fit(texts)
                self.vec[name] = v
        for name, x in self._dense_blocks(raw).items():
            stats = fit_stats(x)  # None: no training row has this input (block left out)
            if stats is not None:
                self.dense_stats[name] = stats
        return self

    def block_slices(self) -> tuple[dict[str, slice], dict[str, slice]]:
        """Where each fitted block lies in :meth:`transform`'s output: (n-gram blocks ->
        column range of the CSR matrix, dense blocks -> column range of the dense array)."""
        sparse_cols, i = {}, 0
        for name, v in self.vec.items():
            sparse_cols[name] = slice(i, i + len(v.vocabulary_))
            i += len(v.vocabulary_)
        dense_cols, j = {}, 0
        for name, (mu, _, _) in self.dense_stats.items():
            dense_cols[name] = slice(j, j + len(mu))
            j += len(mu)
        return sparse_cols, dense_cols

    @property
    def n_sparse(self) -> int:
        return sum(len(v.vocabulary_) for v in self.vec.values())

    @property
    def n_dense(self) -> int:
        return sum(len(mu) for mu, _, _ in self.dense_stats.values())

    def blocks(self, raw: RawInputs) -> dict:
        """Each fitted block by name: sparse TF-IDF (CSR) or scaled dense array."""
        out: dict = {}
        texts = self._text_blocks(raw)
        for name, v in self.vec.items():
            out[name] = v.transform(texts[name]).astype(np.float32).tocsr()
        dense = self._dense_blocks(raw)
        for name, stats in self.dense_stats.items():
            out[name] = apply_stats(dense[name], stats)
        return out

    def transform(self, raw: RawInputs):
        """(CSR of all n-gram blocks, dense array of all dense blocks)."""
        n = len(raw.ocr)
        b = self.blocks(raw)
        mats = [b[k] for k in self.vec]
        xs = sp.hstack(mats, format="csr", dtype=np.float32) if mats else sp.csr_matrix((n, 0))
        cols = [b[k] for k in self.dense_stats]
        xd = np.concatenate(cols, axis=1) if cols else np.zeros((n, 0), np.float32)
        return xs.tocsr(), xd


# ------------------------------------------------------------------------------ the model


class SharedMLP(nn.Module):
    """trunk (shared by both tasks) -> 48-way head masked to the candidates.

    Inputs: ``idx``/``offsets``/``weights`` (an EmbeddingBag view of the CSR n-gram rows),
    ``dense`` (B, n_dense), ``mask`` (B, 48) bool; output: logits (B, 48), ``-inf`` off the
    candidates."""

    def __init__(self, n_sparse: int, n_dense: int, hidden: int, dropout: float):
        super().__init__()
        self.n_sparse = n_sparse
        self.sparse = nn.EmbeddingBag(max(n_sparse, 1), hidden, mode="sum")
        nn.init.normal_(self.sparse.weight, std=0.05)
        self.dense = nn.Linear(max(n_dense, 1), hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, len(ALL_LABELS))

    def forward(self, idx, offsets, weights, dense, mask):
        h = self.dense(dense)
        if self.n_sparse:
            h = h + self.sparse(idx, offsets, per_sample_weights=weights)
        h = self.drop(self.act(h))
        h = self.drop(self.act(self.mid(h)))
        logits = self.head(h)
        return logits.masked_fill(~mask, float("-inf"))


def _build_model(n_sparse: int, n_dense: int, hidden: int, dropout: float) -> SharedMLP:
    return SharedMLP(n_sparse, n_dense, hidden, dropout)


SHARED_PREFIXES = ("sparse.", "dense.", "mid.")  # the trunk, trained by both tasks


def _batch(xs, xd: np.ndarray, mask: np.ndarray, rows: np.ndarray):
    sub = xs[rows]
    idx = torch.from_numpy(sub.indices.astype(np.int64))
    off = torch.from_numpy(sub.indptr[:-1].astype(np.int64))
    w = torch.from_numpy(sub.data.astype(np.float32))
    d = torch.from_numpy(xd[rows]) if xd.shape[1] else torch.zeros((len(rows), 1))
    return idx, off, w, d, torch.from_numpy(mask[rows])


def block_inputs(featurizer: Featurizer, xs, xd: np.ndarray,
                 tasks: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Which tasks' records reach each input block of the trunk (keys as
    :func:`split_by_input_block`): a task reaches a block when one of its records has a
    non-zero input there. ``xs``/``xd``: :meth:`Featurizer.transform` of the records,
    ``tasks``: their tasks. The trunk's other parameters (biases, ``mid``) are reached by
    every task present."""
    tk = np.asarray(tasks)
    present = tuple(t for t in TASKS if (tk == t).any())
    sparse_cols, dense_cols = featurizer.block_slices()
    out: dict[str, tuple[str, ...]] = {}
    if not sparse_cols:
        out["sparse.weight"] = ()  # placeholder row, never read (n_sparse = 0)
    for name, cols in sparse_cols.items():
        reached = []
        for t in present:
            sub = xs[tk == t]
            if np.any((sub.indices >= cols.start) & (sub.indices < cols.stop) & (sub.data != 0)):
                reached.append(t)
        out[f"sparse.weight[{name}]"] = tuple(reached)
    if not dense_cols:
        out["dense.weight"] = ()  # one all-zero input column (n_dense = 0)
    for name, cols in dense_cols.items():
        out[f"dense.weight[{name}]"] = tuple(t for t in present if np.any(xd[tk == t][:, cols]))
    out.update({k: present for k in ("dense.bias", "mid.weight", "mid.bias")})
    return out


def split_by_input_block(delta: dict[str, np.ndarray], featurizer: Featurizer) -> dict[str, np.ndarray]:
    """The trunk's update with its input layers split by feature block: the rows of
    ``sparse.weight`` (one per n-gram) by n-gram block (``sparse.weight[ocr]`` ...), the
    columns of ``dense.weight`` by dense block (``dense.weight[e5_dialog]`` ...); other
    parameters as they are. Views, no copies; the blocks' Gram matrices sum to the layer's."""
    sparse_cols, dense_cols = featurizer.block_slices()
    out = {}
    for k, v in delta.items():
        if k == "sparse.weight" and sparse_cols:
            out.update({f"{k}[{b}]": v[c] for b, c in sparse_cols.items()})
        elif k == "dense.weight" and dense_cols:
            out.update({f"{k}[{b}]": v[:, c] for b, c in dense_cols.items()})
        else:
            out[k] = v
    return out


def candidate_mask(records: Sequence[Record]) -> np.ndarray:
    m = np.zeros((len(records), len(ALL_LABELS)), dtype=bool)
    for i, r in enumerate(records):
        for c in r.candidates:
            m[i, LABEL_INDEX[c]] = True
    return m


class MiniBackend:
    """CPU backend of the ``mini`` profile (implements :class:`~.base.Backend`)."""

    name = "mini"

    def __init__(self, cfg: Profile, cache_dir: str | Path | None = None, *,
                 progress: bool = True, retriever: Any = None):
        self.cfg = cfg
        self.mcfg: MiniCfg = cfg.mini
        self.cache = FeatureCache(cache_dir)
        self.progress = progress
        # MiniCfg.retrieval: the neighbour-label block (representations.NeighbourVotes, built
        # by registry.make_backend: representations imports this module, not the reverse)
        if self.mcfg.retrieval and retriever is None:
            raise ValueError("mini.retrieval=True needs a retriever: build the backend with "
                             "models.registry.make_backend(cfg)")
        self.retriever = retriever if self.mcfg.retrieval else None
        self.featurizer: Featurizer | None = None
        self.model = None
        self.init_state: dict | None = None
        self.meta: dict = {}
        self._update_inputs: dict[str, tuple[str, ...]] | None = None

    # -- features
    def inputs(self, records: Sequence[Record]) -> RawInputs:
        return extract_inputs(records, self.mcfg, self.cache, progress=self.progress)

    def design(self, records: Sequence[Record]):
        """(CSR n-grams, dense array) of ``records``: the featurizer's blocks, then the
        neighbour-label block where ``MiniCfg.retrieval`` (48 columns)."""
        xs, xd = self.featurizer.transform(self.inputs(records))
        if self.retriever is not None:
            xd = np.concatenate([xd, self.retriever.block(records)], axis=1)
        return xs, xd

    @property
    def n_dense(self) -> int:
        return self.featurizer.n_dense + (self.retriever.dim if self.retriever is not None else 0)

    def fit_featurizer(self, records: Sequence[Record]) -> Featurizer:
        """Fit the (label-free) featurizer on ``records``; :meth:`fit` calls it on the full
        training list when none is fitted yet, so every mix sees the same input space."""
        self.featurizer = Featurizer().fit(self.inputs(records))
        return self.featurizer

    # -- training
    def fit(self, train: Sequence[Record], *, mix: str, seed: int,
            out_dir: Path | None = None, steps: int | None = None) -> FitLog:
        """Train the shared model on ``select_mix(train, mix)``.

        ``steps`` None: ``MiniCfg.epochs`` epochs (``epochs × ceil(n / batch_size)``
        optimizer steps, so the step count grows with the mix's size); an int: exactly that
        many optimizer steps, epoch after epoch (a fresh shuffle each), the last one cut
        where the budget ends. The loss curve has one entry per (possibly partial) epoch;
        ``FitLog.steps`` counts the steps taken and ``extra["epochs"]`` the passes over the
        data (steps / batches per epoch)."""
        if steps is not None and (not isinstance(steps, int) or steps <= 0):
            raise ValueError(f"steps must be a positive int or None, got {steps!r}")
        t0 = time.perf_counter()
        if self.featurizer is None:
            self.fit_featurizer(train)
        recs = select_mix(train, mix)
        if not recs:
            raise ValueError(f"no training records for mix {mix!r}")
        if any(r.label is None for r in recs):
            raise ValueError("training records must be labelled")
        if self.retriever is not None:  # trained on this mix's records, votes out of fold
            self.retriever.fit(recs, seed=seed)
        xs, xd = self.design(recs)
        mask = candidate_mask(recs)
        y = torch.tensor([LABEL_INDEX[r.label] for r in recs])
        t_feat = time.perf_counter() - t0
        with torch_threads(1):
            losses, taken = self._train(xs, xd, mask, y, seed, steps)
        per_epoch = -(-len(recs) // self.mcfg.batch_size)  # optimizer steps of one epoch
        self._update_inputs = block_inputs(self.featurizer, xs, xd, [r.task for r in recs])
        self.meta = {"mix": mix, "seed": seed, "n_train": len(recs),
                     "steps": taken, "epochs": taken / per_epoch,
                     "update_inputs": {k: list(v) for k, v in self._update_inputs.items()},
                     "n_by_task": {t: sum(r.task == t for r in recs) for t in TASKS},
                     "n_sparse": self.featurizer.n_sparse, "n_dense": self.featurizer.n_dense,
                     "n_params": sum(p.numel() for p in self.model.parameters())}
        log = FitLog(mix=mix, seed=seed, n_train=len(recs), wall_s=time.perf_counter() - t0,
                     losses=tuple(losses), steps=taken, extra={**self.meta, "features_s": t_feat})
        if out_dir is not None:
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "train_log.json").write_text(json.dumps(log.to_dict(), indent=1))
            self.save(out_dir / "model")
        return log

    def _train(self, xs, xd, mask, y, seed: int, steps: int | None = None) -> tuple[list[float], int]:
        """AdamW on seeded mini-batches: ``steps`` optimizer steps, or ``MiniCfg.epochs``
        full epochs when None (the same batches either way while the budgets agree, so an
        epoch run and a step run of equal length are the same run bit for bit). Returns the
        mean loss of each (possibly partial) epoch and the steps taken."""
        m = self.mcfg
        torch.manual_seed(seed)
        self.model = _build_model(self.featurizer.n_sparse, self.n_dense, m.hidden, m.dropout)
        self.init_state = copy.deepcopy(self.model.state_dict())
        opt = torch.optim.AdamW(self.model.parameters(), lr=m.learning_rate,
                                weight_decay=m.weight_decay, fused=True)
        gen = torch.Generator().manual_seed(seed)
        n, bs = len(y), m.batch_size
        budget = m.epochs * -(-n // bs) if steps is None else steps
        losses, taken = [], 0
        self.model.train()
        while taken < budget:
            perm = torch.randperm(n, generator=gen).numpy()
            tot, seen = 0.0, 0
            for j in range(0, n, bs):
                if taken == budget:  # a step budget can end mid-epoch
                    break
                rows = perm[j:j + bs]
                *xb, mb = _batch(xs, xd, mask, rows)
                loss = torch.nn.functional.cross_entropy(self.model(*xb, mb), y[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                taken += 1
                tot += loss.item() * len(rows)
                seen += len(rows)
            losses.append(tot / seen)
        self.model.eval()
        return losses, taken

    # -- prediction
    def predict_proba(self, records: Sequence[Record]) -> Predictions:
        if self.model is None or self.featurizer is None:
            raise RuntimeError("MiniBackend: fit() or load() first")
        records = list(records)
        xs, xd = self.design(records)
        mask = candidate_mask(records)
        out = np.zeros((len(records), len(ALL_LABELS)), dtype=np.float64)
        with torch.inference_mode(), torch_threads(1):
            for j in range(0, len(records), 256):
                rows = np.arange(j, min(j + 256, len(records)))
                *xb, mb = _batch(xs, xd, mask, rows)
                p = torch.softmax(self.model(*xb, mb).double(), dim=1)
                out[rows] = p.numpy()
        return Predictions.for_records(records, out)

    # -- persistence
    def save(self, path: str | Path) -> None:
        """A directory: ``model.pt`` (state dicts), ``featurizer.pkl``, ``meta.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"state": self.model.state_dict(), "init": self.init_state},
                   path / "model.pt")
        with open(path / "featurizer.pkl", "wb") as fh:
            pickle.dump(self.featurizer, fh)
        if self.retriever is not None:
            with open(path / "retriever.pkl", "wb") as fh:
                pickle.dump(self.retriever, fh)
        (path / "meta.json").write_text(json.dumps(
            {**self.meta, "mini_cfg": self.cfg.to_dict()["mini"]}, indent=1, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path, cfg: Profile, cache_dir: str | Path | None = None, *,
             progress: bool = True) -> MiniBackend:
        path = Path(path)
        retriever = None
        if cfg.mini.retrieval:
            with open(path / "retriever.pkl", "rb") as fh:
                retriever = pickle.load(fh)
        self = cls(cfg, cache_dir, progress=progress, retriever=retriever)
        meta = json.loads((path / "meta.json").read_text())
        saved = meta.pop("mini_cfg", None)
        if saved is not None and saved != cfg.to_dict()["mini"]:
            diff = {k: (saved.get(k), v) for k, v in cfg.to_dict()["mini"].items()
                    if saved.get(k) != v}
            raise ValueError(f"{path}: saved with other MiniCfg settings (saved, given): {diff}")
        with open(path / "featurizer.pkl", "rb") as fh:
            self.featurizer = pickle.load(fh)
        blob = torch.load(path / "model.pt", weights_only=True)
        self.model = _build_model(self.featurizer.n_sparse, self.n_dense,
                                  self.mcfg.hidden, self.mcfg.dropout)
        self.model.load_state_dict(blob["state"])
        self.model.eval()
        self.init_state = blob["init"]
        self.meta = meta
        if "update_inputs" in meta:
            self._update_inputs = {k: tuple(v) for k, v in meta["update_inputs"].items()}
        return self

    # -- interference analysis
    def shared_parameters(self, initial: bool = False) -> dict[str, np.ndarray]:
        """The trunk's parameters (trained by both tasks), now or at initialisation."""
        state = self.init_state if initial else self.model.state_dict()
        return {k: v.detach().cpu().numpy().copy() for k, v in state.items()
                if k.startswith(SHARED_PREFIXES)}

    def update_delta(self) -> dict[str, np.ndarray]:
        """``Backend.update_delta``: the shared parameters' change during ``fit``, the input
        layers split by feature block (:func:`split_by_input_block`)."""
        return split_by_input_block(shared_parameter_delta(self), self.featurizer)

    def update_inputs(self) -> dict[str, tuple[str, ...]]:
        """``Backend.update_inputs``: the tasks whose records of the last ``fit`` reach each
        block of :meth:`update_delta` (:func:`block_inputs`; measured, not assumed). Only a
        joint fit sees both tasks; a single-task fit reports its own task everywhere."""
        if self._update_inputs is None:
            raise RuntimeError("MiniBackend: fit() or load() first")
        return dict(self._update_inputs)


def shared_parameter_delta(model_after: MiniBackend | dict,
                           model_init: MiniBackend | dict | None = None) -> dict[str, np.ndarray]:
    """Per-layer update ``after - init`` of the shared (trunk) parameters.

    ``model_init`` defaults to ``model_after``'s own initial weights (same seed => the same
    start for the image-only, intent-only and joint runs). Feed three of these to
    :func:`kdsl_utils.interference.interference_table`.
    """
    after = model_after.shared_parameters() if isinstance(model_after, MiniBackend) else model_after
    if model_init is None:
        if not isinstance(model_after, MiniBackend):
            raise ValueError("model_init is required when model_after is a dict")
        init = model_after.shared_parameters(initial=True)
    else:
        init = (model_init.shared_parameters(initial=True) if isinstance(model_init, MiniBackend)
                else model_init)
    return {k: after[k] - init[k] for k in after}
