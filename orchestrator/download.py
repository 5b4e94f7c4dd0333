"""Stream → lines → records → target: one result file, in bounded memory, made visible atomically.

:func:`receive` streams a result through the pipeline (:mod:`orchestrator.transfer`: line
checks, a writer thread that hashes, compresses and writes) into a :class:`Target` (a local
part file, :mod:`orchestrator.part_file`, or a bucket upload) and returns a
:class:`CompletedPart`: complete, checked, fsynced, and visible to nobody yet. The caller
records it, then commits it, inside one shielded scope — so the manifest says SUCCEEDED only
for a file that is about to be committed, and a failed manifest write means no commit::

    part = await receive(open_stream, target, options)
    async with part:                        # aborted (part file removed) unless committed
        with anyio.CancelScope(shield=True):
            name = await record(part.result)
            await part.commit(name)
        result = await part.finish()

:func:`download` is that without a record (the ``download`` command, tests).

Memory per download is about ``(queue_chunks + 2) × chunk size``, whatever the file's size,
plus one line held back (at most ``max_line_bytes``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePath
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio

from orchestrator.errors import InvalidDataError, JobError, TransportError
from orchestrator.ndjson import LineStats
from orchestrator.part_file import LocalTarget
from orchestrator.transfer import MAX_RESTARTS, Output, Target, _transfer

if TYPE_CHECKING:
    from orchestrator.workers import ValidatorPool

COMPRESSIONS = {"none": "", "gzip": ".gz", "zstd": ".zst"}
"""Compression name → suffix after ``.ndjson``."""


class Compression(StrEnum):
    """How the output is stored (``compression`` of a job)."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


class OnInvalid(StrEnum):
    """What an invalid line does to the download (``on_invalid``): kept and counted, or a failure."""

    KEEP = "keep"
    FAIL = "fail"


class OnUnverifiedLength(StrEnum):
    """A stream whose end could not be confirmed (``on_unverified_length``): a failure, or kept."""

    FAIL = "fail"
    KEEP = "keep"


@dataclass(frozen=True, slots=True)
class DownloadOptions:
    """How one download is checked and stored (a job's settings)."""

    compression: Compression = Compression.NONE
    on_invalid: OnInvalid = OnInvalid.KEEP
    on_unverified_length: OnUnverifiedLength = OnUnverifiedLength.FAIL
    max_line_bytes: int | None = None
    """A longer line fails the download (:class:`~orchestrator.ndjson.LineTooLongError`)."""
    queue_chunks: int = 8
    """Chunks that may wait for the writer thread (the back-pressure bound)."""

    @classmethod
    def of(cls, job: Any) -> DownloadOptions:
        """A job's settings (:class:`~orchestrator.config.Job`, already validated)."""
        return cls(
            Compression(job.compression),
            OnInvalid(job.on_invalid),
            OnUnverifiedLength(job.on_unverified_length),
            job.max_line_bytes,
        )


class UnverifiedLengthError(JobError):
    """The server stated no length and could not confirm the end (``on_unverified_length: fail``)."""


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


class CompletedPart:
    """A complete, checked, fsynced download that nothing can see yet (see the module docstring).

    As an async context manager it is aborted on the way out unless committed: the part file
    is removed (the upload aborted), so a half-done commit never leaves a file behind.
    """

    def __init__(
        self,
        target: Target,
        result: DownloadResult,
        open_stream: Callable[[int], AsyncIterator[bytes]],
        options: DownloadOptions,
        pool: ValidatorPool | None,
    ) -> None:
        self.target = target
        self.result = result
        """What was received; once committed, with a bucket object's ETag and size."""
        self.committed = False
        self._open_stream = open_stream
        self._options = options
        self._pool = pool
        self._store_again: str | None = None

    async def __aenter__(self) -> CompletedPart:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.committed:
            await self.target.abort()

    async def commit(self, name: str | None = None) -> None:
        """Make the content visible under its final name, or under ``name`` instead (e.g.
        ``NAME.ndjson.rejected``). Call it shielded, right after recording the result.

        A target that cannot rename (a multipart upload is bound to its key) aborts its
        upload here instead; :meth:`finish` then streams the same result into ``name``.
        """
        if name == self.target.name:
            name = None
        if name is not None and not self.target.can_rename:
            await self.target.abort()
            self._store_again = name
            return
        self._stored(await self.target.commit(name))

    async def finish(self) -> DownloadResult:
        """The committed result, after storing it again under another name when :meth:`commit`
        could not rename. Not shielded: a signal or the deadline stops that second transfer
        like the first (it must hash the same, or TransportError)."""
        if self._store_again is not None:
            name, self._store_again = self._store_again, None
            self.target = self.target.retarget(name)
            await self.target.open(False)
            again, digest, _stats, _stream = await _transfer(self.target, self._open_stream, 0, **self._pipeline())
            if (again, digest.hexdigest()) != (self.result.bytes, self.result.sha256):
                raise TransportError(f"the result changed while it was stored again as {name}")
            with anyio.CancelScope(shield=True):
                self._stored(await self.target.commit(None))
        if not self.committed:
            raise RuntimeError("finish() before commit()")
        return self.result

    def _pipeline(self) -> dict[str, Any]:
        o = self._options
        return {
            "compression": o.compression,
            "on_progress": None,
            "pool": self._pool,
            "queue_chunks": o.queue_chunks,
            "max_line_bytes": o.max_line_bytes,
        }

    def _stored(self, stored: tuple[str | None, int] | None) -> None:
        self.committed = True
        if stored is not None:
            self.result = dataclasses.replace(self.result, etag=stored[0], object_size=stored[1])


