"""Nothing wrong, nothing stale, nothing lost (issue 11): atomic results files, honest
completion, one run per results folder, unlabelled test sets, one-line environment errors,
a report that keeps what it did not see."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import image_record, intent_record, make_mire

from kdsl_utils import plots, report, session
from kdsl_utils.data.labels import ALL_LABELS
from kdsl_utils.data.mire import load_mire
from kdsl_utils.knowledge import load_proba, save_proba
from kdsl_utils.metrics import bootstrap_ci, metric_rows
from kdsl_utils.models.base import Predictions
from kdsl_utils.notebooks import run_notebook
from kdsl_utils.results import (ResultsFileError, atomic_path, atomic_write, read_metrics,
                                read_run_json, release_results, write_metrics, write_predictions)
from kdsl_utils.rules.schema import RuleBase

REPO = Path(__file__).resolve().parents[1]
ROW = {"experiment": "x", "variant": "v", "seed": 0, "split": "test1", "task": "pooled",
       "metric": "weighted_f1", "value": 0.5}


def _mire(tmp_path, test_label="退款页面"):
    return make_mire(tmp_path / "d", [image_record("a-1"), intent_record("b" * 30)],
                     {"test1": [image_record("t-1", label=test_label), intent_record("t" * 30, label="")]})


def _start(tmp_path, experiment="00_data", **kw):
    return session.start(experiment, profile="tiny", data_dir=str(_mire(tmp_path)), seed=0, smoke=True,
                         results_dir=tmp_path / "results", **kw)


# --- item 4: atomic files, honest completion ---------------------------------------------

def test_atomic_write_keeps_old_file_when_the_writer_dies(tmp_path):
    target = atomic_write(tmp_path / "m.csv", "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["m.csv"]


def test_every_results_writer_is_atomic(tmp_path, monkeypatch):
    """Each writer goes through os.replace of a temporary sibling: a crash in the middle
    leaves the previous file (the writer is interrupted by failing the replace)."""
    proba = np.full((1, len(ALL_LABELS)), 1 / len(ALL_LABELS))
    writers = {
        "metrics.csv": lambda p: write_metrics([ROW], p),
        "rulebase.json": lambda p: RuleBase([]).save(p),
        "proba_test1.npz": lambda p: save_proba(p, Predictions(["i"], ["image"], proba)),
        "plot.png": lambda p: plots.save(plots.plt.figure(), p),
    }
    real_replace = os.replace
    for name, write in writers.items():
        path = tmp_path / name
        write(path)
        before = path.read_bytes()
        monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError, match="disk full"):
            write(path)
        monkeypatch.setattr(os, "replace", real_replace)
        assert path.read_bytes() == before, name
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], name
    assert load_proba(tmp_path / "proba_test1.npz").ids == ["i"]


def test_session_removes_its_run_json_on_start_and_unlocks_on_finish(tmp_path):
    s = _start(tmp_path)
    s.save_metrics([ROW])
    s.finish()
    assert read_run_json(s.out / "run.json")["experiment"] == "00_data"
    s2 = _start(tmp_path)  # a new run: the old run.json must not mark it finished
    assert not (s2.out / "run.json").exists() and (s2.out / "metrics.csv").exists()
    release_results(s2.out.parent)


def test_torn_or_foreign_run_json_is_not_a_finished_run(tmp_path):
    root = tmp_path / "results"
    good = root / "mini" / "mire" / "seed0" / "01_seesaw"
    good.mkdir(parents=True)
    atomic_write(good / "run.json", json.dumps({"experiment": "01_seesaw", "config": {}, "data_dir": "d",
                                                "started": "t", "wall_time_s": 1.0}))
    torn = root / "mini" / "mire" / "seed0" / "03_collaborative"
    torn.mkdir()
    (torn / "run.json").write_text('{"experiment": "03_collab')
    foreign = root / "mini" / "mire" / "seed1" / "02_mcts_rules"
    foreign.mkdir(parents=True)
    (foreign / "run.json").write_text("{}")
    with pytest.warns(UserWarning, match="03_collaborative/run.json: not a valid run.json"):
        runs = report.find_runs(root)
    assert list(runs.experiment) == ["01_seesaw"] and list(runs.seed) == [0]
    assert any("seed1/02_mcts_rules/run.json: run.json lacks" in m for m in runs.attrs["invalid"])
    with pytest.raises(ResultsFileError, match="03_collaborative/run.json"):
        read_run_json(torn / "run.json")


def test_bad_metrics_csv_is_named(tmp_path):
    p = tmp_path / "metrics.csv"
    p.write_text("experiment,variant,seed\nx,v,0\n")
    with pytest.raises(ResultsFileError, match=r"metrics.csv: not a valid metrics.csv"):
        read_metrics(p)
    write_metrics([ROW], p)
    p.write_text(p.read_text().replace("0.5", "abc"))
    with pytest.raises(ResultsFileError, match=str(p)):
        read_metrics(p)


def test_makefile_deletes_targets_of_failed_recipes():
    assert ".DELETE_ON_ERROR:" in (REPO / "Makefile").read_text()


# --- item 7: one run per results folder --------------------------------------------------

def test_second_run_on_same_results_folder_is_refused_naming_the_first(tmp_path):
    s = _start(tmp_path, "01_seesaw")
    code = ("import sys; from kdsl_utils import session\n"
            "session.start(sys.argv[3], profile='tiny', data_dir=sys.argv[1], seed=0, smoke=True,"
            " results_dir=sys.argv[2])")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", code, str(tmp_path / "d"), str(tmp_path / "results")]
    # another notebook of the same run may start beside it (make reproduce -j2) ...
    other = subprocess.run(args + ["02_mcts_rules"], capture_output=True, text=True, timeout=120, env=env)
    assert other.returncode == 0, other.stderr[-2000:]
    # ... the same notebook may not
    out = subprocess.run(args + ["01_seesaw"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode != 0
    line = out.stderr.strip().splitlines()[-1]
    assert "RunLockedError" in line and "in use by 01_seesaw" in line and f"pid {os.getpid()}" in line
    assert "host" in line and "started" in line
    again = _start(tmp_path, "01_seesaw")  # the same process (a re-run cell) keeps its lock
    assert again.out == s.out
    s.save_metrics([ROW])
    s.finish()  # releases: another process may now use the folder
    out = subprocess.run(args + ["01_seesaw"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]


# --- item 8: unlabelled test sets are predicted, not scored ----------------------------------

def test_unlabelled_split_is_not_scored(tmp_path):
    root = _mire(tmp_path, test_label="")
    data = load_mire(root)
    assert all(r.label is None for r in data.tests["test1"])
    gold = [r.label for r in data.tests["test1"]]
    assert metric_rows(gold, ["退款页面", "商品材质"], ["image", "intent"], split="test1") == []
    assert bootstrap_ci(gold, ["退款页面", "商品材质"], ["image", "intent"], n_boot=10).empty
    assert report.ci_rows(gold, ["退款页面", "商品材质"], ["image", "intent"], n_boot=10) == []
    # a partly labelled split is scored on its labelled records only
    rows = metric_rows(["退款页面", None], ["退款页面", "商品材质"], ["image", "intent"])
    assert {r["task"] for r in rows} == {"pooled", "image"}
    assert [r["value"] for r in rows if r["metric"] == "weighted_f1" and r["task"] == "pooled"] == [1.0]


def test_predictions_and_submission_files(tmp_path):
    data = load_mire(_mire(tmp_path, test_label=""))
    recs = data.tests["test1"]
    proba = np.zeros((2, len(ALL_LABELS)))
    proba[0, ALL_LABELS.index("退款页面")] = proba[1, ALL_LABELS.index("商品材质")] = 1.0
    preds = Predictions.for_records(recs[::-1], proba[::-1])  # any order
    pred_csv, sub_csv = write_predictions(tmp_path / "out", "test1", recs, preds)
    p = pd.read_csv(pred_csv, encoding="utf-8", keep_default_na=False)
    assert list(p.columns[:5]) == ["id", "task", "gold", "pred", "model_pred"] and len(p.columns) == 5 + 48
    assert (p.gold == "").all() and p.set_index("id").loc["t-1", "pred"] == "退款页面"
    sub = pd.read_csv(sub_csv, encoding="utf-8", keep_default_na=False)
    assert list(sub.columns) == ["id", "instruction", "input", "output", "predict"] or \
        list(sub.columns) == ["id", "instruction", "input", "output", "image", "predict"]
    assert list(sub.id) == [r.id for r in recs] and list(sub.predict) == ["退款页面", "商品材质"]
    assert json.loads(sub.image[0]) == ["t-1-0.jpg"]
    with pytest.raises(ValueError, match="do not cover"):
        write_predictions(tmp_path / "out", "test1", recs[:1], preds)


def test_session_says_the_split_has_no_labels(tmp_path, capsys):
    root = _mire(tmp_path, test_label="")
    s = session.start("00_data", profile="tiny", data_dir=str(root), seed=0, smoke=True,
                      results_dir=tmp_path / "results")
    assert s.unlabelled == ["test1"] and s.log.extra["unlabelled_splits"] == ["test1"]
    assert "test split 'test1': 2 of 2 records have no label" in capsys.readouterr().out
    release_results(s.out.parent)


# --- item 9: environment errors in one line ---------------------------------------------

def test_unwritable_output_location_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a folder cannot be made below a file (works as root too)
    for args in (["--out", str(blocker / "products"), "-p", "RESULTS_DIR", str(tmp_path / "r")],
                 ["--out", str(tmp_path / "p"), "-p", "RESULTS_DIR", str(blocker / "results")]):
        out = subprocess.run([sys.executable, "-m", "kdsl_utils.notebooks", "00_data", *args,
                              "-p", "PROFILE", "tiny"], capture_output=True, text=True, timeout=120,
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert out.returncode == 1
        lines = (out.stdout + out.stderr).strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("[kdsl] 00_data: cannot write"), lines
        assert str(blocker) in lines[0] and "Not a directory" in lines[0]


def test_session_names_an_unwritable_results_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=r"cannot write the results folder .*a_file.*Not a directory"):
        session.start("00_data", profile="tiny", data_dir=str(_mire(tmp_path)), seed=0, smoke=True,
                      results_dir=blocker / "results")


# --- item 10: the report never drops what it did not see ----------------------------------

README = """# X

