"""In-memory form of one MIRE record, shared by every part of the pipeline.

A MIRE record on disk is ``{id, instruction, input, output, image}``. We keep the raw
fields (so prompts can be rebuilt exactly) and add what the parser derives: the task, the
candidate label list, the dialogue turns with the positions of inline images, and absolute
image paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

USER, AGENT = "用户", "客服"  # speaker prefixes used by the challenge dialogues
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Turn:
    """One dialogue line. ``images`` are indices into ``Record.images`` shown inline in it."""

    role: str  # USER or AGENT
    text: str  # text with <image> placeholders kept
    images: tuple[int, ...] = ()


@dataclass(frozen=True)
class Record:
    """One parsed, validated MIRE record.

    ``label`` is None for unlabelled (test-time) records. ``images`` are absolute paths in
    the order of the record's ``image`` list, which is also the order of the ``<image>``
    placeholders in ``instruction``. ``turns`` is empty for image-scene records.
    """

    id: str
    task: str  # "image" | "intent"
    instruction: str
    label: str | None
    images: tuple[Path, ...]
    candidates: tuple[str, ...]
    turns: tuple[Turn, ...] = ()
    source: str = ""  # file the record came from, for error messages
    input: str = ""

    @property
    def user_text(self) -> str:
        """All customer turns joined by newlines (empty for image records)."""
        return "\n".join(t.text for t in self.turns if t.role == USER)

    @property
    def last_user_turn(self) -> str:
        users = [t.text for t in self.turns if t.role == USER]
        return users[-1] if users else ""

    @property
    def dialogue_text(self) -> str:
        return "\n".join(f"{t.role}: {t.text}" for t in self.turns)

    def to_raw(self) -> dict:
        """The record in the challenge's on-disk format (image names relative to images/)."""
        return {"id": self.id, "instruction": self.instruction, "input": self.input,
                "output": self.label if self.label is not None else "",
                "image": [p.name for p in self.images]}


@dataclass
class Problem:
    """One validation finding: which file, which record, what is wrong."""

    file: str
    record_id: str | None
    kind: str  # short machine-readable class, e.g. "unknown_label"
    message: str

    def __str__(self) -> str:
        rid = f" record {self.record_id!r}" if self.record_id else ""
        return f"{self.file}:{rid} [{self.kind}] {self.message}"


@dataclass
class LoadReport:
    """What a load did: records kept, problems found (skipped records under strict=False)."""

    n_read: int = 0
    n_kept: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return self.n_read - self.n_kept
