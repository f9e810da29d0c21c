"""Knowledge decoupling, end to end (notebooks 02 and 03).

1. Hold out a stratified **dev fold** of the training data (``Profile.dev_fraction``).
2. Fine-tune the large model jointly on the rest plus its augmented copies
   (``Profile.augment``) and compute its label probabilities on the dev fold and the test
   splits **once** (saved as ``proba_<split>.npz``); the no-augmentation ablation does
   the same without the copies (``proba_noaug_<split>.npz``).
3. Build the rules' **observables** per record (customer text, last turn, OCR text of the
   images, image count) and a **proposer** (small MLLM in ``paper``/``tiny``, data-driven
   miner in ``mini``).
4. MCTS searches rule sets whose reward is the dev-search F1 of the collaborative prediction
   (:mod:`kdsl_utils.rules.mcts`); trust, strategy and whether the rules ship are decided on
   the held-out part, the ship verdict out of sample (cross-fitted, :func:`ship`); :mod:`kdsl_utils.kdsl_eval` scores
   model and rules on the tests (notebooks 02 and 03).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from . import collab
from .config import Profile
from .data.labels import ALL_LABELS
from .data.records import Record
from .data.splits import stratified_split
from .features import FeatureCache, default_cache_dir, ocr_images, ocr_text
from .models.base import FitLog, Predictions
from .models.registry import make_backend, release
from .representations import NeighbourVotes
from .results import atomic_path
from .rules.engine import (Observables, build_observables, concat_observables,
                           semantic_embedder, with_embedder)
from .rules.mcts import EvalSet, SearchResult, mcts_search, top_n_rules
from .rules.propose import DataProposer, LLMProposer, Proposer
from .rules.schema import Rule, load_rulebase


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
    model = make_backend(cfg)
    log = model.fit(train, mix="joint", seed=seed, out_dir=out_dir)
    proba = {split: model.predict_proba(recs) for split, recs in score.items()}
    if save_to is not None:
        model.save(save_to)
    release(model)
    return log, proba


def fit_variants(cfg: Profile, variants: dict[str, Sequence[Record]], score: dict[str, Sequence[Record]], *,
                 seed: int, out: Path) -> tuple[dict[str, FitLog], dict[str, dict[str, Predictions]]]:
    """:func:`fit_and_score` for each named training set (``{"kdsl": augmented fit part,
    "no_aug": fit part}``), one model alive at a time. Each variant's probabilities are saved
    under ``out`` (:func:`save_probas`); the ``kdsl`` model itself goes to ``out/model``
    (notebook 03 reloads it for prompt injection). Returns ``({variant: FitLog},
    {variant: {split: Predictions}})``."""
    logs, proba = {}, {}
    for v, train in variants.items():
        logs[v], proba[v] = fit_and_score(cfg, train, score, seed=seed, out_dir=Path(out) / "work" / v,
                                          save_to=Path(out) / "model" if v == "kdsl" else None)
        save_probas(out, proba[v], v)
    return logs, proba


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


def ocr_texts(records: Sequence[Record], *, workers: int = 2, progress: bool = True) -> dict[str, list[str]]:
    """OCR lines of every image, per record id (RapidOCR through the feature cache)."""
    res = ocr_images([p for r in records for p in r.images], FeatureCache(), workers=workers,
                     progress=progress)
    return {r.id: [ocr_text(res.get(p)) for p in r.images] for r in records}


NEAREST_FILE = "nearest_labels.csv"  # split, id, nearest_label (notebook 02 -> 03)


def nearest_labels(cfg: Profile, fit: Sequence[Record], splits: dict[str, Sequence[Record]], *,
                   seed: int) -> dict[str, list[str]]:
    """The ``nearest_label`` observable per split (``{}`` where ``RulesCfg.nearest_label``
    is off): the label of each record's nearest record of its task in the fit part, in the
    retrieval representation (:class:`~kdsl_utils.representations.NeighbourVotes`) trained
    on the fit part. Key ``"fit"``: the fit records' own, out of fold (each from a
    representation and gallery without it), so that mined rules see what a new record
    would get."""
    if not cfg.rules.nearest_label:
        return {}
    nv = NeighbourVotes(cfg, FeatureCache()).fit(list(fit), seed=seed)
    return {"fit": nv.nearest(list(fit)), **{s: nv.nearest(list(r)) for s, r in splits.items()}}


def save_nearest(out: Path, near: dict[str, list[str]], splits: dict[str, Sequence[Record]]) -> None:
    """Write :func:`nearest_labels` of ``splits`` (atomically; nothing where it is empty)."""
    if not near:
        return
    rows = [(s, r.id, lbl) for s, recs in splits.items() for r, lbl in zip(recs, near[s])]
    frame = pd.DataFrame(rows, columns=["split", "id", "nearest_label"])
    with atomic_path(Path(out) / NEAREST_FILE) as tmp:
        frame.to_csv(tmp, index=False)


def load_nearest(up: Path, splits: dict[str, Sequence[Record]]) -> dict[str, list[str]]:
    """Notebook 02's nearest labels for ``splits`` (``{}`` where it wrote none); a record
    missing from the file is an error naming it (the file belongs to other data)."""
    path = Path(up) / NEAREST_FILE
    if not path.is_file():
        return {}
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    out = {}
    for s, recs in splits.items():
        got = dict(zip(frame.id[frame.split == s], frame.nearest_label[frame.split == s]))
        missing = [r.id for r in recs if r.id not in got]
        if missing:
            raise ValueError(f"{path}: no nearest label for {len(missing)} record(s) of split "
                             f"{s!r} (first: {missing[0]!r}); re-run notebook 02 on this data")
        out[s] = [got[r.id] for r in recs]
    return out


def observables_for(records: Sequence[Record], cfg: Profile,
                    nearest: Sequence[str] | None = None) -> Observables:
    """The fields rules may test, for ``records``: OCR text where the profile decides so
    (``Profile.rules_ocr``; ~1 s per image on a CPU core the first time, then from the
    feature cache, with ``Profile.ocr_workers`` processes), the nearest training record's
    label where given (:func:`nearest_labels`), and the e5 embedder where rules may hold
    semantic conditions (:func:`semantic_rules`; embeddings computed only when such a
    condition is evaluated, cached by content)."""
    ocr = ocr_texts(records, workers=cfg.ocr_workers) if cfg.rules_ocr else None
    obs = build_observables(records, ocr_texts=ocr, nearest_label=nearest)
    return with_embedder(obs, semantic_embedder()) if semantic_rules(cfg) else obs


def semantic_rules(cfg: Profile) -> bool:
    """Whether this profile's rules may hold semantic conditions: the small-LM proposer runs
    (:func:`proposers`) and ``RulesCfg.semantic`` lets it write them. Notebooks 02 and 03
    both read rules through observables built here, so a semantic rule always finds its
    embedder."""
    return "llm" in proposers(cfg) and cfg.rules.semantic


def proposers(cfg: Profile) -> tuple[str, ...]:
    """Proposers notebook 02 runs: the profile's own first (its rows are KDSL's), then the
    data-driven miner as a baseline where the profile's proposer is another one (so every
    profile, ``tiny`` included, carries mined rules through 02 and 03)."""
    return (cfg.rules.proposer,) + (("data",) if cfg.rules.proposer != "data" else ())


def make_proposer(cfg: Profile, teach: Observables, *, kind: str, seed: int,
                  generate: Callable[[str], str] | None = None,
                  count_tokens: Callable[[str], int] | None = None) -> Proposer:
    """A proposer of ``kind``: ``data`` → DataProposer mined on ``teach``; ``llm`` →
    LLMProposer over ``generate`` (the small model's text generation)."""
    if kind == "data":
        return DataProposer(teach, seed=seed)
    if kind != "llm":
        raise ValueError(f"unknown proposer {kind!r}: 'data' or 'llm'")
    if generate is None:
        raise ValueError("the llm proposer needs the small model's generate(prompt) -> str")
    return LLMProposer(generate, train=teach, count_tokens=count_tokens, seed=seed,
                       semantic=cfg.rules.semantic, max_answers=cfg.rules.llm_max_answers,
                       answer_cache=default_cache_dir() / "llm_answers")


def majority_labels(train: Sequence[Record]) -> dict[str, int]:
    """Most frequent training label index per task (the fallback of "rules + majority")."""
    out = {}
    for task in {r.task for r in train}:
        labs = [r.label for r in train if r.task == task]
        out[task] = ALL_LABELS.index(max(sorted(set(labs)), key=labs.count))
    return out


#: Rule bases shipped with the package (``RulesCfg.init_rules`` names one of them).
FIXTURES = Path(__file__).parent / "rules" / "fixtures"


def init_rules(cfg: Profile) -> list[Rule]:
    """The rules the profile's searches start from (``RulesCfg.init_rules``; none by
    default). ``tiny`` starts from a fixture mined on synthetic data of another seed, so its
    smoke runs carry real rules although its random model proposes no valid one."""
    name = cfg.rules.init_rules
    if not name:
        return []
    path = FIXTURES / name if (FIXTURES / name).is_file() else Path(name)
    return list(load_rulebase(path).rules)


def search_rules(cfg: Profile, fit_obs: Observables, dev: EvalSet, *, seed: int,
                 make: Callable[[Observables], Proposer], progress: bool = True,
                 top_n: bool = True) -> tuple[SearchResult, SearchResult | None]:
    """MCTS over rule sets on the dev fold, and the top-N baseline matched to it, each shipped
    or not by ``collab.ship`` on the held-out part.

    ``dev`` is an ``EvalSet`` (observables, gold indices, model probabilities). The proposer
    (built by ``make`` from training observables) learns from the fit part plus the dev
    fold's *search* part — the errors the search sees — never from its held-out part.
    Top-N gets MCTS's proposal requests (calls + cache hits), MCTS's rule count (before the
    ship gate) and a fresh proposer. Returns ``(mcts, topn)`` (``topn`` None unless
    ``top_n``).
    """
    search_part, holdout = dev.split(cfg.rules.holdout_fraction, seed)
    teach = concat_observables(fit_obs, search_part.obs)
    combine = collab.make_override(cfg.rules.precision_threshold)
    init = init_rules(cfg)
    mcts = ship(cfg, mcts_search(make(teach), dev, cfg.rules, combine=combine, seed=seed,
                                 progress=progress, init_rules=init), holdout, seed=seed)
    if not top_n:
        return mcts, None
    topn = top_n_rules(make(teach), dev, cfg.rules, budget=max(1, int(mcts.cost["requests"])),
                       n_rules=len(mcts.found or ()), combine=combine, seed=seed,
                       init_rules=init)
    return mcts, ship(cfg, topn, holdout, seed=seed)


def ship(cfg: Profile, result: SearchResult, holdout: EvalSet, *, seed: int) -> SearchResult:
    """``collab.ship`` with the profile's gate (``RulesCfg.gate``, ``gate_folds``,
    ``gate_verify_fraction``): the one place the pipeline decides whether rules ship."""
    r = cfg.rules
    return collab.ship(result, holdout, gate=r.gate, folds=r.gate_folds,
                       verify_fraction=r.gate_verify_fraction, seed=seed)


def gate_gain(cfg: Profile, rules: Sequence[Rule], holdout: EvalSet, *, seed: int) -> float:
    """The out-of-sample held-out gain the profile's gate computes for ``rules`` (what
    :func:`ship` decided on; notebook 02 recomputes it from the saved rule bases)."""
    r = cfg.rules
    return collab.gate_gain(rules, holdout, gate=r.gate, folds=r.gate_folds,
                            verify_fraction=r.gate_verify_fraction, seed=seed)[0]


def search_all(cfg: Profile, fit_obs: Observables, dev_sets: dict[str, EvalSet], *, seed: int,
               make: dict[str, Callable[[Observables], Proposer]], progress: bool = True
               ) -> dict[str, tuple[SearchResult, str]]:
    """Every search notebook 02 runs, by rule set name (``kdsl_eval.rule_set_name``) →
    (shipped result, model variant): per proposer of ``proposers(cfg)`` MCTS on the KDSL
    model; for the profile's own proposer also the matched top-N and, where ``dev_sets``
    holds the no-augmentation model, that model's own search. ``make``: proposer kind →
    factory from training observables."""
    out: dict[str, tuple[SearchResult, str]] = {}
    for kind in proposers(cfg):
        own = kind == cfg.rules.proposer
        mcts, topn = search_rules(cfg, fit_obs, dev_sets["kdsl"], seed=seed, make=make[kind],
                                  progress=progress, top_n=own)
        out[f"mcts@{kind}"] = (mcts, "kdsl")
        if topn is not None:
            out[f"top_n@{kind}"] = (topn, "kdsl")
        if own and "no_aug" in dev_sets:  # the ablation's own search: its rules, its model
            out[f"mcts_noaug@{kind}"] = (search_rules(cfg, fit_obs, dev_sets["no_aug"],
                                                      seed=seed, make=make[kind],
                                                      progress=progress, top_n=False)[0],
                                         "no_aug")
    return out
