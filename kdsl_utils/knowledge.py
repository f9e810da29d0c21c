"""Knowledge decoupling, end to end (notebooks 02 and 03).

1. Hold out a stratified **dev fold** of the training data (``Profile.dev_fraction``).
2. Fine-tune the large model jointly on the rest plus its augmented copies
   (``Profile.augment``) and compute its label probabilities on the dev fold and the test
   splits **once** (saved as ``proba_<split>.npz``); the no-augmentation ablation does
   the same without the copies (``proba_noaug_<split>.npz``).
3. Build the rules' **observables** per record (customer text, last turn, OCR text of the
   images, image count) and a **proposer** (small MLLM in ``paper``/``tiny``, data-driven
   miner in ``mini``).
4. MCTS searches rule sets whose reward is the dev-fold F1 of the collaborative prediction
   (:mod:`kdsl_utils.rules.mcts`); notebook 03 combines model and rules on the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .config import Profile
from .data.labels import ALL_LABELS, LABEL_TO_TASK
from .data.records import Record
from .data.splits import stratified_split
from .models.base import FitLog, Predictions
from .results import atomic_path
from .rules.engine import Observables, RuleResult, build_observables, label_indices
from .rules.propose import DataProposer, LLMProposer, Proposer


def dev_split(train: Sequence[Record], cfg: Profile, seed: int) -> tuple[list[Record], list[Record]]:
    """(fit, dev): ``cfg.dev_fraction`` of every label held out for rule search."""
    return stratified_split(train, cfg.dev_fraction, seed=seed)


#: File prefix of each large-model variant's saved probabilities (``<prefix>_<split>.npz``).
PROBA_PREFIX = {"kdsl": "proba", "no_aug": "proba_noaug"}


def fit_and_score(cfg: Profile, train: Sequence[Record], score: dict[str, Sequence[Record]], *,
                  seed: int, out_dir: Path, save_to: Path | None = None) -> tuple[FitLog, dict[str, Predictions]]:
    """Fine-tune the profile's large model jointly on ``train`` (checkpoints in ``out_dir``)
    and score every split of ``score`` once. Returns ``(fit_log, {split: Predictions})``;
    the model is saved to ``save_to`` when given, then released (GPU memory included), so
    a second variant never holds two large models at once."""
    import gc

    import torch

    from .models.registry import make_backend

    model = make_backend(cfg)
    log = model.fit(train, mix="joint", seed=seed, out_dir=out_dir)
    proba = {split: model.predict_proba(recs) for split, recs in score.items()}
    if save_to is not None:
        model.save(save_to)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return log, proba


def save_probas(out: Path, proba: dict[str, Predictions], variant: str = "kdsl") -> None:
    for split, p in proba.items():
        save_proba(Path(out) / f"{PROBA_PREFIX[variant]}_{split}.npz", p)


def load_probas(up: Path, splits: Sequence[str], variant: str = "kdsl") -> dict[str, Predictions]:
    """Notebook 02's saved probabilities of ``variant`` for ``splits``."""
    return {s: load_proba(Path(up) / f"{PROBA_PREFIX[variant]}_{s}.npz") for s in splits}


def save_proba(path: Path | str, preds: Predictions) -> None:
    gold = np.array(["" if g is None else g for g in preds.gold])  # "" marks an unlabelled record
    with atomic_path(path) as tmp:  # the target name ends in .npz, so numpy keeps tmp's name
        np.savez_compressed(tmp, ids=np.array(preds.ids), tasks=np.array(preds.tasks),
                            proba=preds.proba.astype(np.float32), gold=gold)


def load_proba(path: Path | str) -> Predictions:
    z = np.load(path, allow_pickle=False)
    return Predictions(ids=[str(x) for x in z["ids"]], tasks=[str(x) for x in z["tasks"]],
                       proba=z["proba"].astype(np.float64),
                       gold=[str(g) or None for g in z["gold"]])


