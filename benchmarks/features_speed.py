"""Cold and warm speed of the CPU (``mini``) feature path: OCR levers, pool layout, stages.

    python benchmarks/features_speed.py --data ../shared/mire [--levers N] [--pool N]
                      [--stages N] [--readme]

Needs a real MIRE directory (train.json, test1.json, images/); the project never ships one.
Every measurement uses a fresh temporary feature cache (cold) and never touches the
project's cache. Sections (each prints a markdown table; ``--readme`` also writes it into
``benchmarks/README.md`` between this script's markers):

1. ``--levers N``: RapidOCR settings on the same N real images, *interleaved* (each image
   is read by every variant in turn, the order rotating per image), so a machine shared
   with other jobs slows every variant alike: seconds per image of detection and
   recognition (RapidOCR's own stage timers) and wall, and the text agreement with the
   default settings (share of images whose OCR text is identical, mean character-level
   similarity ratio);
2. ``--pool N``: process layout of :func:`~kdsl_utils.features.ocr_images` (2 workers x 1
   ONNX thread, 1 x 2, 1 x 1) on N images, alternating, each run on a fresh cache: a
   layout's first run includes starting its pool / engine, later runs reuse the ones the
   process keeps (as a notebook's later calls do);
3. ``--engines N``: RapidOCR's inference engines on the default settings, interleaved like
   ``--levers``: onnxruntime (the project's) against OpenVINO, which is *not* a project
   dependency (``pip install openvino==2026.4.1`` into a separate ``--target`` and put it on
   ``PYTHONPATH`` to measure it); OpenVINO with RapidOCR's recognition batch 6 too;
4. ``--stages N``: the pipeline's stages on N records of train + test1 (all if 0), cold then
   warm: OCR detection / recognition, image and text embeddings, the mini fits of the three
   task mixes, and the rule search of notebook 02.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rapidocr import EngineType, RapidOCR

from kdsl_utils.data.images import bgr_array, load_rgb
from kdsl_utils.features import CACHE_ENV, OcrParams, RapidOcr, ocr_text, rapidocr_params
from readme_sections import write_section

def md(header: list[str], rows) -> str:
    def f(x):
        return f"{x:.3f}" if isinstance(x, float) else str(x)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(f(v) for v in r) + " |" for r in rows])


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, load average {load:.1f} at the "
            f"start ({'under load: compare rows, not absolute times' if load > 1.5 else 'idle'})")


def sample_images(data, n: int, seed: int = 0) -> list[Path]:
    imgs = sorted({p for r in data.train + data.tests["test1"] for p in r.images})
    rng = np.random.default_rng(seed)
    return [imgs[i] for i in sorted(rng.choice(len(imgs), size=min(n, len(imgs)), replace=False))]


OCR_VARIANTS = {
    "RapidOCR defaults (det max 960, rec batch 6, min width 320)": OcrParams(
        mem_arena=False, rec_batch=6, rec_min_width=320),
    "det max 736": OcrParams(limit_side_len=736, mem_arena=False, rec_batch=6, rec_min_width=320),
    "det max 640": OcrParams(limit_side_len=640, mem_arena=False, rec_batch=6, rec_min_width=320),
    "rec batch 1": OcrParams(rec_batch=1, mem_arena=False, rec_min_width=320),
    "rec batch 16": OcrParams(rec_batch=16, mem_arena=False, rec_min_width=320),
    "rec batch 32": OcrParams(rec_batch=32, mem_arena=False, rec_min_width=320),
    "2 ONNX threads": OcrParams(threads=2, mem_arena=False, rec_batch=6, rec_min_width=320),
    "memory arena on": OcrParams(mem_arena=True, rec_batch=6, rec_min_width=320),
    "memory arena + rec batch 1": OcrParams(mem_arena=True, rec_batch=1, rec_min_width=320),
    "memory arena + rec batch 3": OcrParams(mem_arena=True, rec_batch=3, rec_min_width=320),
    "arena + batch 1 + rec min width 160": OcrParams(mem_arena=True, rec_batch=1, rec_min_width=160),
    "arena + batch 1 + rec min width 96": OcrParams(),  # the default since these measurements
    "arena + batch 6 + rec min width 96": OcrParams(mem_arena=True, rec_batch=6),
    "default + det max 736": OcrParams(limit_side_len=736),
    "default + det max 640": OcrParams(limit_side_len=640),
    "default + det max 1280": OcrParams(limit_side_len=1280),
}


def interleaved(paths: list[Path], runners: dict) -> list[tuple]:
    """Each image read by every runner in turn (the order rotating per image), so a busy
    machine slows every runner alike. A runner maps an image path to (detection s,
    recognition s, text); the first runner's text is the reference. Rows: (name, det
    s/img, rec s/img, wall s/img, share of identical texts, mean similarity ratio)."""
    names = list(runners)
    for run in runners.values():  # load every session before timing
        run(paths[0])
    acc = {k: {"det": [], "rec": [], "wall": [], "text": []} for k in names}
    for i, p in enumerate(paths):
        for k in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            det, rec, text = runners[k](p)
            acc[k]["wall"].append(time.perf_counter() - t0)
            acc[k]["det"].append(det)
            acc[k]["rec"].append(rec)
            acc[k]["text"].append(text)
        print(f"  interleaved: image {i + 1}/{len(paths)}", file=sys.stderr, flush=True)
    base = acc[names[0]]["text"]
    rows = []
    for k in names:
        a = acc[k]
        same = np.mean([t == b for t, b in zip(a["text"], base)])
        ratio = np.mean([difflib.SequenceMatcher(None, t, b).ratio() for t, b in zip(a["text"], base)])
        rows.append((k, float(np.mean(a["det"])), float(np.mean(a["rec"])),
                     float(np.mean(a["wall"])), f"{same:.0%}", float(ratio)))
    return rows


def levers(paths: list[Path], variants: dict[str, OcrParams] = OCR_VARIANTS) -> list[tuple]:
    """:func:`interleaved` over the project's :class:`RapidOcr` with each parameter set."""
    def runner(engine: RapidOcr):
        def run(p: Path):
            res = engine(p)
            return engine.last_stages["det"], engine.last_stages["rec"], ocr_text(res)
        return run

    return interleaved(paths, {k: runner(RapidOcr(v)) for k, v in variants.items()})


