"""Rule proposers behind one interface: ``Proposer.propose(target_label, errors, k) -> [Rule]``.

- ``DataProposer`` (mini profile): mines discriminative conditions for a label from the
  training fold (character n-grams of the dialogue text and OCR text, predicted scenes, image
  counts), ranks them by smoothed precision, and proposes one- and two-condition rules
  (including ``A AND NOT B``), preferring rules that cover the current error examples.
- ``LLMProposer`` (paper/tiny profiles): prompts the small MLLM through an injected
  ``generate(prompt) -> str`` with the target label and a batch of current errors, then
  parses the answer robustly (``parse_rules``) and validates every rule, counting the valid
  and invalid ones.

Every proposer is seeded, caches its answers (same request -> same rules, no new call) and
counts its calls, cache hits, tokens (when known) and wall time (``cost()``).
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.feature_extraction.text import CountVectorizer

from ..data.labels import ALL_LABELS, IMAGE_TASK, LABEL_TO_TASK
from ..hashing import stable_int
from .engine import LABEL_INDEX, Observables, RuleEngine
from .schema import (FIELDS, SEMANTIC_OPS, Condition, Rule, RuleValidationError, rule_id_for,
                     validate_rule)


@dataclass(frozen=True)
class ErrorExample:
    """A record the current (collaborative) prediction gets wrong, as a proposer sees it."""

    id: str
    task: str
    gold: str
    predicted: str | None
    fields: Mapping[str, Any]  # observable field -> value (see Observables.record)


def errors_from(obs: Observables, y: np.ndarray, pred: np.ndarray,
                idx: Sequence[int] | None = None) -> list[ErrorExample]:
    """Error examples of ``obs`` where label indices ``pred`` differ from gold ``y``."""
    wrong = np.flatnonzero(np.asarray(pred) != np.asarray(y)) if idx is None else idx
    return [ErrorExample(obs.ids[i], str(obs.tasks[i]), ALL_LABELS[y[i]],
                         None if pred[i] < 0 else ALL_LABELS[pred[i]], obs.record(i))
            for i in wrong]


def _error_observables(errors: Sequence[ErrorExample]) -> Observables:
    n = len(errors)
    f: dict[str, Any] = {}
    for k, kind in FIELDS.items():
        vals = [e.fields.get(k) for e in errors]
        if kind == "numeric":
            f[k] = np.array([int(v or 0) for v in vals], dtype=np.int64)
        elif kind == "scene":
            f[k] = [tuple(v or ()) if not isinstance(v, str) else (v,) for v in vals]
        else:
            f[k] = [str(v or "") for v in vals]
    return Observables([e.id for e in errors], np.array([e.task for e in errors], dtype=object),
                       f, frozenset(FIELDS), np.array([LABEL_INDEX[e.gold] for e in errors],
                                                      dtype=np.int64) if n else None)


class Proposer:
    """Base class: caching, counting and timing around ``_propose``."""

    name = "base"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.calls = 0
        self.cache_hits = 0
        self.tokens: int | None = None
        self.wall_s = 0.0
        self.engine: RuleEngine | None = None  # labelled training fold, where known
        self._cache: dict[Any, list[Rule]] = {}

    def measure(self, rules: Sequence[Rule]) -> list[Rule]:
        """``rules`` with support/precision measured on the proposer's training fold (if any)."""
        return _measure(list(rules), self.engine, "train")

    def _key(self, target_label: str, errors: Sequence[ErrorExample], k: int,
             context: Sequence[Rule] = ()) -> Any:
        """Cache key of a request: the label, its error ids, ``k`` and the current rule set
        (so the same label asked from another state is a new request, not a cache hit)."""
        return (target_label, tuple(sorted(e.id for e in errors if e.gold == target_label)), k,
                tuple(sorted(r.key for r in context)))

    def propose(self, target_label: str, errors: Sequence[ErrorExample] = (),
                k: int = 5, context: Sequence[Rule] = ()) -> list[Rule]:
        """Up to ``k`` rules predicting ``target_label``, informed by the current ``errors``;
        ``context`` is the rule set the rules would join (a proposer proposes rules not in it)."""
        if target_label not in LABEL_TO_TASK:
            raise ValueError(f"unknown label {target_label!r}")
        errors, context = list(errors), tuple(context)
        key = self._key(target_label, errors, k, context)
        if key in self._cache:
            self.cache_hits += 1
            return list(self._cache[key])
        t0 = time.perf_counter()
        have = {r.key for r in context}
        rules = [r for r in self._propose(target_label, errors, k, call=self.calls,
                                          context=context) if r.key not in have]
        self.wall_s += time.perf_counter() - t0
        self.calls += 1
        self._cache[key] = list(rules)
        return list(rules)

    def _propose(self, target_label: str, errors: list[ErrorExample], k: int,
                 call: int, context: tuple[Rule, ...] = ()) -> list[Rule]:
        raise NotImplementedError

    def cost(self) -> dict[str, Any]:
        return {"proposer": self.name, "calls": self.calls, "cache_hits": self.cache_hits,
                "requests": self.calls + self.cache_hits,
                "tokens": self.tokens, "proposer_wall_s": round(self.wall_s, 4)}


def _measure(rules: list[Rule], engine: RuleEngine | None, fold: str) -> list[Rule]:
    """Attach support/precision measured on ``engine``'s (labelled) data to each rule."""
    if engine is None or engine.obs.labels is None or not rules:
        return rules
    y = engine.obs.labels
    out = []
    for r in rules:
        m = engine.rule_mask(r)
        sup = int(m.sum())
        prec = float((y[m] == LABEL_INDEX[r.label]).mean()) if sup else None
        out.append(r.replace(stats={"support": sup, "precision": prec, "fold": fold}))
    return out


