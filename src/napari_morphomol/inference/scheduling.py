"""Where the chunk tasks of a prediction run, and the caller's watch over them.

A :class:`Scheduler` is set up before any work (a process pool or a cluster connection fails
fast): threads (default), synchronous, a spawn pool of processes, or a dask.distributed cluster
(an address or a ``Client``). :func:`run_chunks` computes one task per unfinished chunk in a
helper thread; the caller's thread polls the store's done-mask for progress and ``cancel()``
every :data:`POLL_SECONDS`, and on cancel (or Ctrl-C) writes the cancel marker that every task
reads before its next batch.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import dask
import zarr

from napari_morphomol.errors import InputError
from napari_morphomol.inference.store import CANCEL_MARKER, read_done_mask
from napari_morphomol.inference.worker import InferenceCancelled, RunSpec, run_chunk

POLL_SECONDS = 0.2
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Scheduler:
    """What the tasks are computed with: ``kind`` (threads, synchronous, processes, distributed),
    its ``handle`` (thread count, pool or client) and a description for the run's metadata."""

    kind: str
    handle: object
    description: str


def is_local(scheduler) -> bool:
    """Whether ``scheduler`` (as given to predict) runs the tasks on this machine (so its device is theirs)."""
    return scheduler is None or scheduler in ("threads", "synchronous", "processes")


def open_scheduler(scheduler, num_workers: int | None, stack: ExitStack) -> Scheduler:
    """The :class:`Scheduler` for predict's ``scheduler`` option; a pool or client lives as long as ``stack``."""
    if scheduler is None or scheduler == "threads":
        workers = 2 if num_workers is None else num_workers
        return Scheduler("threads", workers, f"threads ({workers})")
    if scheduler == "synchronous":
        return Scheduler("synchronous", None, "synchronous")
    if scheduler == "processes":
        import multiprocessing

        workers = min(2, os.cpu_count() or 1) if num_workers is None else num_workers
        pool = stack.enter_context(ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_limit_torch_threads, initargs=(max(1, (os.cpu_count() or 1) // workers),)))
        return Scheduler("processes", pool, f"processes ({workers})")
    from distributed import Client

    if isinstance(scheduler, Client):
        return Scheduler("distributed", scheduler, f"distributed ({scheduler.scheduler.address})")
    if isinstance(scheduler, str) and ":" in scheduler:
        try:
            client = stack.enter_context(Client(scheduler, timeout="20s", set_as_default=False))
        except (OSError, TimeoutError) as exc:
            raise InputError(
                f"cannot reach the dask scheduler at {scheduler} ({exc}); is the cluster running?"
            ) from exc
        return Scheduler("distributed", client, f"distributed ({scheduler})")
    raise InputError(f"unknown scheduler {scheduler!r}: use threads, processes, synchronous, a dask scheduler "
                     "address (tcp://host:8786) or a distributed.Client")


def _limit_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def compute(scheduler: Scheduler, tasks: list):
    """The results of the dask ``tasks``, computed on ``scheduler``."""
    if scheduler.kind == "threads":
        return dask.compute(*tasks, scheduler="threads", num_workers=scheduler.handle)
    if scheduler.kind == "processes":
        return dask.compute(*tasks, scheduler="processes", pool=scheduler.handle)
    if scheduler.kind == "synchronous":
        return dask.compute(*tasks, scheduler="synchronous")
    return scheduler.handle.gather(scheduler.handle.compute(list(tasks)))


def run_chunks(spec: RunSpec, pending: list[int], scheduler: Scheduler, partial: Path, n_chunks: int,
               progress: ProgressCallback | None, cancel: Callable[[], bool] | None) -> list[dict]:
    """Compute the chunk tasks in a helper thread; here, report progress and watch for cancel.

    Returns the tasks' timing records; raises :class:`InferenceCancelled` (with how many chunks the
    store keeps) when cancelled, or the first task's error."""
    tasks = [dask.delayed(run_chunk, pure=False)(spec, k) for k in pending]
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["records"] = list(compute(scheduler, tasks))
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=work, name="morphomol-predict", daemon=True)
    thread.start()
    root = zarr.open_group(partial, mode="r+")
    cancelled, reported = _watch(thread, root, partial, n_chunks, progress, cancel)
    if cancelled or isinstance(outcome.get("error"), InferenceCancelled):
        raise InferenceCancelled(
            f"prediction cancelled with {int(read_done_mask(root).sum())} of {n_chunks} chunks done; "
            f"run it again with the same store to resume ({partial})"
        )
    if "error" in outcome:
        raise outcome["error"]
    if progress is not None and reported != n_chunks:
        progress(n_chunks, n_chunks)
    return outcome["records"]


def _watch(thread: threading.Thread, root: zarr.Group, partial: Path, n_chunks: int,
           progress: ProgressCallback | None, cancel: Callable[[], bool] | None) -> tuple[bool, int]:
    """Until ``thread`` ends: report the done count on change, and on cancel (or Ctrl-C) write the
    cancel marker. Returns (cancelled, the last count reported)."""
    reported = -1
    cancelled = False
    while thread.is_alive():
        try:
            thread.join(POLL_SECONDS)
            stop = not cancelled and cancel is not None and cancel()
        except KeyboardInterrupt:
            stop = True
        if stop:  # tasks see the marker before their next batch
            (partial / CANCEL_MARKER).touch()
            cancelled = True
        if progress is not None:
            count = int(read_done_mask(root).sum())
            if count != reported:
                reported = count
                progress(count, n_chunks)
    return cancelled, reported
