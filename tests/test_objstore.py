"""orchestrator.objstore against real servers on loopback: moto (S3) and azurite (Azure Blob).

GCS has no emulator installable here: only its URL parsing and store configuration are
tested; it goes through the same obstore code paths as S3 and Azure.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import obstore
import pytest
from cloud import (  # noqa: F401 (fixtures, used by name)
    AzureContainer,
    S3Bucket,
    azure_fixture,
    azurite_fixture,
    clean_storage_env,
    moto_server_fixture,
    s3_fixture,
)
from obstore.store import AzureStore, GCSStore

from orchestrator.errors import UsageError
from orchestrator.objstore import (
    LOCK_NAME,
    Location,
    LockHeldError,
    LockLostError,
    ObjectInfo,
    StorageUsageError,
    acquire_lock,
    check_access,
    delete,
    get_bytes,
    head,
    is_bucket_url,
    open_store,
    parse_location,
    put_bytes,
    upload,
)

pytestmark = [pytest.mark.anyio, pytest.mark.xdist_group("cloud")]  # one moto/azurite per run

MiB = 1024 * 1024
CHUNK = 64 * 1024


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating bytes (so a misplaced part changes the hash)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


def chunks(data: bytes, size: int = CHUNK) -> list[bytes]:
    """``data`` cut into the small pieces a download hands over."""
    return [data[i : i + size] for i in range(0, len(data), size)]


async def wait_until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    """Poll ``condition`` every few ms until true; fail naming ``what`` after ``timeout``."""
    with anyio.fail_after(timeout):
        while not await condition():
            await anyio.sleep(0.01)


# --------------------------------------------------------------------------- URLs (no server)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket/prefix", Location("s3", "bucket", "prefix")),
        ("s3://my.bucket-1/a/b/{date}/", Location("s3", "my.bucket-1", "a/b/{date}")),
        ("s3://bucket", Location("s3", "bucket", "")),
        ("s3://bucket/", Location("s3", "bucket", "")),
        ("S3://bucket/p", Location("s3", "bucket", "p")),
        ("gs://bucket_1/p/q", Location("gs", "bucket_1", "p/q")),
        ("az://container/p", Location("az", "container", "p")),
        ("abfs://container/p", Location("az", "container", "p")),
        ("abfss://container/p", Location("az", "container", "p")),
        ("abfs://container@acct01.dfs.core.windows.net/p/q", Location("az", "container", "p/q", "acct01")),
    ],
)
def test_parse_location_accepts(url: str, expected: Location) -> None:
    """Every supported URL form parses into scheme, bucket, prefix (and Azure account)."""
    assert is_bucket_url(url)
    assert parse_location(url) == expected


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("s3a://bucket/p", "unsupported storage URL scheme s3a://"),
        ("gcs://bucket/p", "unsupported storage URL scheme gcs://"),
        ("file:///tmp/out", "unsupported storage URL scheme file://"),
        ("https://bucket.s3.amazonaws.com/p", "unsupported storage URL scheme https://"),
        ("s3:///p", "bucket (container) name is missing"),
        ("s3://b/p", "not a valid bucket"),
        ("s3://-bucket/p", "not a valid bucket"),
        ("az://Container/p", "not a valid bucket"),
        ("s3://bucket/a//b", "empty, '.' or '..' segment"),
        ("s3://bucket/a/../b", "empty, '.' or '..' segment"),
        ("s3://bucket/p?versionId=1", "no query, fragment"),
        ("s3://bucket/p#x", "no query, fragment"),
        ("s3://user@bucket/p", "only for Azure"),
        ("abfs://c0ntainer@acct.example.com/p", "expected abfs://CONTAINER@ACCOUNT.dfs.core.windows.net"),
    ],
)
def test_parse_location_rejects(url: str, fragment: str) -> None:
    """Bad URLs are a one-line UsageError saying what is wrong."""
    with pytest.raises(UsageError) as caught:
        parse_location(url)
    message = str(caught.value)
    assert fragment in message, message
    assert "\n" not in message


@pytest.mark.parametrize("text", ["out", "/tmp/out", "./s3/bucket", "C:\\exports", "exports/{date}"])
def test_local_paths_are_not_bucket_urls(text: str) -> None:
    """Local folders (even ones named like a scheme) are not mistaken for bucket URLs."""
    assert not is_bucket_url(text)


def test_location_keys() -> None:
    """Keys mirror the local layout under the prefix; the bucket's root has no leading slash."""
    assert parse_location("s3://bucket/a/b").key("manifest.json") == "a/b/manifest.json"
    assert parse_location("s3://bucket").key("x.ndjson") == "x.ndjson"
    assert parse_location("gs://bucket/a").url("a/x") == "gs://bucket/a/x"


