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

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import sparse

from ..data.labels import ALL_LABELS, IMAGE_TASK, LABEL_TO_TASK
from ..hashing import stable_int
from .engine import LABEL_INDEX, Observables, RuleEngine
from .schema import FIELDS, Condition, Rule, RuleValidationError, rule_id_for, validate_rule


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
        from sklearn.feature_extraction.text import CountVectorizer

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
                if c.get("op") in ("keyword_any", "keyword_all") and isinstance(c.get("value"),
                                                                                  str):
                    c["value"] = [c["value"]]
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
            else:
                items.append(v)
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
}


class LLMProposer(Proposer):
    """Asks a (small) language model for rules; ``generate(prompt) -> str`` is injected.

    ``train`` (labelled ``Observables``), when given, supplies typical examples of the target
    label for the prompt and the support/precision measured for each returned rule.
    ``descriptions`` maps labels to a short gloss. ``count_tokens(text) -> int`` enables token
    accounting (prompt + answer); characters are always counted.
    """

    name = "llm"

    def __init__(self, generate: Callable[[str], str], *, train: Observables | None = None,
                 descriptions: Mapping[str, str] | None = None, fields: Sequence[str] | None = None,
                 max_examples: int = 6, max_chars: int = 240, n_typical: int = 2,
                 count_tokens: Callable[[str], int] | None = None, seed: int = 0):
        super().__init__(seed)
        self.generate = generate
        self.train = train
        self.engine = RuleEngine(train) if train is not None and train.labels is not None \
            else None
        self.descriptions = dict(descriptions or {})
        avail = train.available if train is not None else frozenset(FIELDS)
        self.fields = [f for f in (fields or FIELDS) if f in avail]
        self.max_examples, self.max_chars, self.n_typical = max_examples, max_chars, n_typical
        self.count_tokens = count_tokens
        self.tokens = 0 if count_tokens is not None else None
        self.prompt_chars = 0
        self.answer_chars = 0
        self.n_valid = 0
        self.n_invalid = 0
        self.invalid_kinds: Counter[str] = Counter()
        self.invalid_examples: list[dict[str, Any]] = []
        self.last_prompt = ""
        self.last_answer = ""

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
            "You write rules for an e-commerce customer-service classifier.",
            f"Task: {TASK_DESCRIPTIONS[task]}.",
            f'Target label: "{target_label}"' + (f" — {desc}" if desc else "") + ".",
        ]
        if self.train is not None and self.train.labels is not None and self.n_typical:
            rows = np.flatnonzero(self.train.labels == LABEL_INDEX[target_label])
            if len(rows):
                pick = sorted(rng.choice(rows, min(self.n_typical, len(rows)), replace=False))
                lines.append("Typical records with this label:")
                for i in pick:
                    lines += self._fields_text(self.train.record(int(i)), task)
                    lines.append("    --")
        if pick_fn or pick_fp:
            lines.append("The current classifier makes these mistakes:")
        for n, e in enumerate(pick_fn + pick_fp, 1):
            lines.append(f"[{n}] true label: {e.gold} | predicted: {e.predicted or '(none)'}")
            lines += self._fields_text(e.fields, e.task)
        lines += [
            f'Write up to {k} rules that recognise "{target_label}" in the records of the '
            "first kind without matching the others.",
            'A rule is a JSON object {"label": ..., "conditions": [...], "rationale": ...}; '
            "a record gets the label when ALL conditions hold.",
            'A condition is {"field": F, "op": OP, "value": V} with optional "negate": true.',
            "Fields: " + "; ".join(f"{f} ({FIELD_DESCRIPTIONS[f]})" for f in self.fields) + ".",
            "Operators: keyword_any / keyword_all (V: list of strings found in the text), "
            "regex (V: a Python regular expression), eq ne gt ge lt le (image_count; V: number).",
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

    def _propose(self, target_label: str, errors: list[ErrorExample], k: int,
                 call: int, context: tuple[Rule, ...] = ()) -> list[Rule]:
        prompt = self.build_prompt(target_label, errors, k)
        answer = self.generate(prompt)
        self.last_prompt, self.last_answer = prompt, answer
        self.prompt_chars += len(prompt)
        self.answer_chars += len(answer)
        if self.count_tokens is not None:
            self.tokens = (self.tokens or 0) + self.count_tokens(prompt) + \
                self.count_tokens(answer)
        rep = parse_rules(answer, target_label, id_prefix=f"llm{call}", call=call,
                          proposer=self.name)
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
            rid = rule_id_for(r.task, r.label, r.conditions, prefix="l")
            if all(rid != x.id for x in rules):
                rules.append(r.replace(id=rid, provenance={**r.provenance, "parsed_id": r.id}))
        return _measure(rules[:k], self.engine, "train")

    def cost(self) -> dict[str, Any]:
        return {**super().cost(), "prompt_chars": self.prompt_chars,
                "answer_chars": self.answer_chars, "valid_rules": self.n_valid,
                "invalid_rules": self.n_invalid, "invalid_kinds": dict(self.invalid_kinds)}
