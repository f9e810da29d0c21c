"""The Makefile's targets are files: a finished run is not executed again, and a change
re-runs exactly the notebook it touches and those after it. Checked with ``make -n``
(print, don't execute) on a results tree whose run.json files are newer than every input.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (REPO / "notebooks").glob("[0-8][0-9]_*.ipynb"))

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _dry_run(tmp_path: Path) -> str:
    args = ["make", "-n", "--no-print-directory", "notebooks", "PROFILE=tiny", "SMOKE=true",
            f"RESULTS_ROOT={tmp_path / 'results'}", f"PRODUCTS_ROOT={tmp_path / 'products'}"]
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return "\n".join(line for line in out.stdout.splitlines() if "kdsl_utils.notebooks" in line)


def _finished_runs(tmp_path: Path) -> dict[str, Path]:
    runs = {}
    future = time.time() + 3600
    for k, nb in enumerate(NOTEBOOKS):
        p = tmp_path / "results" / "tiny" / "synthetic-smoke" / "seed0" / nb / "run.json"
        p.parent.mkdir(parents=True)
        p.write_text("{}")
        os.utime(p, (future + k, future + k))  # newer than every input, in notebook order
        runs[nb] = p
    return runs


def test_nothing_changed_executes_no_notebook(tmp_path):
    _finished_runs(tmp_path)
    assert _dry_run(tmp_path) == ""


def test_stale_notebook_reruns_it_and_those_after(tmp_path):
    runs = _finished_runs(tmp_path)
    stale = NOTEBOOKS[1]
    os.utime(runs[stale], (1, 1))  # older than its notebook and the package
    planned = _dry_run(tmp_path)
    for k, nb in enumerate(NOTEBOOKS):
        assert (f"notebooks {nb} " in planned) == (k >= 1), (nb, planned)


def test_missing_run_starts_from_the_first(tmp_path):
    planned = _dry_run(tmp_path)
    assert [nb for nb in NOTEBOOKS if f"notebooks {nb} " in planned] == NOTEBOOKS
