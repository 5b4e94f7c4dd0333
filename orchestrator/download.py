"""Stream → lines → records → sink: one result file onto disk, in bounded memory.

The event loop receives a chunk, checks its lines (:mod:`orchestrator.ndjson`) and hands
it to a writer task over a bounded stream (back-pressure: at most ``queue_chunks``
chunks wait). The writer hashes, compresses and writes off the event loop (hashlib and
zlib/zstd release the GIL, so they overlap with parsing on the other core), into a
temporary file in the destination folder. At the end: flush, fsync, rename, fsync the
folder — so the final name only ever holds a complete file.

Memory per download is about ``(queue_chunks + 2) × chunk size``, whatever the file's size.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiofiles
import anyio
import zstandard

from orchestrator.errors import InvalidDataError, single_error
from orchestrator.ndjson import LineChecker, LineStats

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

    return await anyio.to_thread.run_sync(read)


async def download(
    open_stream: Callable[[int], AsyncIterator[bytes]],
    dest: Path,
    *,
    compression: str = "none",
    tag: str = "download",
    resume: bool = True,
    on_invalid: str = "keep",
    on_progress: Callable[[int], None] | None = None,
    queue_chunks: int = 4,
) -> DownloadResult:
    """Stream ``open_stream(start)`` into ``dest``, atomically.

    ``tag`` names the temporary file (the execution id, so that a part file is never
    resumed into another execution's result). With ``resume`` and no compression, a part
    file left by an earlier, killed run is continued from its size. ``on_progress`` gets
    the byte count so far (uncompressed). On any failure or cancellation the temporary
    file is removed, so a half-written file is never left under the final name.
    """
    part = part_path(dest, tag)
    digest = hashlib.sha256()
    checker = LineChecker()
    start = 0
    if resume and compression == "none" and part.exists():
        start = await _read_back(part, checker, digest)
    elif part.exists():
        part.unlink()
    compressor = _compressor(compression)
    received = start

    def prepare(chunk: bytes) -> bytes:
        digest.update(chunk)
        return compressor.compress(chunk) if compressor is not None else chunk

    send, receive = anyio.create_memory_object_stream[bytes](queue_chunks)

    async def writer() -> None:
        async with receive, aiofiles.open(part, "ab" if start else "wb") as f:
            async for chunk in receive:
                data = await anyio.to_thread.run_sync(prepare, chunk)
                if data:
                    await f.write(data)
            if compressor is not None:
                await f.write(compressor.flush())
            await f.flush()
            await anyio.to_thread.run_sync(os.fsync, f.fileno())

    try:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer)
                async with send:
                    async for chunk in open_stream(start):
                        checker.feed(chunk)
                        await send.send(chunk)
                        received += len(chunk)
                        if on_progress is not None:
                            on_progress(received)
        except BaseExceptionGroup as group:
            raise single_error(group) from None
        stats = checker.finish()
        if stats.invalid_lines and on_invalid == "fail":
            raise InvalidDataError(
                f"{stats.invalid_lines} invalid line(s), first at line {stats.invalid_line_numbers[0]}"
            )
        os.replace(part, dest)
        fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(OSError):  # sync and instant: no await for a cancel to hit
            part.unlink()
        raise
    return DownloadResult(dest, received, digest.hexdigest(), stats, start)


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
    "DownloadResult",
    "download",
    "fsync_dir",
    "output_name",
    "part_path",
    "sha256_of_file",
]
