"""Monte Carlo Tree Search over rule sets (DESIGN.md, method point 4).

State = an ordered rule set (a decision list). Actions: add proposed rules (``add_batch`` at
once) for a target label taken from the current errors, specialise a rule (add a condition),
generalise a rule (drop a condition, or widen its keywords), drop a rule. Reward = weighted F1
(pooled labels) on the *search* part of the dev fold of the collaborative prediction: the
large model's dev probabilities (computed once) combined with the rule set by the caller's
``combine`` function (``collab.make_override`` in the pipeline). Every knob comes from the
frozen ``config.RulesCfg``; nothing here repeats its defaults.

What makes the search able to grow and keep rules (issue 15, item 2):

* rule-set size is bounded by ``max_rules``, not by tree depth (an add inserts a batch);
* UCT runs on rewards min-max normalised over the tree (``normalise_rewards``): rewards of
  rule sets differ by ~0.01 F1, so a raw constant c = 1 made the exploration term (~0.6)
  swamp them and every child got the same visits;
* the add action's target label goes round-robin over the labels with current errors (or is
  sampled by error mass), not "the label with the most errors" again and again;
* a proposal request carries the current rule set (``context``), so asking again for the
  same label from another state yields new proposals instead of a cache hit.

Against overfitting the dev fold, it is split (stratified, seeded) into a search part and a
held-out part the search never scores. The best rule set's trust (:func:`trust`: held-out
precision shrunk towards training precision) is measured there, the collaboration strategy
is chosen there, and the set ships only if the choice gains there out of sample (cross-fitted
over the held-out part, ``collab.ship``); otherwise the empty set ships.

``TreeSearch`` is the generic, problem-agnostic core (tested on a toy problem); ``mcts_search``
specialises it to rule sets; ``top_n_rules`` is the no-search baseline matched to it (same
proposal requests, same rule count, same trust, its own strategy).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from tqdm.auto import tqdm

from ..config import RulesCfg
from ..data.labels import ALL_LABELS, TASKS
from ..data.splits import stratified_indices
from ..metrics import weighted_f1_idx
from .engine import LABEL_INDEX, CombineFn, Observables, RuleEngine, RuleResult, rules_table
from .propose import ErrorExample, Proposer, errors_from
from .schema import SCHEMA_VERSION, Condition, Rule, RuleBase, rule_id_for

# --------------------------------------------------------------------------------------------
# Generic tree search
# --------------------------------------------------------------------------------------------


@dataclass
class Node:
    """A search-tree node. ``reward`` is the state's own reward (evaluated on creation);
    ``visits``/``value_sum`` are the UCT statistics accumulated by backpropagation."""

    id: int
    parent: int | None
    depth: int
    action: str
    state: Any
    reward: float
    iteration: int
    children: list[int] = field(default_factory=list)
    expanded: bool = False
    visits: int = 0
    value_sum: float = 0.0

    @property
    def q(self) -> float:
        """Mean backed-up value (the node's own reward before any visit)."""
        return self.value_sum / self.visits if self.visits else self.reward


ExpandFn = Callable[[Any, int, np.random.Generator], list[tuple[str, Any]]]


class TreeSearch:
    """UCT search (PromptAgent-style) over arbitrary states.

    One iteration: (1) *selection* from the root, descending to the child with the largest
    ``q + c * sqrt(ln N_parent / N_child)`` (unvisited children first, the highest-reward one
    of them; ties to the lower node id) while the node is expanded and has children;
    (2) *expansion* of the reached node, if not yet expanded and shallower than ``depth``: up
    to ``width`` children from ``expand(state, width, rng)``, each scored by ``reward``; the
    best new child joins the path; (3) the value of the path's last node is its reward;
    (4) *backpropagation*: every node on the path gets ``visits += 1, value_sum += value``.
    """

    def __init__(self, root_state: Any, expand: ExpandFn, reward: Callable[[Any], float], *,
                 uct_c: float = 1.0, width: int = 3, depth: int = 5, seed: int = 0,
                 normalise: bool = False):
        self.expand_fn, self.reward_fn = expand, reward
        self.uct_c, self.width, self.depth = uct_c, width, depth
        self.normalise = normalise
        self.rng = np.random.default_rng(seed)
        r0 = float(reward(root_state))
        self.nodes: list[Node] = [Node(0, None, 0, "root", root_state, r0, 0)]
        self.rmin = self.rmax = r0
        self.log: list[dict[str, Any]] = []
        self.iteration = 0

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def scaled(self, value: float) -> float:
        """``value`` on the UCT scale: min-max normalised over every reward seen so far when
        ``normalise`` (0 while all rewards are equal), else as is."""
        if not self.normalise:
            return value
        span = self.rmax - self.rmin
        return (value - self.rmin) / span if span > 0 else 0.0

    def uct(self, parent: Node, child: Node) -> float:
        if child.visits == 0:
            return math.inf
        return self.scaled(child.q) + self.uct_c * math.sqrt(
            math.log(max(parent.visits, 1)) / child.visits)

    def select_child(self, node: Node) -> Node:
        kids = [self.nodes[i] for i in node.children]
        return max(kids, key=lambda ch: (self.uct(node, ch),
                                         ch.reward if ch.visits == 0 else 0.0, -ch.id))

    def expand(self, node: Node) -> list[Node]:
        node.expanded = True
        if node.depth >= self.depth:
            return []
        new = []
        for action, state in self.expand_fn(node.state, self.width, self.rng)[: self.width]:
            ch = Node(len(self.nodes), node.id, node.depth + 1, action, state,
                      float(self.reward_fn(state)), self.iteration)
            self.rmin, self.rmax = min(self.rmin, ch.reward), max(self.rmax, ch.reward)
            self.nodes.append(ch)
            node.children.append(ch.id)
            new.append(ch)
        return new

    def step(self) -> dict[str, Any]:
        """Run one iteration; returns its log row."""
        self.iteration += 1
        node = self.root
        path = [node]
        while node.expanded and node.children:
            node = self.select_child(node)
            path.append(node)
        n_new = 0
        if not node.expanded and node.depth < self.depth:
            new = self.expand(node)
            n_new = len(new)
            if new:
                node = max(new, key=lambda ch: (ch.reward, -ch.id))
                path.append(node)
        value = node.reward
        for n in path:
            n.visits += 1
            n.value_sum += value
        best = self.best()
        row = {"iteration": self.iteration, "leaf": node.id,
               "path": ">".join(str(n.id) for n in path), "new_nodes": n_new, "value": value,
               "best_node": best.id, "best_reward": best.reward}
        self.log.append(row)
        return row

    def run(self, iterations: int) -> Node:
        for _ in range(iterations):
            self.step()
        return self.best()

    def best(self, size: Callable[[Any], int] | None = None) -> Node:
        """The node with the highest reward (ties: smaller state by ``size``, then lower id)."""
        size = size or (lambda s: len(s) if hasattr(s, "__len__") else 0)
        return max(self.nodes, key=lambda n: (n.reward, -size(n.state), -n.id))

    def trace(self) -> pd.DataFrame:
        """One row per node: where it came from, its reward and its final UCT statistics."""
        return pd.DataFrame([{
            "node": n.id, "parent": -1 if n.parent is None else n.parent, "depth": n.depth,
            "iteration": n.iteration, "action": n.action, "reward": n.reward,
            "visits": n.visits, "q": n.q, "n_children": len(n.children),
            "size": len(n.state) if hasattr(n.state, "__len__") else np.nan,
        } for n in self.nodes])


# --------------------------------------------------------------------------------------------
# Dev fold: model probabilities + observables + gold labels, split for search / held-out
# --------------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """One evaluation fold: observables, gold label indices, the model's (n, 48) probabilities."""

    obs: Observables
    y: np.ndarray
    proba: np.ndarray
    engine: RuleEngine = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.y = np.asarray(self.y, dtype=np.int64)
        self.proba = np.asarray(getattr(self.proba, "proba", self.proba))
        if not (len(self.obs) == len(self.y) == len(self.proba)):
            raise ValueError(f"sizes differ: {len(self.obs)} observables, {len(self.y)} labels, "
                             f"{len(self.proba)} probability rows")
        self.engine = RuleEngine(self.obs)
        self.base_pred = self.proba.argmax(axis=1).astype(np.int64)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> EvalSet:
        return EvalSet(self.obs.subset(idx), self.y[idx], self.proba[idx])

    def split(self, holdout_fraction: float, seed: int = 0) -> tuple[EvalSet, EvalSet]:
        """(search, held-out) parts, exactly as ``mcts_search`` splits with the same arguments
        (e.g. to let a ``DataProposer`` also mine the search part)."""
        s_idx, h_idx = split_dev(self.y, holdout_fraction, seed)
        return self.subset(s_idx), self.subset(h_idx)

    def predict(self, rules: Sequence[Rule], combine: CombineFn,
                precision: np.ndarray | None = None) -> tuple[np.ndarray, RuleResult]:
        """Collaborative labels; rule precision measured here unless ``precision`` is given."""
        res = self.engine.apply(rules, y=None if precision is not None else self.y,
                                precision=precision)
        return np.asarray(combine(self.proba, res), dtype=np.int64), res

    def f1(self, pred: np.ndarray, task: str | None = None) -> float:
        if task is None:
            return weighted_f1_idx(self.y, pred)
        m = self.obs.tasks == task
        return weighted_f1_idx(self.y[m], pred[m]) if m.any() else float("nan")


def split_dev(y: np.ndarray, holdout_fraction: float, seed: int = 0) -> tuple[np.ndarray,
                                                                           np.ndarray]:
    """Stratified (per label) split of a dev fold into search and held-out indices
    (:func:`kdsl_utils.data.splits.stratified_indices`, the package's one splitter; the
    rounding carried over labels, so a dev fold of one-record labels still has a held-out part)."""
    return stratified_indices(np.asarray(y).tolist(), holdout_fraction, seed, min_keep=0,
                              carry=True)


# --------------------------------------------------------------------------------------------
# Rule-set search
# --------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """Outcome of ``mcts_search`` / ``top_n_rules``.

    ``rules``: best rule set, stats re-estimated on the held-out part (``fold='dev_holdout'``;
    search-part stats in ``provenance['search_stats']``). ``metrics``: tidy rows (split, task,
    variant, value) of weighted F1 for model-only and model+rules on both parts. ``trace``: one
    row per node; ``iterations``: one row per iteration; ``cost``: proposer calls, tokens, wall
    time, reward evaluations; ``rule_table``: readable rules with stats from both parts.
    """

    method: str
    rules: list[Rule]
    search_reward: float
    search_base: float
    holdout_reward: float
    holdout_base: float
    metrics: pd.DataFrame
    cost: dict[str, Any]
    rule_table: pd.DataFrame
    trace: pd.DataFrame | None = None
    iterations: pd.DataFrame | None = None
    params: dict[str, Any] = field(default_factory=dict)
    best_node: int | None = None
    # Set by ``collab.ship`` (on the held-out part): the rules found, whether they ship (then
    # ``rules`` is them, else empty), the collaboration strategy chosen for them and its table.
    found: list[Rule] | None = None
    shipped: bool | None = None
    strategy: str | None = None
    strategy_table: pd.DataFrame | None = None

    @property
    def rulebase(self) -> RuleBase:
        return RuleBase(list(self.rules), meta={"method": self.method, "params": self.params,
                                                **self.summary()}, schema_version=SCHEMA_VERSION)

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "n_rules": len(self.rules),
                "search_base": self.search_base, "search_reward": self.search_reward,
                "search_gain": self.search_reward - self.search_base,
                "holdout_base": self.holdout_base, "holdout_reward": self.holdout_reward,
                "holdout_gain": self.holdout_reward - self.holdout_base,
                "best_node": self.best_node, "n_found": len(self.found if self.found is not None
                                                            else self.rules),
                "shipped": self.shipped, "strategy": self.strategy,
                **{k: v for k, v in self.cost.items() if not isinstance(v, dict)}}


def _state_key(state: Sequence[Rule]) -> tuple:
    return tuple(r.key for r in state)


def _insert(state: tuple[Rule, ...], rule: Rule) -> tuple[Rule, ...]:
    """Insert by training precision (higher first; stable), the decision-list priority."""
    p = -1.0 if rule.precision is None else rule.precision
    for i, r in enumerate(state):
        if (-1.0 if r.precision is None else r.precision) < p:
            return state[:i] + (rule,) + state[i:]
    return state + (rule,)


ACTION_KINDS = ("add", "specialise", "generalise", "drop")
TARGETS = ("roundrobin", "sample", "most")
TRUST_M = 2.0  # m of the m-estimate of a rule's trust (pseudo-records at its training precision)


class RuleSetProblem:
    """The rule-set search problem: actions (``expand``) and reward on the search part."""

    def __init__(self, proposer: Proposer, search: EvalSet, combine: CombineFn,
                 cfg: RulesCfg, action_weights: dict[str, float] | None = None):
        if cfg.target not in TARGETS:
            raise ValueError(f"RulesCfg.target must be one of {TARGETS}, got {cfg.target!r}")
        self.proposer, self.search, self.combine = proposer, search, combine
        self.k, self.target, self.max_rules = cfg.k, cfg.target, cfg.max_rules
        self.add_batch = max(1, cfg.add_batch)
        self.tries = 2 * max(1, cfg.width)
        self.dry: set[str] = set()
        self._rr = 0  # round-robin position over the labels with errors, across expansions
        self.targets: Counter = Counter()  # label -> add actions that targeted it
        self.weights = {"add": 0.55, "specialise": 0.15, "generalise": 0.15, "drop": 0.15}
        self.weights.update(action_weights or {})
        self._eval: dict[tuple, tuple[float, np.ndarray, RuleResult]] = {}
        self.reward_evals = 0
        self.reward_s = 0.0
        self.pool: dict[str, dict[tuple, Condition]] = {t: {} for t in TASKS}

    # -- reward -----------------------------------------------------------------------------
    def evaluate(self, state: Sequence[Rule]) -> tuple[float, np.ndarray, RuleResult]:
        key = _state_key(state)
        hit = self._eval.get(key)
        if hit is None:
            t0 = time.perf_counter()
            pred, res = self.search.predict(state, self.combine)
            hit = (weighted_f1_idx(self.search.y, pred), pred, res)
            self.reward_s += time.perf_counter() - t0
            self.reward_evals += 1
            self._eval[key] = hit
        return hit

    def reward(self, state: Sequence[Rule]) -> float:
        return self.evaluate(state)[0]

    # -- actions ----------------------------------------------------------------------------
    def _remember(self, rules: Sequence[Rule]) -> None:
        for r in rules:
            for c in r.conditions:
                self.pool[r.task].setdefault(c.key, c)

    def _own_counts(self, rule: Rule) -> tuple[int, int]:
        m = self.search.engine.rule_mask(rule)
        return int((self.search.y[m] == LABEL_INDEX[rule.label]).sum()), int(m.sum())

    def _derived(self, rule: Rule, conds: tuple[Condition, ...], action: str) -> Rule:
        r = rule.replace(id=rule_id_for(rule.task, rule.label, conds, prefix="m"),
                         conditions=conds,
                         provenance={**rule.provenance, "derived_from": rule.id,
                                     "action": action})
        return self.proposer.measure([r])[0]

    def _target_order(self, ranking: dict[str, int], used: dict[str, int], rng) -> list[str]:
        """Labels to try for an add action, first choice first."""
        labels = list(ranking)
        if not labels:
            return labels
        if self.target == "sample":  # by error mass
            w = np.array([ranking[lab] for lab in labels], dtype=float)
            return [labels[i] for i in rng.choice(len(labels), len(labels), replace=False,
                                                  p=w / w.sum())]
        if self.target == "roundrobin":  # every label with errors in turn, across expansions
            labels = sorted(labels, key=LABEL_INDEX.__getitem__)
            j = self._rr % len(labels)
            self._rr += 1
            return labels[j:] + labels[:j]
        # "most": most errors first; successive add actions of one expansion take the next
        n_adds = sum(1 for v in used.values() if v != 0)
        return labels[n_adds % len(labels):] + labels[: n_adds % len(labels)]

    def _add(self, state, errors, ranking, used, rng):
        have = {r.key for r in state}
        # at most ``width`` labels per add: a proposer with nothing for them (the tiny
        # model's empty answers) must not be asked about every label of the task in turn
        order = [lab for lab in self._target_order(ranking, used, rng) if lab not in self.dry]
        for lab in order[: self.tries]:
            if used.get(lab) == -1:
                continue  # exhausted in this expansion
            # the current rule set is part of the request: asked again from another state,
            # the proposer answers with rules that state does not hold yet
            props = self.proposer.propose(lab, errors, self.k, context=state)
            if not props:  # nothing new for this label: spend no more requests on it
                self.dry.add(lab)
            self._remember(props)
            new = [r for r in props if r.key not in have]
            j = used.get(lab, 0)
            if j < len(new):
                batch = new[j: j + self.add_batch]
                used[lab] = j + len(batch)
                self.targets[lab] += 1
                for rule in batch:
                    state = _insert(state, rule)
                return f"add {'+'.join(r.id for r in batch)} [{lab}]", state[: self.max_rules]
            used[lab] = -1
        return None

    def _specialise(self, state, res: RuleResult, rng):
        wrong = res.support - (res.correct if res.correct is not None else 0)
        cand = [i for i in range(len(state)) if wrong[i] > 0]
        if not cand:
            return None
        worst = max(wrong[i] for i in cand)
        i = int(rng.choice([i for i in cand if wrong[i] == worst]))
        rule = state[i]
        c0, t0 = self._own_counts(rule)
        best, best_key = None, (c0 / max(t0, 1), c0)
        own = {c.key for c in rule.conditions}
        for c in list(self.pool[rule.task].values()):
            for cc in (c, c.negated()):
                if cc.key in own or cc.negated().key in own:
                    continue
                trial = rule.replace(conditions=rule.conditions + (cc,))
                ok, n = self._own_counts(trial)
                if ok == 0:
                    continue
                key = (ok / n, ok)
                if key > best_key:
                    best, best_key = cc, key
        if best is None:
            return None
        new = self._derived(rule, rule.conditions + (best,), "specialise")
        if new.key in {r.key for r in state}:
            return None
        return (f"specialise {rule.id} + {best.describe()}",
                state[:i] + (new,) + state[i + 1:])

    def _generalise(self, state, rng):
        opts = []
        for i, r in enumerate(state):
            if len(r.conditions) > 1:
                opts += [(i, "drop_condition", j) for j in range(len(r.conditions))]
            if hasattr(self.proposer, "widen"):
                opts += [(i, "widen", j) for j, c in enumerate(r.conditions)
                         if c.op == "keyword_any" and not c.negate]
        order = rng.permutation(len(opts)) if opts else []
        keys = {r.key for r in state}
        for o in order:
            i, kind, j = opts[o]
            rule = state[i]
            if kind == "drop_condition":
                conds = rule.conditions[:j] + rule.conditions[j + 1:]
                new = self._derived(rule, conds, "drop_condition")
                desc = f"generalise {rule.id} - {rule.conditions[j].describe()}"
            else:
                new = self.proposer.widen(rule, j)  # type: ignore[attr-defined]
                if new is None:
                    continue
                desc = f"generalise {rule.id} widen {new.conditions[j].describe()}"
            if new.key in keys:
                continue
            self._remember([new])
            return desc, state[:i] + (new,) + state[i + 1:]
        return None

    def _drop(self, state, res: RuleResult, rng):
        if not state:
            return None
        prec = np.nan_to_num(res.precision, nan=-1.0)
        low = prec.min()
        i = int(rng.choice(np.flatnonzero(prec == low)))
        return f"drop {state[i].id}", state[:i] + state[i + 1:]

    def expand(self, state: tuple[Rule, ...], width: int,
               rng: np.random.Generator) -> list[tuple[str, tuple[Rule, ...]]]:
        _, pred, res = self.evaluate(state)
        wrong = np.flatnonzero(pred != self.search.y)
        errors: list[ErrorExample] = errors_from(self.search.obs, self.search.y, pred, wrong)
        counts = Counter(int(self.search.y[i]) for i in wrong)
        ranking = {ALL_LABELS[lab]: n for lab, n in
                   sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}
        kinds = [k for k in ACTION_KINDS if self.weights.get(k, 0) > 0]
        out: list[tuple[str, tuple[Rule, ...]]] = []
        seen = {_state_key(state)}
        used: dict[str, int] = {}
        for attempt in range(4 * width):
            if len(out) >= width:
                break
            applicable = [k for k in kinds if (k == "add" and ranking and len(state)
                                               < self.max_rules) or (k != "add" and state)]
            if not applicable:
                break
            if attempt == 0 and "add" in applicable:
                kind = "add"
            else:
                w = np.array([self.weights[k] for k in applicable], dtype=float)
                kind = applicable[int(rng.choice(len(applicable), p=w / w.sum()))]
            if kind == "add":
                child = self._add(state, errors, ranking, used, rng)
            elif kind == "specialise":
                child = self._specialise(state, res, rng)
            elif kind == "generalise":
                child = self._generalise(state, rng)
            else:
                child = self._drop(state, res, rng)
            if child is None:
                continue
            key = _state_key(child[1])
            if key in seen:
                continue
            seen.add(key)
            out.append(child)
        return out


def prune_rules(state: Sequence[Rule], reward: Callable[[Sequence[Rule]], float]
                ) -> tuple[tuple[Rule, ...], int]:
    """Drop rules (lowest priority first) whose removal does not lower ``reward``."""
    state = tuple(state)
    cur = reward(state)
    n = 0
    for r in reversed(state):
        trial = tuple(x for x in state if x is not r)
        val = reward(trial)
        if val >= cur - 1e-12:
            state, cur, n = trial, val, n + 1
    return state, n


def trust(holdout_correct: np.ndarray, holdout_fired: np.ndarray, prior: np.ndarray,
          m: float = TRUST_M) -> np.ndarray:
    """A rule's trust: its held-out precision shrunk towards its training precision,
    ``(correct + m * prior) / (fired + m)`` (the m-estimate; ``prior`` NaN -> 0.5).

    Measured on the held-out part of the dev fold, which the search never scored: a rule the
    search kept because it fits the search part earns no trust from that fit. A rule that
    never fires on the held-out part keeps (a shrunk copy of) its training precision."""
    prior = np.where(np.isnan(prior), 0.5, prior)
    return (holdout_correct + m * prior) / (holdout_fired + m)


def _finalise(method: str, rules: Sequence[Rule], search: EvalSet, holdout: EvalSet,
              combine: CombineFn) -> tuple[list[Rule], pd.DataFrame, pd.DataFrame,
                                           dict[str, float]]:
    """Score a rule set on both parts; its stats become held-out trust (``fold='dev_holdout'``:
    support and raw precision on the held-out part, ``precision`` = :func:`trust`)."""
    rules = list(rules)
    s_pred, s_res = search.predict(rules, combine)
    h_meas = holdout.engine.apply(rules, y=holdout.y)
    prior = np.array([np.nan if r.precision is None else r.precision for r in rules], float)
    tr = trust(h_meas.correct, h_meas.support, prior) if rules else np.zeros(0)
    h_pred, _ = holdout.predict(rules, combine, precision=tr)
    final = []
    for j, r in enumerate(rules):
        sstats = {"support": int(s_res.support[j]),
                  "precision": None if np.isnan(s_res.precision[j]) else
                  float(s_res.precision[j]), "fold": "dev_search"}
        hstats = {"support": int(h_meas.support[j]), "precision": float(tr[j]),
                  "holdout_precision": None if np.isnan(h_meas.precision[j]) else
                  float(h_meas.precision[j]), "fold": "dev_holdout"}
        final.append(r.replace(stats=hstats, provenance={**r.provenance, "search_stats": sstats,
                                                         "train_stats": dict(r.stats)}))
    rows = []
    for split, ev, pred in (("search", search, s_pred), ("holdout", holdout, h_pred)):
        for task in (None,) + TASKS:
            for variant, p in (("model", ev.base_pred), ("model+rules", pred)):
                rows.append({"method": method, "split": split, "task": task or "pooled",
                             "variant": variant, "metric": "weighted_f1",
                             "value": ev.f1(p, task), "n": int(len(ev) if task is None else
                                                               (ev.obs.tasks == task).sum())})
    metrics = pd.DataFrame(rows)
    table = rules_table(final)
    table["train_precision"] = [r.provenance["train_stats"].get("precision") for r in final]
    table["search_fired"] = s_res.support
    table["search_precision"] = s_res.precision
    table["holdout_fired"] = h_meas.support
    table["holdout_precision"] = h_meas.precision
    table["trust"] = tr
    scores = {"search_reward": weighted_f1_idx(search.y, s_pred),
              "search_base": weighted_f1_idx(search.y, search.base_pred),
              "holdout_reward": weighted_f1_idx(holdout.y, h_pred),
              "holdout_base": weighted_f1_idx(holdout.y, holdout.base_pred)}
    return final, metrics, table, scores


def _prepare(dev: EvalSet | tuple, holdout_fraction: float, seed: int
             ) -> tuple[EvalSet, EvalSet]:
    if not isinstance(dev, EvalSet):
        dev = EvalSet(*dev)
    return dev.split(holdout_fraction, seed)


def _requests(proposer: Proposer) -> int:
    """Proposal requests so far, answered or served from the cache: the budget unit that
    MCTS and top-N are matched on (counting only cache misses would let one side ask for
    free)."""
    return proposer.calls + proposer.cache_hits


def _cost(proposer: Proposer, calls0: int, hits0: int, tok0: int | None) -> dict[str, Any]:
    return {**proposer.cost(), "calls": proposer.calls - calls0,
            "cache_hits": proposer.cache_hits - hits0,
            "requests": proposer.calls - calls0 + proposer.cache_hits - hits0,
            "tokens": None if proposer.tokens is None else proposer.tokens - (tok0 or 0)}


def _changes(state: Sequence[Rule], parent: Sequence[Rule]) -> str:
    """What a node's action changed in the rule set, as readable rules (+ added, - removed)."""
    a, b = {r.key for r in state}, {r.key for r in parent}
    return "; ".join([f"+ {r.describe()}" for r in state if r.key not in b]
                     + [f"- {r.describe()}" for r in parent if r.key not in a])


def mcts_search(proposer: Proposer, dev: EvalSet | tuple, cfg: RulesCfg, *,
                combine: CombineFn, seed: int = 0,
                action_weights: dict[str, float] | None = None,
                init_rules: Sequence[Rule] = (), prune: bool = True,
                progress: bool = False) -> SearchResult:
    """Search rule sets with UCT (all knobs from ``cfg``); return the best one by search-part
    reward and its report.

    ``dev`` is an ``EvalSet`` or ``(observables, gold label indices, proba)``; it is split
    into the search part (the reward) and the held-out part (``cfg.holdout_fraction``).
    ``combine`` maps (proba (n, 48), RuleResult) to final label indices. ``prune`` drops,
    lowest priority first, the best set's rules whose removal does not lower the search
    reward. Seeded and deterministic for a deterministic proposer. Whether the rule set
    ships is decided outside, on the held-out part (``collab.ship``).
    """
    t0 = time.perf_counter()
    search, holdout = _prepare(dev, cfg.holdout_fraction, seed)
    calls0, hits0, tok0 = proposer.calls, proposer.cache_hits, proposer.tokens
    prob = RuleSetProblem(proposer, search, combine, cfg, action_weights=action_weights)
    tree = TreeSearch(tuple(init_rules), prob.expand, prob.reward, uct_c=cfg.uct_c,
                      width=cfg.width, depth=cfg.depth, seed=seed,
                      normalise=cfg.normalise_rewards)
    it_rows = []
    bar = tqdm(total=cfg.iterations, desc="MCTS") if progress else None
    for _ in range(cfg.iterations):
        row = tree.step()
        row.update({"proposer_calls": proposer.calls - calls0,
                    "proposer_requests": _requests(proposer) - calls0 - hits0,
                    "elapsed_s": time.perf_counter() - t0})
        it_rows.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(best=f"{row['best_reward']:.4f}")
    if bar is not None:
        bar.close()
    best = tree.best()
    rules, n_pruned = (prune_rules(best.state, prob.reward) if prune else (best.state, 0))
    final, metrics, table, scores = _finalise("mcts", rules, search, holdout, combine)
    trace = tree.trace()
    trace["is_best"] = trace["node"] == best.id
    trace["changed"] = [_changes(n.state, tree.nodes[n.parent].state if n.parent is not None
                                 else ()) for n in tree.nodes]
    wall = time.perf_counter() - t0
    root_kids = [tree.nodes[i].visits for i in tree.root.children]
    cost = {**_cost(proposer, calls0, hits0, tok0),
            "reward_evals": prob.reward_evals, "reward_s": round(prob.reward_s, 4),
            "nodes": len(tree.nodes), "max_depth": int(trace["depth"].max()),
            "root_child_visits": "/".join(map(str, root_kids)),
            "best_node_reward": best.reward, "best_node_rules": len(best.state),
            "pruned": n_pruned, "wall_s": round(wall, 3)}
    params = {**dataclasses.asdict(cfg), "combine": getattr(combine, "__name__", str(combine)),
              "seed": seed, "n_search": len(search), "n_holdout": len(holdout),
              "targets": dict(prob.targets)}
    return SearchResult("mcts", final, metrics=metrics, cost=cost, rule_table=table,
                        trace=trace, iterations=pd.DataFrame(it_rows), params=params,
                        best_node=best.id, **scores)


def top_n_rules(proposer: Proposer, dev: EvalSet | tuple, cfg: RulesCfg, *, budget: int,
                n_rules: int, combine: CombineFn, seed: int = 0,
                init_rules: Sequence[Rule] = ()) -> SearchResult:
    """Baseline without search, matched to MCTS: ``budget`` proposal *requests* (calls and
    cache hits alike, as MCTS's are counted) go round-robin over the labels with model errors
    on the search part, each request carrying the rules already collected for that label
    (so a second request yields new proposals); the ``n_rules`` proposals with the highest
    training precision (then support) are kept, in decision-list order, and scored like
    ``mcts_search``'s best set. ``n_rules`` is MCTS's rule count in the pipeline;
    ``init_rules`` (MCTS's starting rules) join the pool. Use a fresh proposer (a shared one
    would answer from MCTS's cache)."""
    t0 = time.perf_counter()
    search, holdout = _prepare(dev, cfg.holdout_fraction, seed)
    calls0, hits0, tok0 = proposer.calls, proposer.cache_hits, proposer.tokens
    wrong = np.flatnonzero(search.base_pred != search.y)
    errors = errors_from(search.obs, search.y, search.base_pred, wrong)
    labels = sorted({ALL_LABELS[int(search.y[i])] for i in wrong}, key=LABEL_INDEX.__getitem__)
    pool: dict[tuple, Rule] = {r.key: r for r in init_rules}
    per_label: dict[str, tuple[Rule, ...]] = {lab: () for lab in labels}
    dry = 0  # consecutive requests that brought nothing new: stop when every label is dry
    while labels and _requests(proposer) - calls0 - hits0 < budget and dry < len(labels):
        for lab in labels:
            if _requests(proposer) - calls0 - hits0 >= budget:
                break
            got = [r for r in proposer.propose(lab, errors, cfg.k, context=per_label[lab])
                   if r.key not in pool]
            dry = 0 if got else dry + 1
            for r in got:
                pool[r.key] = r
            per_label[lab] += tuple(got)
    ranked = sorted(pool.values(), key=lambda r: (-(r.precision or 0.0),
                                                  -int(r.stats.get("support") or 0), r.id))
    chosen: tuple[Rule, ...] = ()
    for r in ranked[:n_rules]:
        chosen = _insert(chosen, r)
    final, metrics, table, scores = _finalise("top_n", chosen, search, holdout, combine)
    cost = {**_cost(proposer, calls0, hits0, tok0), "pool": len(pool),
            "wall_s": round(time.perf_counter() - t0, 3)}
    params = {**dataclasses.asdict(cfg), "budget": budget, "n_rules": n_rules, "seed": seed,
              "combine": getattr(combine, "__name__", str(combine))}
    return SearchResult("top_n", final, metrics=metrics, cost=cost, rule_table=table,
                        params=params, **scores)
