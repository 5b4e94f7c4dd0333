"""Incremental NDJSON checking: bytes in, line and record counts out. Pure, no I/O.

The hot loop of the whole tool: every byte of every export passes through
:meth:`LineChecker.feed`. Measured on one core (PERF-NOTES), parsing each line with
orjson is the ceiling (~2.7 M lines/s for 55-byte lines), so the loop does nothing else
per line: it splits a whole chunk at once, parses each line in place, and only looks
closer at a line that failed to parse (blank or invalid). Counting is per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

MAX_INVALID_LINE_NUMBERS = 100
"""How many invalid line numbers are kept (SPEC: the first 100)."""

_loads = orjson.loads
_DecodeError = orjson.JSONDecodeError


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
    end: a last line without a trailing newline is still a line.
    """

    def __init__(self) -> None:
        self.stats = LineStats()
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        """Check the complete lines in ``tail + chunk``; keep the incomplete end."""
        # One split over the whole chunk beats any per-line reader by 5× (PERF-NOTES);
        # the concatenation copies a chunk once, which is cheap next to parsing it.
        lines = (self._tail + chunk).split(b"\n") if self._tail else chunk.split(b"\n")
        self._tail = lines.pop()
        check_lines(lines, self.stats)

    def finish(self) -> LineStats:
        """Account for a final line that has no newline; returns the stats."""
        if self._tail:
            check_lines([self._tail], self.stats)
            self._tail = b""
        return self.stats

    def take_tail(self) -> bytes:
        """Hand over the held-back incomplete line (to continue elsewhere)."""
        tail, self._tail = self._tail, b""
        return tail


__all__ = ["MAX_INVALID_LINE_NUMBERS", "LineChecker", "LineStats", "check_lines"]
