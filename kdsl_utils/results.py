"""Results as files with a stated schema (DESIGN.md, Conventions).

Every run notebook writes, under ``results/<profile>[-ov<hash>]/<data>/seed<N>/<experiment>/``:

* ``metrics.csv`` — tidy, one number per row:
  ``experiment, variant, seed, split, task, metric, value``
  (``task`` is ``image``, ``intent`` or ``pooled``);
* ``run.json`` — the resolved config, data directory and fingerprint, git commit,
  package versions, device, start time and wall time.

Figures and tables are made from these files only; the profile, data and seed are in the
path, so no number can be read without knowing what produced it.

Every results file is written atomically (:func:`atomic_path`: a temporary file beside the
target, then ``os.replace``), so a killed run leaves the old file or the new one, never a
torn one; ``run.json`` is written last and removed when a notebook starts, so it marks a
complete run. Files read back are validated (:func:`read_metrics`, :func:`read_run_json`)
and a bad one is named (:class:`ResultsFileError`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout

from .data.labels import ALL_LABELS
from .hashing import files_digest

METRICS_COLUMNS = ["experiment", "variant", "seed", "split", "task", "metric", "value"]
PACKAGES = ("kdsl-utils", "torch", "transformers", "peft", "accelerate", "datasets", "numpy",
            "pandas", "scikit-learn", "pillow", "rapidocr", "onnxruntime", "papermill")


#: Keys every ``run.json`` has (the report refuses one without them: a torn or foreign file).
RUN_JSON_KEYS = ("experiment", "config", "data_dir", "started", "wall_time_s")


class ResultsFileError(ValueError):
    """A results file that cannot be trusted (unreadable, torn, wrong schema); names the file."""


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that pick the format
    from it keep working); on success it replaces ``path`` in one ``os.replace``, on error it
    is removed and ``path`` is left as it was. The parent folder is created.

        with atomic_path(out / "plot.png") as tmp:
            fig.savefig(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path | str, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically (see :func:`atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data.encode(encoding) if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def run_dir(results_root: Path | str, profile: str, data: str, experiment: str, seed: int = 0) -> Path:
    """``results_root/profile/data/seed<seed>/experiment``, created. The seed is in the path:
    a run with another seed writes beside this one, never over it."""
    d = Path(results_root) / profile / data / f"seed{seed}" / experiment
    d.mkdir(parents=True, exist_ok=True)
    return d


def metrics_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows → a frame with exactly the tidy columns, checked (no missing, finite values)."""
    df = pd.DataFrame(list(rows))
    missing = [c for c in METRICS_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"metrics rows lack columns {missing}")
    df = df[METRICS_COLUMNS]
    if df["value"].isna().any():
        raise ValueError(f"metrics rows with missing values:\n{df[df['value'].isna()]}")
    return df


def write_metrics(rows: Iterable[Mapping[str, Any]] | pd.DataFrame, path: Path | str) -> pd.DataFrame:
    df = rows if isinstance(rows, pd.DataFrame) else metrics_frame(rows)
    df = metrics_frame(df.to_dict("records"))
    df = df.sort_values(METRICS_COLUMNS[:-1], kind="stable").reset_index(drop=True)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return df


