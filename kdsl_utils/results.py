"""Results as files with a stated schema (DESIGN.md, Conventions).

Every run notebook writes, under ``results/<profile>/<data>/<experiment>/``:

* ``metrics.csv`` — tidy, one number per row:
  ``experiment, variant, seed, split, task, metric, value``
  (``task`` is ``image``, ``intent`` or ``pooled``);
* ``run.json`` — the resolved config, data directory and fingerprint, git commit,
  package versions, device, start time and wall time.

Figures and tables are made from these files only; the profile and data are in the path,
so no number can be read without knowing what produced it.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from .hashing import files_digest
METRICS_COLUMNS = ["experiment", "variant", "seed", "split", "task", "metric", "value"]
PACKAGES = ("kdsl-utils", "torch", "transformers", "peft", "accelerate", "datasets", "numpy",
            "pandas", "scikit-learn", "pillow", "rapidocr", "onnxruntime", "papermill")


def run_dir(results_root: Path | str, profile: str, data: str, experiment: str) -> Path:
    """``results_root/profile/data/experiment``, created."""
    d = Path(results_root) / profile / data / experiment
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
    df.to_csv(path, index=False)
    return df


def read_metrics(path: Path | str) -> pd.DataFrame:
    return metrics_frame(pd.read_csv(path).to_dict("records"))


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
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
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
        Path(path).write_text(json.dumps(doc, indent=1, ensure_ascii=False, default=str) + "\n",
                              encoding="utf-8")
        return doc
