"""Independent CPU jobs in worker processes: one home for fanning fits out over the cores.

The ``mini`` fits are small single-threaded torch programs (one intra-op thread, see
:mod:`kdsl_utils.threads`): on 2 cores, two fits side by side take the time of one. Threads
would not do: a fit seeds torch's global generator (weight init, dropout), which threads
share. So each job runs in a fresh ``spawn`` process (not ``fork``: the parent — a Jupyter
kernel — has live OpenMP and onnxruntime threads, which ``fork`` does not carry over
safely) with one torch thread, and returns a picklable result. The processes are started at
the first fan-out and kept for the next (one start per notebook kernel). Results are bit-identical
to the same jobs run one after another in this process (tested): a job depends only on its
arguments.

``workers <= 1`` (the GPU profiles: one model at a time) runs the jobs here, in order; so
does a job that runs jobs of its own inside a worker (no pools in pools).
"""

from __future__ import annotations

import atexit
import importlib
import multiprocessing as mp
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Generic, TypeVar

import torch
from tqdm.auto import tqdm

J = TypeVar("J")
R = TypeVar("R")


class JobError(RuntimeError):
    """A job failed in a worker (or its worker died); names the job."""


_IN_WORKER = False  # set in worker processes: their own jobs run in order (no pools in pools)


def _init_worker(initializer: Callable[..., None] | None, initargs: tuple) -> None:
    global _IN_WORKER
    _IN_WORKER = True
    # An interrupt (Ctrl-C, or papermill shutting the kernel down) goes to the parent, which
    # shuts the pool down; workers ignoring it do not print a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    if initializer is not None:
        initializer(*initargs)


FITS = "fits"  # the pool of run_jobs
_POOLS: dict[str, tuple[tuple, ProcessPoolExecutor]] = {}  # name -> (set-up, pool)


def pool(name: str, workers: int, initializer: Callable[..., None] | None = None,
         initargs: tuple = ()) -> ProcessPoolExecutor:
    """This process's pool ``name`` (``"fits"``; ``"ocr"``, see :func:`kdsl_utils.features.
    ocr_images`) of ``workers`` spawned processes, each set up by ``initializer(*initargs)``:
    started at first use and kept, since a start costs several seconds of imports per
    process and a notebook fans out several times, until the process ends or a worker dies.
    A request with another worker count or set-up replaces the running pool of that name."""
    key = (workers, initializer, initargs)
    if name in _POOLS and _POOLS[name][0] != key:
        shutdown(name, wait=True)
    if name not in _POOLS:
        _POOLS[name] = (key, ProcessPoolExecutor(max_workers=workers,
                                                 mp_context=mp.get_context("spawn"),
                                                 initializer=_init_worker,
                                                 initargs=(initializer, initargs)))
    return _POOLS[name][1]


def running(name: str) -> ProcessPoolExecutor | None:
    """The pool ``name`` if it runs, else None."""
    return _POOLS[name][1] if name in _POOLS else None


def prestart(workers: int, module: str) -> None:
    """Start the fits pool now and have each worker import ``module`` (the jobs' own module),
    so that the seconds of imports overlap with the work the caller does before its first
    :func:`run_jobs` (reading features). No-op where ``workers <= 1``."""
    if workers <= 1 or _IN_WORKER:
        return
    ex = pool(FITS, workers)
    for _ in range(workers):
        ex.submit(importlib.import_module, module)


def shutdown(name: str | None = None, *, wait: bool = False) -> None:
    """Stop the pool ``name`` (every pool: None); the next use starts new processes."""
    for n in [name] if name is not None else list(_POOLS):
        if n in _POOLS:
            _POOLS.pop(n)[1].shutdown(wait=wait, cancel_futures=True)


atexit.register(shutdown)


class Batch(Generic[R]):
    """Jobs handed to the fits pool by :func:`submit_jobs`; :meth:`results` waits for them.

    Where the jobs run here (``workers <= 1``, one job, or inside a worker) nothing starts
    until :meth:`results`, which then runs them in order: the same results either way."""

    def __init__(self, fn: Callable[[J], R], jobs: Sequence[J], *, workers: int, desc: str,
                 name: Callable[[J], str] = repr, bar: Any = None):
        self.fn, self.jobs, self.desc, self.name = fn, list(jobs), desc, name
        self.workers = 1 if _IN_WORKER else workers
        self._own_bar = bar is None
        self.bar = bar
        self._futures: dict[Any, int] = {}
        self._out: list[R] | None = None
        if self.workers > 1 and len(self.jobs) > 1:
            ex = pool(FITS, self.workers)
            self._futures = {ex.submit(fn, job): i for i, job in enumerate(self.jobs)}

    def results(self) -> list[R]:
        """``[fn(job) for job in jobs]`` in the order of the jobs (computed once; a second
        call returns the same list). A failing job raises :class:`JobError` naming it."""
        if self._out is not None:
            return self._out
        bar = tqdm(total=len(self.jobs), desc=self.desc, unit="job") if self._own_bar else self.bar
        try:
            self._out = self._collect(bar) if self._futures else self._run_here(bar)
        finally:
            if self._own_bar:
                bar.close()
        return self._out

    def _run_here(self, bar) -> list[R]:
        out = []
        for job in self.jobs:
            try:
                out.append(self.fn(job))
            except Exception as e:
                raise JobError(f"{self.desc}: {self.name(job)} failed: {e}") from e
            bar.update()
        return out

    def _collect(self, bar) -> list[R]:
        results: dict[int, R] = {}
        for fut in as_completed(self._futures):
            i = self._futures[fut]
            try:
                results[i] = fut.result()
            except BrokenProcessPool as e:
                shutdown(FITS)
                raise JobError(f"{self.desc}: a worker process died (killed for memory?) "
                               f"while running {self.name(self.jobs[i])}") from e
            except Exception as e:
                self.cancel()
                raise JobError(f"{self.desc}: {self.name(self.jobs[i])} failed: {e}") from e
            bar.update()
        return [results[i] for i in range(len(self.jobs))]

    def cancel(self) -> None:
        """Drop the jobs that have not started (a started one runs to its end, unread)."""
        for f in self._futures:
            f.cancel()


def submit_jobs(fn: Callable[[J], R], jobs: Sequence[J], *, workers: int, desc: str,
                name: Callable[[J], str] = repr, bar: Any = None) -> Batch[R]:
    """Hand ``[fn(job) for job in jobs]`` to up to ``workers`` worker processes and return
    at once: the caller works on while they fit, then reads :meth:`Batch.results`. Jobs of
    several batches share the one pool, first submitted first run. Same rules as
    :func:`run_jobs`."""
    return Batch(fn, jobs, workers=workers, desc=desc, name=name, bar=bar)


def run_jobs(fn: Callable[[J], R], jobs: Sequence[J], *, workers: int, desc: str,
             name: Callable[[J], str] = repr, bar: Any = None) -> list[R]:
    """``[fn(job) for job in jobs]``, with up to ``workers`` jobs at a time in worker
    processes (``fn`` and the jobs must pickle: ``fn`` a module-level function, or a
    ``functools.partial`` of one). Results come back in the order of ``jobs``. A failing
    job raises :class:`JobError` naming it (``name(job)``), with the worker's exception as
    the cause. ``bar``: a tqdm bar to advance per finished job (else one is made)."""
    return submit_jobs(fn, jobs, workers=workers, desc=desc, name=name, bar=bar).results()
