"""The qwen_vl backend: Qwen2-VL post-training and prediction (profiles ``paper`` and ``tiny``).

``paper`` loads Qwen2-VL-7B-Instruct (large) / 2B-Instruct (small) from a hub id or a local
path; ``tiny`` builds a randomly initialised twin (:mod:`kdsl_utils.models.tiny`) and loads it
through the same two functions, :func:`load_processor` and :func:`load_model`, so that the
chat formatting, masking, LoRA, training, scoring and generation code under test is the code
that runs on the GPU.

Fine-tuning (``ModelCfg.finetune``):

* ``lora`` (default): peft LoRA on the language model's attention and MLP projections
  (``ModelCfg.lora_targets``), rank/alpha/dropout from the profile; the vision tower and the
  merger are frozen. With ``freeze_vision=False`` the vision blocks' ``qkv/proj/fc1/fc2`` and
  the merger MLP get adapters too.
* ``full``: every language-model weight trains; the vision tower too when
  ``freeze_vision=False``.
* ``qlora``: the base loaded in 4-bit NF4 (bitsandbytes, double quantisation, compute in the
  profile dtype; the vision tower and ``lm_head`` stay unquantised), then LoRA as above.
  bitsandbytes is imported only here: it is a GPU-only extra (``pip install kdsl-utils[gpu]``).

The image processor is Qwen2-VL's PIL backend with ``min_pixels``/``max_pixels`` from the
profile. It is used on every machine (rather than the torchvision one where torchvision
happens to be installed), so that pixels, and hence results, do not depend on that choice;
:class:`Qwen2VLImageTextProcessor` is Qwen2-VL's processor without the video half, which needs
torchvision in this transformers version and which MIRE never uses.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (AutoTokenizer, BitsAndBytesConfig, Qwen2VLForConditionalGeneration,
                          Qwen2VLProcessor)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..config import ModelCfg, Profile
from ..data.labels import TASKS
from ..data.records import Record
from ..interference import Difference, LowRank
from ..threads import torch_threads
from .base import FitLog, Predictions, select_mix
from .hf_train import train_sft, with_step_budget
from .scoring import ScoreResult, generate_labels, score_records
from .sft import RecordEncoder, chat_messages, format_answer, format_prompt
from .tiny import tiny_model_dir

LM_MODULES = r".*language_model\.layers\.\d+\.(?:self_attn|mlp)\.(?:{names})"
VISION_MODULES = (
    r".*visual\.(?:blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:fc1|fc2))"
    r"|merger\.mlp\.(?:0|2))"
)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
META_FILE = "kdsl_qwen_vl.json"

class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor (text + images) without the video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


# --------------------------------------------------------------------------- loading
def _read_chat_template(src: str | Path) -> str | None:
    p = Path(src)
    if p.is_dir():
        if (p / "chat_template.jinja").is_file():
            return (p / "chat_template.jinja").read_text(encoding="utf-8")
        if (p / "chat_template.json").is_file():
            return json.loads((p / "chat_template.json").read_text(encoding="utf-8")).get(
                "chat_template"
            )
        return None
    try:  # a hub id: the processor's template file, where the hub can be reached
        path = hf_hub_download(str(src), "chat_template.json")
        return json.loads(Path(path).read_text(encoding="utf-8")).get("chat_template")
    except Exception:  # noqa: BLE001 - offline, gated, no such file: all mean "no template"
        return None


def load_processor(
    src: str | Path, *, min_pixels: int, max_pixels: int
) -> Qwen2VLImageTextProcessor:
    """Tokenizer + Qwen2-VL image processor (PIL backend) of ``src`` (hub id or directory),
    with the profile's pixel bounds."""
    tok = AutoTokenizer.from_pretrained(str(src))
    ip = Qwen2VLImageProcessorPil.from_pretrained(
        str(src), min_pixels=min_pixels, max_pixels=max_pixels
    )
    template = _read_chat_template(src) or getattr(tok, "chat_template", None)
    proc = Qwen2VLImageTextProcessor(image_processor=ip, tokenizer=tok, chat_template=template)
    check_chat_format(proc)
    return proc


