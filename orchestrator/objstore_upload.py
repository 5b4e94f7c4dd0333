"""Object storage: the atomic, bounded streaming upload (:func:`upload`).

Part of :mod:`orchestrator.objstore`, whose docstring says how memory is bounded and why
the obstore future is never awaited by the producer (abort on error and on cancellation).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
import obstore

from orchestrator.errors import MicsExportError
from orchestrator.objstore_base import (
    ObjectInfo,
    StorageError,
    _head_meta,
    _map_error,
    _url_of,
)

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from obstore import Attributes, PutResult
    from obstore.store import ObjectStore

log = logging.getLogger("orchestrator.objstore")  # one logger for the object-store modules

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 5 * MiB
"""S3's minimum part size: 10,000 parts of it make 48.8 GiB, the largest object one upload can hold."""
DEFAULT_MAX_CONCURRENCY = 2
"""Parts in flight per upload. Peak memory inside obstore is ``part_size × (this + 1)``."""
DEFAULT_COALESCE_BYTES = 1 * MiB
"""Small writes are gathered into blocks of this size before crossing to obstore."""
DEFAULT_QUEUE_CHUNKS = 4
"""Blocks buffered between the producer and obstore (the producer waits beyond that)."""
DEFAULT_SETTLE_TIMEOUT_S = 30.0
"""How long an abort (or a completion interrupted by cancellation) may take before giving up."""
_STANDARD_ATTRIBUTES = {
    "Content-Disposition",
    "Content-Encoding",
    "Content-Language",
    "Content-Type",
    "Cache-Control",
    "Storage-Class",
}
_METADATA_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Aborted(Exception):
    """Raised inside the upload's chunk iterator so that obstore aborts the multipart upload."""


# --------------------------------------------------------------------------- streaming upload


class _Chunks:
    """The async iterator obstore pulls parts from; raises :class:`_Aborted` to make it abort.

    obstore calls ``__anext__`` from its own thread, scheduling each call as a task on our
    event loop, one call at a time.
    """

    def __init__(self, upload: Upload, receive: MemoryObjectReceiveStream[bytes]) -> None:
        self._upload = upload
        self._receive = receive

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        if self._upload.aborting:
            raise _Aborted
        try:
            chunk = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            # The producer closed its end: a normal end unless it closed it to abort.
            if self._upload.aborting:
                raise _Aborted from None
            raise StopAsyncIteration from None
        if self._upload.aborting:
            raise _Aborted
        return chunk


