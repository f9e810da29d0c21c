"""Built-in synthetic MIRE generator: the default data of every notebook and of the tests.

:func:`generate_mire` writes a directory in exactly the challenge's format — ``train.json``,
one ``<name>.json`` per test split (a JSON list of ``{"id", "instruction", "input",
"output", "image"}``) and ``images/`` — that :func:`kdsl_utils.data.mire.load_mire` loads
with ``strict=True``. Records use the challenge's own instruction templates
(:mod:`kdsl_utils.data.prompts`) and the exact 48 label strings
(:mod:`kdsl_utils.data.labels`); ids look like the real ones (image task: a UUID plus
``-<number>``; intent task: 30 lowercase hex characters); image files are
``<id>-<k>.jpg`` (about 2 % ``.png``, as in the real data).

Design
------
*Image-scene records* (25 labels) get one Pillow-rendered image. Software scenes are
phone screenshots (:data:`SCREEN_SIZE`) with a status bar, a header and a body whose
**visible Chinese text and layout** carry the scene: an order page has key/value rows
(订单编号, 付款时间 …) and 申请售后/确认收货 buttons, a logistics-tracking page a map and a
timeline, a purchase-failure page a dimmed page under a 购买失败 pop-up, and so on for every
label. Photos are drawn: 实物拍摄(含售后) is a noisy, lit, slightly rotated "camera photo" of
a product shape (or of a parcel with a shipping label) (:data:`PHOTO_SIZE`); 商品头图 is a
screenshot whose top half is a big product picture with price/promotion overlays, or a
square main image (:data:`SQUARE_SIZE`). Every image has one of those three sizes.

What keeps the image task from being trivial (no single keyword or colour decides it):
  * shared vocabulary: 订单/物流/退款/售后/客服 words appear on several page types (an order
    page has a 查看物流 button, after-sale pages a progress timeline like the logistics pages,
    a return page 退款 amounts,
    complaint and platform-arbitration pages share 凭证/处理中 …), and every page gets random
    snippets from a common pool (猜你喜欢, 运费险, 领券 …) and often a "猜你喜欢" product grid;
  * a few 其他类别图片 are ordinary photos, as in the real data, so they overlap 实物拍摄;
  * random theme colours, positions, item counts, privacy-redaction bars like real
    screenshots, and OCR-like typos (订→定, 退→腿 …) in about 6 % of the strings;
  * confusable pairs are drawn from shared layouts (退款/退货/换货 share the after-sale
    page; the three logistics pages share the timeline; 外部APP截图 vs 其他类别图片 are both
    "not shopping-app" screens; 商品头图 vs 商品详情页截图 are both product pages).

*Dialogue-intent records* (23 labels) are customer (用户) / agent (客服) turns in the style
of the real data: openers (greetings, ``<http>`` / ``"<http>"`` links, video JSON blobs,
order summaries), ``<image>`` turns answered by "can't read images" replies or by nothing,
agent marketing broadcasts with emoticon codes (``/:087``), and empty agent turns. The
intent is carried by one key customer question, which is
  * an explicit paraphrase (e.g. 会生锈吗), a vague one (为啥发黑了), or — in about 10 % of
    dialogues — a generic one that names no intent at all (这种情况正常吗), where only the
    product, the attached image (whose visible text names the product) or the agent's
    answer tells the intent: the multimodal cases;
  * often preceded by a misleading question of a *sibling* intent (e.g. 商品材质 before
    是否会生锈), and sometimes followed by small talk, so it is not always the last turn;
  * about the products of a shared catalogue (categories fit several intents each).
A quarter of each intent's paraphrases are held out of the training split (they appear
only in test splits), so memorising training sentences is not enough. The agent answers on
topic in 3 of 4 dialogues, and says nothing or boilerplate otherwise. The mixture is set by
the ``P_*`` constants below. At the default size a character 1-3-gram TF-IDF + logistic
regression on the dialogue text reaches a weighted F1 of 0.68 on the intent test splits
(0.61-0.78 over seeds 0-4 and the two splits): clearly learnable, far from solved. (On the
real MIRE data the same baseline scores about 0.42: real dialogues are harder still.)

Images attached to dialogues are rendered by the same scene renderers (scenes typical of
the intent: 实物拍摄 for complaints, 商品分类选项 for version/size questions …), showing
the dialogue's product; most dialogues have one image, some none, some two or three.

Label coverage: the real training data never contains the image labels 消费者与客服聊天页面
and 个人信息页面 (they stay in every candidate list). By default the generator mirrors that
(``absent_labels=REAL_ABSENT_LABELS``), so that code developed on synthetic data meets the
same situation as on real data: candidate labels with no examples, weighted F1 over the
labels that occur, a rule miner that never sees those two. Pass ``absent_labels=()`` to
generate them too (their renderers exist and are tested).

Determinism: one private ``random.Random(seed)`` plans every record (text, ids, image
specs); each image is then drawn from its own seed taken from that plan, so the records do
not depend on whether or in which order images are rendered. No global random state, no
clock, no set iteration; JPEG at fixed quality without optimisation, PNG at a fixed
compression level; Pillow's BASIC text layout. Same seed and parameters → byte-identical
files (on the same font file and Pillow version).

Parameters of :func:`generate_mire`: ``seed``; ``per_label`` training records per label;
``test_per_label`` records per label in each of ``test_files``;
``max_images_per_dialogue`` (0 gives text-only dialogues); ``absent_labels``;
``overwrite``. The default size (12 / 4 / two test files) is 46·20 = 920 records and
about 1000 images (31 MB), generated in about 20 s on one core.

Other entry points: :func:`plan_mire` (every record and image spec, no rendering — fast,
for tests and analyses), :func:`render_scene` (one image of a scene),
:func:`synth_params` (the parameter record stamped into a generated directory as its
hidden ``.synth_params.json``, which also records :data:`GENERATOR_VERSION`; the "generate
unless the stamp matches" routine is :func:`kdsl_utils.data.source.ensure_generated`); a content hash of a
generated directory is :func:`kdsl_utils.hashing.directory_digest`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm

from ..fonts import cjk_font
from . import synth_templates as T
from .labels import IMAGE_LABELS, INTENT_LABELS
from .prompts import image_instruction, intent_instruction
from .records import AGENT, IMAGE_TOKEN, USER

GENERATOR_VERSION = "1"
SCREEN_SIZE = (360, 780)  # phone screenshots (real ones are ~470x1024 after downscaling)
PHOTO_SIZE = (390, 520)  # 3:4 camera photos (实物拍摄)
SQUARE_SIZE = (480, 480)  # square product main images (some 商品头图)
IMAGE_SIZES = (SCREEN_SIZE, PHOTO_SIZE, SQUARE_SIZE)
REAL_ABSENT_LABELS: tuple[str, ...] = ("消费者与客服聊天页面", "个人信息页面")
JPEG_QUALITY = 85
PNG_FRACTION = 0.02
PARAMS_FILE = ".synth_params.json"  # hidden stamp: the parameters that made the directory

# Dialogue mixture (fractions of intent records).
P_GENERIC_KEY = 0.1  # key question names no intent (only product / image / answer tell it)
P_VAGUE_KEY = 0.25  # of the rest: a vague paraphrase rather than an explicit one
P_DISTRACTOR = 0.3  # a misleading question of another (mostly sibling) intent comes first
P_ANSWER = 0.75  # the agent answers the key question on topic (else nothing or boilerplate)
P_FOLLOWUP = 0.35  # a turn after the key question: small talk, or ...
P_REPHRASE = 0.45  # ... the same question rephrased
HELD_OUT_EVERY = 4  # every 4th paraphrase of an intent appears in test splits only

GENERIC_QUESTIONS = ("这种情况正常吗", "这个怎么回事", "帮我看看这个", "就是图上这个问题", "这个呢", "能解释一下吗",
                     "我想问下这个", "麻烦看一下", "这样可以吗", "图片里这个怎么说")


# ---------------------------------------------------------------------------------------------
# Planning (text, ids, image specs): all randomness from one Random
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Product:
    category: str
    brand: str
    word: str  # how customers call it (杯子, 灯 …)
    attrs: tuple[str, ...]
    color: tuple[int, int, int]
    price: str

    @property
    def name(self) -> str:
        return f"{self.brand}{self.category}"

    @property
    def title(self) -> str:
        return f"{self.brand}{self.category} {' '.join(self.attrs[:3])}"


@dataclass(frozen=True)
class ImageSpec:
    """One image to render: file name, scene label, product shown, its own seed."""

    name: str
    scene: str
    product: Product
    seed: int


PALETTE = ((220, 60, 50), (40, 110, 220), (250, 170, 30), (60, 170, 90), (240, 240, 235), (40, 40, 45),
           (230, 120, 170), (150, 100, 60), (120, 90, 200), (90, 200, 210), (200, 200, 210), (250, 120, 40))


def _product(rng: random.Random, category: str | None = None) -> Product:
    if category is None:
        category = rng.choice(tuple(T.CATEGORIES))
    word, attrs = T.CATEGORIES[category]
    attrs = tuple(rng.sample(attrs, len(attrs)))
    price = f"{rng.choice((9, 19, 29, 39, 59, 79, 99, 129, 169, 199, 259, 299, 399, 599, 1299, 2999))}.{rng.choice(('00', '90', '80', '50', '99'))}"
    return Product(category, rng.choice(T.BRANDS), word, attrs, rng.choice(PALETTE), price)


def _image_id(rng: random.Random) -> str:
    return f"{uuid.UUID(int=rng.getrandbits(128), version=4)}-{rng.randrange(1, 2600)}"


def _intent_id(rng: random.Random) -> str:
    ts = 1727000000000 + rng.randrange(0, 2_600_000_000)
    rid = f"{rng.getrandbits(32):08x}{ts:013d}{rng.randrange(10000):04d}d{rng.getrandbits(16):04x}"
    assert len(rid) == 30
    return rid


def _fmt(s: str, rng: random.Random, p: Product, shop: str = "") -> str:
    return (s.replace("{p}", p.name).replace("{c}", p.word).replace("{shop}", shop or f"{p.brand}旗舰店")
            .replace("{n}", str(rng.randrange(1, 5))).replace("{price}", p.price)
            .replace("{date}", f"2024-{rng.randrange(8, 11):02d}-{rng.randrange(1, 29):02d}"))


def _pool(intent: str, kind: str, split: str) -> tuple[str, ...]:
    """Paraphrases of an intent usable in a split: training never sees the held-out third."""
    items = T.INTENTS[intent][kind]
    if split == "train" and kind in ("clear", "vague"):
        items = tuple(s for k, s in enumerate(items) if k % HELD_OUT_EVERY != HELD_OUT_EVERY - 1)
    return items


def _decorate_question(rng: random.Random, q: str, p: Product) -> str:
    r = rng.random()
    if r < 0.18:
        q = rng.choice(("请问", "想问下", "亲，", "客服，", "你好，", "我想咨询一下，", "问一下")) + q
    elif r < 0.3:
        q = rng.choice((f"{p.name}，", f"我买的{p.word}", f"这款{p.word}", "刚收到货，")) + q
    return q + rng.choice(("", "", "？", "?", "呢", "啊", "。", "呀"))


def _video_blob(rng: random.Random) -> str:
    h, w = rng.choice(((1280, 720), (1920, 1080), (960, 540)))
    return (f'{{"height":{h},"duration":{rng.randrange(5, 60)},"width":{w},'
            f'"pic":"<http>!!{rng.randrange(10**12, 10**13)}-0-video_cover.jpg","url":"<http>",'
            f'"size":{rng.randrange(300000, 9000000)}}}')


def _dialogue(rng: random.Random, intent: str, p: Product, n_images: int, split: str
              ) -> list[tuple[str, str]]:
    """(role, text) turns of one dialogue whose intent is ``intent``."""
    spec = T.INTENTS[intent]
    shop = f"{p.brand}{rng.choice(('旗舰店', '官方旗舰店', '专营店', '家居馆', '母婴店'))}"
    pairs: list[list[str]] = []  # [user, agent]
    # opener
    r = rng.random()
    if r < 0.25:
        pairs.append([rng.choice(T.GREETINGS_USER), _fmt(rng.choice(T.GREETINGS_AGENT), rng, p, shop)])
    elif r < 0.4:
        pairs.append([_fmt(rng.choice(T.PRODUCT_LINK_TURNS), rng, p),
                      rng.choice(("", "", _fmt(rng.choice(T.BROADCASTS), rng, p, shop)))])
    elif r < 0.46:
        pairs.append([_video_blob(rng), rng.choice(("", "亲，视频已收到，请问有什么问题呢？"))])
    elif r < 0.55:
        pairs.append([_fmt(rng.choice(T.ORDER_SUMMARIES), rng, p), rng.choice(T.GREETINGS_AGENT).replace("{shop}", shop)])
    middle: list[list[str]] = []
    for _ in range(n_images):
        user = IMAGE_TOKEN if rng.random() < 0.85 else IMAGE_TOKEN + rng.choice(("这个", "看下这个", "就这个", "你看"))
        middle.append([user, rng.choice(T.IMAGE_REPLIES)])
    if rng.random() < P_DISTRACTOR:
        other = rng.choice(spec["siblings"]) if rng.random() < 0.75 else rng.choice(INTENT_LABELS)
        if other != intent:
            o = T.INTENTS[other]
            q = rng.choice(_pool(other, rng.choice(("clear", "clear", "vague")), split))
            ans = _fmt(rng.choice(o["answers"]), rng, p, shop) if rng.random() < 0.6 else ""
            middle.insert(rng.randrange(len(middle) + 1), [_decorate_question(rng, _fmt(q, rng, p), p), ans])
    if rng.random() < 0.2:
        middle.insert(rng.randrange(len(middle) + 1),
                      [rng.choice(T.FOLLOWUPS), _fmt(rng.choice(T.BROADCASTS), rng, p, shop)])
    # key question
    r = rng.random()
    if r < P_GENERIC_KEY:
        q = rng.choice(GENERIC_QUESTIONS)
    else:
        kind = "vague" if rng.random() < P_VAGUE_KEY else "clear"
        q = rng.choice(_pool(intent, kind, split))
    q = _decorate_question(rng, _fmt(q, rng, p), p)
    r = rng.random()
    answer = (_fmt(rng.choice(spec["answers"]), rng, p, shop) if r < P_ANSWER else
              "" if r < 0.8 + 0.2 * P_ANSWER else _fmt(rng.choice(T.GENERIC_REPLIES), rng, p, shop))
    key = [q, answer]
    # images usually come before the question, sometimes after it
    if middle and middle[-1][0].startswith(IMAGE_TOKEN) and rng.random() < 0.15:
        middle.insert(len(middle) - 1, key)
    else:
        middle.append(key)
    pairs += middle
    if rng.random() < P_FOLLOWUP:
        if rng.random() < P_REPHRASE:  # the customer asks again in other words
            kind = "vague" if rng.random() < 0.5 else "clear"
            follow = _decorate_question(rng, _fmt(rng.choice(_pool(intent, kind, split)), rng, p), p)
        else:
            follow = rng.choice(T.FOLLOWUPS)
        pairs.append([follow, rng.choice(("", "", _fmt(rng.choice(T.GENERIC_REPLIES), rng, p, shop)))])
    return [(role, text) for u, a in pairs for role, text in ((USER, u), (AGENT, a))]


def _n_images(rng: random.Random, max_images: int) -> int:
    r = rng.random()
    n = 0 if r < 0.05 else 1 if r < 0.85 else 2 if r < 0.95 else 3
    return min(n, max_images)


def _image_name(rng: random.Random, rid: str, k: int) -> str:
    return f"{rid}-{k}.{'png' if rng.random() < PNG_FRACTION else 'jpg'}"


def plan_mire(*, seed: int = 0, per_label: int = 12, test_per_label: int = 4,
              test_files: Sequence[str] = ("test1", "test2"), max_images_per_dialogue: int = 3,
              absent_labels: Sequence[str] = REAL_ABSENT_LABELS
              ) -> tuple[dict[str, list[dict]], list[ImageSpec]]:
    """The records of every split and the images to render, without rendering anything.

    Returns ``({split: [raw record, ...]}, [ImageSpec, ...])``. Fast (text only); the
    non-triviality tests and :func:`generate_mire` both start here.
    """
    for name in absent_labels:
        if name not in IMAGE_LABELS and name not in INTENT_LABELS:
            raise ValueError(f"absent_labels: {name!r} is not a MIRE label")
    splits = ("train", *test_files)
    if len(set(splits)) != len(splits) or any(not s.startswith("test") for s in test_files):
        raise ValueError(f"test_files must be distinct names starting with 'test', got {test_files!r}")
    if per_label < 0 or test_per_label < 0 or max_images_per_dialogue < 0:
        raise ValueError("per_label, test_per_label and max_images_per_dialogue must be >= 0")
    rng = random.Random(seed)
    image_labels = [lab for lab in IMAGE_LABELS if lab not in absent_labels]
    intent_labels = [lab for lab in INTENT_LABELS if lab not in absent_labels]
    scene_pool = image_labels or list(IMAGE_LABELS)
    used_ids: set[str] = set()
    out: dict[str, list[dict]] = {}
    specs: list[ImageSpec] = []

    def new_id(make) -> str:
        while True:
            rid = make(rng)
            if rid not in used_ids:
                used_ids.add(rid)
                return rid

    for split in splits:
        n = per_label if split == "train" else test_per_label
        records: list[dict] = []
        for label in image_labels:
            for _ in range(n):
                rid = new_id(_image_id)
                name = _image_name(rng, rid, 0)
                specs.append(ImageSpec(name, label, _product(rng), rng.getrandbits(63)))
                records.append({"id": rid, "instruction": image_instruction(1), "input": "",
                                "output": label, "image": [name]})
        for label in intent_labels:
            spec = T.INTENTS[label]
            for _ in range(n):
                rid = new_id(_intent_id)
                p = _product(rng, rng.choice(spec["cats"]))
                n_img = _n_images(rng, max_images_per_dialogue)
                turns = _dialogue(rng, label, p, n_img, split)
                names = []
                for k in range(n_img):
                    scene = rng.choice(spec["scenes"]) if rng.random() < 0.8 else rng.choice(scene_pool)
                    if scene not in scene_pool:
                        scene = rng.choice(scene_pool)
                    names.append(_image_name(rng, rid, k))
                    specs.append(ImageSpec(names[-1], scene, p, rng.getrandbits(63)))
                records.append({"id": rid, "instruction": intent_instruction(turns), "input": "",
                                "output": label, "image": names})
        rng.shuffle(records)
        out[split] = records
    return out, specs


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def _font(size: int):
    return cjk_font(size)


_WIDTHS: dict[tuple[int, str], float] = {}


def _width(s: str, size: int) -> float:
    """Advance width of ``s`` at ``size`` px: per-character widths, cached (fast; CJK text
    has no kerning to speak of, so the sum is what the BASIC layout draws)."""
    total = 0.0
    for ch in s:
        w = _WIDTHS.get((size, ch))
        if w is None:
            w = _WIDTHS[size, ch] = _font(size).getlength(ch)
        total += w
    return total


ACCENTS = ((255, 80, 0), (255, 68, 0), (230, 40, 40), (7, 193, 96), (22, 119, 255), (140, 80, 230),
           (255, 90, 140), (250, 140, 20), (40, 40, 40))
GREY_BG = ((245, 245, 245), (242, 243, 247), (255, 255, 255), (248, 246, 242), (240, 244, 248))
TEXT = (34, 34, 34)
MUTED = (140, 140, 140)


class Page:
    """A drawing surface with a cursor ``y`` and helpers for phone-screen furniture."""

    def __init__(self, rng: random.Random, size=SCREEN_SIZE, bg=None, accent=None):
        self.rng = rng
        self.W, self.H = size
        self.bg = bg or rng.choice(GREY_BG)
        self.accent = accent or rng.choice(ACCENTS)
        self.img = Image.new("RGB", size, self.bg)
        self.d = ImageDraw.Draw(self.img)
        self.y = 0

    # -- text -------------------------------------------------------------------------------
    def typo(self, s: str) -> str:
        if self.rng.random() < 0.06:
            idx = [i for i, ch in enumerate(s) if ch in T.TYPO_MAP]
            if idx:
                i = self.rng.choice(idx)
                s = s[:i] + T.TYPO_MAP[s[i]] + s[i + 1:]
        return s

    def text(self, x, y, s, size=14, fill=TEXT, anchor="la") -> int:
        """Draw ``s``; returns the x where it ends."""
        s = self.typo(s)
        self.d.text((x, y), s, font=_font(size), fill=fill, anchor=anchor)
        return int(x + _width(s, size))

    def wrap(self, x, y, s, size=13, width=None, fill=TEXT, max_lines=3, gap=5) -> int:
        """Wrapped text from (x, y); returns the y below it."""
        width = width or (self.W - x - 14)
        line, w = "", 0.0
        lines = []
        for ch in s:
            cw = _width(ch, size)
            if w + cw > width and line:
                lines.append(line)
                line, w = ch, cw
            else:
                line, w = line + ch, w + cw
        lines.append(line)
        for ln in lines[:max_lines]:
            self.text(x, y, ln, size, fill)
            y += size + gap
        return y

    # -- furniture --------------------------------------------------------------------------
    def status_bar(self, bg=None, fg=TEXT):
        h = 24
        if bg:
            self.d.rectangle((0, 0, self.W, h), fill=bg)
        self.text(14, 5, self.rng.choice(T.STATUS_TIMES), 12, fg)
        x = self.W - 16
        self.d.rounded_rectangle((x - 22, 8, x, 17), 2, outline=fg, width=1)
        self.d.rectangle((x - 20, 10, x - 20 + self.rng.randrange(4, 18), 15), fill=fg)
        for k in range(4):
            self.d.rectangle((x - 50 + 4 * k, 16 - 2 * k, x - 48 + 4 * k, 17), fill=fg)
        self.y = h

    def header(self, title, bg=None, fg=TEXT, right=None, size=17):
        h = 44
        if bg:
            self.d.rectangle((0, self.y, self.W, self.y + h), fill=bg)
        self.text(12, self.y + 11, "<", 18, fg)
        self.text(self.W // 2, self.y + h // 2, title, size, fg, anchor="mm")
        for k, r in enumerate(right or self.rng.choice(((), ("···",), ("分享",), ("客服", "···")))):
            self.text(self.W - 14 - 40 * k, self.y + h // 2, r, 13, fg, anchor="rm")
        self.y += h

    def card(self, h, margin=10, pad=0, fill=(255, 255, 255)):
        box = (margin, self.y + 8, self.W - margin, self.y + 8 + h)
        self.d.rounded_rectangle(box, 10, fill=fill)
        self.y = box[3] + pad
        return box

    def kv(self, x0, x1, y, key, val, size=13, vfill=TEXT):
        self.text(x0, y, key, size, MUTED)
        self.text(x1, y, val, size, vfill, anchor="ra")

    def button(self, x, y, label, filled=False, color=None, size=13, anchor="left") -> int:
        color = color or self.accent
        w = int(_width(label, size)) + 22
        if anchor == "right":
            x -= w
        box = (x, y, x + w, y + size + 14)
        if filled:
            self.d.rounded_rectangle(box, (size + 14) // 2, fill=color)
            self.text(x + 11, y + 7, label, size, (255, 255, 255))
        else:
            self.d.rounded_rectangle(box, (size + 14) // 2, outline=(200, 200, 200))
            self.text(x + 11, y + 7, label, size, TEXT)
        return x if anchor == "right" else box[2]

    def redact(self, x, y, w, h=None):
        h = h or self.rng.randrange(9, 16)
        self.d.rectangle((x, y, x + w, y + h), fill=self.rng.choice(((30, 30, 30), (120, 120, 125), (200, 200, 205))))

    def thumb(self, box, product: Product):
        x0, y0, x1, y1 = box
        self.d.rounded_rectangle(box, 6, fill=_tint(product.color, 0.75))
        draw_product(self.d, (x0 + 4, y0 + 4, x1 - 4, y1 - 4), product, self.rng)

    def bottom_bar(self, items=(), primary=None, secondary=None, h=56):
        y0 = self.H - h
        self.d.rectangle((0, y0, self.W, self.H), fill=(255, 255, 255))
        self.d.line((0, y0, self.W, y0), fill=(230, 230, 230))
        x = 14
        for it in items:
            self.d.ellipse((x + 6, y0 + 9, x + 22, y0 + 25), outline=MUTED)
            self.text(x, y0 + 30, it, 11, MUTED)
            x += 44
        xr = self.W - 12
        if primary:
            xr = self.button(xr, y0 + 12, primary, filled=True, anchor="right", size=14) - 6
        if secondary:
            self.button(xr, y0 + 12, secondary, filled=True, color=_tint(self.accent, 0.35), anchor="right", size=14)

    def snippets(self, n):
        """Random shared-vocabulary text at random places (noise and confounders)."""
        for _ in range(n):
            s = self.rng.choice(T.SHARED_SNIPPETS)
            x = self.rng.randrange(8, max(9, self.W - 80))
            y = self.rng.randrange(30, self.H - 20)
            self.text(x, y, s, self.rng.choice((10, 11, 12)), self.rng.choice((MUTED, self.accent, (180, 180, 180))))

    def grid(self, rng_products: int, y=None, cols=2, h=150, title="猜你喜欢"):
        """A product grid (recommendations) from the cursor down."""
        y = self.y + 8 if y is None else y
        if y > self.H - 80:
            return
        self.text(self.W // 2, y + 8, f"— {title} —", 13, MUTED, anchor="mm")
        y += 22
        w = (self.W - 10 * (cols + 1)) // cols
        k = 0
        while y + h < self.H - 60 and k < rng_products:
            for c in range(cols):
                p = _product(self.rng)
                x = 10 + c * (w + 10)
                self.d.rounded_rectangle((x, y, x + w, y + h), 8, fill=(255, 255, 255))
                self.thumb((x + 6, y + 6, x + w - 6, y + h - 46), p)
                self.text(x + 6, y + h - 40, f"{p.brand}{p.category}"[:9], 12)
                self.text(x + 6, y + h - 22, f"¥{p.price}", 13, self.accent)
                k += 1
            y += h + 10
        self.y = y

    def maybe_grid(self, p=0.6):
        """Fill the empty lower part of a page with recommendations, as real apps do."""
        if self.y < self.H - 260 and self.rng.random() < p:
            self.grid(6, title=self.rng.choice(("猜你喜欢", "为你推荐", "看了又看", "店铺推荐")))

    def dim(self, alpha=0.55):
        over = Image.new("RGB", self.img.size, (0, 0, 0))
        self.img = Image.blend(self.img, over, alpha)
        self.d = ImageDraw.Draw(self.img)


def _tint(c, t):
    """Blend colour ``c`` towards white by ``t``."""
    return tuple(int(v + (255 - v) * t) for v in c)


def _shade(c, t):
    return tuple(int(v * (1 - t)) for v in c)


SHAPES = {
    "保温杯": "cup", "密封罐": "jar", "饭盒": "box", "电热水壶": "cup", "台灯": "lamp", "吸顶灯": "round",
    "风扇灯": "round", "洗衣机": "washer", "洗碗机": "washer", "净水器": "box", "手机": "phone", "路由器": "router",
    "智能手表": "watch", "蓝牙耳机": "round", "面膜": "box", "精华液": "bottle", "防晒霜": "bottle", "奶粉": "jar",
    "纸尿裤": "box", "羽绒服": "shirt", "卫衣": "shirt", "牛仔裤": "pants", "运动鞋": "shoe", "绿萝": "plant",
    "多肉": "plant", "菜刀": "knife", "晾衣架": "rack", "钢化膜": "phone", "氨糖片": "bottle", "维生素": "bottle",
    "洗衣液": "bottle", "空气炸锅": "washer", "扫地机器人": "round", "加湿器": "jar", "电暖器": "router",
    "四件套": "sheet", "毛巾": "sheet", "手机壳": "phone", "墙纸": "sheet", "不锈钢锅": "pot",
}


def draw_product(d, box, p: Product, rng: random.Random):
    """A simple drawing of the product's category shape inside ``box``."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    col, dark, light = p.color, _shade(p.color, 0.35), _tint(p.color, 0.4)
    kind = SHAPES.get(p.category, "box")
    s = min(w, h)
    if kind == "cup":
        d.rounded_rectangle((cx - s * .2, cy - s * .3, cx + s * .2, cy + s * .42), int(s * .06) + 1, fill=col)
        d.rectangle((cx - s * .21, cy - s * .42, cx + s * .21, cy - s * .3), fill=dark)
    elif kind == "jar":
        d.rounded_rectangle((cx - s * .3, cy - s * .25, cx + s * .3, cy + s * .4), int(s * .08) + 1, fill=light, outline=dark)
        d.rectangle((cx - s * .27, cy - s * .38, cx + s * .27, cy - s * .25), fill=col)
    elif kind == "bottle":
        d.rounded_rectangle((cx - s * .18, cy - s * .15, cx + s * .18, cy + s * .42), int(s * .05) + 1, fill=col)
        d.rectangle((cx - s * .07, cy - s * .32, cx + s * .07, cy - s * .15), fill=light)
        d.rectangle((cx - s * .09, cy - s * .42, cx + s * .09, cy - s * .32), fill=dark)
        d.rectangle((cx - s * .14, cy, cx + s * .14, cy + s * .16), fill=_tint(col, 0.8))
    elif kind == "lamp":
        d.ellipse((cx - s * .25, cy + s * .32, cx + s * .25, cy + s * .42), fill=dark)
        d.line((cx, cy + s * .35, cx - s * .1, cy - s * .1, cx + s * .15, cy - s * .3), fill=dark, width=max(2, int(s * .04)))
        d.polygon(((cx + s * .05, cy - s * .35), (cx + s * .35, cy - s * .3), (cx + s * .2, cy - s * .12)), fill=col)
    elif kind == "round":
        d.ellipse((cx - s * .4, cy - s * .4, cx + s * .4, cy + s * .4), fill=col, outline=dark, width=2)
        d.ellipse((cx - s * .15, cy - s * .15, cx + s * .15, cy + s * .15), fill=light)
    elif kind == "washer":
        d.rounded_rectangle((cx - s * .35, cy - s * .42, cx + s * .35, cy + s * .42), int(s * .05) + 1, fill=light, outline=dark)
        d.ellipse((cx - s * .22, cy - s * .15, cx + s * .22, cy + s * .29), fill=col, outline=dark, width=2)
        d.rectangle((cx - s * .3, cy - s * .36, cx + s * .3, cy - s * .26), fill=dark)
    elif kind == "phone":
        d.rounded_rectangle((cx - s * .22, cy - s * .42, cx + s * .22, cy + s * .42), int(s * .06) + 1, fill=dark)
        d.rounded_rectangle((cx - s * .19, cy - s * .38, cx + s * .19, cy + s * .38), int(s * .04) + 1, fill=light)
    elif kind == "router":
        d.rounded_rectangle((cx - s * .4, cy, cx + s * .4, cy + s * .2), int(s * .05) + 1, fill=col)
        for k in (-.3, -.1, .1, .3):
            d.line((cx + s * k, cy, cx + s * k * 1.2, cy - s * .35), fill=dark, width=max(2, int(s * .03)))
    elif kind == "watch":
        d.rectangle((cx - s * .12, cy - s * .45, cx + s * .12, cy + s * .45), fill=dark)
        d.rounded_rectangle((cx - s * .2, cy - s * .22, cx + s * .2, cy + s * .22), int(s * .06) + 1, fill=col)
    elif kind == "shirt":
        d.polygon(((cx - s * .2, cy - s * .4), (cx - s * .42, cy - s * .2), (cx - s * .32, cy - s * .08), (cx - s * .24, cy - s * .14),
                   (cx - s * .24, cy + s * .42), (cx + s * .24, cy + s * .42), (cx + s * .24, cy - s * .14), (cx + s * .32, cy - s * .08),
                   (cx + s * .42, cy - s * .2), (cx + s * .2, cy - s * .4), (cx, cy - s * .32)), fill=col)
    elif kind == "pants":
        d.polygon(((cx - s * .25, cy - s * .42), (cx + s * .25, cy - s * .42), (cx + s * .3, cy + s * .42), (cx + s * .06, cy + s * .42),
                   (cx, cy - s * .1), (cx - s * .06, cy + s * .42), (cx - s * .3, cy + s * .42)), fill=col)
    elif kind == "shoe":
        d.polygon(((cx - s * .42, cy + s * .15), (cx - s * .38, cy - s * .15), (cx - s * .05, cy - s * .12), (cx + s * .25, cy + s * .02),
                   (cx + s * .42, cy + s * .12), (cx + s * .42, cy + s * .22), (cx - s * .42, cy + s * .22)), fill=col)
        d.rectangle((cx - s * .42, cy + s * .2, cx + s * .42, cy + s * .26), fill=(245, 245, 245))
    elif kind == "plant":
        d.polygon(((cx - s * .22, cy + s * .05), (cx + s * .22, cy + s * .05), (cx + s * .16, cy + s * .42), (cx - s * .16, cy + s * .42)), fill=col)
        for k in range(6):
            a = -math.pi / 2 + (k - 2.5) * 0.45
            ex, ey = cx + math.cos(a) * s * .28, cy + s * .02 + math.sin(a) * s * .32
            d.ellipse((ex - s * .09, ey - s * .06, ex + s * .09, ey + s * .06), fill=(50, 150 + 10 * k, 60))
    elif kind == "knife":
        d.polygon(((cx - s * .42, cy - s * .12), (cx + s * .15, cy - s * .12), (cx + s * .15, cy + s * .1), (cx - s * .35, cy + s * .1)),
                  fill=(200, 205, 210), outline=(120, 120, 125))
        d.rounded_rectangle((cx + s * .15, cy - s * .06, cx + s * .45, cy + s * .06), 3, fill=col)
    elif kind == "rack":
        d.line((cx - s * .4, cy - s * .2, cx + s * .4, cy - s * .2), fill=dark, width=4)
        for k in (-.35, .35):
            d.line((cx + s * k, cy - s * .2, cx + s * k * .8, cy + s * .42), fill=col, width=4)
    elif kind == "sheet":
        d.rectangle((cx - s * .4, cy - s * .3, cx + s * .4, cy + s * .3), fill=col)
        for k in range(1, 6):
            yy = cy - s * .3 + k * s * .1
            d.line((cx - s * .4, yy, cx + s * .4, yy), fill=light, width=2)
    elif kind == "pot":
        d.ellipse((cx - s * .38, cy - s * .2, cx + s * .38, cy + s * .3), fill=(190, 192, 198), outline=dark, width=2)
        d.ellipse((cx - s * .3, cy - s * .14, cx + s * .3, cy + s * .18), fill=(120, 122, 128))
        d.rectangle((cx + s * .36, cy - s * .02, cx + s * .48, cy + s * .04), fill=col)
    else:  # box
        d.rectangle((cx - s * .32, cy - s * .3, cx + s * .32, cy + s * .36), fill=col)
        d.rectangle((cx - s * .32, cy - s * .06, cx + s * .32, cy + s * .08), fill=light)


