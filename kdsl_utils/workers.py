"""Independent CPU jobs in worker processes: one home for fanning fits out over the cores.

The ``mini`` fits are small single-threaded torch programs (one intra-op thread, see
:mod:`kdsl_utils.threads`): on 2 cores, two fits side by side take the time of one. Threads
would not do: a fit seeds torch's global generator (weight init, dropout), which threads
share. So each job runs in a fresh ``spawn`` process (not ``fork``: the parent — a Jupyter
kernel — has live OpenMP and onnxruntime threads, which ``fork`` does not carry over
safely) with one torch thread, and returns a picklable result. Results are bit-identical
to the same jobs run one after another in this process (tested): a job depends only on its
arguments.

``workers <= 1`` (the GPU profiles: one model at a time) runs the jobs here, in order; so
does a job that runs jobs of its own inside a worker (no pools in pools).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

J = TypeVar("J")
R = TypeVar("R")


class JobError(RuntimeError):
    """A job failed in a worker (or its worker died); names the job."""


_IN_WORKER = False  # set in worker processes: their own jobs run in order (no pools in pools)


def _init_worker() -> None:
    global _IN_WORKER
    _IN_WORKER = True
    torch.set_num_threads(1)


@contextlib.contextmanager
def pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """``workers`` spawned processes (one torch thread each) for several :func:`run_jobs`
    calls in a row, started once (a start costs a few seconds of imports per process);
    None where ``workers <= 1``."""
    if workers <= 1 or _IN_WORKER:
        yield None
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker) as ex:
        yield ex


def run_jobs(fn: Callable[[J], R], jobs: Sequence[J], *, workers: int, desc: str,
             name: Callable[[J], str] = repr, bar: Any = None,
             executor: ProcessPoolExecutor | None = None) -> list[R]:
    """``[fn(job) for job in jobs]``, with up to ``workers`` jobs at a time in worker
    processes (``fn`` and the jobs must pickle: ``fn`` a module-level function, or a
    ``functools.partial`` of one). Results come back in the order of ``jobs``. A failing
    job raises :class:`JobError` naming it (``name(job)``), with the worker's exception as
    the cause. ``bar``: a tqdm bar to advance per finished job (else one is made);
    ``executor``: a running :func:`pool` to use (else one is started for this call)."""
    jobs = list(jobs)
    workers = 1 if _IN_WORKER else workers
    own = bar is None
    bar = tqdm(total=len(jobs), desc=desc, unit="job") if own else bar
    try:
        if workers <= 1 or (len(jobs) <= 1 and executor is None):
            out = []
            for job in jobs:
                try:
                    out.append(fn(job))
                except Exception as e:
                    raise JobError(f"{desc}: {name(job)} failed: {e}") from e
                bar.update()
            return out
        results: dict[int, R] = {}
        with contextlib.ExitStack() as stack:
            ex = executor or stack.enter_context(pool(min(workers, len(jobs))))
            futures = {ex.submit(fn, job): i for i, job in enumerate(jobs)}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    results[i] = fut.result()
                except BrokenProcessPool as e:
                    raise JobError(f"{desc}: a worker process died (killed for memory?) "
                                   f"while running {name(jobs[i])}") from e
                except Exception as e:
                    for f in futures:
                        f.cancel()
                    raise JobError(f"{desc}: {name(jobs[i])} failed: {e}") from e
                bar.update()
        return [results[i] for i in range(len(jobs))]
    finally:
        if own:
            bar.close()
