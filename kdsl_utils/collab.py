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
scored (:func:`choose_on_dev`, :func:`ship`), never on a test set. Whether the rules ship is
decided **out of sample** there too (:func:`gate_gain`): by default K-fold cross-fitting —
rule trust and the strategy chosen on K-1 folds, the gain scored on the remaining fold, the
out-of-fold predictions pooled — so the best-of-grid choice (13 strategies) cannot by itself
make a rule set look useful. Per record the output keeps which source decided and which rule
fired (:func:`decisions`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .data.labels import ALL_LABELS
from .data.records import Record
from .data.splits import stratified_folds
from .metrics import weighted_f1_idx
from .rules.engine import CombineFn, RuleResult
from .rules.mcts import EvalSet, SearchResult, split_dev, trust

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


GATES = ("crossfit", "split", "insample")


def _prior(rules: Sequence[Any]) -> np.ndarray:
    """Each rule's precision before the held-out part: its training precision
    (``provenance['train_stats']``, kept by ``rules.mcts._finalise``), else its stats'."""
    out = []
    for r in rules:
        p = dict(r.provenance.get("train_stats") or {}).get("precision", r.precision)
        out.append(np.nan if p is None else float(p))
    return np.array(out, dtype=float)


def _choose_then_predict(rules: Sequence[Any], choose: EvalSet, verify: EvalSet,
                         grid: dict[str, CombineFn], prior: np.ndarray) -> tuple[str, np.ndarray]:
    """Rule trust measured on ``choose`` (``rules.mcts.trust``), the strategy chosen there,
    and that strategy's labels on ``verify`` (with the same trust: ``verify``'s gold labels
    are never read)."""
    meas = choose.engine.apply(rules, y=choose.y)
    tr = trust(meas.correct, meas.support, prior) if len(rules) else np.zeros(0)
    best, _ = choose_on_dev(choose.proba, choose.engine.apply(rules, precision=tr), choose.y, grid)
    return best, np.asarray(grid[best](verify.proba, verify.engine.apply(rules, precision=tr)))


def gate_gain(rules: Sequence[Any], holdout: EvalSet, *, gate: str = "crossfit",
              folds: int = 5, verify_fraction: float = 0.5, seed: int = 0,
              grid: dict[str, CombineFn] | None = None) -> tuple[float, pd.DataFrame]:
    """The held-out weighted-F1 gain (fraction) of the *procedure* "trust the rules, choose a
    strategy, apply it" over the model alone, and one row per fold (fold, n, strategy chosen
    without that fold, the fold's own gain).

    * ``crossfit``: ``folds`` stratified folds (:func:`.data.splits.stratified_folds`, at
      most one per record);
      fold k's labels come from the trust and strategy chosen on the other folds; the gain is
      F1(out-of-fold labels) − F1(model) over the whole held-out part;
    * ``split``: chosen on ``1 - verify_fraction`` of it, scored on the rest (stratified);
    * ``insample``: chosen and scored on the same records (the best-of-grid gain; optimistic).

    Rules whose trust the choice part cannot measure (they never fire there) keep a shrunk
    copy of their training precision, as :func:`rules.mcts.trust` says."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    grid = grid or strategy_grid()
    rules, y = list(rules), holdout.y
    base = weighted_f1_idx(y, holdout.base_pred)
    prior = _prior(rules)
    if gate == "insample" or len(y) < 2:  # one record cannot be split: scored in sample
        best, pred = _choose_then_predict(rules, holdout, holdout, grid, prior)
        return (weighted_f1_idx(y, pred) - base,
                pd.DataFrame([{"fold": 0, "n": len(y), "strategy": best,
                               "gain": weighted_f1_idx(y, pred) - base}]))
    if gate == "split":
        c_idx, v_idx = split_dev(y, verify_fraction, seed)
        if not (len(c_idx) and len(v_idx)):  # no record to choose on or to verify: no evidence
            return 0.0, pd.DataFrame([{"fold": 0, "n": len(v_idx), "strategy": "model",
                                       "gain": 0.0}])
        parts = [(c_idx, v_idx)]
    else:
        f = stratified_folds(y, min(folds, len(y)), seed)
        parts = [(np.flatnonzero(f != k), np.flatnonzero(f == k)) for k in np.unique(f)]
    oof = np.full(len(y), -1, dtype=np.int64)
    rows = []
    for k, (c_idx, v_idx) in enumerate(parts):
        verify = holdout.subset(v_idx)
        best, pred = _choose_then_predict(rules, holdout.subset(c_idx), verify, grid, prior)
        oof[v_idx] = pred
        rows.append({"fold": k, "n": len(v_idx), "strategy": best,
                     "gain": weighted_f1_idx(verify.y, pred)
                     - weighted_f1_idx(verify.y, verify.base_pred)})
    scored = oof >= 0  # split: only the verify part is scored
    gain = weighted_f1_idx(y[scored], oof[scored]) - weighted_f1_idx(y[scored],
                                                                     holdout.base_pred[scored])
    return gain, pd.DataFrame(rows)


def ship(result: SearchResult, holdout: EvalSet, grid: dict[str, CombineFn] | None = None, *,
         gate: str = "crossfit", folds: int = 5, verify_fraction: float = 0.5, seed: int = 0
         ) -> SearchResult:
    """Choose the collaboration strategy for ``result``'s rules on the held-out part of the
    dev fold (rules at their held-out trust, ``rules.mcts.trust``) and ship the rules only if
    (a) that strategy beats the model alone there and (b) the out-of-sample gain of the
    choice (:func:`gate_gain` with ``gate``; cross-fitted by default) is positive; otherwise
    the empty rule set ships (``shipped=False``, strategy ``"model"``). The same function
    decides for MCTS and top-N, so both get their own strategy by the same procedure.

    ``params``: ``holdout_gain_chosen`` (the gain the gate used), ``holdout_gain_insample``
    (the chosen strategy's gain on the records it was chosen on), ``gate``, ``gate_folds``
    (per fold: strategy chosen without it, its gain), ``ungated_strategy``."""
    grid = grid or strategy_grid()
    found = list(result.rules)
    res = holdout.engine.apply(found)  # precision = the rules' stats: held-out trust
    best, table = choose_on_dev(holdout.proba, res, holdout.y, grid)
    base = weighted_f1_idx(holdout.y, holdout.base_pred)
    insample = float(table.set_index("strategy").loc[best, "dev_weighted_f1"]) - base
    gain, per_fold = (gate_gain(found, holdout, gate=gate, folds=folds,
                                verify_fraction=verify_fraction, seed=seed, grid=grid)
                      if found else (0.0, pd.DataFrame(columns=["fold", "n", "strategy", "gain"])))
    table = table.assign(holdout_model_f1=base)
    ok = bool(found) and best != "model" and insample > 1e-12 and gain > 1e-12
    rest = table[table.strategy != "model"]  # for the diagnostic row without the gate
    ungated = str(rest.loc[rest["dev_weighted_f1"].idxmax(), "strategy"])
    fold_rows = [{"fold": int(r.fold), "n": int(r.n), "strategy": str(r.strategy),
                  "gain": float(r.gain)} for r in per_fold.itertuples()]
    return dataclasses.replace(result, rules=found if ok else [], found=found, shipped=ok,
                               strategy=best if ok else "model", strategy_table=table,
                               params={**result.params, "holdout_gain_chosen": float(gain),
                                       "holdout_gain_insample": insample, "gate": gate,
                                       "gate_folds": fold_rows, "ungated_strategy": ungated})


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
