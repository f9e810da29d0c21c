"""The first code cell of every run notebook: resolve the profile, find and load the data,
open the results folder. Keeps the notebooks free of set-up code (and of copies of it).

    S = session.start("01_seesaw", profile=PROFILE, data_dir=DATA_DIR, seed=SEED, smoke=SMOKE,
                      results_dir=RESULTS_DIR, test_files=TEST_FILES, overrides=OVERRIDES)
    ...
    S.save_metrics(rows)   # metrics.csv
    S.finish()             # run.json, last
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
from .data.mire import MireData
from .data.source import DataSource, load_source, resolve_data
from .features import EXTRACTION_LOG
from .results import RunLog, fingerprint, run_dir, write_metrics


@dataclass
class Session:
    experiment: str
    cfg: Profile
    src: DataSource
    data: MireData
    out: Path  # results/<profile>[-ov<hash>]/<data>/<experiment>
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

    def upstream(self, experiment: str) -> Path:
        """Results folder of an earlier notebook for the same profile and data."""
        p = self.results_root / self.profile_dir / self.src.tag / experiment
        if not (p / "run.json").is_file():
            raise FileNotFoundError(f"{p}/run.json not found: run notebook {experiment} first "
                                    f"(make reproduce does it in order)")
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
        return self.log.write(self.out / "run.json")


def start(experiment: str, *, profile: str, data_dir: str | None, seed: int, smoke: bool,
          results_dir: str | Path, test_files: Sequence[str] | None = None,
          overrides: Mapping[str, Any] | str | None = None) -> Session:
    """Resolve config and data for a notebook run; seeds Python's RNG; opens the run folder.

    ``overrides`` (the notebooks' ``OVERRIDES``: a dict or its JSON text) are validated by
    :func:`config.resolve`; a run with overrides writes under ``<profile>-ov<hash>`` (see
    :func:`config.results_profile`) and records them in ``run.json``."""
    overrides = parse_overrides(overrides)
    EXTRACTION_LOG.clear()  # counts from here to finish() belong to this run
    cfg = resolve(profile, **overrides)
    random.seed(seed)
    src = resolve_data(data_dir, seed=seed, smoke=smoke)
    data = load_source(src, test_files=list(test_files) if test_files else None)
    if not data.tests:
        raise FileNotFoundError(f"{src.root}: no test*.json split (give TEST_FILES or add one)")
    root = Path(results_dir).expanduser().resolve()
    out = run_dir(root, results_profile(cfg.name, overrides), src.tag, experiment)
    files = [src.root / "train.json", *[src.root / f"{t}.json" for t in data.tests
                                         if (src.root / f"{t}.json").is_file()]]
    log = RunLog(experiment=experiment, config=cfg.to_dict(), data_dir=str(src.root),
                 data_fingerprint=fingerprint(files),
                 extra={"seed": seed, "smoke": smoke, "data_tag": src.tag,
                        "synthetic": src.synthetic, "overrides": overrides,
                        "test_splits": list(data.tests)})
    return Session(experiment=experiment, cfg=cfg, src=src, data=data, out=out,
                   results_root=root, seed=seed, smoke=smoke, log=log, overrides=overrides)
