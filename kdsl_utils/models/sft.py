"""The supervised fine-tuning data path of the qwen_vl backend (``paper`` and ``tiny`` profiles).

One MIRE record becomes one Qwen2-VL chat turn pair::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n{instruction, each <image> -> <|vision_start|><|image_pad|><|vision_end|>}<|im_end|>\\n
    <|im_start|>assistant\\n{label}<|im_end|>\\n

which is exactly what Qwen2-VL's own chat template renders for a user message whose content
is the instruction's text pieces and images in placeholder order (the challenge's baseline,
LLaMA-Factory's ``qwen2_vl`` template, renders the same string). :func:`chat_messages` builds
that message list, and a test checks the two renderings are identical.

Decisions
---------
* **Tokenisation.** The prompt (everything up to and including ``assistant\\n``) and the answer
  are tokenised separately and concatenated. Qwen2's pre-tokeniser splits at the newline and
  at special tokens, so this equals tokenising the whole string (tested on every label); it
  makes the answer span exact by construction.
* **Label masking.** ``labels`` is ``-100`` everywhere except the answer tokens and the
  end-of-turn ``<|im_end|>`` that follows them: the model learns the label and to stop. The
  trailing ``\\n`` of the template is masked.
* **Truncation never cuts image tokens.** A prompt is planned (:meth:`RecordEncoder.plan`)
  before any pixel is processed, from image sizes alone (``smart_resize`` arithmetic), so the
  visual-token count of every image is known. When prompt + the longest candidate answer
  exceeds ``max_length``, these rules apply in order, each only while still over the limit:

  1. ``turns``: drop the oldest dialogue turns (a turn is a speaker line with its
     continuation lines; images shown in it go with it). The last customer turn and
     everything after it are kept. The instruction head, the prompt tail and the candidate
     label list are never touched.
  2. ``downscale``: lower this record's ``max_pixels`` (halving, down to ``min_pixels``):
     every remaining image keeps all its tokens, just fewer of them.
  3. ``text``: cut characters from the start of the remaining dialogue text, skipping over
     ``<image>`` placeholders (which are never cut).
  4. ``over_limit``: what is left (head + tail + labels + images at ``min_pixels``) still does
     not fit. Training drops such records; scoring keeps them in their reduced form. They are
     counted in :class:`TruncationReport` and should be zero in practice.

  The plan depends only on the prompt and the candidate list, never on the gold label, so a
  record gets the identical prompt at training and at prediction time.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..data.images import load_rgb
from ..data.prompts import DIALOGUE_END, DIALOGUE_START
from ..data.records import AGENT, IMAGE_TOKEN, USER, Record

SYSTEM_PROMPT = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END
IGNORE_INDEX = -100
_TURN_LINE = re.compile(rf"^({USER}|{AGENT})[:：]")

STATUSES = ("full", "turns", "downscale", "text", "over_limit")


# --------------------------------------------------------------------------- formatting
def user_content(instruction: str) -> str:
    """The user message text: the instruction with each ``<image>`` as a vision placeholder."""
    return instruction.replace(IMAGE_TOKEN, VISION_PLACEHOLDER)


def format_prompt(instruction: str, system: str | None = SYSTEM_PROMPT) -> str:
    """Chat prompt up to and including the assistant header (the generation prompt)."""
    sys_part = f"{IM_START}system\n{system}{IM_END}\n" if system is not None else ""
    return f"{sys_part}{IM_START}user\n{user_content(instruction)}{IM_END}\n{IM_START}assistant\n"


def format_answer(label: str) -> str:
    """The assistant turn after the header: ``label<|im_end|>\\n``."""
    return f"{label}{IM_END}\n"


def chat_messages(
    instruction: str, label: str | None = None, system: str | None = SYSTEM_PROMPT
) -> list[dict[str, Any]]:
    """The same turn as a chat-template message list (images as content items, in order)."""
    content: list[dict[str, Any]] = []
    for k, piece in enumerate(instruction.split(IMAGE_TOKEN)):
        if k:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    msgs: list[dict[str, Any]] = []
    if system is not None:
        msgs.append({"role": "system", "content": [{"type": "text", "text": system}]})
    msgs.append({"role": "user", "content": content})
    if label is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": label}]})
    return msgs


def load_image(path: Path | str) -> Image.Image:
    return load_rgb(path)  # the one decoder: upright, 8-bit RGB, alpha on white


def image_size(path: Path | str) -> tuple[int, int]:
    """(height, width) from the image header, without decoding pixels."""
    with Image.open(path) as im:
        w, h = im.size
    return h, w


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen2-VL's resize rule (identical to transformers' ``smart_resize``; tested against it)."""
    import math

    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# --------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class PromptPlan:
    """What one record's prompt will be, decided before any pixel is processed."""

    record_id: str
    instruction: str  # possibly shortened instruction (``<image>`` placeholders kept)
    text: str  # the chat prompt, one <|image_pad|> per image
    images: tuple[Path, ...]
    image_tokens: tuple[int, ...]  # visual tokens per image at ``max_pixels``
    max_pixels: int
    n_tokens: int  # prompt tokens, images expanded
    status: str = "full"  # most severe rule applied, one of STATUSES
    turns_dropped: int = 0
    images_dropped: int = 0
    chars_cut: int = 0