# -- the 25 scenes -------------------------------------------------------------------------------
def _now(rng) -> str:
    return f"{rng.randrange(8, 11):02d}-{rng.randrange(1, 29):02d} {rng.randrange(0, 24):02d}:{rng.randrange(60):02d}"


def _date(rng) -> str:
    return f"2024-{rng.randrange(5, 11):02d}-{rng.randrange(1, 29):02d} {rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}"


def _product_row(pg: Page, p: Product, box, qty=True, sku=True):
    x0, y0, x1, _y1 = box
    pg.thumb((x0 + 10, y0 + 10, x0 + 80, y0 + 80), p)
    pg.wrap(x0 + 90, y0 + 10, p.title, 13, width=x1 - x0 - 160, max_lines=2)
    if sku:
        pg.text(x0 + 90, y0 + 50, f"颜色分类:{pg.rng.choice(('黑色', '白色', '米色', '灰蓝', '标准款', '升级款'))}", 11, MUTED)
    pg.text(x1 - 10, y0 + 10, f"¥{p.price}", 13, TEXT, anchor="ra")
    if qty:
        pg.text(x1 - 10, y0 + 30, f"x{pg.rng.randrange(1, 4)}", 12, MUTED, anchor="ra")


def _address(pg: Page):
    b = pg.card(70)
    pg.text(b[0] + 14, b[1] + 12, pg.rng.choice(("收货地址", "默认地址", "")) + " ", 12, MUTED)
    pg.redact(b[0] + 14, b[1] + 32, pg.rng.randrange(120, 260))
    pg.redact(b[0] + 14, b[1] + 50, pg.rng.randrange(60, 140), 10)


