"""Vectorised execution of rule sets as decision lists, and the override collaboration.

The engine works on a whole dataset at once. Each distinct condition is evaluated once into a
boolean vector over the records (cached); a rule's mask is the AND of its conditions and its
task; a decision list is the first rule that fires, found with one ``argmax`` over the stacked
rule masks. Evaluating a rule set of tens of rules on a few hundred records is then a few
numpy calls (tens of microseconds), which is what lets the Monte Carlo Tree Search score
thousands of candidate rule sets.

Labels are handled as indices into ``ALL_LABELS`` (``-1`` = no rule fired / no label).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .. import features
from ..data.labels import ALL_LABELS, LABEL_INDEX, label_indices  # noqa: F401 (re-exported)
from .schema import FIELDS, SEMANTIC_OPS, Condition, Rule

IMAGE_PLACEHOLDER = "<image>"
_NUMERIC = {"eq": operator.eq, "ne": operator.ne, "gt": operator.gt, "ge": operator.ge,
            "lt": operator.lt, "le": operator.le}


def label_strings(idx: np.ndarray) -> list[str | None]:
    """Inverse of ``label_indices``."""
    return [None if i < 0 else ALL_LABELS[i] for i in np.asarray(idx)]


# --------------------------------------------------------------------------------------------
# Observables
# --------------------------------------------------------------------------------------------

@dataclass
class Observables:
    """Per-record observable fields of a dataset, the only thing rules can see.

    ``fields`` maps every name of ``schema.FIELDS`` to one value per record: a string for text
    fields, an int array for ``image_count``, a tuple of scene labels for ``image_scene``.
    ``available`` names the fields that were actually provided (e.g. no OCR in a run without
    it); conditions on other fields see empty values. ``labels`` holds gold label indices
    where known (else None). ``embed``, where semantic conditions are used, maps a list of
    texts to their (n, d) L2-normalised embeddings (``semantic_embedder``); it is carried by
    ``subset`` and ``concat_observables``.
    """

    ids: list[str]
    tasks: np.ndarray
    fields: dict[str, Any]
    available: frozenset[str] = frozenset()
    labels: np.ndarray | None = None
    _lower: dict[str, list[str]] = field(default_factory=dict, repr=False)
    embed: Callable[[Sequence[str]], np.ndarray] | None = field(default=None, repr=False)
    _emb: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def lower(self, name: str) -> list[str]:
        """Case-folded copy of a text field (cached), used by keyword matching."""
        if name not in self._lower:
            self._lower[name] = [s.lower() for s in self.fields[name]]
        return self._lower[name]

    def subset(self, idx: Sequence[int] | np.ndarray) -> Observables:
        idx = np.asarray(idx, dtype=np.int64)
        f: dict[str, Any] = {}
        for k, v in self.fields.items():
            f[k] = v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx]
        return Observables([self.ids[i] for i in idx], self.tasks[idx], f, self.available,
                           None if self.labels is None else self.labels[idx], embed=self.embed)

    def record(self, i: int) -> dict[str, Any]:
        """The observable fields of record ``i`` as a plain dict (for prompts and errors)."""
        out: dict[str, Any] = {"id": self.ids[i], "task": str(self.tasks[i])}
        for k in FIELDS:
            v = self.fields[k][i]
            out[k] = int(v) if k == "image_count" else (list(v) if k == "image_scene" else v)
        return out


def _per_record(values: Any, records: Sequence[Any], name: str) -> list[Any] | None:
    """Align an optional per-record input (mapping id -> value, or a sequence) with records."""
    if values is None:
        return None
    if isinstance(values, Mapping):
        return [values.get(r.id) for r in records]
    values = list(values)
    if len(values) != len(records):
        raise ValueError(f"{name}: {len(values)} values for {len(records)} records")
    return values


def _as_text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    return "\n".join(str(x) for x in v if x)


def _as_scenes(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,) if v else ()
    return tuple(str(x) for x in v if x)


def build_observables(records: Sequence[Any], ocr_texts: Any = None, image_desc: Any = None,
                      image_scene: Any = None, nearest_label: Any = None) -> Observables:
    """Observables of ``records`` (``Record``-like: id, task, label, images, user_text, ...).

    ``ocr_texts``, ``image_desc``, ``image_scene`` and ``nearest_label`` are optional: a
    mapping record id -> value or a sequence aligned with ``records``; a value may be a string
    or a list (one per image: texts are joined by newlines, scenes kept as a tuple);
    ``nearest_label`` is one label string per record (computed once per dataset, e.g. by
    ``representations.NeighbourVotes.nearest``, so rule execution stays a set look-up).
    """
    n = len(records)
    ocr = _per_record(ocr_texts, records, "ocr_texts")
    desc = _per_record(image_desc, records, "image_desc")
    scene = _per_record(image_scene, records, "image_scene")
    near = _per_record(nearest_label, records, "nearest_label")
    f: dict[str, Any] = {
        "user_text": [getattr(r, "user_text", "") or "" for r in records],
        "last_user_turn": [getattr(r, "last_user_turn", "") or "" for r in records],
        "ocr_text": [_as_text(v) for v in ocr] if ocr is not None else [""] * n,
        "image_desc": [_as_text(v) for v in desc] if desc is not None else [""] * n,
        "image_count": np.array([len(getattr(r, "images", ()) or ()) for r in records],
                                dtype=np.int64),
        "image_scene": [_as_scenes(v) for v in scene] if scene is not None else [()] * n,
        "nearest_label": [str(v or "") for v in near] if near is not None else [""] * n,
    }
    available = {"user_text", "last_user_turn", "image_count"}
    available |= {k for k, v in (("ocr_text", ocr), ("image_desc", desc),
                                 ("image_scene", scene), ("nearest_label", near))
                  if v is not None}
    labels = [getattr(r, "label", None) for r in records]
    y = label_indices(labels) if all(lab is not None for lab in labels) and n else None
    return Observables([r.id for r in records], np.array([r.task for r in records], dtype=object),
                       f, frozenset(available), y)


def concat_observables(*parts: Observables) -> Observables:
    """Observables of several datasets stacked in order (labels kept only if all have them)."""
    f: dict[str, Any] = {}
    for k in FIELDS:
        vals = [p.fields[k] for p in parts]
        f[k] = np.concatenate(vals) if isinstance(vals[0], np.ndarray) else \
            [v for vs in vals for v in vs]
    labels = None if any(p.labels is None for p in parts) else \
        np.concatenate([p.labels for p in parts])
    return Observables([i for p in parts for i in p.ids], np.concatenate([p.tasks for p in parts]),
                       f, frozenset().union(*(p.available for p in parts)), labels,
                       embed=next((p.embed for p in parts if p.embed is not None), None))


# --------------------------------------------------------------------------------------------
# Semantic conditions (issue 15 item 1b)
# --------------------------------------------------------------------------------------------

def _normalised(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def semantic_similarity(obs: Observables, field_name: str, texts: Sequence[str]) -> np.ndarray:
    """(n,) max cosine similarity of each record's ``field_name`` with any of ``texts``.

    Records with an empty field get -1 (never similar). The records' embeddings are computed
    once per Observables and field (``obs.embed``, itself cached by content on disk).
    """
    if obs.embed is None:
        raise ValueError("a semantic condition needs Observables.embed (see "
                         "engine.semantic_embedder); these observables have none")
    vals = obs.fields[field_name]
    if field_name not in obs._emb:
        obs._emb[field_name] = _normalised(obs.embed(list(vals))) if len(vals) else \
            np.zeros((0, 1), np.float32)
    E = obs._emb[field_name]
    if not len(vals):
        return np.zeros(0, dtype=np.float32)
    Q = _normalised(obs.embed(list(texts)))
    sim = (E @ Q.T).max(axis=1)
    empty = np.fromiter((not str(v).strip() for v in vals), bool, len(vals))
    sim[empty] = -1.0
    return sim


def semantic_embedder(cache: Any = None, extractor: Any = None,
                      ) -> Callable[[Sequence[str]], np.ndarray]:
    """``texts -> (n, 384)`` multilingual-e5 embeddings (the profile's ``E5Embedder``), cached
    by text content in the feature cache, for ``Observables.embed``."""
    fc = cache if cache is not None else features.FeatureCache()

    def embed(texts: Sequence[str]) -> np.ndarray:
        return features.embed_texts(list(texts), fc, extractor=extractor, progress=False)

    return embed


def with_embedder(obs: Observables, embed: Callable[[Sequence[str]], np.ndarray]
                  ) -> Observables:
    """``obs`` with ``embed`` attached, so semantic conditions can be evaluated on it."""
    obs.embed = embed
    obs._emb.clear()
    return obs


# --------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------

@dataclass
class RuleResult:
    """What a rule set did on a dataset.

    ``fired[i]``: index of the rule that fired on record i (decision-list order), -1 if none;
    ``label_idx[i]``: its label index (-1 if none); ``masks``: (n_rules, n) matches of each rule
    on its own (ignoring order); ``support``/``correct``: per rule, records it fired on and how
    many of those were right (``correct`` is None without gold labels); ``precision``: per rule,
    the precision used by collaboration (measured when gold labels were given, else taken from
    the rules' stats, NaN where unknown).
    """

    rules: list[Rule]
    ids: list[str]
    fired: np.ndarray
    label_idx: np.ndarray
    masks: np.ndarray
    support: np.ndarray
    correct: np.ndarray | None
    precision: np.ndarray

    @property
    def labels(self) -> list[str | None]:
        return label_strings(self.label_idx)

    @property
    def fired_ids(self) -> list[str | None]:
        return [None if j < 0 else self.rules[j].id for j in self.fired]

    @property
    def coverage(self) -> float:
        return float((self.fired >= 0).mean()) if len(self.fired) else 0.0

    def table(self) -> pd.DataFrame:
        """Per-rule coverage and precision on this dataset."""
        n = max(len(self.ids), 1)
        return pd.DataFrame({
            "rule": [r.id for r in self.rules], "task": [r.task for r in self.rules],
            "label": [r.label for r in self.rules],
            "matches": self.masks.sum(axis=1) if len(self.rules) else np.zeros(0, int),
            "fired": self.support, "coverage": self.support / n,
            "correct": self.correct if self.correct is not None else np.full(len(self.rules),
                                                                             np.nan),
            "precision": self.precision,
        })


class RuleEngine:
    """Executes rules over one ``Observables`` table, caching condition and rule masks."""

    def __init__(self, obs: Observables):
        self.obs = obs
        self.n = len(obs)
        self._cond: dict[tuple, np.ndarray] = {}
        self._rule: dict[tuple, np.ndarray] = {}
        self._task: dict[str, np.ndarray] = {}
        self.stats = {"condition_evals": 0, "rule_evals": 0}
        self._arange = np.arange(self.n)

    def task_mask(self, task: str) -> np.ndarray:
        if task not in self._task:
            self._task[task] = np.asarray(self.obs.tasks == task, dtype=bool)
        return self._task[task]

    def condition_mask(self, c: Condition) -> np.ndarray:
        m = self._cond.get(c.key)
        if m is None:
            m = self._eval_condition(c)
            m.setflags(write=False)
            self._cond[c.key] = m
            self.stats["condition_evals"] += 1
        return m

    def _eval_condition(self, c: Condition) -> np.ndarray:
        kind = FIELDS[c.field]
        vals = self.obs.fields[c.field]
        if c.op in SEMANTIC_OPS:
            m = semantic_similarity(self.obs, c.field, c.value) >= c.cosine_threshold
        elif kind == "label":  # exact label match (keyword_any is its only operator)
            ks = set(c.value)
            m = np.fromiter((v in ks for v in vals), bool, self.n)
        elif kind == "numeric":
            m = _NUMERIC[c.op](np.asarray(vals), c.value)
        elif kind == "scene":
            if c.op == "regex":
                rx = re.compile(c.value)
                m = np.fromiter((any(rx.search(s) for s in v) for v in vals), bool, self.n)
            elif c.op == "keyword_any":
                ks = set(c.value)
                m = np.fromiter((not ks.isdisjoint(v) for v in vals), bool, self.n)
            else:
                ks = set(c.value)
                m = np.fromiter((ks.issubset(v) for v in vals), bool, self.n)
        else:  # text
            if c.op == "regex":
                rx = re.compile(c.value)
                m = np.fromiter((rx.search(t) is not None for t in vals), bool, self.n)
            else:
                low = self.obs.lower(c.field)
                ks = [k.lower() for k in c.value]
                agg = any if c.op == "keyword_any" else all
                m = np.fromiter((agg(k in t for k in ks) for t in low), bool, self.n)
        m = np.asarray(m, dtype=bool)
        return ~m if c.negate else m

    def rule_mask(self, rule: Rule) -> np.ndarray:
        key = rule.key
        m = self._rule.get(key)
        if m is None:
            m = self.task_mask(rule.task).copy()
            for c in rule.conditions:
                m &= self.condition_mask(c)
            m.setflags(write=False)
            self._rule[key] = m
            self.stats["rule_evals"] += 1
        return m

    def apply(self, rules: Sequence[Rule], y: np.ndarray | None = None,
              precision: np.ndarray | Sequence[float] | None = None) -> RuleResult:
        """Run ``rules`` as a decision list.

        With gold label indices ``y`` the per-rule precision is measured here (correct / fired);
        otherwise ``precision`` is used if given, else each rule's ``stats['precision']``.
        """
        rules = list(rules)
        k, n = len(rules), self.n
        if k:
            masks = np.array([self.rule_mask(r) for r in rules])
            first = masks.argmax(axis=0)
            anyf = masks[first, self._arange]
            fired = np.where(anyf, first, -1)
            rule_lab = np.array([LABEL_INDEX[r.label] for r in rules], dtype=np.int64)
            label_idx = np.where(anyf, rule_lab[first], -1)
            support = np.bincount(fired[anyf], minlength=k)
        else:
            masks = np.zeros((0, n), dtype=bool)
            fired = np.full(n, -1, dtype=np.int64)
            label_idx = fired.copy()
            support = np.zeros(0, dtype=np.int64)
        correct = None
        if y is not None:
            ok = (label_idx == y) & (fired >= 0)
            correct = np.bincount(fired[ok], minlength=k) if k else np.zeros(0, np.int64)
            with np.errstate(invalid="ignore", divide="ignore"):
                prec = np.where(support > 0, correct / np.maximum(support, 1), np.nan)
        elif precision is not None:
            prec = np.asarray(precision, dtype=float)
        else:
            prec = np.array([np.nan if r.precision is None else r.precision for r in rules],
                            dtype=float)
        return RuleResult(rules, self.obs.ids, fired, label_idx, masks, support, correct, prec)


#: combine(proba (n, 48), rule_result) -> final label indices (n,): the interface between a
#: rule set and a collaboration strategy (the strategies live in ``kdsl_utils.collab``).
CombineFn = Callable[[np.ndarray, RuleResult], np.ndarray]


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def rules_table(rules: Sequence[Rule] | Any, result: RuleResult | None = None) -> pd.DataFrame:
    """A readable table of a rule base (decision-list order), for notebooks.

    With a ``RuleResult`` the coverage/precision measured on that dataset are added.
    """
    rules = list(getattr(rules, "rules", rules))
    df = pd.DataFrame({
        "priority": np.arange(1, len(rules) + 1),
        "id": [r.id for r in rules], "task": [r.task for r in rules],
        "label": [r.label for r in rules],
        "conditions": [" AND ".join(c.describe() for c in r.conditions) for r in rules],
        "rationale": [r.rationale for r in rules],
        "support": [r.stats.get("support") for r in rules],
        "precision": [r.stats.get("precision") for r in rules],
        "fold": [r.stats.get("fold") for r in rules],
        "proposer": [r.provenance.get("proposer") for r in rules],
    })
    if result is not None:
        t = result.table()
        df["fired"] = t["fired"].to_numpy()
        df["measured_precision"] = t["precision"].to_numpy()
    return df
