"""Results always match their parameters (issue 11, item 3).

Every result-changing parameter is in the results path (profile, data, seed) or in the
run's parameter stamp ``params.json`` (test files, the data files' content) that every
``run.json`` depends on. Checked with ``make -n`` in a copy of the repository whose inputs
are all old (so file times are under the test's control), plus one real run of notebook
00 for SEED=0 and SEED=1 (slow).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import image_record, make_mire, write_image

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (REPO / "notebooks").glob("[0-8][0-9]_*.ipynb"))
VENV = REPO / ".venv"

pytestmark = pytest.mark.skipif(shutil.which("make") is None or not (VENV / "bin" / "python").exists(),
                                reason="make or the project's .venv is missing")


def _old_repo(tmp_path: Path) -> Path:
    """A copy of what the Makefile reads, every file dated 1000 s ago."""
    repo = tmp_path / "repo"
    for name in ("kdsl_utils", "notebooks"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, repo / name)
    past = time.time() - 1000
    for p in repo.rglob("*"):
        os.utime(p, (past, past))
    (repo / ".installed").touch()  # stands for the env's install stamp: make never reinstalls here
    return repo


def _make(repo: Path, *args: str) -> list[str]:
    """Notebooks ``make -n notebooks`` would execute (their names)."""
    out = subprocess.run(["make", "-n", "--no-print-directory", "notebooks", f"VENV={VENV}",
                          f"STAMP={repo / '.installed'}", *args],
                         cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "kdsl_utils.notebooks " in line and "--out" in line]
    return [nb for nb in NOTEBOOKS if any(f"notebooks {nb} " in line for line in lines)], lines


def _finish(results: Path) -> None:
    """Mark every notebook finished: run.json (and results.sha256) newer than the inputs and
    the parameter stamp."""
    stamp = results / "params.json"
    assert stamp.is_file(), "make did not write the parameter stamp"
    os.utime(stamp, (time.time() - 900,) * 2)
    for k, nb in enumerate(NOTEBOOKS):
        p = results / nb / "run.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("{}")
        os.utime(p, (time.time() - 500 + k,) * 2)
        # its results stamp (make writes it after run.json; readers depend on it)
        (p.parent / "results.sha256").write_text("")
        os.utime(p.parent / "results.sha256", (time.time() - 500 + k + 0.5,) * 2)


@pytest.fixture
def setup(tmp_path):
    repo = _old_repo(tmp_path)
    data = make_mire(tmp_path / "my data" / "mire", [image_record("a-1")],
                     {"test1": [image_record("t-1")], "test2": [image_record("u-1")]})
    args = ["PROFILE=tiny", f"DATA_DIR={data}", f"RESULTS_ROOT={tmp_path / 'res ults'}",
            f"PRODUCTS_ROOT={tmp_path / 'products'}"]
    planned, _ = _make(repo, *args)
    assert planned == NOTEBOOKS
    seed0 = tmp_path / "res ults" / "tiny" / "mire" / "seed0"
    _finish(seed0)
    assert _make(repo, *args)[0] == []  # finished: nothing to do
    return repo, data, args, seed0


def test_seed_writes_beside_seed0(setup):
    repo, _, args, seed0 = setup
    planned, lines = _make(repo, *args, "SEED=1")
    assert planned == NOTEBOOKS
    assert all("-p SEED 1" in line and "/seed1" in line for line in lines)
    assert _make(repo, *args, "SEED=0")[0] == []  # seed 0's results stay finished, untouched
    assert all((seed0 / nb / "run.json").read_text() == "{}" for nb in NOTEBOOKS)


def test_overrides_write_beside_and_are_stamped(setup):
    """OVERRIDES: results under <profile>-ov<hash>/<data>/seed<N>, whose params.json records them."""
    repo, _, args, seed0 = setup
    planned, lines = _make(repo, *args, 'OVERRIDES={"train__epochs": 5}')
    assert planned == NOTEBOOKS
    ov = [d for d in seed0.parents[2].iterdir() if d.name.startswith("tiny-ov")]
    assert len(ov) == 1 and all(f"/{ov[0].name}/mire/seed0" in line for line in lines), lines
    stamp = json.loads((ov[0] / "mire" / "seed0" / "params.json").read_text(encoding="utf-8"))
    assert stamp["params"]["OVERRIDES"] == {"train__epochs": 5}
    assert "OVERRIDES" not in json.loads((seed0 / "params.json").read_text(encoding="utf-8"))["params"]
    assert _make(repo, *args)[0] == []  # the plain profile's results stay finished


def test_test_files_rerun_what_reads_them(setup):
    repo, data, args, _ = setup
    assert _make(repo, *args, 'TEST_FILES=["test1"]')[0] == NOTEBOOKS  # another test set
    assert _make(repo, *args)[0] == NOTEBOOKS  # and back: the stamp changed again


def test_new_test_file_in_data_dir_reruns(setup):
    repo, data, args, _ = setup
    (data / "test3.json").write_text(json.dumps([image_record("v-1")]), encoding="utf-8")
    write_image(data / "images" / "v-1-0.jpg")
    os.utime(data / "test3.json", (1, 1))  # copied with an old date: mtime alone would miss it
    assert _make(repo, *args)[0] == NOTEBOOKS


def test_changed_data_content_reruns(setup):
    repo, data, args, _ = setup
    st = (data / "train.json").stat()
    (data / "train.json").write_text(json.dumps([image_record("a-2")]), encoding="utf-8")
    os.utime(data / "train.json", (st.st_atime, st.st_mtime))  # same date, new content
    assert _make(repo, *args)[0] == NOTEBOOKS


def test_user_paths_relative_and_tilde(setup, tmp_path, monkeypatch):
    repo, data, _, _ = setup
    home = tmp_path / "home dir"
    (home / "mire").parent.mkdir(parents=True)
    shutil.copytree(data, home / "mire")
    env_args = ["PROFILE=tiny", "DATA_DIR=~/mire", "RESULTS_ROOT=~/out s", "PRODUCTS_ROOT=../prod"]
    out = subprocess.run(["make", "-n", "--no-print-directory", "notebooks", f"VENV={VENV}",
                          f"STAMP={repo / '.installed'}", *env_args],
                         cwd=repo, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HOME": str(home)})
    assert out.returncode == 0, out.stderr
    assert f'-p DATA_DIR "{home}/mire"' in out.stdout
    assert f'-p RESULTS_DIR "{home}/out s"' in out.stdout
    assert f'--out "{tmp_path}/prod/tiny/mire/seed0"' in out.stdout
    assert (home / "out s" / "tiny" / "mire" / "seed0" / "params.json").is_file()


@pytest.mark.smoke
def test_real_run_seed1_beside_seed0(tmp_path):
    """Notebook 00 really runs for SEED=0 and SEED=1 (tiny synthetic data) into two folders."""
    results = tmp_path / "results"
    installed = tmp_path / "installed"  # the env is set up: never let make reinstall it here
    installed.touch()
    common = ["PROFILE=tiny", "SMOKE=true", f"STAMP={installed}", f"RESULTS_ROOT={results}",
              f"PRODUCTS_ROOT={tmp_path / 'p'}"]
    for seed in (0, 1):
        target = results / "tiny" / "synthetic-smoke" / f"seed{seed}" / "00_data" / "run.json"
        out = subprocess.run(["make", "--no-print-directory", str(target), *common, f"SEED={seed}"],
                             cwd=REPO, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert json.loads(target.read_text())["seed"] == seed
        assert "pip install" not in out.stdout
    again = subprocess.run(["make", "-q", "--no-print-directory", str(target), *common, "SEED=1"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0  # up to date


def test_replaced_image_reruns(setup):
    repo, data, args, _ = setup
    write_image(data / "images" / "a-1-0.jpg", size=(80, 80), color=(9, 9, 9))
    assert _make(repo, *args)[0] == NOTEBOOKS
