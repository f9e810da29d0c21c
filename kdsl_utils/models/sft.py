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
  before any pixel is processed, from image sizes alone (transformers' ``smart_resize``), so the
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

import hashlib
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import partial
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from ..data.images import load_rgb, upright_size
from ..data.prompts import DIALOGUE_END, DIALOGUE_START
from ..data.hf import quiet_progress, to_hf_dataset
from ..data.records import AGENT, IMAGE_TOKEN, USER, Record
from ..data.tokens import visual_tokens

SYSTEM_PROMPT = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END
IGNORE_INDEX = -100
_TURN_LINE = re.compile(rf"^({USER}|{AGENT})[:：]")

STATUSES = ("full", "turns", "downscale", "text", "over_limit")
PLAN_FORMAT = 1  # bump when the planning rules change: cached plans of older rules are stale
ENCODED_KEYS = ("input_ids", "labels", "prompt_len", "pixel_values", "image_grid_thw")


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
    rules: tuple[str, ...] = ()  # every rule applied, in order (``status`` is the last)

    def to_row(self) -> dict[str, Any]:
        """The plan as ``plan_*`` columns of a dataset row (see :data:`PLAN_FEATURES`)."""
        return {
            "plan_instruction": self.instruction, "plan_text": self.text,
            "plan_images": [str(p) for p in self.images],
            "plan_image_tokens": list(self.image_tokens), "plan_max_pixels": self.max_pixels,
            "plan_n_tokens": self.n_tokens, "plan_status": self.status,
            "plan_rules": list(self.rules), "plan_turns_dropped": self.turns_dropped,
            "plan_images_dropped": self.images_dropped, "plan_chars_cut": self.chars_cut,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> PromptPlan:
        """The plan of a row of :func:`plan_dataset` (record id from its ``id`` column)."""
        return cls(
            record_id=row["id"], instruction=row["plan_instruction"], text=row["plan_text"],
            images=tuple(Path(p) for p in row["plan_images"]),
            image_tokens=tuple(row["plan_image_tokens"]), max_pixels=row["plan_max_pixels"],
            n_tokens=row["plan_n_tokens"], status=row["plan_status"],
            turns_dropped=row["plan_turns_dropped"], images_dropped=row["plan_images_dropped"],
            chars_cut=row["plan_chars_cut"], rules=tuple(row["plan_rules"]),
        )


_INT = datasets.Value("int64")
PLAN_FEATURES = {
    "plan_instruction": datasets.Value("string"), "plan_text": datasets.Value("string"),
    "plan_images": datasets.List(datasets.Value("string")),
    "plan_image_tokens": datasets.List(_INT), "plan_max_pixels": _INT, "plan_n_tokens": _INT,
    "plan_status": datasets.Value("string"), "plan_rules": datasets.List(datasets.Value("string")),
    "plan_turns_dropped": _INT, "plan_images_dropped": _INT, "plan_chars_cut": _INT,
}


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

    @classmethod
    def of_plans(cls, plans: Sequence[PromptPlan]) -> TruncationReport:
        report = cls()
        for p in plans:
            report.add(p, p.rules)
        return report

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
    lines: list[list[str]] = []  # lines per block, joined once (no repeated str +=)
    for line in body.splitlines(keepends=True):
        if _TURN_LINE.match(line) or not lines:
            lines.append([line])
        else:
            lines[-1].append(line)
    return head, ["".join(b) for b in lines], tail


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
        self._last_text: tuple[str, int] | None = None  # (prompt text, its token count)

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
        """Visual tokens of the image at ``path`` under ``max_pixels`` (header read once)."""
        if path not in self._size_cache:
            self._size_cache[path] = upright_size(path)  # as load_rgb gives it (EXIF)
        w, h = self._size_cache[path]
        return visual_tokens(w, h, self.min_pixels, max_pixels or self.max_pixels,
                             patch=self.patch, merge=self.merge)

    def _measure(
        self, instruction: str, images: Sequence[Path], max_pixels: int
    ) -> tuple[str, tuple[int, ...], int]:
        text = format_prompt(instruction, self.system)
        img_tok = tuple(self.n_image_tokens(p, max_pixels) for p in images)
        # the text's token count is reused while only the pixel budget changes (downscaling
        # re-measures the same text up to log2(max/min pixels) times)
        if self._last_text is None or self._last_text[0] != text:
            self._last_text = (text, len(self.tokenize(text)))
        return text, img_tok, self._last_text[1] + sum(n - 1 for n in img_tok)

    # ---- planning
    def plan(self, record: Record) -> PromptPlan:
        """The prompt of ``record`` under the budget (see the module docstring for the rules)."""
        return self._plan(record)[0]

    def _plan(self, record: Record) -> tuple[PromptPlan, list[str]]:
        return self._plan_parts(record.id, record.instruction, list(record.images),
                                record.candidates)

    def _plan_parts(self, record_id: str, instruction: str, images: list[Path],
                    candidates: Sequence[str]) -> tuple[PromptPlan, list[str]]:
        budget = self.max_length - self.answer_reserve(candidates)
        images = list(images)
        if instruction.count(IMAGE_TOKEN) != len(images):
            raise ValueError(
                f"record {record_id}: {instruction.count(IMAGE_TOKEN)} <image> "
                f"placeholders but {len(images)} images"
            )
        max_px = self.max_pixels
        text, img_tok, n = self._measure(instruction, images, max_px)
        rules: list[str] = []
        turns_dropped = images_dropped = chars_cut = 0
        parts = _split_dialogue(instruction) if n > budget else None

        # 1. drop the oldest turns, keeping the last customer turn and what follows it: the
        # fewest dropped turns d that fit. Found from per-turn token costs (each turn tokenised
        # once; a turn ends with a newline, where Qwen2's pre-tokeniser splits, so costs add
        # up) and confirmed by exact measurement, stepping while the exact count disagrees,
        # which gives the turn-by-turn result in time linear in the dialogue's length.
        if parts is not None and n > budget:
            head, blocks, tail = parts
            user_idx = [i for i, b in enumerate(blocks) if b.startswith(USER)]
            keep_from = user_idx[-1] if user_idx else len(blocks) - 1
            head_imgs = head.count(IMAGE_TOKEN)
            img_counts = [b.count(IMAGE_TOKEN) for b in blocks]
            img_start = np.concatenate([[0], np.cumsum(img_counts)]).astype(int)
            cost = [len(ids) for ids in self.tokenizer(
                [user_content(b) for b in blocks[:keep_from]], add_special_tokens=False
            )["input_ids"]] if keep_from else []
            for i in range(keep_from):
                cost[i] += sum(self.n_image_tokens(p, max_px) - 1
                               for p in images[head_imgs + img_start[i]:head_imgs + img_start[i + 1]])
            saved = np.concatenate([[0], np.cumsum(cost)]).astype(int)  # tokens freed by d
            n0 = n

            def measured(d: int) -> tuple[str, list[Path], tuple[str, tuple[int, ...], int]]:
                ins = head + "".join(blocks[d:]) + tail
                imgs = images[:head_imgs] + images[head_imgs + img_start[d]:]
                return ins, imgs, self._measure(ins, imgs, max_px)

            d = int(min(np.searchsorted(-(n0 - saved), -budget), keep_from))  # first estimate <= budget
            cur = measured(d)
            while d < keep_from and cur[2][2] > budget:
                d += 1
                cur = measured(d)
            while d > 0:
                prev = measured(d - 1)
                if prev[2][2] > budget:
                    break
                d, cur = d - 1, prev
            if d:
                instruction, images, (text, img_tok, n) = cur
                turns_dropped, images_dropped = d, int(img_start[d])
                blocks = blocks[d:]
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
            record_id=record_id,
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
            rules=tuple(rules),
        )
        assert plan.instruction.count(IMAGE_TOKEN) == len(plan.images)
        return plan, rules

    def plan_all(self, records: Sequence[Record]) -> tuple[list[PromptPlan], TruncationReport]:
        """The plans of ``records`` (through :func:`plan_dataset`) and their report."""
        ds, report = plan_dataset(records, self)
        return plans_of(ds), report

    # ---- the dataset path (datasets.Dataset rows)
    def _plan_rows(self, batch: dict[str, list]) -> dict[str, list]:
        """``map`` function: the ``plan_*`` columns of a batch of :func:`to_hf_dataset` rows."""
        out: dict[str, list] = {k: [] for k in PLAN_FEATURES}
        for rid, instr, imgs, cands in zip(batch["id"], batch["instruction"], batch["images"],
                                           batch["candidates"]):
            plan, _ = self._plan_parts(rid, instr, [Path(p) for p in imgs], cands)
            for k, v in plan.to_row().items():
                out[k].append(v)
        return out

    def encode_rows(
        self, batch: dict[str, list], targets: Mapping[str, str] | None = None
    ) -> dict[str, list]:
        """``with_transform`` function: model inputs (see :meth:`encode`) of a batch of planned
        rows, with the answer and its labels where the row has a ``label``. ``targets`` (record
        id -> answer text) overrides the label as the answer of the records it holds; it is
        read at every access, so a caller may change it between epochs (dynamic CoT)."""
        def answer(i: int) -> str | None:
            if "label" not in batch:
                return None
            if targets is not None and batch["id"][i] in targets:
                return targets[batch["id"][i]]
            return batch["label"][i]

        encs = [self.encode(PromptPlan.from_row({k: batch[k][i] for k in batch}), answer(i))
                for i in range(len(batch["id"]))]
        return {k: [e[k] for e in encs] for k in ENCODED_KEYS}

    @cached_property
    def plan_key(self) -> str:
        """What a plan depends on besides the record: the budget, pixel bounds, system
        prompt, patch geometry and the tokenizer itself (its full serialisation)."""
        tok = self.tokenizer
        vocab = tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") else repr(tok)
        h = hashlib.sha256(json.dumps([PLAN_FORMAT, self.max_length, self.min_pixels,
                                       self.max_pixels, self.system, self.patch, self.merge]).encode())
        h.update(vocab.encode("utf-8"))
        return h.hexdigest()

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


def _image_stamp(path: str) -> list:
    """What an image contributes to a plan key: path, size and modification time."""
    st = Path(path).stat()
    return [path, st.st_size, st.st_mtime_ns]


def plan_dataset(
    records: Sequence[Record], encoder: RecordEncoder, *, cache_dir: Path | str | None = None
) -> tuple[datasets.Dataset, TruncationReport]:
    """Records as a ``datasets.Dataset`` (:func:`~kdsl_utils.data.hf.to_hf_dataset`) with
    their token plans added by ``map`` (``plan_*`` columns, :meth:`PromptPlan.to_row`), and
    the truncation report of those plans.

    The map's fingerprint is computed here from the records (ids, prompts, candidates, image
    paths with size and mtime) and :attr:`RecordEncoder.plan_key`, rather than by hashing the
    bound method (which would pickle the processor). With ``cache_dir`` the planned table is
    an Arrow file named by that fingerprint there, and a later call with the same records and
    encoder loads it instead of planning again."""
    ds = to_hf_dataset(records)
    h = hashlib.sha256(encoder.plan_key.encode())
    for r in records:
        h.update(json.dumps([r.id, r.instruction, list(r.candidates),
                             [_image_stamp(str(p)) for p in r.images]]).encode())
    fp = h.hexdigest()[:32]
    cache_file = None
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache_file = str(Path(cache_dir) / f"plan-{fp}.arrow")
    with quiet_progress():
        planned = ds.map(encoder._plan_rows, batched=True, batch_size=64,
                         features=datasets.Features({**ds.features, **PLAN_FEATURES}),
                         new_fingerprint=fp, cache_file_name=cache_file,
                         load_from_cache_file=True)
    return planned, TruncationReport.of_plans(plans_of(planned))


def plans_of(ds: datasets.Dataset) -> list[PromptPlan]:
    """The :class:`PromptPlan` of every row of a :func:`plan_dataset` table."""
    return [PromptPlan.from_row(row) for row in ds.select_columns(["id", *PLAN_FEATURES]).to_list()]


def sft_dataset(
    records: Sequence[Record],
    encoder: RecordEncoder,
    *,
    drop_over_limit: bool = True,
    cache_dir: Path | str | None = None,
    targets: Mapping[str, str] | None = None,
) -> tuple[datasets.Dataset, TruncationReport]:
    """Training examples: :func:`plan_dataset` without the over-limit records (their ids in
    ``report.dropped_ids``), pixels processed lazily per item by ``with_transform``
    (:meth:`RecordEncoder.encode_rows`: ``input_ids``, ``labels``, ``prompt_len``,
    ``pixel_values``, ``image_grid_thw``), in record order. ``targets`` overrides the answer
    of the records it holds (:meth:`RecordEncoder.encode_rows`)."""
    unlabelled = [r.id for r in records if r.label is None]
    if unlabelled:
        raise ValueError(
            f"{len(unlabelled)} training record(s) have no label, e.g. {unlabelled[0]}"
        )
    ds, report = plan_dataset(records, encoder, cache_dir=cache_dir)
    status = ds["plan_status"]
    if drop_over_limit:
        report.dropped_ids.extend(r.id for r, st in zip(records, status) if st == "over_limit")
        ds = ds.select([i for i, st in enumerate(status) if st != "over_limit"])
    ds = ds.with_transform(partial(encoder.encode_rows, targets=targets),
                           columns=["id", "label", *PLAN_FEATURES])
    return ds, report


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
