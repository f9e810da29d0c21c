"""The one way to decode an image: EXIF orientation applied, every mode to 8-bit RGB.

Every consumer of pixels (OCR, the image embedder, the Qwen-VL processor, augmentation)
calls :func:`load_rgb`, so they all see the same picture in the same frame — OCR boxes are
normalised by the size of the image OCR actually read, and a photo with an EXIF rotation
is upright for every model.

What :func:`normalise` does, in order (each step is named in the returned notes):

1. ``exif_transpose``: EXIF orientation 2..8 is applied (the tag is then dropped);
2. embedded ICC profile on a CMYK image: converted to sRGB through ``ImageCms`` (a print
   profile's inks are not sRGB; without a profile Pillow's plain CMYK->RGB formula is used);
3. high bit depth (``I;16*``, ``I``, ``F``): mapped to 8 bits by the mode's nominal range —
   ``I;16*`` and ``I`` with values above 255 as 16-bit (x / 257), ``F`` in [0, 1] as
   x * 255 — because Pillow's own conversion clips at 255 and turns a 16-bit image all white;
4. transparency (alpha channel or a ``transparency`` key, as in ``LA``, ``PA``, ``RGBA``, a
   ``P`` image with a transparent index): composited on white (a screenshot's background),
   never on black, and never by RapidOCR's own brightness guess;
5. any other mode (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``): Pillow's
   conversion to ``RGB``.

An 8-bit RGB image without orientation, profile or transparency is returned untouched
(notes empty), so features of such images are exactly those of the plain decode.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps

#: Changes whenever :func:`normalise` may give different pixels: part of the feature-cache
#: namespaces of everything computed from decoded images.
DECODER_VERSION = "1"

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SRGB = ImageCms.createProfile("sRGB")


def _open(src: str | Path | bytes) -> Image.Image:
    return Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)


def _to_8bit(im: Image.Image) -> Image.Image:
    """``I;16*`` / ``I`` / ``F`` to ``L`` by the mode's nominal range (see module doc)."""
    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float64)
        hi = float(np.nanmax(a)) if a.size else 0.0
        a = a * 255.0 if hi <= 1.0 else (a / 257.0 if hi > 255.0 else a)
    else:
        a = a.astype(np.float64)
        if im.mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8), "L")


def normalise(im: Image.Image) -> tuple[Image.Image, list[str]]:
    """(8-bit RGB image, what was done to it: a list of short notes, empty if nothing).

    The input is loaded; the output is a new image (or ``im`` itself when the notes are empty).
    """
    notes: list[str] = []
    orientation = im.getexif().get(0x0112, 1)
    if orientation not in (None, 1):
        im = ImageOps.exif_transpose(im)
        notes.append(f"EXIF orientation {orientation} applied")
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im, notes
    icc = im.info.get("icc_profile")
    if mode == "CMYK" and icc:
        im = ImageCms.profileToProfile(im, ImageCms.ImageCmsProfile(io.BytesIO(icc)), _SRGB,
                                       outputMode="RGB")
        notes.append("CMYK converted to sRGB with its ICC profile")
        return im, notes
    if mode in ("F", "I") or mode.startswith("I;16"):
        im = _to_8bit(im)
        notes.append(f"{mode} mapped to 8 bits")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("RGB")
        notes.append(f"{mode} transparency flattened on white")
    elif im.mode != "RGB":
        im = im.convert("RGB")
        if not notes or not notes[-1].startswith(mode):
            notes.append(f"{mode} converted to RGB")
    return im, notes


def load_rgb(src: str | Path | bytes) -> Image.Image:
    """The image at ``src`` (a path or the file's bytes), upright, as 8-bit RGB (see module)."""
    with _open(src) as im:
        im.load()
        out, _ = normalise(im)
        return out if out is not im else im.copy()


def describe_normalisation(src: str | Path | bytes) -> str | None:
    """What :func:`load_rgb` changes in this image ("; "-joined notes), or None if nothing.

    For the data loader's report: e.g. ``"EXIF orientation 6 applied"`` or
    ``"CMYK converted to RGB"``. Decodes the image; raises what Pillow raises on a bad file.
    """
    with _open(src) as im:
        im.load()
        _, notes = normalise(im)
    return "; ".join(notes) or None


def upright_size(src: str | Path | bytes) -> tuple[int, int]:
    """(width, height) of the picture :func:`load_rgb` gives, from the header and the EXIF
    orientation only (no pixel decode): orientations 5..8 swap the two."""
    with _open(src) as im:
        w, h = im.size
        return (h, w) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


def bgr_array(im: Image.Image) -> np.ndarray:
    """(h, w, 3) uint8 BGR array of an RGB image (the channel order OpenCV-based OCR reads)."""
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8)[:, :, ::-1])
