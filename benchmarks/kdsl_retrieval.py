"""KDSL with vs without retrieval augmentation of its large model (issue 13 item 4).

    python benchmarks/kdsl_retrieval.py RESULTS_DIR [--data mire] [--seed 0] [--readme]

Reads two finished runs of notebooks 02-03 under ``RESULTS_DIR``: the plain ``mini`` profile
and the same with ``OVERRIDES={"mini__retrieval": true}`` (``results/mini-ov<hash>/``: KDSL's
large model gets the neighbour-label block; rules, search and strategy choice run as usual on
that model). Both score the same test records; per split this prints the weighted F1 of the
large model and of KDSL in each run and the paired bootstrap 95% CI (1000 resamples) of
(with retrieval − without), from notebook 03's ``decisions.csv`` (per record: gold, the
model's and KDSL's label). Run them with::

    python -m kdsl_utils.notebooks 02_mcts_rules --out OUT -p PROFILE mini -p DATA_DIR D \\
        -p RESULTS_DIR R [-p OVERRIDES '{"mini__retrieval": true}']   (then 03_collaborative)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from readme_sections import write_section

from kdsl_utils.config import results_profile
from kdsl_utils.data.labels import label_indices
from kdsl_utils.metrics import weighted_f1_idx
from kdsl_utils.report import paired_gain_ci, to_markdown

OVERRIDES = {"mini__retrieval": True}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path)
    ap.add_argument("--data", default="mire")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--readme", action="store_true")
    a = ap.parse_args()
    runs = {name: pd.read_csv(a.results / prof / a.data / f"seed{a.seed}" / "03_collaborative"
                              / "decisions.csv")
            for name, prof in (("without", "mini"), ("with", results_profile("mini", OVERRIDES)))}
    f1, gains = [], []
    for split in sorted(runs["without"].split.unique()):
        w0, w1 = (runs[k][runs[k].split == split].set_index("id") for k in ("without", "with"))
        w1 = w1.loc[w0.index]
        y = label_indices(list(w0.label))
        for col, what in (("model_pred", "large model"), ("final_pred", "KDSL")):
            p0, p1 = label_indices(list(w0[col])), label_indices(list(w1[col]))
            f1.append({"split": split, "row": what, "without retrieval": weighted_f1_idx(y, p0),
                       "with retrieval": weighted_f1_idx(y, p1)})
            ci = paired_gain_ci(y, p1, p0, list(w0.task), n_boot=1000, seed=a.seed)
            gains += [{"split": split, "row": what, "task": r.task, "n": r.n,
                       "gain (points)": round(100 * r.gain, 2),
                       "95% CI": f"[{100 * r.lo:+.2f}, {100 * r.hi:+.2f}]"}
                      for _, r in ci.iterrows()]
    text = "\n\n".join([
        f"KDSL with vs without retrieval augmentation of its large model (mini, data {a.data}, "
        f"seed {a.seed}; `OVERRIDES={OVERRIDES}` → `{results_profile('mini', OVERRIDES)}`): "
        "notebooks 02-03 run twice on the same records; the rules are searched for each run's "
        "own model. `python benchmarks/kdsl_retrieval.py RESULTS_DIR --readme`.",
        "Weighted F1 (pooled):", to_markdown(pd.DataFrame(f1).round(4)),
        "With − without, paired bootstrap 95% CI:", to_markdown(pd.DataFrame(gains))])
    print(text)
    if a.readme:
        write_section("kdsl_retrieval", text)


if __name__ == "__main__":
    main()
