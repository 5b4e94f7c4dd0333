"""Object storage (S3, GCS, Azure Blob) as an output: the building block for issue 12.

One library for the three clouds: obstore (Rust ``object_store``). This module wraps the
few operations a run needs, with the same promises as the local folder:

**Locations.** :func:`parse_location` accepts ``s3://BUCKET/PREFIX``, ``gs://BUCKET/PREFIX``,
``az://CONTAINER/PREFIX`` and ``abfs[s]://CONTAINER/PREFIX`` (also
``abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/PREFIX``). A store is opened at the bucket's
root; keys are ``PREFIX/NAME`` (:meth:`Location.key`).

**Credentials** come only from the standard environment, which obstore reads itself:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` (+ ``AWS_ALLOW_HTTP=true``) for S3-compatible
stores, web identity (``AWS_WEB_IDENTITY_TOKEN_FILE`` + ``AWS_ROLE_ARN``, i.e. IRSA), ECS /
EC2 instance credentials; GCS application default credentials (``GOOGLE_APPLICATION_CREDENTIALS``,
gcloud's ADC file, workload identity via the metadata server); ``AZURE_STORAGE_ACCOUNT_NAME``,
``AZURE_STORAGE_ACCOUNT_KEY`` / SAS / service principal / workload identity / managed identity,
``AZURE_STORAGE_ENDPOINT``, ``AZURE_STORAGE_USE_EMULATOR`` (+ ``AZURITE_BLOB_STORAGE_URL``).
Errors never quote obstore's own message (it carries request URLs, which for Azure SAS hold
the signature, and response bodies): they are rebuilt from the status code and the
service's error code only, as one line.

**Atomic, bounded streaming upload** (:func:`upload`). Chunks go through a small bounded
queue into ``obstore.put_async`` fed by an async iterator, which runs a multipart upload
(S3 / GCS XML multipart, Azure Put Block + Put Block List): the object appears under its key
only when the upload completes. Memory is bounded by ``part_size × (max_concurrency + 1)``
inside obstore plus ``(queue_chunks + 1) × coalesce_bytes`` on the Python side (defaults:
5 MiB × 3 + 5 × 1 MiB = 20 MiB per upload). Small writes are coalesced into 1 MiB blocks
(one copy) because each block crosses from obstore's thread to the event loop and back,
~0.2 ms per block however small it is.

*Abort on error and on cancellation.* obstore aborts the multipart upload when the iterator
raises, but if the awaiting Python task is cancelled the Rust future is simply dropped and
the upload is left pending (measured against moto: an orphaned multipart upload). So the
obstore future is never awaited directly by the producer: it runs on its own, and when the
``async with`` body fails or is cancelled (anyio cancel scope, SIGTERM, native
``Task.cancel``) we make the iterator raise, which sends obstore down its own abort path, and
wait for that in a shielded scope (bounded by ``settle_timeout_s``) before re-raising. Only a
``kill -9`` (or an abort that outlives ``settle_timeout_s``) can leave a pending upload; a
bucket lifecycle rule (``AbortIncompleteMultipartUpload`` after 1 day) cleans those. On
Azure an "abort" cannot delete uncommitted blocks (there is no API for it): they are
invisible and Azure discards them after 7 days; no blob ever appears.

**Verification without download.** With a multipart upload the object's metadata is fixed
when the upload *starts*, but the sha256 is only known at the end, and rewriting metadata
afterwards means a server-side copy (which changes the ETag and costs a full copy). A
sidecar ``NAME.sha256`` object would be a second, non-atomic write that can disagree with
the object it describes. So the sound record is the manifest: when an upload completes,
:func:`upload` HEADs the object and checks that the store holds exactly the bytes sent; the
caller records ``sha256`` (computed while streaming), ``size`` and the store's ``e_tag`` in
the manifest. A rerun HEADs the key: same size and same ETag means the very object whose
bytes were hashed (S3, GCS and Azure all change the ETag whenever an object is rewritten), so
the stored sha256 still describes it. Metadata known at the start (run id, execution id)
can still be attached with ``attributes``.

**One run per prefix** (:func:`acquire_lock`). A lock object ``PREFIX/.lock`` is created
with ``If-None-Match: *`` and holds the run id and a lease. It is stale when the server's
``Last-Modified`` plus the lease is in the past (this machine's clock against the store's:
keep leases much longer than any clock skew). A stale lock is taken over with ``If-Match``
on the ETag it was seen with, so of two runs taking over at once exactly one wins.
:meth:`Lock.renew` extends the lease (again with ``If-Match``: a lock taken over is
noticed, :class:`LockLostError`); :meth:`Lock.release` deletes the lock only while it is
still ours and our lease has not run out (the stores offer no conditional delete; within a
live lease nobody else may replace it, so the check-then-delete is safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Literal, NamedTuple

import anyio
import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import AzureStore, GCSStore, S3Store

from orchestrator.errors import MicsExportError, UsageError

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from obstore import Attributes, ObjectMeta, PutMode, PutResult, UpdateVersion
    from obstore.store import ObjectStore

log = logging.getLogger("orchestrator.objstore")

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
LOCK_NAME = ".lock"
"""The lock object's name under the prefix (the local layout's lock file has the same name)."""

Scheme = Literal["s3", "gs", "az"]
_SCHEMES: dict[str, Scheme] = {"s3": "s3", "gs": "gs", "az": "az", "abfs": "az", "abfss": "az"}
_URL_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$", re.DOTALL)
_BUCKET_RE: dict[Scheme, re.Pattern[str]] = {
    # Lenient on purpose: legacy S3 buckets may hold capitals and underscores.
    "s3": re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$"),
    "gs": re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$"),
    "az": re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}$"),
}
_AZURE_HOST_RE = re.compile(r"^(?P<account>[a-z0-9]{3,24})\.(?:dfs|blob)\.core\.windows\.net$")
_ACCEPTED = "s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX or abfs://CONTAINER/PREFIX"


# --------------------------------------------------------------------------- errors


class StorageError(MicsExportError):
    """An object-storage operation failed (exit 1); the message is one line without secrets."""


class StorageUsageError(UsageError):
    """The bucket cannot be used at all: missing, credential refused or absent (exit 2)."""


class LockHeldError(StorageUsageError):
    """Another run holds the prefix's lock and its lease has not expired."""


