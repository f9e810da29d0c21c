"""The ``paper`` profile's record encoder: NoteLLM-2's mICL + late fusion on Qwen2-VL.

``ReprCfg.encoder = "qwen_micl"`` (``paper``; ``tiny`` on the random twin of
:mod:`kdsl_utils.models.tiny`, so every line below runs in the tests). The model is loaded
through the qwen_vl backend's loaders (:func:`~kdsl_utils.models.qwen_vl.load_processor`,
:func:`~kdsl_utils.models.qwen_vl.load_model`: a hub id or a local path, ``ReprCfg.llm``
picks ``ModelCfg.large`` (7B) or ``ModelCfg.small`` (2B)) and adapted by
:func:`~kdsl_utils.models.qwen_vl.prepare_for_finetune` (the profile's LoRA).

**The mICL prompt of a MIRE record** (NoteLLM-2's template, its Chinese kept; no chat
template, as there)::

    笔记：{"图片":"<images>"}，压缩为一个词：“<IMG_EMB>”。笔记：{"内容":"<text>"}，压缩为一个词：“

``<images>`` is every image of the record, each as ``<|vision_start|><|image_pad|>…
<|vision_end|>``; ``<text>`` is empty for a screenshot and the dialogue for an intent
record (turns ``用户：…`` / ``客服：…`` joined by newlines, each inline image replaced by a
reference ``[图k]`` — the images themselves come first, compressed into one word, then the
turns into one word). ``<IMG_EMB>`` is plain text: under causal attention nothing after a
position changes its hidden state, so the marker only has to be fixed, not special.

- the **visual embedding** ``h_v`` is the last-layer hidden state at the position just before
  ``<IMG_EMB>`` (the ``“`` that opens the image's compression word): it has seen the image
  part only (NoteLLM-2: the position before the image compression token);
- the **multimodal embedding** ``h`` is the last token's hidden state (the ``“`` that opens
  the note's compression word).

**Late fusion** (:class:`FusionHead`): ``v`` = the vision tower's output before the merger,
mean-pooled over each image's patches and over the record's images (zeros without an
image), projected to the LLM width by a bias-free linear map (NoteLLM-2's late-fusion
projection); ``e = Gate(h, P(v))`` with the shared :class:`~kdsl_utils.contrastive.Gate`, and
``e_v = Gate(h_v, P(v))`` as NoteLLM-2 gates both.

**Training** (:meth:`MiclEncoder.train`): a fresh LoRA adapter per variant (peft named
adapters on one loaded base, so the five variants share one copy of the weights), the head
and the temperature trained with AdamW on the in-batch contrastive loss
(:func:`~kdsl_utils.contrastive.contrastive_loss`) of L2-normalised embeddings over
related pairs (:func:`~kdsl_utils.contrastive.partners`: a record's turn-dropout copy, else
a record of its label): ``L(e) + visual_loss_weight · L(e_v)``, the visual-side term over
the batch's records that have an image.

**Variants** (the flags of :data:`~kdsl_utils.contrastive.VARIANTS`, read for an LLM):

==================  ==========================================================
``full``            mICL prompt, late fusion, both losses
``no_micl``         one note ``笔记：{"图片":…,"内容":…}，压缩为一个词：“`` (NoteLLM-2's
                    plain prompt), last-token embedding, late fusion
``no_late_fusion``  mICL prompt, ``e = h`` (no gate, no tower features), both losses
``text_only``       the note without images (the LLM reads no pixels, no gate):
                    every screenshot gets the same embedding, by construction
``image_only``      the note with its images and empty text (NoteLLM-2's only-image
                    prompt), late fusion
==================  ==========================================================

Long prompts: the text is the only thing cut, images never lose tokens to text. Over
``ModelCfg.max_length`` the images' pixel budget is halved (down to ``min_pixels``), then
characters are cut from the start of the dialogue (the latest turns are kept);
:attr:`MiclPrompt.status` says which rule applied.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import Profile, ReprCfg
from ..contrastive import VARIANTS, Gate, Variant, contrastive_loss, partners, temperature
from ..data.labels import LABEL_INDEX
from ..data.records import IMAGE_TOKEN, Record
from ..threads import torch_threads
from .qwen_vl import load_model, load_processor, model_source, prepare_for_finetune
from .sft import VISION_END, VISION_START, RecordEncoder, load_image
from .tiny import tiny_model_dir

NOTE = "笔记："
COMPRESS = "，压缩为一个词：“"  # the prompt ends here: the next word would be the compression
IMG_EMB = "<IMG_EMB>"
_VISUAL = object()  # marks, inside a prompt's parts, the position of the visual embedding

VARIANT_NAMES = {
    "full": "mICL + late fusion (Qwen2-VL)",
    "no_micl": "without mICL (one note, last token)",
    "no_late_fusion": "mICL without late fusion",
    "text_only": "text only (no pixels)",
    "image_only": "images only (empty text) + late fusion",
}


def note_text(record: Record) -> str:
    """The record's text for the note: ``""`` for a screenshot; for a dialogue its turns
    ``role：text`` joined by newlines, the k-th inline image as ``[图k]``."""
    lines, k = [], 0
    for t in record.turns:
        pieces = t.text.split(IMAGE_TOKEN)
        text = pieces[0]
        for piece in pieces[1:]:
            k += 1
            text += f"[图{k}]" + piece
        lines.append(f"{t.role}：{text}")
    return "\n".join(lines)


def prompt_parts(images: Sequence[Path], text: str, variant: Variant) -> list:
    """The prompt as parts: strings, image paths, and :data:`_VISUAL` after the token whose
    hidden state is the visual embedding (see the module docstring for the three shapes)."""
    head = NOTE + '{"图片":"'
    if variant.visual and variant.micl:
        return [head, *images, '"}' + COMPRESS, _VISUAL,
                IMG_EMB + "”。" + NOTE + '{"内容":"' + text + '"}' + COMPRESS]
    if variant.visual:
        return [head, *images, '","内容":"' + text + '"}' + COMPRESS]
    return [NOTE + '{"内容":"' + text + '"}' + COMPRESS]


@dataclass(frozen=True)
class MiclPrompt:
    """One record's planned prompt: token ids (one ``<|image_pad|>`` per visual token)."""

    record_id: str
    input_ids: tuple[int, ...]
    visual_pos: int  # index of the visual-embedding token; -1: the prompt has no image part
    images: tuple[Path, ...]
    max_pixels: int  # pixel budget of its images (lowered by the "downscale" rule)
    status: str  # "full" | "downscale" | "text" | "over_limit"

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class MiclInputs:
    """The encoder's inputs: the records themselves (the model reads them), aligned as
    :class:`~kdsl_utils.record_encoder.ReprInputs` are for the CPU recipe."""

    records: list[Record]

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def take(self, rows: Sequence[int]) -> MiclInputs:
        return MiclInputs([self.records[i] for i in rows])


