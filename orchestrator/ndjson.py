"""Incremental NDJSON checking: bytes in, line and record counts out. Pure, no I/O.

The hot loop of the whole tool: every byte of every export passes through
:meth:`LineChecker.feed`. Measured on one core (PERF-NOTES), parsing each line with
orjson was the ceiling (~2.7 M lines/s for 55-byte lines). The loop now hands the whole
chunk's complete lines to :func:`check_block` (below), which proves all their verdicts in
two C calls and falls back to the per-line loop (:func:`check_lines`) only when a block
holds a blank or invalid line. Counting is per chunk.

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

Block validation (:func:`check_block`, used by the checker and the worker pool): many lines
checked in two C calls, verdicts identical to per-line orjson.

Per-line ``orjson.loads`` is exact but pays a Python call and builds the objects for every
line (~2.7 M lines/s on one core, the old ceiling). Here a block of complete lines is
parsed at once with yyjson (the same C parser orjson uses inside, without building Python
objects), and the per-line verdicts are *proved*, not guessed. Whenever the proof does not
go through, the block falls back to the exact per-line loop (:func:`check_lines`): invalid
and blank lines are rare, so the fallback costs nothing in practice.

The proof. Let the block have ``n`` lines L1..Ln, none blank. Build

    A = "[" L1 "\\n," L2 "\\n," … Ln "\\n]"        B = "[" L1 "\\n,0," L2 "\\n,0," … Ln "\\n]"

1. A token (string, number, literal) never spans a line: a raw newline inside a string is
   a control character, which the parser rejects, and a newline ends a number or literal.
   So both documents have the same bracket structure, given by the lines alone, and every
   separator sits in the same container in A and in B.
2. Line joining (the trap of a single batch: ``[1`` then ``2]`` then ``3,4`` parses as 3
   elements of 3 lines) needs a separator inside a nested container. In B such a separator
   adds its ``0`` to the nested container (or fails, in an object); at the root it adds one
   element. So ``len(B) - len(A)`` counts the separators at the root, and
   ``len(B) - len(A) == n - 1`` proves that every line starts and ends at the root.
3. Then the root of A is ``[ T1 , T2 , … , Tn ]`` where each Ti is a line's tokens between
   root-level commas: one or more values separated by commas. ``len(A) == n`` proves each
   Ti is exactly one value, i.e. each line alone is a JSON text for the same grammar.
4. What the grammar does not see is checked apart. Numbers (``1e400`` or a 400-digit integer
   overflow a double: errors; integers beyond 64 bits become floats), strings, escapes and lone
   surrogates, UTF-8, a BOM: yyjson decides them exactly like orjson (orjson embeds
   yyjson), and the block must also decode as strict UTF-8. Depth: orjson refuses more
   than 1024 nested levels, yyjson has no limit. A line that deep is at least 2,050 bytes
   long, so only a block holding a line of 1,025+ bytes looks closer: each line over 2,049
   bytes with more than 1,024 opening brackets gets its verdict from orjson.

The differential test (tests/test_validator_diff.py) compares this with per-line orjson
on over a million mutated records and on every short combination of JSON punctuation.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Literal

import orjson
import yyjson

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


# -- block validation (see the module docstring) --------------------------------------------
_Document = yyjson.Document
_DEPTH_LIMIT = 1024
"""orjson refuses a document nested deeper than this (measured: 1024 levels pass, 1025 fail)."""
_DEEP_LINE = 2 * (_DEPTH_LIMIT + 1)
"""The shortest valid line deeper than orjson allows: 1,025 openings and their closings."""
_WINDOW = _DEEP_LINE // 2
"""Any line of ``_DEEP_LINE`` bytes covers one whole aligned window of this size."""


def _lines_pass(block: bytes, n: int) -> bool:
    """True when each of the ``n`` lines of ``block`` is one JSON value (the module's proof).

    ``block`` ends with a newline and has no blank line.
    """
    body = block[:-1]
    try:
        if len(_Document(b"[" + body.replace(b"\n", b"\n,") + b"\n]")) != n:
            return False
        return n == 1 or len(_Document(b"[" + body.replace(b"\n", b"\n,0,") + b"\n]")) == 2 * n - 1
    except ValueError:  # yyjson's parse error: some line is invalid (or blank)
        return False


def _has_long_line(block: bytes) -> bool:
    """Whether some line might be ``_DEEP_LINE`` bytes or longer (cheap, conservative).

    A line that long covers a whole window [k·W, (k+1)·W) with no newline in it; for
    ordinary records every window has one, found a few hundred bytes in.
    """
    find = block.find
    return any(find(b"\n", start, start + _WINDOW) < 0 for start in range(0, len(block) - _WINDOW + 1, _WINDOW))


def _settle_deep_lines(lines: list[bytes], stats: LineStats, base: int) -> None:
    """Lines the block parse accepted but that may be too deep for orjson: ask orjson."""
    for i, line in enumerate(lines):
        if len(line) >= _DEEP_LINE and line.count(b"[") + line.count(b"{") > _DEPTH_LIMIT:
            try:
                orjson.loads(line)
            except orjson.JSONDecodeError:
                stats.settle(base + i + 1, "invalid")  # valid for yyjson, so neither blank


_PART_BYTES = 32 << 10
"""Blocks are parsed in line-aligned parts of about this size. Measured: two yyjson
documents of a whole 1 MiB chunk in a row cost 6x one (the allocator hands the big
buffers back and faults them in again); 16-128 KiB parts avoid it."""


def check_block(block: bytes, stats: LineStats) -> None:
    """Add the lines of ``block`` to ``stats``: every line ends with ``\\n``, the last included.

    Same result as ``check_lines(block[:-1].split(b"\\n"), stats)``, faster.
    """
    if len(block) <= 2 * _PART_BYTES:
        _check_part(block, stats)
        return
    start, size = 0, len(block)
    while start < size:
        end = block.find(b"\n", start + _PART_BYTES) + 1 or size
        _check_part(block[start:end], stats)
        start = end


def _check_part(block: bytes, stats: LineStats) -> None:
    """check_block on one part (see the module docstring for the proof)."""
    n = block.count(b"\n")
    if not n:
        return
    if block[-1:] != b"\n" or block[:1] == b"\n" or b"\n\n" in block:
        # Malformed call or an empty line: the exact path (blank lines are rare).
        check_lines(block[:-1].split(b"\n") if block[-1:] == b"\n" else block.split(b"\n"), stats)
        return
    if not block.isascii():
        try:
            block.decode()  # strict UTF-8, as orjson: no surrogates, overlongs, truncations
        except UnicodeDecodeError:
            check_lines(block[:-1].split(b"\n"), stats)
            return
    if not _lines_pass(block, n):
        check_lines(block[:-1].split(b"\n"), stats)
        return
    base = stats.lines
    stats.lines += n
    if len(block) >= _DEEP_LINE and _has_long_line(block):
        _settle_deep_lines(block[:-1].split(b"\n"), stats, base)


def _check_run(lines: list[bytes], stats: LineStats) -> None:
    """check_lines through the block validator (lines without their newlines)."""
    if lines:
        check_block(b"\n".join(lines) + b"\n", stats)


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
        cut = chunk.rfind(b"\n") + 1
        tail = chunk[cut:]
        limit = min(self.max_line_bytes or len(chunk), self.defer_over or len(chunk))
        if len(chunk) > limit:
            # Only a chunk larger than a limit can hold such a line (the rare path).
            self._check_long(chunk[:cut].split(b"\n")[:-1])
        elif cut:
            check_block(chunk if cut == len(chunk) else chunk[:cut], self.stats)
        if tail:
            self._hold(tail)

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
    "check_block",
    "check_lines",
    "classify",
]
