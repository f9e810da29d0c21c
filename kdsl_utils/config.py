"""Profiles: one pipeline, three sizes (see DESIGN.md, "Profiles").

A profile is a frozen dataclass resolved here, never in notebook cells::

    cfg = resolve("mini", seeds=(0, 1), train__epochs=5)

Top-level fields are overridden by name; fields of a section by ``section__field``.
Unknown names raise ``ConfigError`` listing the valid ones (and the closest match), so a
typo in a papermill parameter fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .hashing import json_digest

PROFILES = ("paper", "mini", "tiny")


class ConfigError(ValueError):
    """An unknown profile, unknown override name or an invalid value."""


@dataclass(frozen=True)
class ModelCfg:
    """The large (post-trained) and small (rule-proposing) models of the qwen_vl backend."""

    large: str = "Qwen/Qwen2-VL-7B-Instruct"  # hub id or local path
    small: str = "Qwen/Qwen2-VL-2B-Instruct"
    finetune: str = "lora"  # "lora" | "full" | "qlora" (4-bit, bitsandbytes)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                     "gate_proj", "up_proj", "down_proj")
    freeze_vision: bool = True
    dtype: str = "bfloat16"  # "bfloat16" | "float32"
    min_pixels: int = 64 * 28 * 28
    max_pixels: int = 768 * 28 * 28  # visual tokens per image <= max_pixels / 28**2
    max_length: int = 4096  # tokens per training sequence, images included
    attn_implementation: str = "sdpa"
    length_norm: str = "sum"  # label scoring: "sum" (sequence log-prob) | "mean" (per token)


@dataclass(frozen=True)
class TrainCfg:
    """Hyper-parameters shared by every task mix of a profile (the seesaw needs them equal)."""

    epochs: float = 3.0
    learning_rate: float = 1e-4
    batch_size: int = 1
    grad_accum: int = 8
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_steps: int = -1  # > 0 caps training (smoke runs)
    gradient_checkpointing: bool = True
    eval_batch_size: int = 4
    lr_scheduler: str = "cosine"
    save_steps: int = 200  # checkpoint every N optimizer steps when an out_dir is given


@dataclass(frozen=True)
class AugmentCfg:
    """Augmentation of KDSL's large-model training set (:mod:`kdsl_utils.data.augment`).

    Used by notebook 02 only; notebook 01's task mixes are the plain recipe. Copies are
    added per original record; 0 turns a kind off.

    ``mini`` makes no resize copies: measured not to help the mini model (every difference
    below the seed spread) while costing a new OCR per copy; the table is in
    ``benchmarks/README.md`` ("Augmentation of the mini large model")."""

    image_copies: int = 1  # random-resize copies per image-task record
    scale: tuple[float, float] = (0.5, 1.5)  # resize factor range (aspect kept)
    dialogue_copies: int = 1  # turn-dropout copies per intent record
    p_agent: float = 0.3  # drop probability of an image-free agent turn
    p_user: float = 0.3  # ... of an image-free customer turn other than the last one


@dataclass(frozen=True)
class MiniCfg:
    """The CPU backend built on pretrained parts that install from PyPI (no hub)."""

    ocr: bool = True
    image_encoder: bool = True
    text_encoder: bool = True
    intent_images: bool = False  # OCR/embed the images in dialogues too (measured: hurts intent)
    hidden: int = 256
    epochs: int = 30
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    dropout: float = 0.2
    batch_size: int = 32
    workers: int = 2  # processes for OCR and for independent fits (Profile.fit_workers)
    # Retrieval augmentation (issue 13): the similarity-weighted label vote of the nearest
    # labelled training records (notebook 04's trained representation) as an extra dense
    # input block; training records get out-of-fold votes (representations.NeighbourVotes).
    # Off by default: it costs retrieval_folds + 1 encoder fits per model fit (measured in
    # benchmarks/README.md, "Retrieval augmentation"); OVERRIDES {"mini__retrieval": true}
    # writes under results/mini-ov<hash>/.
    retrieval: bool = False
    retrieval_folds: int = 4  # cross-fitting folds for the training records' own votes


@dataclass(frozen=True)
class RulesCfg:
    """Rule proposal and Monte Carlo Tree Search (DESIGN.md method points 3-4).

    Exploration: measured with ``benchmarks/rules_realdata.py`` (real MIRE, mini, seed 0,
    data proposer, test1 split and 4 cv folds): raw rewards with c = 1 give the root's three
    children 10/10/10 visits in every run (the issue's symptom); normalised rewards with
    c = 0.5 give 10/3/17, 3/25/2, 5/12/13, 2/25/3, 2/4/24 — the search follows the reward.
    Neither setting changes the held-out verdict there (the found rules do not gain on the
    held-out dev part in 4 of 5 runs either way), so the choice rests on the visit counts."""

    proposer: str = "llm"  # "llm" (small MLLM) | "data" (discriminative miner)
    uct_c: float = 0.5  # UCT exploration, on rewards min-max normalised over the tree (see mcts)
    normalise_rewards: bool = True  # UCT on rewards rescaled to [0, 1] by the tree's min / max
    width: int = 3  # children per expansion
    depth: int = 8  # tree levels (rule-set size is bounded by max_rules, not by depth)
    iterations: int = 30
    precision_threshold: float = 0.8  # override threshold of the search reward
    holdout_fraction: float = 0.3  # share of the dev fold kept out of the search (overfit check)
    # How the held-out part decides the strategy and whether the rules ship (collab.ship):
    # "crossfit" — K folds, strategy (and rule trust) chosen on K-1, the gain scored on the
    # K-th, out-of-fold predictions pooled; "split" — choose on one part, verify on the other;
    # "insample" — choose and verify on the same records (optimistic by the best-of-grid
    # choice; kept as the diagnostic it was). Power measured: benchmarks/gate_power.py.
    gate: str = "crossfit"
    gate_folds: int = 5  # K of "crossfit" (capped by the held-out size)
    gate_verify_fraction: float = 0.5  # share of the held-out part that verifies, "split"
    k: int = 5  # rules requested per proposer call
    add_batch: int = 2  # proposed rules an "add" action inserts at once (size not tied to depth)
    max_rules: int = 50
    target: str = "roundrobin"  # add-action label: "roundrobin" over labels with errors |
    #   "sample" (by error mass) | "most" (most errors; the old behaviour, repeats itself)
    init_rules: str = ""  # rule-base JSON the searches start from (a name in rules/fixtures/
    #   or a path); tiny's smoke runs start from a fixture, its model proposes no valid rule

    # The LLM proposer on the mini profile: the CPU small LM (models.small_lm; `make small-lm`).
    llm_weights: str = "qwen2.5-coder-1.5b"  # key of models.small_lm.WEIGHTS
    llm_threads: int = 1  # llama.cpp threads (2 stalled on 2 oversubscribed cores, measured)
    llm_max_tokens: int = 320  # answer budget; the JSON-schema grammar bounds every string
    llm_max_answers: int = 0  # > 0: answers per LLM proposer (per search; 0 = no cap)
    semantic: bool = True  # the LLM may write semantic conditions (e5 cosine, issue 15 1b)
    # The nearest training record's label as an observable (issue 13): representations.
    # NeighbourVotes (notebook 04's `full` CPU representation) trained on the fit part,
    # out of fold for the fit records; costs retrieval_folds + 1 encoder fits (~20 s on real
    # MIRE). On for mini; off for tiny (its smoke runs stay OCR-free) and for paper (its
    # representation is notebook 04's Qwen mICL encoder, which is not wired into the rules).
    nearest_label: bool = False


@dataclass(frozen=True)
class ReprCfg:
    """NoteLLM-2-style record representations (notebook 04, :mod:`kdsl_utils.representations`).

    Two encoders, one downstream (kNN, recall@k, the nearest label, the same ablations):

    - ``encoder="qwen_micl"`` (``paper``; ``tiny`` on the random twin, so every line runs in
      the tests): Qwen2-VL reads the mICL prompt of a record, the visual embedding is the
      hidden state before the image's compression word, the multimodal one the last
      token's; late fusion with the vision tower's pooled features; LoRA + gate trained
      contrastively (:mod:`kdsl_utils.models.qwen_repr`). It reads ``ModelCfg`` (the model
      named by ``llm``, LoRA, pixels, ``max_length``, dtype) and the ``llm_*`` fields;
      ``dim``/``epochs``/``batch_size``/``learning_rate``/``dropout`` are the CPU recipe's.
    - ``encoder="features"`` (``mini``): the CPU recipe (e5 text side, EfficientNet + layout
      visual side, trained gate and projections over the cached extractors)."""

    encoder: str = "features"  # "features" (CPU recipe) | "qwen_micl" (Qwen2-VL mICL)
    intent_images: bool = True  # OCR + embed the images inside dialogues (their image "word")
    dim: int = 128  # common size of the projected text-side and visual-side embeddings
    epochs: int = 40
    batch_size: int = 64  # anchors per batch; each brings one related record (2x records)
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    dropout: float = 0.1
    temperature: float = 0.07  # initial value of the learnable contrastive temperature
    visual_loss_weight: float = 0.5  # mICL: weight of the visual-side loss (multimodal: 1)
    dialogue_copies: int = 1  # turn-dropout copies per intent record (related pairs)
    # characters of OCR text per e5 passage (the image "word"). 128, measured on real MIRE,
    # seed 0, under load: e5 per passage 228 vs 400 ms at 512 (same process, interleaved),
    # test1 recall@1 / kNN F1 of `full` 0.519 / 0.553 vs 0.474 / 0.500 at 512 (not lower)
    word_max_chars: int = 128
    k_grid: tuple[int, ...] = (1, 3, 5, 10, 20)  # kNN k, chosen on the dev fold
    recall_ks: tuple[int, ...] = (1, 3, 5, 10, 20)  # recall@k of same-label retrieval
    # qwen_micl only: the LLM and its contrastive LoRA training (in-batch negatives, so no
    # gradient accumulation: a batch is llm_batch_size anchors + one related record each)
    llm: str = "large"  # which ModelCfg model: "large" (7B) | "small" (2B, the cheaper option)
    llm_epochs: int = 2
    llm_batch_size: int = 8  # anchors per batch (2x sequences in the forward)
    llm_learning_rate: float = 1e-4  # LoRA + gate + projection + temperature
    llm_max_steps: int = -1  # > 0 caps the optimizer steps per variant (smoke runs)


@dataclass(frozen=True)
class CotCfg:
    """Dynamic chain-of-thought post-training (DESIGN.md point 6, :mod:`kdsl_utils.dynamic_cot`).

    The three variants (plain SFT, full CoT, dynamic CoT) train ``epochs`` epochs each with the
    profile's TrainCfg otherwise (``max_steps`` lifted), so their optimizer-step budgets are equal."""

    teacher: str = "large"  # "large": the post-trained model zero-shot, given the label |
    # "small_lm": the CPU small LM (text only; make small-lm) | "template": quotes the record
    teacher_budget_s: float = 0.0  # > 0: a text teacher stops after this many seconds
    teacher_max_new_tokens: int = 96  # rationale length bound (tokens) at generation
    teacher_sample: int = 0  # > 0: rationales for at most this many training records (time bound)
    epochs: float = 3.0  # training epochs of every variant (dynamic: the first is the warm-up)
    warmup_epochs: int = 1  # plain-SFT epochs before dynamic CoT first decides
    gamma_quantile: float = 0.5  # default γ: records with SFT loss above this loss quantile reason
    gamma_grid: tuple[float, ...] = (0.25, 0.5, 0.75)  # γ quantiles tried; chosen on the dev fold
    max_new_tokens: int = 160  # generation budget at inference (room to see what exceeds the limit)
    token_limit: int = 100  # the challenge's output-token limit
    train_sample: int = 0  # > 0: at most this many fit records (seeded sample; smoke runs)
    test_sample: int = 0  # > 0: at most this many records per test split (seeded sample)


@dataclass(frozen=True)
class Profile:
    name: str
    backend: str  # "qwen_vl" | "mini"
    device: str = "cuda"  # "cuda" | "cpu"
    seeds: tuple[int, ...] = (0, 1, 2)
    dev_fraction: float = 0.2  # share of train held out as the dev fold
    model: ModelCfg = field(default_factory=ModelCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    augment: AugmentCfg = field(default_factory=AugmentCfg)
    mini: MiniCfg = field(default_factory=MiniCfg)
    rules: RulesCfg = field(default_factory=RulesCfg)
    repr: ReprCfg = field(default_factory=ReprCfg)  # notebook 04
    cot: CotCfg = field(default_factory=CotCfg)  # notebook 05

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def rules_ocr(self) -> bool:
        """Whether rules may test the OCR text of the images: where the profile's model reads
        it too (mini with OCR on) and under ``paper`` (RapidOCR beside the MLLM); not ``tiny``
        (its smoke runs stay OCR-free)."""
        return (self.backend == "mini" and self.mini.ocr) or self.name == "paper"

    @property
    def ocr_workers(self) -> int:
        """Processes for RapidOCR, whichever profile runs it (one setting: ``mini.workers``)."""
        return self.mini.workers

    @property
    def fit_workers(self) -> int:
        """Processes for independent model fits (notebook 01's seesaw fits, notebook 04's
        representation variants): ``mini.workers`` for the CPU backend, whose fits are
        single-threaded; 1 for the Qwen-VL backend (one model on the GPU at a time)."""
        return self.mini.workers if self.backend == "mini" else 1

    @property
    def notebook_jobs(self) -> int:
        """Notebooks ``make reproduce`` runs at a time (where their inputs allow): 2 on the
        CPU backend, whose notebooks spend much of their time on one core (kernel start,
        imports, search, plots); 1 for the Qwen-VL backend, so that two large models never
        share the GPU."""
        return 2 if self.backend == "mini" else 1


def _base(name: str) -> Profile:
    if name == "paper":
        return Profile(name="paper", backend="qwen_vl", device="cuda",
                       repr=ReprCfg(encoder="qwen_micl"))
    if name == "mini":
        # No resize copies in mini: measured, see benchmarks/README.md (augmentation).
        # Held-out half of the dev fold (~69 of ~139 records on real MIRE, not 41): the ship
        # gate's power there, measured (benchmarks/gate_power.py, cross-fitted gate, a
        # moderately helpful rule set): 0.77 at 41 records, 0.92 at 69, false positives ~0.2
        # either way; the search keeps ~69 records and the proposer loses ~28 of ~650.
        # RULES=llm: 6 answers of the CPU small LM per search. One answer took 90-180 s on 2
        # oversubscribed cores (measured, load average ~9); uncapped, MCTS asks ~60 times per
        # search (the data miner's count), i.e. hours for the three LLM searches (MCTS, top-N,
        # no-augmentation); capped, the run's three searches take ~20-50 minutes.
        return Profile(name="mini", backend="mini", device="cpu", seeds=(0, 1, 2),
                       augment=AugmentCfg(image_copies=0),
                       rules=RulesCfg(proposer="data", holdout_fraction=0.5,
                                      llm_max_answers=6, nearest_label=True))
    if name == "tiny":
        # A randomly initialised Qwen2-VL twin: every line of the paper path, on CPU, in seconds.
        return Profile(
            name="tiny", backend="qwen_vl", device="cpu", seeds=(0,),
            model=ModelCfg(large="tiny", small="tiny", dtype="float32", lora_r=4, lora_alpha=8,
                           min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28, max_length=1024,
                           attn_implementation="eager"),
            train=TrainCfg(epochs=1.0, learning_rate=2e-2, batch_size=2, grad_accum=1, warmup_ratio=0.0,
                           lr_scheduler="constant",
                           max_steps=8, gradient_checkpointing=False, eval_batch_size=4),
            rules=RulesCfg(proposer="llm", iterations=4, width=2, depth=2,
                           init_rules="synthetic_intent.json"),
            repr=ReprCfg(encoder="qwen_micl", epochs=3, dim=32, k_grid=(1, 3), recall_ks=(1, 3),
                         llm_epochs=2, llm_batch_size=4, llm_learning_rate=3e-3),
            # the random twin's own rationales are noise (all rejected): the template teacher
            # gives the CoT code paths real targets; the model teacher is run in the tests
            cot=CotCfg(teacher="template", teacher_max_new_tokens=16, epochs=2.0,
                       gamma_grid=(0.5,), max_new_tokens=24, token_limit=100,
                       train_sample=24, test_sample=16),
        )
    raise ConfigError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(current: Any, value: Any, name: str) -> Any:
    """Accept lists for tuple fields (papermill passes lists) and ints for float fields."""
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(f"{name} expects {type(current).__name__}, got {value!r}")
    return value


def resolve(profile: str, **overrides: Any) -> Profile:
    """The frozen profile ``profile`` with ``overrides`` applied (``section__field`` for sections)."""
    cfg = _base(profile)
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    top_names = [f.name for f in fields(Profile) if f.name != "name"]
    for key, value in overrides.items():
        sec, _, sub = key.partition("__")
        if sub:
            section = getattr(cfg, sec, None)
            if not dataclasses.is_dataclass(section):
                raise ConfigError(f"unknown config section {sec!r} in {key!r}"
                                  f"{_suggest(sec, top_names)}")
            valid = [f.name for f in fields(section)]
            if sub not in valid:
                raise ConfigError(f"unknown setting {key!r}{_suggest(sub, valid)}; "
                                  f"{sec} has: {', '.join(valid)}")
            sections.setdefault(sec, {})[sub] = _coerce(getattr(section, sub), value, key)
        else:
            if key not in top_names or dataclasses.is_dataclass(getattr(cfg, key)):
                raise ConfigError(f"unknown setting {key!r}{_suggest(key, top_names)}; "
                                  f"valid: {', '.join(top_names)} or section__field")
            top[key] = _coerce(getattr(cfg, key), value, key)
    for sec, vals in sections.items():
        top[sec] = replace(getattr(cfg, sec), **vals)
    return replace(cfg, **top)


def overrides_tag(overrides: Mapping[str, Any] | None) -> str:
    """``""`` without overrides, else ``"-ov"`` + 8 hex digits of the canonical JSON of the
    overrides: the suffix of the profile segment of a results path, so that a run with
    overrides never lands in (or is read as) the folder of the plain profile."""
    return f"-ov{json_digest(dict(overrides), 8)}" if overrides else ""


def results_profile(profile: str, overrides: Mapping[str, Any] | None = None) -> str:
    """The profile segment of ``results/<profile>/<data>/<notebook>/``: the profile's name,
    suffixed by :func:`overrides_tag` (``mini-ov1a2b3c4d``) when overrides are given. The
    overrides are validated first (unknown names raise :class:`ConfigError`)."""
    resolve(profile, **dict(overrides or {}))
    return profile + overrides_tag(overrides)


def parse_overrides(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``OVERRIDES`` as papermill or make pass it: a dict, a JSON object string, or empty."""
    if not text:
        return {}
    value = json.loads(text) if isinstance(text, str) else dict(text)
    if not isinstance(value, dict):
        raise ConfigError(f"OVERRIDES must be a JSON object, e.g. '{{\"train__epochs\": 5}}'; "
                          f"got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """``python -m kdsl_utils.config [--jobs] PROFILE [OVERRIDES_JSON]``: print the
    results-path profile segment, or with ``--jobs`` :attr:`Profile.notebook_jobs` (both
    used by the Makefile); exit 2 with the reason on unknown overrides."""
    args = list(sys.argv[1:] if argv is None else argv)
    jobs = args[:1] == ["--jobs"]
    args = args[1:] if jobs else args
    try:
        overrides = parse_overrides(args[1] if len(args) > 1 else "")
        print(resolve(args[0], **overrides).notebook_jobs if jobs
              else results_profile(args[0], overrides))
    except (ConfigError, json.JSONDecodeError, IndexError) as e:
        print(f"[kdsl] config: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