class FusionHead(nn.Module):
    """Late fusion over the LLM embedding: ``P`` (vision width -> LLM width, bias-free),
    the :class:`~kdsl_utils.contrastive.Gate`, and the learnable temperature ``log(1/τ)``.
    Without late fusion it passes ``h`` through (and only the temperature trains)."""

    def __init__(self, hidden: int, vision_dim: int, tau: float, late_fusion: bool):
        super().__init__()
        self.proj = nn.Linear(vision_dim, hidden, bias=False) if late_fusion else None
        self.gate = Gate(hidden) if late_fusion else None
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / tau))))

    def forward(self, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(b, hidden) LLM states and (b, vision_dim) pooled tower features -> (b, hidden)."""
        return self.gate(h, self.proj(v)) if self.gate is not None else h


@dataclass
class MiclRepresentation:
    """One trained variant: its LoRA adapter on the shared base, its head, its losses.
    ``embed`` / ``temperature`` / ``losses`` / ``wall_s`` are what notebook 04 reads, as
    for :class:`~kdsl_utils.record_encoder.Representation`."""

    variant_name: str
    encoder: MiclEncoder
    adapter: str
    head: FusionHead
    losses: list[float] = field(default_factory=list)  # mean loss per epoch
    step_losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def variant(self) -> Variant:
        return VARIANTS[self.variant_name]

    @property
    def temperature(self) -> float:
        return temperature(self.head.logit_scale)

    def embed(self, x: MiclInputs) -> np.ndarray:
        """(n, hidden) L2-normalised multimodal embeddings, float32."""
        return self.encoder.embed(self, x.records)


def micl_source(cfg: Profile) -> str:
    """The hub id / local path of the model the encoder loads (``"tiny"``: the twin)."""
    return model_source(cfg.model, cfg.repr.llm)


class MiclEncoder:
    """A loaded Qwen2-VL with the profile's LoRA, shared by every variant of a run.

    ``train(records, x, variant_name, rc, seed=)`` has the signature of
    :func:`kdsl_utils.record_encoder.train`, so ``run_representations`` drives both
    encoders the same way.
    """

    def __init__(self, cfg: Profile, *, cache_dir: Path | str | None = None,
                 progress: bool = False):
        m, rc = cfg.model, cfg.repr
        if m.finetune not in ("lora", "qlora"):  # one base, one named adapter per variant
            raise ValueError(f"repr.encoder='qwen_micl' trains LoRA adapters; model.finetune="
                             f"{m.finetune!r} is not supported (use 'lora' or 'qlora')")
        self.cfg, self.progress = cfg, progress
        self.source = micl_source(cfg)
        self.is_tiny = self.source == "tiny"
        # the tiny twin's tokenizer corpus is the fixed one (no records): any text encodes
        src = (str(tiny_model_dir(min_pixels=m.min_pixels, max_pixels=m.max_pixels,
                                  cache_dir=cache_dir)) if self.is_tiny else self.source)
        self.processor = load_processor(src, min_pixels=m.min_pixels, max_pixels=m.max_pixels)
        self.tokens = RecordEncoder(self.processor, max_length=m.max_length,
                                    min_pixels=m.min_pixels, max_pixels=m.max_pixels)
        tok = self.processor.tokenizer
        self.vision_start, self.vision_end = tok.convert_tokens_to_ids([VISION_START, VISION_END])
        base = load_model(src, m, device=cfg.device)
        self.device = next(base.parameters()).device
        self.hidden = int(base.config.text_config.hidden_size)
        self.vision_dim = int(base.config.vision_config.embed_dim)
        self.merge = int(base.config.vision_config.spatial_merge_size)
        self.lm = base.model  # Qwen2VLModel; peft injects its LoRA layers into it in place
        self.peft = prepare_for_finetune(base, m, gradient_checkpointing=cfg.train.gradient_checkpointing,
                                         seed=0)
        self.intent_images = rc.intent_images
        self._n_adapters = 0
        self._prompts: dict[tuple, MiclPrompt] = {}

    # ---- prompts
    def _ids(self, parts: list, max_pixels: int) -> tuple[list[int], int]:
        ids, vis = [], -1
        for p in parts:
            if p is _VISUAL:
                vis = len(ids) - 1
            elif isinstance(p, Path):
                n = self.tokens.n_image_tokens(p, max_pixels)
                ids += [self.vision_start] + [self.tokens.image_token_id] * n + [self.vision_end]
            else:
                ids += self.tokens.tokenize(p)
        return ids, vis

    def prompt(self, record: Record, variant: Variant) -> MiclPrompt:
        """The planned mICL prompt of ``record`` under ``variant`` (cached per record id)."""
        key = (record.id, record.instruction, tuple(record.images), variant)
        if key in self._prompts:
            return self._prompts[key]
        reads_images = variant.visual and (record.task == "image" or self.intent_images)
        images = tuple(record.images) if reads_images else ()
        text = note_text(record) if variant.text else ""
        lo, limit = self.tokens.min_pixels, self.tokens.max_length
        max_px, status = self.tokens.max_pixels, "full"
        ids, vis = self._ids(prompt_parts(images, text, variant), max_px)
        while len(ids) > limit and images and max_px > lo:
            max_px, status = max(lo, max_px // 2), "downscale"
            ids, vis = self._ids(prompt_parts(images, text, variant), max_px)
        while len(ids) > limit and text:
            text, status = text[max(1, len(ids) - limit):], "text"  # keep the latest turns
            ids, vis = self._ids(prompt_parts(images, text, variant), max_px)
        if len(ids) > limit:
            status = "over_limit"
        out = MiclPrompt(record.id, tuple(ids), vis, images, max_px, status)
        self._prompts[key] = out
        return out

    # ---- forward
    def _pixels(self, prompts: Sequence[MiclPrompt]):
        """Concatenated ``pixel_values`` and ``image_grid_thw`` of the prompts' images (in
        order), and the record index of every image; (None, None, []) without images."""
        pv, grids, owner = [], [], []
        ip = self.processor.image_processor
        for i, p in enumerate(prompts):
            if not p.images:
                continue
            out = ip(images=[load_image(x) for x in p.images], return_tensors="pt",
                     size={"shortest_edge": self.tokens.min_pixels, "longest_edge": p.max_pixels})
            n_vis = int((out["image_grid_thw"].prod(-1) // self.merge ** 2).sum())
            if n_vis != p.input_ids.count(self.tokens.image_token_id):
                raise RuntimeError(f"record {p.record_id}: planned "
                                   f"{p.input_ids.count(self.tokens.image_token_id)} visual "
                                   f"tokens, the image processor gave {n_vis}")
            pv.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
            owner += [i] * len(p.images)
        if not pv:
            return None, None, []
        return torch.cat(pv), torch.cat(grids), owner

    def hidden_states(self, prompts: Sequence[MiclPrompt]):
        """One batched forward (right padding). Returns float32 tensors on the device:
        ``h`` (b, hidden) last token, ``h_v`` (b, hidden) at ``visual_pos`` (zeros where -1),
        ``v`` (b, vision_dim) pooled tower features (zeros without images), and ``has_image``
        (b,) bool."""
        b, n = len(prompts), max(p.n_tokens for p in prompts)
        ids = torch.full((b, n), self.tokens.pad_id, dtype=torch.long)
        mask = torch.zeros((b, n), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :p.n_tokens] = torch.tensor(p.input_ids)
            mask[i, :p.n_tokens] = 1
        kwargs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                  "mm_token_type_ids": (self.tokens.mm_token_type_ids(ids) * mask).to(self.device)}
        v = torch.zeros((b, self.vision_dim), device=self.device)
        pv, grid, owner = self._pixels(prompts)
        if pv is not None:
            grid = grid.to(self.device)
            frozen = self.cfg.model.freeze_vision
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                vis = self.lm.get_image_features(pv.to(self.device), grid, return_dict=True)
            # per image: the mean of its patches before the merger; per record: over its images
            per_image = torch.stack([t.float().mean(0) for t in
                                     torch.split(vis.last_hidden_state, grid.prod(-1).tolist())])
            own = torch.tensor(owner, device=self.device)
            v = v.index_add(0, own, per_image) / torch.bincount(own, minlength=b).clamp(min=1)[:, None]
            kwargs |= {"image_grid_thw": grid, "mm_encoder_outputs": {"image": vis}}
        hs = self.lm(**kwargs).last_hidden_state.float()
        rows = torch.arange(b, device=self.device)
        last = torch.tensor([p.n_tokens - 1 for p in prompts], device=self.device)
        vpos = torch.tensor([max(p.visual_pos, 0) for p in prompts], device=self.device)
        has_vpos = torch.tensor([p.visual_pos >= 0 for p in prompts], device=self.device)
        h_v = hs[rows, vpos] * has_vpos[:, None]
        has_image = torch.tensor([bool(p.images) for p in prompts], device=self.device)
        return hs[rows, last], h_v, v, has_image

    def _embeddings(self, rep: MiclRepresentation, records: Sequence[Record]):
        """(e, e_v, has_image): L2-normalised multimodal / visual embeddings of a batch."""
        prompts = [self.prompt(r, rep.variant) for r in records]
        h, h_v, v, has_image = self.hidden_states(prompts)
        e = nn.functional.normalize(rep.head(h, v), dim=1)
        e_v = nn.functional.normalize(rep.head(h_v, v), dim=1)
        return e, e_v, has_image

    def _threads(self):
        return torch_threads(1 if self.is_tiny and self.device.type == "cpu" else None)

    # ---- representation, loss, step
    def activate(self, adapter: str) -> None:
        if self.peft.active_adapter != adapter:
            self.peft.set_adapter(adapter)

    def new_representation(self, variant_name: str, rc: ReprCfg, *, seed: int) -> MiclRepresentation:
        """A fresh LoRA adapter (seeded init, LoRA's B = 0: the base model's embedding) and a
        fresh head for ``variant_name``, made the active adapter."""
        variant = VARIANTS[variant_name]
        self._n_adapters += 1
        name = f"micl{self._n_adapters}_{variant_name}"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.peft.add_adapter(name, copy.deepcopy(self.peft.peft_config["default"]))
            head = FusionHead(self.hidden, self.vision_dim, rc.temperature,
                              variant.visual and variant.late_fusion).to(self.device)
        self.peft.set_adapter(name)
        return MiclRepresentation(variant_name, self, name, head)

    def parameters(self, rep: MiclRepresentation) -> list[nn.Parameter]:
        """What trains for ``rep``: its adapter's LoRA weights and its head."""
        lora = [p for n, p in self.peft.named_parameters() if f".{rep.adapter}." in n]
        for p in lora:
            p.requires_grad_(True)
        return lora + list(rep.head.parameters())

    def batch_loss(self, rep: MiclRepresentation, records: Sequence[Record], rc: ReprCfg) -> torch.Tensor:
        """``L(e) + visual_loss_weight · L(e_v)`` of one batch (the visual term with mICL and
        a visual side, over the records that have an image)."""
        self.activate(rep.adapter)
        y = torch.tensor([LABEL_INDEX[r.label] for r in records], device=self.device)
        e, e_v, has_image = self._embeddings(rep, records)
        loss = contrastive_loss(e, y, rep.head.logit_scale)
        vt = rep.variant
        if vt.micl and vt.visual and rc.visual_loss_weight and int(has_image.sum()) > 1:
            loss = loss + rc.visual_loss_weight * contrastive_loss(e_v[has_image], y[has_image],
                                                                   rep.head.logit_scale)
        return loss

    def train(self, records: Sequence[Record], x: MiclInputs, variant_name: str, rc: ReprCfg, *,
              seed: int) -> MiclRepresentation:
        """Train one variant on labelled ``records`` (``x`` holds the same records):
        ``llm_epochs`` epochs (at most ``llm_max_steps`` steps) of ``llm_batch_size``
        anchors, each with one related record."""
        if any(r.label is None for r in records):
            raise ValueError("representation training needs labelled records")
        if [r.id for r in records] != x.ids:
            raise ValueError("records and inputs are not aligned")
        t0 = time.perf_counter()
        rep = self.new_representation(variant_name, rc, seed=seed)
        opt = torch.optim.AdamW(self.parameters(rep), lr=rc.llm_learning_rate,
                                weight_decay=rc.weight_decay)
        rng = np.random.default_rng(seed)
        recs, n, steps = list(records), len(records), 0
        n_batches = -(-n // rc.llm_batch_size)
        total = rc.llm_epochs * n_batches
        if rc.llm_max_steps > 0:
            total = min(total, rc.llm_max_steps)
        bar = tqdm(total=total, desc=f"mICL {variant_name}", disable=not self.progress)
        self.peft.train()
        with self._threads():
            for _ in range(rc.llm_epochs):
                perm, partner = rng.permutation(n), partners(recs, rng)
                tot, seen = 0.0, 0
                for j in range(0, n, rc.llm_batch_size):
                    if steps == total:
                        break
                    a = perm[j:j + rc.llm_batch_size]
                    loss = self.batch_loss(rep, [recs[i] for i in np.concatenate([a, partner[a]])], rc)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
                    rep.step_losses.append(loss.item())
                    tot, seen = tot + loss.item() * len(a), seen + len(a)
                    bar.update()
                if seen:
                    rep.losses.append(tot / seen)
        bar.close()
        self.peft.eval()
        rep.wall_s = time.perf_counter() - t0
        return rep

    @torch.inference_mode()
    def embed(self, rep: MiclRepresentation, records: Sequence[Record]) -> np.ndarray:
        """(n, hidden) float32 L2-normalised multimodal embeddings of ``records`` under ``rep``."""
        self.activate(rep.adapter)
        self.peft.eval()
        bs = 2 * self.cfg.repr.llm_batch_size
        out = np.zeros((len(records), self.hidden), dtype=np.float32)
        with self._threads():
            for j in range(0, len(records), bs):
                e, _, _ = self._embeddings(rep, records[j:j + bs])
                out[j:j + bs] = e.cpu().numpy()
        return out