<!-- results:start -->
Generated by old.

### profile=mini, data=mire

real-data table

### profile=mini, data=synthetic

synthetic table
<!-- results:end -->

tail
"""


def test_readme_keeps_sections_it_did_not_see(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README, encoding="utf-8")
    # a smoke report that saw no runs: nothing is dropped (was: "No finished runs found")
    report.write_readme_section(readme, "Generated by new.", {})
    text = readme.read_text(encoding="utf-8")
    assert "real-data table" in text and "synthetic table" in text and "No finished runs" not in text
    assert "Generated by new." in text and "Generated by old." not in text and text.endswith("tail\n")
    # a run of one profile/data replaces that subsection only
    key = report.section_key("mini", "synthetic", 0)
    report.write_readme_section(readme, "h", {key: "### profile=mini, data=synthetic, seed=0\n\nnew synth"})
    text = readme.read_text(encoding="utf-8")
    assert "real-data table" in text and "new synth" in text and "synthetic table" not in text
    assert f"<!-- results:{key} -->" in text and "<!-- results:mini/mire -->" in text
    # a tiny smoke section is added beside, the others stay
    report.write_readme_section(readme, "h", {report.section_key("tiny", "synthetic-smoke", 0): "smoke"})
    text = readme.read_text(encoding="utf-8")
    assert "real-data table" in text and "new synth" in text and "smoke" in text
    assert not report.write_readme_section(readme, "h", {})  # unchanged: not rewritten


@pytest.mark.smoke
def test_report_notebook_keeps_readme_sections_of_unseen_runs(tmp_path):
    """The issue's case: a report over a results root without the real-data runs (a smoke
    run's root) keeps the README's real-data subsections."""
    readme = tmp_path / "README.md"
    readme.write_text(README, encoding="utf-8")
    (tmp_path / "results" / "tiny" / "synthetic-smoke" / "seed0").mkdir(parents=True)
    run_notebook("90_report", tmp_path / "products", {"RESULTS_DIR": str(tmp_path / "results"),
                 "FIGURES_DIR": str(tmp_path / "figures"), "README": str(readme)}, html=False)
    text = readme.read_text(encoding="utf-8")
    assert "real-data table" in text and "synthetic table" in text and "No finished runs" not in text


def test_a_stale_run_is_named_and_skipped_not_fatal_to_the_report(tmp_path, monkeypatch):
    """A run whose files older code wrote (a ResultsFileError) is returned as stale with
    the error, and the other runs are still reported."""
    import pandas as pd

    from kdsl_utils.results import ResultsFileError

    runs = pd.DataFrame([{"profile": "mini", "data": d, "seed": 0, "experiment": "01_seesaw",
                          "path": tmp_path / d} for d in ("old", "new")])

    def draw(paths, fig_dir, label):
        if "old" in str(paths["01_seesaw"]):
            raise ResultsFileError(f"{paths['01_seesaw']}/fits.csv: lacks columns ['schedule']")
        return []

    calls = []
    monkeypatch.setattr(report, "run_label", lambda profile, data, seed, paths: f"{profile}/{data}")
    monkeypatch.setattr(report, "readme_section", lambda label, *a, **k: calls.append(label) or label)
    with pytest.warns(UserWarning, match="runs not reported"):
        sections, made, stale = report.report_sections(runs, tmp_path / "fig", None, draw=draw)
    assert list(stale) == [report.section_key("mini", "old", 0)] and "schedule" in next(iter(stale.values()))
    assert list(sections) == [report.section_key("mini", "new", 0)] and calls == ["mini/new"]
