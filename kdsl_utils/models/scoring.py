"""Classification by label scoring, and free generation with label parsing (DESIGN.md, point 2).

Label scoring
-------------
For a record with prompt ``x`` and candidates ``y_1..y_K``, each candidate is scored by the
log-likelihood of its answer tokens *and the end-of-turn token* after the prompt::

    s_k = log p(y_k, <|im_end|> | x) = sum_j log p(t_kj | x, t_k<j)

Including ``<|im_end|>`` makes ``s_k`` the probability that the model answers exactly
``y_k`` and stops, so a label that is a prefix of another is not favoured, and
``softmax(s)`` over the candidates is the model's own distribution renormalised to the valid
answers (calibrated as the model is). That is the default, ``length_norm="sum"``.
``"mean"`` divides by the token count (a per-token geometric mean) before the softmax: a
common zero-shot heuristic against the bias towards short labels, at the price of a
distribution that is no longer a renormalised model probability. Both are available
(``ModelCfg.length_norm``) and the choice is a reported setting.

Prefix reuse: the prompt (images included) is run once with ``use_cache=True``; the KV cache
is expanded to the K candidates and the candidate continuations run as one right-padded
batch against it, with Qwen2-VL's M-RoPE positions continued explicitly (text positions
after the prompt's largest position, ``rope_delta`` included). :func:`score_candidates_naive`
scores every candidate with its own full-sequence forward through the model's standard
path; the tests assert both agree. Sum scoring's argmax is exactly what decoding
constrained to the candidates finds with an exhaustive beam (``num_beams >= K``,
``length_penalty=0``); a test checks that too.

Generation
----------
:func:`generate_labels` decodes greedily (optionally constrained to the candidates by a
token trie) and parses the text: exact match first, then a normalised match (NFKC width
folding, whitespace, quotes, wrapping brackets, a trailing full stop, a ``标签:`` style
prefix). The share of unparseable outputs is reported; for a Predictions matrix such
records get a uniform distribution over their candidates.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.labels import ALL_LABELS, LABEL_INDEX
from ..data.records import Record
from .base import Predictions
from .sft import PLAN_FEATURES, RecordEncoder, SFTCollator, plan_dataset

LENGTH_NORMS = ("sum", "mean")


# --------------------------------------------------------------------------- model plumbing
def _device(model) -> torch.device:
    return next(model.parameters()).device


def core_model(model):
    """The Qwen2VLModel inside a (possibly peft-wrapped) Qwen2VLForConditionalGeneration."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    return m.model


