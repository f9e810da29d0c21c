"""Scoring model and rules on the test splits (notebooks 02 and 03): the rule sets notebook 02
writes, what each predicts, and the tidy rows of the results table.

A **rule set** is a named search result: ``mcts@<proposer>``, ``top_n@<proposer>`` (the
matched no-search ablation), ``mcts_noaug@<proposer>`` (the search for the model fine-tuned
without augmentation). Notebook 02 writes each one's rule base (``rulebase_<name>.json``:
the *shipped* rules, trust in their stats, the strategy in ``meta``) and a manifest
(``RULE_SETS_FILE``) that notebook 03 reads, so neither notebook spells file names.

Rows per rule set and split (``metrics.csv`` schema):

* ``kdsl[<name>]`` — the model with the rules under the strategy chosen on the held-out dev
  part; aliases for the profile's own proposer: ``kdsl`` (MCTS), ``kdsl[top_n]``,
  ``kdsl[no_aug]``; each with ``gain_vs_model`` and its paired 95% CI;
* ``rules+majority[<name>]`` — the first firing rule's label, else the task's majority
  training label (named so: most of its F1 can be the fallback);
* ``rules[<name>]`` — ``coverage``, ``n_covered``, ``precision_covered`` (rules' precision
  where they fire) and ``model_precision_covered`` (the model's, on the same records);
  ``rules[<name>:found]`` the same for every rule the search found, shipped or not;
  ``rules[<name>|<kind>]`` / ``rules[<name>:found|<kind>]`` the same for each condition
  kind's rules alone (:func:`condition_kind`), with ``n_rules``;
* ``kdsl_ungated[<name>]`` (MCTS sets) — diagnostic: the model with every rule found, the
  ship gate skipped (what the gate withheld; not KDSL).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import collab, report
from .data.labels import ALL_LABELS
from .metrics import metric_rows, weighted_f1_idx
from .models.base import Predictions
from .rules.engine import Observables, RuleEngine, RuleResult
from .rules.mcts import SearchResult
from .rules.schema import FIELDS, KEYWORD_OPS, SEMANTIC_OPS, Rule, RuleBase, load_rulebase

RULE_SETS_FILE = "rule_sets.json"  # notebook 02 -> 03: name -> file, model variant, strategy
STRATEGIES_FILE = "strategies_{name}.csv"  # the held-out strategy table of each rule set


@dataclass(frozen=True)
class RuleSet:
    """A rule set as notebook 03 uses it: shipped rules (trust in their stats), the strategy
    chosen for them on the held-out dev part, the model variant they correct."""

    name: str
    rules: list[Rule]
    strategy: str
    variant: str  # "kdsl" | "no_aug": the large model the rules were searched for
    proposer: str
    method: str  # "mcts" | "top_n"
    shipped: bool
    found: list[Rule]  # every rule the search kept, shipped or not (trust in their stats)
    ungated_strategy: str  # the best strategy other than "model" for ``found``

    def predict(self, proba: np.ndarray, result: RuleResult) -> np.ndarray:
        return collab.strategy_grid()[self.strategy](proba, result)


def rule_set_name(method: str, proposer: str, variant: str = "kdsl") -> str:
    return f"{method}{'_noaug' if variant == 'no_aug' else ''}@{proposer}"


def kdsl_variants(name: str, primary: str) -> list[str]:
    """Variant names of a rule set's KDSL rows: always ``kdsl[<name>]``, plus the short
    alias of the profile's own proposer's rule sets."""
    alias = {f"mcts@{primary}": "kdsl", f"top_n@{primary}": "kdsl[top_n]",
             f"mcts_noaug@{primary}": "kdsl[no_aug]"}
    return [f"kdsl[{name}]"] + ([alias[name]] if name in alias else [])


def save_rule_sets(out: Path, searches: Mapping[str, tuple[SearchResult, str]]) -> None:
    """Write every rule base, its held-out strategy table and the manifest; ``searches`` maps
    a rule set name to (shipped search result, model variant)."""
    manifest = {}
    for name, (res, variant) in searches.items():
        file = f"rulebase_{name.replace('@', '_')}.json"
        res.rulebase.save(Path(out) / file)
        RuleBase(list(res.found or ()), meta={"found_by": name, "shipped": res.shipped}
                 ).save(Path(out) / file.replace(".json", "_found.json"))
        if res.strategy_table is not None:
            res.strategy_table.to_csv(Path(out) / STRATEGIES_FILE.format(name=name), index=False)
        manifest[name] = {"file": file, "variant": variant, "strategy": res.strategy,
                          "shipped": res.shipped, "n_found": len(res.found or ()),
                          "ungated_strategy": res.params.get("ungated_strategy", "model"),
                          "method": res.method, "proposer": res.cost.get("proposer")}
    tmp = Path(out) / (RULE_SETS_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(Path(out) / RULE_SETS_FILE)


def load_rule_sets(up: Path) -> dict[str, RuleSet]:
    """The rule sets notebook 02 wrote into ``up``."""
    manifest = json.loads((Path(up) / RULE_SETS_FILE).read_text(encoding="utf-8"))
    return {name: RuleSet(name, load_rulebase(Path(up) / m["file"]).rules, m["strategy"],
                          m["variant"], m["proposer"], m["method"], m["shipped"],
                          load_rulebase(Path(up) / m["file"].replace(".json", "_found.json")).rules,
                          m["ungated_strategy"])
            for name, m in manifest.items()}


def as_rule_set(name: str, res: SearchResult, variant: str) -> RuleSet:
    return RuleSet(name, list(res.rules), res.strategy or "model", variant,
                   str(res.cost.get("proposer")), res.method, bool(res.shipped),
                   list(res.found or ()), res.params.get("ungated_strategy", "model"))


def coverage_rows(result: RuleResult, y: np.ndarray, model_pred: np.ndarray,
                  **ids: Any) -> list[dict[str, Any]]:
    """Where the rules fire: coverage, records covered, the rules' precision there and the
    model's precision on the same records (pooled; precisions over the labelled covered
    records only, gold -1 = unlabelled; no precision rows where none is covered)."""
    cov = result.fired >= 0
    n = int(cov.sum())
    lab = cov & (y >= 0)
    vals = [("coverage", result.coverage), ("n_covered", n)]
    if lab.any():  # precisions are undefined where no rule fires (metrics.csv holds no NaN)
        vals += [("precision_covered", float((result.label_idx[lab] == y[lab]).mean())),
                 ("model_precision_covered", float((model_pred[lab] == y[lab]).mean()))]
    return [{**ids, "task": "pooled", "metric": m, "value": v} for m, v in vals]


def condition_kind(rule: Rule) -> str:
    """The kinds of a rule's conditions, joined: ``keyword``, ``regex``, ``numeric`` (image
    count), ``scene`` (predicted scene labels), ``nearest_label`` (the nearest training
    record's label), ``semantic`` (e5 cosine to the small model's texts); e.g.
    ``keyword+semantic``."""
    def one(c) -> str:
        if c.op in SEMANTIC_OPS:
            return "semantic"
        if FIELDS[c.field] == "label":
            return "nearest_label"
        if FIELDS[c.field] in ("numeric", "scene"):
            return FIELDS[c.field]
        return "keyword" if c.op in KEYWORD_OPS else "regex"
    return "+".join(sorted({one(c) for c in rule.conditions}))


def kind_coverage_rows(engine: RuleEngine, rules: Sequence[Rule], y: np.ndarray,
                       model_pred: np.ndarray, name: str, **ids: Any) -> list[dict[str, Any]]:
    """:func:`coverage_rows` of each condition kind's rules on their own (a decision list of
    only that kind's rules, in their order), variant ``rules[<name>|<kind>]``, plus
    ``n_rules`` of the kind: what each kind contributes where it fires."""
    rows = []
    by_kind: dict[str, list[Rule]] = {}
    for r in rules:
        by_kind.setdefault(condition_kind(r), []).append(r)
    for kind, sub in sorted(by_kind.items()):
        v = f"rules[{name}|{kind}]"
        rows += coverage_rows(engine.apply(sub), y, model_pred, variant=v, **ids)
        rows.append({**ids, "variant": v, "task": "pooled", "metric": "n_rules",
                     "value": len(sub)})
    return rows


def predictions(rule_sets: Mapping[str, RuleSet], proba: Mapping[str, Predictions],
                obs: Observables, fallback: dict[str, int], primary: str
                ) -> tuple[dict[str, np.ndarray], dict[str, RuleResult]]:
    """Label indices of every row on one split (``proba``: variant -> that split's model
    predictions), and each rule set's ``RuleResult`` there."""
    eng = RuleEngine(obs)
    preds = {"model": proba["kdsl"].pred_idx}
    if "no_aug" in proba:
        preds["model[no_aug]"] = proba["no_aug"].pred_idx
    results = {}
    for name, rs in rule_sets.items():
        res = results[name] = eng.apply(rs.rules)  # precision: the rules' held-out trust
        p = proba[rs.variant]
        for v in kdsl_variants(name, primary):
            preds[v] = rs.predict(p.proba, res)
        preds[f"rules+majority[{name}]"] = rules_with_fallback(res, p.tasks, fallback)
        if rs.method == "mcts":  # diagnostic: every rule found, the ship gate skipped
            found = results[f"{name}:found"] = eng.apply(rs.found)
            preds[f"kdsl_ungated[{name}]"] = collab.strategy_grid()[rs.ungated_strategy](
                p.proba, found)
    return preds, results