# --------------------------------------------------------------------------------------------
# Data-driven proposer
# --------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"<[a-z]+>")
_PLACEHOLDER_WORDS = ("<image>", "<http>")


def _keep_gram(g: str) -> bool:
    return (not any(ch.isspace() for ch in g) and any(ch.isalnum() for ch in g)
            and not any(g in w for w in _PLACEHOLDER_WORDS))


@dataclass
class _TaskIndex:
    rows: np.ndarray               # indices of the task's records in the training fold
    y: np.ndarray                  # their gold label indices
    cover: sparse.csc_matrix       # (n_task, n_cand) condition coverage
    conds: list[Condition]


class DataProposer(Proposer):
    """Mines discriminative conditions from a labelled training fold.

    Candidate conditions: character n-grams (``ngram_range``) of each text field present in
    at least ``min_df`` records of a task (keyword_any with one keyword), each predicted
    scene (``image_scene``) and image-count thresholds; conditions with identical coverage
    are merged (the shortest kept). For a target label, conditions are scored by the
    m-estimate of precision ``(pos + m * prior) / (n + m)`` (raw training precision at least
    ``min_precision``, ``pos`` at least ``min_support``); the ``top_single`` best seed
    pairs ``A AND B`` and ``A AND NOT B`` that raise the score. Rules covering at least one
    current error example of the target label rank first, then by score and support.
    Returned rules carry their exact train-fold support and precision.
    """

    name = "data"

    def __init__(self, train: Observables, *, fields: Sequence[str] | None = None,
                 ngram_range: tuple[int, int] = (2, 4), min_df: int = 2, min_support: int = 2,
                 m: float = 2.0, min_precision: float = 0.5, top_single: int = 40,
                 pairs: bool = True, seed: int = 0):
        super().__init__(seed)
        if train.labels is None:
            raise ValueError("DataProposer needs a labelled training fold (Observables.labels)")
        self.train = train
        self.engine = RuleEngine(train)
        avail = [f for f in FIELDS if f in train.available]
        self.fields = [f for f in (fields or avail) if f in avail]
        self.ngram_range, self.min_df, self.min_support = ngram_range, min_df, min_support
        self.m, self.top_single, self.pairs = m, top_single, pairs
        self.min_precision = min_precision
        self._index: dict[str, _TaskIndex] = {}

    # -- candidate conditions per task --------------------------------------------------------
    def _task_index(self, task: str) -> _TaskIndex:
        if task in self._index:
            return self._index[task]
        rows = np.flatnonzero(self.train.tasks == task)
        cols: list[sparse.spmatrix] = []
        conds: list[Condition] = []
        for fname in self.fields:
            kind = FIELDS[fname]
            vals = [self.train.fields[fname][i] for i in rows] if kind != "numeric" else \
                self.train.fields[fname][rows]
            if kind == "text":
                if not any(vals):
                    continue
                vec = CountVectorizer(analyzer="char", ngram_range=self.ngram_range,
                                      min_df=min(self.min_df, len(rows)), binary=True,
                                      preprocessor=lambda s: _PLACEHOLDER.sub(" ", s.lower()),
                                      dtype=np.int8)
                try:
                    X = vec.fit_transform(vals).tocsc()
                except ValueError:  # empty vocabulary
                    continue
                vocab = vec.get_feature_names_out()
                keep = [j for j in np.argsort([len(g) for g in vocab], kind="stable")
                        if _keep_gram(vocab[j])]
                cols.append(X[:, keep])
                conds += [Condition(fname, "keyword_any", (str(vocab[j]),)) for j in keep]
            elif kind == "label":  # nearest_label: one exact-label condition per label seen
                labs = sorted({v for v in vals if v})
                if not labs:
                    continue
                X = np.array([[v == lab for lab in labs] for v in vals], dtype=np.int8)
                cols.append(sparse.csc_matrix(X))
                conds += [Condition(fname, "keyword_any", (lab,)) for lab in labs]
            elif kind == "scene":
                scenes = sorted({s for v in vals for s in v})
                if not scenes:
                    continue
                X = np.array([[s in v for s in scenes] for v in vals], dtype=np.int8)
                cols.append(sparse.csc_matrix(X))
                conds += [Condition(fname, "keyword_any", (s,)) for s in scenes]
            else:  # image_count
                tests = [("eq", 0.0), ("ge", 1.0), ("ge", 2.0), ("ge", 3.0)]
                X = np.array([[{"eq": v == t, "ge": v >= t}[op] for op, t in tests]
                              for v in vals], dtype=np.int8).reshape(len(rows), len(tests))
                cols.append(sparse.csc_matrix(X))
                conds += [Condition(fname, op, t) for op, t in tests]
        if cols:
            C = sparse.hstack(cols, format="csc").astype(np.int8)
            tot = np.asarray(C.sum(axis=0)).ravel()
            ok = (tot >= 1) & (tot < len(rows))  # a condition true everywhere is useless
            # merge identical coverage columns (keep the first: fields order, shortest gram)
            seen: set[bytes] = set()
            keep = []
            for j in np.flatnonzero(ok):
                sig = C.indices[C.indptr[j]:C.indptr[j + 1]].tobytes()
                if sig not in seen:
                    seen.add(sig)
                    keep.append(j)
            C = C[:, keep]
            conds = [conds[j] for j in keep]
        else:
            C = sparse.csc_matrix((len(rows), 0), dtype=np.int8)
        idx = _TaskIndex(rows, self.train.labels[rows], C, conds)
        self._index[task] = idx
        return idx

    def _score(self, pos: np.ndarray, tot: np.ndarray, prior: float) -> np.ndarray:
        return (pos + self.m * prior) / (tot + self.m)

    def candidates(self, target_label: str) -> list[tuple[tuple[Condition, ...], int, int, float]]:
        """All candidate rules for a label as ``(conditions, pos, n, score)``, best first."""
        task = LABEL_TO_TASK[target_label]
        ix = self._task_index(task)
        if ix.cover.shape[1] == 0:
            return []
        ypos = (ix.y == LABEL_INDEX[target_label])
        if not ypos.any():
            return []
        prior = float(ypos.mean())
        C = ix.cover
        pos = np.asarray(C[ypos].sum(axis=0)).ravel().astype(float)
        tot = np.asarray(C.sum(axis=0)).ravel().astype(float)
        score = self._score(pos, tot, prior)
        eligible = np.flatnonzero((pos >= self.min_support)
                                  & (pos >= self.min_precision * np.maximum(tot, 1)))
        order = eligible[np.lexsort((-pos[eligible], -score[eligible]))]
        out = [((ix.conds[j],), int(pos[j]), int(tot[j]), float(score[j])) for j in order]
        if self.pairs and len(order):
            top = order[: self.top_single]
            D = C[:, top].toarray().astype(np.float64)                  # (n, M)
            Dp = D[ypos]
            pos2 = Dp.T @ Dp
            tot2 = D.T @ D
            s2 = self._score(pos2, tot2, prior)
            best1 = np.maximum.outer(score[top], score[top])
            iu = np.triu_indices(len(top), 1)
            good = ((pos2[iu] >= self.min_support) & (s2[iu] > best1[iu] + 1e-9)
                    & (pos2[iu] >= self.min_precision * tot2[iu]))
            for a, b in zip(iu[0][good], iu[1][good]):
                out.append(((ix.conds[top[a]], ix.conds[top[b]]), int(pos2[a, b]),
                            int(tot2[a, b]), float(s2[a, b])))
            # A AND NOT B: remove the negatives of A with the condition that costs fewest
            Cf = C.astype(np.float64)
            inter_tot = np.asarray((Cf.T @ sparse.csc_matrix(D)).todense())         # (n_cand, M)
            inter_pos = np.asarray((Cf[ypos].T @ sparse.csc_matrix(Dp)).todense())
            for a_i, a in enumerate(top):
                if pos[a] >= tot[a]:
                    continue  # already pure
                p = pos[a] - inter_pos[:, a_i]
                t = tot[a] - inter_tot[:, a_i]
                s = np.where(t > 0, self._score(p, t, prior), -1.0)
                s[(p < self.min_support) | (inter_tot[:, a_i] == 0)
                  | (p < self.min_precision * t)] = -1.0
                b = int(np.argmax(s))
                if s[b] > score[a] + 1e-9:
                    out.append(((ix.conds[a], ix.conds[b].negated()), int(p[b]), int(t[b]),
                                float(s[b])))
        out.sort(key=lambda c: (-round(c[3], 9), -c[1], len(c[0])))
        return out

    def _propose(self, target_label: str, errors: list[ErrorExample], k: int,
                 call: int, context: tuple[Rule, ...] = ()) -> list[Rule]:
        task = LABEL_TO_TASK[target_label]
        have = {tuple(sorted(c.key for c in r.conditions)) for r in context
                if r.label == target_label}
        # candidates the current rule set already holds are skipped, so a repeated request
        # from a grown state reaches further down the ranking
        cands = [c for c in self.candidates(target_label)
                 if tuple(sorted(x.key for x in c[0])) not in have][: max(4 * k, 40)]
        if not cands:
            return []
        rules = [Rule(rule_id_for(task, target_label, conds, prefix="d"), task, target_label,
                      conds, rationale=f"{p}/{t} training records of task {task!r} matching "
                      f"this are labelled {target_label!r}",
                      provenance={"proposer": self.name, "call": call, "score": round(s, 4)})
                 for conds, p, t, s in cands]
        fn = [e for e in errors if e.gold == target_label]
        if fn:
            eng = RuleEngine(_error_observables(fn))
            covers = [int(eng.rule_mask(r).sum()) for r in rules]
            order = sorted(range(len(rules)), key=lambda i: (covers[i] == 0, i))
            rules = [rules[i].replace(provenance={**rules[i].provenance,
                                                  "covers_errors": covers[i]}) for i in order]
        return _measure(rules[:k], self.engine, "train")

    def widen(self, rule: Rule, cond_index: int, n: int = 1) -> Rule | None:
        """Generalise a keyword condition of ``rule`` by adding the ``n`` best other n-grams of
        the same field for its label (keyword_any only); None if nothing to add."""
        c = rule.conditions[cond_index]
        if c.op != "keyword_any" or c.negate:
            return None
        have = set(c.value)
        extra = [cc.value[0] for conds, *_ in self.candidates(rule.label) if len(conds) == 1
                 for cc in conds if cc.field == c.field and cc.op == "keyword_any"
                 and not cc.negate and cc.value[0] not in have
                 and not any(h in cc.value[0] for h in have)][:n]
        if not extra:
            return None
        new = Condition(c.field, c.op, tuple(c.value) + tuple(extra))
        conds = rule.conditions[:cond_index] + (new,) + rule.conditions[cond_index + 1:]
        r = rule.replace(id=rule_id_for(rule.task, rule.label, conds, prefix="d"),
                         conditions=conds,
                         provenance={**rule.provenance, "derived_from": rule.id,
                                     "action": "widen"})
        return _measure([r], self.engine, "train")[0]


