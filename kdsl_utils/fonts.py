"""The CJK font the project renders Chinese with (synthetic images, figure labels).

The font comes from a PyPI package so that a fresh machine gets it through the project's
own install step, with no system font and no download at run time:
``noto-cjk-sans-otc==0.0.1`` ships Google's *Noto Sans CJK* OpenType collection
(``NotoSansCJK-Regular.ttc``, SIL Open Font License 1.1, ~19 MB installed). The collection
holds one face per region; we use the Simplified Chinese face, *Noto Sans CJK SC*.

``KDSL_CJK_FONT`` (environment variable) may point to another font file with Simplified
Chinese glyphs (``.ttf``/``.otf``/``.ttc``); it takes precedence over the package. Note
that synthetic images are byte-identical across machines only with the same font file
(and Pillow/FreeType versions).
"""

from __future__ import annotations

import os
from functools import cache, lru_cache
from pathlib import Path

from PIL import ImageFont

try:  # a pinned dependency; its absence gets a message naming it (cjk_font_path)
    import noto_cjk_sans_otc  # type: ignore[import-not-found]
except ImportError:
    noto_cjk_sans_otc = None

FONT_PACKAGE = "noto-cjk-sans-otc"
FONT_PIN = "noto-cjk-sans-otc==0.0.1"
FONT_FAMILY = "Noto Sans CJK SC"
ENV_VAR = "KDSL_CJK_FONT"


class CJKFontNotFoundError(FileNotFoundError):
    """No CJK font: the font package is not installed and ``KDSL_CJK_FONT`` is unset."""


def cjk_font_path() -> Path:
    """Path of the CJK font file (``$KDSL_CJK_FONT`` if set, else the pinned package's)."""
    override = os.environ.get(ENV_VAR)
    if override:
        p = Path(override).expanduser()
        if not p.is_file():
            raise CJKFontNotFoundError(f"${ENV_VAR}={override!r} is not a font file")
        return p
    if noto_cjk_sans_otc is None:
        raise CJKFontNotFoundError(
            f"No CJK font found. Install the font package: pip install {FONT_PIN} "
            f"(or set ${ENV_VAR} to a font file with Simplified Chinese glyphs)")
    p = Path(str(noto_cjk_sans_otc.FONT_PATH))
    if not p.is_file():
        raise CJKFontNotFoundError(f"{FONT_PACKAGE} is installed but its font file {p} is missing; "
                                   f"reinstall it: pip install --force-reinstall {FONT_PIN}")
    return p


@cache
def _sc_face_index(path: str) -> int:
    """Index of the Simplified Chinese face in a font collection (0 for a single font)."""
    first_sc = None
    for i in range(32):
        try:
            name = ImageFont.truetype(path, 12, index=i).getname()[0] or ""
        except OSError:
            break
        if name == FONT_FAMILY:
            return i
        if first_sc is None and name.endswith(" SC") and "Mono" not in name:
            first_sc = i
    return first_sc if first_sc is not None else 0


@lru_cache(maxsize=64)
def cjk_font(size: int):
    """A Pillow ``FreeTypeFont`` of the CJK font at ``size`` px (cached per size)."""
    path = str(cjk_font_path())
    # BASIC layout: no dependency on libraqm being present, so the same glyph placement (and
    # the same synthetic image bytes) wherever Pillow runs; CJK needs no complex shaping.
    return ImageFont.truetype(path, int(size), index=_sc_face_index(path),
                              layout_engine=ImageFont.Layout.BASIC)


def cjk_family_name() -> str:
    """Family name of the face :func:`cjk_font` uses (what matplotlib knows it by)."""
    return cjk_font(12).getname()[0]