class LockLostError(StorageError):
    """Our lock was taken over (our lease ran out) or deleted by someone else."""


class _Aborted(Exception):
    """Raised inside the upload's chunk iterator so that obstore aborts the multipart upload."""


_STATUS_RE = re.compile(r"status code: (\d{3})")
_CODE_RE = re.compile(r"<Code>([A-Za-z]+)</Code>")
_BUCKET_CODES = {"NoSuchBucket", "ContainerNotFound", "ContainerBeingDeleted"}
_REFUSED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AuthorizationFailure",
    "AuthenticationFailed",
    "AuthorizationPermissionMismatch",
    "InvalidToken",
    "ExpiredToken",
}
_NO_CREDENTIAL_HINTS = (
    # obstore found no credential in the environment and fell back to the instance metadata
    # service (EC2 / EKS / GCE), which is absent or refused: the message names its endpoint.
    "169.254.169.254",
    "/latest/api/token",
    "/latest/meta-data/",
    "/computeMetadata/",
    "metadata.google.internal",
    "token request",
    "Account must be specified",
)
_CREDENTIAL_HELP: dict[Scheme, str] = {
    "s3": "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or web identity (AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN)",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS or run with a workload identity",
    "az": "set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or SAS, service principal, managed identity)",
}


def _scheme_of(store: ObjectStore) -> Scheme:
    if isinstance(store, GCSStore):
        return "gs"
    if isinstance(store, AzureStore):
        return "az"
    return "s3"


def _url_of(store: ObjectStore, key: str = "") -> str:
    """``s3://bucket/key`` for messages: never the endpoint's URL (it may carry a SAS signature)."""
    if isinstance(store, S3Store | GCSStore):
        bucket = store.config.get("bucket", "?")
    elif isinstance(store, AzureStore):
        bucket = store.config.get("container_name", "?")
    else:
        bucket = "?"
    return f"{_scheme_of(store)}://{bucket}/{key}"