def rules_with_fallback(result: RuleResult, tasks: Sequence[str],
                        fallback: dict[str, int]) -> np.ndarray:
    """The first firing rule's label, else the task's majority training label."""
    fb = np.array([fallback[t] for t in tasks], dtype=np.int64)
    return np.where(result.fired >= 0, result.label_idx, fb)


def test_rows(rule_sets: Mapping[str, RuleSet], proba: Mapping[str, Mapping[str, Predictions]],
              obs: Mapping[str, Observables], fallback: dict[str, int], primary: str, *,
              experiment: str, seed: int, n_boot: int = 0,
              families: Mapping[str, str] | None = None, model: Any = None,
              tests: Mapping[str, Sequence[Any]] | None = None
              ) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """Every row of every test split (``obs``'s keys; ``proba``: variant -> split ->
    predictions): weighted F1 per variant, with bootstrap CI rows and, for KDSL rows, the
    paired gain over their model when ``n_boot``; coverage rows per rule set.

    ``families`` (family -> strategy name, e.g. held-out best per family) adds a
    ``strategy:<family>`` row per family on the profile's MCTS rules; ``model`` (a loaded
    Qwen-VL backend) with ``tests`` (split -> records) adds ``strategy:prompt_injection``.
    Returns ``(rows, decisions)``: per test record of KDSL's row, model and final label, which
    source decided and which rule fired."""
    rows: list[dict[str, Any]] = []
    decisions = []
    main = f"mcts@{primary}"
    grid = collab.strategy_grid()
    for split in obs:
        p_split = {v: proba[v][split] for v in proba}
        preds, results = predictions(rule_sets, p_split, obs[split], fallback, primary)
        base = p_split["kdsl"]
        if main in results:
            for fam, name in (families or {}).items():
                preds[f"strategy:{fam}"] = grid[name](base.proba, results[main])
            if model is not None and tests is not None:  # rules written into the prompt
                injected = collab.injected_records(tests[split], results[main])
                preds["strategy:prompt_injection"] = model.predict_proba(injected).pred_idx
        y, tasks = base.gold_idx, base.tasks
        ids = {"experiment": experiment, "seed": seed, "split": split}
        # gold -1: an unlabelled record (a challenge test file): predicted, never scored
        gold = [ALL_LABELS[i] if i >= 0 else None for i in y]
        lab = y >= 0
        for variant, pred in preds.items():
            labels = [ALL_LABELS[i] for i in pred]
            rows += metric_rows(gold, labels, tasks, variant=variant, **ids)
            if n_boot:
                rows += report.ci_rows(gold, labels, tasks, n_boot=n_boot, boot_seed=seed,
                                       variant=variant, **ids)
        if n_boot and lab.any():
            for name, rs in rule_sets.items():
                for v in kdsl_variants(name, primary):
                    rows += report.gain_rows(y[lab], preds[v][lab], p_split[rs.variant].pred_idx[lab],
                                             np.asarray(tasks)[lab], n_boot=n_boot, boot_seed=seed,
                                             variant=v, **ids)
        eng = RuleEngine(obs[split])
        for name, res in results.items():  # "<set>:found" = the rules before the gate
            model_pred = p_split[rule_sets[name.split(":")[0]].variant].pred_idx
            rows += coverage_rows(res, y, model_pred, variant=f"rules[{name}]", **ids)
            rows += kind_coverage_rows(eng, res.rules, y, model_pred, name, **ids)
        if main in results:
            decisions.append(collab.decisions(base.proba, results[main], preds["kdsl"])
                             .assign(split=split, label=gold, task=list(tasks)))
    return rows, (pd.concat(decisions, ignore_index=True) if decisions else pd.DataFrame())


