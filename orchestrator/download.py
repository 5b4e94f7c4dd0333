"""Stream → lines → records → sink: one result file onto disk, in bounded memory.

The event loop receives a chunk, has its lines checked (:mod:`orchestrator.ndjson` in
process, or :mod:`orchestrator.workers` in worker processes) and hands it to a writer
thread over a bounded queue (back-pressure: at most ``queue_chunks`` chunks wait). The
writer hashes, compresses and writes off the event loop (hashlib, zlib, zstd and file
writes release the GIL, so they overlap with parsing on the other core), into a
temporary file in the destination folder. At the end: flush, fsync, rename, fsync the
folder — so the final name only ever holds a complete file.

Memory per download is about ``(queue_chunks + 2) × chunk size``, whatever the file's size.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import zstandard

from orchestrator.errors import InvalidDataError
from orchestrator.ndjson import LineChecker, LineStats

if TYPE_CHECKING:
    from orchestrator.workers import ValidatorPool

COMPRESSIONS = {"none": "", "gzip": ".gz", "zstd": ".zst"}
"""Compression name → suffix after ``.ndjson``."""

READ_BACK_BYTES = 4 << 20


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


@dataclass(frozen=True, slots=True)
class DownloadResult:
    """What was written: ``bytes`` and ``sha256`` are of the uncompressed content."""

    path: Path
    bytes: int
    sha256: str
    stats: LineStats
    resumed_from: int = 0

    @property
    def records(self) -> int:
        """Non-blank lines that parse as JSON."""
        return self.stats.records


def output_name(name: str, compression: str) -> str:
    """``NAME.ndjson`` plus the compression's suffix."""
    return f"{name}.ndjson{COMPRESSIONS[compression]}"


def part_path(dest: Path, tag: str) -> Path:
    """The temporary file for ``dest``: hidden, in the same folder (rename is atomic there)."""
    return dest.with_name(f".{dest.name}.{tag}.part")


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _read_back(part: Path, checker: LineChecker, digest: Any) -> int:
    """Rebuild hash and counts from a partial file already on disk; returns its size."""

    def read() -> int:
        size = 0
        with part.open("rb") as f:
            while block := f.read(READ_BACK_BYTES):
                digest.update(block)
                checker.feed(block)
                size += len(block)
        return size

    return await anyio.to_thread.run_sync(read, abandon_on_cancel=True)


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

    async def finish(self) -> LineStats:
        return self.checker.finish()


_STOP = object()


class _FileWriter:
    """One thread that hashes, compresses and writes, fed through a bounded queue.

    Measured on a 1 GiB download (benchmarks/README.md): a single writer thread keeps
    the event loop within noise of not writing at all, where one aiofiles call per chunk
    cost ~20% (a thread hop and a future per write). hashlib, zlib, zstd and file writes
    release the GIL, so this thread runs beside the parsing on the other core.
    """

    def __init__(self, path: Path, append: bool, compressor: _Compressor | None, digest: Any, depth: int) -> None:
        self._queue: queue.Queue[object] = queue.Queue(depth)
        self._file = path.open("ab" if append else "wb")
        self._compressor = compressor
        self._digest = digest
        self._error: BaseException | None = None
        self._aborted = False
        self._thread = threading.Thread(target=self._run, name=f"writer:{path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not _STOP:
                if self._aborted or self._error is not None:
                    continue  # drain, so that a blocked producer wakes up
                assert isinstance(item, bytes)
                self._digest.update(item)
                self._file.write(self._compressor.compress(item) if self._compressor else item)
            if not self._aborted and self._error is None:
                if self._compressor is not None:
                    self._file.write(self._compressor.flush())
                self._file.flush()
                os.fsync(self._file.fileno())
        except BaseException as exc:  # reported to the event loop by put() / close()
            self._error = exc
            with contextlib.suppress(queue.Empty):
                while True:
                    self._queue.get_nowait()
        finally:
            self._file.close()

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
        """Stop writing at once (the caller removes the file)."""
        self._aborted = True
        with contextlib.suppress(queue.Full):  # the thread drains the queue and stops on _STOP
            self._queue.put(_STOP, timeout=1)


async def download(
    open_stream: Callable[[int], AsyncIterator[bytes]],
    dest: Path,
    *,
    compression: str = "none",
    tag: str = "download",
    resume: bool = True,
    on_invalid: str = "keep",
    on_progress: Callable[[int], None] | None = None,
    pool: ValidatorPool | None = None,
    queue_chunks: int = 8,
    stale_tags: Iterable[str] = (),
    before_rename: Callable[[DownloadResult], Awaitable[None]] | None = None,
) -> DownloadResult:
    """Stream ``open_stream(start)`` into ``dest``, atomically.

    ``tag`` names the temporary file (the execution id, so that a part file is never
    resumed into another execution's result). With ``resume`` and no compression, a part
    file left by an earlier, killed run is continued from its size. ``on_progress`` gets
    the byte count so far (uncompressed). With a ``pool``, lines are checked by worker
    processes. On any failure or cancellation the temporary file is removed, so a
    half-written file is never left under the final name. ``stale_tags`` name part files
    of other executions to remove. ``before_rename`` runs once the file is complete and
    fsynced, just before the rename, shielded from cancellation with it: a caller records
    the result there, so that no moment exists where the file is in place but unrecorded.

    Memory: at most ``queue_chunks`` chunks wait for the writer, plus the pool's ring.
    """
    part = part_path(dest, tag)
    for old in stale_tags:  # part files a killed run left for other executions of this job
        if old != tag:
            part_path(dest, old).unlink(missing_ok=True)
    digest = hashlib.sha256()
    inline = LineChecker()
    start = 0
    if resume and compression == "none" and part.exists():
        start = await _read_back(part, inline, digest)
    checker: Checker = pool.checker(inline.stats, inline.take_tail()) if pool else InlineChecker(inline)
    received = start
    writer = _FileWriter(part, start > 0, _compressor(compression), digest, queue_chunks)
    try:
        async for chunk in open_stream(start):
            await checker.feed(chunk)
            await writer.put(chunk)
            received += len(chunk)
            if on_progress is not None:
                on_progress(received)
        stats = await checker.finish()
        await writer.close()
        if stats.invalid_lines and on_invalid == "fail":
            raise InvalidDataError(
                f"{stats.invalid_lines} invalid line(s), first at line {stats.invalid_line_numbers[0]}"
            )
        result = DownloadResult(dest, received, digest.hexdigest(), stats, start)
        with anyio.CancelScope(shield=True):
            if before_rename is not None:
                await before_rename(result)
            os.replace(part, dest)
            fsync_dir(dest.parent)
    except BaseException:
        writer.abort()
        with contextlib.suppress(OSError):  # sync and instant: no await for a cancel to hit
            part.unlink()
        raise
    return result


def sha256_of_file(path: Path, compression: str = "none") -> str:
    """sha256 of a file's uncompressed content (blocking: call it in a thread)."""
    import gzip

    digest = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        stream: Any = stack.enter_context(path.open("rb"))
        if compression == "gzip":
            stream = stack.enter_context(gzip.open(stream))
        elif compression == "zstd":
            stream = stack.enter_context(zstandard.ZstdDecompressor().stream_reader(stream))
        while block := stream.read(READ_BACK_BYTES):
            digest.update(block)
    return digest.hexdigest()


__all__ = [
    "COMPRESSIONS",
    "Checker",
    "DownloadResult",
    "download",
    "fsync_dir",
    "output_name",
    "part_path",
    "sha256_of_file",
]
