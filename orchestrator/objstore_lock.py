"""Object storage: one run per prefix, a lease lock object (:func:`acquire_lock`).

Part of :mod:`orchestrator.objstore`, whose docstring says how the lock is taken, taken
over when stale, renewed and released.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import obstore
from obstore.exceptions import AlreadyExistsError, PreconditionError

from orchestrator.objstore_base import (
    LockHeldError,
    LockLostError,
    StorageError,
    StorageUsageError,
    _head_meta,
    _map_error,
    _url_of,
    delete,
)

if TYPE_CHECKING:
    from obstore import UpdateVersion
    from obstore.store import ObjectStore

log = logging.getLogger("orchestrator.objstore")  # one logger for the object-store modules

LOCK_NAME = ".lock"
"""The lock object's name under the prefix (the local layout's lock file has the same name)."""


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


MAX_LEASE_S = 10 * 365 * 86400.0
"""A holder's lease beyond this (or not finite) is unreadable: our own lease stands for it."""


def _describe_holder(body: bytes | None) -> tuple[str, float | None]:
    """The holder's run id and lease from the lock's body (tolerating garbage)."""
    try:
        data = json.loads(body or b"")
        run_id = str(data.get("run_id", "?"))
        lease = data.get("lease_s")
        # Read from the bucket, so anyone's: a lease that is no sane duration (NaN, 1e300,
        # negative) is no lease at all, never a timedelta that overflows.
        if isinstance(lease, int | float) and not isinstance(lease, bool) and 0 <= lease <= MAX_LEASE_S:
            return run_id, float(lease)
        return run_id, None
    except (ValueError, AttributeError, OverflowError):
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


ABANDON_TIMEOUT_S = 5.0
"""How long a lock this run may have created is looked for, after its taking was stopped."""


async def acquire_lock(store: ObjectStore, prefix: str, run_id: str, lease_s: float) -> Lock:
    """Take ``PREFIX/.lock`` for this run, or raise :class:`LockHeldError` (one line, exit 2).

    Created with ``If-None-Match: *``. If it exists and its lease has run out (the server's
    Last-Modified + the holder's lease), it is taken over with ``If-Match`` on its ETag, so
    that of several runs doing the same, one wins and the others see it held. Stopped (a
    signal) or failed after a write the store may have carried out, a lock naming this run is
    removed (within :data:`ABANDON_TIMEOUT_S`): it would hold the prefix for a whole lease.
    """
    key = f"{prefix}/{LOCK_NAME}" if prefix else LOCK_NAME
    try:
        return await _acquire_lock(store, key, run_id, lease_s)
    except BaseException:
        # Best effort (a lock left behind goes stale), and bounded: the stop must stay prompt.
        with anyio.CancelScope(shield=True), anyio.move_on_after(ABANDON_TIMEOUT_S), contextlib.suppress(Exception):
            await _remove_if_ours(store, key, run_id)
        raise


async def _remove_if_ours(store: ObjectStore, key: str, run_id: str) -> None:
    try:
        current = await obstore.get_async(store, key)
        body = bytes(await current.bytes_async())
    except FileNotFoundError:
        return
    if _describe_holder(body)[0] == run_id:
        await delete(store, key)
        log.info("removed the lock %s this run had taken as it stopped", _url_of(store, key))


async def _acquire_lock(store: ObjectStore, key: str, run_id: str, lease_s: float) -> Lock:
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


__all__ = ["LOCK_NAME", "Lock", "acquire_lock", "lock_alive"]
