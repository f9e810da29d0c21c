"""Collaborative prediction: the fine-tuned large model and the rule base decide together
(DESIGN.md, method point 5).

Three strategies, each a ``CombineFn`` (``(proba (n, 48), RuleResult) -> label indices``) so
that MCTS can optimise exactly what ships:

* **override** — the first rule that fires (decision-list order) replaces the model's
  argmax when its trust (precision) is at least ``threshold`` (:func:`override`; also the
  reward of the rule search, so the search optimises what ships);
* **fusion** — log-linear: ``score(y) = log p(y) + w · Σ_r match_r · [label_r = y] ·
  logit(precision_r)`` over *every* matching trusted rule (not only the first), restricted to
  the record's candidates (labels where the model puts zero mass never win);
* **prompt injection** (paper profile) — the rules that match a record are written into the
  large model's prompt (:func:`inject_rules`) and the model scores the labels again.

The strategy is chosen on the held-out part of the dev fold, which the rule search never
scored (:func:`choose_on_dev`, :func:`ship`), never on a test set; a rule set ships only if
its chosen strategy beats the model alone there. Per record the output keeps which source
decided and which rule fired (:func:`decisions`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .data.labels import ALL_LABELS
from .data.records import Record
from .metrics import weighted_f1_idx
from .rules.engine import CombineFn, RuleResult
from .rules.mcts import EvalSet, SearchResult

_EPS = 1e-6


def override(pred_proba: Any, rule_result: RuleResult, precision_threshold: float,
             min_support: int = 1) -> np.ndarray:
    """Final label indices: the model's argmax, overridden where a rule fired whose precision
    (``rule_result.precision``) is >= ``precision_threshold`` and whose support is >=
    ``min_support``. ``pred_proba`` is a ``Predictions`` or an (n, 48) array."""
    proba = np.asarray(getattr(pred_proba, "proba", pred_proba))
    out = proba.argmax(axis=1).astype(np.int64)
    if len(rule_result.rules) == 0:
        return out
    trusted = rule_result.precision >= precision_threshold  # NaN (unknown) is never trusted
    if min_support > 1:
        trusted &= rule_result.support >= min_support
    f = rule_result.fired
    use = (f >= 0) & trusted[np.maximum(f, 0)]
    out[use] = rule_result.label_idx[use]
    return out


def make_override(precision_threshold: float, min_support: int = 1) -> CombineFn:
    """``override`` with its threshold bound, in the ``CombineFn`` shape MCTS expects."""

    def combine(proba: np.ndarray, result: RuleResult) -> np.ndarray:
        return override(proba, result, precision_threshold, min_support)

    combine.__name__ = f"override@{precision_threshold:g}"
    return combine


def fusion(proba: np.ndarray, result: RuleResult, weight: float = 1.0,
           min_precision: float = 0.5) -> np.ndarray:
    """Label indices of the log-linear fusion of model probabilities and rule votes.

    Rules with unknown precision or precision below ``min_precision`` do not vote. A vote's
    strength is ``logit(precision)`` clipped to [0, 6]: a rule right 90% of the time adds
    2.2 nats (times ``weight``) to its label.
    """
    proba = np.asarray(getattr(proba, "proba", proba), dtype=np.float64)
    score = np.log(np.clip(proba, _EPS, 1.0))
    score[proba <= 0] = -np.inf  # not a candidate of this record
    if len(result.rules):
        prec = np.clip(np.nan_to_num(result.precision, nan=0.0), _EPS, 1 - _EPS)
        strength = np.clip(np.log(prec / (1 - prec)), 0.0, 6.0) * (prec >= min_precision)
        lab = np.array([ALL_LABELS.index(r.label) for r in result.rules])
        votes = np.zeros_like(score)
        # (n_rules, n) matches → add each rule's strength to its label column
        np.add.at(votes.T, lab, result.masks * strength[:, None])
        score = score + weight * votes
    return score.argmax(axis=1).astype(np.int64)


def make_fusion(weight: float = 1.0, min_precision: float = 0.5) -> CombineFn:
    def combine(proba: np.ndarray, result: RuleResult) -> np.ndarray:
        return fusion(proba, result, weight, min_precision)

    combine.__name__ = f"fusion@w={weight:g},p>={min_precision:g}"
    return combine


def strategy_grid() -> dict[str, CombineFn]:
    """The candidate strategies ``choose_on_dev`` compares (name → combine function)."""
    grid: dict[str, CombineFn] = {}
    grid["model"] = lambda proba, result: np.asarray(proba).argmax(axis=1).astype(np.int64)
    for t in (0.6, 0.7, 0.8, 0.9, 1.0):
        grid[f"override@{t:g}"] = make_override(t)
    for w in (0.25, 0.5, 1.0, 2.0):
        for p in (0.5, 0.7):
            grid[f"fusion@w={w:g},p>={p:g}"] = make_fusion(w, p)
    return grid


def choose_on_dev(proba_dev: np.ndarray, result_dev: RuleResult, y_dev: np.ndarray,
                  grid: dict[str, CombineFn] | None = None) -> tuple[str, pd.DataFrame]:
    """Score every strategy on the dev fold; return the best name and the table (name,
    family, dev_weighted_f1). Ties go to the earlier (simpler) entry."""
    grid = grid or strategy_grid()
    rows = [{"strategy": name, "family": name.split("@")[0],
             "dev_weighted_f1": weighted_f1_idx(np.asarray(y_dev), fn(proba_dev, result_dev))}
            for name, fn in grid.items()]
    table = pd.DataFrame(rows)
    best = table.loc[table["dev_weighted_f1"].idxmax(), "strategy"]
    return str(best), table


def ship(result: SearchResult, holdout: EvalSet, grid: dict[str, CombineFn] | None = None
         ) -> SearchResult:
    """Choose the collaboration strategy for ``result``'s rules on the held-out part of the
    dev fold (rules at their held-out trust, ``rules.mcts.trust``) and ship the rules only if
    that strategy's weighted F1 there beats the model alone (strictly); otherwise the empty
    rule set ships (``shipped=False``, strategy ``"model"``). The same function decides for
    MCTS and top-N, so both get their own strategy by the same procedure.

    The held-out part serves both the choice and the gate, so the gate is optimistic by the
    best-of-grid selection (13 strategies); it is still out of sample for the search, which
    is what the search-part gains were not."""
    grid = grid or strategy_grid()
    found = list(result.rules)
    res = holdout.engine.apply(found)  # precision = the rules' stats: held-out trust
    best, table = choose_on_dev(holdout.proba, res, holdout.y, grid)
    base = weighted_f1_idx(holdout.y, holdout.base_pred)
    gain = float(table.set_index("strategy").loc[best, "dev_weighted_f1"]) - base
    table = table.assign(holdout_model_f1=base)
    ok = bool(found) and gain > 1e-12
    rest = table[table.strategy != "model"]  # for the diagnostic row without the gate
    ungated = str(rest.loc[rest["dev_weighted_f1"].idxmax(), "strategy"])
    return dataclasses.replace(result, rules=found if ok else [], found=found, shipped=ok,
                               strategy=best if ok else "model", strategy_table=table,
                               params={**result.params, "holdout_gain_chosen": gain,
                                       "ungated_strategy": ungated})


def decisions(proba: np.ndarray, result: RuleResult, final: np.ndarray) -> pd.DataFrame:
    """Per record: id, model label, final label, source (``model`` / ``rule``) and the rule
    that fired (decision-list first match), whether or not it was trusted."""
    proba = np.asarray(getattr(proba, "proba", proba))
    model = proba.argmax(axis=1)
    fired = result.fired_ids
    return pd.DataFrame({
        "id": result.ids, "model_pred": [ALL_LABELS[i] for i in model],
        "final_pred": [ALL_LABELS[i] for i in final],
        "source": np.where(final != model, "rule", "model"),
        "fired_rule": fired,
    })


def describe_rule(rule) -> str:
    """A rule as one Chinese sentence for a prompt: 若<conditions>，则倾向于「label」."""
    parts = []
    for c in rule.conditions:
        v = c.value if isinstance(c.value, str | int | float) else "、".join(map(str, c.value))
        op = {"keyword_any": "含任一", "keyword_all": "同时含", "regex": "匹配"}.get(c.op, c.op)
        parts.append(f"{'不' if c.negate else ''}{c.field}{op}「{v}」")
    return f"若{'且'.join(parts)}，则倾向于「{rule.label}」"


def inject_rules(record: Record, rules: Sequence[Any], marker: str = "参考规则") -> Record:
    """A copy of ``record`` whose instruction carries the given (matching) rules as hints,
    placed before the candidate-label sentence so the label list stays the prompt's tail."""
    if not rules:
        return record
    hint = f"{marker}（由小模型总结，仅供参考）：\n" + "\n".join(
        f"{k + 1}. {describe_rule(r)}" for k, r in enumerate(rules)) + "\n"
    instr = record.instruction
    cut = max(instr.rfind("请直接只输出"), instr.rfind("以下是可以参考的分类标签"))
    cut = cut if cut >= 0 else len(instr)
    return dataclasses.replace(record, instruction=instr[:cut] + hint + instr[cut:])


def injected_records(records: Sequence[Record], result: RuleResult,
                     max_rules: int = 3) -> list[Record]:
    """Every record with the (up to ``max_rules``) rules that match it injected."""
    out = []
    for i, r in enumerate(records):
        idx = np.flatnonzero(result.masks[:, i])[:max_rules] if len(result.rules) else []
        out.append(inject_rules(r, [result.rules[j] for j in idx]))
    return out


ScoreFn = Callable[[Sequence[Record]], np.ndarray]