async def receive(
    open_stream: Callable[[int], AsyncIterator[bytes]],
    target: Target,
    options: DownloadOptions = DownloadOptions(),
    *,
    resume: bool = False,
    on_progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], Awaitable[None]] | None = None,
    pool: ValidatorPool | None = None,
) -> CompletedPart:
    """Stream ``open_stream(start)`` into ``target``, checked: the complete part, not yet visible.

    ``resume``: the caller knows this execution's part file is ours (the manifest recorded
    the download); then, with no compression, a part file left by an earlier, killed run
    is continued from its size, if it is a plain file of ours (:mod:`orchestrator.part_file`);
    otherwise it is deleted. A bucket target never resumes. ``on_progress`` gets the byte
    count so far (uncompressed); ``on_start(offset)`` is awaited before each stream is opened
    (from the part file's size, then from 0 after a restart), before its first byte is written.
    With a ``pool``, lines are checked by worker processes.
    On any failure or cancellation the part is removed (the upload aborted).

    Completeness: the stream's ``length_check`` (a :class:`~orchestrator.stream.ResumableStream`;
    any other iterator counts as ``unverified``). ``unverified`` fails with
    :class:`UnverifiedLengthError` unless ``on_unverified_length`` is ``keep``. When the
    stream raises :class:`~orchestrator.stream.ContentChangedError`, everything had so far
    is discarded and the download starts again from byte 0 (at most :data:`MAX_RESTARTS`
    times). A line longer than ``max_line_bytes`` fails it.
    """
    try:
        start = await target.open(resume and options.compression is Compression.NONE)
        received, digest, stats, stream = await _transfer(
            target,
            open_stream,
            start,
            compression=options.compression,
            on_progress=on_progress,
            on_start=on_start,
            pool=pool,
            queue_chunks=options.queue_chunks,
            max_line_bytes=options.max_line_bytes,
        )
        length_check = str(getattr(stream, "length_check", None) or "unverified")
        if length_check == "unverified" and options.on_unverified_length is not OnUnverifiedLength.KEEP:
            raise UnverifiedLengthError(
                f"the server sent {received} bytes without a length and could not confirm that the file ends "
                "there; set on_unverified_length: keep to accept such files"
            )
        if stats.invalid_lines and options.on_invalid is OnInvalid.FAIL:
            raise InvalidDataError(
                f"{stats.invalid_lines} invalid line(s), first at line {stats.invalid_line_numbers[0]}"
            )
        # The part name still holds what was written; what is at the final name now.
        replaced = await target.prepare_commit()
    except BaseException:
        await target.abort()
        raise
    result = DownloadResult(target.where, received, digest.hexdigest(), stats, start, length_check, replaced)
    return CompletedPart(target, result, open_stream, options, pool)


async def download(
    open_stream: Callable[[int], AsyncIterator[bytes]],
    dest: Path | Target,
    *,
    compression: str = "none",
    tag: str = "download",
    resume: bool = True,
    on_invalid: str = "keep",
    on_unverified_length: str = "fail",
    pool: ValidatorPool | None = None,
) -> DownloadResult:
    """:func:`receive` into ``dest`` (a local path, or a :class:`Target`), then commit: nothing
    to record (the ``download`` command). ``tag`` names a local part file (the execution id)."""
    target: Target = LocalTarget(dest, tag) if isinstance(dest, Path) else dest
    options = DownloadOptions(Compression(compression), OnInvalid(on_invalid), OnUnverifiedLength(on_unverified_length))
    part = await receive(open_stream, target, options, resume=resume, pool=pool)
    async with part:
        with anyio.CancelScope(shield=True):
            await part.commit()
        return await part.finish()


__all__ = [
    "COMPRESSIONS",
    "MAX_RESTARTS",
    "CompletedPart",
    "Compression",
    "DownloadOptions",
    "DownloadResult",
    "LocalTarget",
    "OnInvalid",
    "OnUnverifiedLength",
    "Output",
    "Target",
    "UnverifiedLengthError",
    "download",
    "output_name",
    "receive",
]
