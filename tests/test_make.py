"""The Makefile's targets are files with their real inputs: a finished run is not executed
again, a notebook re-runs when a package module it imports (transitively) changes, and a
notebook that reads another's results re-runs only when those results change.

Run for real (not ``make -n``: make re-checks a stamp's time after its recipe, which a dry
run cannot show) on a copy of the repository's Makefile, notebooks and package, with a
fake notebook runner (``NB_RUN``) that writes a run.json and a metrics.csv in a second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdsl_utils.deps import notebook_deps

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (REPO / "notebooks").glob("[0-8][0-9]_*.ipynb"))

FAKE = r'''
import json, os, sys, time
from pathlib import Path
name, rest = sys.argv[1], sys.argv[2:]
p = {rest[i + 1]: rest[i + 2] for i in range(len(rest) - 2) if rest[i] == "-p"}
from kdsl_utils.config import parse_overrides, results_profile
prof = results_profile(p["PROFILE"], parse_overrides(p.get("OVERRIDES", "")))
out = Path(p["RESULTS_DIR"]) / prof / "synthetic-smoke" / f"seed{p['SEED']}" / name
out.mkdir(parents=True, exist_ok=True)
changed = name in os.environ.get("FAKE_NEW_RESULTS", "").split(",")
(out / "metrics.csv").write_text("value\n" + ("2" if changed else "1") + "\n")
(out / "figure.png").write_bytes(str(time.time()).encode())  # a redraw: always new bytes
(out / "run.json").write_text(json.dumps({"t": time.time()}))
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(name + "\n")
'''


@pytest.fixture
def tree(tmp_path):
    """A copy of what the Makefile reads, and a make command running the fake runner."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(REPO / name, root / name)
    for name in ("kdsl_utils", "notebooks"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "fake.py").write_text(FAKE)
    log = tmp_path / "ran.log"
    venv = REPO / ".venv"
    if not (venv / ".kdsl-installed").is_file():
        pytest.skip(f"{venv} is not set up (make setup)")

    def make(*extra: str, new_results: str = "") -> list[str]:
        log.write_text("")
        env = {**os.environ, "FAKE_LOG": str(log), "FAKE_NEW_RESULTS": new_results,
               "PYTHONPATH": str(root)}
        args = ["make", "-s", "--no-print-directory", "notebooks", "PROFILE=tiny", "SMOKE=true",
                f"VENV={venv}", f"NB_RUN={sys.executable} {tmp_path / 'fake.py'}",
                f"RESULTS_ROOT={tmp_path / 'results'}", f"PRODUCTS_ROOT={tmp_path / 'products'}",
                *extra]
        out = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        return log.read_text().split()

    def touch(rel: str) -> None:
        later = time.time() + 5  # newer than every run.json written so far
        os.utime(root / rel, (later, later))

    return make, touch


def _importers(module: str) -> list[str]:
    return [nb for nb in NOTEBOOKS
            if (REPO / module) in notebook_deps(REPO / "notebooks" / f"{nb}.ipynb")[0]]


def test_first_run_runs_all_in_order_then_nothing(tree):
    make, _ = tree
    assert make() == NOTEBOOKS
    assert make() == []


def test_touching_the_plotting_module_runs_only_the_notebooks_that_draw(tree):
    make, touch = tree
    make()
    drawing = _importers("kdsl_utils/plots.py")
    assert drawing and set(drawing) < set(NOTEBOOKS), drawing  # some draw, not all
    touch("kdsl_utils/plots.py")
    # The readers of their results (03 reads 01 and 02) do not re-run: the redraw left the
    # numbers as they were, so the results stamps kept their times.
    assert make() == drawing


def test_changed_results_rerun_their_readers(tree):
    make, touch = tree
    make()
    readers = [nb for nb in NOTEBOOKS
               if "01_seesaw" in notebook_deps(REPO / "notebooks" / f"{nb}.ipynb")[1]]
    assert readers, "no notebook reads 01's results"
    touch("notebooks/01_seesaw.ipynb")
    assert make(new_results="01_seesaw") == ["01_seesaw", *readers]


def test_a_module_one_notebook_imports_reruns_only_it(tree):
    make, touch = tree
    make()
    mods = sorted(str(p.relative_to(REPO)) for p in (REPO / "kdsl_utils").rglob("*.py"))
    only = {m: imp for m in mods if len(imp := _importers(m)) == 1}
    assert only, "no package module is imported by exactly one notebook"
    for module, importers in list(only.items())[:2]:
        touch(module)
        assert make() == importers, module


def test_overrides_go_to_their_own_results_folder(tree, tmp_path):
    make, _ = tree
    make()
    assert make('OVERRIDES={"train__epochs": 5}') == NOTEBOOKS  # a new folder: all run
    dirs = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert dirs[0] == "tiny" and dirs[1].startswith("tiny-ov") and len(dirs) == 2
    with pytest.raises(AssertionError, match="rejected"):
        make('OVERRIDES={"train__epoch": 5}')