@dataclass
class TruncationReport:
    """How many records each truncation rule touched (a record counts once per rule it needed)."""

    n: int = 0
    by_status: Counter = field(default_factory=Counter)
    turns_dropped: int = 0
    images_dropped: int = 0
    chars_cut: int = 0
    n_turns: int = 0  # records that lost turns
    n_downscaled: int = 0
    n_text_cut: int = 0
    n_over_limit: int = 0
    over_limit_ids: list[str] = field(default_factory=list)
    dropped_ids: list[str] = field(default_factory=list)  # removed from training

    def add(self, plan: PromptPlan, rules: Sequence[str]) -> None:
        self.n += 1
        self.by_status[plan.status] += 1
        self.turns_dropped += plan.turns_dropped
        self.images_dropped += plan.images_dropped
        self.chars_cut += plan.chars_cut
        self.n_turns += "turns" in rules
        self.n_downscaled += "downscale" in rules
        self.n_text_cut += "text" in rules
        if "over_limit" in rules:
            self.n_over_limit += 1
            self.over_limit_ids.append(plan.record_id)

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "full": self.by_status.get("full", 0),
            "n_turns_dropped": self.n_turns,
            "n_downscaled": self.n_downscaled,
            "n_text_cut": self.n_text_cut,
            "n_over_limit": self.n_over_limit,
            "n_dropped": len(self.dropped_ids),
            "turns_dropped": self.turns_dropped,
            "images_dropped": self.images_dropped,
            "chars_cut": self.chars_cut,
            "over_limit_ids": list(self.over_limit_ids),
        }


def _split_dialogue(instruction: str) -> tuple[str, list[str], str] | None:
    """(head, turn blocks, tail) with ``head + "".join(blocks) + tail == instruction``."""
    s = instruction.find(DIALOGUE_START)
    e = instruction.find(DIALOGUE_END)
    if s < 0 or e < s:
        return None
    body_start = s + len(DIALOGUE_START)
    if instruction.startswith("\n", body_start):
        body_start += 1
    head, body, tail = instruction[:body_start], instruction[body_start:e], instruction[e:]
    blocks: list[str] = []
    for line in body.splitlines(keepends=True):
        if _TURN_LINE.match(line) or not blocks:
            blocks.append(line)
        else:
            blocks[-1] += line
    return head, blocks, tail


def _cut_text(body: str, k: int) -> str:
    """``body`` without its first ``k`` non-placeholder characters (placeholders all kept)."""
    out, left = [], k
    for j, piece in enumerate(body.split(IMAGE_TOKEN)):
        if j:
            out.append(IMAGE_TOKEN)
        drop = min(left, len(piece))
        left -= drop
        out.append(piece[drop:])
    return "".join(out)


