"""Verdicts on lines of NDJSON, many lines per C call, identical to per-line orjson. Pure, no I/O.

Every byte of every export passes through :func:`check_block`, in the event loop
(``--workers 0``) or in the worker processes (:mod:`orchestrator.validate_worker`), so this
module imports nothing of the package (a worker starts fast).

The oracle is per-line ``orjson.loads`` (:func:`check_lines`): a line is a *record* when it
parses, *blank* when it is empty or only JSON whitespace, *invalid* otherwise. It is exact
but pays a Python call and builds the objects for every line. Here a block of complete
lines is parsed at once with yyjson (the C parser orjson embeds, without building Python
objects), and the per-line verdicts are *proved*, not guessed. Where the proof does not go
through, the part is cut in smaller parts and tried again, down to the per-line loop:
invalid and blank lines are rare, so they cost little.

The proof. Let the part have ``n`` lines L1..Ln (each ends with ``\\n``). Build

    A = "[" L1 "\\n," L2 "\\n," … Ln "\\n," "0]"      B = "[" L1 "\\n,0," L2 "\\n,0," … Ln "\\n,0," "0]"

(one ``bytes.replace`` each, the newline count falls out of A's length).

1. A token (string, number, literal) never spans a line: a raw newline inside a string is
   a control character, which the parser rejects, and a newline ends a number or literal.
   So both documents have the same bracket structure, given by the lines alone, and every
   separator sits in the same container in A and in B. The final ``]`` closes the outer
   array, so after a successful parse the last separator is at the root.
2. Line joining (the trap of a single batch: ``[1`` then ``2]`` then ``3,4`` parses as 3
   elements of 3 lines) needs a separator inside a nested container. In B such a separator
   adds its ``0`` to the nested container (or fails, in an object); at the root it adds one
   element. So ``len(B) - len(A)`` counts the separators at the root, and ``== n`` proves
   that every line starts and ends at the root.
3. Then the root of A is ``[ T1 , T2 , … , Tn , 0 ]`` where each Ti is a line's tokens
   between root-level commas: one or more values (an empty one, a blank line, is a parse
   error). ``len(A) == n + 1`` proves each Ti is exactly one value: each line alone is a
   JSON text of the same grammar. For ``n == 1`` A alone is the proof (point 1).
4. What the grammar does not see is checked apart. Numbers (``1e400`` or a 400-digit integer
   overflow a double: errors; integers beyond 64 bits become floats), strings, escapes and
   lone surrogates, a BOM: yyjson decides them exactly like orjson, and a non-ASCII part
   must also decode as strict UTF-8. Depth: orjson refuses more than 1024 nested levels,
   yyjson has no limit. A line that deep is at least 2,050 bytes long, and such a line
   covers a whole aligned window of 1,025 bytes with no newline in it: only then are the
   long lines split out, and each with more than 1,024 opening brackets is asked of orjson.

The differential test (tests/test_validator_diff.py) compares this with per-line orjson
on over a million mutated records and on every short combination of JSON punctuation.
"""

from __future__ import annotations

import bisect
import mmap
from dataclasses import dataclass, field
from itertools import repeat
from typing import Literal

import orjson
import yyjson

MAX_INVALID_LINE_NUMBERS = 100
"""How many invalid line numbers are kept (SPEC: the first 100)."""

Verdict = Literal["record", "blank", "invalid"]
Buffer = bytes | mmap.mmap
"""What :func:`check_block` reads: ``find`` and slicing to ``bytes`` are all it needs."""

