"""A bucket prefix as a run's output (:class:`BucketSink`), through :mod:`orchestrator.objstore`.

See :mod:`orchestrator.sink` for what a sink answers. Here: an output is streamed into a
multipart upload and appears when it completes; the manifest is one PUT of the whole
object; a lease lock object keeps one run per prefix; a finished output is trusted on a
rerun when a HEAD finds the size and ETag recorded when its upload completed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import logging
from pathlib import PurePath, PurePosixPath
from typing import TYPE_CHECKING, Any

import anyio

from orchestrator import objstore
from orchestrator.journal import MAX_MANIFEST_BYTES
from orchestrator.manifest import MANIFEST_NAME, JobRecord, Manifest, ManifestStore
from orchestrator.sink import Sink
from orchestrator.transfer import Output, Target

if TYPE_CHECKING:
    from obstore.store import ObjectStore

    from orchestrator.ndjson import LineChecker

log = logging.getLogger("orchestrator.sink")

DEFAULT_LEASE_S = 120.0
"""A bucket lock's lease: renewed every third of it; a lock older than this is taken over.

Short enough that a pod restarted after a ``kill -9`` (OOM) takes the dead run's lock over
within two minutes; long enough that a few failed renewals (a store hiccup) do not lose it.
``MICS_BUCKET_LOCK_LEASE_S`` overrides it."""
LEASE_ENV = "MICS_BUCKET_LOCK_LEASE_S"


def lease_from_env() -> float:
    """The lock lease: ``MICS_BUCKET_LOCK_LEASE_S`` (seconds, at least 2) or the default."""
    import os

    from orchestrator.errors import UsageError

    raw = os.environ.get(LEASE_ENV)
    if not raw:
        return DEFAULT_LEASE_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value >= 2:  # NaN too
        raise UsageError(f"{LEASE_ENV}={raw!r}: must be a number of seconds, at least 2")
    return value


class _UploadOutput:
    """The writer thread's output into an upload: each write hops to the event loop.

    Blocking in the writer thread while the upload is behind is the back-pressure; the
    wait is cut short when the target aborts (then the write raises).
    """

    def __init__(self, up: objstore.Upload, loop: asyncio.AbstractEventLoop, target: BucketTarget) -> None:
        self._up = up
        self._loop = loop
        self._target = target
        self._cancelled = False

    def cancel(self) -> None:
        """The writer was aborted (from the event loop): give up the write waited on now."""
        self._cancelled = True
        if self._target.pending is not None:
            self._target.pending.cancel()

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._cancelled:
            raise objstore.StorageError(f"upload of {self._target.url} aborted")
        future = asyncio.run_coroutine_threadsafe(self._up.write(bytes(data)), self._loop)
        self._target.pending = future
        while True:
            if self._target.aborting or self._cancelled:
                future.cancel()
                raise objstore.StorageError(f"upload of {self._target.url} aborted")
            try:
                future.result(timeout=0.1)
                return
            except concurrent.futures.TimeoutError:
                continue

    def finish(self) -> None:
        pass  # the upload's own completion (commit) sends what is buffered

    def close(self) -> None:
        pass


class _Abort(Exception):
    """Passed to the upload's ``__aexit__`` to make it abort."""


class BucketTarget:
    """An object in a bucket, streamed into a multipart upload completed at commit."""

    can_rename = False

    def __init__(self, sink: BucketSink, name: str) -> None:
        self.sink = sink
        self.name = name
        self.key = sink.location.key(name)
        self.url = sink.location.url(self.key)
        self.aborting = False
        self.pending: concurrent.futures.Future[None] | None = None
        self._up: objstore.Upload | None = None

    @property
    def where(self) -> PurePath:
        return PurePosixPath(self.key)

    async def open(self, resume: bool) -> int:
        # No part-file resume in a bucket: a multipart upload left by a killed run cannot be
        # continued through obstore, so every upload starts at byte 0 (the lifecycle rule
        # removes the abandoned one).
        self.aborting = False
        up = objstore.upload(self.sink.store, self.key, **self.sink.upload_options)
        await up.__aenter__()
        self._up = up
        return 0

    async def read_back(self, size: int, checker: LineChecker, digest: Any) -> None:
        raise AssertionError("a bucket upload never resumes")

    def output(self) -> Output:
        assert self._up is not None
        return _UploadOutput(self._up, asyncio.get_running_loop(), self)

    async def restart(self) -> None:
        await self.abort()
        await self.open(False)

    async def prepare_commit(self) -> str | None:
        info = await objstore.head(self.sink.store, self.key)
        return None if info is None else f"an object of {info.size} bytes"

    async def commit(self, name: str | None) -> tuple[str | None, int] | None:
        assert name is None, "a bucket target is retargeted, never renamed"
        up, self._up = self._up, None
        assert up is not None
        await up.__aexit__(None, None, None)  # multipart completion: the object appears whole
        assert up.result is not None
        return up.result.e_tag, up.result.size

    async def abort(self) -> None:
        self.aborting = True
        if self.pending is not None:
            self.pending.cancel()  # a write the writer thread waits on
        up, self._up = self._up, None
        if up is not None:
            await up.__aexit__(_Abort, _Abort(), None)  # shielded inside: aborts the multipart upload

    def retarget(self, name: str) -> Target:
        return BucketTarget(self.sink, name)


