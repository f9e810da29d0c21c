"""The backend of a profile, built or loaded: one factory for every caller (notebooks 01-03,
:mod:`kdsl_utils.knowledge`, :mod:`kdsl_utils.seesaw`, the command line).

``Profile.backend`` names the backend: ``mini`` → :class:`~.mini.MiniBackend` (CPU), else
``qwen_vl`` → :class:`~.qwen_vl.QwenVLBackend` (profiles ``paper`` and ``tiny``).
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from ..config import Profile
from ..features import FeatureCache
from ..representations import NeighbourVotes
from .mini import MiniBackend
from .qwen_vl import QwenVLBackend

BACKENDS = {"mini": MiniBackend, "qwen_vl": QwenVLBackend}


def backend_class(cfg: Profile) -> type:
    if cfg.backend not in BACKENDS:
        raise ValueError(f"profile {cfg.name!r}: unknown backend {cfg.backend!r}; "
                         f"known: {sorted(BACKENDS)}")
    return BACKENDS[cfg.backend]


def make_backend(cfg: Profile, **kwargs):
    """A fresh (unfitted) backend of the profile; ``kwargs`` go to its constructor. A mini
    backend with ``MiniCfg.retrieval`` gets its neighbour-label retriever here."""
    if cfg.backend == "mini" and cfg.mini.retrieval:
        cache = FeatureCache(kwargs["cache_dir"]) if kwargs.get("cache_dir") else None
        kwargs.setdefault("retriever", NeighbourVotes(cfg, cache))
    return backend_class(cfg)(cfg, **kwargs)


def load_backend(cfg: Profile, path: Path):
    """A backend saved by ``backend.save(path)``, for the profile's backend type."""
    return backend_class(cfg).load(path, cfg)


def release(backend) -> None:
    """Drop a fitted backend's model and free its memory (garbage collection for peft's
    reference cycles, then the CUDA cache), so that the next fit never finds a second large
    model alive: at 7B two would not fit on one GPU."""
    backend.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