def _timeline(pg: Page, entries, x=28, color=None, max_y=None):
    color = color or pg.accent
    y = pg.y + 10
    max_y = max_y or pg.H - 70
    for i, (title, body) in enumerate(entries):
        if y > max_y:
            break
        c = color if i == 0 else (190, 190, 190)
        pg.d.ellipse((x - 5, y + 3, x + 5, y + 13), fill=c)
        pg.d.line((x, y + 14, x, y + 52), fill=(220, 220, 220), width=1)
        pg.text(x + 14, y, f"{title} {_now(pg.rng)}", 13, TEXT if i == 0 else MUTED)
        y = pg.wrap(x + 14, y + 20, body, 11, fill=MUTED, max_lines=2, width=pg.W - x - 40) + 6
    pg.y = y


def _track_bodies(rng):
    c1, c2 = rng.sample(T.CITIES, 2)
    return (("运输中", f"快件已到达【{c1}转运中心】，准备发往下一站"),
            ("运输中", f"快件离开【{c2}分拨中心】，发往{c1}"),
            ("已揽件", f"【{c2}】快递员已揽收，运单号{rng.randrange(10**11, 10**12)}"),
            ("已发货", "商家已发货，包裹等待揽收"),
            ("已下单", "商品已下单，等待商家发货"))