def engines(paths: list[Path]) -> list[tuple]:
    """:func:`interleaved` over RapidOCR's onnxruntime and OpenVINO engines on the default
    :class:`OcrParams`, one thread each (OpenVINO only where it is installed)."""
    base = rapidocr_params(OcrParams())
    ov = {**base, "Det.engine_type": EngineType.OPENVINO, "Rec.engine_type": EngineType.OPENVINO,
          "Cls.engine_type": EngineType.OPENVINO, "EngineConfig.openvino.inference_num_threads": 1}
    variants = {"onnxruntime (default settings)": base, "OpenVINO": ov,
                "OpenVINO, rec batch 6": {**ov, "Rec.rec_batch_num": 6}}
    if importlib.util.find_spec("openvino") is None:
        print("OpenVINO is not installed: only the onnxruntime row is measured", file=sys.stderr)
        variants = dict(list(variants.items())[:1])

    def runner(engine: RapidOCR):
        def run(p: Path):
            out = engine(bgr_array(load_rgb(p)))
            det, _cls, rec = (float(x or 0.0) for x in [*(out.elapse_list or ()), 0, 0, 0][:3])
            return det, rec, "\n".join(out.txts or ())
        return run

    return interleaved(paths, {k: runner(RapidOCR(params=v)) for k, v in variants.items()})


def pool_layouts(paths: list[Path], reps: int = 2) -> list[tuple]:
    from kdsl_utils.features import FeatureCache, ocr_images

    layouts = {"2 workers x 1 thread": (2, 1), "1 worker x 2 threads": (1, 2),
               "1 worker x 1 thread": (1, 1)}
    times: dict[str, list[float]] = {k: [] for k in layouts}
    for rep in range(reps):
        for k in (list(layouts) if rep % 2 == 0 else list(layouts)[::-1]):
            w, t = layouts[k]
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                ocr_images(paths, FeatureCache(tmp), workers=w,
                           extractor=RapidOcr(OcrParams(threads=t)), progress=False)
                times[k].append((time.perf_counter() - t0) / len(paths))
            print(f"  pool: {k} rep {rep}", file=sys.stderr, flush=True)
    return [(k, float(np.mean(v)), " / ".join(f"{x:.2f}" for x in v)) for k, v in times.items()]


def _subset(data, n: int, seed: int = 0) -> tuple[list, list]:
    """(train, test1) records, n of them in all (0: all), in the same proportions."""
    if n <= 0:
        return list(data.train), list(data.tests["test1"])
    rng = np.random.default_rng(seed)
    tr, te = data.train, data.tests["test1"]
    k = max(2, round(n * len(te) / (len(tr) + len(te))))

    def pick(recs, m):
        return [recs[i] for i in sorted(rng.choice(len(recs), min(m, len(recs)), replace=False))]

    return pick(tr, n - k), pick(te, k)