def gold(records: Sequence[Record], preds: Predictions | None = None) -> np.ndarray:
    """Gold label indices (ALL_LABELS order), aligned with ``preds.ids`` when given."""
    by_id = {r.id: r.label for r in records}
    ids = preds.ids if preds is not None else [r.id for r in records]
    return label_indices([by_id[i] for i in ids])


def ocr_texts(records: Sequence[Record], *, workers: int = 2, progress: bool = True) -> dict[str, list[str]]:
    """OCR lines of every image, per record id (RapidOCR through the feature cache)."""
    from .features import FeatureCache, ocr_images, ocr_text

    res = ocr_images([p for r in records for p in r.images], FeatureCache(), workers=workers,
                     progress=progress)
    return {r.id: [ocr_text(res.get(p)) for p in r.images] for r in records}


def observables_for(records: Sequence[Record], *, ocr: bool, workers: int = 2) -> Observables:
    """The fields rules may test, for ``records`` (OCR only when ``ocr``: it costs ~1 s/image
    on a CPU core the first time, then comes from the cache)."""
    return build_observables(records, ocr_texts=ocr_texts(records, workers=workers) if ocr else None)


def make_proposer(cfg: Profile, fit_obs: Observables, *, seed: int,
                  generate: Callable[[str], str] | None = None,
                  count_tokens: Callable[[str], int] | None = None) -> Proposer:
    """The profile's proposer: ``data`` → DataProposer; ``llm`` → LLMProposer over ``generate``
    (the small MLLM's text generation)."""
    if cfg.rules.proposer == "data":
        return DataProposer(fit_obs, seed=seed)
    if generate is None:
        raise ValueError("the llm proposer needs the small model's generate(prompt) -> str")
    return LLMProposer(generate, train=fit_obs, count_tokens=count_tokens, seed=seed)


def majority_labels(train: Sequence[Record]) -> dict[str, int]:
    """Most frequent training label index per task (the rules-only fallback)."""
    out = {}
    for task in {r.task for r in train}:
        labs = [r.label for r in train if r.task == task]
        out[task] = ALL_LABELS.index(max(sorted(set(labs)), key=labs.count))
    return out


def rules_only(result: RuleResult, tasks: Sequence[str], fallback: dict[str, int]) -> np.ndarray:
    """Labels from the rules alone: the first firing rule's label, else the task's majority
    training label (so coverage, not just precision, shows in the F1)."""
    fb = np.array([fallback[t] for t in tasks], dtype=np.int64)
    return np.where(result.fired >= 0, result.label_idx, fb)


def task_of(label_idx: np.ndarray) -> list[str]:
    return [LABEL_TO_TASK[ALL_LABELS[i]] for i in label_idx]


def search_rules(cfg: Profile, fit_obs: Observables, dev, *, seed: int,
                 make: Callable[[Observables], Proposer], progress: bool = True,
                 top_n: bool = True):
    """MCTS over rule sets on the dev fold, and the top-N baseline at the same proposer budget.

    ``dev`` is an ``EvalSet`` (observables, gold indices, model probabilities). The proposer
    (built by ``make`` from training observables) learns from the fit part plus the dev
    fold's *search* part — the errors the search sees — never from its held-out part.
    Returns ``(mcts_result, topn_result)`` (``topn_result`` None unless ``top_n``).
    """
    from .rules.engine import concat_observables
    from .rules.mcts import mcts_search, search_params, top_n_rules

    params = search_params(cfg.rules)
    search_part, _ = dev.split(params["holdout_fraction"], seed)
    teach = concat_observables(fit_obs, search_part.obs)
    mcts = mcts_search(make(teach), dev, seed=seed, progress=progress, **params)
    if not top_n:
        return mcts, None
    budget = max(1, int(mcts.cost.get("calls", 1)))
    topn = top_n_rules(make(teach), dev, budget=budget, seed=seed,
                       precision_threshold=params["precision_threshold"],
                       holdout_fraction=params["holdout_fraction"])
    return mcts, topn


def dev_precision(rules, dev) -> np.ndarray:
    """Each rule's precision measured on the whole dev fold (decision-list order): the
    trust estimate used on the test splits."""
    return dev.engine.apply(list(rules), y=dev.y).precision