def scene_order(pg: Page, p: Product):
    title = pg.rng.choice(("订单详情", "交易成功", "等待买家收货", "卖家已发货", "待收货"))
    pg.status_bar()
    pg.header(title)
    if pg.rng.random() < 0.5:
        b = pg.card(50)
        pg.text(b[0] + 14, b[1] + 10, pg.rng.choice(T.COURIERS) + " 运输中", 13, pg.accent)
        pg.text(b[0] + 14, b[1] + 30, "查看物流 >", 11, MUTED)
    _address(pg)
    b = pg.card(150)
    pg.text(b[0] + 14, b[1] + 8, f"{p.brand}旗舰店 >", 13)
    _product_row(pg, p, (b[0], b[1] + 24, b[2], b[3]))
    xr = b[2] - 10
    for lab in pg.rng.sample(("申请售后", "加入购物车", "卖了换钱", "退换货"), 2):
        xr = pg.button(xr, b[3] - 36, lab, anchor="right", size=11) - 6
    b = pg.card(24 * 6 + 10)
    rows = [("订单编号", str(pg.rng.randrange(10**17, 10**18)) + " 复制"), ("支付宝交易号", "2024" + str(pg.rng.randrange(10**10, 10**11))),
            ("创建时间", _date(pg.rng)), ("付款时间", _date(pg.rng)), ("发货时间", _date(pg.rng)), ("成交时间", _date(pg.rng))]
    for i, (k, v) in enumerate(rows[: pg.rng.randrange(4, 7)]):
        pg.kv(b[0] + 14, b[2] - 14, b[1] + 10 + 24 * i, k, v, 12)
    pg.snippets(pg.rng.randrange(1, 4))
    pg.maybe_grid()
    pg.bottom_bar((), pg.rng.choice(("确认收货", "再买一单", "评价")), pg.rng.choice(("查看物流", "延长收货", None)))