def test_open_store_gcs_and_azure_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """gs:// opens a GCSStore on the bucket, abfs://c@account opens an AzureStore on that account."""
    clean_storage_env(monkeypatch)
    gcs = open_store(parse_location("gs://my-bucket/p"))
    assert isinstance(gcs, GCSStore)
    assert gcs.config["bucket"] == "my-bucket"
    assert gcs.prefix is None  # keys carry the prefix, so one store serves the whole bucket
    az = open_store(parse_location("abfs://cont@acct01.dfs.core.windows.net/p"))
    assert isinstance(az, AzureStore)
    assert az.config["container_name"] == "cont"
    assert az.config["account_name"] == "acct01"


def test_open_store_azure_without_account_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """az:// with no account anywhere in the environment is a one-line usage error naming the variables."""
    clean_storage_env(monkeypatch)
    with pytest.raises(StorageUsageError, match="AZURE_STORAGE_ACCOUNT_NAME") as caught:
        open_store(parse_location("az://cont/p"))
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------- both servers


@dataclass
class Backend:
    """One bucket on one server, as the code under test sees it, plus a look behind its back."""

    name: str
    location: Location
    store: Any
    s3: S3Bucket | None = None
    azure: AzureContainer | None = None

    def pending(self, key: str) -> list[str]:
        """Leftovers of unfinished uploads of ``key`` that a lifecycle rule would have to clean.

        S3: multipart uploads still pending. Azure: none can be observed as pending (blocks are
        "uncommitted", invisible, and discarded by Azure after 7 days): committed blocks would
        mean a visible blob, which the callers check separately.
        """
        if self.s3 is not None:
            return [k for k in self.s3.pending_uploads() if k == key]
        return []

    async def upload_started(self, key: str) -> bool:
        """Whether the server already holds parts of an unfinished upload of ``key``."""
        if self.s3 is not None:
            return key in self.s3.pending_uploads()
        assert self.azure is not None
        return bool(self.azure.blocks(key)[1])


