"""Regenerate ``kdsl_utils/rules/fixtures/synthetic_intent.json``, the rule base tiny's smoke
runs start from (``RulesCfg.init_rules``): the data-driven miner's best rule per intent label
(training precision >= 0.9), mined on the synthetic generator at full size with seed 7 — not
the smoke data (seed 0), so the smoke runs' held-out gate judges rules it never saw mined.

    python benchmarks/make_rules_fixture.py [OUT] [--cache DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kdsl_utils.data.labels import INTENT_LABELS
from kdsl_utils.data.mire import load_mire
from kdsl_utils.data.source import resolve_data
from kdsl_utils.knowledge import FIXTURES
from kdsl_utils.rules import DataProposer, RuleBase, build_observables


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=str(FIXTURES / "synthetic_intent.json"))
    ap.add_argument("--cache", default="/tmp/kdsl_synth", help="where the synthetic data goes")
    args = ap.parse_args()
    src = resolve_data(None, seed=7, smoke=False, cache_root=args.cache)
    prop = DataProposer(build_observables(load_mire(src.root, decode_images=False).train))
    rules = []
    for lab in INTENT_LABELS:
        rules += [r for r in prop.propose(lab, [], k=2) if (r.precision or 0) >= 0.9][:1]
    RuleBase(rules, meta={"source": "DataProposer on the synthetic generator, seed 7, full "
                          "size, intent task, no OCR; top rule per label with training "
                          "precision >= 0.9", "generated_by": "benchmarks/make_rules_fixture.py"}
             ).save(Path(args.out))
    print(f"{len(rules)} rules -> {args.out}")


if __name__ == "__main__":
    main()