def scene_payment(pg: Page, p: Product):
    pg.status_bar()
    if pg.rng.random() < 0.5:
        pg.header(pg.rng.choice(("确认付款", "收银台", "支付订单")))
        amount_y = pg.y + 30
    else:
        pg.y += 30
        amount_y = pg.y + 20
    pg.text(pg.W // 2, amount_y, f"¥{p.price}", 32, TEXT, anchor="mm")
    pg.text(pg.W // 2, amount_y + 30, pg.rng.choice(("支付剩余时间 14:52", "订单信息 " + p.name, "请在30分钟内完成支付")), 12, MUTED, anchor="mm")
    pg.y = amount_y + 50
    methods = ["花呗分期", "余额宝", "账户余额", f"{pg.rng.choice(('招商', '建设', '工商', '农业'))}银行储蓄卡(尾号{pg.rng.randrange(1000, 9999)})",
               "银行卡分期", "亲友代付"]
    pg.rng.shuffle(methods)
    b = pg.card(46 * 5)
    chosen = pg.rng.randrange(5)
    for i, m in enumerate(methods[:5]):
        y = b[1] + 12 + 46 * i
        pg.d.ellipse((b[0] + 14, y, b[0] + 34, y + 20), fill=_tint(PALETTE[i], 0.2))
        pg.text(b[0] + 44, y + 2, m, 14)
        pg.d.ellipse((b[2] - 32, y + 2, b[2] - 16, y + 18), outline=MUTED, fill=pg.accent if i == chosen else None)
    if pg.rng.random() < 0.5:
        b = pg.card(60)
        pg.text(b[0] + 14, b[1] + 10, "分期付款", 13)
        pg.text(b[0] + 14, b[1] + 32, f"3期(0利率) ¥{float(p.price) / 3:.2f}/期  6期 12期", 12, MUTED)
    pg.snippets(pg.rng.randrange(0, 3))
    pg.maybe_grid()
    pg.bottom_bar((), pg.rng.choice(("立即付款", "确认交易", "确认支付")))


def scene_fail_popup(pg: Page, p: Product):
    base = pg.rng.choice((scene_product_detail, scene_sku, scene_cart, scene_order))
    base(pg, p)
    pg.dim(pg.rng.choice((0.45, 0.55, 0.65)))
    w, h = pg.W - 70, 190
    x0, y0 = 35, pg.rng.randrange(220, 380)
    pg.d.rounded_rectangle((x0, y0, x0 + w, y0 + h), 14, fill=(255, 255, 255))
    pg.text(pg.W // 2, y0 + 30, pg.rng.choice(("购买失败", "下单失败", "提交订单失败", "无法购买", "抱歉，下单失败")), 17, TEXT, anchor="mm")
    msg = pg.rng.choice(("当前购买人数过多，请稍后再试", "商品库存不足，请选择其他规格", "该商品不支持配送至当前地址",
                         "您的账户存在风险，暂时无法下单", "超出限购数量，每人限购1件", "优惠已失效，请返回重新下单"))
    pg.wrap(x0 + 20, y0 + 58, msg, 13, width=w - 40, fill=MUTED)
    pg.d.line((x0, y0 + h - 48, x0 + w, y0 + h - 48), fill=(230, 230, 230))
    labels = pg.rng.choice((("我知道了",), ("取消", "重新提交"), ("返回购物车",), ("确定",)))
    for k, lab in enumerate(labels):
        cx = x0 + w * (2 * k + 1) // (2 * len(labels))
        pg.text(cx, y0 + h - 24, lab, 15, pg.accent if k == len(labels) - 1 else TEXT, anchor="mm")


def scene_chat(pg: Page, p: Product):
    pg.status_bar()
    pg.header(pg.rng.choice((f"{p.brand}旗舰店", f"{p.brand}官方客服", "店小蜜")), right=("···",))
    lines = [T.GREETINGS_AGENT[0], *(q for q in pg.rng.sample(T.INTENTS[pg.rng.choice(INTENT_LABELS)]["clear"], 2)),
             *pg.rng.sample(T.IMAGE_REPLIES[:-1], 2), pg.rng.choice(T.GENERIC_REPLIES)]
    y = pg.y + 12
    if pg.rng.random() < 0.6:
        b = (10, y, pg.W - 10, y + 80)
        pg.d.rounded_rectangle(b, 8, fill=(255, 255, 255))
        _product_row(pg, p, b, qty=False, sku=False)
        y += 92
    for i, s in enumerate(lines):
        if y > pg.H - 120:
            break
        mine = i % 2 == 1
        s = _fmt(s, pg.rng, p).replace("{shop}", "")
        w = min(int(_width(s, 13)) + 20, pg.W - 110)
        n_lines = max(1, math.ceil((_width(s, 13) + 20) / (pg.W - 110)))
        h = 18 * min(n_lines, 3) + 14
        ax = pg.W - 30 if mine else 30
        pg.d.ellipse((ax - 14, y, ax + 14, y + 28), fill=(180, 200, 230) if mine else pg.accent)
        bx0 = ax - 22 - w if mine else ax + 22
        pg.d.rounded_rectangle((bx0, y, bx0 + w, y + h), 8, fill=(160, 230, 120) if mine else (255, 255, 255))
        pg.wrap(bx0 + 10, y + 8, s, 13, width=w - 20, max_lines=3)
        y += h + 14
    pg.d.rectangle((0, pg.H - 60, pg.W, pg.H), fill=(250, 250, 250))
    pg.d.rounded_rectangle((12, pg.H - 50, pg.W - 80, pg.H - 16), 8, fill=(255, 255, 255), outline=(220, 220, 220))
    pg.text(22, pg.H - 42, pg.rng.choice(("请输入消息", "说点什么...", "")), 13, MUTED)
    pg.button(pg.W - 70, pg.H - 48, "发送", filled=True, size=13)


def scene_reviews(pg: Page, p: Product):
    pg.status_bar()
    pg.header(pg.rng.choice((f"评价({pg.rng.randrange(2, 99)}万+)", "宝贝评价", "全部评价", "问大家")))
    tags = [f"{t}({pg.rng.randrange(10, 999)})" for t in pg.rng.sample(("质量很好", "物流快", "性价比高", "有图", "追评",
                                                                      "颜色正", "尺码合适", "包装严实", "有异味", "掉色"), 5)]
    x, y = 12, pg.y + 8
    for t in tags:
        x2 = x + int(_width(t, 11)) + 18
        if x2 > pg.W - 10:
            x, y = 12, y + 30
            x2 = x + int(_width(t, 11)) + 18
        pg.d.rounded_rectangle((x, y, x2, y + 22), 11, fill=_tint(pg.accent, 0.85))
        pg.text(x + 9, y + 4, t, 11, TEXT)
        x = x2 + 8
    pg.y = y + 30
    texts = ("收到了，质量不错，和描述一致，物流也很快", "用了一周再来评价，整体满意，就是包装有点简陋",
             "第二次购买了，一如既往的好，推荐", "颜色比图片深一点，其他都还可以，客服态度好",
             "东西不错，物流慢了两天，希望改进", "性价比很高，家里人都说好，还会回购的")
    while pg.y < pg.H - 150:
        y = pg.y + 8
        pg.d.ellipse((12, y, 42, y + 30), fill=_tint(PALETTE[pg.rng.randrange(len(PALETTE))], 0.3))
        nick = f"{pg.rng.choice('tjx小阿木')}**{pg.rng.randrange(10)}"
        pg.text(50, y, nick, 12)
        pg.text(50, y + 17, "★" * pg.rng.randrange(3, 6) + f"  {_now(pg.rng)[:5]}", 11, (250, 160, 0))
        y = pg.wrap(14, y + 40, pg.rng.choice(texts), 13, max_lines=3)
        if pg.rng.random() < 0.5:
            for k in range(pg.rng.randrange(1, 4)):
                pg.thumb((14 + 86 * k, y + 4, 94 + 86 * k, y + 84), p)
            y += 90
        pg.d.line((14, y + 6, pg.W - 14, y + 6), fill=(230, 230, 230))
        pg.y = y + 8
    pg.maybe_grid(0.5)
    pg.snippets(pg.rng.randrange(0, 3))
    if pg.rng.random() < 0.5:
        pg.bottom_bar(("店铺", "客服"), "立即购买", "加入购物车")


def scene_logistics_list(pg: Page, p: Product):
    pg.status_bar()
    pg.header(pg.rng.choice(("我的物流", "物流", "我的快递", "包裹")))
    x = 14
    for t in ("全部", "待取件", "派送中", "运输中", "已签收"):
        x = pg.text(x, pg.y + 6, t, 13, pg.accent if t == "全部" else MUTED) + 18
    pg.y += 26
    while pg.y < pg.H - 140:
        q = _product(pg.rng)
        b = pg.card(112)
        pg.thumb((b[0] + 10, b[1] + 10, b[0] + 74, b[1] + 74), q)
        status = pg.rng.choice(("运输中", "派送中", "已签收", "待取件", "已发货"))
        pg.text(b[0] + 84, b[1] + 10, status, 14, pg.accent if status != "已签收" else TEXT)
        pg.text(b[2] - 10, b[1] + 12, pg.rng.choice(T.COURIERS), 11, MUTED, anchor="ra")
        pg.wrap(b[0] + 84, b[1] + 32, pg.rng.choice(_track_bodies(pg.rng))[1], 12, fill=MUTED, width=b[2] - b[0] - 100, max_lines=2)
        pg.text(b[0] + 84, b[1] + 90, _now(pg.rng), 11, MUTED)
    pg.snippets(pg.rng.randrange(0, 3))


def _map(pg: Page, h):
    y0 = pg.y
    pg.d.rectangle((0, y0, pg.W, y0 + h), fill=(226, 234, 222))
    for _ in range(9):
        x1, y1 = pg.rng.randrange(pg.W), y0 + pg.rng.randrange(h)
        x2, y2 = pg.rng.randrange(pg.W), y0 + pg.rng.randrange(h)
        pg.d.line((x1, y1, x2, y2), fill=(250, 250, 250), width=pg.rng.choice((2, 3, 5)))
    for c in pg.rng.sample(T.CITIES, 3):
        pg.text(pg.rng.randrange(20, pg.W - 60), y0 + pg.rng.randrange(10, h - 20), c, 11, (120, 130, 120))
    return y0


def scene_logistics_track(pg: Page, p: Product):
    pg.status_bar()
    if pg.rng.random() < 0.6:
        y0 = _map(pg, pg.rng.randrange(180, 280))
        pg.text(14, y0 + 8, "<", 18)
        msg = pg.rng.choice(("包裹离你越来越近了", "预计明天送达", "正在派送中", "包裹已到达您所在城市"))
        w = int(_width(msg, 14)) + 30
        pg.d.rounded_rectangle((pg.W // 2 - w // 2, y0 + 90, pg.W // 2 + w // 2, y0 + 124), 17, fill=pg.accent)
        pg.text(pg.W // 2, y0 + 107, msg, 14, (255, 255, 255), anchor="mm")
        pg.y = y0 + pg.rng.randrange(180, 280)
    else:
        pg.header(pg.rng.choice(("物流详情", "查看物流", "物流跟踪")))
    b = pg.card(56)
    pg.text(b[0] + 14, b[1] + 10, f"{pg.rng.choice(T.COURIERS)}  {pg.rng.randrange(10**11, 10**13)}", 13)
    pg.text(b[2] - 14, b[1] + 10, "复制 | 打电话", 12, MUTED, anchor="ra")
    pg.text(b[0] + 14, b[1] + 32, "预计送达 " + _now(pg.rng)[:5], 11, MUTED)
    _timeline(pg, _track_bodies(pg.rng))
    pg.maybe_grid(0.5)
    pg.snippets(pg.rng.randrange(0, 3))


def scene_logistics_error(pg: Page, p: Product):
    pg.status_bar()
    pg.header(pg.rng.choice(("物流详情", "物流异常", "包裹详情", "查看物流")))
    b = pg.card(74, fill=(255, 243, 240))
    warn = pg.rng.choice(("物流异常提醒", "包裹滞留提醒", "派送异常", "物流停滞", "快件异常"))
    pg.text(b[0] + 14, b[1] + 10, "⚠ " + warn if pg.rng.random() < 0.3 else warn, 14, (220, 50, 40))
    pg.wrap(b[0] + 14, b[1] + 34, pg.rng.choice(("受天气影响，您的快件可能会延迟送达，请耐心等待", "包裹超过48小时未更新物流信息，可联系卖家处理",
                                                "快件派送不成功，收件人电话无人接听", "包裹疑似丢失，已为您发起核查",
                                                "地址信息有误，快件将退回寄件人")), 12, fill=MUTED, width=b[2] - b[0] - 28, max_lines=2)
    bodies = list(_track_bodies(pg.rng))
    bodies.insert(0, (pg.rng.choice(("异常", "派送失败", "退回中", "滞留")), pg.rng.choice((
        "快件在【转运中心】滞留，正在加紧处理", "收件人地址超区，无法派送", "快件已被退回，请联系商家", "包裹破损，已联系寄件人"))))
    _timeline(pg, bodies, color=(220, 50, 40))
    pg.button(14, min(pg.y + 6, pg.H - 50), pg.rng.choice(("联系卖家", "催物流", "投诉快递")), size=12)
    pg.maybe_grid(0.5)
    pg.snippets(pg.rng.randrange(0, 3))


def _aftersale(pg: Page, p: Product, kind: str):
    """Shared layout of the refund / return / exchange pages."""
    pg.status_bar(bg=pg.accent if pg.rng.random() < 0.5 else None)
    hdr = {"refund": ("退款详情", "售后详情", "退款进度"), "return": ("退货退款", "售后详情", "退货详情"),
           "exchange": ("换货详情", "售后详情", "换货进度")}[kind]
    pg.header(pg.rng.choice(hdr))
    b = pg.card(86)
    status = {"refund": ("退款成功", "退款中", "商家已同意退款", "退款关闭", "等待商家处理退款"),
              "return": ("请退货", "商家已同意退货申请", "等待商家收货", "退货成功", "请填写退货物流"),
              "exchange": ("商家已同意换货", "请寄回商品", "商家已重新发货", "换货完成", "等待商家确认换货")}[kind]
    pg.text(b[0] + 14, b[1] + 12, pg.rng.choice(status), 17, pg.accent)
    money = f"¥{p.price}"
    if kind != "exchange" or pg.rng.random() < 0.3:
        pg.text(b[2] - 14, b[1] + 12, money, 17, pg.accent, anchor="ra")
    pg.text(b[0] + 14, b[1] + 40, _date(pg.rng), 11, MUTED)
    pg.text(b[0] + 14, b[1] + 60, pg.rng.choice(("平台已介入监督", "如有疑问可联系卖家", "剩余6天23时自动确认")), 11, MUTED)
    if kind == "refund":
        b = pg.card(100)
        pg.kv(b[0] + 14, b[2] - 14, b[1] + 12, "退回支付宝余额", money)
        pg.kv(b[0] + 14, b[2] - 14, b[1] + 38, pg.rng.choice(("退优惠券", "退红包", "退运费")), pg.rng.choice(("1张券", "¥5.00", "¥0.00")))
        pg.button(b[0] + 100, b[1] + 64, "查看钱款去向", size=12)
    elif kind == "return":
        b = pg.card(130)
        pg.text(b[0] + 14, b[1] + 10, "退货方式", 13)
        x = b[0] + 14
        for lab in pg.rng.sample(("上门取件", "自行寄回", "驿站自寄"), 2):
            x = pg.button(x, b[1] + 34, lab, size=12) + 8
        pg.text(b[0] + 14, b[1] + 74, "退货地址", 12, MUTED)
        pg.redact(b[0] + 80, b[1] + 74, pg.rng.randrange(90, 200))
        pg.text(b[0] + 14, b[1] + 100, pg.rng.choice(("填写退货物流单号 >", "运费险预计赔付¥12 >", "寄件码 8" + str(pg.rng.randrange(1000, 9999)))), 12, pg.accent)
    else:
        b = pg.card(130)
        pg.text(b[0] + 14, b[1] + 10, "换货商品", 13)
        pg.text(b[0] + 14, b[1] + 34, f"原商品: {pg.rng.choice(('黑色', '白色', 'M码', 'L码'))}  →  新商品: {pg.rng.choice(('灰色', '米色', 'XL码', 'S码'))}", 12, MUTED)
        pg.text(b[0] + 14, b[1] + 58, "寄回商品 · 商家重新发货", 12, MUTED)
        pg.text(b[0] + 14, b[1] + 84, pg.rng.choice(("换货物流 >", "填写寄回单号 >", "查看换货进度 >")), 12, pg.accent)
    b = pg.card(150)
    pg.text(b[0] + 14, b[1] + 8, {"refund": "退款信息", "return": "退货信息", "exchange": "换货信息"}[kind], 13)
    _product_row(pg, p, (b[0], b[1] + 20, b[2], b[1] + 100))
    reason = pg.rng.choice(("七天无理由", "质量问题", "尺码不合适", "商品与描述不符", "不想要了", "发错货"))
    pg.kv(b[0] + 14, b[2] - 14, b[1] + 104, "售后原因", reason, 12)
    pg.kv(b[0] + 14, b[2] - 14, b[1] + 126, "申请时间", _date(pg.rng), 12)
    if pg.rng.random() < 0.4 and pg.y < pg.H - 200:
        _timeline(pg, (("处理中", "售后申请已提交"), ("已提交", "等待商家处理")))
    pg.snippets(pg.rng.randrange(1, 4))
    if pg.rng.random() < 0.6:
        pg.bottom_bar(("联系卖家", "官方客服"), pg.rng.choice(("撤销申请", "修改申请", "钱款去向", None)))
    else:
        pg.grid(4)


def scene_refund(pg, p):
    _aftersale(pg, p, "refund")


def scene_return(pg, p):
    _aftersale(pg, p, "return")


def scene_exchange(pg, p):
    _aftersale(pg, p, "exchange")


def scene_cart(pg: Page, p: Product):
    pg.status_bar()
    n = pg.rng.randrange(2, 9)
    pg.text(14, pg.y + 10, f"购物车({n})", 18)
    pg.text(pg.W - 14, pg.y + 14, "管理", 13, anchor="ra")
    pg.y += 40
    while pg.y < pg.H - 190:
        q = p if pg.rng.random() < 0.4 else _product(pg.rng)
        b = pg.card(130)
        pg.d.ellipse((b[0] + 10, b[1] + 12, b[0] + 26, b[1] + 28), outline=MUTED, fill=pg.accent if pg.rng.random() < .5 else None)
        pg.text(b[0] + 34, b[1] + 12, f"{q.brand}{pg.rng.choice(('旗舰店', '专营店', '家居馆'))} >", 13)
        pg.thumb((b[0] + 34, b[1] + 38, b[0] + 110, b[1] + 114), q)
        pg.wrap(b[0] + 120, b[1] + 40, q.title, 12, width=b[2] - b[0] - 134, max_lines=2)
        pg.text(b[0] + 120, b[1] + 92, f"¥{q.price}", 15, pg.accent)
        x = b[2] - 80
        pg.d.rectangle((x, b[1] + 92, x + 68, b[1] + 112), outline=(210, 210, 210))
        pg.text(x + 34, b[1] + 102, f"-  {pg.rng.randrange(1, 4)}  +", 12, anchor="mm")
    pg.snippets(pg.rng.randrange(0, 3))
    y0 = pg.H - 56
    pg.d.rectangle((0, y0, pg.W, pg.H), fill=(255, 255, 255))
    pg.text(14, y0 + 18, "全选", 13)
    pg.text(pg.W - 110, y0 + 18, f"合计: ¥{p.price}", 13, anchor="ra")
    pg.button(pg.W - 12, y0 + 12, f"结算({pg.rng.randrange(1, n + 1)})", filled=True, anchor="right", size=14)


def scene_shop(pg: Page, p: Product):
    pg.status_bar()
    h = pg.rng.randrange(110, 170)
    pg.d.rectangle((0, pg.y, pg.W, pg.y + h), fill=_shade(pg.accent, 0.2))
    pg.d.ellipse((14, pg.y + 20, 64, pg.y + 70), fill=(255, 255, 255))
    pg.text(22, pg.y + 36, p.brand[:2], 14, pg.accent)
    pg.text(74, pg.y + 22, f"{p.brand}{pg.rng.choice(('官方旗舰店', '旗舰店', '专营店', '家居馆'))}", 16, (255, 255, 255))
    pg.text(74, pg.y + 46, f"粉丝{pg.rng.randrange(1, 900)}万  {pg.rng.choice(('金牌店铺', '品牌官方', '回头客8万'))}", 11, (240, 240, 240))
    pg.button(pg.W - 14, pg.y + 26, pg.rng.choice(("关注", "已关注", "+ 关注")), filled=True, color=(255, 255, 255), anchor="right", size=12)
    pg.text(pg.W - 80, pg.y + 30, "关注", 12, pg.accent)
    pg.y += h
    x = 14
    for t in ("首页", "宝贝", "新品", "分类", "直播", "活动专区"):
        x = pg.text(x, pg.y + 10, t, 14, pg.accent if t == "首页" else TEXT) + 18
    pg.y += 36
    if pg.rng.random() < 0.6:
        b = pg.card(120, fill=_tint(pg.accent, 0.8))
        draw_product(pg.d, (b[0] + 10, b[1] + 10, b[0] + 120, b[3] - 10), p, pg.rng)
        pg.text(b[0] + 140, b[1] + 26, pg.rng.choice(("新品首发", "镇店之宝", "店铺爆款", "会员专享")), 18, TEXT)
        pg.text(b[0] + 140, b[1] + 60, f"到手价 ¥{p.price}", 14, pg.accent)
    pg.grid(6, title=pg.rng.choice(("店铺推荐", "热销榜单", "全部宝贝")))
    pg.snippets(pg.rng.randrange(0, 3))


def scene_activity(pg: Page, p: Product):
    festive = pg.rng.choice(((220, 30, 40), (250, 90, 20), (230, 40, 120), (120, 40, 200)))
    pg.img.paste(festive, (0, 0, pg.W, pg.H))
    pg.status_bar(fg=(255, 255, 255))
    pg.header(pg.rng.choice(("整点抢红包", "活动会场", "国庆大促", "双11狂欢节", "618年中大促", "年货节")), fg=(255, 255, 255))
    pg.text(pg.W // 2, pg.y + 40, pg.rng.choice(("满300减50", "限时秒杀", "跨店满减", "百亿补贴", "第二件半价")), 30, (255, 235, 120), anchor="mm")
    pg.text(pg.W // 2, pg.y + 78, f"距结束 {pg.rng.randrange(24):02d}:{pg.rng.randrange(60):02d}:{pg.rng.randrange(60):02d}  每场可抢{pg.rng.randrange(1, 5)}次", 13, (255, 255, 255), anchor="mm")
    pg.y += 100
    b = pg.card(110, fill=(255, 240, 225))
    w = (b[2] - b[0] - 40) // 3
    for k in range(3):
        x = b[0] + 10 + k * (w + 10)
        pg.d.rounded_rectangle((x, b[1] + 10, x + w, b[3] - 10), 8, fill=(255, 255, 255))
        pg.text(x + w // 2, b[1] + 36, f"¥{pg.rng.choice((3, 5, 8, 10, 20))}", 20, festive, anchor="mm")
        pg.text(x + w // 2, b[1] + 64, pg.rng.choice(("已抢完", "去使用", "下场开抢", "立即抢")), 12, TEXT, anchor="mm")
    pg.y += 6
    while pg.y < pg.H - 120:
        q = p if pg.rng.random() < 0.3 else _product(pg.rng)
        b = pg.card(104)
        pg.thumb((b[0] + 10, b[1] + 10, b[0] + 94, b[1] + 94), q)
        pg.wrap(b[0] + 104, b[1] + 12, q.title, 13, width=b[2] - b[0] - 180, max_lines=2)
        pg.text(b[0] + 104, b[1] + 70, f"活动价 ¥{q.price}", 14, festive)
        pg.button(b[2] - 10, b[1] + 60, pg.rng.choice(("抢", "马上抢", "去购买")), filled=True, color=festive, anchor="right")
    pg.snippets(pg.rng.randrange(0, 3))


def scene_coupon(pg: Page, p: Product):
    pg.status_bar()
    pg.header(pg.rng.choice(("领券中心", "店铺优惠券", "红包使用明细", "我的优惠券", "领取优惠券")))
    if pg.rng.random() < 0.4:
        pg.text(14, pg.y + 8, f"该订单分摊到以下{pg.rng.randrange(2, 9)}个红包", 12, MUTED)
        pg.y += 26
    while pg.y < pg.H - 110:
        b = pg.card(84)
        pg.d.rectangle((b[0], b[1], b[0] + 110, b[3]), fill=_tint(pg.accent, 0.8))
        amt = pg.rng.choice((3, 5, 10, 20, 30, 50, 100))
        pg.text(b[0] + 55, b[1] + 32, f"¥{amt}", 24, pg.accent, anchor="mm")
        pg.text(b[0] + 55, b[1] + 60, f"满{amt * pg.rng.choice((5, 10, 20))}可用" if pg.rng.random() < .8 else "无门槛", 11, pg.accent, anchor="mm")
        pg.text(b[0] + 122, b[1] + 14, pg.rng.choice(("店铺优惠券", "跨店满减券", "品类券", "超级红包", "新人专享券")), 14)
        pg.text(b[0] + 122, b[1] + 38, f"有效期至 2024.{pg.rng.randrange(9, 13)}.{pg.rng.randrange(1, 29):02d}", 11, MUTED)
        pg.button(b[2] - 10, b[1] + 50, pg.rng.choice(("立即领取", "已领取", "去使用", "领取")), filled=pg.rng.random() < 0.6, anchor="right", size=11)
    pg.maybe_grid(0.5)
    pg.snippets(pg.rng.randrange(1, 3))


def scene_sku(pg: Page, p: Product):
    """商品分类选项: the option sheet over a dimmed product page."""
    pg.status_bar()
    pg.y = 24
    pg.thumb((0, 24, pg.W, 24 + pg.W), p)
    pg.dim(0.45)
    top = pg.rng.randrange(110, 260)
    pg.d.rounded_rectangle((0, top, pg.W, pg.H + 20), 14, fill=(255, 255, 255))
    pg.thumb((14, top + 14, 104, top + 104), p)
    pg.text(116, top + 30, f"¥{p.price}", 22, pg.accent)
    pg.text(116, top + 62, pg.rng.choice(("已选:", "请选择:")) + " " + pg.rng.choice(("颜色分类", "尺码", "规格", "套餐类型")), 12, MUTED)
    pg.text(116, top + 82, f"库存{pg.rng.randrange(0, 500)}件" if pg.rng.random() < 0.5 else "券后价", 11, MUTED)
    y = top + 118
    groups = (("颜色分类", ("黑色", "白色", "米杏色", "雾霾蓝", "灰色", "酒红")), ("尺码", ("S", "M", "L", "XL", "2XL")),
              ("规格", ("500ml", "750ml", "1L", "单只装", "两只装")), ("套餐类型", ("官方标配", "套餐一", "套餐二", "升级款", "标准版", "Pro版")),
              ("容量", ("5片/盒", "10片/盒", "30片/箱")))
    for name, opts in pg.rng.sample(groups, 2):
        pg.text(14, y, name, 13)
        y += 24
        x = 14
        for o in pg.rng.sample(opts, min(len(opts), pg.rng.randrange(3, 6))):
            w = int(_width(o, 12)) + 24
            if x + w > pg.W - 14:
                x, y = 14, y + 36
            sel = pg.rng.random() < 0.2
            pg.d.rounded_rectangle((x, y, x + w, y + 28), 6, fill=_tint(pg.accent, 0.85) if sel else (245, 245, 245),
                                   outline=pg.accent if sel else None)
            pg.text(x + 12, y + 7, o, 12, pg.accent if sel else TEXT)
            x += w + 10
        y += 44
    pg.text(14, y, "数量", 13)
    pg.text(pg.W - 20, y, "-  1  +", 13, anchor="ra")
    pg.snippets(pg.rng.randrange(0, 2))
    pg.bottom_bar((), pg.rng.choice(("立即购买", "确定", "领券购买")), pg.rng.choice(("加入购物车", None)))


def scene_product_head(pg: Page, p: Product):
    """商品头图: a big product picture (with promotion overlays) on top of a product page."""
    pg.status_bar()
    top = 24
    side = pg.W
    pg.d.rectangle((0, top, pg.W, top + side), fill=_tint(p.color, 0.8))
    draw_product(pg.d, (30, top + 30, pg.W - 30, top + side - 30), p, pg.rng)
    for s in pg.rng.sample(("新品上市", "买一送一", f"到手价¥{p.price}", "官方正品", "限时直降", "爆款热卖", p.attrs[0]), 2):
        x, y = pg.rng.randrange(10, pg.W - 120), top + pg.rng.randrange(10, side - 40)
        pg.d.rounded_rectangle((x, y, x + int(_width(s, 15)) + 16, y + 28), 6, fill=pg.accent)
        pg.text(x + 8, y + 5, s, 15, (255, 255, 255))
    pg.text(pg.W - 14, top + side - 22, f"1/{pg.rng.randrange(3, 9)}", 11, MUTED, anchor="ra")
    pg.y = top + side
    pg.d.rectangle((0, pg.y, pg.W, pg.y + 60), fill=pg.accent)
    pg.text(14, pg.y + 10, f"¥{p.price}", 24, (255, 255, 255))
    pg.text(pg.W - 14, pg.y + 20, pg.rng.choice(("年中开门红", "限时秒杀", "热卖中", "百亿补贴")), 13, (255, 255, 255), anchor="ra")
    pg.y += 66
    pg.wrap(14, pg.y, p.title + " " + pg.rng.choice(("官方正品", "包邮", "现货速发")), 14, max_lines=2)
    pg.snippets(pg.rng.randrange(0, 3))
    pg.bottom_bar(("店铺", "客服", "收藏"), "立即购买", "加入购物车")


def scene_product_square(pg: Page, p: Product):
    pg.d.rectangle((0, 0, pg.W, pg.H), fill=_tint(p.color, pg.rng.choice((0.6, 0.8, 0.9))))
    draw_product(pg.d, (40, 40, pg.W - 40, pg.H - 40), p, pg.rng)
    pg.d.rectangle((0, pg.H - 70, pg.W, pg.H), fill=pg.accent)
    pg.text(16, pg.H - 56, pg.rng.choice(("到手价", "券后", "活动价")) + f" ¥{p.price}", 26, (255, 255, 255))
    pg.text(16, 16, p.brand, 20, _shade(p.color, 0.5))
    pg.text(pg.W - 16, 16, pg.rng.choice(("新品", "爆款", "热卖", p.attrs[0])), 18, pg.accent, anchor="ra")


def scene_product_detail(pg: Page, p: Product):
    """商品详情页截图: a product page scrolled to its price/parameters/detail section."""
    pg.status_bar()
    if pg.rng.random() < 0.5:
        h = pg.rng.randrange(120, 220)
        pg.d.rectangle((0, pg.y, pg.W, pg.y + h), fill=_tint(p.color, 0.8))
        draw_product(pg.d, (60, pg.y + 10, pg.W - 60, pg.y + h - 10), p, pg.rng)
        pg.y += h
    b = pg.card(100)
    pg.text(b[0] + 14, b[1] + 10, f"¥{p.price}", 22, pg.accent)
    pg.text(b[0] + 120, b[1] + 18, pg.rng.choice(("券后价", "已售2000+", "月销1万+", "官方立减")), 12, MUTED)
    pg.wrap(b[0] + 14, b[1] + 44, p.title + " " + pg.rng.choice(("官方旗舰", "正品保障", "顺丰包邮")), 14, max_lines=2, width=b[2] - b[0] - 28)
    b = pg.card(112)
    rows = (("发货", f"{pg.rng.choice(T.CITIES)} 快递: 免运费"), ("保障", "7天无理由退货 · 假一赔四"),
            ("参数", f"品牌 {p.brand}  {p.attrs[0]} ..."), ("选择", f"{pg.rng.randrange(2, 12)}种{pg.rng.choice(('颜色分类', '规格', '尺码'))}可选"))
    for i, (k, v) in enumerate(rows):
        pg.text(b[0] + 14, b[1] + 10 + 25 * i, k, 12, MUTED)
        pg.text(b[0] + 60, b[1] + 10 + 25 * i, v, 12)
    b = pg.card(min(260, pg.H - pg.y - 80))
    pg.text(b[0] + 14, b[1] + 10, pg.rng.choice(("商品详情", "图文详情", "产品参数", "宝贝详情")), 14)
    y = b[1] + 36
    for a in p.attrs:
        if y > b[3] - 20:
            break
        pg.text(b[0] + 14, y, f"· {a}", 13)
        pg.text(b[0] + 140, y, pg.rng.choice(("核心卖点", "品质之选", "匠心工艺", "安心使用")), 12, MUTED)
        y += 24
    if y < b[3] - 60:
        pg.thumb((b[0] + 14, y, b[2] - 14, b[3] - 10), p)
    pg.snippets(pg.rng.randrange(0, 3))
    pg.maybe_grid()
    pg.bottom_bar(("店铺", "客服", "收藏"), "立即购买", "加入购物车")


def scene_bill(pg: Page, p: Product):
    pg.status_bar()
    pg.header(pg.rng.choice(("账单", "我的账单", "账户明细", "余额明细", "花呗账单")))
    b = pg.card(96, fill=_tint(pg.accent, 0.85))
    pg.text(b[0] + 14, b[1] + 12, f"2024年{pg.rng.randrange(5, 11)}月  ▼", 13)
    pg.text(b[0] + 14, b[1] + 40, f"支出 ¥{pg.rng.randrange(200, 9000)}.{pg.rng.randrange(100):02d}", 18)
    pg.text(b[0] + 14, b[1] + 70, f"收入 ¥{pg.rng.randrange(0, 3000)}.00   {pg.rng.choice(('账户余额', '可用额度', '本月应还'))} ¥{pg.rng.randrange(10, 5000)}", 12, MUTED)
    items = ("淘宝购物", "退款", "转账", "餐饮美食", "充值缴费", "红包", "余额宝收益", "信用卡还款", "交通出行", "花呗还款")
    while pg.y < pg.H - 70:
        y = pg.y + 12
        it = pg.rng.choice(items)
        pg.d.ellipse((14, y, 46, y + 32), fill=_tint(PALETTE[pg.rng.randrange(len(PALETTE))], 0.3))
        pg.text(56, y, it + ("-" + p.brand if it == "淘宝购物" and pg.rng.random() < 0.5 else ""), 14)
        pg.text(56, y + 19, _now(pg.rng), 11, MUTED)
        sign = "+" if it in ("退款", "红包", "余额宝收益") else "-"
        pg.text(pg.W - 14, y + 6, f"{sign}{pg.rng.randrange(1, 900)}.{pg.rng.randrange(100):02d}", 15, (40, 160, 80) if sign == "+" else TEXT, anchor="ra")
        pg.d.line((56, y + 42, pg.W, y + 42), fill=(235, 235, 235))
        pg.y = y + 44
    pg.snippets(pg.rng.randrange(0, 2))


def scene_profile(pg: Page, p: Product):
    pg.status_bar(bg=pg.accent, fg=(255, 255, 255))
    pg.d.rectangle((0, pg.y, pg.W, pg.y + 120), fill=pg.accent)
    pg.d.ellipse((16, pg.y + 20, 76, pg.y + 80), fill=(255, 255, 255))
    pg.text(88, pg.y + 26, f"{pg.rng.choice('tjx小阿木')}**{pg.rng.randrange(10)}", 17, (255, 255, 255))
    pg.text(88, pg.y + 54, pg.rng.choice(("淘气值 1200", "88VIP会员", "超级会员", "普通会员")), 12, (255, 240, 230))
    pg.y += 120
    rows = ("个人资料", "头像", "昵称", "性别", "生日", "手机号 1" + str(pg.rng.randrange(30, 90)) + "****" + str(pg.rng.randrange(1000, 9999)),
            "收货地址", "实名认证", "账号与安全", "会员等级", "我的二维码", "隐私设置")
    b = pg.card(min(46 * 9, pg.H - pg.y - 30))
    y = b[1] + 12
    for r in rows:
        if y > b[3] - 30:
            break
        pg.text(b[0] + 14, y, r, 14)
        pg.text(b[2] - 14, y, ">", 14, MUTED, anchor="ra")
        if pg.rng.random() < 0.3:
            pg.redact(b[2] - 140, y + 2, 100)
        pg.d.line((b[0] + 14, y + 32, b[2] - 14, y + 32), fill=(238, 238, 238))
        y += 44
    pg.snippets(pg.rng.randrange(0, 2))


def scene_complaint(pg: Page, p: Product):
    pg.status_bar()
    pg.header(pg.rng.choice(("投诉商家", "举报", "投诉", "我要投诉", "举报中心")))
    b = pg.card(60)
    _product_row(pg, p, (b[0], b[1] - 10, b[2], b[3]), qty=False, sku=False)
    b = pg.card(44 * 5 + 30)
    pg.text(b[0] + 14, b[1] + 10, pg.rng.choice(("投诉原因", "举报类型", "请选择问题类型")), 14)
    reasons = ["虚假发货", "商品与描述不符", "售后态度差", "延迟发货", "商家拒绝退款", "假冒品牌", "辱骂骚扰", "诱导好评"]
    pg.rng.shuffle(reasons)
    chosen = pg.rng.randrange(5)
    for i, r in enumerate(reasons[:5]):
        y = b[1] + 40 + 44 * i
        pg.text(b[0] + 14, y, r, 13)
        pg.d.ellipse((b[2] - 30, y, b[2] - 14, y + 16), outline=MUTED, fill=pg.accent if i == chosen else None)
    b = pg.card(150)
    pg.text(b[0] + 14, b[1] + 10, pg.rng.choice(("问题描述", "补充说明", "举报说明")), 14)
    pg.wrap(b[0] + 14, b[1] + 36, pg.rng.choice(("请详细描述您遇到的问题，以便平台核实处理", "商家一直不处理，要求平台处理")), 12, fill=MUTED)
    pg.text(b[0] + 14, b[1] + 84, "上传凭证(最多9张)", 12, MUTED)
    pg.d.rectangle((b[0] + 14, b[1] + 104, b[0] + 54, b[1] + 140), outline=(200, 200, 200))
    pg.text(b[0] + 34, b[1] + 122, "+", 18, MUTED, anchor="mm")
    pg.snippets(pg.rng.randrange(0, 3))
    pg.maybe_grid()
    pg.bottom_bar((), pg.rng.choice(("提交投诉", "提交", "确认举报")))


def scene_platform(pg: Page, p: Product):
    pg.status_bar(bg=_tint(pg.accent, 0.3))
    pg.header(pg.rng.choice(("平台介入", "催发货进度", "小二介入处理", "纠纷处理", "申请平台介入")), bg=_tint(pg.accent, 0.3))
    b = pg.card(70, fill=_tint(pg.accent, 0.85))
    pg.text(b[0] + 14, b[1] + 12, pg.rng.choice(("平台客服处理中", "平台已介入", "发货服务继续保障中", "等待平台判定", "小二已受理")), 16, pg.accent)
    pg.text(b[0] + 14, b[1] + 42, pg.rng.choice(("平台将在48小时内给出处理意见", "请在规定时间内上传凭证", "处理结果将通过消息通知您")), 12, MUTED)
    b = pg.card(80)
    _product_row(pg, p, b, qty=False)
    _timeline(pg, (("平台客服处理中", "已催促商家尽快处理，请耐心等待"), ("卖家超时未处理", "商家未在规定时间内响应，平台已介入"),
                   ("平台客服已处理", "已根据双方举证作出处理"), ("买家上传凭证", "已上传图片凭证3张"),
                   ("申请平台介入", "买家申请平台介入处理")))
    pg.snippets(pg.rng.randrange(0, 3))
    pg.maybe_grid()
    pg.bottom_bar(("联系卖家",), pg.rng.choice(("上传凭证", "申请退款", "查看详情")), pg.rng.choice(("撤销介入", None)))


def scene_external(pg: Page, p: Product):
    kind = pg.rng.choice(("wechat", "sms", "map", "notes", "bank", "video", "express"))
    if kind == "wechat":
        pg.bg = (237, 237, 237)
        pg.img.paste(pg.bg, (0, 0, pg.W, pg.H))
        pg.status_bar()
        pg.header(pg.rng.choice(("微信", "服务通知", "微信快递服务", "通讯录")), right=("+",))
        rows = (("文件传输助手", "[图片]"), ("服务通知", "订单已签收，如有疑问请联系"), (f"{p.brand}会员中心", "您有一张优惠券即将过期"),
                ("家人群", "[语音] 12\""), ("订阅号消息", "今日热点新闻"), ("快递服务", "您的快件已签收"), ("同事", "好的，收到"))
        for name, msg in pg.rng.sample(rows, 6):
            y = pg.y + 8
            pg.d.rectangle((0, y - 8, pg.W, y + 56), fill=(255, 255, 255))
            pg.d.rounded_rectangle((14, y, 58, y + 44), 6, fill=_tint(PALETTE[pg.rng.randrange(len(PALETTE))], 0.2))
            pg.text(68, y + 2, name, 15)
            pg.text(68, y + 26, msg, 12, MUTED)
            pg.text(pg.W - 14, y + 4, _now(pg.rng)[6:], 11, MUTED, anchor="ra")
            pg.y = y + 58
    elif kind == "sms":
        pg.status_bar()
        pg.header(pg.rng.choice(("短信", "信息", "106****1234")))
        msgs = (f"【{pg.rng.choice(T.COURIERS)}】您的快件已到达驿站，取件码{pg.rng.randrange(1000, 9999)}，请及时领取",
                f"【{p.brand}】尊敬的会员，您的订单已发货，点击查看 <http>", "【银行】您尾号1234的账户支出人民币59.00元",
                "【验证码】123456，5分钟内有效，请勿泄露", f"【{p.brand}】双11狂欢，全场5折起，退订回T")
        for m in pg.rng.sample(msgs, 4):
            y = pg.y + 14
            pg.text(pg.W // 2, y, _now(pg.rng), 11, MUTED, anchor="mt")
            b = (14, y + 20, pg.W - 60, y + 86)
            pg.d.rounded_rectangle(b, 12, fill=(235, 235, 240))
            pg.wrap(b[0] + 12, b[1] + 10, m, 13, width=b[2] - b[0] - 24, max_lines=3)
            pg.y = b[3]
    elif kind == "map":
        _map(pg, pg.H)
        pg.status_bar()
        b = pg.card(120)
        pg.text(b[0] + 14, b[1] + 12, pg.rng.choice(("导航", "路线规划", "驾车")) + f" · 全程{pg.rng.randrange(2, 40)}公里", 15)
        pg.text(b[0] + 14, b[1] + 40, f"{pg.rng.choice(T.CITIES)}站 → {pg.rng.choice(T.CITIES)}路", 13, MUTED)
        pg.button(b[0] + 14, b[1] + 72, "开始导航", filled=True, color=(22, 119, 255))
    elif kind == "notes":
        pg.bg = (252, 250, 240)
        pg.img.paste(pg.bg, (0, 0, pg.W, pg.H))
        pg.status_bar()
        pg.header(pg.rng.choice(("备忘录", "笔记", "便签")), right=("完成",))
        lines = ("买菜：鸡蛋 牛奶 青菜", f"{p.name} 记得比价", "周五前交报告", "快递单号 " + str(pg.rng.randrange(10**11, 10**12)),
                 "孩子家长会 周三下午", "还信用卡", "预约体检", "给妈妈买生日礼物")
        y = pg.y + 10
        for ln in pg.rng.sample(lines, 6):
            pg.text(18, y, "· " + ln, 15)
            y += 34
    elif kind == "bank":
        pg.status_bar(bg=(200, 30, 40), fg=(255, 255, 255))
        pg.header(pg.rng.choice(("手机银行", "我的账户", "信用卡")), bg=(200, 30, 40), fg=(255, 255, 255))
        b = pg.card(100)
        pg.text(b[0] + 14, b[1] + 12, "总资产(元)", 13, MUTED)
        pg.text(b[0] + 14, b[1] + 40, f"{pg.rng.randrange(1000, 99999)}.{pg.rng.randrange(100):02d}", 24)
        for i, t in enumerate(pg.rng.sample(("转账", "理财", "信用卡", "缴费", "贷款", "外汇", "基金", "保险"), 8)):
            x, y = 30 + (i % 4) * 80, pg.y + 20 + (i // 4) * 70
            pg.d.ellipse((x, y, x + 36, y + 36), fill=_tint((200, 30, 40), 0.6))
            pg.text(x + 18, y + 46, t, 12, anchor="mt")
    elif kind == "video":
        pg.img.paste((20, 20, 20), (0, 0, pg.W, pg.H))
        pg.status_bar(fg=(255, 255, 255))
        draw_product(pg.d, (40, 200, pg.W - 40, 520), p, pg.rng)
        pg.text(14, pg.H - 140, f"@{p.brand}生活馆", 15, (255, 255, 255))
        pg.wrap(14, pg.H - 114, pg.rng.choice(("这个真的太好用了！#好物推荐", "开箱测评来啦，点赞关注不迷路", "教你三步搞定")), 13, fill=(230, 230, 230))
        for i, t in enumerate(("♥ 1.2万", "评论 856", "分享")):
            pg.text(pg.W - 14, 420 + 50 * i, t, 12, (255, 255, 255), anchor="ra")
    else:  # express app
        pg.status_bar(bg=(30, 30, 30), fg=(255, 255, 255))
        pg.header(pg.rng.choice(("菜鸟", "顺丰速运", "快递100", "寄快递")), bg=(30, 30, 30), fg=(255, 255, 255))
        for _ in range(4):
            b = pg.card(90)
            pg.text(b[0] + 14, b[1] + 10, pg.rng.choice(T.COURIERS) + f" {pg.rng.randrange(10**11, 10**12)}", 13)
            pg.text(b[0] + 14, b[1] + 36, pg.rng.choice(("已签收", "待取件", "运输中")), 15, (22, 119, 255))
            pg.text(b[0] + 14, b[1] + 62, f"{pg.rng.choice(T.CITIES)} → {pg.rng.choice(T.CITIES)}", 12, MUTED)
    pg.snippets(pg.rng.randrange(0, 2))


def scene_other(pg: Page, p: Product):
    kind = pg.rng.choice(("settings", "qrcode", "poster", "document", "blank", "calendar"))
    if kind == "settings":
        pg.status_bar()
        pg.header(pg.rng.choice(("消息设置", "通用设置", "通知管理", "设置")))
        for r in pg.rng.sample(("允许手机通知", "交易物流", "服务提醒", "互动娱乐", "活动优惠", "订阅号提醒", "店铺客服消息", "声音与振动",
                                "清除缓存", "深色模式"), 8):
            y = pg.y + 10
            pg.d.rectangle((0, y - 10, pg.W, y + 34), fill=(255, 255, 255))
            pg.text(16, y + 2, r, 14)
            on = pg.rng.random() < 0.5
            pg.d.rounded_rectangle((pg.W - 60, y, pg.W - 16, y + 22), 11, fill=(250, 120, 40) if on else (220, 220, 220))
            pg.d.ellipse((pg.W - 38 if on else pg.W - 58, y + 2, pg.W - 18 if on else pg.W - 38, y + 20), fill=(255, 255, 255))
            pg.y = y + 46
    elif kind == "qrcode":
        pg.status_bar()
        s = 200
        x0, y0 = (pg.W - s) // 2, pg.rng.randrange(150, 300)
        cell = s // 25
        for i in range(25):
            for j in range(25):
                if pg.rng.random() < 0.5 or (i < 7 and j < 7) or (i < 7 and j > 17) or (i > 17 and j < 7):
                    pg.d.rectangle((x0 + i * cell, y0 + j * cell, x0 + (i + 1) * cell - 1, y0 + (j + 1) * cell - 1), fill=(0, 0, 0))
        pg.text(pg.W // 2, y0 + s + 30, pg.rng.choice(("扫一扫上面的二维码", "长按识别二维码", "保存图片")), 14, MUTED, anchor="mm")
    elif kind == "poster":
        pg.img.paste(pg.rng.choice(PALETTE), (0, 0, pg.W, pg.H))
        for _ in range(6):
            x, y, r = pg.rng.randrange(pg.W), pg.rng.randrange(pg.H), pg.rng.randrange(20, 120)
            pg.d.ellipse((x - r, y - r, x + r, y + r), fill=pg.rng.choice(PALETTE))
        pg.text(pg.W // 2, pg.H // 2, pg.rng.choice(("早安", "加油", "周末愉快", "生日快乐", "谢谢")), 44, (255, 255, 255), anchor="mm")
    elif kind == "document":
        pg.bg = (250, 250, 250)
        pg.img.paste(pg.bg, (0, 0, pg.W, pg.H))
        pg.text(pg.W // 2, 40, pg.rng.choice(("使用说明书", "产品合格证", "保修卡", "发票")), 20, anchor="mm")
        y = 80
        while y < pg.H - 40:
            pg.d.line((30, y, pg.rng.randrange(150, pg.W - 30), y), fill=(150, 150, 150), width=3)
            y += pg.rng.randrange(16, 30)
    elif kind == "calendar":
        pg.status_bar()
        pg.header(f"2024年{pg.rng.randrange(1, 13)}月")
        for i in range(35):
            x, y = 14 + (i % 7) * 48, pg.y + 20 + (i // 7) * 56
            pg.text(x + 16, y, str(i % 31 + 1), 15, pg.accent if pg.rng.random() < 0.1 else TEXT, anchor="mt")
    else:  # blank-ish
        pg.img.paste(pg.rng.choice(((0, 0, 0), (255, 255, 255), (30, 30, 60))), (0, 0, pg.W, pg.H))
        pg.d.ellipse((pg.W // 2 - 30, pg.H // 2 - 30, pg.W // 2 + 30, pg.H // 2 + 30), outline=(128, 128, 128), width=3)
        pg.text(pg.W // 2, pg.H // 2 + 60, pg.rng.choice(("加载中...", "网络不给力，请稍后重试", "")), 13, MUTED, anchor="mm")
    pg.snippets(pg.rng.randrange(0, 2))


def render_photo(rng: random.Random, p: Product, size=PHOTO_SIZE):
    """实物拍摄: a camera-like photo of the product (or of its parcel) on a textured surface."""
    g = np.random.default_rng(rng.getrandbits(63))
    W, H = size
    base = np.array(rng.choice(((200, 180, 150), (230, 230, 225), (150, 110, 80), (210, 215, 220), (90, 90, 95), (240, 235, 245))), float)
    yy, xx = np.ogrid[0:H, 0:W]
    lx, ly = rng.uniform(0, W), rng.uniform(0, H)
    light = 0.75 + 0.35 * (np.exp(-2 * ((xx - lx) / W) ** 2) * np.exp(-2 * ((yy - ly) / H) ** 2))
    arr = base[None, None, :] * light[..., None].astype(np.float32)
    if rng.random() < 0.5:  # wood grain / fabric stripes
        arr = arr + (8 * np.sin(yy / rng.uniform(3, 9) + g.normal(0, 0.5, (H, 1))))[..., None].astype(np.float32)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    cx, cy = W / 2 + rng.uniform(-40, 40), H / 2 + rng.uniform(-50, 50)
    s = rng.uniform(0.55, 0.85) * min(W, H)
    d.ellipse((cx - s * .45, cy + s * .3, cx + s * .45, cy + s * .5), fill=tuple(int(v * 0.6) for v in base))  # shadow
    if rng.random() < 0.25:  # a parcel with a shipping label
        d.rectangle((cx - s * .45, cy - s * .35, cx + s * .45, cy + s * .35), fill=(196, 160, 110))
        d.rectangle((cx - s * .45, cy - s * .05, cx + s * .45, cy + s * .03), fill=(200, 190, 170))
        lab = (cx - s * .3, cy - s * .3, cx + s * .2, cy - s * .08)
        d.rectangle(lab, fill=(250, 250, 250))
        d.text((lab[0] + 6, lab[1] + 4), rng.choice(T.COURIERS), font=cjk_font(12), fill=(30, 30, 30))
        d.rectangle((lab[0] + 6, lab[1] + 22, lab[2] - 20, lab[1] + 30), fill=(40, 40, 40))
    else:
        layer = Image.new("RGBA", (W, H), (0, 0, 0, 0))
        draw_product(ImageDraw.Draw(layer), (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2), p, rng)
        layer = layer.rotate(rng.uniform(-25, 25), center=(cx, cy), resample=Image.BILINEAR)
        img.paste(layer, (0, 0), layer)
        if rng.random() < 0.5:  # damage / stain / defect marks
            for _ in range(rng.randrange(2, 8)):
                x, y, r = cx + rng.uniform(-s / 3, s / 3), cy + rng.uniform(-s / 3, s / 3), rng.uniform(2, 9)
                d.ellipse((x - r, y - r, x + r, y + r), fill=rng.choice(((120, 70, 30), (60, 60, 60), (240, 240, 240))))
    if rng.random() < 0.4:  # a hand / finger blob
        x = rng.choice((-30, W - 60))
        d.ellipse((x, H * .6, x + 90, H * .6 + 200), fill=(230, 190, 160))
    img = img.filter(ImageFilter.BoxBlur(rng.choice((1, 1, 2))))  # camera softness
    arr = np.asarray(img, dtype=np.float32) + g.standard_normal((H, W, 1), dtype=np.float32) * rng.uniform(3, 9)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


SCENES = {
    "实物拍摄(含售后)": None,  # photo
    "商品分类选项": scene_sku,
    "商品头图": scene_product_head,
    "商品详情页截图": scene_product_detail,
    "下单过程中出现异常（显示购买失败浮窗）": scene_fail_popup,
    "订单详情页面": scene_order,
    "支付页面": scene_payment,
    "消费者与客服聊天页面": scene_chat,
    "评论区截图页面": scene_reviews,
    "物流页面-物流列表页面": scene_logistics_list,
    "物流页面-物流跟踪页面": scene_logistics_track,
    "物流页面-物流异常页面": scene_logistics_error,
    "退款页面": scene_refund,
    "退货页面": scene_return,
    "换货页面": scene_exchange,
    "购物车页面": scene_cart,
    "店铺页面": scene_shop,
    "活动页面": scene_activity,
    "优惠券领取页面": scene_coupon,
    "账单/账户页面": scene_bill,
    "个人信息页面": scene_profile,
    "投诉举报页面": scene_complaint,
    "平台介入页面": scene_platform,
    "外部APP截图": scene_external,
    "其他类别图片": scene_other,
}
assert tuple(SCENES) == IMAGE_LABELS


def render_scene(scene: str, seed: int, product: Product):
    """Render one image of ``scene`` (an image label) showing ``product``; a PIL RGB image."""
    rng = random.Random(seed)
    if scene == "实物拍摄(含售后)":
        return render_photo(rng, product)
    if scene == "商品头图" and rng.random() < 0.35:
        pg = Page(rng, SQUARE_SIZE)
        scene_product_square(pg, product)
        return pg.img
    if scene == "其他类别图片" and rng.random() < 0.12:
        return render_photo(rng, _product(rng))  # a random photo that is not about the order
    pg = Page(rng)
    SCENES[scene](pg, product)
    return pg.img


def _save(img, path: Path):
    if path.suffix == ".png":
        img.save(path, format="PNG", compress_level=6, optimize=False)
    else:
        img.save(path, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False, subsampling=2)


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------
def synth_params(*, seed: int = 0, per_label: int = 12, test_per_label: int = 4,
                 test_files: Sequence[str] = ("test1", "test2"), max_images_per_dialogue: int = 3,
                 absent_labels: Sequence[str] = REAL_ABSENT_LABELS) -> dict:
    """The JSON-able parameter record stamped into a generated directory."""
    return {"generator": "kdsl_utils.data.synth", "version": GENERATOR_VERSION, "seed": seed,
            "per_label": per_label, "test_per_label": test_per_label, "test_files": list(test_files),
            "max_images_per_dialogue": max_images_per_dialogue, "absent_labels": list(absent_labels)}


def generate_mire(out_dir: Path | str, *, seed: int = 0, per_label: int = 12, test_per_label: int = 4,
                  test_files: Sequence[str] = ("test1", "test2"), max_images_per_dialogue: int = 3,
                  absent_labels: Sequence[str] = REAL_ABSENT_LABELS, overwrite: bool = False,
                  progress: bool = False) -> Path:
    """Write a synthetic MIRE directory (``train.json``, ``<test>.json``…, ``images/``).

    ``per_label`` training records and ``test_per_label`` records per test file for every
    label not in ``absent_labels`` (default: the two image labels the real data lacks).
    An existing non-empty ``out_dir`` is refused unless ``overwrite=True``, which replaces
    only ``train.json``, ``test*.json``, ``images/`` and the parameter stamp. Returns
    ``out_dir``. See the module docstring for the design.
    """
    out = Path(out_dir)
    params = synth_params(seed=seed, per_label=per_label, test_per_label=test_per_label,
                          test_files=test_files, max_images_per_dialogue=max_images_per_dialogue,
                          absent_labels=absent_labels)
    splits, specs = plan_mire(seed=seed, per_label=per_label, test_per_label=test_per_label,
                              test_files=test_files, max_images_per_dialogue=max_images_per_dialogue,
                              absent_labels=absent_labels)
    if out.exists() and any(out.iterdir()):
        if overwrite and not (out / PARAMS_FILE).is_file():
            raise FileExistsError(f"{out} holds files but no {PARAMS_FILE} stamp: not a generated synthetic "
                                  "MIRE directory, refusing to overwrite it")
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace a generated MIRE directory")
        for f in sorted(out.glob("test*.json")) + [out / "train.json", out / PARAMS_FILE]:
            if f.is_file():
                f.unlink()
        if (out / "images").is_dir():
            shutil.rmtree(out / "images")
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    it = specs
    if progress:
        it = tqdm(specs, desc="synthetic images", unit="img")
    for spec in it:
        _save(render_scene(spec.scene, spec.seed, spec.product), images / spec.name)
    for split, records in splits.items():
        (out / f"{split}.json").write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (out / PARAMS_FILE).write_text(json.dumps(params, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return out
