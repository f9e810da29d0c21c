"""Where a run's data comes from (DESIGN.md, "Data sources").

1. a real MIRE directory given as ``DATA_DIR``;
2. else the built-in synthetic MIRE generator, written once per (seed, size) under
   ``data/`` in the repository (git-ignored) and reused on later runs.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .mire import MireData, load_mire
from .synth import PARAMS_FILE, generate_mire, synth_params

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
    size = "smoke" if smoke else "full"
    per_label, test_per_label = SYNTH_SIZES[size]
    root = Path(cache_root or REPO_ROOT / "data") / f"synthetic-{size}-seed{seed}"
    ensure_generated(root, seed=seed, per_label=per_label, test_per_label=test_per_label,
                     progress=not smoke)
    return DataSource(root=root, tag="synthetic" if size == "full" else "synthetic-smoke", synthetic=True)


def ensure_generated(root: Path, *, progress: bool = False, **params) -> Path:
    """``synth.generate_mire(root, **params)`` unless ``root`` already holds exactly that data
    (its :data:`synth.PARAMS_FILE` stamp equals ``synth_params(**params)`` and every split file
    exists). The one "generate unless the stamp matches" routine of the package.

    One process generates, the others (parallel tests, two notebooks) wait on a file lock and
    reuse it. A missing or foreign-version directory is generated beside and swapped in, so a
    crash never leaves a half dataset to reuse.
    """
    want = synth_params(**params)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.with_name(root.name + ".lock"))):
        if not _is_generated(root, want):
            tmp = root.with_name(f"{root.name}.partial-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            generate_mire(tmp, progress=progress, **params)
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
    return root


def _is_generated(root: Path, want: dict) -> bool:
    try:
        have = json.loads((root / PARAMS_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    splits = ("train", *want.get("test_files", ()))
    return have == want and (root / "images").is_dir() and all(
        (root / f"{s}.json").is_file() for s in splits)


def load_source(src: DataSource, test_files=None, strict: bool = True) -> MireData:
    return load_mire(src.root, test_files=test_files, strict=strict)
