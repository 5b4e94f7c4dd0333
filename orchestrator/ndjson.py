"""Incremental NDJSON checking: bytes in, line and record counts out. Pure, no I/O.

The hot loop of the whole tool: every byte of every export passes through
:meth:`LineChecker.feed`. Measured on one core (PERF-NOTES), parsing each line with
orjson is the ceiling (~2.7 M lines/s for 55-byte lines), so the loop does nothing else
per line: it splits a whole chunk at once, parses each line in place, and only looks
closer at a line that failed to parse (blank or invalid). Counting is per chunk.

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

import bisect
from dataclasses import dataclass, field
from typing import Literal

import orjson

from orchestrator.errors import JobError

MAX_INVALID_LINE_NUMBERS = 100
"""How many invalid line numbers are kept (SPEC: the first 100)."""

_loads = orjson.loads
_DecodeError = orjson.JSONDecodeError

Verdict = Literal["record", "blank", "invalid"]


class LineTooLongError(JobError):
    """A line is longer than the job's ``max_line_bytes``."""

    def __init__(self, number: int, limit: int) -> None:
        super().__init__(f"line {number} is longer than max_line_bytes={limit}")
        self.number = number
        self.limit = limit


@dataclass
class LineStats:
    """Counts over a sequence of lines. Line numbers are 1-based and count every line."""

    lines: int = 0
    blank_lines: int = 0
    invalid_lines: int = 0
    invalid_line_numbers: list[int] = field(default_factory=list)

    @property
    def records(self) -> int:
        """Non-blank lines that parse as JSON."""
        return self.lines - self.blank_lines - self.invalid_lines

    def merge(self, other: LineStats) -> None:
        """Append the stats of the lines that directly follow these ones."""
        room = MAX_INVALID_LINE_NUMBERS - len(self.invalid_line_numbers)
        if room > 0:
            self.invalid_line_numbers.extend(n + self.lines for n in other.invalid_line_numbers[:room])
        self.lines += other.lines
        self.blank_lines += other.blank_lines
        self.invalid_lines += other.invalid_lines

    def settle(self, number: int, verdict: Verdict) -> None:
        """Record the verdict on line ``number``, already counted in ``lines`` (a deferred line).

        Lines after it may have been counted first, so an invalid number is inserted in
        order; the list keeps the smallest 100, which are the first 100.
        """
        if verdict == "blank":
            self.blank_lines += 1
        elif verdict == "invalid":
            self.invalid_lines += 1
            bisect.insort(self.invalid_line_numbers, number)
            del self.invalid_line_numbers[MAX_INVALID_LINE_NUMBERS:]


def classify(line: bytes) -> Verdict:
    """One line's verdict (no newline in it)."""
    try:
        _loads(line)
    except _DecodeError:
        return "invalid" if line.strip() else "blank"
    return "record"


def check_lines(lines: list[bytes], stats: LineStats) -> None:
    """Parse every line of ``lines`` (no newlines) and add them to ``stats``.

    A blank line (empty or only whitespace) is neither a record nor invalid; ``\\r``
    before the newline is JSON whitespace, so CRLF files count the same.
    """
    base = stats.lines
    for i, line in enumerate(lines):
        try:
            _loads(line)
        except _DecodeError:
            # The rare path: only here do we look at what the line is.
            if not line.strip():
                stats.blank_lines += 1
                continue
            stats.invalid_lines += 1
            if len(stats.invalid_line_numbers) < MAX_INVALID_LINE_NUMBERS:
                stats.invalid_line_numbers.append(base + i + 1)
    stats.lines += len(lines)


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
        self._pieces: list[bytes] = []  # the incomplete last line, joined only once complete
        self._held = 0

    def _hold(self, piece: bytes) -> None:
        self._held += len(piece)
        if self.max_line_bytes is not None and self._held > self.max_line_bytes:
            raise LineTooLongError(self.stats.lines + 1, self.max_line_bytes)
        if piece:
            self._pieces.append(piece)

    def _complete_held(self) -> None:
        """The held line has ended: check it, or defer it when it is too long for here."""
        pieces, self._pieces, held, self._held = self._pieces, [], self._held, 0
        if self.defer_over is not None and held > self.defer_over:
            self.stats.lines += 1
            self.deferred.append((self.stats.lines, pieces))
        else:
            check_lines([pieces[0] if len(pieces) == 1 else b"".join(pieces)], self.stats)

    def feed(self, chunk: bytes) -> None:
        """Check the complete lines in held bytes + ``chunk``; hold the incomplete end."""
        if self._pieces:
            newline = chunk.find(b"\n")
            if newline < 0:
                self._hold(chunk)
                return
            self._hold(chunk[:newline])
            self._complete_held()
            chunk = chunk[newline + 1 :]
        # One split over the whole chunk beats any per-line reader by 5× (PERF-NOTES).
        lines = chunk.split(b"\n")
        tail = lines.pop()
        limit = min(self.max_line_bytes or len(chunk), self.defer_over or len(chunk))
        if len(chunk) > limit:
            self._check_long(lines)  # only a chunk larger than a limit can hold such a line
        else:
            check_lines(lines, self.stats)
        if tail:
            self._hold(tail)

    def _check_long(self, lines: list[bytes]) -> None:
        """check_lines, except that too long lines fail or are deferred (the rare path)."""
        run_start = 0
        for i, line in enumerate(lines):
            if self.max_line_bytes is not None and len(line) > self.max_line_bytes:
                check_lines(lines[run_start:i], self.stats)
                raise LineTooLongError(self.stats.lines + 1, self.max_line_bytes)
            if self.defer_over is not None and len(line) > self.defer_over:
                check_lines(lines[run_start:i], self.stats)
                self.stats.lines += 1
                self.deferred.append((self.stats.lines, [line]))
                run_start = i + 1
        check_lines(lines[run_start:], self.stats)

    def finish(self) -> LineStats:
        """Account for a final line that has no newline; returns the stats."""
        if self._pieces:
            self._complete_held()
        return self.stats

    def take_tail(self) -> bytes:
        """Hand over the held-back incomplete line (to continue elsewhere)."""
        tail = b"".join(self._pieces)
        self._pieces, self._held = [], 0
        return tail

    def take_deferred(self) -> list[tuple[int, list[bytes]]]:
        """Hand over the lines waiting to be checked elsewhere (see :meth:`LineStats.settle`)."""
        deferred, self.deferred = self.deferred, []
        return deferred


__all__ = [
    "MAX_INVALID_LINE_NUMBERS",
    "LineChecker",
    "LineStats",
    "LineTooLongError",
    "Verdict",
    "check_lines",
    "classify",
]
