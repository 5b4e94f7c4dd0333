"""Incremental NDJSON checking: bytes in, line and record counts out. Pure, no I/O.

The verdicts come from :mod:`orchestrator.blockcheck` (many lines per C call, identical
to per-line orjson); this module cuts a stream of chunks into lines. :func:`split_chunk`
is the one place that decides which bytes of a chunk end the held line, which are
complete lines and which start the next incomplete line; :class:`LineChecker` (in this
process) and :class:`orchestrator.workers.PooledChecker` (worker processes) both use it
and :class:`HeldLine`. On the fast path no Python code runs per line: a chunk's complete
lines go to :func:`~orchestrator.blockcheck.check_block` as one range of the chunk.

Long lines. An incomplete line is held back as a list of pieces and joined once, when
its newline arrives: linear in its length, whatever the chunking (concatenating the
held bytes with every chunk was quadratic: ~11 s for one 50 MB line). A line longer
than ``max_line_bytes`` fails the download (:class:`LineTooLongError`) as soon as the
held bytes pass the limit, so memory stays bounded. A line longer than ``defer_over``
is not parsed here: orjson holds the GIL for a whole parse (~9 s and 2.8 GB for a
200 MB line of small values, measured), which would freeze the event loop and a
SIGTERM with it. Such a line is counted and handed over in :attr:`LineChecker.deferred`
for the caller to check elsewhere (a child process, :func:`orchestrator.workers.check_long_line`),
then :meth:`LineStats.settle` records the verdict.
"""

from __future__ import annotations

from typing import NamedTuple

from orchestrator.blockcheck import (
    MAX_INVALID_LINE_NUMBERS,
    LineStats,
    Verdict,
    check_block,
    check_lines,
    classify,
    has_line_over,
)
from orchestrator.errors import JobError


class LineTooLongError(JobError):
    """A line is longer than the job's ``max_line_bytes``."""

    def __init__(self, number: int, limit: int) -> None:
        super().__init__(f"line {number} is longer than max_line_bytes={limit}")
        self.number = number
        self.limit = limit


class Split(NamedTuple):
    """How one chunk divides, given whether a line is held from earlier chunks.

    ``chunk[:end_held]`` completes the held line (its newline is ``chunk[end_held]``),
    ``-1`` when no held line ends here; ``chunk[start:cut]`` are complete lines, each with
    its newline; ``chunk[cut:]`` starts the next incomplete line (possibly empty). When
    the chunk has no newline, ``start == cut == 0``: all of it is held.
    """

    end_held: int
    start: int
    cut: int


def split_chunk(chunk: bytes, holding: bool) -> Split:
    """Where the lines of ``chunk`` are (see :class:`Split`): two C calls, none per line."""
    cut = chunk.rfind(b"\n") + 1
    if not holding or not cut:
        return Split(-1, 0, cut)
    first = chunk.find(b"\n")
    return Split(first, first + 1, cut)


class HeldLine:
    """The incomplete last line, kept as pieces and joined only once complete (linear)."""

    def __init__(self, first: bytes = b"") -> None:
        self.pieces: list[bytes] = [first] if first else []
        self.size = len(first)

    def add(self, piece: bytes | memoryview) -> int:
        """Hold ``piece`` after the others; the held size."""
        if len(piece):
            self.pieces.append(bytes(piece))
            self.size += len(piece)
        return self.size

    def take(self) -> list[bytes]:
        """Hand over the pieces and hold nothing."""
        pieces, self.pieces, self.size = self.pieces, [], 0
        return pieces


class LineChecker:
    """Feed it chunks cut anywhere; it counts lines, records and invalid lines.

    Any chunking of the same bytes gives the same result. Call :meth:`finish` at the
    end: a last line without a trailing newline is still a line. With ``defer_over``,
    settle every entry of :attr:`deferred` (see the module docstring) before reading
    the stats.
    """

    def __init__(self, max_line_bytes: int | None = None, defer_over: int | None = None) -> None:
        self.stats = LineStats()
        self.max_line_bytes = max_line_bytes
        self.defer_over = defer_over
        self.deferred: list[tuple[int, list[bytes]]] = []
        """Lines too long to parse here: (line number, pieces), in order."""
        self._held = HeldLine()
        limits = [limit for limit in (max_line_bytes, defer_over) if limit is not None]
        self._limit = min(limits) if limits else None

    def _hold(self, piece: bytes | memoryview) -> None:
        size = self._held.add(piece)
        if self.max_line_bytes is not None and size > self.max_line_bytes:
            raise LineTooLongError(self.stats.lines + 1, self.max_line_bytes)

    def _complete_held(self) -> None:
        """The held line has ended: check it, or defer it when it is too long for here."""
        size, pieces = self._held.size, self._held.take()
        if self.defer_over is not None and size > self.defer_over:
            self.stats.lines += 1
            self.deferred.append((self.stats.lines, pieces))
        else:
            check_lines([pieces[0] if len(pieces) == 1 else b"".join(pieces)], self.stats)

    def feed(self, chunk: bytes) -> None:
        """Check the complete lines in held bytes + ``chunk``; hold the incomplete end."""
        end_held, start, cut = split_chunk(chunk, self._held.size > 0)
        if end_held >= 0:
            self._hold(memoryview(chunk)[:end_held])
            self._complete_held()
        if cut > start:
            if self._limit is not None and has_line_over(chunk, self._limit, start, cut - 1):
                self._check_long(chunk[start : cut - 1].split(b"\n"))  # the rare path
            else:
                check_block(chunk, self.stats, start, cut)
        if cut < len(chunk):
            self._hold(memoryview(chunk)[cut:])

    def _check_long(self, lines: list[bytes]) -> None:
        """check_lines, except that too long lines fail or are deferred (the rare path)."""
        run_start = 0
        for i, line in enumerate(lines):
            if self.max_line_bytes is not None and len(line) > self.max_line_bytes:
                _check_run(lines[run_start:i], self.stats)
                raise LineTooLongError(self.stats.lines + 1, self.max_line_bytes)
            if self.defer_over is not None and len(line) > self.defer_over:
                _check_run(lines[run_start:i], self.stats)
                self.stats.lines += 1
                self.deferred.append((self.stats.lines, [line]))
                run_start = i + 1
        _check_run(lines[run_start:], self.stats)

    def finish(self) -> LineStats:
        """Account for a final line that has no newline; returns the stats."""
        if self._held.size:
            self._complete_held()
        return self.stats

    def take_tail(self) -> bytes:
        """Hand over the held-back incomplete line (to continue elsewhere)."""
        return b"".join(self._held.take())

    def take_deferred(self) -> list[tuple[int, list[bytes]]]:
        """Hand over the lines waiting to be checked elsewhere (see :meth:`LineStats.settle`)."""
        deferred, self.deferred = self.deferred, []
        return deferred


def _check_run(lines: list[bytes], stats: LineStats) -> None:
    """check_lines through the block validator (lines without their newlines)."""
    if lines:
        check_block(b"\n".join(lines) + b"\n", stats)


__all__ = [
    "MAX_INVALID_LINE_NUMBERS",
    "HeldLine",
    "LineChecker",
    "LineStats",
    "LineTooLongError",
    "Split",
    "Verdict",
    "check_block",
    "check_lines",
    "classify",
    "split_chunk",
]
