"""Line validation in worker processes, so the event loop only moves bytes.

Parsing every line with orjson is the pipeline's ceiling on one core (PERF-NOTES), so
with ``--workers N`` the parsing happens in N child processes and the event loop only
receives, hashes (in the writer thread) and writes.

How bytes reach a worker: the main process copies a *line-aligned* batch (the held-back
incomplete line plus the complete lines of a chunk) into one slot of a shared memory
ring (an mmap'd file in /dev/shm) and sends the worker a 16-byte request on its stdin;
the worker parses the slot in place and answers on its stdout with the batch's counts
and invalid line numbers (relative to the batch). One memcpy per chunk in the main
process, nothing pickled. Measured here, pickling chunks through a pipe ate the gain on
2 cores (PERF-NOTES).

Back-pressure: a batch needs a free slot, so at most ``slots × slot_bytes`` bytes wait
for validation whatever the files' sizes. Results are merged per download in batch
order, so invalid line numbers are exact. Workers are plain ``python -m
orchestrator.workers`` processes started with anyio (no multiprocessing), importing
only orjson and :mod:`orchestrator.ndjson`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import mmap
import os
import struct
import sys
import tempfile
from array import array
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.ndjson import MAX_INVALID_LINE_NUMBERS, LineStats, check_lines

if TYPE_CHECKING:  # the worker processes must not pay for importing anyio
    import anyio
    from anyio.abc import Process, TaskGroup

REQUEST = struct.Struct("<IIQ")  # slot offset, length, token
RESPONSE = struct.Struct("<QIIIIH")  # token, slot, lines, blank, invalid, n numbers
DEFAULT_SLOT_BYTES = 4 << 20
"""A slot holds one batch: a 1 MiB chunk plus a held-back line, with room to spare."""


def default_workers() -> int:
    """The CPUs this process may use: affinity, capped by a cgroup v2 CPU quota (pods)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    return max(1, cpus)


# -- the worker process --------------------------------------------------------------------
def _serve(fd: int, size: int) -> None:
    """Worker loop: parse slots as requested until stdin closes."""
    ring = mmap.mmap(fd, size)
    os.close(fd)
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = requests.read(REQUEST.size)
        if len(header) < REQUEST.size:
            return
        slot_offset, length, token = REQUEST.unpack(header)
        lines = ring[slot_offset : slot_offset + length].split(b"\n")
        if lines and not lines[-1]:
            lines.pop()  # the newline that ends the batch does not start a line
        stats = LineStats()
        check_lines(lines, stats)
        numbers = stats.invalid_line_numbers[:MAX_INVALID_LINE_NUMBERS]
        answers.write(
            RESPONSE.pack(token, slot_offset, stats.lines, stats.blank_lines, stats.invalid_lines, len(numbers))
            + array("I", numbers).tobytes()
        )
        answers.flush()


# -- the main process ------------------------------------------------------------------------
def _ring_file(size: int) -> int:
    """An anonymous file for the ring, in RAM when /dev/shm is there: created private
    (mkstemp: O_EXCL, mode 0600) and unlinked at once, so nothing is left after a crash."""
    shm = "/dev/shm"  # noqa: S108 - mkstemp makes it safe; only this user can open it
    folder = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    fd, path = tempfile.mkstemp(prefix="mics-export-ring-", dir=folder)
    os.unlink(path)
    os.ftruncate(fd, size)
    return fd


class _Batches:
    """One download's batches: results merged in order, waited for at the end."""

    def __init__(self, initial: LineStats) -> None:
        self.stats = initial
        self.sent = 0
        self.merged = 0
        self.results: dict[int, LineStats] = {}
        self.done: anyio.Event | None = None  # created when someone waits
        self.error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        """A batch was lost with its worker: the download fails instead of waiting forever."""
        self.error = error
        if self.done is not None:
            self.done.set()

    def deliver(self, seq: int, stats: LineStats) -> None:
        self.results[seq] = stats
        while self.merged in self.results:
            self.stats.merge(self.results.pop(self.merged))
            self.merged += 1
        if self.merged == self.sent and self.done is not None:
            self.done.set()