def _map_error(exc: BaseException, store: ObjectStore, key: str, action: str) -> MicsExportError:
    """One line from an obstore exception: the status and the service's error code, nothing else."""
    text = str(exc)
    status_match = _STATUS_RE.search(text)
    status = int(status_match.group(1)) if status_match else None
    code_match = _CODE_RE.search(text)
    code = code_match.group(1) if code_match else None
    what = f"{action} {_url_of(store, key)}"
    detail = ", ".join(x for x in (f"HTTP {status}" if status else None, code) if x)
    detail = f" ({detail})" if detail else ""
    scheme = _scheme_of(store)
    # First: the metadata service's own 403 is not the bucket refusing a credential.
    if any(hint in text for hint in _NO_CREDENTIAL_HINTS):
        return StorageUsageError(f"{what}: no credentials found: {_CREDENTIAL_HELP[scheme]}")
    if code in _BUCKET_CODES:
        return StorageUsageError(f"{what}: the bucket does not exist{detail}")
    if isinstance(exc, PermissionDeniedError | UnauthenticatedError) or status in (401, 403) or code in _REFUSED_CODES:
        return StorageUsageError(f"{what}: access denied, the credential was refused{detail}")
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{what}: not found{detail}")
    if isinstance(exc, AlreadyExistsError | PreconditionError):
        return StorageError(f"{what}: the object changed meanwhile{detail}")
    return StorageError(f"{what}: {type(exc).__name__}{detail}")


# --------------------------------------------------------------------------- locations


def is_bucket_url(text: str) -> bool:
    """Whether ``text`` is a URL (``scheme://…``) rather than a local path.

    Any scheme counts, so that ``s3a://…`` or ``gcs://…`` is refused by :func:`parse_location`
    with a clear message instead of becoming a local folder named ``s3a:``.
    """
    return _URL_RE.match(text) is not None


@dataclass(frozen=True)
class Location:
    """A bucket (or Azure container) and a prefix inside it."""

    scheme: Scheme
    bucket: str
    prefix: str
    """No leading or trailing slash; empty for the bucket's root."""
    account: str | None = None
    """The Azure storage account when the URL names it (``abfs://c@ACCOUNT.dfs.core.windows.net``)."""

    def key(self, name: str) -> str:
        """The object key of ``name`` under the prefix."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, key: str | None = None) -> str:
        """``scheme://bucket/key`` (the prefix itself without ``key``)."""
        return f"{self.scheme}://{self.bucket}/{self.prefix if key is None else key}"

    def __str__(self) -> str:
        return self.url()


_SECRET_PARTS = re.compile(r"(?<=://)[^/@]*:[^/@]*@|[?#].*", re.DOTALL)


def _shown_url(url: str) -> str:
    """``url`` for a message: a ``user:password@`` and a query (a SAS signature) blanked out, cut when long."""
    text = _SECRET_PARTS.sub(lambda m: "***@" if m.group().endswith("@") else m.group()[0] + "***", url)
    return repr(text if len(text) <= 120 else text[:120] + "...")


