"""Notebook 01's schedules in its results files, the step budget, Figure 1 and the gain table
(pure pandas / matplotlib: the fits themselves are tested in test_mini and test_qwen_vl)."""

from __future__ import annotations

import pandas as pd
import pytest

from kdsl_utils import plots, report
from kdsl_utils.seesaw import step_budget
from kdsl_utils.seesaw_files import parse_variant, schedule_label, variant_name, with_schedule


def test_variant_names_round_trip():
    for v in ("image", "intent", "joint", "single_pair"):
        assert variant_name(v, "epochs") == v  # the names notebooks 03 and 04 read
        assert parse_variant(variant_name(v, "steps")) == (v, "steps")
        assert parse_variant(v) == (v, "epochs")
    with pytest.raises(ValueError, match="schedule"):
        variant_name("joint", "tokens")


def test_step_budget_is_the_joint_runs_count():
    assert step_budget({"image": 480, "intent": 210, "joint": 660}) == 660
    assert step_budget({"image": 480, "intent": 210}) == 480  # no joint run: the largest
    with pytest.raises(ValueError):
        step_budget({})


def _metrics() -> pd.DataFrame:
    rows = []
    for schedule, (img, inn, j_img, j_int) in {"epochs": (0.8, 0.5, 0.85, 0.45),
                                               "steps": (0.82, 0.55, 0.85, 0.45)}.items():
        for seed in (0, 1):
            for variant, task, v in (("image", "image", img), ("intent", "intent", inn),
                                     ("joint", "image", j_img), ("joint", "intent", j_int),
                                     ("joint", "pooled", (j_img + j_int) / 2)):
                rows.append({"experiment": "01_seesaw", "variant": variant_name(variant, schedule),
                             "seed": seed, "split": "test1", "task": task,
                             "metric": "weighted_f1", "value": v + 0.01 * seed})
    return pd.DataFrame(rows)


def _fits() -> pd.DataFrame:
    rows = [{"seed": s, "schedule": sch, "variant": v, "steps": st, "epochs": ep}
            for s in (0, 1)
            for sch, v, st, ep in (("epochs", "image", 480, 30.0), ("epochs", "intent", 210, 30.0),
                                   ("epochs", "joint", 660, 30.0), ("steps", "image", 660, 41.25),
                                   ("steps", "intent", 660, 94.29), ("steps", "joint", 660, 30.0))]
    return pd.DataFrame(rows)


def test_gain_per_schedule_with_row_names_saying_which():
    gain = report.seesaw_gain(_metrics(), _fits())
    assert list(gain.columns)[:3] == ["schedule", "split", "task"] and len(gain) == 4
    g = gain.set_index(["task", gain.schedule.str.split(" ").str[0]])["joint − single"]
    assert g[("image", "epoch-matched")] == pytest.approx(0.05)
    assert g[("intent", "step-matched")] == pytest.approx(-0.10)
    assert gain.schedule.iloc[0] == ("epoch-matched (steps: image 480, intent 210, joint 660; "
                                     "epochs: image 30.0, intent 30.0, joint 30.0)")
    assert gain.schedule.iloc[-1].startswith("step-matched (steps: image 660, intent 660, joint 660")
    assert schedule_label(None, "steps") == "step-matched"  # no fits file: the kind only
    old = _metrics()[~_metrics().variant.str.endswith("]")]  # results of one schedule only
    assert len(report.seesaw_gain(old)) == 2


def test_figure_one_has_a_row_per_schedule():
    fig = plots.seesaw(_metrics())
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["test1 · epoch-matched · 2 seeds", "test1 · step-matched · 2 seeds"]
    assert set(with_schedule(_metrics()).schedule) == {"epochs", "steps"}
