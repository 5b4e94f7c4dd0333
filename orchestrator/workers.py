"""Line validation in worker processes, so the event loop only moves bytes.

Parsing every line is the pipeline's ceiling on one core (PERF-NOTES), so with
``--workers N`` the parsing happens in N child processes and the event loop only
receives, hashes (in the writer thread) and writes. Each batch is checked with
:func:`~orchestrator.blockcheck.check_block` (two yyjson parses prove many lines' verdicts).

How bytes reach a worker: the main process copies a *line-aligned* batch (the held-back
incomplete line plus the complete lines of a chunk) into one slot of a shared memory
ring (an mmap'd file in /dev/shm) and sends the worker a 16-byte request on its stdin;
the worker parses the slot in place and answers on its stdout with the batch's counts
and invalid line numbers (relative to the batch). One memcpy per chunk in the main
process, nothing pickled. Measured here, pickling chunks through a pipe ate the gain on
2 cores (PERF-NOTES). The worker side and the wire format are
:mod:`orchestrator.validate_worker`, which imports neither anyio nor this module.

Back-pressure: a batch needs a free slot, so at most ``slots × slot_bytes`` bytes wait
for validation whatever the files' sizes. Results are merged per download in batch
order (:class:`~orchestrator.pooled_checker.Batches`), so invalid line numbers are exact.

A line longer than ``long_line_bytes`` (4 MiB) does not fit the ring's slots and would
hold the GIL for seconds if parsed here (module docstring of :mod:`orchestrator.ndjson`):
:func:`check_long_line` streams it to a one-shot child (``python -m
orchestrator.validate_worker --line``), which a cancellation (SIGTERM) kills at once. The
same child checks the long lines of ``--workers 0``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import mmap
import os
import sys
import tempfile
from array import array
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from anyio.abc import Process, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream

from orchestrator.blockcheck import LineStats, Verdict, check_block
from orchestrator.errors import JobError
from orchestrator.pooled_checker import Batches, PooledChecker
from orchestrator.validate_worker import MODULE, REQUEST, RESPONSE, VERDICTS

DEFAULT_SLOT_BYTES = 4 << 20
"""A slot holds one batch: a 1 MiB chunk plus a held-back line, with room to spare."""
LONG_LINE_BYTES = 4 << 20
"""Longer lines are checked in a child process: orjson parses ~20-200 MB/s holding the
GIL, so a line this long blocks the event loop for at most ~0.2 s."""
Parts = tuple[bytes | memoryview, ...]
"""A batch as the pieces that, end to end, make it (copied into a slot without a join)."""


def default_workers() -> int:
    """The CPUs this process may use: affinity, capped by a cgroup v2 CPU quota (pods)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    return max(1, cpus)