def parse_location(url: str) -> Location:
    """Parse a bucket URL; anything else is a :class:`UsageError` of one line.

    No message shows a password or a query string from the URL: either may be a secret
    (``s3://key:secret@...``, an Azure SAS ``?sig=...``).
    """
    shown = _shown_url(url)
    match = _URL_RE.match(url)
    if match is None:
        raise UsageError(f"not a bucket URL: {shown} (expected {_ACCEPTED})")
    raw_scheme = match.group("scheme").lower()
    scheme = _SCHEMES.get(raw_scheme)
    if scheme is None:
        raise UsageError(f"unsupported storage URL scheme {raw_scheme}:// in {shown}: use {_ACCEPTED}")
    rest = match.group("rest")
    if any(c in rest for c in "?#"):
        raise UsageError(
            f"invalid bucket URL {shown}: no query, fragment or signature (credentials come from the environment)"
        )
    if any((c.isspace() and c != " ") or ord(c) < 32 or ord(c) == 0x7F for c in rest):
        raise UsageError(f"invalid bucket URL {shown}: no control characters allowed")
    bucket, _, prefix = rest.partition("/")
    account = None
    if ":" in bucket.partition("@")[0] and "@" in bucket:
        raise UsageError(f"invalid bucket URL {shown}: no user:password@ (credentials come from the environment)")
    if "@" in bucket:
        if scheme != "az":
            raise UsageError(f"invalid bucket URL {shown}: user@host is only for Azure (abfs://CONTAINER@ACCOUNT...)")
        bucket, _, host = bucket.partition("@")
        host_match = _AZURE_HOST_RE.match(host.lower())
        if host_match is None:
            raise UsageError(
                f"invalid bucket URL {shown}: expected abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/PREFIX"
            )
        account = host_match.group("account")
    if not bucket:
        raise UsageError(f"invalid bucket URL {shown}: the bucket (container) name is missing")
    if not _BUCKET_RE[scheme].match(bucket):
        raise UsageError(f"invalid bucket URL {shown}: {bucket!r} is not a valid bucket (container) name")
    prefix = prefix.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise UsageError(f"invalid bucket URL {shown}: the prefix has an empty, '.' or '..' segment")
    return Location(scheme=scheme, bucket=bucket, prefix=prefix, account=account)


def open_store(location: Location) -> ObjectStore:
    """A store at the bucket's root, configured from the standard environment only."""
    store: ObjectStore
    try:
        if location.scheme == "s3":
            store = S3Store(location.bucket)
        elif location.scheme == "gs":
            store = GCSStore(location.bucket)
        elif location.account is not None:
            store = AzureStore(location.bucket, account_name=location.account)
        else:
            store = AzureStore(location.bucket)
    except Exception as exc:
        text = str(exc)
        if any(hint in text for hint in _NO_CREDENTIAL_HINTS):
            raise StorageUsageError(
                f"cannot open {location}: no credentials found: {_CREDENTIAL_HELP[location.scheme]}"
            ) from None
        raise StorageUsageError(f"cannot open {location}: invalid configuration ({type(exc).__name__})") from None
    return store


# --------------------------------------------------------------------------- plain operations


class ObjectInfo(NamedTuple):
    """What a rerun compares with the manifest to trust an object without downloading it."""

    size: int
    e_tag: str | None


async def check_access(store: ObjectStore, prefix: str) -> None:
    """Fail fast (one line, exit 2) when the bucket is missing or the credential refused.

    A LIST of the prefix: unlike a HEAD (no body), it tells a missing bucket from a missing
    key. Writing is proven by :func:`acquire_lock`, which also runs before any execution.
    """
    try:
        stream = obstore.list(store, prefix=prefix or None, chunk_size=1)
        with contextlib.suppress(StopAsyncIteration):
            await stream.__anext__()
    except Exception as exc:
        raise _map_error(exc, store, prefix, "cannot list") from None


async def put_bytes(store: ObjectStore, key: str, data: bytes, *, mode: PutMode | None = None) -> ObjectInfo:
    """Write a whole small object in one PUT (atomic: readers see the old or the new one)."""
    try:
        result = await obstore.put_async(store, key, data, use_multipart=False, mode=mode)
    except Exception as exc:
        raise _map_error(exc, store, key, "cannot write") from None
    return ObjectInfo(len(data), result["e_tag"])


async def get_bytes(store: ObjectStore, key: str) -> bytes | None:
    """The whole object, or ``None`` when there is none."""
    try:
        result = await obstore.get_async(store, key)
        return bytes(await result.bytes_async())
    except FileNotFoundError as exc:
        error = _map_error(exc, store, key, "cannot read")
        if isinstance(error, StorageUsageError):
            raise error from None  # the bucket itself is missing, not just this object
        return None
    except Exception as exc:
        raise _map_error(exc, store, key, "cannot read") from None