def coverage_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per rule set and split: coverage, records covered, the rules' precision there beside
    the model's on the same records."""
    m = metrics[metrics.variant.str.startswith("rules[") & metrics.metric.isin(
        ["n_rules", "coverage", "n_covered", "precision_covered", "model_precision_covered"])]
    return m.pivot_table(index=["variant", "split"], columns="metric", values="value").round(3)


def search_summary(searches: Mapping[str, tuple[SearchResult, str]]) -> pd.DataFrame:
    """One row per search: rules found / shipped, strategy, search-part and held-out F1,
    proposer requests (calls + cache hits), root-child visits, seconds."""
    rows = []
    for name, (res, variant) in searches.items():
        c = res.cost
        rows.append({"rule set": name, "model": variant, "found": len(res.found or ()),
                     "shipped": len(res.rules), "strategy": res.strategy,
                     "search F1": f"{res.search_base:.4f} → {res.search_reward:.4f}",
                     "held-out F1 (override)": f"{res.holdout_base:.4f} → "
                                               f"{res.holdout_reward:.4f}",
                     "held-out gain, in sample": round(
                         res.params.get("holdout_gain_insample", float("nan")), 4),
                     f"held-out gain, {res.params.get('gate', '?')} (decides)": round(
                         res.params.get("holdout_gain_chosen", float("nan")), 4),
                     "requests": c.get("requests"), "calls": c.get("calls"),
                     "cache hits": c.get("cache_hits"), "tokens": c.get("tokens"),
                     "root child visits": c.get("root_child_visits", ""),
                     "max depth": c.get("max_depth", ""), "seconds": c.get("wall_s")})
    return pd.DataFrame(rows)


