"""Rules as data: the rule format, its JSON schema, validation and versioned rule-base files.

A rule (DESIGN.md, method point 3) is a JSON object::

    {"id": "r1", "task": "intent", "label": "商品材质",
     "conditions": [{"field": "user_text", "op": "keyword_any", "value": ["材质", "材料"]},
                    {"field": "image_count", "op": "ge", "value": 1, "negate": true}],
     "rationale": "asks what the product is made of",
     "stats": {"support": 12, "precision": 0.92, "fold": "train"},
     "provenance": {"proposer": "data", "call": 3}}

A condition tests one observable field of a record (``FIELDS``) with one operator:

- ``keyword_any`` / ``keyword_all``: ``value`` is a non-empty list of strings; on text fields a
  keyword matches as a case-insensitive substring, on ``image_scene`` as an exact scene label;
- ``regex``: ``value`` is a pattern (Python ``re``, searched, case-sensitive unless ``(?i)``);
- on ``nearest_label`` (the label of the record's nearest training record of its task in
  notebook 04's representation, ``representations.NeighbourVotes.nearest``) only
  ``keyword_any``: ``value`` lists labels of the rule's task, matched exactly;
- ``eq ne gt ge lt le``: numeric comparison of ``image_count`` with a number;
- ``semantic``: ``value`` is a non-empty list of short texts the small model wrote for the
  label (a description, paraphrased customer questions); the condition holds where the
  field's multilingual-e5 embedding has cosine similarity >= ``threshold`` (default
  ``SEMANTIC_THRESHOLD``) with at least one of them (``engine.Observables.embed``);
- ``negate: true`` inverts the test.

A record satisfies a rule when it is of the rule's task and satisfies every condition. A rule
base file is ``{"schema_version": "1.0", "rules": [...], "meta": {...}}``; ``load_rulebase``
validates it (JSON schema, then semantic checks) and raises ``RuleValidationError`` naming the
offending rule id and the problem.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import jsonschema

from ..data.labels import IMAGE_LABELS, LABEL_TO_TASK, TASKS, near_miss
from ..hashing import sha1_text
from ..results import atomic_write

SCHEMA_VERSION = "1.0"
SUPPORTED_VERSIONS = ("1.0",)

#: Observable fields a condition may test, and their kind.
FIELDS: dict[str, str] = {
    "user_text": "text",        # all customer turns of the dialogue
    "last_user_turn": "text",   # the last customer turn
    "ocr_text": "text",         # OCR text of the record's images
    "image_desc": "text",       # the small model's description of the images
    "image_count": "numeric",   # number of images attached to the record
    "image_scene": "scene",     # predicted scene label(s) of the attached images
    "nearest_label": "label",   # label of the nearest training record (representations)
}
KEYWORD_OPS = ("keyword_any", "keyword_all")
NUMERIC_OPS = ("eq", "ne", "gt", "ge", "lt", "le")
# Semantic conditions (issue 15 item 1b): the text is the small model's, the test is meaning.
SEMANTIC_OPS = ("semantic",)
#: default cosine threshold of a semantic condition (e5 passage embeddings; the search tunes it)
SEMANTIC_THRESHOLD = 0.88
OPS = KEYWORD_OPS + ("regex",) + NUMERIC_OPS + SEMANTIC_OPS
OPS_BY_KIND: dict[str, tuple[str, ...]] = {
    "text": KEYWORD_OPS + ("regex",) + SEMANTIC_OPS,
    "scene": KEYWORD_OPS + ("regex",),
    "numeric": NUMERIC_OPS,
    "label": ("keyword_any",),  # one label per record: "is one of these labels"
}
OP_SYMBOLS = {"keyword_any": "any", "keyword_all": "all", "regex": "~", "eq": "==", "ne": "!=",
              "gt": ">", "ge": ">=", "lt": "<", "le": "<=", "semantic": "≈"}

_CONDITION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["field", "op", "value"],
    "properties": {
        "field": {"type": "string"},
        "op": {"type": "string", "enum": list(OPS)},
        "value": {"anyOf": [
            {"type": "string"},
            {"type": "number"},
            {"type": "array", "items": {"type": "string"}},
        ]},
        "negate": {"type": "boolean"},
        "threshold": {"type": "number", "minimum": -1, "maximum": 1},  # semantic only
    },
    "additionalProperties": False,
}

#: JSON schema of one rule (semantic checks follow in ``validate_rule``).
RULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "task", "label", "conditions"],
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "task": {"type": "string", "enum": list(TASKS)},
        "label": {"type": "string"},
        "conditions": {"type": "array", "minItems": 1, "items": _CONDITION_SCHEMA},
        "rationale": {"type": "string"},
        "stats": {
            "type": "object",
            "properties": {
                "support": {"type": "integer", "minimum": 0},
                "precision": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "fold": {"type": "string"},
            },
        },
        "provenance": {"type": "object"},
    },
    "additionalProperties": False,
}

#: JSON schema of a rule-base file.
RULEBASE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema_version", "rules"],
    "properties": {
        "schema_version": {"type": "string"},
        "rules": {"type": "array", "items": {"type": "object"}},
        "meta": {"type": "object"},
    },
    "additionalProperties": False,
}



def rulebase_json_schema() -> dict[str, Any]:
    """The complete JSON schema of a rule-base file (rule schema inlined), e.g. for docs or
    for writing next to a rule base. Semantic checks (labels, regexes, field/operator
    agreement) are beyond JSON schema and live in ``check_rule``."""
    full = json.loads(json.dumps(RULEBASE_SCHEMA))
    full["properties"]["rules"]["items"] = json.loads(json.dumps(RULE_SCHEMA))
    full["properties"]["schema_version"]["enum"] = list(SUPPORTED_VERSIONS)
    full["title"] = "KDSL rule base"
    return full


_RULE_VALIDATOR = jsonschema.Draft202012Validator(RULE_SCHEMA)
_BASE_VALIDATOR = jsonschema.Draft202012Validator(RULEBASE_SCHEMA)


class RuleValidationError(ValueError):
    """A rule (or rule base) that breaks the schema; ``rule_id`` and ``kind`` say which and why.

    ``kind`` is one of: ``schema``, ``unknown_field``, ``bad_op``, ``bad_value``,
    ``unknown_label``, ``wrong_task``, ``bad_regex``, ``duplicate_id``, ``version``.
    """

    def __init__(self, rule_id: str | None, kind: str, problem: str, where: str = ""):
        self.rule_id, self.kind, self.problem = rule_id, kind, problem
        who = f"rule {rule_id!r}" if rule_id is not None else "rule base"
        loc = f"{where}: " if where else ""
        super().__init__(f"{loc}{who}: [{kind}] {problem}")


@dataclass(frozen=True)
class Condition:
    """One test of one observable field; hashable, so the engine caches its mask."""

    field: str
    op: str
    value: str | float | tuple[str, ...]
    negate: bool = False
    threshold: float | None = None  # semantic conditions only (None: SEMANTIC_THRESHOLD)

    @property
    def key(self) -> tuple:
        if self.op in SEMANTIC_OPS:
            return (self.field, self.op, self.value, self.negate, self.cosine_threshold)
        return (self.field, self.op, self.value, self.negate)

    @property
    def cosine_threshold(self) -> float:
        return SEMANTIC_THRESHOLD if self.threshold is None else float(self.threshold)

    def negated(self) -> Condition:
        return Condition(self.field, self.op, self.value, not self.negate, self.threshold)

    def with_threshold(self, threshold: float) -> Condition:
        """The same semantic condition at another cosine threshold (the search tunes it)."""
        return Condition(self.field, self.op, self.value, self.negate, float(threshold))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"field": self.field, "op": self.op,
                             "value": list(self.value) if isinstance(self.value, tuple)
                             else self.value}
        if self.negate:
            d["negate"] = True
        if self.threshold is not None:
            d["threshold"] = float(self.threshold)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Condition:
        v = d["value"]
        if isinstance(v, list):
            v = tuple(v)
        elif isinstance(v, bool):  # bool is an int in Python; the schema rejects it anyway
            v = float(v)
        elif isinstance(v, int):
            v = float(v)
        thr = d.get("threshold")
        return cls(str(d["field"]), str(d["op"]), v, bool(d.get("negate", False)),
                   None if thr is None else float(thr))

    def describe(self) -> str:
        if self.op in SEMANTIC_OPS:  # rendered as the text the model wrote
            s = (f"{self.field} ≈@{self.cosine_threshold:.2f} "
                 + " | ".join(f"“{t}”" for t in self.value))
            return f"NOT {s}" if self.negate else s
        if isinstance(self.value, tuple):
            val = "{" + ", ".join(self.value) + "}"
        elif isinstance(self.value, float) and self.value.is_integer():
            val = str(int(self.value))
        else:
            val = str(self.value)
        s = f"{self.field} {OP_SYMBOLS.get(self.op, self.op)} {val}"
        return f"NOT {s}" if self.negate else s


@dataclass(frozen=True)
class Rule:
    """A rule: if a record of ``task`` satisfies all ``conditions``, predict ``label``."""

    id: str
    task: str
    label: str
    conditions: tuple[Condition, ...]
    rationale: str = ""
    stats: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    provenance: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @cached_property
    def key(self) -> tuple:
        """Identity of what the rule does (task, label, conditions), ignoring id and stats."""
        return (self.task, self.label, tuple(sorted((c.key for c in self.conditions), key=repr)))

    @property
    def precision(self) -> float | None:
        p = self.stats.get("precision")
        return None if p is None else float(p)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "label": self.label,
                "conditions": [c.to_dict() for c in self.conditions],
                "rationale": self.rationale, "stats": dict(self.stats),
                "provenance": dict(self.provenance)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Rule:
        """Build a rule from a dict, validating it (raises ``RuleValidationError``)."""
        return validate_rule(d)

    def describe(self) -> str:
        return " AND ".join(c.describe() for c in self.conditions) + f"  =>  {self.label}"

    def replace(self, **changes: Any) -> Rule:
        d = {"id": self.id, "task": self.task, "label": self.label,
             "conditions": self.conditions, "rationale": self.rationale,
             "stats": self.stats, "provenance": self.provenance}
        d.update(changes)
        return Rule(**d)


def rule_id_for(task: str, label: str, conditions: Iterable[Condition], prefix: str = "r") -> str:
    """A deterministic id from what a rule does, so identical rules get identical ids."""
    payload = json.dumps([task, label, sorted(json.dumps(c.to_dict(), ensure_ascii=False,
                                                         sort_keys=True) for c in conditions)],
                         ensure_ascii=False)
    return f"{prefix}{sha1_text(payload, 10)}"


def make_rule(task: str, label: str, conditions: Sequence[Condition], *, rationale: str = "",
              stats: Mapping[str, Any] | None = None, provenance: Mapping[str, Any] | None = None,
              id: str | None = None) -> Rule:
    """Convenience constructor (id derived from content unless given); validates the result."""
    conds = tuple(conditions)
    rule = Rule(id or rule_id_for(task, label, conds), task, label, conds, rationale,
                dict(stats or {}), dict(provenance or {}))
    check_rule(rule)
    return rule


def _schema_problem(err: jsonschema.ValidationError) -> str:
    path = "/".join(str(p) for p in err.absolute_path)
    return f"{path or '(top level)'}: {err.message}"


def check_rule(rule: Rule, where: str = "") -> None:
    """Semantic checks of a built rule (field, operator, value, label, task, regex)."""
    rid = rule.id
    if rule.task not in TASKS:
        raise RuleValidationError(rid, "schema", f"task {rule.task!r} is not one of {TASKS}",
                                  where)
    if rule.label not in LABEL_TO_TASK:
        hint = near_miss(rule.label)
        extra = f" (did you mean {hint!r}? brackets/width differ)" if hint else ""
        raise RuleValidationError(rid, "unknown_label",
                                  f"label {rule.label!r} is not in the label registry{extra}",
                                  where)
    if LABEL_TO_TASK[rule.label] != rule.task:
        raise RuleValidationError(rid, "wrong_task",
                                  f"label {rule.label!r} belongs to task "
                                  f"{LABEL_TO_TASK[rule.label]!r}, not {rule.task!r}", where)
    if not rule.conditions:
        raise RuleValidationError(rid, "schema", "a rule needs at least one condition", where)
    for i, c in enumerate(rule.conditions):
        at = f"condition {i} ({c.field} {c.op})"
        if c.field not in FIELDS:
            raise RuleValidationError(rid, "unknown_field",
                                      f"{at}: unknown field {c.field!r}; known: "
                                      f"{', '.join(FIELDS)}", where)
        kind = FIELDS[c.field]
        if c.op not in OPS_BY_KIND[kind]:
            raise RuleValidationError(rid, "bad_op",
                                      f"{at}: operator {c.op!r} does not apply to {kind} field "
                                      f"{c.field!r}; use one of {OPS_BY_KIND[kind]}", where)
        if c.threshold is not None and c.op not in SEMANTIC_OPS:
            raise RuleValidationError(rid, "bad_value",
                                      f"{at}: only semantic conditions take a threshold", where)
        if c.op in KEYWORD_OPS:
            if (not isinstance(c.value, tuple) or not c.value
                    or not all(isinstance(k, str) and k.strip() for k in c.value)):
                raise RuleValidationError(rid, "bad_value",
                                          f"{at}: needs a non-empty list of non-empty keywords, "
                                          f"got {c.value!r}", where)
            if kind == "scene":
                bad = [k for k in c.value if k not in IMAGE_LABELS]
                if bad:
                    raise RuleValidationError(rid, "bad_value",
                                              f"{at}: {bad!r} are not image-scene labels", where)
            if kind == "label":
                bad = [k for k in c.value if LABEL_TO_TASK.get(k) != rule.task]
                if bad:
                    raise RuleValidationError(rid, "bad_value",
                                              f"{at}: {bad!r} are not labels of task "
                                              f"{rule.task!r}", where)
        elif c.op in SEMANTIC_OPS:
            if (not isinstance(c.value, tuple) or not c.value
                    or not all(isinstance(k, str) and k.strip() for k in c.value)):
                raise RuleValidationError(rid, "bad_value",
                                          f"{at}: needs a non-empty list of non-empty texts "
                                          f"(a description or paraphrased questions), "
                                          f"got {c.value!r}", where)
            if not -1.0 <= c.cosine_threshold <= 1.0:
                raise RuleValidationError(rid, "bad_value",
                                          f"{at}: cosine threshold {c.cosine_threshold} is "
                                          "outside [-1, 1]", where)
        elif c.op == "regex":
            if not isinstance(c.value, str) or not c.value:
                raise RuleValidationError(rid, "bad_value",
                                          f"{at}: regex needs a non-empty pattern string", where)
            try:
                re.compile(c.value)
            except re.error as e:
                raise RuleValidationError(rid, "bad_regex",
                                          f"{at}: pattern {c.value!r} does not compile: {e}",
                                          where) from None
        else:  # numeric
            if not isinstance(c.value, (int, float)) or isinstance(c.value, bool):
                raise RuleValidationError(rid, "bad_value",
                                          f"{at}: numeric operator needs a number, "
                                          f"got {c.value!r}", where)


def validate_rule(d: Mapping[str, Any], where: str = "") -> Rule:
    """Validate one rule dict (JSON schema, then semantics) and build the ``Rule``."""
    rid = d.get("id") if isinstance(d, Mapping) else None
    rid = rid if isinstance(rid, str) else None
    if not isinstance(d, Mapping):
        raise RuleValidationError(None, "schema", f"a rule must be an object, got {type(d)}",
                                  where)
    errors = sorted(_RULE_VALIDATOR.iter_errors(dict(d)), key=lambda e: list(e.absolute_path))
    if errors:
        raise RuleValidationError(rid, "schema", _schema_problem(errors[0]), where)
    rule = Rule(id=d["id"], task=d["task"], label=d["label"],
                conditions=tuple(Condition.from_dict(c) for c in d["conditions"]),
                rationale=d.get("rationale", ""), stats=dict(d.get("stats", {})),
                provenance=dict(d.get("provenance", {})))
    check_rule(rule, where)
    return rule


@dataclass
class RuleBase:
    """A versioned, ordered list of rules (the order is the decision-list priority)."""

    rules: list[Rule]
    meta: dict[str, Any] = field(default_factory=dict)
    schema_version: str = SCHEMA_VERSION

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self):
        return iter(self.rules)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "rules": [r.to_dict() for r in self.rules],
                "meta": self.meta}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=1))
        return path

    @classmethod
    def from_dict(cls, d: Any, where: str = "") -> RuleBase:
        if not isinstance(d, Mapping):
            raise RuleValidationError(None, "schema", "a rule base must be a JSON object", where)
        errors = sorted(_BASE_VALIDATOR.iter_errors(dict(d)), key=lambda e: list(e.absolute_path))
        if errors:
            raise RuleValidationError(None, "schema", _schema_problem(errors[0]), where)
        if d["schema_version"] not in SUPPORTED_VERSIONS:
            raise RuleValidationError(None, "version",
                                      f"schema_version {d['schema_version']!r} is not supported "
                                      f"(supported: {SUPPORTED_VERSIONS})", where)
        rules, seen = [], set()
        for i, rd in enumerate(d["rules"]):
            rule = validate_rule(rd, where=f"{where + ' ' if where else ''}rules[{i}]")
            if rule.id in seen:
                raise RuleValidationError(rule.id, "duplicate_id",
                                          "rule id occurs more than once", where)
            seen.add(rule.id)
            rules.append(rule)
        return cls(rules, dict(d.get("meta", {})), d["schema_version"])


def load_rulebase(path: str | Path) -> RuleBase:
    """Read and validate a rule-base JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise RuleValidationError(None, "schema", f"not valid JSON: {e}", str(path)) from None
    return RuleBase.from_dict(data, where=str(path))
