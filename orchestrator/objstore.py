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

**Where it lives.** This module is the facade: its names are re-exported from
:mod:`orchestrator.location` (bucket URLs: pure, no obstore), :mod:`orchestrator.objstore_base`
(opening a store, error mapping, plain operations), :mod:`orchestrator.objstore_upload` (the
streaming upload) and :mod:`orchestrator.objstore_lock` (the lease lock).
"""

from __future__ import annotations

from orchestrator.location import Location, Scheme, is_bucket_url, parse_location
from orchestrator.objstore_base import (
    LockHeldError,
    LockLostError,
    ObjectInfo,
    StorageError,
    StorageUsageError,
    check_access,
    delete,
    get_bytes,
    head,
    open_store,
    put_bytes,
)
from orchestrator.objstore_lock import LOCK_NAME, Lock, acquire_lock, lock_alive
from orchestrator.objstore_upload import (
    DEFAULT_COALESCE_BYTES,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_PART_SIZE,
    DEFAULT_QUEUE_CHUNKS,
    DEFAULT_SETTLE_TIMEOUT_S,
    Upload,
    upload,
)

__all__ = [
    "DEFAULT_COALESCE_BYTES",
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_PART_SIZE",
    "DEFAULT_QUEUE_CHUNKS",
    "DEFAULT_SETTLE_TIMEOUT_S",
    "LOCK_NAME",
    "Location",
    "Lock",
    "LockHeldError",
    "LockLostError",
    "ObjectInfo",
    "Scheme",
    "StorageError",
    "StorageUsageError",
    "Upload",
    "acquire_lock",
    "check_access",
    "delete",
    "get_bytes",
    "head",
    "is_bucket_url",
    "lock_alive",
    "open_store",
    "parse_location",
    "put_bytes",
    "upload",
]
