"""Content hashes: the one home of every digest the package computes.

Feature-cache keys, data fingerprints, rule ids, checkpoint and model-twin keys, the tag of
a run with config overrides and per-record random seeds all come from here, so a key's
recipe (algorithm, canonical JSON, truncation) is written once. Changing a recipe changes
keys that live on disk (the shared feature cache, rule ids in committed rule bases): each
function states the exact bytes it hashes so that a change is a deliberate one.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (64 characters)."""
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    """Hex SHA-256 of ``text`` encoded as UTF-8."""
    return sha256_bytes(text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return sha256_bytes(Path(path).read_bytes())


def canonical_json(obj: Any) -> str:
    """``obj`` as JSON with sorted keys and unescaped non-ASCII: equal values, equal text."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)


def json_digest(obj: Any, n: int = 16) -> str:
    """First ``n`` hex digits of the SHA-256 of :func:`canonical_json` of ``obj``."""
    return sha256_text(canonical_json(obj))[:n]


def sha1_text(text: str, n: int = 40) -> str:
    """First ``n`` hex digits of the SHA-1 of ``text`` (UTF-8). Only for ids that already
    exist on disk under this recipe (rule ids); not a security property."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]


def files_digest(paths: Iterable[Path | str], n: int = 16) -> str:
    """Order-independent digest of files: SHA-256 over (name, SHA-256 of bytes) of each file
    in sorted path order; first ``n`` hex digits (the ``data_fingerprint`` of ``run.json``)."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:n]


def directory_digest(root: Path | str) -> str:
    """SHA-256 over every file under ``root``: relative POSIX path, a NUL, then the bytes,
    in sorted order (64 hex digits)."""
    h = hashlib.sha256()
    root = Path(root)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def stable_int(text: str) -> int:
    """A 32-bit integer from ``text`` that is the same in every process (CRC-32 of UTF-8;
    Python's ``hash`` is salted per process). For deriving per-item random seeds."""
    return zlib.crc32(text.encode("utf-8"))
