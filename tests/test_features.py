"""The one image decoder (every mode Pillow decodes gives the RGB original's features) and
the feature cache that heals (every kind of corrupt entry is recomputed, replaced, counted).

The decoder test renders one synthetic screenshot (``kdsl_utils.data.synth``), writes it in
every mode, and runs the real OCR and image embedder once per *distinct* decoded picture
(modes that must decode to the same pixels are checked on pixels, which is stronger).
"""

from __future__ import annotations

import difflib
import hashlib
import io
import os
import random

import numpy as np
import pytest
from PIL import Image

from kdsl_utils.data import synth
from kdsl_utils.data.images import describe_normalisation, load_rgb, upright_size
from kdsl_utils.features import (EXTRACTION_LOG, E5Embedder, EfficientNetEmbedder, FeatureCache,
                                 RapidOcr, embed_images, embed_texts, file_hash, ocr_images,
                                 ocr_text)


def _png(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, format=fmt, **kw)
    return b.getvalue()


@pytest.fixture(scope="module")
def original() -> Image.Image:
    """The top half of a rendered refund-page screenshot (RGB; ~15 text lines)."""
    im = synth.render_scene("退款页面", 0, synth._product(random.Random(0)))
    return im.crop((0, 0, im.width, im.height // 2))


def _variants(im: Image.Image) -> dict[str, tuple[bytes, str, np.ndarray]]:
    """name -> (file bytes, the mode Pillow must open it in, the RGB pixels expected)."""
    rgb = np.asarray(im)
    grey = np.asarray(im.convert("L"))
    grey3 = np.repeat(grey[:, :, None], 3, axis=2)
    g16 = grey.astype(np.uint16) * 257  # a real 16-bit image spans 0..65535
    bw = im.convert("1", dither=Image.Dither.NONE)
    rgba = np.asarray(im.convert("RGBA")).copy()
    rgba[(rgb > 250).all(-1)] = (0, 0, 0, 0)  # white background -> transparent black
    pal = im.convert("P", palette=Image.Palette.ADAPTIVE)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored pixels are the upright ones turned CCW
    return {
        "RGB": (_png(im), "RGB", rgb),
        "1": (_png(bw), "1", np.repeat(np.asarray(bw, np.uint8)[:, :, None] * 255, 3, axis=2)),
        "L": (_png(im.convert("L")), "L", grey3),
        "LA": (_png(im.convert("LA")), "LA", grey3),
        "P": (_png(pal), "P", np.asarray(pal.convert("RGB"))),
        "PA": (_png(im.convert("PA"), "TIFF"), "PA", np.asarray(im.convert("PA").convert("RGB"))),
        "RGBA (transparent background)": (_png(Image.fromarray(rgba, "RGBA")), "RGBA", rgb),
        "CMYK (TIFF)": (_png(im.convert("CMYK"), "TIFF"), "CMYK", rgb),
        "CMYK (JPEG)": (_png(im.convert("CMYK"), "JPEG", quality=95), "CMYK", rgb),
        "YCbCr": (_png(im.convert("YCbCr"), "TIFF"), "YCbCr", rgb),
        "LAB": (_png(im.convert("LAB"), "TIFF"), "LAB", rgb),
        "I;16": (_png(Image.fromarray(g16)), "I;16", grey3),
        "I;16B": (_png(Image.frombytes("I;16B", im.size, g16.astype(">u2").tobytes()), "TIFF"),
                  "I;16B", grey3),
        "I": (_png(Image.fromarray(g16.astype(np.int32)), "TIFF"), "I", grey3),
        "F": (_png(Image.fromarray(grey.astype(np.float32) / 255.0), "TIFF"), "F", grey3),
        "EXIF orientation 6": (_png(im.transpose(Image.Transpose.ROTATE_90), exif=exif), "RGB",
                               rgb),
    }


# lossy encodings of the same picture: JPEG, chroma subsampling, colour-space round trips
_PIXEL_TOL = {"CMYK (JPEG)": 6.0, "YCbCr": 2.0, "LAB": 2.0}


def test_every_mode_decodes_to_the_rgb_original(original):
    """Pixels: each file decodes (upright, 8-bit RGB, alpha on white) to what it encodes."""
    for name, (data, mode, want) in _variants(original).items():
        with Image.open(io.BytesIO(data)) as raw:
            assert raw.mode == mode, name  # the mode under test is really the file's mode
        got = load_rgb(data)
        assert got.mode == "RGB" and got.size == original.size, name
        err = np.abs(np.asarray(got, np.int16) - want.astype(np.int16)).mean()
        assert err <= _PIXEL_TOL.get(name, 0.5), (name, err)
        note = describe_normalisation(data)
        assert (note is None) == (name == "RGB"), (name, note)


def test_every_mode_gives_the_rgb_originals_ocr_and_embedding(original, tmp_path):
    """OCR text and image embedding of each distinct decoded picture against the RGB
    original's (grey modes lose colour, hence a tolerance; a 1-bit image is its own
    picture, checked on pixels above). Before the one decoder, a CMYK JPEG gave 0 lines,
    I;16 / I / F all-white pictures, and the EXIF-rotated file sideways text."""
    variants = {k: v for k, v in _variants(original).items() if k != "1"}
    paths, seen = {}, {}
    for name, (data, _, _) in variants.items():
        digest = hashlib.sha256(load_rgb(data).tobytes()).hexdigest()
        if digest in seen:
            continue  # same pixels as an earlier variant: same features
        seen[digest] = name
        paths[name] = tmp_path / f"{len(paths)}.img"
        paths[name].write_bytes(data)
    cache = FeatureCache(tmp_path / "cache")
    res = ocr_images(list(paths.values()), cache, workers=1, progress=False)
    emb = embed_images(list(paths.values()), cache, progress=False)
    ref_text, ref_emb = ocr_text(res[paths["RGB"]]), emb[0]
    assert len(res[paths["RGB"]]["lines"]) >= 8
    for i, (name, p) in enumerate(paths.items()):
        text = ocr_text(res[p])
        ratio = difflib.SequenceMatcher(None, text, ref_text).ratio()
        cos = float(emb[i] @ ref_emb / np.linalg.norm(emb[i]) / np.linalg.norm(ref_emb))
        assert ratio >= 0.95 and cos >= 0.93, (name, ratio, cos)
        boxes = np.array([ln["box"] for ln in res[p]["lines"]])
        assert boxes.min() >= 0.0 and boxes.max() <= 1.0, name  # normalised in OCR's frame


def test_exif_rotation_is_applied_for_ocr_frame(original, tmp_path):
    """The OCR result's size is the upright picture's (boxes are fractions of it)."""
    data = _variants(original)["EXIF orientation 6"][0]
    p = tmp_path / "rotated.png"
    p.write_bytes(data)
    assert Image.open(p).size == (original.height, original.width)  # stored sideways
    assert load_rgb(p).size == original.size == upright_size(p)
    assert upright_size(_variants(original)["RGB"][0]) == original.size


def test_image_without_text_gives_no_lines(tmp_path):
    p = tmp_path / "blank.png"
    Image.new("RGB", (120, 80), (255, 255, 255)).save(p)
    ocr = RapidOcr()
    assert ocr(p) == {"w": 120, "h": 80, "lines": []}
    assert set(ocr.last_stages) == {"det", "rec"}


# ------------------------------------------------------------------- cache that heals


def _entry(cache: FeatureCache, ns: str, key: str, ext: str):
    return cache.root / ns / key[:2] / f"{key}.{ext}"


_CORRUPTIONS = {
    "empty file": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "garbage bytes": lambda p: p.write_bytes(b"\x00\xff not a feature file"),
    "directory": lambda p: (p.unlink(), p.mkdir()),
}


def _npy_bytes(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, a, allow_pickle=False)
    return b.getvalue()


_NPY_MALFORMED = {
    "wrong shape": _npy_bytes(np.zeros(7, np.float32)),
    "a scalar": _npy_bytes(np.float32(1.0)),
    "2-d": _npy_bytes(np.zeros((1, 1280), np.float32)),
    "wrong dtype": _npy_bytes(np.zeros(1280, np.float64)),
    "non-finite": _npy_bytes(np.full(1280, np.nan, np.float32)),
}

_JSON_MALFORMED = {
    "a list": b"[]",
    "missing lines": b'{"w": 10, "h": 10}',
    "lines not a list": b'{"w": 10, "h": 10, "lines": "abc"}',
    "bad box": b'{"w": 10, "h": 10, "lines": [{"text": "a", "score": 0.9, "box": [0, 1]}]}',
    "text not a string": b'{"w": 10, "h": 10, "lines": [{"text": 3, "score": 0.9, "box": [0,0,1,1]}]}',
    "zero size": b'{"w": 0, "h": 10, "lines": []}',
    "not UTF-8": b'\xff\xfe{"w"',
}


@pytest.fixture(scope="module")
def small_image(tmp_path_factory, original):
    p = tmp_path_factory.mktemp("img") / "small.png"
    original.crop((0, 0, original.width, 120)).save(p)
    return p


@pytest.mark.parametrize("kind", [*_CORRUPTIONS, *_JSON_MALFORMED])
def test_corrupt_ocr_entry_is_recomputed_replaced_counted(kind, tmp_path, small_image):
    cache, ocr = FeatureCache(tmp_path), RapidOcr()
    good = ocr_images([small_image], cache, workers=1, extractor=ocr, progress=False)
    entry = _entry(cache, ocr.namespace, hashlib.sha256(small_image.read_bytes()).hexdigest(),
                   "json")
    if kind in _CORRUPTIONS:
        _CORRUPTIONS[kind](entry)
    else:
        entry.write_bytes(_JSON_MALFORMED[kind])
    EXTRACTION_LOG.clear()
    again = ocr_images([small_image], FeatureCache(tmp_path), workers=1, extractor=ocr,
                       progress=False)
    assert again == good
    assert EXTRACTION_LOG["ocr"]["corrupt"] == 1 and EXTRACTION_LOG["ocr"]["computed"] == 1
    assert cache.read(ocr.namespace, entry.stem, "json", ocr.check)[1] == "hit"  # healed
    EXTRACTION_LOG.clear()
    ocr_images([small_image], FeatureCache(tmp_path), workers=1, extractor=ocr, progress=False)
    assert EXTRACTION_LOG["ocr"]["corrupt"] == 0 and EXTRACTION_LOG["ocr"]["cached"] == 1


@pytest.mark.parametrize("kind", [*_CORRUPTIONS, *_NPY_MALFORMED, "pickled object"])
def test_corrupt_embedding_entry_is_recomputed_replaced_counted(kind, tmp_path, small_image):
    cache, emb = FeatureCache(tmp_path), EfficientNetEmbedder()
    good = embed_images([small_image], cache, extractor=emb, progress=False)
    key = hashlib.sha256(small_image.read_bytes()).hexdigest()
    entry = _entry(cache, emb.namespace, key, "npy")
    if kind in _CORRUPTIONS:
        _CORRUPTIONS[kind](entry)
    elif kind == "pickled object":
        np.save(entry, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        entry.write_bytes(_NPY_MALFORMED[kind])
    EXTRACTION_LOG.clear()
    again = embed_images([small_image], FeatureCache(tmp_path), extractor=emb, progress=False)
    np.testing.assert_array_equal(again, good)
    log = EXTRACTION_LOG["image embeddings"]
    assert log["corrupt"] == 1 and log["computed"] == 1
    assert cache.read(emb.namespace, key, "npy", emb.check)[1] == "hit"  # healed


def test_corrupt_text_embedding_entry_is_recomputed(tmp_path):
    cache, e5 = FeatureCache(tmp_path), E5Embedder()
    good = embed_texts(["这个是什么材质的"], cache, extractor=e5, progress=False)
    key = hashlib.sha256("这个是什么材质的".encode()).hexdigest()
    _entry(cache, e5.namespace, key, "npy").write_bytes(_npy_bytes(np.zeros(1280, np.float32)))
    EXTRACTION_LOG.clear()
    np.testing.assert_array_equal(embed_texts(["这个是什么材质的"], cache, extractor=e5,
                                              progress=False), good)
    assert EXTRACTION_LOG["text embeddings"]["corrupt"] == 1


def test_cache_read_statuses(tmp_path):
    cache = FeatureCache(tmp_path)
    assert cache.read("ns", "ab" * 32, "json") == (None, "miss")
    cache.put("ns", "ab" * 32, "json", {"x": 1})
    assert cache.read("ns", "ab" * 32, "json") == ({"x": 1}, "hit")
    assert cache.read("ns", "ab" * 32, "json", lambda v: "y" in v) == (None, "corrupt")
    assert not list((tmp_path / "ns").rglob(".tmp-*"))  # no temp files left behind


def test_file_hash_follows_content_changes(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"one")
    assert file_hash(p) == hashlib.sha256(b"one").hexdigest()
    p.write_bytes(b"two!")
    assert file_hash(p) == hashlib.sha256(b"two!").hexdigest()  # new size
    st = p.stat()
    p.write_bytes(b"six!")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))  # same size, new mtime
    assert file_hash(p) == hashlib.sha256(b"six!").hexdigest()


def test_ocr_pool_is_reused_and_matches_in_process(tmp_path, original):
    """Two calls with misses share one pool (started once); results equal in-process OCR."""
    from kdsl_utils import features, workers

    paths = []
    for i in range(8):  # 4 * workers misses: the pool path
        p = tmp_path / f"strip{i}.png"
        original.crop((0, 40 * i, original.width, 40 * i + 40)).save(p)
        paths.append(p)
    features.shutdown_ocr_pool()
    try:
        pooled = ocr_images(paths, FeatureCache(tmp_path / "a"), workers=2, progress=False)
        pool = workers.running(features.OCR_POOL)
        ocr_images(paths, FeatureCache(tmp_path / "b"), workers=2, progress=False)
        assert workers.running(features.OCR_POOL) is pool and pool is not None
    finally:
        features.shutdown_ocr_pool()
    assert workers.running(features.OCR_POOL) is None
    assert pooled == ocr_images(paths, FeatureCache(tmp_path / "c"), workers=1, progress=False)


def test_two_processes_never_compute_the_same_entries_at_once(tmp_path):
    """Missing entries are computed under the extractor's cache lock: a second caller (here a
    thread; notebooks side by side in make reproduce are processes) waits, then reads what the
    first wrote instead of computing it again."""
    import threading
    import time

    from kdsl_utils.features import _cached_batches

    cache, keys, computed = FeatureCache(tmp_path), [f"k{i}" for i in range(6)], []

    def compute(idx):
        time.sleep(0.2)  # long enough for the other caller to find the lock taken
        computed.extend(keys[i] for i in idx)
        return np.ones((len(idx), 3), dtype=np.float32) * np.array(idx)[:, None]

    out = {}

    def call(name):
        out[name] = _cached_batches(keys, cache, "ns", compute, 3, lambda v: v.shape == (3,),
                                    batch_size=2, desc="test", progress=False)

    threads = [threading.Thread(target=call, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(computed) == sorted(keys)  # each once
    np.testing.assert_array_equal(out["a"], out["b"])
    np.testing.assert_array_equal(out["a"][:, 0], np.arange(6))


def test_image_embeddings_do_not_depend_on_the_cache_history(tmp_path):
    """The same images give the same bytes whether they were embedded all in one call or some
    first on their own (a partly warm cache): a forward pass always holds forward_batch images."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(17):  # one pass of 16 and one of 1 (sizes 1-8 agree with each other, not 16)
        p = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (40 + 2 * i, 64, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    emb = EfficientNetEmbedder()
    at_once = embed_images(paths, FeatureCache(tmp_path / "one"), extractor=emb, progress=False)
    warm = FeatureCache(tmp_path / "two")
    for p in (paths[5], paths[1]):  # computed alone first: passes of one image plus padding
        embed_images([p], warm, extractor=emb, progress=False)
    later = embed_images(paths, warm, extractor=emb, progress=False)
    np.testing.assert_array_equal(at_once, later)
    assert emb.forward_batch == 16 and emb.namespace != EfficientNetEmbedder(forward_batch=8).namespace
    assert emb.batch([]).shape == (0, 1280)