# --------------------------------------------------------------------------------------------
# LLM proposer: prompt, call, robust parsing
# --------------------------------------------------------------------------------------------

@dataclass
class ParseReport:
    """What ``parse_rules`` found in a model answer."""

    rules: list[Rule] = field(default_factory=list)
    invalid: list[dict[str, Any]] = field(default_factory=list)  # index, rule_id, kind, reason
    n_fragments: int = 0  # rule-like JSON fragments that could not be parsed (e.g. truncated)

    @property
    def n_valid(self) -> int:
        return len(self.rules)

    @property
    def n_invalid(self) -> int:
        return len(self.invalid) + self.n_fragments


_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_ALIASES = {"keywords": "value", "values": "value", "pattern": "value", "not": "negate",
            "negated": "negate", "operator": "op"}
_RULE_KEYS = ("id", "task", "label", "conditions", "rationale")


def _balanced_end(text: str, start: int) -> int | None:
    """Index after the bracket closing the one at ``start`` (string-aware), or None."""
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _repair(s: str) -> Any:
    s = _TRAILING_COMMA.sub(r"\1", s)
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        pass
    if '"' not in s and "'" in s:  # Python-style quoting
        s2 = s.replace("'", '"')
        s2 = re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", s2))
        return json.loads(s2)
    raise json.JSONDecodeError("unrepairable", s, 0)


