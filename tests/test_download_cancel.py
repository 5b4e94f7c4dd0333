"""The download's stop paths: a signal reaches every transfer, an abort never waits on the loop.

These drive :func:`orchestrator.download.receive`, its completed part and the writer thread through small
targets of the download's own Target/Output interface (the bucket target's shape: no
rename, writes that wait on the event loop), because what is checked is the download's
cancellation and abort logic, not any store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import PurePath, PurePosixPath
from typing import Any

import anyio
import pytest

from orchestrator.download import DownloadOptions, OnUnverifiedLength, Output, Target, receive
from orchestrator.transfer import _FileWriter


class _NullOutput:
    def write(self, data: bytes) -> None:
        pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


class _NoRenameTarget:
    """A target that cannot rename (a bucket's shape): a rejected file is stored again elsewhere."""

    can_rename = False

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def where(self) -> PurePath:
        return PurePosixPath(self.name)

    async def open(self, resume: bool) -> int:
        return 0

    async def read_back(self, size: int, checker: Any, digest: Any) -> None:
        raise AssertionError("never resumed")

    def output(self) -> Output:
        return _NullOutput()

    async def restart(self) -> None:
        pass

    async def prepare_commit(self) -> str | None:
        return None

    async def commit(self, name: str | None) -> tuple[str | None, int] | None:
        return ("etag", 1)

    async def abort(self) -> None:
        pass

    def retarget(self, name: str) -> Target:
        return _NoRenameTarget(name)


@pytest.mark.anyio
async def test_a_cancel_stops_the_second_transfer_of_a_rejected_file() -> None:
    """Storing a rejected file again (no rename in a bucket) is not shielded: a signal stops it at once."""
    transfers = 0
    second_started = anyio.Event()

    def open_stream(start: int) -> AsyncIterator[bytes]:
        nonlocal transfers
        transfers += 1
        slow = transfers > 1

        async def lines() -> AsyncIterator[bytes]:
            for _ in range(100):
                if slow:
                    second_started.set()
                    await anyio.sleep(0.1)  # the second transfer of a big file
                yield b'{"a":1}\n'

        return lines()

    async def stored_again() -> None:
        options = DownloadOptions(on_unverified_length=OnUnverifiedLength.KEEP)
        part = await receive(open_stream, _NoRenameTarget("x.ndjson"), options)
        async with part:
            with anyio.CancelScope(shield=True):
                await part.commit("x.ndjson.rejected")  # a guard rejected it: it goes under another name
            await part.finish()

    async with anyio.create_task_group() as group:
        group.start_soon(stored_again)
        await second_started.wait()
        cancelled_at = time.monotonic()
        group.cancel_scope.cancel()  # SIGTERM or the deadline cancelling the run
    assert transfers == 2
    assert time.monotonic() - cancelled_at < 3  # 10 s of transfer were left: it did not run them


class _LoopOutput:
    """A writer-thread output whose writes wait on the event loop (a slow part upload)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.cancelled = False
        self.future: concurrent.futures.Future[None] | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self.future is not None:
            self.future.cancel()

    def write(self, data: bytes) -> None:
        self.future = asyncio.run_coroutine_threadsafe(asyncio.sleep(3600), self.loop)
        while not self.cancelled:
            try:
                self.future.result(timeout=0.05)
                return
            except concurrent.futures.TimeoutError:
                continue
        raise RuntimeError("aborted")

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.anyio
async def test_discarding_a_writer_stuck_behind_its_output_returns() -> None:
    """An abort empties the queue and tells a waiting output to give up: discard() returns, the thread ends."""
    writer = _FileWriter(_LoopOutput(asyncio.get_running_loop()), "x", None, hashlib.sha256(), 4)
    for _ in range(5):  # the output is stuck: the queue fills up
        await writer.put(b"x" * 10)
    started = time.monotonic()
    with anyio.fail_after(10):
        await writer.discard()
    assert time.monotonic() - started < 5
    assert not writer._thread.is_alive()


@pytest.mark.anyio
async def test_a_credential_hiccup_does_not_lose_the_bucket_lock() -> None:
    """A renewal refused by the credential source is retried while the lease runs; the lock is lost only after it."""
    pytest.importorskip("obstore")
    from obstore.store import MemoryStore

    from orchestrator import objstore

    lock = objstore.Lock(MemoryStore(), ".lock", "run", 0.3, None, None, datetime.now(UTC))
    failures = 0

    async def refused() -> None:
        nonlocal failures
        failures += 1
        raise objstore.StorageUsageError("cannot renew the lock: no credentials (the metadata service timed out)")

    lock.renew = refused  # type: ignore[method-assign]
    with pytest.raises(objstore.LockLostError):
        with anyio.fail_after(5):
            await lock.keep_alive(every_s=0.02)
    assert failures > 3  # retried through the lease, then lost: never ended by the first hiccup


@pytest.mark.anyio
async def test_a_part_whose_record_fails_is_never_committed(tmp_path: PurePath) -> None:
    """A record step that raises inside the shielded scope means no rename: no final file, no part file left."""
    from pathlib import Path

    from orchestrator.download import LocalTarget

    folder = Path(str(tmp_path))

    async def lines(start: int) -> AsyncIterator[bytes]:
        yield b'{"a":1}\n'

    options = DownloadOptions(on_unverified_length=OnUnverifiedLength.KEEP)
    part = await receive(lines, LocalTarget(folder / "x.ndjson", "e1"), options)
    assert part.result.records == 1 and not part.committed
    with pytest.raises(OSError, match="disk full"):
        async with part:
            with anyio.CancelScope(shield=True):
                raise OSError("disk full")  # the manifest write that records it
            await part.commit()  # pragma: no cover - never reached
    assert list(folder.iterdir()) == []
