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
import dataclasses
import hashlib
import logging
import os
import queue
import stat
import threading
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath
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

    path: PurePath
    """Where it is: a local path, or the object's key in a bucket."""
    bytes: int
    sha256: str
    stats: LineStats
    resumed_from: int = 0
    length_check: str = "unverified"
    """How completeness was established (see :mod:`orchestrator.stream`)."""
    replaced: str | None = None
    """What was at the final name before (e.g. "a regular file of 12 bytes"), or None."""
    etag: str | None = None
    """A bucket object's ETag once complete (None for a local file)."""
    object_size: int | None = None
    """A bucket object's stored size (compressed, when compressed)."""

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


class Output(Protocol):
    """Where the writer thread puts the (compressed) bytes: a file, or a bucket upload."""

    def write(self, data: bytes) -> Any: ...
    def finish(self) -> None: ...
    def close(self) -> None: ...


class _FileOutput:
    """A file of its own on a dup of the part file's descriptor (closing it leaves the caller's open)."""

    def __init__(self, fd: int) -> None:
        self._file = os.fdopen(os.dup(fd), "wb")
        self._file.seek(0, os.SEEK_END)
        self.write = self._file.write

    def finish(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


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
        write = self._out.write  # a bound method: the local path stays one plain file write per chunk
        try:
            while (item := self._queue.get()) is not _STOP:
                if self._aborted or self._error is not None:
                    continue  # drain, so that a blocked producer wakes up
                assert isinstance(item, bytes)
                self._digest.update(item)
                write(self._compressor.compress(item) if self._compressor else item)
            if not self._aborted and self._error is None:
                if self._compressor is not None:
                    write(self._compressor.flush())
                self._out.finish()
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


class LocalTarget:
    """A file in a local folder: part file, fsync, same-inode check, rename, folder fsync."""

    can_rename = True

    def __init__(self, dest: Path, tag: str = "download", stale_tags: Iterable[str] = ()) -> None:
        self.dest = dest
        self.name = dest.name
        self.tag = tag
        self.stale_tags = tuple(stale_tags)
        self.part = part_path(dest, tag)
        self.fd = -1

    @property
    def where(self) -> PurePath:
        return self.dest

    async def open(self, resume: bool) -> int:
        for old in self.stale_tags:  # part files a killed run left for other executions of this job
            if old != self.tag:
                part_path(self.dest, old).unlink(missing_ok=True)
        self.fd, start = _open_part(self.part, resume)
        return start

    async def read_back(self, size: int, checker: LineChecker, digest: Any) -> None:
        await _read_back(self.fd, size, checker, digest)

    def output(self) -> Output:
        return _FileOutput(self.fd)

    async def restart(self) -> None:
        os.ftruncate(self.fd, 0)

    async def prepare_commit(self) -> str | None:
        """Check the part name still holds the file written; what is at the final name now."""
        mine = os.fstat(self.fd)
        now = os.lstat(self.part)
        if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            raise OSError(f"{self.part.name} was replaced while it was written: not renamed into place")
        return _describe_existing(self.dest)

    async def commit(self, name: str | None) -> tuple[str | None, int] | None:
        os.replace(self.part, self.dest if name is None else self.dest.with_name(name))
        fsync_dir(self.dest.parent)
        os.close(self.fd)
        self.fd = -1
        return None

    async def abort(self) -> None:
        # Sync and instant: no await for a cancel to hit.
        with contextlib.suppress(OSError):
            self.part.unlink()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def retarget(self, name: str) -> Target:
        raise NotImplementedError("a local part file is renamed, never rewritten")


async def _transfer(
    target: Target,
    open_stream: Callable[[int], AsyncIterator[bytes]],
    start: int,
    *,
    compression: str,
    on_progress: Callable[[int], None] | None,
    pool: ValidatorPool | None,
    queue_chunks: int,
    max_line_bytes: int | None,
) -> tuple[int, Any, LineStats, Any]:
    """Stream into ``target`` from ``start``; (bytes, digest, stats, stream) once all is written."""
    writer: _FileWriter | None = None
    try:
        restarts = 0
        while True:
            digest = hashlib.sha256()
            inline = LineChecker(max_line_bytes, defer_over=LONG_LINE_BYTES)
            if start:
                await target.read_back(start, inline, digest)
            checker: Checker = (
                pool.checker(inline.stats, inline.take_tail(), max_line_bytes) if pool else InlineChecker(inline)
            )
            received = start
            writer = _FileWriter(target.output(), target.name, _compressor(compression), digest, queue_chunks)
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


async def download(
    open_stream: Callable[[int], AsyncIterator[bytes]],
    dest: Path | Target,
    *,
    compression: str = "none",
    tag: str = "download",
    resume: bool = True,
    on_invalid: str = "keep",
    on_progress: Callable[[int], None] | None = None,
    pool: ValidatorPool | None = None,
    queue_chunks: int = 8,
    stale_tags: Iterable[str] = (),
    before_rename: Callable[[DownloadResult], Awaitable[str | None]] | None = None,
    max_line_bytes: int | None = None,
    on_unverified_length: str = "fail",
) -> DownloadResult:
    """Stream ``open_stream(start)`` into ``dest`` (a local path, or a :class:`Target`), atomically.

    ``tag`` names the temporary file (the execution id, so that a part file is never
    resumed into another execution's result). ``resume``: the caller knows this
    execution's part file is ours (the manifest recorded the download); then, with no
    compression, a part file left by an earlier, killed run is continued from its size,
    if it is a plain file of ours (module docstring); otherwise it is deleted. A bucket
    target never resumes: it starts from byte 0. ``on_progress`` gets
    the byte count so far (uncompressed). With a ``pool``, lines are checked by worker
    processes. On any failure or cancellation the temporary file is removed (the upload
    aborted), so a half-written file is never left under the final name. ``stale_tags`` name part files
    of other executions to remove. ``before_rename`` runs once the file is complete and
    fsynced, just before the rename, shielded from cancellation with it: a caller records
    the result there, so that no moment exists where the file is in place but unrecorded.
    It may return another final name (e.g. ``NAME.ndjson.rejected``): the content is then
    committed under that name, never under the normal one (a bucket target streams the
    execution's result again into that key, since a multipart upload cannot change key).

    Completeness: the stream's ``length_check`` (a :class:`~orchestrator.stream.ResumableStream`;
    any other iterator counts as ``unverified``). ``unverified`` fails with
    :class:`UnverifiedLengthError` unless ``on_unverified_length`` is ``keep``. When the
    stream raises :class:`~orchestrator.stream.ContentChangedError`, everything had so
    far is discarded and the download starts again from byte 0 (at most
    :data:`MAX_RESTARTS` times). A line longer than ``max_line_bytes`` fails it
    (:class:`~orchestrator.ndjson.LineTooLongError`).

    Memory: at most ``queue_chunks`` chunks wait for the writer, plus the pool's ring
    (plus the upload's bounded buffers for a bucket).
    """
    target: Target = LocalTarget(dest, tag, stale_tags) if isinstance(dest, Path) else dest
    options = {
        "compression": compression,
        "on_progress": on_progress,
        "pool": pool,
        "queue_chunks": queue_chunks,
        "max_line_bytes": max_line_bytes,
    }
    try:
        start = await target.open(resume and compression == "none")
        received, digest, stats, stream = await _transfer(target, open_stream, start, **options)  # type: ignore[arg-type]
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
        stored: tuple[str | None, int] | None = None
        with anyio.CancelScope(shield=True):
            # Recorded, then committed, with no moment a signal could fall between the two.
            result = DownloadResult(
                target.where,
                received,
                digest.hexdigest(),
                stats,
                start,
                length_check,
                await target.prepare_commit(),
            )
            name = await before_rename(result) if before_rename is not None else None
            if name == target.name:
                name = None
            elsewhere = name is not None and not target.can_rename
            if not elsewhere:
                stored = await target.commit(name)
        if elsewhere:
            assert name is not None
            # The upload went to the normal key and is not complete: abort it, and stream
            # the same execution's result into the other key (it must hash the same). Not
            # shielded: a signal or the deadline stops this second transfer like the first.
            await target.abort()
            target = target.retarget(name)
            await target.open(False)
            again, digest, _stats, _stream = await _transfer(target, open_stream, 0, **options)  # type: ignore[arg-type]
            if (again, digest.hexdigest()) != (result.bytes, result.sha256):
                raise TransportError(f"the result changed while it was stored again as {name}")
            with anyio.CancelScope(shield=True):
                stored = await target.commit(None)
    except BaseException:
        await target.abort()
        raise
    if stored is not None:
        result = dataclasses.replace(result, etag=stored[0], object_size=stored[1])
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
    "LocalTarget",
    "Output",
    "Target",
    "download",
    "fsync_dir",
    "output_name",
    "part_path",
    "sha256_of_file",
]