@pytest.fixture(params=["s3", "azure"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """The same tests against moto (S3) and azurite (Azure Blob)."""
    if request.param == "s3":
        bucket: S3Bucket = request.getfixturevalue("s3")
        location = parse_location(f"s3://{bucket.bucket}/exports/2024-01-01")
        return Backend("s3", location, open_store(location), s3=bucket)
    container: AzureContainer = request.getfixturevalue("azure")
    location = parse_location(f"az://{container.container}/exports/2024-01-01")
    return Backend("azure", location, open_store(location), azure=container)


async def test_small_objects_round_trip(backend: Backend) -> None:
    """put_bytes / get_bytes / head / delete; absent objects read as None and delete quietly."""
    key = backend.location.key("manifest.json")
    assert await get_bytes(backend.store, key) is None
    assert await head(backend.store, key) is None
    info = await put_bytes(backend.store, key, b'{"a": 1}')
    assert await get_bytes(backend.store, key) == b'{"a": 1}'
    assert await head(backend.store, key) == info == ObjectInfo(8, info.e_tag)
    await put_bytes(backend.store, key, b'{"a": 2}')  # a whole-object PUT replaces it
    assert await get_bytes(backend.store, key) == b'{"a": 2}'
    await delete(backend.store, key)
    await delete(backend.store, key)
    assert await head(backend.store, key) is None
    await check_access(backend.store, backend.location.prefix)


async def test_streamed_upload_is_invisible_until_complete_then_exact(backend: Backend) -> None:
    """A 20 MB upload in 64 KiB chunks: no object while parts are being sent, byte-exact after."""
    key = backend.location.key("big.ndjson")
    data = payload(20 * MiB)
    pieces = chunks(data)
    async with upload(backend.store, key, attributes={"mics_export_run": "run-1"}) as up:
        for piece in pieces[: len(pieces) * 3 // 5]:
            await up.write(piece)
        await wait_until(lambda: backend.upload_started(key), "parts on the server")
        assert await head(backend.store, key) is None
        for piece in pieces[len(pieces) * 3 // 5 :]:
            await up.write(piece)
        assert await head(backend.store, key) is None
    assert up.result is not None
    assert up.result == await head(backend.store, key)
    assert up.result.size == len(data)
    got = await obstore.get_async(backend.store, key)
    assert got.attributes.get("mics_export_run") == "run-1"
    assert hashlib.sha256(bytes(await got.bytes_async())).hexdigest() == hashlib.sha256(data).hexdigest()
    assert backend.pending(key) == []


async def test_metadata_names_must_suit_every_cloud(backend: Backend) -> None:
    """A metadata name Azure would refuse (a hyphen) is refused up front on every store."""
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        upload(backend.store, backend.location.key("x"), attributes={"mics-export-run": "r"})


async def test_rewritten_object_no_longer_matches_recorded_etag(backend: Backend) -> None:
    """The (size, ETag) recorded at completion stops matching once the object is rewritten."""
    key = backend.location.key("x.ndjson")
    async with upload(backend.store, key) as up:
        await up.write(b"a" * 1000)
    recorded = up.result
    assert await head(backend.store, key) == recorded
    await put_bytes(backend.store, key, b"b" * 1000)
    now = await head(backend.store, key)
    assert now is not None and recorded is not None
    assert now.size == recorded.size and now.e_tag != recorded.e_tag


async def test_producer_failure_aborts_the_upload(backend: Backend) -> None:
    """The producer raising midway: its exception propagates, no object, no pending upload."""
    key = backend.location.key("failed.ndjson")
    with pytest.raises(RuntimeError, match="download broke"):
        async with upload(backend.store, key) as up:
            for piece in chunks(payload(12 * MiB)):
                await up.write(piece)
            await wait_until(lambda: backend.upload_started(key), "parts on the server")
            raise RuntimeError("download broke")
    assert await head(backend.store, key) is None
    assert backend.pending(key) == []
    if backend.azure is not None:
        assert backend.azure.blocks(key)[0] == []  # nothing committed: no blob, not even an empty one


async def test_cancelled_upload_is_aborted(backend: Backend) -> None:
    """An upload cancelled from outside (anyio cancel scope, as SIGTERM does) is aborted before the cancel completes."""
    key = backend.location.key("cancelled.ndjson")
    started = anyio.Event()

    async def producer() -> None:
        async with upload(backend.store, key) as up:
            for piece in chunks(payload(12 * MiB)):
                await up.write(piece)
            started.set()
            await anyio.sleep_forever()

    async with anyio.create_task_group() as group:
        group.start_soon(producer)
        await started.wait()
        await wait_until(lambda: backend.upload_started(key), "parts on the server")
        group.cancel_scope.cancel()
    # No polling: the abort finished before the task group let the cancellation through.
    assert backend.pending(key) == []
    assert await head(backend.store, key) is None


async def test_natively_cancelled_upload_is_aborted(backend: Backend) -> None:
    """A bare asyncio Task.cancel() mid-upload also aborts it, and the task still ends cancelled."""
    key = backend.location.key("native.ndjson")
    started = asyncio.Event()

    async def producer() -> None:
        async with upload(backend.store, key) as up:
            for piece in chunks(payload(12 * MiB)):
                await up.write(piece)
            started.set()
            await asyncio.Event().wait()

    task = asyncio.ensure_future(producer())
    await started.wait()
    await wait_until(lambda: backend.upload_started(key), "parts on the server")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.pending(key) == []
    assert await head(backend.store, key) is None


async def test_upload_to_missing_bucket_fails_on_write(backend: Backend) -> None:
    """Writing into a missing bucket fails with one line (no hang on the full queue, no object)."""
    missing = parse_location(f"{backend.location.scheme}://no-such-bucket-4242/p")
    store = open_store(missing)
    with pytest.raises(StorageUsageError, match="does not exist") as caught:
        async with upload(store, missing.key("x.ndjson"), queue_chunks=2) as up:
            for piece in chunks(payload(8 * MiB)):
                await up.write(piece)
    assert "\n" not in str(caught.value)


async def test_missing_bucket_fails_check_access(backend: Backend) -> None:
    """check_access on a bucket that does not exist: one line naming it, usage error (exit 2)."""
    missing = parse_location(f"{backend.location.scheme}://no-such-bucket-4242/p")
    with pytest.raises(StorageUsageError) as caught:
        await check_access(open_store(missing), missing.prefix)
    message = str(caught.value)
    assert message.startswith(f"cannot list {missing.scheme}://no-such-bucket-4242/p")
    assert "does not exist" in message and "\n" not in message and "http" not in message


async def test_refused_credential_fails_check_access(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong secret: a one-line 'access denied' that quotes neither the secret nor the endpoint."""
    secret = "WRONG-secret-0123456789abcdefABCDEF"
    if backend.s3 is not None:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    else:
        monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", "V1JPTkctc2VjcmV0LTAxMjM0NTY3ODlhYmNkZWY=")
        secret = "V1JPTkctc2VjcmV0LTAxMjM0NTY3ODlhYmNkZWY="
    store = open_store(backend.location)
    with pytest.raises(StorageUsageError, match="access denied, the credential was refused") as caught:
        await check_access(store, backend.location.prefix)
    message = str(caught.value)
    assert secret not in message and "http" not in message and "\n" not in message


async def test_missing_s3_credentials_is_one_line(s3: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    """No AWS credential anywhere: obstore's metadata-service fallback fails, reported as 'no credentials found'."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_METADATA_ENDPOINT", "http://127.0.0.1:1")  # no instance credentials here
    location = parse_location(f"s3://{s3.bucket}/p")
    with pytest.raises(StorageUsageError, match="no credentials found: set AWS_ACCESS_KEY_ID") as caught:
        await check_access(open_store(location), location.prefix)
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------- the lock


async def test_lock_contention_names_holder_and_remedy(backend: Backend) -> None:
    """A second run cannot take a live lock; the one-line message names key, holder, expiry and remedy."""
    prefix = backend.location.prefix
    first = await acquire_lock(backend.store, prefix, "run-A", lease_s=600)
    with pytest.raises(LockHeldError) as caught:
        await acquire_lock(backend.store, prefix, "run-B", lease_s=600)
    message = str(caught.value)
    lock_url = f"{backend.location.scheme}://{backend.location.bucket}/{prefix}/{LOCK_NAME}"
    assert message.startswith(f"{lock_url} is held by run run-A until 20")
    assert f"delete {lock_url}" in message and "taken over automatically" in message
    assert "\n" not in message
    assert isinstance(caught.value, UsageError)  # exit 2, like the local folder's lock
    assert await first.release()
    assert await head(backend.store, backend.location.key(LOCK_NAME)) is None
    second = await acquire_lock(backend.store, prefix, "run-B", lease_s=600)
    assert await second.release()


async def test_renew_extends_and_release_deletes(backend: Backend) -> None:
    """renew() rewrites the lock conditionally (new ETag, still ours); release() then deletes it."""
    lock = await acquire_lock(backend.store, backend.location.prefix, "run-A", lease_s=600)
    before = lock.e_tag
    await lock.renew()
    assert lock.e_tag != before
    assert (await head(backend.store, lock.key)) is not None
    assert await lock.release()
    assert await head(backend.store, lock.key) is None


async def test_stale_lock_is_taken_over_and_old_holder_notices(backend: Backend) -> None:
    """A lock past its lease is taken over; the old holder's renew fails and its release leaves the new lock."""
    prefix = backend.location.prefix
    stale = await acquire_lock(backend.store, prefix, "run-A", lease_s=0)
    fresh = await acquire_lock(backend.store, prefix, "run-B", lease_s=600)
    with pytest.raises(LockLostError, match="another run took it over"):
        await stale.renew()
    assert not await stale.release()
    body = await get_bytes(backend.store, fresh.key)
    assert body is not None and b'"run_id": "run-B"' in body
    assert await fresh.release()


async def test_concurrent_takeover_has_one_winner(backend: Backend) -> None:
    """Five runs taking over one stale lock at once: exactly one gets it (If-Match), the others see it held."""
    prefix = backend.location.prefix
    await acquire_lock(backend.store, prefix, "run-dead", lease_s=0)
    outcomes: dict[str, str] = {}

    async def contender(run_id: str) -> None:
        try:
            await acquire_lock(backend.store, prefix, run_id, lease_s=600)
            outcomes[run_id] = "won"
        except LockHeldError:
            outcomes[run_id] = "held"

    async with anyio.create_task_group() as group:
        for index in range(5):
            group.start_soon(contender, f"run-{index}")
    assert sorted(outcomes.values()) == ["held"] * 4 + ["won"]
    winner = next(run for run, outcome in outcomes.items() if outcome == "won")
    body = await get_bytes(backend.store, backend.location.key(LOCK_NAME))
    assert body is not None and f'"run_id": "{winner}"'.encode() in body


async def test_lock_on_missing_bucket_is_a_usage_error(backend: Backend) -> None:
    """Taking the lock in a missing bucket says so in one line (exit 2), not 'lock held'."""
    missing = parse_location(f"{backend.location.scheme}://no-such-bucket-4242/p")
    with pytest.raises(StorageUsageError, match="does not exist") as caught:
        await acquire_lock(open_store(missing), missing.prefix, "run-A", lease_s=60)
    assert not isinstance(caught.value, LockHeldError)