async def check_long_line(pieces: list[bytes]) -> Verdict:
    """The verdict on one long line (given in pieces), parsed by a one-shot child process.

    The pieces are written to the child's stdin one by one (never joined here); the
    list is emptied as they go, so the memory is given back as soon as possible. A
    cancellation kills the child (anyio), so a SIGTERM never waits for a long parse.
    """
    proc = await anyio.open_process([sys.executable, "-m", MODULE, "--line"], stderr=None, start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None
    answer = b""
    try:
        pieces.reverse()
        while pieces:
            await proc.stdin.send(pieces.pop())
        await proc.stdin.aclose()
        with contextlib.suppress(anyio.EndOfStream):
            answer = await proc.stdout.receive(16)
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()  # cancelled: the parse must not outlive the run
        with anyio.CancelScope(shield=True):
            await proc.aclose()
    if answer not in VERDICTS or proc.returncode != 0:
        raise JobError(f"could not check a long line: its checking process exited with code {proc.returncode}")
    return VERDICTS[answer]


def _ring_file(size: int) -> int:
    """An anonymous file for the ring, in RAM when /dev/shm is there: created private
    (mkstemp: O_EXCL, mode 0600) and unlinked at once, so nothing is left after a crash."""
    shm = "/dev/shm"  # noqa: S108 - mkstemp makes it safe; only this user can open it
    folder = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    fd, path = tempfile.mkstemp(prefix="mics-export-ring-", dir=folder)
    os.unlink(path)
    os.ftruncate(fd, size)
    return fd


class ValidatorPool:
    """N worker processes behind a shared-memory ring. Use :func:`validator_pool`."""

    def __init__(
        self,
        workers: int,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
        slots: int | None = None,
        long_line_bytes: int = LONG_LINE_BYTES,
    ) -> None:
        self.workers = workers
        self.slot_bytes = slot_bytes
        self.long_line_bytes = long_line_bytes
        self.slots = slots or 2 * workers + 2
        self._tokens = itertools.count()
        self._owners: dict[int, tuple[Batches, int, int, int]] = {}  # token → owner, seq, slot, worker
        self._alive: list[bool] = [True] * workers
        self._free: list[int] = [i * slot_bytes for i in range(self.slots)]
        self._procs: list[Process] = []
        self._load: list[int] = [0] * workers
        self._closing = False
        self.batches = 0

    async def _start(self, tg: TaskGroup) -> None:
        size = self.slots * self.slot_bytes
        fd = _ring_file(size)
        try:
            self._ring = mmap.mmap(fd, size)
            self._slot_sem = anyio.Semaphore(self.slots)
            for index in range(self.workers):
                # The ring is inherited as a file descriptor; a new session keeps a terminal's
                # Ctrl-C for the main process, which stops the workers by closing their stdin.
                proc = await anyio.open_process(
                    [sys.executable, "-m", MODULE, str(fd), str(size)],
                    pass_fds=(fd,),
                    stderr=None,
                    start_new_session=True,
                )
                self._procs.append(proc)
                tg.start_soon(self._read_answers, index, proc)
        finally:
            os.close(fd)

    async def _read_answers(self, index: int, proc: Process) -> None:
        assert proc.stdout is not None
        stream = BufferedByteReceiveStream(proc.stdout)
        while True:
            try:
                header = await stream.receive_exactly(RESPONSE.size)
            except Exception as exc:  # EndOfStream, IncompleteRead, BrokenResource
                if not self._closing:
                    self._lost(index, exc)
                return
            token, slot, lines, blank, invalid, count = RESPONSE.unpack(header)
            numbers = array("I")
            if count:
                numbers.frombytes(await stream.receive_exactly(4 * count))
            owner, seq, _slot, _worker = self._owners.pop(token)
            self._release(index, slot)
            owner.deliver(seq, LineStats(lines, blank, invalid, list(numbers)))

    def _release(self, index: int, slot: int) -> None:
        self._load[index] -= 1
        self._free.append(slot)
        self._slot_sem.release()

    def _lost(self, index: int, exc: BaseException) -> None:
        """A worker died (an OOM kill, say): fail the downloads it held, route around it."""
        self._alive[index] = False
        error = JobError(f"validation worker {index} exited unexpectedly ({type(exc).__name__})")
        for token, (owner, _seq, slot, worker) in list(self._owners.items()):
            if worker == index:
                del self._owners[token]
                self._release(index, slot)
                owner.fail(error)

    async def _stop(self) -> None:
        self._closing = True
        with anyio.move_on_after(5, shield=True):
            for proc in self._procs:
                if proc.stdin is not None:
                    with contextlib.suppress(Exception):
                        await proc.stdin.aclose()  # EOF: the worker's loop ends
            for proc in self._procs:
                await proc.wait()
        for proc in self._procs:
            if proc.returncode is None:
                proc.kill()
        self._ring.close()

    async def submit(self, owner: Batches, parts: Parts, length: int) -> None:
        """Check one line-aligned batch of ``length`` bytes (its last line may lack its newline).

        It is copied into a free slot (waiting for one: the back-pressure) and handed to
        the least busy worker; its stats reach ``owner`` in order. A batch larger than a
        slot, or one with no worker left, is checked here.
        """
        seq = owner.next()
        alive = [i for i in range(self.workers) if self._alive[i]]
        if length > self.slot_bytes or not alive:
            stats = LineStats()
            check_block(b"".join(parts), stats)
            owner.deliver(seq, stats)
            return
        await self._slot_sem.acquire()
        offset = pos = self._free.pop()
        for part in parts:
            self._ring[pos : pos + len(part)] = part
            pos += len(part)
        token = next(self._tokens)
        index = min(alive, key=self._load.__getitem__)
        self._owners[token] = (owner, seq, offset, index)
        self._load[index] += 1
        self.batches += 1
        stdin = self._procs[index].stdin
        assert stdin is not None
        try:
            await stdin.send(REQUEST.pack(offset, length, token))
        except Exception as exc:  # BrokenResourceError, ClosedResourceError: it died before we saw EOF
            if self._alive[index]:
                self._lost(index, exc)
            raise owner.error or exc from None

    async def submit_long(self, owner: Batches, pieces: list[bytes]) -> None:
        """One long line (in pieces, no newline) as a batch of its own, checked by a one-shot child."""
        seq = owner.next()
        stats = LineStats(lines=1)
        stats.settle(1, await check_long_line(pieces))
        owner.deliver(seq, stats)

    def checker(
        self, initial: LineStats | None = None, tail: bytes = b"", max_line_bytes: int | None = None
    ) -> PooledChecker:
        """A checker for one download, optionally continuing from stats and a held-back tail."""
        return PooledChecker(self, initial or LineStats(), tail, max_line_bytes)


@contextlib.asynccontextmanager
async def validator_pool(
    workers: int, slot_bytes: int = DEFAULT_SLOT_BYTES, long_line_bytes: int = LONG_LINE_BYTES
) -> AsyncIterator[ValidatorPool]:
    """Start ``workers`` validation processes for the duration of the block."""
    pool = ValidatorPool(workers, slot_bytes, long_line_bytes=long_line_bytes)
    async with anyio.create_task_group() as tg:
        try:
            await pool._start(tg)
            yield pool
        finally:
            await pool._stop()
            tg.cancel_scope.cancel()


__all__ = [
    "DEFAULT_SLOT_BYTES",
    "LONG_LINE_BYTES",
    "Batches",
    "PooledChecker",
    "ValidatorPool",
    "check_long_line",
    "default_workers",
    "validator_pool",
]
