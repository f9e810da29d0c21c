"""The first code cell of every run notebook: resolve the profile, find and load the data,
open the results folder. Keeps the notebooks free of set-up code (and of copies of it).

    S = session.start("01_seesaw", profile=PROFILE, data_dir=DATA_DIR, seed=SEED, smoke=SMOKE,
                      results_dir=RESULTS_DIR, test_files=TEST_FILES, overrides=OVERRIDES)
    ...
    S.save_metrics(rows)   # metrics.csv
    S.finish()             # run.json, last

A notebook run owns its results folder ``results/<profile>[-ov<hash>]/<data>/seed<N>/<notebook>/``
while it runs (a lock: a second run of the same notebook there stops with a message naming the
first; other notebooks of the run may run beside it, as ``make reproduce`` does), and removes its
own ``run.json`` when it starts, so a run killed half-way is never taken for a finished one.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .config import Profile, parse_overrides, resolve, results_profile
from .data.mire import MireData, test_file_paths
from .data.source import DataSource, load_source, resolve_data
from .features import EXTRACTION_LOG
from .results import (RunLog, fingerprint, lock_results, read_run_json, release_results, run_dir,
                      write_metrics)


@dataclass
class Session:
    experiment: str
    cfg: Profile
    src: DataSource
    data: MireData
    out: Path  # results/<profile>[-ov<hash>]/<data>/seed<N>/<experiment>
    results_root: Path
    seed: int
    smoke: bool
    log: RunLog
    overrides: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """What produced the numbers: shown under every table and figure."""
        return (f"profile={self.cfg.name}, data={self.src.tag}"
                f"{' (synthetic generator)' if self.src.synthetic else ''}, seed={self.seed}"
                f"{', SMOKE' if self.smoke else ''}"
                f"{', overrides ' + json.dumps(self.overrides) if self.overrides else ''}")

    @property
    def profile_dir(self) -> str:
        """The profile segment of this run's results path (``mini``, ``mini-ov1a2b3c4d``)."""
        return results_profile(self.cfg.name, self.overrides)

    @property
    def unlabelled(self) -> list[str]:
        """Test splits without any label (a challenge test file): predicted, never scored."""
        return [s for s, recs in self.data.tests.items() if all(r.label is None for r in recs)]

    def upstream(self, experiment: str) -> Path:
        """Results folder of an earlier notebook for the same profile (and overrides), data and
        seed; its ``run.json`` must be a complete one (validated)."""
        p = self.out.parent / experiment
        if not (p / "run.json").is_file():
            raise FileNotFoundError(f"{p}/run.json not found: run notebook {experiment} first "
                                    f"(make reproduce does it in order)")
        read_run_json(p / "run.json")
        return p

    def save_metrics(self, rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
        """Write ``metrics.csv`` (tidy schema, checked) and return it as written."""
        return write_metrics(rows, self.out / "metrics.csv")

    def finish(self) -> dict[str, Any]:
        """Write ``run.json`` — last: it is the Makefile's target, so it marks a complete run."""
        if not (self.out / "metrics.csv").is_file():
            raise RuntimeError(f"{self.out}: save_metrics() before finish()")
        self.log.extra.update(self.extra)
        # Where the time went: OCR / embeddings computed here vs read from the cache.
        self.log.extra["feature_extraction"] = {k: dict(v) for k, v in EXTRACTION_LOG.items()}
        doc = self.log.write(self.out / "run.json")
        release_results(self.out)
        return doc


def start(experiment: str, *, profile: str, data_dir: str | None, seed: int, smoke: bool,
          results_dir: str | Path, test_files: Sequence[str] | None = None,
          overrides: Mapping[str, Any] | str | None = None) -> Session:
    """Resolve config and data for a notebook run; seeds Python's RNG; opens the run folder
    ``results_dir/<profile>[-ov<hash>]/<data>/seed<seed>/<experiment>`` (locked for this run,
    its old ``run.json`` removed). ``test_files``: split names or json paths (``~`` and
    relative paths accepted); a single string is one test file.

    ``overrides`` (the notebooks' ``OVERRIDES``: a dict or its JSON text) are validated by
    :func:`config.resolve`; a run with overrides writes under ``<profile>-ov<hash>`` (see
    :func:`config.results_profile`) and records them in ``run.json``."""
    overrides = parse_overrides(overrides)
    EXTRACTION_LOG.clear()  # counts from here to finish() belong to this run
    cfg = resolve(profile, **overrides)
    random.seed(seed)
    src = resolve_data(data_dir, seed=seed, smoke=smoke)
    root = Path(results_dir).expanduser().resolve()
    pdir = results_profile(cfg.name, overrides)
    try:
        out = run_dir(root, pdir, src.tag, experiment, seed=seed)
        lock_results(out, experiment=experiment)  # this notebook's folder: make runs others beside
        (out / "run.json").unlink(missing_ok=True)  # from here on this run is not finished
    except OSError as e:
        raise OSError(f"cannot write the results folder {root / pdir / src.tag} "
                      f"(RESULTS_DIR={results_dir}): {e.strerror or e}") from e
    if isinstance(test_files, str | Path):
        test_files = [test_files]
    test_files = [str(t) for t in test_files] if test_files else None
    data = load_source(src, test_files=test_files)
    if not data.tests:
        raise FileNotFoundError(f"{src.root}: no test*.json split (give TEST_FILES or add one)")
    for split in data.tests:
        n_none = sum(r.label is None for r in data.tests[split])
        if n_none:
            print(f"[kdsl] test split {split!r}: {n_none} of {len(data.tests[split])} records have no "
                  "label: they are predicted (predictions_/submission_ files of notebook 03) and left "
                  "out of every metric")
    files = [src.root / "train.json", *test_file_paths(src.root, test_files)]
    log = RunLog(experiment=experiment, config=cfg.to_dict(), data_dir=str(src.root),
                 data_fingerprint=fingerprint(files),
                 extra={"seed": seed, "smoke": smoke, "data_tag": src.tag,
                        "synthetic": src.synthetic, "overrides": overrides,
                        "test_splits": list(data.tests),
                        "unlabelled_splits": [s for s, r in data.tests.items() if all(x.label is None for x in r)],
                        "leakage": {k: sum(p.kind == k for p in data.leaks)
                                    for k in ("id_in_train", "image_in_train")}})
    return Session(experiment=experiment, cfg=cfg, src=src, data=data, out=out,
                   results_root=root, seed=seed, smoke=smoke, log=log, overrides=overrides)