async def _head_meta(store: ObjectStore, key: str) -> ObjectMeta | None:
    try:
        return await obstore.head_async(store, key)
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise _map_error(exc, store, key, "cannot stat") from None


async def head(store: ObjectStore, key: str) -> ObjectInfo | None:
    """Size and ETag of the object, or ``None`` when there is none (no download)."""
    meta = await _head_meta(store, key)
    return None if meta is None else ObjectInfo(meta["size"], meta["e_tag"])


async def delete(store: ObjectStore, key: str) -> None:
    """Delete the object; deleting one that is not there is not an error."""
    try:
        await obstore.delete_async(store, key)
    except FileNotFoundError:
        pass  # Azure and GCS say 404 where S3 says nothing: same outcome
    except Exception as exc:
        raise _map_error(exc, store, key, "cannot delete") from None


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


# --------------------------------------------------------------------------- the lock


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _version_of(e_tag: str | None, version: str | None) -> UpdateVersion:
    """The precondition for a conditional update (GCS needs the generation, S3 / Azure the ETag)."""
    update: UpdateVersion = {}
    if e_tag is not None:
        update["e_tag"] = e_tag
    if version is not None:
        update["version"] = version
    return update


@dataclass(eq=False)
class Lock:
    """Our hold on ``PREFIX/.lock``: renew it within its lease, release it at the end."""

    store: ObjectStore
    key: str
    run_id: str
    lease_s: float
    e_tag: str | None
    version: str | None
    renewed: datetime
    """When we last wrote the lock (our clock): the lease runs from there."""

    @property
    def url(self) -> str:
        """The lock object's URL, for messages."""
        return _url_of(self.store, self.key)

    def _body(self, acquired: datetime | None = None) -> bytes:
        now = _now()
        return json.dumps(
            {
                "run_id": self.run_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "acquired_at": _iso(acquired or now),
                "renewed_at": _iso(now),
                "lease_s": self.lease_s,
                "expires_at": _iso(now + timedelta(seconds=self.lease_s)),
                # Every write differs, so every write gets a new ETag (S3's is an MD5 of the body).
                "nonce": uuid.uuid4().hex,
            }
        ).encode()

    async def renew(self) -> None:
        """Extend the lease; :class:`LockLostError` if the lock is no longer ours."""
        moment = _now()
        try:
            result = await obstore.put_async(
                self.store,
                self.key,
                self._body(),
                mode=_version_of(self.e_tag, self.version),
                use_multipart=False,
            )
        except (PreconditionError, FileNotFoundError):
            # 412: rewritten by another run; 404: deleted (S3 answers If-Match on no object so).
            raise LockLostError(
                f"lost the lock {self.url}: another run took it over or it was deleted; stop writing this prefix"
            ) from None
        except Exception as exc:
            raise _map_error(exc, self.store, self.key, "cannot renew the lock") from None
        self.e_tag, self.version, self.renewed = result["e_tag"], result["version"], moment

    async def keep_alive(self, every_s: float | None = None) -> None:
        """Renew every ``every_s`` (a third of the lease) until cancelled.

        A failed renewal is retried at the next tick; once the lease has run out without a
        successful renewal (or the lock was taken over) this raises :class:`LockLostError`.
        """
        period = every_s if every_s is not None else max(self.lease_s / 3, 1.0)
        while True:
            await anyio.sleep(period)
            try:
                await self.renew()
            except LockLostError:
                raise
            except (StorageError, StorageUsageError) as exc:
                # A refused or unreachable credential source (an STS or metadata hiccup) is
                # retried like any other failure while the lease still runs.
                if (_now() - self.renewed).total_seconds() >= self.lease_s:
                    raise LockLostError(f"lost the lock {self.url}: could not renew it within its lease") from exc
                log.warning("could not renew the lock (will retry): %s", exc)

    async def release(self) -> bool:
        """Delete the lock if it is still ours and our lease is live; whether it was deleted."""
        meta = await _head_meta(self.store, self.key)
        if meta is None or meta["e_tag"] != self.e_tag:
            log.warning("the lock %s is no longer ours: left as it is", self.url)
            return False
        if (_now() - self.renewed).total_seconds() >= self.lease_s:
            # Our lease ran out: another run may be taking it over right now; the lock is
            # stale anyway, and the next run takes it over.
            log.warning("the lease on %s ran out before release: left for the next run to take over", self.url)
            return False
        await delete(self.store, self.key)
        return True