def stage_times(data, n: int, cache_dir: Path) -> list[tuple]:
    """Seconds of each stage of notebooks 01-02's CPU work on ``n`` records, run twice on
    ``cache_dir`` (cold, then warm): what the notebooks call, in their order."""
    from kdsl_utils import knowledge
    from kdsl_utils.config import resolve
    from kdsl_utils.features import EXTRACTION_LOG, FeatureCache
    from kdsl_utils.models.mini import MiniBackend, extract_inputs
    from kdsl_utils.rules import EvalSet

    cfg = resolve("mini")
    train, test = _subset(data, n)
    runs = []
    os.environ[CACHE_ENV] = str(cache_dir)  # knowledge.* opens the default cache: this one
    for _ in ("cold", "warm"):
        t: dict[str, float] = {}
        EXTRACTION_LOG.clear()
        cache = FeatureCache(cache_dir)
        t0 = time.perf_counter()
        extract_inputs(train + test, cfg.mini, cache, progress=False)  # 01's features
        t["01 features (wall)"] = time.perf_counter() - t0
        ocr01 = dict(EXTRACTION_LOG.get("ocr", {}))
        t0 = time.perf_counter()
        for mix in ("image", "intent", "joint"):  # one seed of 01's fits (it runs 3 seeds)
            b = MiniBackend(cfg, cache_dir, progress=False)
            b.fit(train, mix=mix, seed=0)
            b.predict_proba(test)
        t["01 fits + scoring, 3 mixes x 1 seed"] = time.perf_counter() - t0
        fit, dev = knowledge.dev_split(train, cfg, 0)
        t0 = time.perf_counter()
        _, proba = knowledge.fit_and_score(cfg, fit, {"dev": dev}, seed=0,
                                           out_dir=cache_dir / "work")
        t["02 fit + scoring (no augmentation)"] = time.perf_counter() - t0
        EXTRACTION_LOG.pop("ocr", None)
        t0 = time.perf_counter()
        obs_dev = knowledge.observables_for(dev, ocr=True, workers=cfg.mini.workers)
        fit_obs = knowledge.observables_for(fit, ocr=True, workers=cfg.mini.workers)
        t["02 observables (OCR of every image, wall)"] = time.perf_counter() - t0
        ocr02 = dict(EXTRACTION_LOG.get("ocr", {}))
        t0 = time.perf_counter()
        dev_set = EvalSet(obs_dev, knowledge.gold(dev, proba["dev"]), proba["dev"].proba)
        knowledge.search_rules(cfg, fit_obs, dev_set, seed=0, progress=False,
                               make=lambda o: knowledge.make_proposer(cfg, o, seed=0))
        t["02 rule search (MCTS + top-N)"] = time.perf_counter() - t0
        for k, v in (("01", ocr01), ("02", ocr02)):
            t[f"{k} OCR detection (summed over workers)"] = v.get("det_s", 0.0)
            t[f"{k} OCR recognition (summed over workers)"] = v.get("rec_s", 0.0)
            t[f"{k} OCR images computed / cached"] = f"{v.get('computed', 0)} / {v.get('cached', 0)}"
        for k in ("image embeddings", "text embeddings"):
            t[f"01 {k} (computed / cached)"] = (
                f"{EXTRACTION_LOG.get(k, {}).get('seconds', 0.0):.1f} s "
                f"({EXTRACTION_LOG.get(k, {}).get('computed', 0)} / "
                f"{EXTRACTION_LOG.get(k, {}).get('cached', 0)})")
        runs.append(t)
        print(f"  stages: {'cold' if len(runs) == 1 else 'warm'} done", file=sys.stderr, flush=True)
    order = ["01 features (wall)", "01 OCR detection (summed over workers)",
             "01 OCR recognition (summed over workers)", "01 OCR images computed / cached",
             "01 image embeddings (computed / cached)", "01 text embeddings (computed / cached)",
             "01 fits + scoring, 3 mixes x 1 seed", "02 fit + scoring (no augmentation)",
             "02 observables (OCR of every image, wall)", "02 OCR detection (summed over workers)",
             "02 OCR recognition (summed over workers)", "02 OCR images computed / cached",
             "02 rule search (MCTS + top-N)"]
    return [(k, runs[0][k], runs[1][k]) for k in order]


def f1_with_ocr(data, variant: str, cache_dir: Path, seeds=(0,)) -> list[tuple]:
    """Weighted F1 on test1 of the mini joint and image-only fits when OCR uses ``variant``
    (every image of train + test1 OCR'd with it, into ``cache_dir``). The only place the
    OCR settings are swapped is this function's rebinding of ``mini.ocr_images``."""
    import functools

    from sklearn.metrics import f1_score

    from kdsl_utils.config import resolve
    from kdsl_utils.models import mini

    cfg = resolve("mini")
    tr, te = data.train, data.tests["test1"]
    y = np.array([r.label for r in te])
    is_img = np.array([r.task == "image" for r in te])
    original = mini.ocr_images
    mini.ocr_images = functools.partial(original, extractor=RapidOcr(OCR_VARIANTS[variant]))
    rows = []
    try:
        for seed in seeds:
            for mix in ("image", "joint"):
                b = mini.MiniBackend(cfg, cache_dir, progress=True)
                b.fit(tr, mix=mix, seed=seed)
                p = np.array(b.predict_proba(te).pred)
                wi = f1_score(y[is_img], p[is_img], average="weighted", zero_division=0)
                wp = f1_score(y, p, average="weighted", zero_division=0) if mix == "joint" else float("nan")
                rows.append((variant, mix, seed, float(wi), float(wp)))
    finally:
        mini.ocr_images = original
    return rows


