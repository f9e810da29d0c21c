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
  where they fire) and ``model_precision_covered`` (the model's, on the same records).
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
from .metrics import metric_rows
from .models.base import Predictions
from .rules.engine import Observables, RuleEngine, RuleResult
from .rules.mcts import SearchResult
from .rules.schema import Rule, load_rulebase

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
    n_found: int

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
        if res.strategy_table is not None:
            res.strategy_table.to_csv(Path(out) / STRATEGIES_FILE.format(name=name), index=False)
        manifest[name] = {"file": file, "variant": variant, "strategy": res.strategy,
                          "shipped": res.shipped, "n_found": len(res.found or ()),
                          "method": res.method, "proposer": res.cost.get("proposer")}
    tmp = Path(out) / (RULE_SETS_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(Path(out) / RULE_SETS_FILE)


def load_rule_sets(up: Path) -> dict[str, RuleSet]:
    """The rule sets notebook 02 wrote into ``up``."""
    manifest = json.loads((Path(up) / RULE_SETS_FILE).read_text(encoding="utf-8"))
    return {name: RuleSet(name, load_rulebase(Path(up) / m["file"]).rules, m["strategy"],
                          m["variant"], m["proposer"], m["method"], m["shipped"], m["n_found"])
            for name, m in manifest.items()}


def as_rule_set(name: str, res: SearchResult, variant: str) -> RuleSet:
    return RuleSet(name, list(res.rules), res.strategy or "model", variant,
                   str(res.cost.get("proposer")), res.method, bool(res.shipped),
                   len(res.found or ()))


def coverage_rows(result: RuleResult, y: np.ndarray, model_pred: np.ndarray,
                  **ids: Any) -> list[dict[str, Any]]:
    """Where the rules fire: coverage, records covered, the rules' precision there and the
    model's precision on the same records (pooled; NaN where nothing fires)."""
    cov = result.fired >= 0
    n = int(cov.sum())
    rp = float((result.label_idx[cov] == y[cov]).mean()) if n else float("nan")
    mp = float((model_pred[cov] == y[cov]).mean()) if n else float("nan")
    return [{**ids, "task": "pooled", "metric": m, "value": v} for m, v in
            (("coverage", result.coverage), ("n_covered", n), ("precision_covered", rp),
             ("model_precision_covered", mp))]


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
    return preds, results


def rules_with_fallback(result: RuleResult, tasks: Sequence[str],
                        fallback: dict[str, int]) -> np.ndarray:
    """The first firing rule's label, else the task's majority training label."""
    fb = np.array([fallback[t] for t in tasks], dtype=np.int64)
    return np.where(result.fired >= 0, result.label_idx, fb)


def split_rows(rule_sets: Mapping[str, RuleSet], proba: Mapping[str, Predictions],
               obs: Observables, fallback: dict[str, int], primary: str, *, experiment: str,
               seed: int, split: str, n_boot: int = 0
               ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], dict[str, RuleResult]]:
    """Every row of one test split: weighted F1 per variant (with bootstrap CI rows and,
    for KDSL rows, the paired gain over their model when ``n_boot``), coverage rows per rule
    set. Returns ``(rows, predictions, rule results)``."""
    preds, results = predictions(rule_sets, proba, obs, fallback, primary)
    base = proba["kdsl"]
    y, tasks = base.gold_idx, base.tasks
    ids = {"experiment": experiment, "seed": seed, "split": split}
    rows: list[dict[str, Any]] = []
    gold = [ALL_LABELS[i] for i in y]
    for variant, pred in preds.items():
        labels = [ALL_LABELS[i] for i in pred]
        rows += metric_rows(gold, labels, tasks, variant=variant, **ids)
        if n_boot:
            rows += report.ci_rows(gold, labels, tasks, n_boot=n_boot, boot_seed=seed,
                                   variant=variant, **ids)
    if n_boot:
        for name, rs in rule_sets.items():
            model = proba[rs.variant].pred_idx
            for v in kdsl_variants(name, primary):
                rows += report.gain_rows(y, preds[v], model, tasks, n_boot=n_boot,
                                         boot_seed=seed, variant=v, **ids)
    for name, res in results.items():
        rows += coverage_rows(res, y, proba[rule_sets[name].variant].pred_idx,
                              variant=f"rules[{name}]", **ids)
    return rows, preds, results


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