@dataclass(eq=False)
class Upload:
    """A streaming upload in progress; use through :func:`upload`."""

    store: ObjectStore
    key: str
    attributes: Attributes | None = None
    part_size: int = DEFAULT_PART_SIZE
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    queue_chunks: int = DEFAULT_QUEUE_CHUNKS
    coalesce_bytes: int = DEFAULT_COALESCE_BYTES
    settle_timeout_s: float = DEFAULT_SETTLE_TIMEOUT_S
    size: int = 0
    """Bytes accepted so far."""
    aborting: bool = False
    result: ObjectInfo | None = None
    """Size and ETag of the complete object, once the ``async with`` block has ended normally."""
    _send: MemoryObjectSendStream[bytes] | None = field(default=None, repr=False)
    _future: asyncio.Future[PutResult] | None = field(default=None, repr=False)
    _pending: list[bytes] = field(default_factory=list, repr=False)
    _pending_bytes: int = field(default=0, repr=False)

    async def __aenter__(self) -> Upload:
        send, receive = anyio.create_memory_object_stream[bytes](max_buffer_size=self.queue_chunks)
        self._send = send
        # obstore starts the multipart upload right away, on its own runtime; nobody awaits
        # this future in a way that could cancel it (see _abort).
        self._future = asyncio.ensure_future(
            obstore.put_async(
                self.store,
                self.key,
                _Chunks(self, receive),
                attributes=self.attributes,
                use_multipart=True,
                chunk_size=self.part_size,
                max_concurrency=self.max_concurrency,
            )
        )
        # If obstore stops early (store error), wake a producer blocked on a full queue.
        self._future.add_done_callback(lambda _f: receive.close())
        return self

    async def write(self, chunk: bytes) -> None:
        """Add ``chunk`` (immutable ``bytes``: a block of one chunk is passed on without a copy).

        Waits while obstore is ``queue_chunks`` blocks behind; raises the store's error as
        one line if the upload has already failed.
        """
        assert self._send is not None and self._future is not None, "use `async with upload(...)`"
        if not chunk:
            return
        if self._future.done():
            raise self._failure()
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        self.size += len(chunk)
        if self._pending_bytes >= self.coalesce_bytes:
            await self._flush()

    async def _flush(self) -> None:
        """Send the gathered small writes as one block."""
        assert self._send is not None
        if not self._pending:
            return
        block = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        try:
            await self._send.send(block)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise self._failure() from None

    def _failure(self) -> MicsExportError:
        """The error that ended the upload early, as one line."""
        assert self._future is not None
        exc = self._future.exception() if self._future.done() and not self._future.cancelled() else None
        if exc is None:
            return StorageError(f"cannot write {_url_of(self.store, self.key)}: the upload ended early")
        return _map_error(exc, self.store, self.key, "cannot write")

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._send is not None and self._future is not None
        if exc_type is not None:
            await self._abort()
            return
        try:
            await self._flush()
        except BaseException:
            await self._abort()
            raise
        self._send.close()
        try:
            # Unshielded, so a cancellation arriving now can still turn into an abort...
            await asyncio.shield(self._future)
        except anyio.get_cancelled_exc_class():
            # ...when obstore has not seen the end of the chunks yet; if it has, it is
            # completing the object (complete is fine, half is not) and we let it finish.
            await self._abort()
            raise
        except Exception as error:
            raise _map_error(error, self.store, self.key, "cannot write") from None
        put = self._future.result()
        meta = await _head_meta(self.store, self.key)
        # The store must hold exactly what was sent, in the object this upload created:
        # the manifest trusts this size and ETag from now on.
        if meta is None or meta["size"] != self.size or (put["e_tag"] and meta["e_tag"] != put["e_tag"]):
            found = "nothing" if meta is None else f"{meta['size']} bytes, ETag {meta['e_tag']}"
            raise StorageError(
                f"cannot write {_url_of(self.store, self.key)}: sent {self.size} bytes (ETag {put['e_tag']}), "
                f"the store holds {found}"
            )
        self.result = ObjectInfo(meta["size"], meta["e_tag"])

    async def _abort(self) -> None:
        """Make obstore abort the multipart upload and wait for it, whatever cancels us."""
        assert self._send is not None and self._future is not None
        self.aborting = True
        self._send.close()
        future = self._future
        natively_cancelled = False
        deadline = anyio.current_time() + self.settle_timeout_s
        # Shielded from anyio cancel scopes (SIGTERM cancels the run's task group)...
        with anyio.CancelScope(shield=True):
            while not future.done() and (remaining := deadline - anyio.current_time()) > 0:
                try:
                    # ...and asyncio.wait never cancels what it waits for, unlike `await future`.
                    await asyncio.wait({future}, timeout=remaining)
                except asyncio.CancelledError:
                    natively_cancelled = True  # a bare Task.cancel(): finish aborting first
        if not future.done():
            future.cancel()
            log.warning(
                "abandoned the upload of %s after %.0f s: the bucket's lifecycle rule removes the pending parts",
                _url_of(self.store, self.key),
                self.settle_timeout_s,
            )
        elif not future.cancelled() and (error := future.exception()) is not None and not isinstance(error, _Aborted):
            # obstore already failed on its own (then it aborted), or the abort itself failed.
            log.debug("upload of %s ended with %s", _url_of(self.store, self.key), type(error).__name__)
        if natively_cancelled:
            raise asyncio.CancelledError


def upload(
    store: ObjectStore,
    key: str,
    *,
    attributes: Attributes | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    queue_chunks: int = DEFAULT_QUEUE_CHUNKS,
    coalesce_bytes: int = DEFAULT_COALESCE_BYTES,
    settle_timeout_s: float = DEFAULT_SETTLE_TIMEOUT_S,
) -> Upload:
    """Stream an object: ``async with upload(store, key) as up: await up.write(chunk)``.

    The object appears under ``key`` only if the block ends normally; then ``up.result``
    holds its size and ETag (checked by a HEAD). If the block raises or is cancelled, the
    multipart upload is aborted before the exception propagates. ``attributes``: standard
    ones (``Content-Type``...) and user metadata, whose names must be identifiers
    (letters, digits, underscores: Azure's rule) as they are fixed when the upload starts.
    """
    for name in attributes or {}:
        if name not in _STANDARD_ATTRIBUTES and not _METADATA_NAME_RE.match(name):
            # Azure only takes C# identifiers as metadata names (HTTP 400 InvalidMetadata).
            raise ValueError(f"metadata name {name!r}: use letters, digits and underscores only")
    return Upload(
        store,
        key,
        attributes=attributes,
        part_size=part_size,
        max_concurrency=max_concurrency,
        queue_chunks=queue_chunks,
        coalesce_bytes=coalesce_bytes,
        settle_timeout_s=settle_timeout_s,
    )


__all__ = [
    "DEFAULT_COALESCE_BYTES",
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_PART_SIZE",
    "DEFAULT_QUEUE_CHUNKS",
    "DEFAULT_SETTLE_TIMEOUT_S",
    "Upload",
    "upload",
]