def read_metrics(path: Path | str) -> pd.DataFrame:
    """``metrics.csv`` checked: readable, the tidy columns, numeric finite values;
    :class:`ResultsFileError` naming the file otherwise."""
    path = Path(path)
    try:
        df = metrics_frame(pd.read_csv(path).to_dict("records"))
        values = pd.to_numeric(df["value"], errors="raise").astype(float)
    except FileNotFoundError:
        raise
    except (ValueError, TypeError, OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ResultsFileError(f"{path}: not a valid metrics.csv ({type(e).__name__}: {e})") from e
    if not all(math.isfinite(v) for v in values):
        raise ResultsFileError(f"{path}: metrics.csv holds non-finite values")
    return df.assign(value=values)


def read_table(path: Path | str, columns: Sequence[str] = ()) -> pd.DataFrame:
    """A results CSV that must parse and hold ``columns``; :class:`ResultsFileError` naming it."""
    path = Path(path)
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ResultsFileError(f"{path}: unreadable CSV ({type(e).__name__}: {e})") from e
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ResultsFileError(f"{path}: lacks columns {missing}")
    return df


def read_run_json(path: Path | str) -> dict[str, Any]:
    """A ``run.json`` checked: JSON object with :data:`RUN_JSON_KEYS`; :class:`ResultsFileError`
    naming the file otherwise (a torn file never passes as a finished run)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsFileError(f"{path}: not a valid run.json ({type(e).__name__}: {e})") from e
    if not isinstance(doc, dict):
        raise ResultsFileError(f"{path}: run.json holds a {type(doc).__name__}, not an object")
    missing = [k for k in RUN_JSON_KEYS if k not in doc]
    if missing:
        raise ResultsFileError(f"{path}: run.json lacks {missing} (an incomplete or foreign file)")
    return doc


def git_commit(cwd: Path | str = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=cwd, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=cwd, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "processor": platform.processor() or platform.machine()}
    # torch only where the run used it (this module stays light for make's stamp step)
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def fingerprint(paths: Iterable[Path | str]) -> str:
    """sha256 over the bytes of the given files (order-independent), first 16 hex digits."""
    return files_digest(paths, 16)


@dataclass
class RunLog:
    """Collects what ``run.json`` records; ``write()`` stamps the wall time."""

    experiment: str
    config: dict[str, Any]
    data_dir: str
    data_fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def write(self, path: Path | str) -> dict[str, Any]:
        doc = {"experiment": self.experiment, "config": self.config, "data_dir": self.data_dir,
               "data_fingerprint": self.data_fingerprint, "git_commit": git_commit(),
               "packages": package_versions(), "device": device_info(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
               "wall_time_s": round(time.time() - self.started, 2), **self.extra}
        atomic_write(path, json.dumps(doc, indent=1, ensure_ascii=False, default=str) + "\n")
        return doc


# --- one run per results folder ---------------------------------------------------------

LOCK_FILE, OWNER_FILE = ".run.lock", ".run.owner.json"
_HELD: dict[Path, FileLock] = {}  # results folders this process holds (a re-run cell reuses its lock)


class RunLockedError(RuntimeError):
    """Another run holds the results folder (two runs would share and resume each other's
    checkpoints and overwrite each other's files)."""


def lock_results(folder: Path | str, **owner: Any) -> FileLock:
    """Hold ``folder`` for this process until :func:`release_results` or the process ends (an
    OS file lock: a killed run never leaves a stale lock). ``owner`` (experiment, ...) is
    recorded with pid, host and start time, and named in the :class:`RunLockedError` a second
    run gets."""
    folder = Path(folder)
    key = folder.resolve()
    if key in _HELD:
        return _HELD[key]
    lock = FileLock(folder / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            o = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
            who = (f"{o.get('experiment', '?')} (pid {o.get('pid', '?')} on host {o.get('host', '?')}, "
                   f"started {o.get('started', '?')})")
        except (OSError, ValueError):
            who = "a run whose owner file is unreadable"
        raise RunLockedError(f"{folder}: results folder in use by {who}; wait for it to finish or "
                             "give this run another RESULTS_DIR / SEED") from None
    atomic_write(folder / OWNER_FILE, json.dumps(
        {**owner, "pid": os.getpid(), "host": platform.node(),
         "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, default=str) + "\n")
    _HELD[key] = lock
    return lock


def release_results(folder: Path | str) -> None:
    """Give up the lock of ``folder`` taken by :func:`lock_results` (no-op if not held)."""
    lock = _HELD.pop(Path(folder).resolve(), None)
    if lock is not None:
        (Path(folder) / OWNER_FILE).unlink(missing_ok=True)
        lock.release()


# --- predictions of every test split, labelled or not ---------------------------------------

def write_predictions(out: Path | str, split: str, records: Sequence[Any], preds: Any,
                      final: Sequence[str] | None = None) -> tuple[Path, Path]:
    """Per-split predictions and a challenge-style submission file, atomically:

    * ``predictions_<split>.csv``: id, task, gold (empty when unlabelled), pred (``final``, or
      the argmax of ``preds``), model_pred (argmax) and ``p:<label>`` for the 48 labels;
    * ``submission_<split>.csv``: the split's records in the challenge's fields
      (id, instruction, input, output, image as a JSON list) plus ``predict``; UTF-8.

    ``preds`` is a :class:`~kdsl_utils.models.base.Predictions` (ids, tasks, proba (n, 48),
    gold) for ``records``, in any order; ``final`` are label strings aligned with ``preds.ids``.
    Returns the two paths."""
    out = Path(out)
    proba = np.asarray(preds.proba, dtype=float)
    model_pred = [ALL_LABELS[i] for i in proba.argmax(axis=1)]
    final = list(final) if final is not None else model_pred
    by_id = {r.id: r for r in records}
    if sorted(by_id) != sorted(preds.ids) or len(final) != len(preds.ids):
        raise ValueError(f"{split}: predictions do not cover exactly the split's records")
    frame = pd.DataFrame({"id": preds.ids, "task": preds.tasks,
                          "gold": ["" if g is None else g for g in preds.gold],
                          "pred": final, "model_pred": model_pred})
    frame = pd.concat([frame, pd.DataFrame(proba.round(6), columns=[f"p:{lab}" for lab in ALL_LABELS])],
                      axis=1)
    pred_by_id = dict(zip(preds.ids, final))
    sub = pd.DataFrame([{**{k: v for k, v in r.to_raw().items() if k != "image"},
                         "image": json.dumps(r.to_raw()["image"], ensure_ascii=False),
                         "predict": pred_by_id[r.id]} for r in records])
    paths = out / f"predictions_{split}.csv", out / f"submission_{split}.csv"
    for df, path in zip((frame, sub), paths):
        with atomic_path(path) as tmp:
            df.to_csv(tmp, index=False, encoding="utf-8")
    return paths
