"""Dynamic chain-of-thought post-training (DESIGN.md point 6; issue 14).

Fine-tuning a VLM on a teacher's chain of thought helps hard samples but makes the model
"overthink" easy ones; *dynamic CoT* gives reasoning targets only to the records plain SFT
finds hard. Three variants with identical budgets (same records, epochs, optimizer steps;
the profile's TrainCfg, ``CotCfg.epochs``):

* ``sft``: every target is the label;
* ``full_cot``: every target with an accepted rationale is ``rationale + 答案：label``;
* ``dynamic_cot``: after ``warmup_epochs`` of plain SFT, at the start of every epoch each
  record's SFT loss (mean NLL of its plain answer tokens, the model as it is then) is
  measured; records above γ (a loss quantile, :func:`select_cot`) get the CoT target, the
  rest the plain label. γ is chosen on the dev fold from ``CotCfg.gamma_grid``.

Targets go through :func:`~kdsl_utils.models.hf_train.train_sft`'s ``targets`` override
(one trainer; loss on the target tokens only, as in SFT). Target format::

    {rationale}\\n答案：{label}<|im_end|>

Inference may think: the model generates freely (``CotCfg.max_new_tokens``); the label is
parsed after the last ``答案：`` (or from the whole text when there is none: a direct
answer), and for comparison scored by label likelihood after the generated reasoning.
Tokens per answer are counted against the challenge's limit (``CotCfg.token_limit``).

Teachers (``CotCfg.teacher``): ``large``, the profile's large model zero-shot through the
generation path, given the record and its gold label; ``template``, a deterministic
rationale quoting the record's observable text (used by ``tiny``, whose random twin writes
noise). Rationales are cached by content; a rationale whose final label is not the gold
one is rejected (:func:`check_rationale`) and the rejection share reported. The ``mini``
backend has no generative student: :func:`applicable` says so and nothing is computed.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import TrainerCallback

from .config import Profile
from .data.records import Record
from .hashing import canonical_json, sha256_text
from .metrics import metric_rows
from .models.base import Predictions
from .models.qwen_vl import QwenVLBackend
from .models.registry import release
from .models.scoring import (
    _fill_row,
    _prefix_inputs,
    encoded_prompts,
    generate_labels,
    parse_label,
    score_candidates,
    normalise_scores,
    softmax,
)
from .models.sft import IGNORE_INDEX, SFTCollator, plan_dataset, sft_dataset
from .threads import torch_threads

try:  # the CPU small language model (optional extra `small-lm`; merged from its own branch)
    from .models import small_lm
except ImportError:  # pragma: no cover - depends on the installed extras / merged modules
    small_lm = None

ANSWER_MARK = "答案："
_MARKS = ("答案：", "答案:")
VARIANTS = ("sft", "full_cot", "dynamic_cot")
UNPARSEABLE = "<unparseable>"
NOT_APPLICABLE = "not applicable for mini (no generative student)"


def applicable(cfg: Profile) -> bool:
    """Dynamic CoT needs a generative student: the qwen_vl backend (paper, tiny)."""
    return cfg.backend == "qwen_vl"


# --------------------------------------------------------------------------- targets, parsing
def cot_target(rationale: str, label: str) -> str:
    """The CoT answer text: ``rationale\\n答案：label`` (the encoder appends ``<|im_end|>``)."""
    return f"{rationale.strip()}\n{ANSWER_MARK}{label}"


def split_answer(text: str) -> tuple[str, str | None]:
    """(reasoning, answer) of a generation: the text before and after the last ``答案：``
    (answer up to its first newline); no mark -> (``""``, None)."""
    cut = max((text.rfind(m), m) for m in _MARKS)
    if cut[0] < 0:
        return "", None
    pos, mark = cut
    return text[:pos].strip(), text[pos + len(mark):].strip().split("\n")[0].strip()


@dataclass(frozen=True)
class RationaleCheck:
    ok: bool
    rationale: str  # the reasoning (before the answer line, or the whole text)
    label: str | None  # the rationale's final label
    reason: str  # "ok" | "no_label" | "unparseable_answer" | "wrong_label" | "empty_rationale"
    form: str = "answer_line"  # "answer_line" (答案：...) | "last_mention" (no answer line)


def last_label_mentioned(text: str, candidates: Sequence[str]) -> str | None:
    """The candidate label whose mention ends last in ``text`` (ties: the longest, so a
    label that contains another wins), or None when no candidate is mentioned."""
    best: tuple[int, int, str] | None = None
    for c in candidates:
        pos = text.rfind(c)
        if pos >= 0:
            key = (pos + len(c), len(c), c)
            best = key if best is None or key[:2] > best[:2] else best
    return best[2] if best else None


def check_rationale(text: str, gold: str, candidates: Sequence[str]) -> RationaleCheck:
    """Accept a teacher rationale only if its final label is ``gold`` and it has some
    reasoning. The final label is the one of the last ``答案：`` line; a text without that
    line (small models often write "…因此分类结果为「X」" instead) is judged by the label it
    mentions last. Pure function."""
    reasoning, answer = split_answer(text)
    if answer is None:
        label = last_label_mentioned(text, candidates)
        if label is None:
            return RationaleCheck(False, text.strip(), None, "no_label", "last_mention")
        ok = label == gold and bool(text.strip())
        return RationaleCheck(ok, text.strip(), label, "ok" if ok else "wrong_label",
                              "last_mention")
    label, _ = parse_label(answer, candidates)
    if label is None:
        return RationaleCheck(False, reasoning, None, "unparseable_answer")
    if label != gold:
        return RationaleCheck(False, reasoning, label, "wrong_label")
    if not reasoning:
        return RationaleCheck(False, reasoning, label, "empty_rationale")
    return RationaleCheck(True, reasoning, label, "ok")


def parse_cot_answer(text: str, candidates: Sequence[str]) -> tuple[str | None, str, bool]:
    """(label, how, thought) of an inference output: after the last ``答案：`` when the model
    reasoned (``thought`` True), else the whole text (a direct answer)."""
    reasoning, answer = split_answer(text)
    if answer is None:
        label, how = parse_label(text, candidates)
        return label, how, False
    label, how = parse_label(answer, candidates)
    return label, how, True


# --------------------------------------------------------------------------- dynamic selection
@dataclass(frozen=True)
class CotChoice:
    quantile: float
    gamma: float  # the loss threshold: np.quantile(losses, quantile)
    ids: frozenset[str]  # records given the CoT target


def select_cot(losses: Mapping[str, float], quantile: float,
               eligible: Collection[str] | None = None) -> CotChoice:
    """Which records get the CoT target: SFT loss strictly above γ = the ``quantile`` of all
    the losses (``quantile`` 1 -> none, 0 -> all but the minimum), among ``eligible`` (the
    records with an accepted rationale; None = all). Pure function."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    if not losses:
        return CotChoice(quantile, float("nan"), frozenset())
    vals = np.asarray(list(losses.values()), dtype=np.float64)
    if not np.isfinite(vals).all():
        raise ValueError("non-finite SFT loss")
    gamma = float(np.quantile(vals, quantile))
    ids = frozenset(i for i, v in losses.items()
                    if v > gamma and (eligible is None or i in eligible))
    return CotChoice(quantile, gamma, ids)


