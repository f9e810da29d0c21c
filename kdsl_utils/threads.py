"""One home for limiting torch's CPU threads inside a block.

The models run on the CPU here (mini's encoders and trunk, the tiny Qwen2-VL twin) are small:
intra-op threads only add overhead, and on a busy 2-core machine oversubscription makes
every op many times slower (measured: 20 s vs 0.7 s for a tiny-twin fit under load). One
thread also makes results, hence feature-cache entries, independent of the core count.
Parallelism comes from processes instead (OCR workers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int | None = 1) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, restored afterwards.

    ``n=None`` leaves the thread count as it is (callers that limit only on some devices
    pass ``1 if small_cpu else None``)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(old)
