"""Line validation in worker processes, so the event loop only moves bytes.

Parsing every line with orjson is the pipeline's ceiling on one core (PERF-NOTES), so
with ``--workers N`` the parsing happens in N child processes and the event loop only
receives, hashes (in the writer thread) and writes. Each batch is checked with
:func:`~orchestrator.ndjson.check_block` (one yyjson parse proves many lines' verdicts).

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
only orjson, yyjson and :mod:`orchestrator.ndjson`.

A line longer than ``long_line_bytes`` (4 MiB) does not fit the ring's slots and would
hold the GIL for seconds if parsed here (module docstring of :mod:`orchestrator.ndjson`):
:func:`check_long_line` streams it to a one-shot child (``python -m orchestrator.workers
--line``), which a cancellation (SIGTERM) kills at once. The same child checks the long
lines of ``--workers 0``.
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

from orchestrator.ndjson import MAX_INVALID_LINE_NUMBERS, LineStats, LineTooLongError, Verdict, check_block, classify

if TYPE_CHECKING:  # the worker processes must not pay for importing anyio
    import anyio
    from anyio.abc import Process, TaskGroup

REQUEST = struct.Struct("<IIQ")  # slot offset, length, token
RESPONSE = struct.Struct("<QIIIIH")  # token, slot, lines, blank, invalid, n numbers
DEFAULT_SLOT_BYTES = 4 << 20
"""A slot holds one batch: a 1 MiB chunk plus a held-back line, with room to spare."""
LONG_LINE_BYTES = 4 << 20
"""Longer lines are checked in a child process: orjson parses ~20-200 MB/s holding the
GIL, so a line this long blocks the event loop for at most ~0.2 s."""
_VERDICTS: dict[bytes, Verdict] = {b"r": "record", b"b": "blank", b"i": "invalid"}


def default_workers() -> int:
    """The CPUs this process may use: affinity, capped by a cgroup v2 CPU quota (pods)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    return max(1, cpus)


def _check_batch(batch: bytes, stats: LineStats) -> None:
    """Check a line-aligned batch: complete lines, except that the last may lack its newline
    (the end of the file). The newline that ends a batch does not start a line."""
    check_block(batch if not batch or batch[-1:] == b"\n" else batch + b"\n", stats)


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
        stats = LineStats()
        _check_batch(ring[slot_offset : slot_offset + length], stats)
        numbers = stats.invalid_line_numbers[:MAX_INVALID_LINE_NUMBERS]
        answers.write(
            RESPONSE.pack(token, slot_offset, stats.lines, stats.blank_lines, stats.invalid_lines, len(numbers))
            + array("I", numbers).tobytes()
        )
        answers.flush()


def _check_one_line() -> None:
    """``--line``: read one line (no newline) on stdin, answer r, b or i on stdout."""
    verdict = classify(sys.stdin.buffer.read())
    sys.stdout.buffer.write(verdict[0].encode())
    sys.stdout.buffer.flush()


# -- the main process ------------------------------------------------------------------------
async def check_long_line(pieces: list[bytes]) -> Verdict:
    """The verdict on one long line (given in pieces), parsed by a one-shot child process.

    The pieces are written to the child's stdin one by one (never joined here); the
    list is emptied as they go, so the memory is given back as soon as possible. A
    cancellation kills the child (anyio), so a SIGTERM never waits for a long parse.
    """
    import anyio

    from orchestrator.errors import JobError

    proc = await anyio.open_process(
        [sys.executable, "-m", "orchestrator.workers", "--line"], stderr=None, start_new_session=True
    )
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
    if answer not in _VERDICTS or proc.returncode != 0:
        raise JobError(f"could not check a long line: its checking process exited with code {proc.returncode}")
    return _VERDICTS[answer]


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
            _check_batch(b"".join(parts), stats)
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

    async def _submit_long(self, owner: _Batches, pieces: list[bytes]) -> None:
        """One long line as a batch of its own, checked by a one-shot child process."""
        if owner.error is not None:
            raise owner.error
        seq = owner.sent
        owner.sent += 1
        verdict = await check_long_line(pieces)
        stats = LineStats(lines=1)
        stats.settle(1, verdict)
        owner.deliver(seq, stats)

    def checker(
        self, initial: LineStats | None = None, tail: bytes = b"", max_line_bytes: int | None = None
    ) -> PooledChecker:
        """A checker for one download, optionally continuing from stats and a held-back tail."""
        return PooledChecker(self, initial or LineStats(), tail, max_line_bytes)


