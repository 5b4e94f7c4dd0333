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

The proof. Let the part have ``n`` lines L1..Ln (each ends with ``\\n``). It is copied
out of the block once, between brackets, as ``W = "[" L1 "\\n" … Ln "\\n" "0]"``, and
two ``bytes.replace`` of W build

    A = "[" L1 "," L2 "," … Ln "," "0]"      B = "[" L1 "\\n,0," L2 "\\n,0," … Ln "\\n,0," "0]"

(A swaps each newline for a comma, byte for byte: one copy, no insertion per line; the
line count falls out of B's length).

1. In B no token spans a line: a raw newline inside a string is a control character,
   which the parser rejects, and a newline ends a number or literal. So when B parses,
   the lexer is between tokens at the end of every line.
2. A has the same tokens as B, minus the inserted ``0,``. Line by line, the lexer enters
   each line between tokens in both (after ``[`` or a comma), reads the same bytes, and at
   the line's end is between tokens in B (point 1); a comma ends a number or literal as a
   newline does, so the same holds in A. (A alone has no newline: a string left open in
   one line could run on into the next; B is what rules that out.) So both documents
   have the same bracket structure, given by the lines alone, and every separator sits
   in the same container in A and in B. The final ``]`` closes the outer array, so after
   a successful parse the last separator is at the root.
3. Line joining (the trap of a single batch: ``[1`` then ``2]`` then ``3,4`` parses as 3
   elements of 3 lines) needs a separator inside a nested container. Let ``c`` be the
   commas of the lines that sit at the root and ``k`` the line ends at the root: A has
   ``c + k + 1`` elements and B ``c + 2k + 1`` (a line end inside a nested container adds
   B's ``0`` to that container, or fails, in an object). ``len(A) == n + 1`` and
   ``len(B) == 2n + 1`` give ``k == n`` and ``c == 0``: every line starts and ends at the
   root, and none has a comma there.
4. Then the root of A is ``[ T1 , T2 , … , Tn , 0 ]`` where each Ti is exactly the tokens
   of line i: one value (an empty one, a blank line, is a parse error). Each line alone
   is a JSON text of the same grammar. For ``n == 1`` A alone is the proof: the line's
   tokens end at its comma (``,0]`` holds no quote to close a string left open).
5. What the grammar does not see is checked apart. Numbers (``1e400`` or a 400-digit integer
   overflow a double: errors; integers beyond 64 bits become floats), strings, escapes and
   lone surrogates, a BOM, UTF-8 (yyjson's strings are strict UTF-8 as orjson's: no
   surrogates, overlongs or truncations, and any non-ASCII byte outside a string is a
   syntax error): yyjson decides them exactly like orjson (the differential test pins it,
   down to every 2-byte sequence). Depth: orjson refuses more than 1024 nested levels,
   yyjson has no limit. A line that deep is at least 2,050 bytes long: only a part with a
   line that long (one ``rfind`` per ~2 KB finds out) has its long lines split out, and
   each with more than 1,024 opening brackets is asked of orjson.

Long lines. The proof parses every byte twice; when the lines of a range are long (over
``_LONG_LINE`` bytes on average in its first 8 KiB) each line is parsed alone instead, one
yyjson document per line (:func:`_check_each`): no proof is needed, the verdict on a line that
yyjson accepts is the claim of point 5, depth included. Either way a refusal goes to orjson.

The differential test (tests/test_validator_diff.py) compares this with per-line orjson
on over a million mutated records and on every short combination of JSON punctuation.
"""

from __future__ import annotations

import bisect
import mmap
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from io import BytesIO
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
        """Record the verdict on line ``number``, already counted in ``lines`` (deferred or re-checked).

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
    """One line's verdict (a final newline in it is JSON whitespace, as for :func:`check_lines`)."""
    try:
        _loads(line)
    except _DecodeError:
        return "invalid" if line.strip() else "blank"
    return "record"


def check_lines(lines: list[bytes], stats: LineStats) -> None:
    """The oracle: parse every line of ``lines`` and add them to ``stats``.

    A line may keep its final ``\\n``: it is JSON whitespace, and blank to ``strip``.

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


_PART_BYTES = 32 << 10
"""Blocks are parsed in line-aligned parts of about this size. Measured: two yyjson
documents of a whole 1 MiB chunk in a row cost 6x one (the allocator hands the big
buffers back and faults them in again). A part's working set is ~7x the part (its
bracketed copy, A, B, yyjson's copies of them and its value arrays, ~2 bytes per input
byte for small records): at 32 KiB it stays within a core's L2 (512 KiB here). Measured
on both record shapes: 32-48 KiB parts 15-20% faster than 64 KiB, 8-16 KiB slower (more
calls per byte)."""
_SMALL_PART = 2 << 10
"""A part this small whose proof failed is checked line by line instead of cut again."""
_CUTS = 8
"""A failed part is cut in this many: an invalid line costs ~2 extra parses of its part,
and an all-invalid file stays near the per-line speed (few levels of failed parses)."""


_LONG_LINE = 192
"""Lines longer than this on average are parsed one yyjson document per line, not proved by
parts. The proof parses every byte twice; a line alone is parsed once but costs a call and
a bytes object (~0.5 us). Measured (one core, same run, either path forced, over lines of
57-1,395 bytes): the two cost the same near 170-230 bytes per line; a line at a time is 0.5x
the proof's speed at 57 bytes, 0.87x at 115, 1.24x at 464 (the big records), 1.65x at 1,395."""
_EACH_PART_BYTES = 1 << 20
"""Long lines are cut out in parts of about this size: no working set to keep in L2 on this
path, so fewer, bigger parts (measured on big records: 1 MiB ~1.1x faster than 32 KiB)."""
_SAMPLE_BYTES = 8 << 10
"""The mean line length is taken over the first this many bytes of a range (one small copy)."""
_drain: Callable[[Iterable[object]], None] = deque[object](maxlen=0).extend
"""Runs an iterator to its end, in C."""


