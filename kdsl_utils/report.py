"""Result tables and the generated README section (notebooks 03 and 90).

Everything here reads tidy metric frames (``metrics.csv``); nothing trains or predicts.
Figures are drawn by a function passed in (notebook 90 passes
:func:`kdsl_utils.plots.report_figures`), so this module, which notebook 03 imports too,
does not depend on the plotting stack.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import PROFILES, resolve, results_profile
from .data.labels import TASKS
from .metrics import bootstrap_ci, weighted_f1_idx
from .results import ResultsFileError, atomic_write, read_metrics, read_run_json, read_table
from .seesaw_files import FIGURE_FILE, FITS_FILE, SCHEDULES, schedule_label, with_schedule

#: Display names and order of the results table's rows (variant → name). Variants of
#: notebook 01 carry the prefix ``01:``.
ROWS = {
    "zero_shot": "Zero-shot large model",
    "01:joint": "Joint fine-tune, full train (challenge baseline recipe)",
    "01:single_pair": "Single-task fine-tunes (two specialists)",
    "model": "Joint fine-tune, train minus dev fold (KDSL's large model)",
    "rules+majority[mcts@data]": "Rules + majority-label fallback (data-driven miner's MCTS rules)",
    "rules+majority[mcts@llm]": "Rules + majority-label fallback (small LM's MCTS rules)",
    "kdsl": "KDSL: model + MCTS rules of the profile's proposer (trust, strategy, shipping "
            "decided on held-out dev)",
    "kdsl[mcts@data]": "KDSL with the data-driven miner's rules",
    "kdsl[mcts@llm]": "KDSL with the small LM's rules",
    "kdsl[top_n]": "Ablation: no MCTS (top-N, N = MCTS's rule count, same proposal requests, "
                   "own strategy)",
    "kdsl_ungated[mcts@data]": "Diagnostic: model + every rule MCTS found, ship gate skipped "
                               "(data-driven miner)",
    "kdsl_ungated[mcts@llm]": "Diagnostic: model + every rule MCTS found, ship gate skipped "
                              "(small LM)",
    "model[no_aug]": "Ablation: large model fine-tuned without augmentation",
    "kdsl[no_aug]": "Ablation: no augmentation (KDSL pipeline on that model)",
    # The small LM's rows of a run whose profile proposes with the data-driven miner come from
    # its ``RULES=llm`` run (another results path, its own large model): prefixed LLM_RUN.
    "llm-run:model": "RULES=llm run: its own large model (joint fine-tune, train minus dev "
                     "fold; the Δ of the next two rows is against it)",
    "llm-run:rules+majority[mcts@llm]": "RULES=llm run: rules + majority-label fallback (small "
                                        "LM's MCTS rules)",
    "llm-run:kdsl[mcts@llm]": "RULES=llm run: KDSL with the small LM's rules",
}
#: Prefix of the variants taken from a run's ``RULES=llm`` companion (:func:`llm_companion`).
LLM_RUN = "llm-run:"
#: Rows per proposer the results table always lists: rules only (with the majority fallback)
#: and KDSL, for the data-driven miner and the small LM; absent ones say they were not run.
PROPOSER_ROWS = {"data": ("rules+majority[mcts@data]", "kdsl[mcts@data]"),
                 "llm": ("rules+majority[mcts@llm]", "kdsl[mcts@llm]")}
PAPER_GAINS = {"test1": 6.37, "test2": 6.28}  # the paper's online weighted-F1 gains (points)
_MARK = ("<!-- results:start -->", "<!-- results:end -->")
#: Each run's subsection inside the results section: ``<!-- results:KEY -->`` ...
#: ``<!-- /results:KEY -->``, KEY = ``profile/data/seed<N>`` (:func:`section_key`).
_SUB = re.compile(r"<!-- results:(?P<key>[^\n]+?) -->\n(?P<body>.*?)\n<!-- /results:(?P=key) -->", re.DOTALL)
_LEGACY = re.compile(r"^### profile=(?P<profile>[^,\n]+), data=(?P<data>[^,\n]+)$", re.MULTILINE)


def ci_rows(y_true: Sequence[str], y_pred: Sequence[str], tasks: Sequence[str], *,
            n_boot: int = 1000, boot_seed: int = 0, **ids: Any) -> list[dict[str, Any]]:
    """Bootstrap 95% CI bounds of pooled and per-task weighted F1 as tidy rows
    (metrics ``weighted_f1_lo`` / ``weighted_f1_hi``); ``ids`` fill the other columns."""
    ci = bootstrap_ci(y_true, y_pred, tasks, n_boot=n_boot, seed=boot_seed)
    rows = []
    for _, r in ci[ci.metric.str.endswith("weighted_f1")].iterrows():
        task = "pooled" if r.metric == "weighted_f1" else r.metric.split("_")[0]
        for bound in ("lo", "hi"):
            rows.append({**ids, "task": task, "metric": f"weighted_f1_{bound}", "value": r[bound]})
    return rows


def paired_gain_ci(y_true: np.ndarray, pred: np.ndarray, base: np.ndarray,
                   tasks: Sequence[str], *, n_boot: int = 1000, seed: int = 0,
                   alpha: float = 0.05) -> pd.DataFrame:
    """Weighted-F1 gain of ``pred`` over ``base`` (label indices, same records) with a
    **paired** percentile bootstrap CI: each resample draws one set of records and scores
    both predictions on it, so the CI is of the difference, not of two independent F1s.
    Rows ``task`` (``pooled`` and each task), ``gain``, ``lo``, ``hi``, ``n`` (records)."""
    y, a, b = (np.asarray(v, dtype=np.int64) for v in (y_true, pred, base))
    tk = np.asarray(tasks)
    rng = np.random.default_rng(seed)
    groups = {"pooled": np.ones(len(y), bool), **{t: tk == t for t in TASKS if (tk == t).any()}}
    samples = {g: np.empty(n_boot) for g in groups}
    for i in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        for g, m in groups.items():
            j = idx[m[idx]]
            samples[g][i] = (weighted_f1_idx(y[j], a[j]) - weighted_f1_idx(y[j], b[j])
                             if len(j) else np.nan)
    rows = []
    for g, m in groups.items():
        lo, hi = np.nanquantile(samples[g], [alpha / 2, 1 - alpha / 2])
        rows.append({"task": g, "gain": weighted_f1_idx(y[m], a[m]) - weighted_f1_idx(y[m], b[m]),
                     "lo": float(lo), "hi": float(hi), "n": int(m.sum())})
    return pd.DataFrame(rows)


def gain_rows(y_true: np.ndarray, pred: np.ndarray, base: np.ndarray, tasks: Sequence[str], *,
              n_boot: int = 1000, boot_seed: int = 0, **ids: Any) -> list[dict[str, Any]]:
    """:func:`paired_gain_ci` as tidy rows: metrics ``gain_vs_model``, ``gain_vs_model_lo``,
    ``gain_vs_model_hi`` (weighted-F1 fractions); ``ids`` fill the other columns."""
    ci = paired_gain_ci(y_true, pred, base, tasks, n_boot=n_boot, seed=boot_seed)
    return [{**ids, "task": r.task, "metric": f"gain_vs_model{suffix}", "value": r[col]}
            for _, r in ci.iterrows() for suffix, col in (("", "gain"), ("_lo", "lo"),
                                                          ("_hi", "hi"))]


# notebook 05's variants (kdsl_utils.dynamic_cot.VARIANTS) x inference, as README rows
COT_ROWS = {f"{v}/{m}": f"{v} ({m.replace('_', ' ')})" for v in ("sft", "full_cot", "dynamic_cot")
            for m in ("parsed", "scored_after_reasoning")}


def results_table(metrics: pd.DataFrame, rows: dict[str, str] | None = None,
                  not_run: Mapping[str, str] | None = None,
                  gain: str = "gain_vs_model") -> pd.DataFrame:
    """Wide table: one row per variant (display name), columns ``split/task`` holding
    ``mean [lo, hi]`` of weighted F1 (mean over seeds; CI of the first seed when present),
    plus the number of seeds, and per split the pooled gain over the model (metric ``gain``,
    e.g. ``gain_vs_joint`` for notebook 04's rows) with its paired 95% CI (``Δ split``,
    points) where the metrics hold one. A variant of ``not_run`` (variant → why) that the
    metrics lack gets a row saying so (``seeds`` 0, ``note``)."""
    rows = rows or ROWS
    not_run = dict(not_run or {})
    wf1 = metrics[metrics.metric == "weighted_f1"]
    out = []
    for variant, name in rows.items():
        g = wf1[wf1.variant == variant]
        if g.empty:
            if variant in not_run:
                out.append({"row": name, "seeds": 0, "note": not_run[variant]})
            continue
        rec: dict[str, Any] = {"row": name, "seeds": g.seed.nunique()}
        for (split, task), gg in g.groupby(["split", "task"]):
            cell = f"{gg.value.mean():.4f}"
            lo = metrics[(metrics.variant == variant) & (metrics.split == split)
                         & (metrics.task == task) & (metrics.metric == "weighted_f1_lo")]
            hi = metrics[(metrics.variant == variant) & (metrics.split == split)
                         & (metrics.task == task) & (metrics.metric == "weighted_f1_hi")]
            if len(lo) and len(hi):
                cell += f" [{lo.value.iloc[0]:.3f}, {hi.value.iloc[0]:.3f}]"
            rec[f"{split} · {task}"] = cell
        for split in sorted(g.split.unique()):
            d = metrics[(metrics.variant == variant) & (metrics.split == split)
                        & (metrics.task == "pooled")].set_index("metric").value
            if gain in d:
                rec[f"Δ {split}"] = (f"{100 * d[gain]:+.2f} "
                                     f"[{100 * d[gain + '_lo']:+.2f}, "
                                     f"{100 * d[gain + '_hi']:+.2f}]")
        out.append(rec)
    table = pd.DataFrame(out)
    last = ["note"] if "note" in table.columns else []
    cols = ["row", "seeds"] + sorted(c for c in table.columns
                                     if c not in ("row", "seeds", "note")) + last
    return table[cols] if len(table) else table


def representation_rows(metrics04: pd.DataFrame) -> dict[str, str]:
    """Display names of notebook 04's rows (variant -> name), in table order: notebook 01's
    joint fine-tune, the kNN vote of each representation variant (with the k chosen on the
    dev fold, mean over seeds when they differ) and the retrieval-augmented model."""
    k = metrics04[metrics04.metric == "k_chosen"].groupby("variant").value.mean()
    rows = {"01:joint": "Joint fine-tune, full train (notebook 01, same seed)"}
    for v in sorted(set(metrics04.variant)):
        if v.startswith("knn_"):
            kk = f"{k[v]:g}" if v in k else "?"
            rows[v] = (f"knn[k={kk}]: similarity-weighted label vote of the k nearest training "
                       f"records ({v[len('knn_'):]} representation, k chosen on dev)")
    rows["model+retrieval"] = ("model+retrieval: joint fine-tune + neighbour-label block (out-of-fold "
                               "kNN votes of the training records as extra input)")
    return rows


def representation_table(metrics04: pd.DataFrame) -> pd.DataFrame:
    """Notebook 04's rows of the results table (:func:`representation_rows`): weighted F1
    [bootstrap 95% CI] per split and task, ``Δ split`` = pooled gain over the joint
    fine-tune of the same seed with its paired 95% CI (points)."""
    return results_table(metrics04, representation_rows(metrics04), gain="gain_vs_joint")


def llm_companion(profile_dir: str) -> str | None:
    """The results-path profile segment of ``profile_dir``'s ``RULES=llm`` run (the Makefile's
    override ``{"rules__proposer": "llm"}``), or None where ``profile_dir`` already carries
    overrides or its profile proposes with the small LM itself (its own run has those rows)."""
    if profile_dir not in PROFILES or resolve(profile_dir).rules.proposer == "llm":
        return None
    return results_profile(profile_dir, {"rules__proposer": "llm"})


def proposer_rows(m03: pd.DataFrame, companion: pd.DataFrame | None,
                  companion_dir: str | None) -> tuple[pd.DataFrame, dict[str, str]]:
    """Notebook 03's metrics with the per-proposer rule rows made explicit: the small LM's
    rows taken from the ``RULES=llm`` companion run's metrics (``companion``, variants
    prefixed :data:`LLM_RUN`, beside that run's own model row) where this run lacks them;
    and, for each per-proposer row still absent, why (``results_table``'s ``not_run``)."""
    have = set(m03.variant)
    merged = m03
    if companion is not None and not set(PROPOSER_ROWS["llm"]) <= have:
        keep = companion[companion.variant.isin(("model",) + PROPOSER_ROWS["llm"])]
        merged = pd.concat([m03, keep.assign(variant=LLM_RUN + keep.variant)],
                           ignore_index=True)
    not_run = {}
    for proposer, variants in PROPOSER_ROWS.items():
        for v in variants:
            if v in have or (LLM_RUN + v) in set(merged.variant):
                continue
            where = (f" (its results would be under {companion_dir}/)" if companion_dir else "")
            not_run[v] = (f"not run: this run's proposers did not include {proposer}"
                          + (f"; `make reproduce ... RULES=llm` runs it{where}"
                             if proposer == "llm" else ""))
    return merged, not_run


def gains_vs_paper(metrics: pd.DataFrame, ours: str = "kdsl", base: str = "model") -> pd.DataFrame:
    """Pooled weighted-F1 gain of KDSL over its own large model, in points, per test split,
    with its paired bootstrap 95% CI where the metrics hold one (``gain_rows``), beside the
    paper's reported gain over its state of the art."""
    pooled = metrics[metrics.task == "pooled"]
    wf1 = pooled[pooled.metric == "weighted_f1"]
    out = []
    for split in sorted(wf1.split.unique()):
        a = wf1[(wf1.variant == ours) & (wf1.split == split)].value.mean()
        b = wf1[(wf1.variant == base) & (wf1.split == split)].value.mean()
        g = pooled[(pooled.variant == ours) & (pooled.split == split)]
        ci = {m: g[g.metric == m].value.iloc[0] for m in ("gain_vs_model_lo", "gain_vs_model_hi")
              if (g.metric == m).any()}
        out.append({"split": split, "ours: KDSL − its large model (points)": round(100 * (a - b), 2),
                    "paired 95% CI (points)": (f"[{100 * ci['gain_vs_model_lo']:+.2f}, "
                                               f"{100 * ci['gain_vs_model_hi']:+.2f}]")
                    if len(ci) == 2 else None,
                    "paper: KDSL − state of the art (points)": PAPER_GAINS.get(split)})
    return pd.DataFrame(out)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub table without the tabulate dependency."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join("" if pd.isna(v) else str(v) for v in r.values) + " |")
    return "\n".join(lines)


def section_key(profile: str, data: str, seed: int) -> str:
    """The README subsection key of the runs of one profile, data and seed."""
    return f"{profile}/{data}/seed{seed}"


def _existing_sections(block: str) -> dict[str, str]:
    """Subsections of a results block by key. A block written before subsection markers
    existed is split at its ``### profile=P, data=D`` headings into keys ``P/D`` (that layout
    held one seed per profile and data)."""
    found = {m.group("key"): m.group("body").strip() for m in _SUB.finditer(block)}
    if found:
        return found
    heads = list(_LEGACY.finditer(block))
    for k, m in enumerate(heads):
        stop = heads[k + 1].start() if k + 1 < len(heads) else len(block)
        found[f"{m.group('profile')}/{m.group('data')}"] = block[m.start():stop].strip()
    return found


def _block_span(path: Path, text: str, markers: tuple[str, str]) -> tuple[int, int]:
    """Start and end offsets of the text between ``markers``, which must each occur once."""
    start, end = markers
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{path}: expected one block between {start} and {end}")
    return text.index(start) + len(start), text.index(end)


def write_marked_block(path: Path | str, body: str, markers: tuple[str, str] = _MARK) -> bool:
    """Replace the text between ``markers`` (each once in the file) of a markdown file with
    ``body`` (the benchmarks' README tables; the results section through
    :func:`write_readme_section`). Written atomically; True if it changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    i, j = _block_span(path, text, markers)
    new = text[:i] + "\n" + body.strip() + "\n" + text[j:]
    if new != text:
        atomic_write(path, new)
    return new != text


def write_readme_section(readme: Path | str, header: str, sections: Mapping[str, str]) -> bool:
    """Rewrite the results section of ``readme`` between its markers: ``header`` first, then
    one subsection per key (:func:`section_key`), sorted. ``sections`` are the runs this
    report saw; the README's other subsections are kept as they were, so a report over a
    results root that lacks some runs (a smoke run, another machine) never drops them. A kept
    subsection is replaced when ``sections`` has its key or a key below it (``P/D`` by
    ``P/D/seed0``). Written atomically; True if the file changed."""
    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    i, j = _block_span(path, text, _MARK)
    merged = {k: v for k, v in _existing_sections(text[i:j]).items()
              if not any(n == k or n.startswith(k + "/") for n in sections)}
    merged.update({k: v.strip() for k, v in sections.items()})
    parts = [header.strip(), ""]
    for key in sorted(merged):
        parts += [f"<!-- results:{key} -->", merged[key], f"<!-- /results:{key} -->", ""]
    if not merged:
        parts += ["No finished runs found.", ""]
    return write_marked_block(path, "\n".join(parts), _MARK)


def find_runs(results_root: Path | str, include_smoke: bool = False) -> pd.DataFrame:
    """Every finished run under ``results_root`` (``profile/data/seed<N>/experiment/``):
    profile, data, seed, experiment, path. A run is finished when its ``run.json`` is a valid
    one (:func:`~kdsl_utils.results.read_run_json`); a torn or foreign ``run.json``, or one in
    the old layout without a seed folder, is not taken for a finished run: it is named in a
    warning and listed in ``attrs["invalid"]``."""
    root = Path(results_root)
    rows, invalid = [], []
    for rj in sorted(root.glob("*/*/*/*/run.json")):
        exp_dir = rj.parent
        seed_dir = exp_dir.parent
        data, profile = seed_dir.parent.name, seed_dir.parent.parent.name
        if data.endswith("-smoke") and not include_smoke:
            continue
        m = re.fullmatch(r"seed(-?\d+)", seed_dir.name)
        if m is None:
            continue
        try:
            read_run_json(rj)
        except ResultsFileError as e:
            invalid.append(str(e))
            continue
        rows.append({"profile": profile, "data": data, "seed": int(m.group(1)),
                     "experiment": exp_dir.name, "path": exp_dir})
    invalid += [f"{rj}: old results layout (no seed<N> folder); re-run to report it"
                for rj in sorted(root.glob("*/*/*/run.json"))
                if include_smoke or not rj.parent.parent.name.endswith("-smoke")]
    if invalid:
        warnings.warn("results not reported:\n  " + "\n  ".join(invalid), stacklevel=2)
    out = pd.DataFrame(rows, columns=["profile", "data", "seed", "experiment", "path"])
    out.attrs["invalid"] = invalid
    return out


def seesaw_gain(metrics01: pd.DataFrame, fits01: pd.DataFrame | None = None) -> pd.DataFrame:
    """Joint minus single-task weighted F1 per training schedule, split and task (mean over
    seeds). The ``schedule`` column names the row: epoch- or step-matched, with each mix's
    optimizer steps and epochs where ``fits01`` (notebook 01's ``fits.csv``) is given
    (:func:`~kdsl_utils.seesaw_files.schedule_label`)."""
    m = with_schedule(metrics01)
    w = m[(m.metric == "weighted_f1") & m.task.isin(["image", "intent"])]
    out = []
    for schedule in [s for s in SCHEDULES if (w.schedule == s).any()]:
        ws = w[w.schedule == schedule]
        single = ws[ws.variant.isin(["image", "intent"])].groupby(["split", "task"]).value.mean()
        joint = ws[ws.variant == "joint"].groupby(["split", "task"]).value.mean()
        n = ws.groupby(["split", "task"]).seed.nunique()
        out.append(pd.DataFrame({"single-task": single.round(4), "joint": joint.round(4),
                                 "joint − single": (joint - single).round(4), "seeds": n})
                   .reset_index().assign(schedule=schedule_label(fits01, schedule)))
    cols = ["schedule", "split", "task", "single-task", "joint", "joint − single", "seeds"]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def time_table(paths: dict[str, Path]) -> pd.DataFrame:
    """Where the time went, per notebook, from each ``run.json``: wall seconds, the feature
    extraction done in it (OCR / embeddings: seconds, items computed, look-ups served by the
    feature cache) and the rest (training, search, scoring, plotting). ``paths``: experiment ->
    its results folder."""
    rows = []
    for exp, path in sorted(paths.items()):
        run = read_run_json(Path(path) / "run.json")
        fx = run.get("feature_extraction", {})
        f_s = sum(v["seconds"] for v in fx.values())
        wall = float(run.get("wall_time_s", float("nan")))
        rows.append({
            "notebook": exp, "started": run.get("started", ""), "wall_s": round(wall, 1),
            "features_s": round(f_s, 1), "other_s": round(wall - f_s, 1),
            "computed": ", ".join(f"{k} {int(v['computed'])}" for k, v in sorted(fx.items()) if v["computed"]) or "-",
            "from_cache": ", ".join(f"{k} {int(v['cached'])}" for k, v in sorted(fx.items()) if v["cached"]) or "-",
        })
    return pd.DataFrame(rows)


def commits_line(paths: dict[str, Path]) -> str:
    """The git commit(s) the runs in ``paths`` record in their ``run.json`` (what produced
    the numbers, which may be older than the report)."""
    full = {str(read_run_json(Path(p) / "run.json").get("git_commit", "unknown")) for p in paths.values()}
    commits = sorted(c.split("-")[0][:12] + ("-dirty" if c.endswith("-dirty") else "") for c in full)
    return ", ".join(f"`{c}`" for c in commits)


def machine_line(paths: dict[str, Path]) -> str:
    """The machine the runs in ``paths`` report in their ``run.json`` (the first one's)."""
    run = read_run_json(Path(next(iter(paths.values()))) / "run.json")
    dev = run.get("device", {})
    return (f"{dev.get('platform', '?')}, {dev.get('torch_threads', '?')} torch threads, "
            f"CUDA {'yes' if dev.get('cuda') else 'no'}")


#: Draws a run group's figures: (experiment -> results folder, figure folder, label) -> files.
DrawFn = Callable[[Mapping[str, Path], Path, str], list[Path]]

#: The text above the subsections of the README's results section. It names no commit:
#: each subsection names the commit of its own runs (kept subsections may be older).
README_HEADER = ("Generated by `notebooks/90_report.ipynb` from the results files; every number names "
                 "the profile, data and seed that produced it, each subsection the commit of its runs. "
                 "`synthetic` = the built-in generator; other data names are the MIRE directory used. "
                 "Subsections of runs this report did not see are kept as they were.")


def run_label(profile_dir: str, data: str, seed: int, paths: Mapping[str, Path]) -> str:
    """``profile=..., data=..., seed=...`` of a group of runs, plus the overrides its
    (validated) run.json records (a folder ``<profile>-ov<hash>`` holds a run with overrides)."""
    label = f"profile={profile_dir}, data={data}, seed={seed}"
    overrides = {}
    for path in paths.values():
        overrides = read_run_json(Path(path) / "run.json").get("overrides") or overrides
    return label + (f" (overrides {json.dumps(overrides, ensure_ascii=False)})" if overrides else "")


def readme_section(label: str, paths: Mapping[str, Path], fig_dir: Path | str,
                   readme_dir: Path | str, llm_run: Path | None = None,
                   llm_dir: str | None = None) -> str:
    """The README markdown of one (profile, data, seed) group: the commit of its runs, the
    seesaw table and figure (01), the results table and the gain beside the paper's (03),
    the run-time table. Every file read is validated (a bad one raises
    :class:`~kdsl_utils.results.ResultsFileError` naming it). Writes ``results_table.csv``
    and ``run_times.csv`` into ``fig_dir`` (next to the figures). ``llm_run``: notebook 03's
    folder of the group's ``RULES=llm`` companion run (``llm_dir``: its profile segment),
    whose small-LM rows join the table (:func:`proposer_rows`)."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    md = [f"### {label}", "", f"Runs of commit {commits_line(dict(paths))}.", ""]
    if "01_seesaw" in paths:
        p01 = Path(paths["01_seesaw"])
        fits = read_table(p01 / FITS_FILE, ["schedule", "variant", "steps", "epochs"])
        gain = seesaw_gain(read_metrics(p01 / "metrics.csv"), fits)
        md += ["**Seesaw** (notebook 01): weighted F1 of single-task vs joint fine-tuning, "
               "epoch-matched (every mix the profile's epochs) and step-matched (every mix the "
               "joint run's optimizer steps).", "",
               to_markdown(gain), "",
               f"![seesaw]({os.path.relpath(fig_dir, Path(readme_dir))}/{FIGURE_FILE})", ""]
    if "03_collaborative" in paths:
        m03 = read_metrics(Path(paths["03_collaborative"]) / "metrics.csv")
        companion = read_metrics(Path(llm_run) / "metrics.csv") if llm_run else None
        shown, not_run = proposer_rows(m03, companion, llm_dir)
        table = results_table(shown, not_run=not_run)
        table.to_csv(fig_dir / "results_table.csv", index=False)
        md += ["**Results** (notebook 03): weighted F1 [bootstrap 95% CI], pooled over both tasks "
               "and per task.", "", to_markdown(table), "",
               "KDSL's gain beside the paper's (different models, data sizes and baselines):", "",
               to_markdown(gains_vs_paper(m03)), ""]
    if "04_representations" in paths:
        m04 = read_metrics(Path(paths["04_representations"]) / "metrics.csv")
        if (m04.metric == "gain_vs_joint").any():
            table = representation_table(m04)
            table.to_csv(fig_dir / "representation_table.csv", index=False)
            md += ["**Representations** (notebook 04, NoteLLM-2 recipe): kNN classifiers and the "
                   "retrieval-augmented model beside the joint fine-tune; weighted F1 [bootstrap "
                   "95% CI], `Δ split` = pooled gain over the joint with a paired bootstrap 95% "
                   "CI (points).", "", to_markdown(table), ""]
    if "05_dynamic_cot" in paths:
        m05 = read_metrics(Path(paths["05_dynamic_cot"]) / "metrics.csv")
        md += ["**Dynamic CoT** (notebook 05): weighted F1 of each post-training variant, label "
               "parsed from the generation or scored after the generated reasoning.", ""]
        if (m05.metric == "applicable").any():  # written by profiles without a generative student
            md += ["Not applicable for this profile (no generative student): "
                   + ", ".join(sorted(m05.variant.unique())) + ".", ""]
        else:
            md += [to_markdown(results_table(m05, rows=COT_ROWS)), ""]
    times = time_table(dict(paths))
    times.to_csv(fig_dir / "run_times.csv", index=False)
    md += [f"**Run time** of the last run of each notebook (seconds; `features_s`: OCR and embeddings "
           f"computed in that run, the rest is training, search and scoring; counts: items "
           f"computed, and look-ups served by the feature cache). Machine: {machine_line(dict(paths))}.",
           "", to_markdown(times.drop(columns="started")), ""]
    return "\n".join(md)


def report_sections(runs: pd.DataFrame, figures_dir: Path | str, readme: Path | str | None,
                    draw: DrawFn) -> tuple[dict[str, str], list[Path], dict[str, str]]:
    """Every (profile, data, seed) group of :func:`find_runs` (only valid runs): its figures
    drawn by ``draw`` into ``figures_dir/<profile>/<data>/seed<N>/`` and its README
    subsection. Returns (subsection by :func:`section_key`, for
    :func:`write_readme_section`; figure files; stale groups). A group whose files an
    older version of the code wrote (a :class:`ResultsFileError`, e.g. a missing column) is
    not reported: it is returned as ``{section key: the error}`` and named in a warning,
    and the README keeps its old subsection, so one stale run does not stop the report of
    the others."""
    sections, made, stale = {}, [], {}
    readme_dir = Path(readme).parent if readme else Path(".")
    done03 = {(r.profile, r.data, r.seed): Path(r.path) for r in runs.itertuples()
              if r.experiment == "03_collaborative"}
    for (profile, data, seed), g in runs.groupby(["profile", "data", "seed"], sort=True):
        paths = dict(zip(g.experiment, g.path))
        fig_dir = Path(figures_dir) / profile / data / f"seed{seed}"
        label = run_label(profile, data, seed, paths)
        key = section_key(profile, data, seed)
        llm_dir = llm_companion(profile)
        try:
            figs = draw(paths, fig_dir, label)
            sections[key] = readme_section(
                label, paths, fig_dir, readme_dir, llm_run=done03.get((llm_dir, data, seed)),
                llm_dir=llm_dir and f"results/{llm_dir}/{data}/seed{seed}")
        except ResultsFileError as e:
            stale[key] = str(e)
            continue
        made += figs
    if stale:
        warnings.warn("runs not reported (written by older code; re-run them, e.g. make reproduce "
                      "with their PROFILE / DATA_DIR / SEED):\n  "
                      + "\n  ".join(f"{k}: {v}" for k, v in stale.items()), stacklevel=2)
    return sections, made, stale