class RecordEncoder:
    """Turns records into model inputs with a Qwen2-VL processor, under a token budget.

    ``max_length`` bounds prompt + the longest candidate answer (+ ``<|im_end|>\\n``), so
    both training sequences and label-scoring sequences fit.
    """

    def __init__(
        self,
        processor,
        *,
        max_length: int,
        min_pixels: int,
        max_pixels: int,
        system: str | None = SYSTEM_PROMPT,
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        ip = processor.image_processor
        self.patch = int(ip.patch_size)
        self.merge = int(ip.merge_size)
        self.max_length = int(max_length)
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.system = system
        tok = self.tokenizer
        self.image_token_id = tok.convert_tokens_to_ids(IMAGE_PAD)
        self.video_token_id = tok.convert_tokens_to_ids(VIDEO_PAD)
        self.im_end_id = tok.convert_tokens_to_ids(IM_END)
        self.pad_id = (
            tok.pad_token_id
            if tok.pad_token_id is not None
            else tok.convert_tokens_to_ids("<|endoftext|>")
        )
        self._newline_ids = self.tokenize("\n")
        self._size_cache: dict[Path, tuple[int, int]] = {}
        self._label_cache: dict[str, list[int]] = {}

    # ---- tokens
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def label_ids(self, label: str) -> list[int]:
        """Answer tokens of ``label`` followed by ``<|im_end|>`` (what is trained and scored)."""
        if label not in self._label_cache:
            self._label_cache[label] = self.tokenize(label) + [self.im_end_id]
        return self._label_cache[label]

    def answer_reserve(self, candidates: Sequence[str]) -> int:
        """Tokens to keep free after the prompt: the longest candidate + ``<|im_end|>\\n``."""
        return max((len(self.label_ids(c)) for c in candidates), default=1) + len(self._newline_ids)

    def n_image_tokens(self, path: Path, max_pixels: int | None = None) -> int:
        if path not in self._size_cache:
            self._size_cache[path] = image_size(path)
        h, w = self._size_cache[path]
        rh, rw = smart_resize(
            h, w, self.patch * self.merge, self.min_pixels, max_pixels or self.max_pixels
        )
        return (rh // self.patch) * (rw // self.patch) // (self.merge**2)

    def _measure(
        self, instruction: str, images: Sequence[Path], max_pixels: int
    ) -> tuple[str, tuple[int, ...], int]:
        text = format_prompt(instruction, self.system)
        img_tok = tuple(self.n_image_tokens(p, max_pixels) for p in images)
        return text, img_tok, len(self.tokenize(text)) + sum(n - 1 for n in img_tok)

    # ---- planning
    def plan(self, record: Record) -> PromptPlan:
        """The prompt of ``record`` under the budget (see the module docstring for the rules)."""
        return self._plan(record)[0]

    def _plan(self, record: Record) -> tuple[PromptPlan, list[str]]:
        budget = self.max_length - self.answer_reserve(record.candidates)
        images = list(record.images)
        if record.instruction.count(IMAGE_TOKEN) != len(images):
            raise ValueError(
                f"record {record.id}: {record.instruction.count(IMAGE_TOKEN)} <image> "
                f"placeholders but {len(images)} images"
            )
        instruction, max_px = record.instruction, self.max_pixels
        text, img_tok, n = self._measure(instruction, images, max_px)
        rules: list[str] = []
        turns_dropped = images_dropped = chars_cut = 0
        parts = _split_dialogue(instruction) if n > budget else None

        # 1. drop the oldest turns, keeping the last customer turn and what follows it
        if parts is not None and n > budget:
            head, blocks, tail = parts
            user_idx = [i for i, b in enumerate(blocks) if b.startswith(USER)]
            keep_from = user_idx[-1] if user_idx else len(blocks) - 1
            head_imgs = head.count(IMAGE_TOKEN)
            while keep_from > 0 and n > budget:
                dropped = blocks.pop(0)
                keep_from -= 1
                k = dropped.count(IMAGE_TOKEN)
                del images[head_imgs : head_imgs + k]
                turns_dropped += 1
                images_dropped += k
                instruction = head + "".join(blocks) + tail
                text, img_tok, n = self._measure(instruction, images, max_px)
            if turns_dropped:
                rules.append("turns")
            parts = head, blocks, tail

        # 2. downscale this record's images (whole images, fewer tokens each)
        while n > budget and images and max_px > self.min_pixels:
            max_px = max(self.min_pixels, max_px // 2)
            text, img_tok, n = self._measure(instruction, images, max_px)
            if "downscale" not in rules:
                rules.append("downscale")

        # 3. cut dialogue text from its start, never a placeholder
        if n > budget and parts is not None:
            head, blocks, tail = parts
            body = "".join(blocks)
            n_chars = len(body) - body.count(IMAGE_TOKEN) * len(IMAGE_TOKEN)

            def size(k: int) -> int:
                return self._measure(head + _cut_text(body, k) + tail, images, max_px)[2]

            lo, hi = 0, n_chars  # smallest k with size(k) <= budget (binary search, then verify)
            if size(hi) <= budget:
                while lo < hi:
                    mid = (lo + hi) // 2
                    if size(mid) <= budget:
                        hi = mid
                    else:
                        lo = mid + 1
            k = hi
            while k < n_chars and size(k) > budget:  # token counts are near-monotone in k
                k += 1
            chars_cut = k
            instruction = head + _cut_text(body, k) + tail
            text, img_tok, n = self._measure(instruction, images, max_px)
            rules.append("text")

        if n > budget:
            rules.append("over_limit")
        status = rules[-1] if rules else "full"
        plan = PromptPlan(
            record_id=record.id,
            instruction=instruction,
            text=text,
            images=tuple(images),
            image_tokens=img_tok,
            max_pixels=max_px,
            n_tokens=n,
            status=status,
            turns_dropped=turns_dropped,
            images_dropped=images_dropped,
            chars_cut=chars_cut,
        )
        assert plan.instruction.count(IMAGE_TOKEN) == len(plan.images)
        return plan, rules

    def plan_all(self, records: Sequence[Record]) -> tuple[list[PromptPlan], TruncationReport]:
        report, plans = TruncationReport(), []
        for r in records:
            plan, rules = self._plan(r)
            report.add(plan, rules)
            plans.append(plan)
        return plans, report

    # ---- encoding
    def encode(self, plan: PromptPlan, answer: str | None = None) -> dict[str, Any]:
        """Model inputs of one planned prompt (+ the answer and its labels when given).

        Returns 1-D ``input_ids``/``labels`` tensors, ``pixel_values``/``image_grid_thw`` (or
        None without images) and ``prompt_len``.
        """
        imgs = [load_image(p) for p in plan.images]
        kwargs: dict[str, Any] = {}
        if imgs:
            kwargs = {
                "images": imgs,
                "size": {"shortest_edge": self.min_pixels, "longest_edge": plan.max_pixels},
            }
        out = self.processor(text=[plan.text], return_tensors="pt", **kwargs)
        ids = out["input_ids"][0]
        n_img = int((ids == self.image_token_id).sum())
        if n_img != sum(plan.image_tokens) or len(ids) != plan.n_tokens:
            raise RuntimeError(
                f"record {plan.record_id}: planned {plan.n_tokens} tokens "
                f"({sum(plan.image_tokens)} visual), processor gave {len(ids)} ({n_img})"
            )
        prompt_len = len(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        if answer is not None:
            ans = torch.tensor(self.label_ids(answer), dtype=ids.dtype)
            nl = torch.tensor(self._newline_ids, dtype=ids.dtype)
            ids = torch.cat([ids, ans, nl])
            labels = torch.cat([labels, ans, torch.full_like(nl, IGNORE_INDEX)])
        return {
            "input_ids": ids,
            "labels": labels,
            "prompt_len": prompt_len,
            "pixel_values": out.get("pixel_values") if imgs else None,
            "image_grid_thw": out.get("image_grid_thw") if imgs else None,
        }

    def mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """0 text, 1 image, 2 video (what Qwen2-VL's M-RoPE needs next to ``input_ids``)."""
        t = torch.zeros_like(input_ids)
        t[input_ids == self.image_token_id] = 1
        t[input_ids == self.video_token_id] = 2
        return t


class SFTDataset(torch.utils.data.Dataset):
    """Training examples; prompts planned up front, pixels processed lazily per item."""

    def __init__(
        self, records: Sequence[Record], encoder: RecordEncoder, *, drop_over_limit: bool = True
    ):
        unlabelled = [r.id for r in records if r.label is None]
        if unlabelled:
            raise ValueError(
                f"{len(unlabelled)} training record(s) have no label, e.g. {unlabelled[0]}"
            )
        self.encoder = encoder
        plans, self.report = encoder.plan_all(records)
        keep = []
        for r, p in zip(records, plans):
            if drop_over_limit and p.status == "over_limit":
                self.report.dropped_ids.append(r.id)
            else:
                keep.append((p, r.label))
        self.items = keep

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        plan, label = self.items[i]
        return self.encoder.encode(plan, label)


class SFTCollator:
    """Pads a list of encoded examples into a batch (right padding for training,
    left padding for generation); images are concatenated in order."""

    def __init__(self, encoder: RecordEncoder, padding_side: str = "right"):
        self.encoder = encoder
        self.padding_side = padding_side

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.encoder.pad_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            L = len(f["input_ids"])
            sl = slice(0, L) if self.padding_side == "right" else slice(n - L, n)
            ids[i, sl] = f["input_ids"]
            labels[i, sl] = f["labels"]
            mask[i, sl] = 1
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "mm_token_type_ids": self.encoder.mm_token_type_ids(ids) * mask,
        }
        pv = [f["pixel_values"] for f in features if f.get("pixel_values") is not None]
        if pv:
            batch["pixel_values"] = torch.cat(pv)
            batch["image_grid_thw"] = torch.cat(
                [f["image_grid_thw"] for f in features if f.get("image_grid_thw") is not None]
            )
        return batch