class ValidatorPool:
    """N worker processes behind a shared-memory ring. Use :func:`validator_pool`."""

    def __init__(self, workers: int, slot_bytes: int = DEFAULT_SLOT_BYTES, slots: int | None = None) -> None:
        self.workers = workers
        self.slot_bytes = slot_bytes
        self.slots = slots or 2 * workers + 2
        self._tokens = itertools.count()
        self._owners: dict[int, tuple[_Batches, int, int, int]] = {}  # token → owner, seq, slot, worker
        self._alive: list[bool] = [True] * workers
        self._free: list[int] = [i * slot_bytes for i in range(self.slots)]
        self._procs: list[Process] = []
        self._load: list[int] = [0] * workers
        self.batches = 0

    async def _start(self, tg: TaskGroup) -> None:
        import anyio

        size = self.slots * self.slot_bytes
        fd = _ring_file(size)
        try:
            self._ring = mmap.mmap(fd, size)
            self._slot_sem = anyio.Semaphore(self.slots)
            for index in range(self.workers):
                # The ring is inherited as a file descriptor; a new session keeps a terminal's
                # Ctrl-C for the main process, which stops the workers by closing their stdin.
                proc = await anyio.open_process(
                    [sys.executable, "-m", "orchestrator.workers", str(fd), str(size)],
                    pass_fds=(fd,),
                    stderr=None,
                    start_new_session=True,
                )
                self._procs.append(proc)
                tg.start_soon(self._read_answers, index, proc)
        finally:
            os.close(fd)

    async def _read_answers(self, index: int, proc: Process) -> None:
        from anyio.streams.buffered import BufferedByteReceiveStream

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
        from orchestrator.errors import JobError

        self._alive[index] = False
        error = JobError(f"validation worker {index} exited unexpectedly ({type(exc).__name__})")
        for token, (owner, _seq, slot, worker) in list(self._owners.items()):
            if worker == index:
                del self._owners[token]
                self._release(index, slot)
                owner.fail(error)

    _closing = False

    async def _stop(self) -> None:
        import anyio

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

    async def _submit(self, owner: _Batches, parts: tuple[bytes | memoryview, ...], length: int) -> None:
        """Copy one line-aligned batch into a free slot and hand it to the least busy worker."""
        if owner.error is not None:
            raise owner.error
        seq = owner.sent
        owner.sent += 1
        alive = [i for i in range(self.workers) if self._alive[i]]
        if length > self.slot_bytes or not alive:
            # A line longer than a slot (rare), or no worker left: check it here, in order.
            stats = LineStats()
            lines = b"".join(parts).split(b"\n")
            if lines and not lines[-1]:
                lines.pop()
            check_lines(lines, stats)
            owner.deliver(seq, stats)
            return
        await self._slot_sem.acquire()
        offset = self._free.pop()
        pos = offset
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

    def checker(self, initial: LineStats | None = None, tail: bytes = b"") -> PooledChecker:
        """A checker for one download, optionally continuing from stats and a held-back tail."""
        return PooledChecker(self, initial or LineStats(), tail)


class PooledChecker:
    """Same results as :class:`~orchestrator.ndjson.LineChecker`, computed by the pool."""

    def __init__(self, pool: ValidatorPool, initial: LineStats, tail: bytes) -> None:
        self.pool = pool
        self.batches = _Batches(initial)
        self._tail = tail

    async def feed(self, chunk: bytes) -> None:
        """Send the complete lines of ``tail + chunk`` to the pool; keep the incomplete end."""
        cut = chunk.rfind(b"\n") + 1
        if cut == 0:
            self._tail += chunk
            return
        view = memoryview(chunk)
        parts = (self._tail, view[:cut]) if self._tail else (view[:cut],)
        length = len(self._tail) + cut
        self._tail = bytes(view[cut:])
        await self.pool._submit(self.batches, parts, length)

    async def finish(self) -> LineStats:
        """Check the final unterminated line, wait for every batch, return the merged stats."""
        import anyio

        if self._tail:
            tail, self._tail = self._tail, b""
            await self.pool._submit(self.batches, (tail,), len(tail))
        if self.batches.merged < self.batches.sent and self.batches.error is None:
            self.batches.done = anyio.Event()
            await self.batches.done.wait()
        if self.batches.error is not None:
            raise self.batches.error
        return self.batches.stats


@contextlib.asynccontextmanager
async def validator_pool(workers: int, slot_bytes: int = DEFAULT_SLOT_BYTES) -> AsyncIterator[ValidatorPool]:
    """Start ``workers`` validation processes for the duration of the block."""
    import anyio

    pool = ValidatorPool(workers, slot_bytes)
    async with anyio.create_task_group() as tg:
        try:
            await pool._start(tg)
            yield pool
        finally:
            await pool._stop()
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))


__all__ = ["PooledChecker", "ValidatorPool", "default_workers", "validator_pool"]
