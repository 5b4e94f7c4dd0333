"""Stream → lines → records → sink: one result file onto disk, in bounded memory.

The event loop receives a chunk, has its lines checked (:mod:`orchestrator.ndjson` in
process, or :mod:`orchestrator.workers` in worker processes) and hands it to a writer
thread over a bounded queue (back-pressure: at most ``queue_chunks`` chunks wait). The
writer hashes, compresses and writes off the event loop (hashlib, zlib, zstd and file
writes release the GIL, so they overlap with parsing on the other core), into a
temporary file in the destination folder. At the end: flush, fsync, rename, fsync the
folder — so the final name only ever holds a complete file.

Memory per download is about ``(queue_chunks + 2) × chunk size``, whatever the file's size,
plus one line held back (at most ``max_line_bytes``).

Hostile folders. Part files and outputs are opened without following symlinks
(``O_NOFOLLOW``, ``O_EXCL`` for a new part file), a part file is resumed only when the
caller says this execution's part file is ours *and* it is a plain regular file of this
user with one link; anything else under its name is deleted and the download starts
from byte 0. The rename checks that the part name still holds the file written (same
inode), so nothing outside the folder is ever written; a symlink at the final name is
replaced by the file, never written through.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import stat
import threading
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import zstandard

from orchestrator.errors import InvalidDataError, JobError, TransportError
from orchestrator.ndjson import LineChecker, LineStats
from orchestrator.stream import ContentChangedError
from orchestrator.workers import LONG_LINE_BYTES, check_long_line

if TYPE_CHECKING:
    from orchestrator.workers import ValidatorPool

COMPRESSIONS = {"none": "", "gzip": ".gz", "zstd": ".zst"}
"""Compression name → suffix after ``.ndjson``."""

READ_BACK_BYTES = 4 << 20
MAX_RESTARTS = 3
"""How many times a download may start again from byte 0 because the file changed."""

log = logging.getLogger("orchestrator.download")


class UnverifiedLengthError(JobError):
    """The server stated no length and could not confirm the end (``on_unverified_length: fail``)."""


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
    length_check: str = "unverified"
    """How completeness was established (see :mod:`orchestrator.stream`)."""
    replaced: str | None = None
    """What was at the final name before (e.g. "a regular file of 12 bytes"), or None."""

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


async def _settle(checker: LineChecker) -> None:
    """Check the lines too long for this process in a child, in order (see ndjson)."""
    for number, pieces in checker.take_deferred():
        checker.stats.settle(number, await check_long_line(pieces))


async def _read_back(fd: int, size: int, checker: LineChecker, digest: Any) -> None:
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


_STOP = object()


class _FileWriter:
    """One thread that hashes, compresses and writes, fed through a bounded queue.

    Measured on a 1 GiB download (benchmarks/README.md): a single writer thread keeps
    the event loop within noise of not writing at all, where one aiofiles call per chunk
    cost ~20% (a thread hop and a future per write). hashlib, zlib, zstd and file writes
    release the GIL, so this thread runs beside the parsing on the other core.
    """

    def __init__(self, fd: int, name: str, compressor: _Compressor | None, digest: Any, depth: int) -> None:
        self._queue: queue.Queue[object] = queue.Queue(depth)
        # A file of its own on a dup of the caller's descriptor: closing it leaves the caller's open.
        self._file = os.fdopen(os.dup(fd), "wb")
        self._file.seek(0, os.SEEK_END)
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

    async def discard(self) -> None:
        """Stop writing and wait until the thread has let go of the file (to start it over)."""
        self.abort()
        await anyio.to_thread.run_sync(self._thread.join, abandon_on_cancel=True)


def _not_ours(st: os.stat_result) -> str | None:
    """Why a part file must not be resumed, or None when it is a plain file of ours."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return "owned by another user"
    if st.st_nlink != 1:
        return f"{st.st_nlink} hard links"
    return None