def check_chat_format(processor, *, warn: bool = True) -> bool | None:
    """Does our hand-built chat format equal the model's own chat template? (None: no template)."""
    if not getattr(processor, "chat_template", None):
        return None
    sample = "Picture 1: <image>\n你好<image>请分类"
    try:
        rendered = processor.apply_chat_template(chat_messages(sample, "标签"), tokenize=False)
    except Exception as e:  # noqa: BLE001 - any template error: warn, never fail loading
        if warn:
            warnings.warn(
                f"could not render the model's chat template ({e}); using the "
                "built-in Qwen2-VL format",
                stacklevel=2,
            )
        return None
    ok = rendered == format_prompt(sample) + format_answer("标签")
    if not ok and warn:
        warnings.warn(
            "the model's chat template renders a MIRE turn differently from the "
            "built-in Qwen2-VL format (kdsl_utils.models.sft); training and scoring "
            "use the built-in one",
            stacklevel=2,
        )
    return ok


def _require_bitsandbytes() -> None:
    try:  # a GPU-only optional extra: imported only when 4-bit loading is asked for
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "finetune='qlora' needs bitsandbytes, a CUDA-only extra: pip install 'kdsl-utils[gpu]'"
        ) from e
    if not torch.cuda.is_available():
        raise RuntimeError("finetune='qlora' (4-bit bitsandbytes) needs a CUDA GPU")


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "this profile wants CUDA but no GPU is visible; use PROFILE=mini "
            "(CPU) or PROFILE=tiny (tests), or override device='cpu'"
        )
    return torch.device(device)