# --------------------------------------------------------------------------- teachers
def teacher_instruction(record: Record, label: str) -> str:
    """The record's prompt plus the gold label and the rationale format asked of the teacher."""
    return (f"{record.instruction}\n\n已知正确答案是「{label}」。请用一两句话说明为什么是这个答案"
            f"（依据对话或图片中的内容），最后单独一行写：{ANSWER_MARK}{label}")


def template_rationale(record: Record, label: str) -> str:
    """Deterministic ``template`` teacher: quotes the record's observable text, then the label."""
    if record.task == "intent" and record.last_user_turn:
        seen = record.last_user_turn.replace("<image>", "[图片]")[:40]
        why = f"客户最后说「{seen}」，关注的是「{label}」。"
    else:
        why = f"图片中的界面内容对应「{label}」。"
    return cot_target(why, label)


def teacher_text_prompt(record: Record, label: str) -> str:
    """The text-only teacher's prompt (a language model without pixels): the record's prompt
    with each image written ``[图片]``, the gold label and the rationale format."""
    return teacher_instruction(record, label).replace("<image>", "[图片]")


def text_generator(teacher: str) -> Any:
    """The text teacher's generator, ``generate(prompt) -> str`` with an ``identity``:
    ``small_lm`` is :class:`kdsl_utils.models.small_lm.LlamaGenerator` (GGUF on CPU). Raises
    where it is not installed (never a silent substitute)."""
    if teacher != "small_lm":
        raise ValueError(f"no text generator for teacher {teacher!r}")
    if small_lm is None or not small_lm.installed():
        raise RuntimeError("teacher='small_lm' needs kdsl_utils.models.small_lm with its weights "
                           "and runtime (make small-lm); choose teacher='large' or 'template'")
    return small_lm.LlamaGenerator(max_tokens=128)