def check_block(block: Buffer, stats: LineStats, start: int = 0, end: int | None = None) -> None:
    """Add the lines of ``block[start:end]`` to ``stats``, as :func:`check_lines` would.

    Every line ends with ``\\n``, except that the last may lack it (the end of a file):
    the newline that ends the range does not start a line.
    """
    end = len(block) if end is None else end
    sample = block[start : min(end, start + _SAMPLE_BYTES)]
    each = sample.count(b"\n") * _LONG_LINE < len(sample)  # long lines: one parse per line is cheaper
    size = _EACH_PART_BYTES if each else _PART_BYTES
    with memoryview(block) as view:  # released at once: an mmap with a view cannot close
        while start < end:
            stop = end if end - start <= 2 * size else block.find(b"\n", start + size, end) + 1 or end
            if each:
                _check_each(block[start:stop], stats)
            else:  # the part's one copy out of the block is W (see the module docstring)
                _check_part(b"".join((b"[", view[start:stop], b"0]" if view[stop - 1] == 10 else b"\n0]")), stats)
            start = stop


def _check_each(part: bytes, stats: LineStats) -> None:
    """check_block on one part of long lines: a yyjson document per line, orjson where one fails.

    A line yyjson accepts alone is a record for orjson unless nested deeper than 1024 (point 5
    of the module docstring, the claim the proof rests on too): long enough lines are asked of
    orjson. A line yyjson refuses is judged by orjson alone (blank or invalid, or a record).
    """
    lines = BytesIO(part).readlines()  # with their newlines (JSON whitespace); memchr, 3x faster than split
    base = stats.lines
    stats.lines += len(lines)
    try:
        _drain(map(_Document, lines))
    except ValueError:  # yyjson's parse error: find the lines, one at a time (the rare path)
        _settle_refused(lines, stats, base)
        return
    if len(part) > _DEEP_LINE and max(map(len, lines)) >= _DEEP_LINE:
        _settle_deep_lines(lines, stats, base)


def _settle_refused(lines: list[bytes], stats: LineStats, base: int) -> None:
    """Lines already counted, some refused by yyjson: orjson judges those, and the deep accepted ones."""
    for i, line in enumerate(lines):
        try:
            _Document(line)
        except ValueError:
            stats.settle(base + i + 1, classify(line))
            continue
        if len(line) >= _DEEP_LINE:
            _settle_deep_lines([line], stats, base + i)


def _check_part(wrapped: bytes, stats: LineStats) -> None:
    """check_block on one part, as ``"[" lines "0]"`` (each line with its newline): the proof, else smaller parts."""
    n = _proved(wrapped)
    if n:
        base = stats.lines
        stats.lines += n
        if len(wrapped) > _DEEP_LINE and has_line_over(wrapped, _DEEP_LINE - 1):
            _settle_deep_lines(wrapped[1:-3].split(b"\n"), stats, base)
        return
    part = wrapped[1:-2]
    step = len(part) // _CUTS
    first = part.find(b"\n", step) + 1
    if len(part) <= _SMALL_PART or first == len(part):  # small, or one line: no smaller part
        check_lines(part[:-1].split(b"\n"), stats)
        return
    start, stop = 0, first
    with memoryview(part) as view:
        while start < len(part):
            _check_part(b"".join((b"[", view[start:stop], b"0]")), stats)
            start, stop = stop, part.find(b"\n", stop + step) + 1 or len(part)


def _proved(wrapped: bytes) -> int:
    """The number of lines when each is one JSON value (the module's proof), else 0.

    ``wrapped`` is ``"[" lines "0]"``, each line with its newline (W in the module docstring).
    """
    b = wrapped.replace(b"\n", b"\n,0,")
    n = (len(b) - len(wrapped)) // 3
    try:
        if len(_Document(wrapped.replace(b"\n", b","))) != n + 1:  # A: a byte for a byte, ~2x cheaper than B
            return 0
        if n > 1 and len(_Document(b)) != 2 * n + 1:
            return 0
    except ValueError:  # yyjson's parse error: some line is invalid or blank, or lines join
        return 0
    return n


def _lines_pass(block: bytes, n: int) -> bool:
    """Whether the proof accepts ``block`` (lines, each with its newline) as ``n`` lines (for the exhaustive tests)."""
    return _proved(b"".join((b"[", block, b"0]"))) == n


_DEPTH_LIMIT = 1024
"""orjson refuses a document nested deeper than this (measured: 1024 levels pass, 1025 fail)."""
_DEEP_LINE = 2 * (_DEPTH_LIMIT + 1)
"""The shortest valid line deeper than orjson allows: 1,025 openings and their closings."""


def has_line_over(block: Buffer, limit: int, start: int = 0, end: int | None = None) -> bool:
    """Whether some line of ``block[start:end]`` is longer than ``limit`` bytes.

    One C call per ~``limit`` bytes for ordinary records, none per line: from the start of a
    line, the last newline within the next ``limit + 1`` bytes ends the lines that are
    surely short enough; none there means the line is longer than ``limit``.
    """
    end = len(block) if end is None else end
    rfind = block.rfind
    while end - start > limit:
        newline = rfind(b"\n", start, start + limit + 1)
        if newline < 0:
            return True
        start = newline + 1
    return False


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