def quantization_config(mcfg: ModelCfg) -> BitsAndBytesConfig:
    """QLoRA's 4-bit base: NF4 with double quantisation, compute in the profile dtype; the
    vision tower and ``lm_head`` stay unquantised."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[mcfg.dtype],
        llm_int8_skip_modules=["visual", "lm_head"],
    )


def load_model(src: str | Path, mcfg: ModelCfg, *, device: str = "cpu"):
    """Qwen2VLForConditionalGeneration from ``src`` in the profile dtype (4-bit for qlora)."""
    dev = resolve_device(device)
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[mcfg.dtype],
        "attn_implementation": mcfg.attn_implementation,
    }
    if mcfg.finetune == "qlora":
        _require_bitsandbytes()
        kwargs["quantization_config"] = quantization_config(mcfg)
        kwargs["device_map"] = {"": dev.index or 0}
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(src), **kwargs)
    if mcfg.finetune != "qlora":
        model.to(dev)
    return model


def lora_target_regex(mcfg: ModelCfg) -> str:
    """peft ``target_modules`` regex: the LM projections (+ vision blocks when not frozen)."""
    rx = LM_MODULES.format(names="|".join(mcfg.lora_targets))
    return rx if mcfg.freeze_vision else f"(?:{rx})|(?:{VISION_MODULES})"


def prepare_for_finetune(
    model, mcfg: ModelCfg, *, gradient_checkpointing: bool = False, seed: int = 0
):
    """Apply the profile's fine-tuning mode; returns the (possibly peft-wrapped) model."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if mcfg.finetune == "full":
        for name, p in model.named_parameters():
            p.requires_grad_(not (mcfg.freeze_vision and ".visual." in f".{name}"))
        return model
    if mcfg.finetune not in ("lora", "qlora"):
        raise ValueError(f"unknown finetune mode {mcfg.finetune!r}; choose lora, full or qlora")
    if mcfg.finetune == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    elif gradient_checkpointing:
        model.enable_input_require_grads()
    lcfg = LoraConfig(
        r=mcfg.lora_r,
        lora_alpha=mcfg.lora_alpha,
        lora_dropout=mcfg.lora_dropout,
        target_modules=lora_target_regex(mcfg),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA A init is random: seed it so runs repeat
        return get_peft_model(model, lcfg)


def lora_factors(model) -> dict[str, LowRank]:
    """The LoRA update of every adapted layer in factored form ``ΔW = scaling·B·A``.

    Keys are the adapted modules' names in the base model (e.g.
    ``model.language_model.layers.0.self_attn.q_proj``), values :class:`LowRank` of float32
    CPU factors (r·(in + out) values per layer, never out × in). This is the update the
    seesaw analysis (:mod:`kdsl_utils.interference`) compares between the runs.
    """
    out: dict[str, LowRank] = {}
    for name, mod in model.named_modules():
        if not (hasattr(mod, "lora_A") and hasattr(mod, "lora_B") and hasattr(mod, "scaling")):
            continue
        for adapter in mod.lora_A:
            key = name.removeprefix("base_model.model.")
            if len(mod.lora_A) > 1:
                key = f"{key}[{adapter}]"
            out[key] = LowRank(
                B=mod.lora_B[adapter].weight.detach().to("cpu", torch.float32, copy=True),
                A=mod.lora_A[adapter].weight.detach().to("cpu", torch.float32, copy=True),
                scale=float(mod.scaling[adapter]),
            )
    if not out:
        raise ValueError(
            "the model has no LoRA adapters (full fine-tuning: compare weights "
            "against the base model instead)"
        )
    return out


def lora_deltas(model, *, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The dense LoRA updates ``ΔW = B·A·scaling`` (out × in CPU tensors), keyed as
    :func:`lora_factors`. Materialises every adapted matrix: for inspection of small models
    only (Qwen2-VL-7B: ~24 GiB); the interference analysis uses the factors."""
    return {
        k: ((f.B @ f.A) * f.scale).to(dtype) for k, f in lora_factors(model).items()
    }


def model_source(mcfg: ModelCfg, which: str = "large") -> str:
    if which not in ("large", "small"):
        raise ValueError(f"which must be 'large' or 'small', got {which!r}")
    return mcfg.large if which == "large" else mcfg.small


# --------------------------------------------------------------------------- backend
class QwenVLBackend:
    """:class:`~kdsl_utils.models.base.Backend` on Qwen2-VL (profiles ``paper`` and ``tiny``).

    ``fit`` always starts from the base model, so the three task mixes of the seesaw are
    three fine-tunes of one base with identical hyper-parameters (the profile's TrainCfg).
    The ``tiny`` twin never depends on the records passed to ``fit``/``predict_proba``: its
    tokenizer corpus is fixed (labels, templates, the synthetic generator's text material,
    plus ``corpus_records`` if given to the constructor) and its weights come from seed 0,
    so every mix and every seed starts from one base model (the run's seed varies the LoRA
    init and the data order). Without ``fit``, ``predict_proba`` scores with the base model
    (zero-shot).
    """

    def __init__(
        self,
        cfg: Profile,
        *,
        which: str = "large",
        cache_dir: Path | str | None = None,
        corpus_records: Sequence[Record] = (),
    ):
        if cfg.backend != "qwen_vl":
            raise ValueError(f"profile {cfg.name!r} uses backend {cfg.backend!r}, not qwen_vl")
        self.cfg = cfg
        self.which = which
        self.source = model_source(cfg.model, which)
        self.cache_dir = cache_dir
        self.corpus_records = tuple(corpus_records)
        self.base_path: str | None = None
        self._base_weights: dict[str, torch.Tensor] | None = None  # full FT: W0 for deltas
        self.model = None
        self.processor = None
        self.encoder: RecordEncoder | None = None
        self.fit_info: FitLog | None = None

    # ---- loading
    @property
    def is_tiny(self) -> bool:
        return self.source == "tiny"

    @property
    def _threads(self) -> int | None:
        """One torch thread for the tiny twin on the CPU (see :mod:`kdsl_utils.threads`);
        None (unchanged) elsewhere."""
        return 1 if self.is_tiny and self.cfg.device == "cpu" else None

    def _base(self) -> str:
        if self.base_path is None:
            if self.is_tiny:
                self.base_path = str(
                    tiny_model_dir(
                        self.corpus_records,
                        seed=0,
                        min_pixels=self.cfg.model.min_pixels,
                        max_pixels=self.cfg.model.max_pixels,
                        cache_dir=self.cache_dir,
                    )
                )
            else:
                self.base_path = self.source
        return self.base_path

    def _load(self) -> None:
        m = self.cfg.model
        src = self._base()
        self.processor = load_processor(src, min_pixels=m.min_pixels, max_pixels=m.max_pixels)
        self.encoder = RecordEncoder(
            self.processor,
            max_length=m.max_length,
            min_pixels=m.min_pixels,
            max_pixels=m.max_pixels,
        )
        self.model = load_model(src, m, device=self.cfg.device)

    # ---- Backend protocol
    def fit(
        self,
        train: Sequence[Record],
        *,
        mix: str,
        seed: int,
        out_dir: Path | None = None,
        resume: bool = True,
        progress: bool = True,
        targets: Mapping[str, str] | None = None,
        callbacks: Sequence[Any] = (),
        fingerprint_extra: str = "",
        steps: int | None = None,
    ) -> FitLog:
        """Fine-tune the base on ``mix`` of ``train``; returns loss curve, counts, wall time.

        ``steps``: None trains the profile's ``TrainCfg`` (its epochs, capped by its
        ``max_steps``); an int exactly that many optimizer steps
        (:func:`~.hf_train.with_step_budget`). ``targets``, ``callbacks`` and
        ``fingerprint_extra`` go to :func:`~.hf_train.train_sft` (per-record answer
        overrides: chain-of-thought post-training)."""
        tcfg = with_step_budget(self.cfg.train, steps)
        t0 = time.perf_counter()
        records = select_mix(train, mix)
        if not records:
            raise ValueError(f"no training records for mix {mix!r}")
        self._load()
        self._base_weights = None
        if self.cfg.model.finetune == "full":  # keep W0 of the adapted layers for update_delta
            self._base_weights = {
                name: mod.weight.detach().to("cpu", copy=True)
                for name, mod in self.model.named_modules()
                if isinstance(mod, torch.nn.Linear)
                and re.fullmatch(lora_target_regex(self.cfg.model), name)
            }
        self.model = prepare_for_finetune(
            self.model,
            self.cfg.model,
            seed=seed,
            gradient_checkpointing=tcfg.gradient_checkpointing,
        )
        with torch_threads(self._threads):
            result = train_sft(
                self.model,
                self.encoder,
                records,
                tcfg,
                seed=seed,
                out_dir=out_dir,
                resume=resume,
                device=self.cfg.device,
                bf16=self.cfg.model.dtype == "bfloat16",
                progress=progress,
                callbacks=callbacks,
                targets=targets,
                fingerprint_extra=fingerprint_extra,
            )
        self.model.eval()
        self.fit_info = FitLog(
            mix=mix, seed=seed, n_train=len(records), wall_s=time.perf_counter() - t0,
            losses=tuple(c["loss"] for c in result.loss_curve), steps=result.steps,
            extra={"n_used": result.n_examples, "loss_curve": result.loss_curve,
                   "train_wall_s": result.wall_s, "truncation": result.truncation,
                   "checkpoint_dir": result.checkpoint_dir, "resumed_from": result.resumed_from,
                   "loaded_finished": result.extra.get("loaded_finished"),
                   "trainable_params": result.trainable_params,
                   "epochs": result.extra.get("epochs"), "max_steps": tcfg.max_steps})
        return self.fit_info

    def _ensure(self) -> None:
        if self.model is None:  # zero-shot: the base model as it is
            self._load()
        self.model.eval()

    def predict_proba(
        self, records: Sequence[Record], *, length_norm: str | None = None
    ) -> Predictions:
        """Label scoring: a distribution over each record's candidates (pooled 48 columns)."""
        return self.score(records, length_norm=length_norm).predictions

    def score(
        self, records: Sequence[Record], *, length_norm: str | None = None, progress: bool = False
    ) -> ScoreResult:
        self._ensure()
        with torch_threads(self._threads):
            return score_records(
                self.model,
                self.encoder,
                records,
                length_norm=length_norm or self.cfg.model.length_norm,
                progress=progress,
            )

    def generate(
        self,
        records: Sequence[Record],
        *,
        constrained: bool = False,
        num_beams: int = 1,
        max_new_tokens: int | None = None,
        batch_size: int | None = None,
    ):
        """Free (or candidate-constrained) generation + label parsing."""
        self._ensure()
        with torch_threads(self._threads):
            return generate_labels(
                self.model,
                self.encoder,
                records,
                constrained=constrained,
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size or self.cfg.train.eval_batch_size,
            )

    def lora_deltas(self) -> dict[str, torch.Tensor]:
        if self.model is None:
            raise ValueError("no model: fit or load first")
        return lora_deltas(self.model)

    def update_delta(self) -> dict[str, LowRank | Difference]:
        """The fine-tune's weight update per adapted layer, for :mod:`kdsl_utils.interference`:
        LoRA/QLoRA factors (:func:`lora_factors`), or for full fine-tuning the pair (W, W0) of
        the same projection layers (W0 kept on the CPU at ``fit``; W copied to the CPU in the
        model dtype), subtracted layer by layer by the analysis, never all at once."""
        if self.model is None:
            raise ValueError("no model: fit or load first")
        if hasattr(self.model, "peft_config"):
            return lora_factors(self.model)
        if self._base_weights is None:
            raise ValueError("full fine-tune deltas need the base weights kept by fit()")
        mods = dict(self.model.named_modules())
        return {
            name: Difference(after=mods[name].weight.detach().to("cpu", copy=True), before=w0)
            for name, w0 in self._base_weights.items()
        }

    def update_inputs(self) -> dict[str, tuple[str, ...]]:
        """``Backend.update_inputs``, by construction: every adapted layer sits in the
        language model (or, with the vision tower unfrozen, in the tower, which both tasks'
        images pass: dialogues carry images too), so both tasks reach every block."""
        if self.model is None:
            raise ValueError("no model: fit or load first")
        names = (lora_factors(self.model) if hasattr(self.model, "peft_config")
                 else self._base_weights or {})
        return {name: TASKS for name in names}

    # ---- persistence
    def save(self, path: Path) -> None:
        """Adapter (or full weights), processor and metadata; the tiny twin's base is copied in."""
        if self.model is None:
            raise ValueError("nothing to save: fit first")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        base = self.base_path
        if self.is_tiny:
            shutil.copytree(self.base_path, path / "base", dirs_exist_ok=True)
            base = "base"
        is_peft = hasattr(self.model, "peft_config")
        self.model.save_pretrained(path / ("adapter" if is_peft else "model"))
        self.processor.tokenizer.save_pretrained(path / "processor")
        self.processor.image_processor.save_pretrained(path / "processor")
        if getattr(self.processor, "chat_template", None):
            (path / "processor" / "chat_template.json").write_text(
                json.dumps({"chat_template": self.processor.chat_template}, ensure_ascii=False),
                encoding="utf-8",
            )
        meta = {
            "source": self.source,
            "base": base,
            "which": self.which,
            "weights": "adapter" if is_peft else "model",
            "profile": self.cfg.name,
            "model_cfg": self.cfg.model.__dict__,
            "fit": self.fit_info.to_dict() if self.fit_info is not None else None,
        }
        (path / META_FILE).write_text(
            json.dumps(meta, ensure_ascii=False, indent=1, default=str), encoding="utf-8"
        )

    @classmethod
    def load(cls, path: Path, cfg: Profile) -> QwenVLBackend:
        """A backend saved by :meth:`save`, ready to predict."""
        path = Path(path)
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        self = cls(cfg, which=meta.get("which", "large"))
        base = meta["base"]
        self.base_path = str(path / base) if (path / base).is_dir() else base
        m = cfg.model
        self.processor = load_processor(
            path / "processor", min_pixels=m.min_pixels, max_pixels=m.max_pixels
        )
        self.encoder = RecordEncoder(
            self.processor,
            max_length=m.max_length,
            min_pixels=m.min_pixels,
            max_pixels=m.max_pixels,
        )
        if meta["weights"] == "adapter":
            self.model = PeftModel.from_pretrained(
                load_model(self.base_path, m, device=cfg.device), str(path / "adapter")
            )
        else:
            self.model = load_model(path / "model", m, device=cfg.device)
        self.model.eval()
        self.fit_info = FitLog(**meta["fit"]) if meta.get("fit") else None
        return self


def small_model_generator(
    cfg: Profile,
    records: Sequence[Record] = (),
    *,
    max_new_tokens: int | None = None,
    cache_dir: Path | str | None = None,
):
    """The small MLLM (``ModelCfg.small``) as text functions for the LLM rule proposer.

    Returns ``(generate, count_tokens)``: ``generate(prompt) -> str`` answers a text-only
    user turn greedily in the Qwen2-VL chat format (``<image>`` in the prompt is written as
    ``[图片]``: there are no pixels to show), ``count_tokens(text) -> int`` counts tokens with
    the model's tokenizer. ``records`` only extend the ``tiny`` twin's tokenizer corpus.
    ``max_new_tokens`` defaults to 1024 (64 for the tiny twin, whose output is noise anyway).
    """
    backend = QwenVLBackend(cfg, which="small", cache_dir=cache_dir, corpus_records=records)
    backend._ensure()
    model, tok, enc = backend.model, backend.processor.tokenizer, backend.encoder
    n_new = max_new_tokens or (64 if backend.is_tiny else 1024)
    eos = [enc.im_end_id, tok.convert_tokens_to_ids("<|endoftext|>")]
    dev = next(model.parameters()).device

    def generate(prompt: str) -> str:
        text = format_prompt(prompt.replace("<image>", "[图片]"))
        ids = torch.tensor([enc.tokenize(text)], device=dev)
        with torch.no_grad(), torch_threads(backend._threads):
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n_new,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=enc.pad_id,
            )
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    def count_tokens(text: str) -> int:
        return len(enc.tokenize(text))

    return generate, count_tokens