def _stamp(record: Record) -> list:
    return [record.instruction, record.label,
            [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in record.images]]


def rationale_key(record: Record, teacher_id: str) -> str:
    """Content key of a rationale: the teacher and what it reads (prompt, label, images)."""
    return sha256_text(canonical_json([teacher_id, *_stamp(record)]))


@dataclass
class Rationales:
    teacher: str
    rows: pd.DataFrame  # id, task, label, text, ok, reason, form, rationale, cached
    wall_s: float

    @property
    def targets(self) -> dict[str, str]:
        """Accepted CoT targets by record id (normalised to end in the exact gold label)."""
        ok = self.rows[self.rows.ok]
        return {r.id: cot_target(r.rationale, r.label) for r in ok.itertuples()}

    @property
    def rejected_share(self) -> float:
        """Share of the generated rationales that failed :func:`check_rationale`."""
        gen = self.rows[self.rows.reason != "not_generated"]
        return float(1.0 - gen.ok.mean()) if len(gen) else float("nan")


def _read_cache(path: Path) -> dict[str, str]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_cache(path: Path, cache: Mapping[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(cache, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def teacher_rationales(cfg: Profile, records: Sequence[Record], *, teacher: str | None = None,
                       cache_path: Path | None = None, seed: int = 0,
                       backend: QwenVLBackend | None = None, generator: Any = None) -> Rationales:
    """A rationale per record (at most ``CotCfg.teacher_sample`` records, seeded sample),
    checked against its gold label; cached by content in ``cache_path`` (a JSON file).

    Teachers: ``large`` (``backend``, default the profile's large model, through the
    generation path, images included), ``template``, or a text generator (``small_lm``, or
    any ``generator(prompt) -> str`` given with ``teacher="text"``; it should carry an
    ``identity`` string for the cache). With ``CotCfg.teacher_budget_s`` > 0 a text teacher
    stops once the budget is spent: the records it did not reach have no rationale
    (``reason`` ``not_generated``, not counted as rejected)."""
    t0 = time.perf_counter()
    teacher = teacher or cfg.cot.teacher
    recs = list(records)
    if cfg.cot.teacher_sample and len(recs) > cfg.cot.teacher_sample:
        recs = random.Random(seed).sample(recs, cfg.cot.teacher_sample)
    if teacher == "template":
        teacher_id = "template-v1"
    elif teacher == "large":
        own = backend is None  # a teacher loaded here is released here (one large model at a time)
        backend = backend or QwenVLBackend(cfg, which="large")
        teacher_id = f"large:{backend.source}:{backend._base()}:{cfg.cot.teacher_max_new_tokens}"
    elif teacher in ("small_lm", "text"):
        generator = generator if generator is not None else text_generator(teacher)
        teacher_id = f"text:{getattr(generator, 'identity', repr(generator))}"
    else:
        raise ValueError(f"unknown teacher {teacher!r}; choose large, small_lm or template")
    cache = _read_cache(cache_path) if cache_path else {}
    keys = [rationale_key(r, teacher_id) for r in recs]
    todo = [i for i, k in enumerate(keys) if k not in cache]
    cached = [k in cache for k in keys]
    if todo:
        if teacher == "template":
            texts = [template_rationale(recs[i], recs[i].label) for i in todo]
        elif teacher == "large":
            hinted = [replace(recs[i], instruction=teacher_instruction(recs[i], recs[i].label))
                      for i in todo]
            texts = backend.generate(hinted, max_new_tokens=cfg.cot.teacher_max_new_tokens).texts
            if own:
                release(backend)
        else:
            texts = []
            for i in todo:
                if cfg.cot.teacher_budget_s and time.perf_counter() - t0 > cfg.cot.teacher_budget_s:
                    break
                texts.append(generator(teacher_text_prompt(recs[i], recs[i].label)))
        for i, t in zip(todo, texts):
            cache[keys[i]] = t
        if cache_path:
            _write_cache(cache_path, cache)
    rows = []
    for r, k, c in zip(recs, keys, cached):
        if k not in cache:
            rows.append({"id": r.id, "task": r.task, "label": r.label, "text": "", "ok": False,
                         "reason": "not_generated", "form": "", "rationale": "", "cached": False})
            continue
        chk = check_rationale(cache[k], r.label, r.candidates)
        rows.append({"id": r.id, "task": r.task, "label": r.label, "text": cache[k], "ok": chk.ok,
                     "reason": chk.reason, "form": chk.form, "rationale": chk.rationale,
                     "cached": c})
    cols = ["id", "task", "label", "text", "ok", "reason", "form", "rationale", "cached"]
    return Rationales(teacher, pd.DataFrame(rows, columns=cols), time.perf_counter() - t0)


# --------------------------------------------------------------------------- per-record loss
@torch.no_grad()
def record_losses(model, encoder, records: Sequence[Record], *, batch_size: int = 4) -> dict[str, float]:
    """Per-record SFT loss: mean NLL (nats/token) of the plain answer tokens (label +
    ``<|im_end|>``) under ``model`` as it is, with the training masking. Over-limit records
    (dropped from training) are absent."""
    was_training = model.training
    model.eval()
    ds, report = sft_dataset(records, encoder)
    dropped = set(report.dropped_ids)
    ids = [r.id for r in records if r.id not in dropped]  # sft_dataset keeps record order
    collate = SFTCollator(encoder, padding_side="right")
    dev = next(model.parameters()).device
    out: dict[str, float] = {}
    for s in range(0, len(ds), batch_size):
        idx = list(range(s, min(s + batch_size, len(ds))))
        feats = [ds[i] for i in idx]
        batch = {k: v.to(dev) for k, v in collate(feats).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        tgt = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), tgt.clamp_min(0), reduction="none")
        mask = (tgt != IGNORE_INDEX).float()
        per = (nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        for j, i in enumerate(idx):
            out[ids[i]] = float(per[j])
    if was_training:
        model.train()
    return out


class DynamicCotCallback(TrainerCallback):
    """Re-decides dynamic CoT's targets at the start of every epoch after the warm-up.

    ``targets`` is the mapping handed to ``train_sft`` (read at every example access), so
    what is put in it here is what the epoch trains on. Decisions are kept in ``history``
    (and in ``log_path`` when given, so a run resumed mid-epoch reuses its epoch's choice)."""

    def __init__(self, backend: QwenVLBackend, records: Sequence[Record], cot_targets: Mapping[str, str],
                 targets: dict[str, str], *, quantile: float, warmup_epochs: int,
                 batch_size: int = 4, log_path: Path | None = None):
        self.backend, self.records = backend, list(records)  # its encoder exists once fit loads
        self.cot_targets, self.targets = dict(cot_targets), targets
        self.quantile, self.warmup = quantile, warmup_epochs
        self.batch_size, self.log_path = batch_size, log_path
        self.history: list[dict[str, Any]] = []
        if log_path is not None and Path(log_path).is_file():
            self.history = json.loads(Path(log_path).read_text(encoding="utf-8"))

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        epoch = int(math.floor((state.epoch or 0.0) + 1e-6))
        self.targets.clear()
        if epoch < self.warmup:
            return
        done = {h["epoch"]: h for h in self.history}
        if epoch in done:
            ids = done[epoch]["ids"]
        else:
            losses = record_losses(model, self.backend.encoder, self.records,
                                   batch_size=self.batch_size)
            choice = select_cot(losses, self.quantile, eligible=self.cot_targets)
            ids = sorted(choice.ids)
            self.history.append({"epoch": epoch, "quantile": self.quantile, "gamma": choice.gamma,
                                 "n": len(losses), "ids": ids, "losses": losses})
            if self.log_path is not None:
                _write_cache(Path(self.log_path), self.history)  # atomic JSON
        self.targets.update({i: self.cot_targets[i] for i in ids})


# --------------------------------------------------------------------------- training
def train_cfg(cfg: Profile) -> Profile:
    """The profile whose TrainCfg every variant shares: ``CotCfg.epochs`` epochs, no step cap."""
    return replace(cfg, train=replace(cfg.train, epochs=float(cfg.cot.epochs), max_steps=-1))


def _digest(obj: Any) -> str:
    return sha256_text(canonical_json(obj))


@dataclass
class VariantFit:
    variant: str  # sft | full_cot | dynamic_cot@q
    quantile: float | None
    backend: QwenVLBackend
    steps: int
    final_loss: float
    wall_s: float
    n_cot_targets: int  # records whose target is CoT (dynamic: in the last epoch)
    history: list[dict[str, Any]] = field(default_factory=list)


def fit_variant(cfg: Profile, records: Sequence[Record], cot_targets: Mapping[str, str], *,
                variant: str, seed: int, quantile: float | None = None,
                out_dir: Path | None = None, progress: bool = False) -> VariantFit:
    """Fine-tune one variant on ``records`` (joint mix) with the shared budget."""
    tcfg = train_cfg(cfg)
    backend = QwenVLBackend(tcfg, which="large")
    targets: dict[str, str] = {}
    callbacks: list[TrainerCallback] = []
    cb = None
    if variant == "full_cot":
        targets.update(cot_targets)
    elif variant == "dynamic_cot":
        if quantile is None:
            raise ValueError("dynamic_cot needs a quantile")
        cb = DynamicCotCallback(backend, records, cot_targets, targets, quantile=quantile,
                                warmup_epochs=cfg.cot.warmup_epochs,
                                batch_size=cfg.train.eval_batch_size,
                                log_path=None if out_dir is None else Path(out_dir) / "cot_decisions.json")
        callbacks.append(cb)
    elif variant != "sft":
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    extra = "" if variant == "sft" else _digest([variant, quantile, cfg.cot.warmup_epochs,
                                                 sorted(cot_targets.items())])
    log = backend.fit(records, mix="joint", seed=seed, out_dir=out_dir, progress=progress,
                      targets=targets, callbacks=callbacks, fingerprint_extra=extra)
    name = variant if quantile is None else f"{variant}@{quantile:g}"
    # dynamic: the last decision (also when a finished run was loaded and nothing trained)
    n_cot = len(cb.history[-1]["ids"]) if cb and cb.history else len(targets)
    return VariantFit(name, quantile, backend, log.steps, log.final_loss, log.wall_s, n_cot,
                      list(cb.history) if cb else [])


# --------------------------------------------------------------------------- inference
@dataclass
class ThinkResult:
    rows: pd.DataFrame  # id, task, gold, text, parsed, how, thought, n_tokens, stopped, fits, scored
    parsed: Predictions  # one-hot on the parsed label (unparseable: uniform)
    scored: Predictions  # label scoring after the generated reasoning
    wall_s: float


@torch.no_grad()
def think_predict(backend: QwenVLBackend, records: Sequence[Record], *, max_new_tokens: int,
                  token_limit: int) -> ThinkResult:
    """Free generation (the model may reason first), label parsed from it, and the label
    scored by likelihood after the generated reasoning (+ ``答案：``; a direct answer is
    scored right after the prompt)."""
    t0 = time.perf_counter()
    backend._ensure()
    enc, model = backend.encoder, backend.model
    with torch_threads(backend._threads):
        gen = generate_labels(model, enc, records, max_new_tokens=max_new_tokens,
                              batch_size=backend.cfg.train.eval_batch_size)
        ds, _ = plan_dataset(records, enc)
        encoded = encoded_prompts(ds, enc)
        dev = next(model.parameters()).device
        rows, proba_s, proba_p = [], [], []
        for i, r in enumerate(records):
            label, how, thought = parse_cot_answer(gen.texts[i], r.candidates)
            prefix = _prefix_inputs(encoded[i], enc, dev)
            if thought:
                reasoning, _ = split_answer(gen.texts[i])
                extra = torch.tensor([enc.tokenize(f"{reasoning}\n{ANSWER_MARK}")], device=dev)
                ids = torch.cat([prefix["input_ids"], extra], dim=1)
                prefix = {**prefix, "input_ids": ids, "mm_token_type_ids": enc.mm_token_type_ids(ids)}
            lps = score_candidates(model, prefix, [enc.label_ids(c) for c in r.candidates],
                                   pad_id=enc.pad_id)
            p = softmax(normalise_scores(lps, backend.cfg.model.length_norm))
            proba_s.append(_fill_row(r.candidates, p))
            onehot = np.full(len(r.candidates), 1.0 / len(r.candidates))
            if label is not None:
                onehot = np.eye(len(r.candidates))[list(r.candidates).index(label)]
            proba_p.append(_fill_row(r.candidates, onehot))
            rows.append({"id": r.id, "task": r.task, "gold": r.label, "text": gen.texts[i],
                         "parsed": label, "how": how, "thought": thought,
                         "n_tokens": gen.n_tokens[i], "stopped": gen.stopped[i],
                         "fits": bool(gen.stopped[i] and gen.n_tokens[i] <= token_limit),
                         "scored": r.candidates[int(np.argmax(p))]})
    return ThinkResult(pd.DataFrame(rows), Predictions.for_records(records, np.vstack(proba_p)),
                       Predictions.for_records(records, np.vstack(proba_s)),
                       time.perf_counter() - t0)


# --------------------------------------------------------------------------- the experiment
def _sample(records: Sequence[Record], n: int, seed: int) -> list[Record]:
    recs = list(records)
    if n and len(recs) > n:
        keep = set(r.id for r in random.Random(seed).sample(recs, n))
        recs = [r for r in recs if r.id in keep]
    return recs


def think_rows(res: ThinkResult, *, experiment: str, variant: str, seed: int, split: str) -> list[dict]:
    """metrics.csv rows of one variant on one split: weighted F1 etc. of the parsed and the
    scored-after-reasoning predictions, and the generation's own numbers per task."""
    df = res.rows
    ids = {"experiment": experiment, "seed": seed, "split": split}
    # an unparseable output counts as wrong: a label of its own that no record has as gold
    pred = [p if p is not None else UNPARSEABLE for p in df.parsed]
    out = metric_rows(df.gold.tolist(), pred, df.task.tolist(), variant=f"{variant}/parsed", **ids)
    out += metric_rows(df.gold.tolist(), df.scored.tolist(), df.task.tolist(),
                       variant=f"{variant}/scored_after_reasoning", **ids)
    for task, g in [("pooled", df), *df.groupby("task")]:
        for metric, value in (("unparseable_rate", (g.how == "unparseable").mean()),
                              ("think_rate", g.thought.mean()),
                              ("tokens_mean", g.n_tokens.mean()),
                              ("tokens_max", g.n_tokens.max()),
                              ("fits_token_limit_rate", g.fits.mean())):
            out.append({**ids, "variant": f"{variant}/generation", "task": task,
                        "metric": metric, "value": float(value)})
    return out


@dataclass
class CotRun:
    rationales: Rationales
    fits: pd.DataFrame  # variant, quantile, steps, final_loss, wall_s, n_cot_targets
    dev: pd.DataFrame  # variant, quantile, dev weighted F1 (scored) for the γ choice
    chosen_quantile: float
    metrics: pd.DataFrame
    outputs: pd.DataFrame  # per record inference rows, with variant and split
    decisions: pd.DataFrame  # dynamic CoT: epoch, id, label, task, cot (chosen γ's run)


def run_cot(cfg: Profile, fit: Sequence[Record], dev: Sequence[Record],
            tests: Mapping[str, Sequence[Record]], *, seed: int, work_dir: Path,
            experiment: str = "05_dynamic_cot", progress: bool = False) -> CotRun:
    """Rationales for ``fit``, the three variants (dynamic for every γ of the grid, chosen
    on ``dev`` by the weighted F1 of label scoring after reasoning), evaluated on ``tests``."""
    if not applicable(cfg):
        raise ValueError(f"profile {cfg.name!r}: {NOT_APPLICABLE}")
    c = cfg.cot
    fit = _sample(fit, c.train_sample, seed)
    dev = _sample(dev, c.test_sample, seed)
    tests = {k: _sample(v, c.test_sample, seed) for k, v in tests.items()}
    work_dir = Path(work_dir)
    rat = teacher_rationales(cfg, fit, cache_path=work_dir / "rationales_cache.json", seed=seed)
    cot_targets = rat.targets
    specs = [("sft", None), ("full_cot", None)] + [("dynamic_cot", q) for q in c.gamma_grid]
    fits, dev_rows, results = [], [], {}
    for variant, q in specs:
        tag = variant if q is None else f"{variant}-q{q:g}"
        vf = fit_variant(cfg, fit, cot_targets, variant=variant, quantile=q, seed=seed,
                         out_dir=work_dir / tag, progress=progress)
        dres = think_predict(vf.backend, dev, max_new_tokens=c.max_new_tokens,
                             token_limit=c.token_limit)
        dev_f1 = pd.DataFrame(metric_rows(dres.rows.gold.tolist(), dres.rows.scored.tolist(),
                                          dres.rows.task.tolist()))
        dev_rows.append({"variant": variant, "quantile": q, "dev_weighted_f1": float(
            dev_f1[(dev_f1.task == "pooled") & (dev_f1.metric == "weighted_f1")].value.iloc[0])})
        tres = {s: think_predict(vf.backend, recs, max_new_tokens=c.max_new_tokens,
                                 token_limit=c.token_limit) for s, recs in tests.items()}
        results[(variant, q)] = (vf, tres)
        fits.append({"variant": vf.variant, "quantile": q, "steps": vf.steps,
                     "final_loss": vf.final_loss, "wall_s": round(vf.wall_s, 2),
                     "n_train": len(fit), "n_cot_targets": vf.n_cot_targets})
        release(vf.backend)  # one model at a time (a 7B twice would not fit one GPU)
    dev_df = pd.DataFrame(dev_rows)
    dyn = dev_df[dev_df.variant == "dynamic_cot"]
    # ties -> the default quantile if among the best, else the first best
    best = dyn[dyn.dev_weighted_f1 == dyn.dev_weighted_f1.max()]
    chosen = c.gamma_quantile if c.gamma_quantile in set(best["quantile"]) else float(best["quantile"].iloc[0])
    rows, outs = [], []
    for (variant, q), (_, tres) in results.items():
        if variant == "dynamic_cot" and q != chosen:
            name = f"dynamic_cot@{q:g}"
        else:
            name = variant
        for split, res in tres.items():
            rows += think_rows(res, experiment=experiment, variant=name, seed=seed, split=split)
            outs.append(res.rows.assign(variant=name, split=split))
    vf_dyn = results[("dynamic_cot", chosen)][0]
    labels = {r.id: (r.label, r.task) for r in fit}
    dec = pd.DataFrame([{"epoch": h["epoch"], "id": i, "label": labels[i][0], "task": labels[i][1],
                         "cot": i in set(h["ids"]), "loss": h["losses"].get(i, float("nan")),
                         "gamma": h["gamma"]}
                        for h in vf_dyn.history for i in labels if i in h["losses"]])
    return CotRun(rat, pd.DataFrame(fits), dev_df, chosen, pd.DataFrame(rows),
                  pd.concat(outs, ignore_index=True), dec)


def reasoning_by_label(decisions: pd.DataFrame) -> pd.DataFrame:
    """For which labels dynamic CoT chose to reason: share of records given CoT targets per
    gold label in the last decided epoch (sorted, most reasoning first)."""
    if decisions.empty:
        return pd.DataFrame(columns=["task", "label", "n", "n_cot", "cot_share"])
    last = decisions[decisions.epoch == decisions.epoch.max()]
    g = last.groupby(["task", "label"]).cot.agg(n="size", n_cot="sum").reset_index()
    g["cot_share"] = g.n_cot / g.n
    return g.sort_values(["cot_share", "n"], ascending=False).reset_index(drop=True)


def variants_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Weighted F1 per variant/inference (rows) and split/task (columns)."""
    wf = metrics[metrics.metric == "weighted_f1"]
    return wf.pivot_table(index="variant", columns=["split", "task"], values="value").round(4)


def not_applicable_rows(cfg: Profile, *, experiment: str, seed: int,
                        splits: Sequence[str]) -> list[dict]:
    """metrics.csv rows for a profile without a generative student: ``applicable`` = 0 per
    variant and split, so the table says "not applicable" and holds no borrowed number."""
    return [{"experiment": experiment, "variant": f"{v}/{NOT_APPLICABLE.split(' (')[0].replace(' ', '_')}",
             "seed": seed, "split": s, "task": "pooled", "metric": "applicable", "value": 0.0}
            for v in VARIANTS for s in splits]


def summary(run: CotRun) -> dict[str, Any]:
    """What run.json records of a run: rationale counts, the γ choice, fit budgets."""
    rat = run.rationales.rows
    return {"teacher": run.rationales.teacher, "n_rationales": len(rat),
            "rejected_share": run.rationales.rejected_share,
            "reject_reasons": dict(Counter(rat.reason)),
            "chosen_quantile": run.chosen_quantile,
            "dev": run.dev.to_dict("records"),
            "fits": run.fits.to_dict("records")}



def token_table(outputs: pd.DataFrame) -> pd.DataFrame:
    """Tokens per answer by variant, split and task: mean/max generated tokens, share that
    reasoned, share unparseable, share within the token limit (ended, <= limit)."""
    g = outputs.groupby(["variant", "split", "task"])
    return g.agg(n=("id", "size"), tokens_mean=("n_tokens", "mean"), tokens_max=("n_tokens", "max"),
                 think_rate=("thought", "mean"),
                 unparseable_rate=("how", lambda h: float((h == "unparseable").mean())),
                 fits_limit=("fits", "mean")).round(3).reset_index()