def ship_line(name: str, res: SearchResult) -> str:
    """One sentence on whether a rule set ships, and why."""
    n, gain = len(res.found or ()), res.params.get("holdout_gain_chosen", float("nan"))
    ins, gate = res.params.get("holdout_gain_insample", float("nan")), res.params.get("gate", "?")
    how = (f"held-out dev gain {100 * gain:+.2f} points {gate}, {100 * ins:+.2f} in sample")
    if res.shipped:
        return f"{name}: {n} rules found, shipped with strategy {res.strategy} ({how})"
    return (f"{name}: {n} rules found, NOT shipped — the choice of strategy does not gain over "
            f"the model alone out of sample on the held-out dev part ({how}); the empty rule "
            f"set ships")


def holdout_check(rs: RuleSet, holdout: Any) -> tuple[float, float]:
    """(F1 of the shipped rules under their strategy, F1 of the model alone) on a held-out
    part, recomputed from a rule set as read back from notebook 02's files."""
    res = holdout.engine.apply(rs.rules)
    return (weighted_f1_idx(holdout.y, rs.predict(holdout.proba, res)),
            weighted_f1_idx(holdout.y, holdout.base_pred))


def gate_verdict(rs: RuleSet, holdout: Any, *, gate: str, folds: int, verify_fraction: float,
                 seed: int) -> bool:
    """Whether ``collab.ship`` ships ``rs.found`` on ``holdout`` with this gate, recomputed
    from the rule set as read back from notebook 02's files (the check that the saved verdict
    is the gate's, not an in-sample one)."""
    found = list(rs.found)
    if not found:
        return False
    best, table = collab.choose_on_dev(holdout.proba, holdout.engine.apply(found), holdout.y)
    insample = (float(table.set_index("strategy").loc[best, "dev_weighted_f1"])
                - weighted_f1_idx(holdout.y, holdout.base_pred))
    gain, _ = collab.gate_gain(found, holdout, gate=gate, folds=folds,
                               verify_fraction=verify_fraction, seed=seed)
    return best != "model" and insample > 1e-12 and gain > 1e-12


def best_by_family(table: pd.DataFrame) -> dict[str, str]:
    """Family -> its best strategy by held-out F1 (ties: the earlier, simpler one)."""
    t = table[table.family != "model"]
    best = t.loc[t.groupby("family", sort=False)["dev_weighted_f1"].idxmax()]
    return dict(zip(best.family, best.strategy))


