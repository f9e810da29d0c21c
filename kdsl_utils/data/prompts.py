"""The challenge's two instruction templates, reproduced exactly.

The synthetic generator writes instructions with these builders and the loader parses real
ones with the matching markers, so a synthetic record is indistinguishable in format from a
real one. Candidate lists are JSON arrays without spaces, as in the challenge files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .labels import IMAGE_LABELS, INTENT_LABELS

DIALOGUE_START = "<用户与客服的对话 START>"
DIALOGUE_END = "<用户与客服的对话 END>"

IMAGE_INSTRUCTION_BODY = (
    "你是一个电商领域识图专家,可以理解消费者上传的软件截图或实物拍摄图。现在,请你对消费者上传的图片进行分类。"
    "你只需要回答图片分类结果,不需要其他多余的话。以下是可以参考的分类标签,分类标签:{labels}。"
)
INTENT_INSTRUCTION_HEAD = "你是一个电商客服专家，请根据用户与客服的多轮对话判断用户的意图分类标签。\n"
INTENT_INSTRUCTION_TAIL = "请直接只输出分类标签结果，不需要其他多余的话。以下是可以参考的分类标签为：{labels}\n"


def label_list_json(labels: Sequence[str]) -> str:
    """``["a","b"]`` exactly as the challenge writes candidate lists (no spaces, raw CJK)."""
    return json.dumps(list(labels), ensure_ascii=False, separators=(",", ":"))


def image_instruction(n_images: int = 1, labels: Sequence[str] = IMAGE_LABELS) -> str:
    """Instruction of an image-scene record: ``Picture k: <image>`` lines, then the task."""
    pics = "".join(f"Picture {k + 1}: <image>\n" for k in range(n_images))
    return pics + IMAGE_INSTRUCTION_BODY.format(labels=label_list_json(labels))


def intent_instruction(turns: Sequence[tuple[str, str]], labels: Sequence[str] = INTENT_LABELS) -> str:
    """Instruction of a dialogue-intent record from ``(role, text)`` turns (role 用户 / 客服)."""
    body = "".join(f"{role}: {text}\n" for role, text in turns)
    return (INTENT_INSTRUCTION_HEAD + DIALOGUE_START + "\n" + body + DIALOGUE_END + "\n"
            + INTENT_INSTRUCTION_TAIL.format(labels=label_list_json(labels)))