class _BucketManifest:
    """``PREFIX/manifest.json``, written whole with one PUT (readers see the old or the new)."""

    def __init__(self, sink: BucketSink) -> None:
        self.sink = sink
        self.label = sink.label(MANIFEST_NAME)

    async def write_manifest(self, data: bytes) -> None:
        await objstore.put_bytes(self.sink.store, self.sink.location.key(MANIFEST_NAME), data)

    async def write_manifest_last(self, data: bytes) -> None:
        # Bounded: a stop must not wait on an unreachable store for long.
        with anyio.fail_after(self.sink.last_write_timeout_s):
            await self.write_manifest(data)


class BucketSink(Sink):
    """A prefix in an S3 / GCS / Azure bucket, through :mod:`orchestrator.objstore`."""

    is_bucket = True

    def __init__(
        self,
        location: objstore.Location,
        store: ObjectStore | None = None,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        upload_options: dict[str, Any] | None = None,
    ) -> None:
        self.location = location
        self.store = store if store is not None else objstore.open_store(location)
        self.url = location.url()
        self.lease_s = lease_s
        self.upload_options = upload_options or {}
        self.last_write_timeout_s = 8.0
        self.lock: objstore.Lock | None = None

    def label(self, name: str) -> str:
        return self.location.url(self.location.key(name))

    def manifest_store(self) -> ManifestStore:
        return _BucketManifest(self)

    def target(self, name: str, tag: str, stale_tags: tuple[str, ...] = ()) -> Target:
        return BucketTarget(self, name)

    async def write(self, name: str, data: bytes) -> None:
        await objstore.put_bytes(self.store, self.location.key(name), data)

    async def remove(self, name: str) -> bool:
        key = self.location.key(name)
        if await objstore.head(self.store, key) is None:
            return False
        await objstore.delete(self.store, key)
        return True

    async def open(self, run_id: str) -> None:
        """Before any execution: the bucket answers, the credential is accepted, the lock is ours."""
        await objstore.check_access(self.store, self.location.prefix)
        self.lock = await objstore.acquire_lock(self.store, self.location.prefix, run_id, self.lease_s)

    async def keep_alive(self) -> None:
        """Renew the lock until cancelled (LockLostError if it is lost)."""
        if self.lock is not None:
            await self.lock.keep_alive()

    async def release(self) -> None:
        """Delete the lock if still ours (best effort: a lock left behind goes stale)."""
        if self.lock is None:
            return
        lock, self.lock = self.lock, None
        try:
            with anyio.fail_after(self.last_write_timeout_s):
                await lock.release()
        except (objstore.StorageError, objstore.StorageUsageError, TimeoutError) as exc:
            log.warning("could not release the lock %s (it goes stale after its lease): %s", lock.url, exc)

    async def read_previous(self) -> Manifest | None:
        key = self.location.key(MANIFEST_NAME)
        data = await objstore.get_bytes(self.store, key, MAX_MANIFEST_BYTES)
        if data is None:
            return None
        try:
            return Manifest.from_bytes(data)
        except ValueError as exc:
            reason = str(exc)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = f"{MANIFEST_NAME}.corrupt-{stamp}"
        await objstore.put_bytes(self.store, self.location.key(aside), data)
        log.warning(
            "%s is not a valid manifest (%s): copied aside to %s; its jobs start afresh",
            self.label(MANIFEST_NAME),
            reason,
            aside,
            extra={"event": "manifest_corrupt", "moved_to": aside},
        )
        return None

    async def verify(self, rec: JobRecord, compression: str) -> bool:
        if not rec.path or not rec.sha256 or not rec.etag or rec.object_size is None:
            return False  # completed but its ETag unrecorded (a kill just then): fetch it again
        info = await objstore.head(self.store, self.location.key(rec.path))
        # Same size and ETag: the very object whose bytes were hashed when it was uploaded.
        return info is not None and info.size == rec.object_size and info.e_tag == rec.etag


__all__ = ["DEFAULT_LEASE_S", "LEASE_ENV", "BucketSink", "BucketTarget", "lease_from_env"]