def error_analysis(decisions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Where the shipped rules changed KDSL's answer: per task changed / helped / hurt, and
    per rule helped / hurt / neutral."""
    changed = decisions[decisions.model_pred != decisions.final_pred]
    outcome = np.where(changed.final_pred == changed.label, "helped",
                       np.where(changed.model_pred == changed.label, "hurt", "neutral"))
    changed = changed.assign(outcome=outcome)
    summary = pd.DataFrame({"changed by rules": changed.groupby("task").size(),
                            "helped": changed[outcome == "helped"].groupby("task").size(),
                            "hurt": changed[outcome == "hurt"].groupby("task").size()}
                           ).fillna(0).astype(int)
    by_rule = changed.groupby(["fired_rule", "outcome"]).size().unstack(fill_value=0)
    return summary, by_rule


def examples(decisions: pd.DataFrame, tests: Mapping[str, Sequence[Any]],
             rules: Sequence[Rule], n: int = 3) -> list[str]:
    """Up to ``n`` helped and ``n`` hurt changes as readable text (gold, model → final, the
    rule, the customer's words)."""
    text = {r.id: r.describe() for r in rules}
    by_id = {(s, r.id): r for s, recs in tests.items() for r in recs}
    ch = decisions[decisions.model_pred != decisions.final_pred]
    picks = pd.concat([ch[ch.final_pred == ch.label].head(n), ch[ch.model_pred == ch.label].head(n)])
    out = []
    for _, d in picks.iterrows():
        rec = by_id[(d.split, d.id)]
        out.append(f"[{'helped' if d.final_pred == d.label else 'hurt'}] {d.split} {d.id} · gold "
                   f"{d.label} · model {d.model_pred} → {d.final_pred}\n  rule: "
                   f"{text.get(d.fired_rule, d.fired_rule)}\n  customer: {rec.user_text[:160]!r}")
    return out


def search_rows(searches: Mapping[str, tuple[SearchResult, str]], *, experiment: str,
                seed: int) -> list[dict[str, Any]]:
    """Dev-fold rows of every search: weighted F1 of model and model+rules on the search and
    held-out parts, rules found / shipped, proposer calls, requests and seconds."""
    rows = []
    for name, (res, _) in searches.items():
        for _, m in res.metrics.iterrows():
            rows.append({"experiment": experiment, "variant": f"{m['variant']}[{name}]",
                         "seed": seed, "split": f"dev_{m['split']}", "task": m["task"],
                         "metric": "weighted_f1", "value": m["value"]})
        for metric, value in (("n_found", len(res.found or ())), ("n_rules", len(res.rules)),
                              ("shipped", float(bool(res.shipped))),
                              ("holdout_gain_gate", res.params.get("holdout_gain_chosen", 0.0)),
                              ("holdout_gain_insample",
                               res.params.get("holdout_gain_insample", 0.0)),
                              ("proposer_calls", res.cost.get("calls", 0)),
                              ("proposer_requests", res.cost.get("requests", 0)),
                              ("search_seconds", res.cost.get("wall_s", 0))):
            rows.append({"experiment": experiment, "variant": f"rules[{name}]", "seed": seed,
                         "split": "dev", "task": "pooled", "metric": metric, "value": value})
    return rows


def best_path(res: SearchResult) -> pd.DataFrame:
    """The tree's path from the root to the best node: per step the action, the rules it
    added (ids and conditions) and the search-part reward."""
    tr = res.trace.set_index("node")
    path, node = [], int(tr.index[tr["is_best"]][0])
    while node >= 0:
        path.append(node)
        node = int(tr.loc[node, "parent"])
    rows = []
    for nd in reversed(path):
        rows.append({"node": nd, "depth": int(tr.loc[nd, "depth"]),
                     "action": tr.loc[nd, "action"], "rules": int(tr.loc[nd, "size"]),
                     "reward": round(float(tr.loc[nd, "reward"]), 4),
                     "changed": tr.loc[nd, "changed"]})
    return pd.DataFrame(rows)


def label_coverage(res: SearchResult, y_dev: np.ndarray, base_pred: np.ndarray) -> pd.DataFrame:
    """Per label with model errors on the dev fold: errors, add actions that targeted it,
    rules found for it — which labels gained rules and which never did."""
    wrong = y_dev != base_pred
    errs = pd.Series([ALL_LABELS[i] for i in y_dev[wrong]]).value_counts()
    found = pd.Series([r.label for r in (res.found or res.rules)]).value_counts()
    targeted = pd.Series(res.params.get("targets", {}), dtype=float)
    labels = sorted(set(errs.index) | set(found.index))
    return pd.DataFrame({"label": labels,
                         "dev_model_errors": [int(errs.get(lab, 0)) for lab in labels],
                         "add_actions": [int(targeted.get(lab, 0)) for lab in labels],
                         "rules_found": [int(found.get(lab, 0)) for lab in labels]}
                        ).sort_values(["rules_found", "dev_model_errors"], ascending=False)