def prefix_positions(
    model,
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    mm_token_type_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids (3, B, P) of unpadded prompts and the rope delta (B, 1) with which
    text positions continue after them (position of token ``P + j`` is ``P + j + delta``)."""
    B, P = input_ids.shape
    if image_grid_thw is not None and int(mm_token_type_ids.sum()) > 0:
        pos, delta = core_model(model).get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            attention_mask=torch.ones_like(input_ids),
        )
        return pos, delta.to(input_ids.device).view(B, 1)
    pos = torch.arange(P, device=input_ids.device).view(1, 1, P).expand(3, B, P)
    return pos, torch.zeros(B, 1, dtype=torch.long, device=input_ids.device)


def _prefix_inputs(encoded: dict[str, Any], encoder: RecordEncoder, device) -> dict[str, Any]:
    ids = encoded["input_ids"][: encoded["prompt_len"]].unsqueeze(0).to(device)
    out = {"input_ids": ids, "mm_token_type_ids": encoder.mm_token_type_ids(ids)}
    if encoded.get("pixel_values") is not None:
        out["pixel_values"] = encoded["pixel_values"].to(device)
        out["image_grid_thw"] = encoded["image_grid_thw"].to(device)
    return out


@torch.no_grad()
def score_candidates(
    model, prefix: dict[str, Any], cand_ids: Sequence[Sequence[int]], *, pad_id: int = 0
) -> list[torch.Tensor]:
    """Per-token log-probs (float32, CPU) of each candidate continuation after one prompt.

    ``prefix`` holds ``input_ids`` (1, P) and optionally ``pixel_values``, ``image_grid_thw``,
    ``mm_token_type_ids``. One forward over the prompt (cache kept), one batched forward of
    all continuations against the expanded cache.
    """
    dev = _device(model)
    ids = prefix["input_ids"].to(dev)
    P = ids.shape[1]
    grid = prefix.get("image_grid_thw")
    mm = prefix.get("mm_token_type_ids")
    mm = torch.zeros_like(ids) if mm is None else mm.to(dev)
    pos, delta = prefix_positions(model, ids, grid, mm)
    kw: dict[str, Any] = {}
    if prefix.get("pixel_values") is not None:
        kw = {"pixel_values": prefix["pixel_values"].to(dev), "image_grid_thw": grid.to(dev)}
    out = model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        position_ids=pos,
        mm_token_type_ids=mm,
        use_cache=True,
        logits_to_keep=1,
        **kw,
    )
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    K, Lmax = len(cand_ids), max(len(c) for c in cand_ids)
    if min(len(c) for c in cand_ids) < 1:
        raise ValueError("empty candidate continuation")
    rest = None
    if Lmax > 1:
        cache = out.past_key_values
        cache.batch_repeat_interleave(K)
        L = Lmax - 1
        cont = torch.full((K, L), pad_id, dtype=torch.long, device=dev)
        cmask = torch.zeros((K, L), dtype=torch.long, device=dev)
        for k, c in enumerate(cand_ids):
            n = len(c) - 1
            if n:
                cont[k, :n] = torch.tensor(list(c[:-1]), device=dev)
                cmask[k, :n] = 1
        attn = torch.cat([torch.ones((K, P), dtype=torch.long, device=dev), cmask], dim=1)
        cpos = (P + torch.arange(L, device=dev)).view(1, 1, L) + delta.view(1, 1, 1)
        out2 = model(
            input_ids=cont,
            attention_mask=attn,
            position_ids=cpos.expand(3, K, L),
            past_key_values=cache,
            use_cache=True,
        )
        rest = torch.log_softmax(out2.logits.float(), dim=-1)
    scores = []
    for k, c in enumerate(cand_ids):
        lp = [first[c[0]]]
        for j in range(1, len(c)):
            lp.append(rest[k, j - 1, c[j]])
        scores.append(torch.stack(lp).cpu())
    return scores


@torch.no_grad()
def score_candidates_naive(
    model, prefix: dict[str, Any], cand_ids: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Reference: one full-sequence forward per candidate, positions left to the model."""
    dev = _device(model)
    ids = prefix["input_ids"].to(dev)
    P = ids.shape[1]
    mm0 = prefix.get("mm_token_type_ids")
    mm0 = torch.zeros_like(ids) if mm0 is None else mm0.to(dev)
    scores = []
    for c in cand_ids:
        c_t = torch.tensor([list(c)], device=dev)
        full = torch.cat([ids, c_t], dim=1)
        mm = torch.cat([mm0, torch.zeros_like(c_t)], dim=1)
        kw: dict[str, Any] = {}
        if prefix.get("pixel_values") is not None:
            kw = {
                "pixel_values": prefix["pixel_values"].to(dev),
                "image_grid_thw": prefix["image_grid_thw"].to(dev),
            }
        out = model(
            input_ids=full,
            attention_mask=torch.ones_like(full),
            mm_token_type_ids=mm,
            use_cache=False,
            **kw,
        )
        lp = torch.log_softmax(out.logits[0, P - 1 : P - 1 + len(c)].float(), dim=-1)
        scores.append(lp.gather(1, c_t[0].unsqueeze(1)).squeeze(1).cpu())
    return scores


def normalise_scores(token_logps: Sequence[torch.Tensor], length_norm: str = "sum") -> np.ndarray:
    if length_norm not in LENGTH_NORMS:
        raise ValueError(f"length_norm must be one of {LENGTH_NORMS}, got {length_norm!r}")
    s = [float(t.sum()) for t in token_logps]
    if length_norm == "mean":
        s = [v / len(t) for v, t in zip(s, token_logps)]
    return np.asarray(s, dtype=np.float64)


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()


@dataclass
class ScoreResult:
    predictions: Predictions
    candidates: list[tuple[str, ...]]
    scores: list[np.ndarray]  # normalised score per candidate (before softmax)
    token_logps: list[list[torch.Tensor]]
    truncation: dict[str, Any]
    length_norm: str
    wall_s: float


def _fill_row(candidates: Sequence[str], p: np.ndarray) -> np.ndarray:
    row = np.zeros(len(ALL_LABELS), dtype=np.float64)
    for lab, v in zip(candidates, p):
        row[LABEL_INDEX[lab]] += v
    return row


def encoded_prompts(ds: datasets.Dataset, encoder: RecordEncoder) -> datasets.Dataset:
    """The prompts of a :func:`~.sft.plan_dataset` table as model inputs, encoded lazily per
    row (``with_transform``; no answer appended): what scoring and generation read."""
    return ds.with_transform(encoder.encode_rows, columns=["id", *PLAN_FEATURES])


def score_records(
    model,
    encoder: RecordEncoder,
    records: Sequence[Record],
    *,
    length_norm: str = "sum",
    progress: bool = False,
) -> ScoreResult:
    """Probability over each record's candidates by label scoring → :class:`Predictions`."""
    t0 = time.perf_counter()
    if length_norm not in LENGTH_NORMS:
        raise ValueError(f"length_norm must be one of {LENGTH_NORMS}, got {length_norm!r}")
    model.eval()
    dev = _device(model)
    ds, report = plan_dataset(records, encoder)
    encoded = encoded_prompts(ds, encoder)
    rows, all_scores, all_lps, cands = [], [], [], []
    it = range(len(ds))
    if progress:
        it = tqdm(it, total=len(ds), desc="label scoring")
    for i in it:
        candidates = tuple(ds[i]["candidates"])
        cand_ids = [encoder.label_ids(c) for c in candidates]
        lps = score_candidates(
            model, _prefix_inputs(encoded[i], encoder, dev), cand_ids, pad_id=encoder.pad_id
        )
        s = normalise_scores(lps, length_norm)
        rows.append(_fill_row(candidates, softmax(s)))
        all_scores.append(s)
        all_lps.append(lps)
        cands.append(candidates)
    proba = np.vstack(rows) if rows else np.zeros((0, len(ALL_LABELS)))
    preds = Predictions.for_records(records, proba)
    return ScoreResult(
        predictions=preds,
        candidates=cands,
        scores=all_scores,
        token_logps=all_lps,
        truncation=report.as_dict(),
        length_norm=length_norm,
        wall_s=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- parsing
_QUOTES = "\"'`“”‘’「」『』〝〞"
_WRAPS = [("【", "】"), ("[", "]"), ("《", "》"), ("<", ">"), ("(", ")"), ("〈", "〉"), ("{", "}")]
_PREFIX = re.compile(
    r"^(?:分类标签|分类结果|意图分类标签|意图标签|图片分类结果|标签|答案|分类|结果|意图)"
    r"\s*(?:为|是)?\s*[:：]?\s*"
)


def fold(s: str) -> str:
    """Width- and compatibility-folded form (NFKC: full-width brackets → ASCII), no spaces."""
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", s))


def _variants(text: str):
    """``text`` folded, then peeled layer by layer: a ``标签:`` prefix, quotes, trailing stops,
    one wrapping bracket pair (checked after every step, so a label's own brackets survive)."""
    s = fold(text)
    yield s
    for _ in range(6):
        prev = s
        s = _PREFIX.sub("", s)
        s = s.strip(_QUOTES).rstrip("。.，,;；!！")
        yield s
        for a, b in _WRAPS:
            if len(s) >= 2 and s.startswith(a) and s.endswith(b):
                s = s[1:-1]
                break
        yield s
        if s == prev:
            break


def parse_label(text: str, candidates: Sequence[str]) -> tuple[str | None, str]:
    """(label, how): how is ``exact`` (after strip), ``normalised`` or ``unparseable``."""
    t = text.strip()
    if t in candidates:
        return t, "exact"
    folded: dict[str, list[str]] = {}
    for c in candidates:
        folded.setdefault(fold(c), []).append(c)
    for v in _variants(t):
        hit = folded.get(v)
        if hit and len(hit) == 1:
            return hit[0], "normalised"
    return None, "unparseable"


@dataclass
class GenerationResult:
    ids: list[str]
    tasks: list[str]
    candidates: list[tuple[str, ...]]
    texts: list[str]
    gold: list[str | None]  # the records' gold labels (None: unlabelled)
    labels: list[str | None]
    how: list[str]
    wall_s: float = 0.0
    new_tokens: int = 0
    truncation: dict[str, Any] = field(default_factory=dict)
    seq_scores: list[float] | None = None  # sequence log-prob per output (return_scores=True)
    n_tokens: list[int] = field(default_factory=list)  # generated tokens per output, end token excluded
    stopped: list[bool] = field(default_factory=list)  # the output ended with an end token

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(self.how)
        return {k: c.get(k, 0) for k in ("exact", "normalised", "unparseable")}

    @property
    def unparseable_rate(self) -> float:
        return self.counts["unparseable"] / len(self.how) if self.how else 0.0

    def to_predictions(self) -> Predictions:
        """One-hot on the parsed label; unparseable → uniform over the record's candidates."""
        rows = []
        for cands, lab in zip(self.candidates, self.labels):
            p = np.zeros(len(cands))
            if lab is None:
                p[:] = 1.0 / len(cands)
            else:
                p[cands.index(lab)] = 1.0
            rows.append(_fill_row(cands, p))
        proba = np.vstack(rows) if rows else np.zeros((0, len(ALL_LABELS)))
        return Predictions(ids=list(self.ids), tasks=list(self.tasks), proba=proba,
                           gold=list(self.gold))


# --------------------------------------------------------------------------- generation
class CandidateTrie:
    """Allowed next tokens given the tokens generated so far, for a set of token sequences."""

    def __init__(self, sequences: Sequence[Sequence[int]], eos_id: int):
        self.root: dict[int, dict] = {}
        self.eos_id = eos_id
        for seq in sequences:
            node = self.root
            for t in seq:
                node = node.setdefault(int(t), {})

    def allowed(self, generated: Sequence[int]) -> list[int]:
        node = self.root
        for t in generated:
            if int(t) not in node:
                return [self.eos_id]  # off the trie (cannot happen under the constraint)
            node = node[int(t)]
        return list(node) or [self.eos_id]


@torch.no_grad()
def generate_labels(
    model,
    encoder: RecordEncoder,
    records: Sequence[Record],
    *,
    constrained: bool = False,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    batch_size: int = 4,
    return_scores: bool = False,
) -> GenerationResult:
    """Greedy (or beam) generation of each record's answer, parsed into a label.

    ``constrained=True`` restricts decoding to the candidate labels (+ ``<|im_end|>``) through
    ``prefix_allowed_tokens_fn``; it runs one record per call. With ``return_scores`` the
    sequence log-prob of each output is kept in ``result.seq_scores`` (beam search's
    ``sequences_scores`` with ``length_penalty=0``, or the summed greedy token log-probs).
    """
    t0 = time.perf_counter()
    model.eval()
    dev = _device(model)
    ds, report = plan_dataset(records, encoder)
    encoded = encoded_prompts(ds, encoder)
    n_prompt = ds["plan_n_tokens"]
    eos = [encoder.im_end_id]
    if encoder.tokenizer.convert_tokens_to_ids("<|endoftext|>") is not None:
        eos.append(encoder.tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    if max_new_tokens is None:
        max_new_tokens = max(len(encoder.label_ids(c)) for r in records for c in r.candidates) + 2
    collate = SFTCollator(encoder, padding_side="left")
    texts: list[str] = [""] * len(records)
    n_tokens: list[int] = [0] * len(records)
    stopped: list[bool] = [False] * len(records)
    seq_scores: list[float] = [float("nan")] * len(records)
    counter = Counter()
    common = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "num_beams": num_beams,
        "eos_token_id": eos,
        "pad_token_id": encoder.pad_id,
        "use_cache": True,
    }
    if num_beams > 1:
        common.update(length_penalty=0.0, early_stopping=True, num_return_sequences=1)

    def run(idx: list[int], **extra):
        feats = [encoded[i] for i in idx]
        batch = collate(feats)
        batch.pop("labels")
        batch = {k: v.to(dev) for k, v in batch.items()}
        out = model.generate(
            **batch,
            **common,
            output_scores=return_scores,
            output_logits=return_scores and num_beams == 1,
            return_dict_in_generate=True,
            **extra,
        )
        P = batch["input_ids"].shape[1]
        new = out.sequences[:, P:]
        if return_scores:
            if num_beams > 1:
                sc = out.sequences_scores.float().cpu().tolist()
            else:
                # raw (unconstrained) logits: the model's own log-prob of each chosen token
                logits = torch.stack(out.logits, dim=1).float()
                tr = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
                is_eos = torch.isin(new, torch.tensor(eos, device=new.device))
                # keep tokens up to and including the first end token
                keep = (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0
                sc = (tr.float().masked_fill(~keep, 0.0)).sum(dim=1).cpu().tolist()
        for j, i in enumerate(idx):
            toks = new[j].tolist()
            end = next((k + 1 for k, t in enumerate(toks) if t in eos), len(toks))
            counter["new_tokens"] += end
            stopped[i] = end <= len(toks) and any(t in eos for t in toks[:end])
            n_tokens[i] = end - int(stopped[i])
            texts[i] = encoder.tokenizer.decode(toks, skip_special_tokens=True)
            if return_scores:
                seq_scores[i] = sc[j]

    if constrained:
        for i, rec in enumerate(records):
            trie = CandidateTrie([encoder.label_ids(c) for c in rec.candidates], encoder.im_end_id)
            P = n_prompt[i]

            def allowed(_batch_id: int, sent: torch.Tensor, trie=trie, P=P) -> list[int]:
                return trie.allowed(sent[P:].tolist())

            run([i], prefix_allowed_tokens_fn=allowed)
    else:
        for s in range(0, len(records), batch_size):
            run(list(range(s, min(s + batch_size, len(records)))))
    parsed = [parse_label(t, r.candidates) for t, r in zip(texts, records)]
    labels, how = [p[0] for p in parsed], [p[1] for p in parsed]
    res = GenerationResult(
        ids=[r.id for r in records],
        tasks=[r.task for r in records],
        candidates=[tuple(r.candidates) for r in records],
        texts=texts,
        gold=[r.label for r in records],
        labels=list(labels),
        how=list(how),
        wall_s=time.perf_counter() - t0,
        new_tokens=counter["new_tokens"],
        truncation=report.as_dict(),
        seq_scores=seq_scores if return_scores else None,
        n_tokens=n_tokens,
        stopped=stopped,
    )
    return res