def _json_values(text: str) -> tuple[list[Any], int]:
    """All top-level JSON values in ``text`` (repairing trailing commas / Python quoting) and the
    number of rule-like fragments that did not parse."""
    dec = json.JSONDecoder()
    values: list[tuple[int, Any]] = []
    failed: list[int] = []
    pos = 0
    while True:
        m = re.compile(r"[\[{]").search(text, pos)
        if not m:
            break
        i = m.start()
        try:
            val, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            end = _balanced_end(text, i)
            val = None
            if end is not None:
                try:
                    val = _repair(text[i:end])
                except (json.JSONDecodeError, ValueError):
                    val, end = None, None
        if end is None:
            if text[i] == "{":
                failed.append(i)
            pos = i + 1
        else:
            values.append((i, val))
            pos = end
    starts = [i for i, _ in values] + [len(text)]
    n_frag = 0
    for f in failed:
        nxt = min(s for s in starts if s > f)
        if re.search(r'"(conditions|label)"', text[f:nxt]):
            n_frag += 1
    return [v for _, v in values], n_frag


def _normalise(d: Mapping[str, Any], target_label: str | None, rid: str, call: int | None,
               proposer: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    label = d.get("label", target_label)
    out["label"] = label
    task = d.get("task")
    if task is None:  # the label decides the task; an explicit wrong task is reported
        task = LABEL_TO_TASK.get(label) if isinstance(label, str) else None
        task = task or LABEL_TO_TASK.get(target_label or "") or "intent"
    out["task"] = task
    out["id"] = rid
    conds = d.get("conditions")
    if isinstance(conds, Mapping):
        conds = [conds]
    if isinstance(conds, list):
        nc = []
        for c in conds:
            if isinstance(c, Mapping):
                c = {_ALIASES.get(k, k): v for k, v in c.items()}
                if c.get("op") in ("keyword_any", "keyword_all", *SEMANTIC_OPS) and \
                        isinstance(c.get("value"), str):
                    c["value"] = [c["value"]]
                if c.get("op") in ("keyword_any", "keyword_all", *SEMANTIC_OPS) and \
                        isinstance(c.get("value"), list):
                    # a looping answer repeats strings ("推荐", "推荐", ...): keep each once
                    c["value"] = list(dict.fromkeys(
                        v.strip() if isinstance(v, str) else v for v in c["value"]))
            nc.append(c)
        conds = nc
    out["conditions"] = conds if conds is not None else []
    if isinstance(d.get("rationale"), str):
        out["rationale"] = d["rationale"]
    prov: dict[str, Any] = {"proposer": proposer}
    if call is not None:
        prov["call"] = call
    if "id" in d:
        prov["model_id"] = d["id"]
    dropped = sorted(set(d) - set(_RULE_KEYS) - {"stats", "provenance"})
    if dropped:
        prov["dropped_keys"] = dropped
    out["provenance"] = prov
    return out


def parse_rules(text: str, target_label: str | None = None, *, id_prefix: str = "llm",
                call: int | None = None, proposer: str = "llm") -> ParseReport:
    """Extract and validate rules from a model answer.

    Accepts JSON in code fences or bare, a list of rules, ``{"rules": [...]}``, several objects
    in a row, trailing text, trailing commas and Python-style quotes. Missing ``label``
    defaults to ``target_label``, missing ``task`` to the label's task; ids are reassigned as
    ``{id_prefix}-{i}`` (the model's own id is kept in provenance); stats are dropped (they are
    measured, never trusted from the model). Invalid rules are counted with their reason.
    """
    rep = ParseReport()
    chunks = [m.group(1) for m in _FENCE.finditer(text)]
    rest = _FENCE.sub(" ", text)
    values: list[Any] = []
    for chunk in chunks + [rest]:
        vals, nf = _json_values(chunk)
        values += vals
        rep.n_fragments += nf
    items: list[Any] = []
    for v in values:
        if isinstance(v, list):
            items += [x for x in v if isinstance(x, Mapping)]
        elif isinstance(v, Mapping):
            if isinstance(v.get("rules"), list):
                items += [x for x in v["rules"] if isinstance(x, Mapping)]
            elif "conditions" in v or "label" in v:
                items.append(v)
            else:  # a wrapper, e.g. {"semantic_rule": {...}, "keyword_rules": [...]}
                for x in v.values():
                    if isinstance(x, Mapping):
                        items.append(x)
                    elif isinstance(x, list):
                        items += [y for y in x if isinstance(y, Mapping)]
    j = 0
    for d in items:
        if not ("conditions" in d or "label" in d):
            continue  # a stray object (e.g. a condition of a truncated rule)
        rid = f"{id_prefix}-{j}"
        j += 1
        try:
            rule = validate_rule(_normalise(d, target_label, rid, call, proposer))
        except RuleValidationError as e:
            rep.invalid.append({"index": j - 1, "rule_id": rid, "kind": e.kind,
                                "reason": e.problem})
            continue
        rep.rules.append(rule)
    return rep


TASK_DESCRIPTIONS = {
    "image": "classify the scene of an image a customer uploaded (a screenshot or a photo)",
    "intent": "classify what the customer wants from a customer/agent dialogue",
}
FIELD_DESCRIPTIONS = {
    "user_text": "all customer turns of the dialogue",
    "last_user_turn": "the last customer turn",
    "ocr_text": "text read from the customer's images by OCR",
    "image_desc": "a short description of the customer's images",
    "image_count": "number of images the customer sent (a number)",
    "image_scene": "predicted scene label of each attached image",
    "nearest_label": "label of the most similar labelled training record",
}
#: What each label means, for the prompt (written from the label names of the challenge; the
#: challenge gives no glosses).
LABEL_MEANINGS: dict[str, str] = {
    "实物拍摄(含售后)": "a photo of the physical product (often showing a defect, after-sales)",
    "商品分类选项": "the product's option/variant selector (colour, size, SKU list)",
    "商品头图": "the product's main picture on its page",
    "商品详情页截图": "a screenshot of the product detail page (description, parameters)",
    "下单过程中出现异常（显示购买失败浮窗）": "an ordering error pop-up (purchase failed)",
    "订单详情页面": "an order detail page (order number, status, amount)",
    "支付页面": "a payment page",
    "消费者与客服聊天页面": "a screenshot of a chat with customer service",
    "评论区截图页面": "a screenshot of product reviews",
    "物流页面-物流列表页面": "a list of shipments / packages",
    "物流页面-物流跟踪页面": "a parcel tracking page (courier, route, status)",
    "物流页面-物流异常页面": "a logistics exception page (parcel stuck, returned, lost)",
    "退款页面": "a refund page", "退货页面": "a return-goods page", "换货页面": "an exchange page",
    "购物车页面": "a shopping cart page", "店铺页面": "a shop's home page",
    "活动页面": "a promotion / campaign page", "优惠券领取页面": "a coupon claiming page",
    "账单/账户页面": "a bill or account page", "个人信息页面": "a personal information page",
    "投诉举报页面": "a complaint / report page", "平台介入页面": "a platform intervention page",
    "外部APP截图": "a screenshot of another app", "其他类别图片": "any other picture",
    "反馈密封性不好": "the customer reports the product leaks / does not seal well",
    "是否好用": "asks whether the product is good / works well",
    "是否会生锈": "asks whether the product rusts",
    "排水方式": "asks how the appliance drains water",
    "包装区别": "asks how packagings / package versions differ",
    "发货数量": "asks how many items are shipped / in the package",
    "反馈用后症状": "reports symptoms or reactions after using the product",
    "商品材质": "asks what material the product is made of",
    "功效功能": "asks what the product does / its effects and functions",
    "是否易褪色": "asks whether the colour fades",
    "适用季节": "asks which season the product is for",
    "能否调光": "asks whether the light's brightness can be adjusted",
    "版本款型区别": "asks how versions / models / styles differ",
    "单品推荐": "asks the agent to recommend one product or which variant to choose",
    "用法用量": "asks how to use the product and how much / how often",
    "控制方式": "asks how the device is controlled (app, remote, switch)",
    "上市时间": "asks when the product was released",
    "商品规格": "asks about size, dimensions, capacity or specifications",
    "信号情况": "asks about (phone / network) signal quality",
    "养护方法": "asks how to care for / maintain / clean the product",
    "套装推荐": "asks to recommend a set / bundle",
    "何时上货": "asks when an item will be back in stock / on sale",
    "气泡": "asks about or reports bubbles (e.g. in a screen protector or liquid)",
}
assert set(LABEL_MEANINGS) == set(ALL_LABELS)

#: Condition kinds the LLM may write under the JSON-schema grammar: text fields only, keyword
#: lists and semantic texts (both a list of strings: one grammar; numeric and regex conditions
#: are left to the data-driven proposer).
KEYWORD_LLM_OPS = ("keyword_any", "keyword_all")


def answer_schema(fields: Sequence[str], k: int, *, semantic: bool = True,
                  max_items: int = 6, max_keyword_len: int = 8, max_len: int = 60
                  ) -> dict[str, Any]:
    """JSON schema of an LLM answer: ``{"semantic_rule": R, "keyword_rules": [R, ...]}`` (one
    semantic rule, up to k-1 keyword rules of 1..2 conditions), or without ``semantic``
    ``{"rules": [R, ...]}`` (1..k keyword rules); ``R = {"rationale", "conditions"}``;
    keyword conditions hold 1..``max_items`` keywords of at most ``max_keyword_len``
    characters, semantic ones 1..4 texts of at most ``max_len``. llama.cpp
    compiles it into a grammar, so the answer always parses and a loop cannot run past the
    bounds."""
    text_fields = [f for f in fields if FIELDS[f] == "text"] or ["user_text"]

    def shape(ops: list[str], n_max: int, len_max: int) -> dict[str, Any]:
        return {"type": "object",
                "properties": {"field": {"enum": text_fields}, "op": {"enum": ops},
                               "value": {"type": "array", "minItems": 1, "maxItems": n_max,
                                         "items": {"type": "string", "minLength": 1,
                                                   "maxLength": len_max}}},
                "required": ["field", "op", "value"], "additionalProperties": False}

    # keywords stay short (whole sentences never match as substrings); semantic texts may
    # be sentences, at most 4 of them
    kw = shape(list(KEYWORD_LLM_OPS), max_items, max_keyword_len)
    sem = shape(list(SEMANTIC_OPS), 4, max_len)

    def rule(cond: dict[str, Any], n_max: int) -> dict[str, Any]:
        return {"type": "object",
                "properties": {"rationale": {"type": "string", "maxLength": 160},
                               "conditions": {"type": "array", "minItems": 1,
                                              "maxItems": n_max, "items": cond}},
                "required": ["rationale", "conditions"], "additionalProperties": False}

    if not semantic:
        return {"type": "object",
                "properties": {"rules": {"type": "array", "minItems": 1,
                                         "maxItems": max(k, 1), "items": rule(kw, 2)}},
                "required": ["rules"], "additionalProperties": False}
    # a 1.5B model asked for "a semantic rule first" kept writing keyword rules only (measured
    # on real data): the grammar asks for one semantic rule, then up to k-1 keyword rules
    return {"type": "object",
            "properties": {"semantic_rule": rule(sem, 1),
                           "keyword_rules": {"type": "array", "minItems": 0,
                                             "maxItems": max(k - 1, 0), "items": rule(kw, 2)}},
            "required": ["semantic_rule", "keyword_rules"], "additionalProperties": False}


def _answer_key(prompt: str, identity: str, schema: Any) -> str:
    return hashlib.sha256(json.dumps([prompt, identity, schema], ensure_ascii=False,
                                     sort_keys=True).encode()).hexdigest()


class LLMProposer(Proposer):
    """Asks a (small) language model for rules; ``generate(prompt) -> str`` is injected.

    One proposer for every generator (issue 15 item 1): the paper profile's Qwen2-VL-2B
    (``models.qwen_vl.small_model_generator``) and the mini profile's CPU model
    (``models.small_lm.LlamaGenerator``) share the prompt (target label, what it means,
    typical records, the current errors with their text, the rule schema), the tolerant parser
    (``parse_rules``) and the validation; only ``generate`` differs. A generator with
    ``supports_json_schema`` gets ``json_schema=answer_schema(...)`` (a grammar); one with
    ``last_usage`` (``prompt_tokens``, ``completion_tokens``) reports exact tokens, else
    ``count_tokens(text) -> int`` counts them.

    ``train`` (labelled ``Observables``), when given, supplies typical examples of the target
    label and the support/precision measured for each returned rule; semantic conditions
    need ``train.embed`` and get their cosine threshold tuned on it (``tune_threshold``).
    ``descriptions`` overrides ``LABEL_MEANINGS``. ``answer_cache`` (a directory) keeps
    answers by prompt hash across runs (a hit costs no generation and is counted), for
    generators that expose an ``identity`` (weights and sampling settings).
    """

    name = "llm"

    def __init__(self, generate: Callable[..., str], *, train: Observables | None = None,
                 descriptions: Mapping[str, str] | None = None, fields: Sequence[str] | None = None,
                 max_examples: int = 6, max_chars: int = 240, n_typical: int = 2,
                 count_tokens: Callable[[str], int] | None = None, seed: int = 0,
                 semantic: bool = True, answer_cache: str | Path | None = None,
                 thresholds: Sequence[float] = (0.84, 0.86, 0.88, 0.9, 0.92),
                 max_answers: int = 0):
        super().__init__(seed)
        # > 0: answers (generated or from the disk cache alike, so a warm rerun proposes
        # exactly what the cold run did) this proposer may use; requests past it get no rules
        self.max_answers = max_answers
        self.budget_skips = 0
        self.generate = generate
        self.train = train
        self.engine = RuleEngine(train) if train is not None and train.labels is not None \
            else None
        self.descriptions = {**LABEL_MEANINGS, **dict(descriptions or {})}
        # without observables, every field but nearest_label (which needs a representation)
        avail = train.available if train is not None else frozenset(FIELDS) - {"nearest_label"}
        self.fields = [f for f in (fields or FIELDS) if f in avail]
        self.max_examples, self.max_chars, self.n_typical = max_examples, max_chars, n_typical
        self.count_tokens = count_tokens
        self.grammar = bool(getattr(generate, "supports_json_schema", False))
        self.usage_known = hasattr(generate, "last_usage")
        self.tokens = 0 if (count_tokens is not None or self.usage_known) else None
        self.semantic = semantic
        self.answer_cache = Path(answer_cache) if answer_cache is not None else None
        self.thresholds = tuple(thresholds)
        self.prompt_chars = 0
        self.answer_chars = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.generate_s = 0.0
        self.generator_calls = 0
        self.disk_hits = 0
        self.n_valid = 0
        self.n_invalid = 0
        self.invalid_kinds: Counter[str] = Counter()
        self.invalid_examples: list[dict[str, Any]] = []
        self.last_prompt = ""
        self.last_answer = ""
        self.last_report: ParseReport | None = None
        self.log: list[dict[str, Any]] = []  # per call: label, prompt, answer, parse outcome

    def _fields_text(self, fields: Mapping[str, Any], task: str) -> list[str]:
        lines = []
        for f in self.fields:
            if task == IMAGE_TASK and f in ("user_text", "last_user_turn"):
                continue
            v = fields.get(f)
            if v in (None, "", (), []):
                continue
            if isinstance(v, (list, tuple)):
                v = ", ".join(map(str, v))
            v = str(v).replace("\n", " / ")
            if len(v) > self.max_chars:
                v = v[: self.max_chars] + "…"
            lines.append(f"    {f}: {v}")
        return lines

    def build_prompt(self, target_label: str, errors: Sequence[ErrorExample], k: int) -> str:
        """The prompt for ``k`` rules for ``target_label`` (deterministic given the seed)."""
        task = LABEL_TO_TASK[target_label]
        fn = [e for e in errors if e.gold == target_label]
        fp = [e for e in errors if e.predicted == target_label and e.gold != target_label]
        rng = np.random.default_rng([self.seed, stable_int(target_label)])
        n_fn = min(len(fn), max(self.max_examples - min(len(fp), self.max_examples // 3), 0))
        pick_fn = [fn[i] for i in sorted(rng.choice(len(fn), n_fn, replace=False))] if n_fn else []
        n_fp = min(len(fp), self.max_examples - n_fn)
        pick_fp = [fp[i] for i in sorted(rng.choice(len(fp), n_fp, replace=False))] if n_fp else []
        desc = self.descriptions.get(target_label, "")
        lines = [
            "You write rules for an e-commerce customer-service classifier (Chinese texts).",
            f"Task: {TASK_DESCRIPTIONS[task]}.",
            f'Target label: "{target_label}"' + (f" — {desc}" if desc else "") + ".",
        ]
        confusable = sorted({e.predicted for e in pick_fn if e.predicted}
                            | {e.gold for e in pick_fp})
        if confusable:
            lines.append("Confusable labels: " + "; ".join(
                f"{lab} ({self.descriptions.get(lab, '')})" for lab in confusable) + ".")
        if self.train is not None and self.train.labels is not None and self.n_typical:
            rows = np.flatnonzero(self.train.labels == LABEL_INDEX[target_label])
            if len(rows):
                pick = sorted(rng.choice(rows, min(self.n_typical, len(rows)), replace=False))
                lines.append("Typical records with this label:")
                for i in pick:
                    lines += self._fields_text(self.train.record(int(i)), task)
                    lines.append("    --")
        if pick_fn:
            lines.append(f'Records that SHOULD get "{target_label}" (the classifier missed them):')
        for n, e in enumerate(pick_fn, 1):
            lines.append(f"[{n}] true label: {e.gold} | predicted: {e.predicted or '(none)'}")
            lines += self._fields_text(e.fields, e.task)
        if pick_fp:
            lines.append(f'Records that must NOT get "{target_label}" (the classifier wrongly '
                         "gave it to them):")
        for n, e in enumerate(pick_fp, len(pick_fn) + 1):
            lines.append(f"[{n}] true label: {e.gold} | predicted: {e.predicted or '(none)'}")
            lines += self._fields_text(e.fields, e.task)
        lines += [
            f'Write {k} different rules that recognise "{target_label}" and do not match '
            "records of other labels.",
            'A rule is a JSON object {"label": ..., "conditions": [...], "rationale": ...}; '
            "a record gets the label when ALL conditions hold.",
            'A condition is {"field": F, "op": OP, "value": V} with optional "negate": true.',
            "Fields: " + "; ".join(f"{f} ({FIELD_DESCRIPTIONS[f]})" for f in self.fields) + ".",
            "Operators: keyword_any / keyword_all (V: list of distinct short keywords of 2-4 "
            "characters that occur in such texts, not whole sentences), regex (V: a Python "
            "regular expression), eq ne gt ge lt le (image_count; V: number)"
            + ("; semantic (V: one sentence saying what the customer means, then 2-3 "
               "differently worded example questions, in Chinese; holds when the text "
               "means the same)." if self.semantic else "."),
        ]
        if self.semantic and self.grammar:
            lines.append('Answer as {"semantic_rule": ..., "keyword_rules": [...]}: one '
                         f"semantic rule, then up to {k - 1} keyword rules.")
        lines += [
            "Each rule must differ from the others; never repeat a keyword.",
            "Answer with one JSON list inside ```json ... ``` and nothing else, for example:",
            "```json",
            json.dumps([{"label": target_label, "conditions": [
                {"field": self.fields[0] if self.fields else "user_text",
                 "op": "keyword_any", "value": ["…", "…"]}],
                "rationale": "…"}], ensure_ascii=False),
            "```",
        ]
        return "\n".join(lines)

    def _key(self, target_label: str, errors: Sequence[ErrorExample], k: int,
             context: Sequence[Rule] = ()) -> Any:
        return self.build_prompt(target_label, errors, k)

    def _schema(self, k: int) -> dict[str, Any] | None:
        return answer_schema(self.fields, k, semantic=self.semantic) if self.grammar else None

    def _generate(self, prompt: str, k: int) -> tuple[str, dict[str, Any]]:
        """The answer to ``prompt`` (from the disk cache where present) and its cost."""
        schema = self._schema(k)
        # only a generator that says what decides its answers (weights, sampling) is cached:
        # a bare function could be another model behind the same name
        identity = getattr(self.generate, "identity", None)
        path = None
        if self.answer_cache is not None and identity is not None:
            key = _answer_key(prompt, identity, schema)
            path = self.answer_cache / key[:2] / f"{key}.json"
            if path.exists():
                rec = json.loads(path.read_text(encoding="utf-8"))
                self.disk_hits += 1
                return rec["answer"], {**rec["usage"], "cached": True}
        t0 = time.perf_counter()
        answer = self.generate(prompt, json_schema=schema) if schema is not None else \
            self.generate(prompt)
        dt = time.perf_counter() - t0
        self.generator_calls += 1
        u = getattr(self.generate, "last_usage", None)
        if u is not None:
            pt, ct = int(u.prompt_tokens), int(u.completion_tokens)
        elif self.count_tokens is not None:
            pt, ct = self.count_tokens(prompt), self.count_tokens(answer)
        else:
            pt = ct = None
        usage = {"prompt_tokens": pt, "generated_tokens": ct, "seconds": round(dt, 3)}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"prompt": prompt, "answer": answer, "usage": usage,
                                       "identity": identity}, ensure_ascii=False),
                           encoding="utf-8")
            os.replace(tmp, path)
        return answer, {**usage, "cached": False}

    @property
    def answers(self) -> int:
        """Answers used so far: generated, or read from the disk cache."""
        return self.generator_calls + self.disk_hits

    def _propose(self, target_label: str, errors: list[ErrorExample], k: int,
                 call: int, context: tuple[Rule, ...] = ()) -> list[Rule]:
        if self.max_answers and self.answers >= self.max_answers:
            self.budget_skips += 1  # no answer left: the label gets nothing (it runs dry)
            return []
        prompt = self.build_prompt(target_label, errors, k)
        answer, usage = self._generate(prompt, k)
        self.last_prompt, self.last_answer = prompt, answer
        self.prompt_chars += len(prompt)
        self.answer_chars += len(answer)
        if not usage["cached"]:
            self.generate_s += usage["seconds"]
            if usage["prompt_tokens"] is not None:
                self.prompt_tokens += usage["prompt_tokens"]
                self.generated_tokens += usage["generated_tokens"]
                self.tokens = (self.tokens or 0) + usage["prompt_tokens"] + \
                    usage["generated_tokens"]
        rep = parse_rules(answer, target_label, id_prefix=f"llm{call}", call=call,
                          proposer=self.name)
        self.last_report = rep
        self.n_valid += rep.n_valid
        self.n_invalid += rep.n_invalid
        for inv in rep.invalid:
            self.invalid_kinds[inv["kind"]] += 1
            if len(self.invalid_examples) < 50:
                self.invalid_examples.append({**inv, "call": call})
        if rep.n_fragments:
            self.invalid_kinds["unparseable"] += rep.n_fragments
        # content ids, so the same rule proposed twice is recognised as such
        rules = []
        for r in rep.rules:
            r = self.tune_threshold(r)
            rid = rule_id_for(r.task, r.label, r.conditions, prefix="l")
            if all(rid != x.id for x in rules):
                rules.append(r.replace(id=rid, provenance={**r.provenance, "parsed_id": r.id}))
        self.log.append({"call": call, "label": target_label, "prompt": prompt,
                         "answer": answer, "valid": rep.n_valid, "invalid": list(rep.invalid),
                         "fragments": rep.n_fragments, **usage})
        return _measure(rules[:k], self.engine, "train")

    def tune_threshold(self, rule: Rule) -> Rule:
        """``rule`` with each semantic condition's cosine threshold chosen on the training
        fold: the grid value (``thresholds``) with the best F1 of the rule for its label
        (then precision; on a full tie the stricter threshold); unchanged without a labelled,
        embeddable fold."""
        if (self.engine is None or self.train is None or self.train.embed is None
                or not any(c.op in SEMANTIC_OPS for c in rule.conditions)):
            return rule
        y = self.train.labels == LABEL_INDEX[rule.label]
        conds = list(rule.conditions)
        for i, c in enumerate(conds):
            if c.op not in SEMANTIC_OPS or c.threshold is not None:
                continue
            best = None
            for t in sorted(self.thresholds):
                trial = rule.replace(conditions=tuple(conds[:i] + [c.with_threshold(t)]
                                                      + conds[i + 1:]))
                m = self.engine.rule_mask(trial)
                tp = int((m & y).sum())
                f1 = 2 * tp / max(int(m.sum()) + int(y.sum()), 1)
                prec = tp / max(int(m.sum()), 1)
                if best is None or (f1, prec) >= best[0]:
                    best = ((f1, prec), t)
            conds[i] = c.with_threshold(best[1])
        return rule.replace(conditions=tuple(conds))

    def cost(self) -> dict[str, Any]:
        return {**super().cost(), "generator_calls": self.generator_calls,
                "answer_cache_hits": self.disk_hits, "answers": self.answers,
                "max_answers": self.max_answers, "budget_skips": self.budget_skips,
                "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens,
                "generate_s": round(self.generate_s, 2), "prompt_chars": self.prompt_chars,
                "answer_chars": self.answer_chars, "valid_rules": self.n_valid,
                "invalid_rules": self.n_invalid, "invalid_kinds": dict(self.invalid_kinds)}

    def show_call(self, i: int = -1) -> CallView | None:
        """One call, displayable: its prompt, raw answer, parsed rules and why the invalid ones
        were dropped (notebook 02); None before any call."""
        if not self.log:
            return None
        c = self.log[i]
        rep = parse_rules(c["answer"], c["label"], call=c["call"], proposer=self.name)
        rows = [("target label", c["label"]),
                ("cost", f"{c['prompt_tokens']} prompt tokens, {c['generated_tokens']} "
                         f"generated, {c['seconds']} s" + (" (answer cache)" if c["cached"]
                                                           else "")),
                ("prompt", c["prompt"]), ("raw answer", c["answer"])]
        rows += [(f"parsed rule {j}", r.describe() + (f"  — {r.rationale}" if r.rationale
                                                       else ""))
                 for j, r in enumerate(rep.rules)]
        rows += [(f"dropped rule {d['index']}", f"[{d['kind']}] {d['reason']}")
                 for d in rep.invalid]
        if rep.n_fragments:
            rows.append(("dropped fragments", f"{rep.n_fragments} rule-like text(s) that "
                                              "did not parse (e.g. cut off at the token limit)"))
        return CallView(pd.DataFrame(rows, columns=["what", "text"]).set_index("what"))


@dataclass(frozen=True)
class CallView:
    """One LLM proposer call for display: ``table`` (what -> text), shown in full (a notebook
    renders each text as preformatted, so prompts and answers are not cut)."""

    table: pd.DataFrame

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th style='text-align:left;vertical-align:top'>{html.escape(k)}"
                       f"</th><td style='text-align:left'><pre style='white-space:pre-wrap'>"
                       f"{html.escape(str(v))}</pre></td></tr>"
                       for k, v in self.table["text"].items())
        return f"<table>{rows}</table>"

    def __str__(self) -> str:
        return "\n\n".join(f"== {k}\n{v}" for k, v in self.table["text"].items())
