"""Object storage: opening a store, mapping its errors to one line, and the plain operations.

Part of :mod:`orchestrator.objstore` (the facade whose docstring says which credentials a
store is opened with, and why an error never quotes obstore's own message).
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import TYPE_CHECKING, NamedTuple

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import AzureStore, GCSStore, S3Store

from orchestrator.errors import MicsExportError, UsageError
from orchestrator.location import Location, Scheme

if TYPE_CHECKING:
    from obstore import ObjectMeta, PutMode
    from obstore.store import ObjectStore

log = logging.getLogger("orchestrator.objstore")  # one logger for the object-store modules

# --------------------------------------------------------------------------- errors


class StorageError(MicsExportError):
    """An object-storage operation failed (exit 1); the message is one line without secrets."""


class StorageUsageError(UsageError):
    """The bucket cannot be used at all: missing, credential refused or absent (exit 2)."""


class LockHeldError(StorageUsageError):
    """Another run holds the prefix's lock and its lease has not expired."""


class LockLostError(StorageError):
    """Our lock was taken over (our lease ran out) or deleted by someone else."""


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


async def get_bytes(store: ObjectStore, key: str, max_bytes: int | None = None) -> bytes | None:
    """The whole object, or ``None`` when there is none. One over ``max_bytes`` is not read:
    StorageUsageError naming it (a manifest of that size is planted, not a run's)."""
    try:
        result = await obstore.get_async(store, key)
        size = result.meta.get("size")
        if max_bytes is not None and isinstance(size, int) and size > max_bytes:
            raise StorageUsageError(
                f"{_url_of(store, key)} is larger than {max_bytes >> 20} MiB, not a run's: move it out of the way"
            )
        return bytes(await result.bytes_async())
    except StorageUsageError:
        raise
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


__all__ = [
    "LockHeldError",
    "LockLostError",
    "ObjectInfo",
    "StorageError",
    "StorageUsageError",
    "check_access",
    "delete",
    "get_bytes",
    "head",
    "open_store",
    "put_bytes",
]
