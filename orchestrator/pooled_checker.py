"""One download's side of the validation pool: its chunks cut into batches, its results in order.

:class:`PooledChecker` is :class:`~orchestrator.ndjson.LineChecker` with the parsing done by
:class:`~orchestrator.workers.ValidatorPool`: the same :func:`~orchestrator.ndjson.split_chunk`
and :class:`~orchestrator.ndjson.HeldLine` cut the chunks, the batches go to the pool's
public :meth:`~orchestrator.workers.ValidatorPool.submit` and ``submit_long``, and
:class:`Batches` merges their stats in the order they were sent, so invalid line numbers
are exact whichever worker finishes first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from orchestrator.blockcheck import LineStats, has_line_over
from orchestrator.ndjson import HeldLine, LineTooLongError, split_chunk

if TYPE_CHECKING:
    from orchestrator.workers import ValidatorPool


class Batches:
    """One download's batches: numbered as sent, merged in that order, waited for at the end."""

    def __init__(self, initial: LineStats) -> None:
        self.stats = initial
        self.sent = 0
        self.merged = 0
        self.results: dict[int, LineStats] = {}
        self.done: anyio.Event | None = None  # created when someone waits
        self.error: BaseException | None = None

    def next(self) -> int:
        """The number of a new batch, or the error that lost an earlier one."""
        if self.error is not None:
            raise self.error
        self.sent += 1
        return self.sent - 1

    def fail(self, error: BaseException) -> None:
        """A batch was lost with its worker: the download fails instead of waiting forever."""
        self.error = error
        if self.done is not None:
            self.done.set()

    def deliver(self, seq: int, stats: LineStats) -> None:
        """Batch ``seq``'s stats: merged once every batch before it is."""
        self.results[seq] = stats
        while self.merged in self.results:
            self.stats.merge(self.results.pop(self.merged))
            self.merged += 1
        if self.merged == self.sent and self.done is not None:
            self.done.set()

    async def wait(self) -> LineStats:
        """Every batch sent so far merged (or the error that lost one)."""
        if self.merged < self.sent and self.error is None:
            self.done = anyio.Event()
            await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.stats


class PooledChecker:
    """Same results as :class:`~orchestrator.ndjson.LineChecker`, computed by the pool.

    The chunks are cut by :func:`~orchestrator.ndjson.split_chunk` and the incomplete last
    line held by a :class:`~orchestrator.ndjson.HeldLine`, as in the inline checker; a line
    longer than the pool's ``long_line_bytes`` goes to :func:`check_long_line` as a batch
    of its own, in order with the others.
    """

    def __init__(self, pool: ValidatorPool, initial: LineStats, tail: bytes, max_line_bytes: int | None) -> None:
        self.pool = pool
        self.batches = Batches(initial)
        self.max_line_bytes = max_line_bytes
        self._held = HeldLine(tail)

    async def _too_long(self, before: int) -> LineTooLongError:
        """The error for the line after ``before`` lines not yet sent: numbered once the batches are merged."""
        assert self.max_line_bytes is not None
        stats = await self.batches.wait()
        return LineTooLongError(stats.lines + before + 1, self.max_line_bytes)

    async def _hold(self, piece: bytes | memoryview) -> None:
        size = self._held.add(piece)
        if self.max_line_bytes is not None and size > self.max_line_bytes:
            self._held.take()  # the limit is there to bound memory: let go at once
            raise await self._too_long(0)

    async def feed(self, chunk: bytes) -> None:
        """Send the complete lines of held bytes + ``chunk`` to the pool; hold the incomplete end."""
        end_held, start, cut = split_chunk(chunk, self._held.size > 0)
        view = memoryview(chunk)
        if cut and self.max_line_bytes is not None:
            await self._check_lengths(chunk, end_held, start, cut)
        first = 0
        if end_held >= 0 and self._held.size + end_held > self.pool.long_line_bytes:
            # The held line ends in this chunk and is too long for a slot or this process.
            await self._hold(view[:end_held])
            await self.pool.submit_long(self.batches, self._held.take())
            first = start
        if cut > first:
            length = self._held.size + cut - first
            await self.pool.submit(self.batches, (*self._held.take(), view[first:cut]), length)
        await self._hold(view[cut:])

    async def _check_lengths(self, chunk: bytes, end_held: int, start: int, cut: int) -> None:
        """Raise for the first complete line of held bytes + ``chunk`` longer than max_line_bytes."""
        limit = self.max_line_bytes
        assert limit is not None
        if end_held >= 0 and self._held.size + end_held > limit:
            raise await self._too_long(0)
        if not has_line_over(chunk, limit, start, cut - 1):
            return
        while start < cut:  # the rare path: some line may be too long
            end = chunk.find(b"\n", start, cut)
            if end - start > limit:
                raise await self._too_long(chunk.count(b"\n", 0, start))
            start = end + 1

    async def finish(self) -> LineStats:
        """Check the final unterminated line, wait for every batch, return the merged stats."""
        if self._held.size > self.pool.long_line_bytes:
            await self.pool.submit_long(self.batches, self._held.take())
        elif self._held.size:
            size = self._held.size
            await self.pool.submit(self.batches, tuple(self._held.take()), size)
        return await self.batches.wait()


__all__ = ["Batches", "PooledChecker"]
