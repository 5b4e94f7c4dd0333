"""The download's pipeline: stream → line checks → writer thread → a target's output.

The event loop receives a chunk, has its lines checked (:mod:`orchestrator.ndjson` in
process, or :mod:`orchestrator.workers` in worker processes) and hands it to a writer
thread over a bounded queue (back-pressure: at most ``queue_chunks`` chunks wait). The
writer hashes, compresses and writes off the event loop (hashlib, zlib, zstd and file
writes release the GIL, so they overlap with parsing on the other core).

A small file never gets a thread of its own (:class:`_Writer`): up to :data:`SMALL_FILE_BYTES`
wait in memory, and at the end one hop to anyio's worker threads hashes, writes, flushes,
fsyncs and closes them. Starting a thread and handing it chunks through a queue cost more
than the whole write of a 2 KB file (the scale benchmark's profile: ``Thread.start`` and the
queue's wake-ups were ~10% of the event loop at 1,000 small exports). The writer thread
starts once a file grows past that size, with what waited handed to it in order.

A little over ~350 lines: the two writers (held for a small file, threaded for a large
one) and the loop that drives them belong together.

Where the bytes land and how they become visible is a :class:`Target`'s business
(:mod:`orchestrator.part_file` for a local folder, :mod:`orchestrator.bucket_sink` for a bucket);
:mod:`orchestrator.download` drives a whole download through both.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import zstandard

from orchestrator import offload
from orchestrator.errors import TransportError
from orchestrator.ndjson import LineChecker, LineStats
from orchestrator.stream import ContentChangedError
from orchestrator.workers import LONG_LINE_BYTES, check_long_line

if TYPE_CHECKING:
    from orchestrator.workers import ValidatorPool

READ_BACK_BYTES = 4 << 20
SMALL_FILE_BYTES = 1 << 20
"""A download up to this size is written by one worker-thread hop at its end, not by a
writer thread of its own (one chunk of the API's streams: bounded memory stays bounded)."""
INLINE_CHECK_BYTES = 64 << 10
"""With a validator pool, a download's first bytes up to this many are checked in process
(:class:`_InlineFirst`): ~0.3 ms of the event loop at most, less than a trip to a worker."""
MAX_RESTARTS = 3
"""How many times a download may start again from byte 0 because the file changed."""

log = logging.getLogger("orchestrator.download")  # the download's events, wherever their code lives


class _Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


def _compressor(compression: str) -> _Compressor | None:
    if compression == "gzip":
        return zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: a gzip container
    if compression == "zstd":
        compressor: _Compressor = zstandard.ZstdCompressor(level=3).compressobj()
        return compressor
    return None


async def _settle(checker: LineChecker) -> None:
    """Check the lines too long for this process in a child, in order (see ndjson)."""
    for number, pieces in checker.take_deferred():
        checker.stats.settle(number, await check_long_line(pieces))


async def read_back(fd: int, size: int, checker: LineChecker, digest: Any) -> None:
    """Rebuild hash and counts from the first ``size`` bytes of a part file already on disk."""
    offset = 0
    while offset < size:
        block = await anyio.to_thread.run_sync(os.pread, fd, min(READ_BACK_BYTES, size - offset), offset)
        if not block:
            raise OSError(f"part file shorter than its size ({offset} of {size} bytes)")
        digest.update(block)
        checker.feed(block)
        await _settle(checker)
        offset += len(block)


class Checker(Protocol):
    """Counts lines as chunks go by: in-process, or by a pool of worker processes."""

    async def feed(self, chunk: bytes) -> None: ...
    async def finish(self) -> LineStats: ...


class InlineChecker:
    """:class:`LineChecker` on the event loop (``--workers 0``)."""

    def __init__(self, checker: LineChecker) -> None:
        self.checker = checker

    async def feed(self, chunk: bytes) -> None:
        self.checker.feed(chunk)
        if self.checker.deferred:
            await _settle(self.checker)

    async def finish(self) -> LineStats:
        stats = self.checker.finish()
        await _settle(self.checker)
        return stats


class _InlineFirst:
    """Checks in process while the download is small, then hands over to the pool's workers.

    A small file's whole check costs less than one batch's trip to a worker process and back
    (the scale benchmark: ~2 KB files, one batch each). Past :data:`INLINE_CHECK_BYTES`, the
    pool continues from the inline checker's stats and held-back line, as it does after a
    resume's read-back: the verdicts are the same whoever checks (both are exact).
    """

    def __init__(self, inline: LineChecker, pool: ValidatorPool, max_line_bytes: int | None) -> None:
        self._inline = inline
        self._first = InlineChecker(inline)
        self._pool = pool
        self._max_line_bytes = max_line_bytes
        self._pooled: Checker | None = None
        self._inline_bytes = 0

    async def feed(self, chunk: bytes) -> None:
        if self._pooled is None:
            self._inline_bytes += len(chunk)
            if self._inline_bytes <= INLINE_CHECK_BYTES:
                await self._first.feed(chunk)
                return
            self._pooled = self._pool.checker(self._inline.stats, self._inline.take_tail(), self._max_line_bytes)
        await self._pooled.feed(chunk)

    async def finish(self) -> LineStats:
        return await (self._first if self._pooled is None else self._pooled).finish()


_STOP = object()


class Output(Protocol):
    """Where the writer thread puts the (compressed) bytes: a file, or a bucket upload."""

    def write(self, data: bytes) -> Any: ...
    def finish(self) -> None: ...
    def close(self) -> None: ...


def _write_chunk(out: Output, compressor: _Compressor | None, digest: Any, chunk: bytes) -> None:
    """One chunk of the file: hashed as served, compressed if asked, written (in a writer thread)."""
    digest.update(chunk)
    out.write(compressor.compress(chunk) if compressor else chunk)


def _finish(out: Output, compressor: _Compressor | None) -> None:
    """The end of the file: the compressor's tail, then the output's own finish (flush, fsync)."""
    if compressor is not None:
        out.write(compressor.flush())
    out.finish()


class _FileWriter:
    """One thread that hashes, compresses and writes, fed through a bounded queue.

    Measured on a 1 GiB download (benchmarks/README.md): a single writer thread keeps
    the event loop within noise of not writing at all, where one aiofiles call per chunk
    cost ~20% (a thread hop and a future per write). hashlib, zlib, zstd and file writes
    release the GIL, so this thread runs beside the parsing on the other core.
    """

    def __init__(self, out: Output, name: str, compressor: _Compressor | None, digest: Any, depth: int) -> None:
        self._queue: queue.Queue[object] = queue.Queue(depth)
        self._out = out
        self._compressor = compressor
        self._digest = digest
        self._error: BaseException | None = None
        self._aborted = False
        self._thread = threading.Thread(target=self._run, name=f"writer:{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not _STOP:
                if self._aborted or self._error is not None:
                    continue  # drain, so that a blocked producer wakes up
                assert isinstance(item, bytes)
                _write_chunk(self._out, self._compressor, self._digest, item)
            if not self._aborted and self._error is None:
                _finish(self._out, self._compressor)
        except BaseException as exc:  # reported to the event loop by put() / close()
            self._error = exc
            with contextlib.suppress(queue.Empty):
                while True:
                    self._queue.get_nowait()
        finally:
            try:
                self._out.close()
            except BaseException as exc:  # e.g. ENOSPC flushing on close: reported, never a thread traceback
                if self._error is None:
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    async def put(self, chunk: bytes) -> None:
        """Queue a chunk; waits (off the loop) only when the queue is full."""
        self._raise()
        try:
            self._queue.put_nowait(chunk)
        except queue.Full:
            await anyio.to_thread.run_sync(self._queue.put, chunk, abandon_on_cancel=True)

    async def close(self) -> None:
        """Write what is queued, flush, fsync; raise the thread's error if it had one."""
        # abandon_on_cancel: a signal must not wait for an fsync of gigabytes; abort() and
        # the unlink that follow a cancellation make the abandoned work harmless.
        await anyio.to_thread.run_sync(self._queue.put, _STOP, abandon_on_cancel=True)
        await anyio.to_thread.run_sync(self._thread.join, abandon_on_cancel=True)
        self._raise()

    def abort(self) -> None:
        """Stop writing at once (the caller removes the file); never blocks the event loop.

        The queue is emptied here and ``_STOP`` queued at once (only the event loop puts, so
        there is room), and an output whose write may be waiting on something (a bucket
        upload) is told to give up: the thread then ends after its current chunk at most.
        """
        self._aborted = True
        cancel = getattr(self._out, "cancel", None)
        if cancel is not None:
            cancel()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_STOP)

    async def discard(self) -> None:
        """Stop writing and wait until the thread has let go of the file (to start it over)."""
        self.abort()
        await anyio.to_thread.run_sync(self._thread.join, abandon_on_cancel=True)


class _Writer:
    """The download's writer: chunks wait in memory while the file is small, and are written
    by one worker-thread hop at :meth:`close`; past :data:`SMALL_FILE_BYTES`, a
    :class:`_FileWriter` takes over (what waited first, in order). Same calls, same errors."""

    def __init__(self, target: Target, compressor: _Compressor | None, digest: Any, depth: int) -> None:
        self._target = target
        self._compressor = compressor
        self._digest = digest
        self._depth = depth
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._thread: _FileWriter | None = None
        self._out: Output | None = None  # the small path's output, once its write has begun
        self._aborted = False

    async def put(self, chunk: bytes) -> None:
        """Hold a chunk, or queue it for the writer thread (started when the file outgrows memory)."""
        if self._thread is not None:
            await self._thread.put(chunk)
            return
        self._held.append(chunk)
        self._held_bytes += len(chunk)
        if self._held_bytes > SMALL_FILE_BYTES:
            held, self._held = self._held, []
            self._thread = _FileWriter(
                self._target.output(), self._target.name, self._compressor, self._digest, self._depth
            )
            for piece in held:
                await self._thread.put(piece)

    async def close(self) -> None:
        """Write what is held (or queued), flush, fsync; raise the write's error if it had one."""
        if self._thread is not None:
            await self._thread.close()
            return
        self._out = self._target.output()  # on the event loop: a bucket's output is bound to it
        # abandon_on_cancel, as _FileWriter.close: a signal does not wait for the fsync.
        await offload.run_sync(self._write_held, self._out, abandon_on_cancel=True)

    def _write_held(self, out: Output) -> None:
        """In a worker thread: hash, compress and write what is held, then finish and close ``out``
        (a failure to close, e.g. ENOSPC flushing, is raised unless an earlier error is)."""
        held, self._held = self._held, []
        try:
            for chunk in held:
                if self._aborted:
                    break
                _write_chunk(out, self._compressor, self._digest, chunk)
            else:
                _finish(out, self._compressor)
        except BaseException:
            with contextlib.suppress(Exception):
                out.close()
            raise
        out.close()

    def abort(self) -> None:
        """Stop writing at once (the caller removes the file); never blocks the event loop."""
        if self._thread is not None:
            self._thread.abort()
            return
        self._aborted = True
        cancel = getattr(self._out, "cancel", None)
        if cancel is not None:
            cancel()  # a bucket write waited on in the worker thread gives up

    async def discard(self) -> None:
        """Stop writing and let go of the file (to start it over)."""
        if self._thread is not None:
            await self._thread.discard()
        self._held, self._held_bytes = [], 0  # nothing was written by the small path yet


class Target(Protocol):
    """Where one download lands, and how it becomes visible (:mod:`orchestrator.sink`).

    :class:`LocalTarget` is a part file renamed into place; a bucket target streams into a
    multipart upload completed at the end. The download calls, in order: :meth:`open`,
    then (when it returned a size) :meth:`read_back`, then :meth:`output` for the writer
    thread, :meth:`restart` if the content changed, :meth:`prepare_commit` (before the
    caller's record) and :meth:`commit` at the end (it returns a bucket object's ETag and
    size), or :meth:`abort` on any failure or cancellation.
    """

    name: str
    """The final name (under the folder or prefix)."""
    can_rename: bool
    """Whether :meth:`commit` can put the content under another name than :attr:`name`."""

    @property
    def where(self) -> PurePath: ...
    async def open(self, resume: bool) -> int: ...
    async def read_back(self, size: int, checker: LineChecker, digest: Any) -> None: ...
    def output(self) -> Output: ...
    async def restart(self) -> None: ...
    async def prepare_commit(self) -> str | None: ...
    async def commit(self, name: str | None) -> tuple[str | None, int] | None: ...
    async def abort(self) -> None: ...
    def retarget(self, name: str) -> Target: ...


async def _transfer(
    target: Target,
    open_stream: Callable[[int], AsyncIterator[bytes]],
    start: int,
    *,
    compression: str,
    on_progress: Callable[[int], None] | None,
    on_start: Callable[[int], Awaitable[None]] | None = None,
    pool: ValidatorPool | None,
    queue_chunks: int,
    max_line_bytes: int | None,
) -> tuple[int, Any, LineStats, Any]:
    """Stream into ``target`` from ``start``; (bytes, digest, stats, stream) once all is written.
    ``on_start(offset)`` is awaited before each stream is opened (from ``start``, then from 0
    after each restart): before any byte of it reaches the target."""
    writer: _Writer | None = None
    try:
        restarts = 0
        while True:
            digest = hashlib.sha256()
            inline = LineChecker(max_line_bytes, defer_over=LONG_LINE_BYTES)
            if start:
                await target.read_back(start, inline, digest)
            checker: Checker = _InlineFirst(inline, pool, max_line_bytes) if pool else InlineChecker(inline)
            received = start
            writer = _Writer(target, _compressor(compression), digest, queue_chunks)
            if on_start is not None:
                await on_start(start)
            stream = open_stream(start)
            try:
                async for chunk in stream:
                    await checker.feed(chunk)
                    await writer.put(chunk)
                    received += len(chunk)
                    if on_progress is not None:
                        on_progress(received)
            except ContentChangedError as exc:
                restarts += 1
                if restarts > MAX_RESTARTS:
                    raise TransportError(f"{exc}; gave up after {MAX_RESTARTS} restarts from byte 0") from None
                log.warning("%s: downloading again from byte 0", exc, extra={"event": "download_restart"})
                await writer.discard()
                writer = None
                await target.restart()
                start = 0
                continue
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    with anyio.CancelScope(shield=True):
                        await aclose()
            break
        stats = await checker.finish()
        await writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return received, digest, stats, stream


__all__ = ["Checker", "InlineChecker", "Output", "Target", "read_back"]
