"""Where a run's data comes from (DESIGN.md, "Data sources").

1. a real MIRE directory given as ``DATA_DIR``;
2. else the built-in synthetic MIRE generator, written once per (seed, size) under
   ``data/`` in the repository (git-ignored) and reused on later runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .mire import MireData, load_mire

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Synthetic sizes: records per label in train and in each test split.
SYNTH_SIZES = {"full": (12, 4), "smoke": (3, 2)}


@dataclass(frozen=True)
class DataSource:
    root: Path
    tag: str  # short name used in results paths: "synthetic" or the directory's name
    synthetic: bool


def resolve_data(data_dir: str | Path | None, *, seed: int = 0, smoke: bool = False,
                 cache_root: Path | str | None = None) -> DataSource:
    """The MIRE directory a run reads: ``data_dir`` if given, else synthetic data (made once)."""
    if data_dir:
        # abspath, not resolve: the tag must equal the Makefile's $(notdir $(abspath DATA_DIR)).
        root = Path(os.path.abspath(Path(data_dir).expanduser()))
        if not (root / "train.json").is_file():
            raise FileNotFoundError(f"DATA_DIR={data_dir!s}: no train.json there (a MIRE directory "
                                    "holds train.json, test*.json and images/)")
        return DataSource(root=root, tag=root.name, synthetic=False)
    from .synth import PARAMS_FILE, generate_mire, synth_params

    size = "smoke" if smoke else "full"
    per_label, test_per_label = SYNTH_SIZES[size]
    root = Path(cache_root or REPO_ROOT / "data") / f"synthetic-{size}-seed{seed}"
    want = synth_params(seed=seed, per_label=per_label, test_per_label=test_per_label)
    root.parent.mkdir(parents=True, exist_ok=True)
    # One process generates, the others (parallel tests, two notebooks) wait and reuse it.
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_generated(root, want, PARAMS_FILE):
            # Missing, or made by another generator version: generate beside, then swap, so
            # a crash never leaves a half dataset to reuse.
            tmp = root.with_name(f"{root.name}.partial-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            generate_mire(tmp, seed=seed, per_label=per_label, test_per_label=test_per_label,
                          progress=not smoke)
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
    return DataSource(root=root, tag="synthetic" if size == "full" else "synthetic-smoke", synthetic=True)


def _is_generated(root: Path, want: dict, params_file: str) -> bool:
    stamp = root / params_file
    try:
        return json.loads(stamp.read_text(encoding="utf-8")) == want
    except (OSError, json.JSONDecodeError):
        return False


def load_source(src: DataSource, test_files=None, strict: bool = True) -> MireData:
    return load_mire(src.root, test_files=test_files, strict=strict)