_loads = orjson.loads
_DecodeError = orjson.JSONDecodeError
_Document = yyjson.Document


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
    """The oracle: parse every line of ``lines`` (no newlines) and add them to ``stats``.

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


_PART_BYTES = 64 << 10
"""Blocks are parsed in line-aligned parts of about this size. Measured: two yyjson
documents of a whole 1 MiB chunk in a row cost 6x one (the allocator hands the big
buffers back and faults them in again); 16-128 KiB parts avoid it."""
_SMALL_PART = 2 << 10
"""A part this small whose proof failed is checked line by line instead of cut again."""
_CUTS = 8
"""A failed part is cut in this many: an invalid line costs ~2 extra parses of its part,
and an all-invalid file stays near the per-line speed (few levels of failed parses)."""


def check_block(block: Buffer, stats: LineStats, start: int = 0, end: int | None = None) -> None:
    """Add the lines of ``block[start:end]`` to ``stats``, as :func:`check_lines` would.

    Every line ends with ``\\n``, except that the last may lack it (the end of a file):
    the newline that ends the range does not start a line.
    """
    end = len(block) if end is None else end
    while start < end:
        stop = end if end - start <= 2 * _PART_BYTES else block.find(b"\n", start + _PART_BYTES, end) + 1 or end
        part = block[start:stop]
        _check_part(part if part[-1:] == b"\n" else part + b"\n", stats)
        start = stop


def _check_part(part: bytes, stats: LineStats) -> None:
    """check_block on one part that ends with a newline: the proof, else smaller parts."""
    n = _proved(part)
    if n:
        base = stats.lines
        stats.lines += n
        if len(part) >= _DEEP_LINE and has_line_over(part, _DEEP_LINE - 1):
            _settle_deep_lines(part[:-1].split(b"\n"), stats, base)
        return
    step = len(part) // _CUTS
    first = part.find(b"\n", step) + 1
    if len(part) <= _SMALL_PART or first == len(part):  # small, or one line: no smaller part
        check_lines(part[:-1].split(b"\n"), stats)
        return
    start, stop = 0, first
    while start < len(part):
        _check_part(part[start:stop], stats)
        start, stop = stop, part.find(b"\n", stop + step) + 1 or len(part)


def _proved(part: bytes) -> int:
    """The number of lines of ``part`` when each is one JSON value (the module's proof), else 0.

    ``part`` ends with a newline.
    """
    if not part.isascii():
        try:
            part.decode()  # strict UTF-8, as orjson: no surrogates, overlongs, truncations
        except UnicodeDecodeError:
            return 0
    joined = part.replace(b"\n", b"\n,")
    n = len(joined) - len(part)
    try:
        if len(_Document(b"".join((b"[", joined, b"0]")))) != n + 1:
            return 0
        if n > 1 and len(_Document(b"".join((b"[", part.replace(b"\n", b"\n,0,"), b"0]")))) != 2 * n + 1:
            return 0
    except ValueError:  # yyjson's parse error: some line is invalid or blank, or lines join
        return 0
    return n


def _lines_pass(block: bytes, n: int) -> bool:
    """Whether the proof accepts ``block`` as ``n`` lines (for the exhaustive tests)."""
    return _proved(block) == n


_DEPTH_LIMIT = 1024
"""orjson refuses a document nested deeper than this (measured: 1024 levels pass, 1025 fail)."""
_DEEP_LINE = 2 * (_DEPTH_LIMIT + 1)
"""The shortest valid line deeper than orjson allows: 1,025 openings and their closings."""


def has_line_over(block: Buffer, limit: int, start: int = 0, end: int | None = None) -> bool:
    """Whether some line of ``block[start:end]`` might be longer than ``limit`` bytes.

    Cheap and conservative: a line of ``limit + 1`` bytes or more covers a whole window
    ``[start + k·W, start + (k+1)·W)`` with W = ⌈(limit+1)/2⌉ and no newline in it; for
    ordinary records every window has one, found a few bytes in (one C call per window).
    """
    end = len(block) if end is None else end
    width = (limit + 2) // 2
    starts = range(start, end - width + 1, width)
    return -1 in map(block.find, repeat(b"\n"), starts, range(start + width, end + 1, width))


def _settle_deep_lines(lines: list[bytes], stats: LineStats, base: int) -> None:
    """Lines the block parse accepted but that may be too deep for orjson: ask orjson."""
    for i, line in enumerate(lines):
        if len(line) >= _DEEP_LINE and line.count(b"[") + line.count(b"{") > _DEPTH_LIMIT:
            try:
                _loads(line)
            except _DecodeError:
                stats.settle(base + i + 1, "invalid")  # valid for yyjson, so neither blank


__all__ = [
    "MAX_INVALID_LINE_NUMBERS",
    "Buffer",
    "LineStats",
    "Verdict",
    "check_block",
    "check_lines",
    "classify",
    "has_line_over",
]