class PooledChecker:
    """Same results as :class:`~orchestrator.ndjson.LineChecker`, computed by the pool.

    The incomplete last line is held as a list of pieces (linear, see
    :mod:`orchestrator.ndjson`); a line longer than the pool's ``long_line_bytes`` goes
    to :func:`check_long_line` as a batch of its own, in order with the others.
    """

    def __init__(self, pool: ValidatorPool, initial: LineStats, tail: bytes, max_line_bytes: int | None) -> None:
        self.pool = pool
        self.batches = _Batches(initial)
        self.max_line_bytes = max_line_bytes
        self._pieces: list[bytes] = [tail] if tail else []
        self._held = len(tail)

    async def _too_long(self) -> LineTooLongError:
        """The error for the held line: its number once the batches before it are merged."""
        await self._wait()
        assert self.max_line_bytes is not None
        return LineTooLongError(self.batches.stats.lines + 1, self.max_line_bytes)

    async def _hold(self, piece: bytes | memoryview) -> None:
        self._held += len(piece)
        if self.max_line_bytes is not None and self._held > self.max_line_bytes:
            self._pieces = []  # the limit is there to bound memory: let go at once
            raise await self._too_long()
        if len(piece):
            self._pieces.append(bytes(piece))

    async def feed(self, chunk: bytes) -> None:
        """Send the complete lines of held bytes + ``chunk`` to the pool; hold the incomplete end."""
        cut = chunk.rfind(b"\n") + 1
        if cut == 0:
            await self._hold(chunk)
            return
        view = memoryview(chunk)
        first = chunk.find(b"\n")
        if self.max_line_bytes is not None and (cut > self.max_line_bytes or self._held + first > self.max_line_bytes):
            await self._check_lengths(chunk, cut)
        if self._held + first > self.pool.long_line_bytes:
            # The held line ends in this chunk and is too long for a slot or this process.
            await self._hold(view[:first])
            pieces, self._pieces, self._held = self._pieces, [], 0
            await self.pool._submit_long(self.batches, pieces)
            view, cut = view[first + 1 :], cut - first - 1
            if cut == 0:
                await self._hold(view)
                return
        parts: tuple[bytes | memoryview, ...] = (*self._pieces, view[:cut])
        length = self._held + cut
        self._pieces, self._held = [], 0
        await self._hold(view[cut:])
        await self.pool._submit(self.batches, parts, length)

    async def _check_lengths(self, chunk: bytes, cut: int) -> None:
        """Raise for the first complete line of the chunk longer than max_line_bytes, if any."""
        assert self.max_line_bytes is not None
        start = 0
        while start < cut:
            end = chunk.find(b"\n", start, cut)
            if end - start + (self._held if start == 0 else 0) > self.max_line_bytes:
                before = chunk.count(b"\n", 0, start)
                await self._wait()
                raise LineTooLongError(self.batches.stats.lines + before + 1, self.max_line_bytes)
            start = end + 1

    async def _wait(self) -> None:
        """Wait until every batch sent so far is merged (or one failed)."""
        import anyio

        if self.batches.merged < self.batches.sent and self.batches.error is None:
            self.batches.done = anyio.Event()
            await self.batches.done.wait()
        if self.batches.error is not None:
            raise self.batches.error

    async def finish(self) -> LineStats:
        """Check the final unterminated line, wait for every batch, return the merged stats."""
        if self._pieces:
            pieces, self._pieces, held, self._held = self._pieces, [], self._held, 0
            if held > self.pool.long_line_bytes:
                await self.pool._submit_long(self.batches, pieces)
            else:
                await self.pool._submit(self.batches, tuple(pieces), held)
        await self._wait()
        return self.batches.stats


@contextlib.asynccontextmanager
async def validator_pool(
    workers: int, slot_bytes: int = DEFAULT_SLOT_BYTES, long_line_bytes: int = LONG_LINE_BYTES
) -> AsyncIterator[ValidatorPool]:
    """Start ``workers`` validation processes for the duration of the block."""
    import anyio

    pool = ValidatorPool(workers, slot_bytes, long_line_bytes=long_line_bytes)
    async with anyio.create_task_group() as tg:
        try:
            await pool._start(tg)
            yield pool
        finally:
            await pool._stop()
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    if sys.argv[1:] == ["--line"]:
        _check_one_line()
    else:
        _serve(int(sys.argv[1]), int(sys.argv[2]))


__all__ = [
    "LONG_LINE_BYTES",
    "PooledChecker",
    "ValidatorPool",
    "check_long_line",
    "default_workers",
    "validator_pool",
]