def section(a, name: str, title: str, where: str, table: str) -> None:
    """Print a table under its title and machine line; with ``--readme`` also write it
    into ``benchmarks/README.md`` between the markers ``name``."""
    text = f"### {title}\n\n{where}.\n\n{table}"
    print(text, "\n")
    if a.readme:
        write_section(name, text)


def main(argv=None) -> int:
    from kdsl_utils.data.mire import load_mire

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "mire"))
    ap.add_argument("--levers", type=int, default=0, help="compare OCR settings on N images")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="names of OCR_VARIANTS to compare (default: all; the first is the reference)")
    ap.add_argument("--sample-seed", type=int, default=0, help="which images --levers reads")
    ap.add_argument("--f1", nargs="+", default=None, metavar="VARIANT",
                    help="weighted F1 of mini fits with these OCR_VARIANTS (cache: $KDSL_FEATURE_CACHE)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the --f1 fits")
    ap.add_argument("--engines", type=int, default=0,
                    help="compare RapidOCR's onnxruntime and OpenVINO engines on N images")
    ap.add_argument("--pool", type=int, default=0, help="compare process layouts on N images")
    ap.add_argument("--stages", type=int, default=-1, help="stage table on N records (0: all)")
    ap.add_argument("--tag", default="", help="suffix of the --f1 README section's name")
    ap.add_argument("--readme", action="store_true", help="write the tables to benchmarks/README.md")
    a = ap.parse_args(argv)
    data = load_mire(a.data, test_files=["test1"])
    where = machine()
    print(where, "\n")
    if a.levers:
        paths = sample_images(data, a.levers, seed=a.sample_seed)
        names = a.variants or list(OCR_VARIANTS)
        table = md(["OCR variant", "det s/img", "rec s/img", "wall s/img", "same text",
                    "text similarity"], levers(paths, {k: OCR_VARIANTS[k] for k in names}))
        section(a, f"features_speed:levers{a.sample_seed}",
                f"OCR levers (`--levers {a.levers} --sample-seed {a.sample_seed}`: "
                f"{len(paths)} real images, interleaved, one process, cold; text compared "
                f"with the first row)", where, table)
    if a.engines:
        paths = sample_images(data, a.engines, seed=a.sample_seed)
        table = md(["engine", "det s/img", "rec s/img", "wall s/img", "same text",
                    "text similarity"], engines(paths))
        section(a, f"features_speed:engines{a.sample_seed}",
                f"OCR inference engines (`--engines {a.engines} --sample-seed {a.sample_seed}`: "
                f"{len(paths)} real images, interleaved, one process, one thread, cold; text "
                f"compared with the first row)", where, table)
    if a.pool:
        paths = sample_images(data, a.pool, seed=1)
        table = md(["layout", "wall s/img (mean)", "per run: 1st (start-up) / 2nd (kept pool)"],
                   pool_layouts(paths))
        text = (f"### OCR process layout (`--pool {a.pool}`: {len(paths)} real images, fresh "
                f"cache per run; the first run of a layout starts its pool / engine)\n\n{where}.\n\n{table}")
        print(text, "\n")
        if a.readme:
            write_section("features_speed:pool", text)
    if a.f1:
        from kdsl_utils.features import default_cache_dir

        rows = [r for v in a.f1 for r in f1_with_ocr(data, v, default_cache_dir(), seeds=a.seeds)]
        table = md(["OCR variant", "mix", "seed", "image wF1 (test1)", "pooled wF1 (test1)"], rows)
        text = (f"### Effect of OCR settings on the mini results (`--f1`: real train / test1)"
                f"\n\n{where}.\n\n{table}")
        print(text, "\n")
        if a.readme:
            write_section(f"features_speed:f1{a.tag}", text)
    if a.stages >= 0:
        with tempfile.TemporaryDirectory(prefix="kdsl-cold-") as tmp:
            rows = stage_times(data, a.stages, Path(tmp))
        n = a.stages or len(data.train) + len(data.tests["test1"])
        table = md(["stage", "cold s", "warm s"], rows)
        text = (f"### Stages of notebooks 01-02 (`--stages {a.stages}`: {n} records of train + "
                f"test1, an empty feature cache, then warm; profile mini)\n\n{where}.\n\n{table}")
        print(text, "\n")
        if a.readme:
            write_section("features_speed:stages", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
