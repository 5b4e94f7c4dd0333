"""Blocking file work (fsync, rename, a small file's write) off the event loop, cheaply.

``anyio.to_thread.run_sync`` pays for a forced turn of the loop, a capacity limiter, a cancel
scope, a ``queue.Queue`` whose ``Condition.notify`` showed in the scale benchmark's profile,
and a copied context, at every call. A 1,000-export run makes ~3 such hops per export (the
small file's write, its commit, a share of the manifest journal's fsyncs). :func:`run_sync`
does the same job with a ``SimpleQueue`` (its wake-up is C) to a few long-lived daemon
threads and ``call_soon_threadsafe`` back.

Why not the standard library's ``loop.run_in_executor`` with a ``ThreadPoolExecutor``: it
costs more (all threads' CPU per hop, `python benchmarks/offload_hop.py`, one run: anyio 191 µs,
an executor 98 µs, this 68 µs), and its threads are joined at interpreter exit, so one fsync
stuck on a dying disk would hold a SIGTERMed run past its grace period; these threads are daemons.

Same contract as anyio's, for what this project uses of it:

* it raises the pending cancellation *before* starting the work (no work starts in a
  cancelled scope), but does not force a turn of the loop when there is none;
* ``abandon_on_cancel=False`` (the default): once started, the call returns only when the
  work is done, even if the task is cancelled meanwhile (the cancellation is raised at the
  caller's next checkpoint, as with anyio);
* ``abandon_on_cancel=True``: a cancellation returns at once, the thread finishes its work
  on its own, and its result or error is dropped.

Not carried over: the caller's context variables (nothing run here logs), and anyio's
``from_thread`` calls (nothing run here calls back into the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

T = TypeVar("T")

MAX_THREADS = 40
"""As many threads as anyio's default thread limiter allows: fsyncs waiting on the disk may overlap."""

_Item = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """On the loop: hand the thread's outcome to the waiter (gone if it abandoned the work)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Pool:
    """Daemon threads fed by one SimpleQueue; a thread is added when none is idle (up to MAX_THREADS)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0

    def submit(self, item: _Item) -> None:
        with self._lock:
            if self._idle == 0 and self._threads < MAX_THREADS:
                self._threads += 1
                threading.Thread(target=self._work, name=f"offload-{self._threads}", daemon=True).start()
            else:
                self._idle -= 1  # this item takes an idle thread (or waits for the first free one)
        self._queue.put(item)

    def _work(self) -> None:
        while True:
            loop, future, func, args = self._queue.get()
            result: Any = None
            error: BaseException | None = None
            try:
                result = func(*args)
            except BaseException as exc:  # handed to the waiter, never a thread traceback
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
                loop.call_soon_threadsafe(_settle, future, result, error)
            del loop, future, func, args, result, error
            with self._lock:
                self._idle += 1


_POOL = _Pool()


async def run_sync(func: Callable[..., T], *args: Any, abandon_on_cancel: bool = False) -> T:
    """``func(*args)`` in a worker thread (see the module docstring for the contract)."""
    await anyio.lowlevel.checkpoint_if_cancelled()
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    _POOL.submit((loop, future, func, args))
    if abandon_on_cancel:
        return await future
    with anyio.CancelScope(shield=True):
        # A direct task.cancel() (not anyio's, which the shield holds off) cancels the
        # future: as with anyio, the work still ends on its own in its thread.
        result = await future
    return result


__all__ = ["MAX_THREADS", "run_sync"]