def _open_part(part: Path, resume: bool) -> tuple[int, int]:
    """Open the part file: (descriptor, bytes to resume from). Never follows a symlink."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    if resume:
        why: str | None = None
        try:
            # O_NONBLOCK: a FIFO planted under the name must not block the open.
            fd = os.open(part, flags | os.O_NONBLOCK)
        except FileNotFoundError:
            why = None
        except OSError as exc:  # ELOOP: a symlink; EISDIR; EACCES...
            why = exc.strerror or type(exc).__name__
        else:
            why = _not_ours(os.fstat(fd))
            if why is None:
                os.set_blocking(fd, True)
                return fd, os.fstat(fd).st_size
            os.close(fd)
        if why is not None:
            log.warning("%s is %s: deleted, downloading from byte 0", part.name, why, extra={"event": "part_discarded"})
    try:
        os.unlink(part)  # a symlink goes, never its target
        if not resume:
            log.info(
                "%s was not recorded for this execution: deleted, downloading from byte 0",
                part.name,
                extra={"event": "part_discarded"},
            )
    except FileNotFoundError:
        pass
    return os.open(part, flags | os.O_CREAT | os.O_EXCL, 0o666), 0


def _describe_existing(dest: Path) -> str | None:
    """What is at the final name now (before it is replaced), or None."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    if stat.S_ISREG(st.st_mode):
        return f"a regular file of {st.st_size} bytes"
    return "a special file"


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
    max_line_bytes: int | None = None,
    on_unverified_length: str = "fail",
) -> DownloadResult:
    """Stream ``open_stream(start)`` into ``dest``, atomically.

    ``tag`` names the temporary file (the execution id, so that a part file is never
    resumed into another execution's result). ``resume``: the caller knows this
    execution's part file is ours (the manifest recorded the download); then, with no
    compression, a part file left by an earlier, killed run is continued from its size,
    if it is a plain file of ours (module docstring); otherwise it is deleted. ``on_progress`` gets
    the byte count so far (uncompressed). With a ``pool``, lines are checked by worker
    processes. On any failure or cancellation the temporary file is removed, so a
    half-written file is never left under the final name. ``stale_tags`` name part files
    of other executions to remove. ``before_rename`` runs once the file is complete and
    fsynced, just before the rename, shielded from cancellation with it: a caller records
    the result there, so that no moment exists where the file is in place but unrecorded.

    Completeness: the stream's ``length_check`` (a :class:`~orchestrator.stream.ResumableStream`;
    any other iterator counts as ``unverified``). ``unverified`` fails with
    :class:`UnverifiedLengthError` unless ``on_unverified_length`` is ``keep``. When the
    stream raises :class:`~orchestrator.stream.ContentChangedError`, everything had so
    far is discarded and the download starts again from byte 0 (at most
    :data:`MAX_RESTARTS` times). A line longer than ``max_line_bytes`` fails it
    (:class:`~orchestrator.ndjson.LineTooLongError`).

    Memory: at most ``queue_chunks`` chunks wait for the writer, plus the pool's ring.
    """
    part = part_path(dest, tag)
    for old in stale_tags:  # part files a killed run left for other executions of this job
        if old != tag:
            part_path(dest, old).unlink(missing_ok=True)
    fd, start = _open_part(part, resume and compression == "none")
    writer: _FileWriter | None = None
    try:
        restarts = 0
        while True:
            digest = hashlib.sha256()
            inline = LineChecker(max_line_bytes, defer_over=LONG_LINE_BYTES)
            if start:
                await _read_back(fd, start, inline, digest)
            checker: Checker = (
                pool.checker(inline.stats, inline.take_tail(), max_line_bytes) if pool else InlineChecker(inline)
            )
            received = start
            writer = _FileWriter(fd, part.name, _compressor(compression), digest, queue_chunks)
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
                os.ftruncate(fd, 0)
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
        length_check = str(getattr(stream, "length_check", None) or "unverified")
        if length_check == "unverified" and on_unverified_length != "keep":
            raise UnverifiedLengthError(
                f"the server sent {received} bytes without a length and could not confirm that the file ends "
                "there; set on_unverified_length: keep to accept such files"
            )
        if stats.invalid_lines and on_invalid == "fail":
            raise InvalidDataError(
                f"{stats.invalid_lines} invalid line(s), first at line {stats.invalid_line_numbers[0]}"
            )
        mine = os.fstat(fd)
        with anyio.CancelScope(shield=True):
            now = os.lstat(part)
            if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
                raise OSError(f"{part.name} was replaced while it was written: not renamed into place")
            result = DownloadResult(
                dest, received, digest.hexdigest(), stats, start, length_check, _describe_existing(dest)
            )
            if before_rename is not None:
                await before_rename(result)
            os.replace(part, dest)
            fsync_dir(dest.parent)
    except BaseException:
        if writer is not None:
            writer.abort()
        with contextlib.suppress(OSError):  # sync and instant: no await for a cancel to hit
            part.unlink()
        raise
    finally:
        os.close(fd)
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
