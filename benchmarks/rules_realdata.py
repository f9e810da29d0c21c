"""Sanity run of the rule search on real MIRE data (development only; data read from a path).

    python benchmarks/rules_realdata.py [MIRE_DIR] [--seed 0] [--iterations 30] [--cache DIR]
        [--ocr-cache FILE] [--verbose]

Model: per-task TF-IDF (char n-grams of the customer turns) + logistic regression for the
intent task, an 8x8 colour-thumbnail logistic regression for the image task, fitted on a
stratified 70% of train.json; the other 30% is the dev fold (search + held-out parts).
Rules: DataProposer mined on the 70% part (and, second variant, on it plus the search part
of the dev fold, the records whose errors the search sees); MCTS vs top-N at the same
proposer budget; the rules, gated by their held-out precision, are also applied to test1
with the same model. ``--ocr-cache`` adds OCR text (a json of image name -> lines).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from kdsl_utils.data.labels import ALL_LABELS, LABELS
from kdsl_utils.data.mire import load_mire
from kdsl_utils.data.splits import stratified_split
from kdsl_utils.rules import (DataProposer, EvalSet, build_observables, concat_observables,
                              label_indices, make_override, mcts_search, top_n_rules)


def _thumb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.float32).ravel() / 255.0


def fit_predict(train, others):
    """(n, 48) probabilities for each list in ``others``, from a model fitted on ``train``."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    outs = [np.zeros((len(o), len(ALL_LABELS))) for o in others]
    for task in LABELS:
        tr = [r for r in train if r.task == task]
        if task == "intent":
            vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True)
            X = vec.fit_transform([r.user_text for r in tr])
            feats = lambda rs, vec=vec: vec.transform([r.user_text for r in rs])  # noqa: E731
        else:
            X = np.stack([_thumb(r.images[0]) for r in tr])
            feats = lambda rs: np.stack([_thumb(r.images[0]) for r in rs])  # noqa: E731
        clf = LogisticRegression(C=10.0, max_iter=2000).fit(X, [r.label for r in tr])
        cols = [ALL_LABELS.index(c) for c in clf.classes_]
        for o, out in zip(others, outs):
            rows = [i for i, r in enumerate(o) if r.task == task]
            if rows:
                out[np.ix_(rows, cols)] = clf.predict_proba(feats([o[i] for i in rows]))
    return outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mire", nargs="?", default=os.environ.get("KDSL_MIRE_DIR", "../shared/mire"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--cache", default="", help="folder to cache the model probabilities in")
    ap.add_argument("--holdout", type=float, default=0.3)
    ap.add_argument("--ocr-cache", default="", help="json: image file name -> OCR lines")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    data = load_mire(args.mire, decode_images=False)
    fit, dev = stratified_split(data.train, 0.3, args.seed)
    test = data.tests.get("test1", [])
    t0 = time.perf_counter()
    cached = Path(args.cache) / f"proba_seed{args.seed}.npz" if args.cache else None
    if cached is not None and cached.exists():
        z = np.load(cached)
        p_dev, p_test = z["dev"], z["test"]
    else:
        p_dev, p_test = fit_predict(fit, [dev, test])
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cached, dev=p_dev, test=p_test)
    print(f"data: {len(fit)} fit / {len(dev)} dev / {len(test)} test1; model fitted in "
          f"{time.perf_counter() - t0:.1f}s")
    ocr = None
    if args.ocr_cache:
        cache = json.loads(Path(args.ocr_cache).read_text("utf-8"))
        missing = [p.name for r in data.train + test for p in r.images if p.name not in cache]
        if missing:
            raise SystemExit(f"OCR cache lacks {len(missing)} images")
        ocr = {r.id: [" ".join(cache[p.name]) for p in r.images] for r in data.train + test}
    obs_fit, obs_dev, obs_test = (build_observables(x, ocr_texts=ocr) for x in (fit, dev, test))
    y_dev = label_indices([r.label for r in dev])
    ev_dev = EvalSet(obs_dev, y_dev, p_dev)
    combine = make_override(args.threshold)
    search_part, _ = ev_dev.split(args.holdout, args.seed)
    mining = {"fit": obs_fit, "fit+search": concat_observables(obs_fit, search_part.obs)}
    y_t = label_indices([r.label for r in test])
    ev_test = EvalSet(obs_test, y_t, p_test)
    print(f"OCR: {'yes' if ocr else 'no'}; threshold {args.threshold}; seed {args.seed}; "
          f"MCTS width 3 depth 5 iterations {args.iterations}; held-out {args.holdout}")
    for name, mined in mining.items():
        res = mcts_search(DataProposer(mined, seed=args.seed), ev_dev,
                          iterations=args.iterations, precision_threshold=args.threshold,
                          holdout_fraction=args.holdout, combine=combine, seed=args.seed)
        base = top_n_rules(DataProposer(mined, seed=args.seed), ev_dev,
                           budget=max(res.cost["calls"], 1), n_rules=max(len(res.rules), 1),
                           precision_threshold=args.threshold, holdout_fraction=args.holdout,
                           combine=combine, seed=args.seed)
        for r in (res, base):
            sm = r.summary()
            prec = np.array([np.nan if x.precision is None else x.precision for x in r.rules])
            pred, _ = ev_test.predict(r.rules, combine, precision=prec)
            t = {task or "pooled": (ev_test.f1(ev_test.base_pred, task), ev_test.f1(pred, task))
                 for task in (None, "image", "intent")}
            print(f"[mine on {name:10s}] {r.method:5s} rules={sm['n_rules']:3d} "
                  f"search {sm['search_base']:.4f}->{sm['search_reward']:.4f} "
                  f"held-out {sm['holdout_base']:.4f}->{sm['holdout_reward']:.4f} "
                  f"test1 pooled {t['pooled'][0]:.4f}->{t['pooled'][1]:.4f} "
                  f"(image {t['image'][0]:.4f}->{t['image'][1]:.4f}, "
                  f"intent {t['intent'][0]:.4f}->{t['intent'][1]:.4f}) "
                  f"calls={sm['calls']} wall={r.cost['wall_s']}s")
        if args.verbose:
            print(res.metrics.pivot_table(index=["split", "task"], columns="variant",
                                          values="value"))
            print({k: v for k, v in res.cost.items()})
            cols = ["id", "label", "conditions", "train_precision", "search_fired",
                    "search_precision", "holdout_fired", "holdout_precision"]
            print(res.rule_table[cols].to_string(max_colwidth=50))


if __name__ == "__main__":
    main()
