"""Figures, always drawn from results files (tidy frames read from CSV), never from live state.

Every function returns the matplotlib Figure; callers save it next to the results it
was drawn from. Chinese labels render with the project's CJK font.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg") if not matplotlib.get_backend().lower().startswith(("module://", "inline")) else None
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib import font_manager  # noqa: E402

from . import fonts  # noqa: E402
from .data.images import load_rgb  # noqa: E402
from .results import atomic_path, read_metrics, read_table  # noqa: E402
from .seesaw_files import (EPOCHS, FIGURE_FILE, INTERFERENCE_FIGURE_FILE,  # noqa: E402
                           INTERFERENCE_FILE, SCHEDULES, with_schedule)


def setup_matplotlib_cjk() -> str:
    """Register the CJK font with matplotlib and put it first in the sans-serif list.

    After this, Chinese titles, labels and tick labels render without missing-glyph
    warnings. Idempotent. Returns the family name set.
    """
    path = fonts.cjk_font_path()
    family = fonts.cjk_family_name()
    known = {(f.fname, f.name) for f in font_manager.fontManager.ttflist}
    if (str(path), family) not in known:
        font_manager.fontManager.addfont(str(path))
    sans = [f for f in matplotlib.rcParams["font.sans-serif"] if f != family]
    matplotlib.rcParams["font.sans-serif"] = [family, *sans]
    matplotlib.rcParams["font.family"] = ["sans-serif"]
    return family


def style() -> None:
    sns.set_theme(style="whitegrid", context="notebook")
    setup_matplotlib_cjk()  # after set_theme, which resets the font list


def label_counts(counts: pd.DataFrame, title: str = "") -> plt.Figure:
    """Bar charts of records per label, one panel per task, a hue per split.

    ``counts``: columns split, task, label, n (see ``data.stats.label_counts``).
    """
    style()
    tasks = list(dict.fromkeys(counts["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sub = counts[counts["task"] == task]
        sns.barplot(data=sub, y="label", x="n", hue="split", ax=ax, orient="h")
        ax.set_title(f"{task} task: records per label")
        ax.set_xlabel("records")
        ax.set_ylabel("")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def length_hists(lengths: pd.DataFrame, title: str = "") -> plt.Figure:
    """Histograms of text tokens, visual tokens and images per record, by task.

    ``lengths``: columns task, text_tokens, visual_tokens, n_images (``data.stats.length_table``).
    """
    style()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for ax, col, xlabel in zip(axes, ["text_tokens", "visual_tokens", "n_images"],
                               ["text tokens (Qwen2 BPE)", "visual tokens (all images)", "images"]):
        discrete = col == "n_images"
        sns.histplot(data=lengths, x=col, hue="task", ax=ax, element="step", discrete=discrete,
                     bins="auto" if discrete else 30)
        ax.set_xlabel(xlabel)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def gallery(items: Sequence[tuple[Path, str]], ncols: int = 4, title: str = "") -> plt.Figure:
    """A grid of images with captions; ``items`` are (image path, caption)."""
    style()
    nrows = max(1, -(-len(items) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 4.4 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (path, caption) in zip(axes.flat, items):
        ax.imshow(load_rgb(path))  # the project's one decoder (EXIF, modes, alpha)
        ax.set_title(caption, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return path


def seesaw(metrics: pd.DataFrame, metric: str = "weighted_f1", title: str = "") -> plt.Figure:
    """The paper's Figure 1 analogue: single-task vs joint fine-tune, per task and test split,
    one row of panels per training schedule (epoch-matched, then step-matched where the
    metrics hold it; :mod:`kdsl_utils.seesaw_files`).

    ``metrics``: notebook 01's tidy rows (metrics.csv) with variants ``image``, ``intent``,
    ``joint`` (and ``image[steps]`` ...); bars are means over seeds, error bars their
    standard deviation (none for one seed).
    """
    style()
    m = with_schedule(metrics)
    m = m[(m.metric == metric) & m.task.isin(["image", "intent"])
          & m.variant.isin(["image", "intent", "joint"])].copy()
    m["training"] = np.where(m.variant == "joint", "joint (both tasks)", "single task")
    splits = sorted(m.split.unique())
    schedules = [s for s in SCHEDULES if (m.schedule == s).any()]
    fig, axes = plt.subplots(len(schedules), len(splits), squeeze=False, sharey=True,
                             figsize=(5.5 * len(splits), 4.2 * len(schedules)))
    for row, schedule in zip(axes, schedules):
        for ax, split in zip(row, splits):
            sub = m[(m.split == split) & (m.schedule == schedule)]
            sns.barplot(data=sub, x="task", y="value", hue="training", order=["image", "intent"],
                        hue_order=["single task", "joint (both tasks)"], errorbar="sd",
                        capsize=0.1, ax=ax)
            for c in ax.containers:
                ax.bar_label(c, fmt="%.3f", padding=2, fontsize=8)
            n_seeds = sub.seed.nunique()
            matched = "epoch-matched" if schedule == EPOCHS else "step-matched"
            ax.set_title(f"{split} · {matched} · {n_seeds} seed{'s' if n_seeds > 1 else ''}")
            ax.set_xlabel("task")
            ax.set_ylabel(metric.replace("_", " "))
            ax.set_ylim(0, 1.05)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def interference(table: pd.DataFrame, title: str = "") -> plt.Figure:
    """Per-layer interference statistics (see ``kdsl_utils.interference``), mean ± sd over
    seeds; one panel per schedule where the table has a ``schedule`` column. Layers include
    the input blocks and their group totals (``ALL[inputs: ...]``).

    ``table``: columns layer, seed, cos_img_int, r2_img, r2_int, r2_both (, schedule).
    """
    style()
    cols = ["cos_img_int", "r2_img", "r2_int", "r2_both"]
    table = table if "schedule" in table else table.assign(schedule=EPOCHS)
    schedules = [s for s in SCHEDULES if (table.schedule == s).any()]
    layers = list(dict.fromkeys(table.layer))
    fig, axes = plt.subplots(len(schedules), 1, squeeze=False, sharex=True,
                             figsize=(max(7, 0.55 * len(layers) * 2), 4.5 * len(schedules)))
    for ax, schedule in zip(axes[:, 0], schedules):
        long = table[table.schedule == schedule].melt(id_vars=["layer", "seed"], value_vars=cols,
                                                      var_name="statistic")
        sns.barplot(data=long, x="layer", y="value", hue="statistic", order=layers,
                    errorbar="sd", ax=ax)
        ax.axhline(0, color="k", lw=0.8)
        ax.legend(title="statistic", bbox_to_anchor=(1.01, 1), loc="upper left")
        ax.set_ylabel("cosine / share of joint update explained")
        ax.set_title(f"{title} · {'epoch' if schedule == EPOCHS else 'step'}-matched".lstrip(" ·"))
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    return fig


def search_curve(iterations: pd.DataFrame, title: str = "") -> plt.Figure:
    """MCTS progress: each iteration's leaf reward and the best reward so far.

    ``iterations``: columns iteration, value (reward of the leaf reached), best_reward.
    """
    style()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(iterations["iteration"], iterations["value"], "o", ms=3, alpha=0.6,
            label="leaf reward of the iteration")
    ax.step(iterations["iteration"], iterations["best_reward"], where="post", lw=2,
            label="best rule set so far")
    ax.set_xlabel("MCTS iteration")
    ax.set_ylabel("dev-search weighted F1 (model + rules)")
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def report_figures(paths: Mapping[str, Path], fig_dir: Path | str, label: str) -> list[Path]:
    """Notebook 90's figures of one (profile, data, seed) group, from its results files only
    (each validated; a bad one is named): seesaw and interference (01), search curve (02).
    ``paths``: experiment -> results folder."""
    fig_dir = Path(fig_dir)
    made = []
    if "01_seesaw" in paths:
        m01 = read_metrics(Path(paths["01_seesaw"]) / "metrics.csv")
        made.append(save(seesaw(m01, title=f"Seesaw ({label})"), fig_dir / FIGURE_FILE))
        inter = read_table(Path(paths["01_seesaw"]) / INTERFERENCE_FILE, ["layer"])
        made.append(save(interference(inter, title=f"Interference ({label})"),
                         fig_dir / INTERFERENCE_FIGURE_FILE))
    if "02_mcts_rules" in paths:
        it = read_table(Path(paths["02_mcts_rules"]) / "iterations.csv", ["best_reward"])
        made.append(save(search_curve(it, title=f"MCTS ({label})"), fig_dir / "search_curve.png"))
    return made


def recall_curves(metrics: pd.DataFrame, split: str, title: str = "") -> plt.Figure:
    """Recall@k of same-label retrieval against k, one line per representation variant,
    one panel per task (pooled, image, intent).

    ``metrics``: tidy rows (notebook 04's metrics.csv) with metrics ``recall@<k>``.
    """
    style()
    m = metrics[(metrics.split == split) & metrics.metric.str.startswith("recall@")].copy()
    m["k"] = m.metric.str.slice(len("recall@")).astype(int)
    tasks = [t for t in ("pooled", "image", "intent") if t in set(m.task)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), squeeze=False,
                             sharey=True)
    for ax, task in zip(axes[0], tasks):
        sns.lineplot(data=m[m.task == task], x="k", y="value", hue="variant", marker="o",
                     errorbar="sd", ax=ax, legend=task == tasks[-1])
        ax.set_xscale("log")
        ax.minorticks_off()  # only the measured k are labelled
        ax.set_xticks(sorted(m.k.unique()), [str(k) for k in sorted(m.k.unique())])
        ax.set_title(f"{split} · {task}")
        ax.set_ylabel("recall@k (same label in top k)")
        ax.set_ylim(0, 1.02)
    if len(tasks):
        axes[0][-1].legend(title="variant", bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def embedding_map(projection: pd.DataFrame, title: str = "") -> plt.Figure:
    """2-D projection of test embeddings coloured by gold label, one panel per task.

    ``projection``: columns task, label, x, y (one variant, one split).
    """
    style()
    tasks = [t for t in ("image", "intent") if t in set(projection.task)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 5.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sub = projection[projection.task == task]
        sns.scatterplot(data=sub, x="x", y="y", hue="label", palette="tab20", s=28, ax=ax,
                        legend=sub.label.nunique() <= 25)
        ax.set_title(f"{task} · {sub.label.nunique()} labels")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("")
        ax.set_ylabel("")
        if ax.get_legend() is not None:
            ax.legend(fontsize=6, ncol=2, bbox_to_anchor=(1.0, 1), loc="upper left", title="")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
