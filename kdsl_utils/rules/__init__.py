"""Interpretable rules (DESIGN.md, method points 3-4): schema, vectorised engine, proposers and
the Monte Carlo Tree Search that builds a rule base."""

from .engine import (LABEL_INDEX, CombineFn, Observables, RuleEngine, RuleResult,
                     build_observables, concat_observables, label_indices, label_strings,
                     rules_table)
from .mcts import (EvalSet, Node, RuleSetProblem, SearchResult, TreeSearch, mcts_search,
                   prune_rules, split_dev, top_n_rules, trust)
from .propose import (DataProposer, ErrorExample, LLMProposer, ParseReport, Proposer,
                      errors_from, parse_rules)
from .schema import (FIELDS, OPS, SCHEMA_VERSION, Condition, Rule, RuleBase,
                     RuleValidationError, check_rule, load_rulebase, make_rule, rule_id_for,
                     rulebase_json_schema, validate_rule)

__all__ = [
    "FIELDS", "OPS", "SCHEMA_VERSION", "Condition", "Rule", "RuleBase", "RuleValidationError",
    "check_rule", "load_rulebase", "make_rule", "rule_id_for", "rulebase_json_schema",
    "validate_rule",
    "LABEL_INDEX", "CombineFn", "Observables", "RuleEngine", "RuleResult", "build_observables",
    "concat_observables",
    "label_indices", "label_strings", "rules_table",
    "DataProposer", "ErrorExample", "LLMProposer", "ParseReport", "Proposer", "errors_from",
    "parse_rules",
    "EvalSet", "Node", "RuleSetProblem", "SearchResult", "TreeSearch", "mcts_search",
    "prune_rules", "split_dev", "top_n_rules", "trust",
]