def _describe_holder(body: bytes | None) -> tuple[str, float | None]:
    """The holder's run id and lease from the lock's body (tolerating garbage)."""
    try:
        data = json.loads(body or b"")
        run_id = str(data.get("run_id", "?"))
        lease = data.get("lease_s")
        return run_id, float(lease) if isinstance(lease, int | float) else None
    except (ValueError, AttributeError):
        return "?", None


async def lock_alive(store: ObjectStore, prefix: str) -> bool:
    """Whether ``PREFIX/.lock`` exists and its holder's lease has not run out (a run is going on)."""
    key = f"{prefix}/{LOCK_NAME}" if prefix else LOCK_NAME
    try:
        current = await obstore.get_async(store, key)
        body = bytes(await current.bytes_async())
    except FileNotFoundError:
        return False
    except Exception as exc:
        raise _map_error(exc, store, key, "cannot read the lock") from None
    _holder, lease = _describe_holder(body)
    return _now() < current.meta["last_modified"] + timedelta(seconds=lease or 0)


async def acquire_lock(store: ObjectStore, prefix: str, run_id: str, lease_s: float) -> Lock:
    """Take ``PREFIX/.lock`` for this run, or raise :class:`LockHeldError` (one line, exit 2).

    Created with ``If-None-Match: *``. If it exists and its lease has run out (the server's
    Last-Modified + the holder's lease), it is taken over with ``If-Match`` on its ETag, so
    that of several runs doing the same, one wins and the others see it held.
    """
    key = f"{prefix}/{LOCK_NAME}" if prefix else LOCK_NAME
    acquired = _now()
    lock = Lock(store, key, run_id, lease_s, None, None, acquired)
    for _attempt in range(5):  # a lock deleted between our create and our read: try again
        try:
            result = await obstore.put_async(store, key, lock._body(acquired), mode="create", use_multipart=False)
        except AlreadyExistsError:
            pass
        except PreconditionError:
            pass  # GCS reports a failed create as a precondition failure
        except Exception as exc:
            raise _map_error(exc, store, key, "cannot create the lock") from None
        else:
            lock.e_tag, lock.version = result["e_tag"], result["version"]
            return lock
        try:
            current = await obstore.get_async(store, key)
            body = bytes(await current.bytes_async())
        except FileNotFoundError:
            continue
        except Exception as exc:
            raise _map_error(exc, store, key, "cannot read the lock") from None
        meta = current.meta
        holder, holder_lease = _describe_holder(body)
        # A lock we cannot read keeps our lease: never take over sooner than we would be.
        expires = meta["last_modified"] + timedelta(seconds=holder_lease if holder_lease is not None else lease_s)
        url = _url_of(store, key)
        if _now() < expires:
            raise LockHeldError(
                f"{url} is held by run {holder} until {_iso(expires)}: another mics-export run is writing "
                f"this prefix; wait for it to end, or if it is dead delete {url} (a lock older than its "
                "lease is taken over automatically)"
            )
        try:
            result = await obstore.put_async(
                store,
                key,
                lock._body(acquired),
                mode=_version_of(meta["e_tag"], meta["version"]),
                use_multipart=False,
            )
        except (PreconditionError, FileNotFoundError, AlreadyExistsError):
            continue  # someone else took it over (or removed it) first: look again
        except Exception as exc:
            raise _map_error(exc, store, key, "cannot take over the lock") from None
        log.warning("took over the stale lock %s of run %s (expired %s)", url, holder, _iso(expires))
        lock.e_tag, lock.version = result["e_tag"], result["version"]
        return lock
    raise StorageError(f"cannot take the lock {_url_of(store, key)}: it keeps changing")
