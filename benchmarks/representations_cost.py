"""Cold cost of notebook 04's new features, and the OCR-passage length lever (issue 13 item 5).

    python benchmarks/representations_cost.py --data ../shared/mire [--widths 128 512] [--readme]

Notebook 04 embeds with e5 what no earlier notebook embeds: the OCR text of each record's
images (the image "word") and the pooled passage (OCR text + dialogue; for an image record it
is its word). Per width ``W`` (``ReprCfg.word_max_chars``: OCR characters per passage) this
runs :func:`kdsl_utils.representations.run_representations` (all variants, seed 0) against a
fresh cache that holds everything earlier notebooks compute (OCR, EfficientNet: the
project's cache, linked; e5 of the dialogues: copied) and no other e5 entry, so the e5 time is
what notebook 04 computes cold; widths run in the order given, in one process. Reports e5
seconds and passages, the variant-training seconds, and recall@k / kNN F1 on test1 per width.
Wall times are under whatever load the machine has (the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
from readme_sections import write_section

from kdsl_utils.config import resolve
from kdsl_utils.data.mire import load_mire
from kdsl_utils.features import EXTRACTION_LOG, E5Embedder, FeatureCache, default_cache_dir
from kdsl_utils.hashing import sha256_text
from kdsl_utils.models.mini import clean_dialog
from kdsl_utils.report import to_markdown
from kdsl_utils.representations import run_representations


def cold_cache(root: Path, src: Path, dialog_texts: list[str]) -> FeatureCache:
    """A cache under ``root``: every namespace of ``src`` linked but e5's, whose entries for
    ``dialog_texts`` (what notebook 01 embeds) are copied."""
    ns = E5Embedder().namespace
    for d in src.iterdir():
        if d.is_dir() and d.name != ns:
            (root / d.name).symlink_to(d)
    fc, have = FeatureCache(root), FeatureCache(src)
    for t in set(dialog_texts):
        k = sha256_text(t)
        p = have._path(ns, k, "npy")
        if p.is_file():
            q = fc._path(ns, k, "npy")
            q.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, q)
    return fc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "mire"))
    ap.add_argument("--widths", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--readme", action="store_true")
    a = ap.parse_args()
    data = load_mire(a.data, test_files=["test1"])
    tests = {"test1": data.tests["test1"]}
    recs = list(data.train) + list(tests["test1"])
    dialogs = [clean_dialog(r.user_text) for r in recs]
    cost, quality = [], []
    for w in a.widths:
        with tempfile.TemporaryDirectory() as tmp:
            fc = cold_cache(Path(tmp), default_cache_dir(), dialogs)
            cfg = resolve("mini", repr__word_max_chars=w)
            EXTRACTION_LOG.clear()
            t0 = time.perf_counter()
            run = run_representations(cfg, data.train, tests, seed=0, cache=fc, progress=False)
            wall = time.perf_counter() - t0
        e5 = EXTRACTION_LOG.get("text embeddings", {})
        cost.append({"word_max_chars": w, "wall_s": round(wall, 1),
                     "e5_s": e5.get("seconds", 0.0), "e5_passages": int(e5.get("computed", 0)),
                     "variant_training_s": round(run.fits.wall_s.sum(), 1)})
        m = run.metrics[(run.metrics.split == "test1") & (run.metrics.task == "pooled")]
        for v in sorted(run.fits.variant):
            g = m[m.variant.isin([v, f"knn_{v}"])].set_index("metric").value
            quality.append({"word_max_chars": w, "variant": v, "recall@1": g["recall@1"],
                            "recall@5": g["recall@5"], "knn weighted F1": g["weighted_f1"]})
    load = os.getloadavg()[0]
    text = "\n\n".join([
        "Cold cost of notebook 04's own e5 passages (OCR text as the image word, pooled "
        "passage) per OCR-passage width (`ReprCfg.word_max_chars`), real MIRE, seed 0, "
        "`python benchmarks/representations_cost.py --readme`; OCR, EfficientNet and the "
        "dialogue embeddings come from the cache (earlier notebooks compute them). "
        f"Load average {load:.1f} at the end (2 cores; timings under load).",
        to_markdown(pd.DataFrame(cost)),
        "test1, pooled over both tasks:",
        to_markdown(pd.DataFrame(quality).round(4))])
    print(text)
    if a.readme:
        write_section("representations_cost", text)


if __name__ == "__main__":
    main()
