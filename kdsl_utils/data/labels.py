"""The exact label registry of the MIRE challenge (25 image-scene + 23 dialogue-intent labels).

Strings are copied from the challenge's own candidate lists and must match byte for byte:
``实物拍摄(含售后)`` uses ASCII parentheses, ``下单过程中出现异常（显示购买失败浮窗）``
full-width ones. The order is the order of the candidate list in the challenge prompts,
which the synthetic generator reproduces.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IMAGE_TASK = "image"
INTENT_TASK = "intent"
TASKS = (IMAGE_TASK, INTENT_TASK)

IMAGE_LABELS: tuple[str, ...] = (
    "实物拍摄(含售后)", "商品分类选项", "商品头图", "商品详情页截图",
    "下单过程中出现异常（显示购买失败浮窗）", "订单详情页面", "支付页面", "消费者与客服聊天页面",
    "评论区截图页面", "物流页面-物流列表页面", "物流页面-物流跟踪页面", "物流页面-物流异常页面",
    "退款页面", "退货页面", "换货页面", "购物车页面", "店铺页面", "活动页面", "优惠券领取页面",
    "账单/账户页面", "个人信息页面", "投诉举报页面", "平台介入页面", "外部APP截图", "其他类别图片",
)

INTENT_LABELS: tuple[str, ...] = (
    "反馈密封性不好", "是否好用", "是否会生锈", "排水方式", "包装区别", "发货数量", "反馈用后症状",
    "商品材质", "功效功能", "是否易褪色", "适用季节", "能否调光", "版本款型区别", "单品推荐",
    "用法用量", "控制方式", "上市时间", "商品规格", "信号情况", "养护方法", "套装推荐", "何时上货",
    "气泡",
)

LABELS: dict[str, tuple[str, ...]] = {IMAGE_TASK: IMAGE_LABELS, INTENT_TASK: INTENT_LABELS}
#: The pooled 48-label space of the challenge metric (image labels first).
ALL_LABELS: tuple[str, ...] = IMAGE_LABELS + INTENT_LABELS
LABEL_TO_TASK: dict[str, str] = {lab: t for t, labs in LABELS.items() for lab in labs}

#: Column of each label in the pooled space: the one label index of the project.
LABEL_INDEX: dict[str, int] = {lab: i for i, lab in enumerate(ALL_LABELS)}

assert len(IMAGE_LABELS) == 25 and len(INTENT_LABELS) == 23 and len(LABEL_TO_TASK) == 48


def label_indices(labels: Sequence[str | None]) -> np.ndarray:
    """(n,) int64 column of each label in ``ALL_LABELS``; -1 for None (unlabelled)."""
    return np.array([-1 if lab is None else LABEL_INDEX[lab] for lab in labels], dtype=np.int64)


def _fold_width(s: str) -> str:
    """Map full-width ASCII variants to ASCII (used only to explain near-miss labels)."""
    return "".join(chr(ord(c) - 0xFEE0) if 0xFF01 <= ord(c) <= 0xFF5E else c for c in s)


def near_miss(label: str) -> str | None:
    """The registry label that ``label`` matches up to bracket/character width, if any.

    Used in error messages: a label that differs only by ``(`` vs ``（`` is a data bug that
    deserves a precise explanation, not a generic 'unknown label'.
    """
    folded = _fold_width(label).strip()
    for lab in ALL_LABELS:
        if lab != label and _fold_width(lab) == folded:
            return lab
    return None
