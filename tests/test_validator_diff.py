"""The block validator against its oracle, per-line orjson: zero disagreements.

`check_block` proves many lines' verdicts with two yyjson parses, or parses long lines one
yyjson document each, and falls back to the per-line orjson loop when that fails; a wrong
proof would count a bad line as a record. Here per-line orjson (`reference`) judges, on both
paths (the ``path`` fixture forces one):

- mutated records (seeded, so every run tests the same lines): 200,000 by default,
  ``MICS_VALIDATOR_DIFF_FULL=1`` for 1,000,000 (the figure quoted in the report);
- every 2-line block of strings of up to 3 characters and every 3-line block of up to
  2 characters over ``[]{},:"1`` and space (the join trap lives there: ``[1,`` then ``2]``,
  and the string trap of a document without newlines: ``"`` then ``",1``);
- any chunking, in process (LineChecker) and through the worker pool (ValidatorPool: one
  pool for the module, a new checker on it per hypothesis example);
- the seams of the fast path: depth, BOM, big numbers, bad UTF-8, surrogates, NUL, CRLF,
  blank lines, a last line without newline, anywhere in blocks of many parts.
"""

from __future__ import annotations

import itertools
import mmap
import os
import random
from collections.abc import AsyncIterator

import orjson
import pytest
import yyjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import blockcheck
from orchestrator.blockcheck import _lines_pass, has_line_over
from orchestrator.ndjson import MAX_INVALID_LINE_NUMBERS, LineChecker, LineStats, check_block
from orchestrator.workers import ValidatorPool, validator_pool

FULL = os.environ.get("MICS_VALIDATOR_DIFF_FULL") == "1"
MUTATED = 1_000_000 if FULL else 200_000


def reference(lines: list[bytes]) -> LineStats:
    """The oracle: each line on its own through orjson (blank = only whitespace)."""
    stats = LineStats(lines=len(lines))
    for number, line in enumerate(lines, 1):
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError:
            if not line.strip():
                stats.blank_lines += 1
            else:
                stats.invalid_lines += 1
                if len(stats.invalid_line_numbers) < MAX_INVALID_LINE_NUMBERS:
                    stats.invalid_line_numbers.append(number)
    return stats


def fast(lines: list[bytes]) -> LineStats:
    """The validator under test on one block of lines."""
    stats = LineStats()
    check_block(b"".join(line + b"\n" for line in lines), stats)
    return stats


PATHS = {"proof": 10**9, "each": 0}
"""``_LONG_LINE`` values that force a path: the proof by parts (unless no newline is in
sight), or one yyjson document per line."""


@pytest.fixture(params=list(PATHS))
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """check_block takes the path named by the parameter, whatever the line lengths."""
    monkeypatch.setattr(blockcheck, "_LONG_LINE", PATHS[request.param])
    return str(request.param)


# -- seeded mutations ---------------------------------------------------------------------
BASES = [
    b'{"id":"up-8382275315","emails":[{"id":"38847727073130527012"}]}',
    b'{"id":"up-6528705786","emails":[]}',
    b'{"user_point_id":"up-7093450243","creation_ts":1696858721372,"emails":[{"id":"1119596686",'
    b'"hash":"5804f9bc1a1afa8ce0218816297e461f","consent":true}],"profile":{"gender":null,'
    b'"age_bucket":"18-24","city":"Marseille","loyalty":{"tier":"none","points":39888}},'
    b'"segments":[{"id":"93644"},{"id":"96564"}],"activities":[{"type":"EMAIL_OPEN","ts":1.5e-05}]}',
    b'{"a":[1,2.5,-3e10,true,false,null],"b":{"c":"caf\xc3\xa9 \\u00e9 \\ud83d\\ude00 \\n\\"x"}}',
    b"[1,[2,[3,[4]]],{}]",
    b'"just a string"',
    b"12345678901234567890123",
    b' {"k" : [ 1 , 2 ] } \r',
]
SNIPPETS = [
    b"1e400", b"-1e400", b"1e308", b"1.7976931348623159e308", b"18446744073709551616", b"1" * 320,
    b'"\\ud800"', b'"\\udc00"', b'"\\ud800\\udc00"', b"\xef\xbb\xbf", b"\xed\xa0\x80", b"\xc0\x80",
    b"\xf4\x90\x80\x80", b"\xff", b"\x00", b"\x0b", b"\x0c", b"\r", b"\t", b" ", b"NaN", b"Infinity",
    b"[1,]", b'{"a":1,}', b"01", b"-", b".5", b"1.", b"tru", b"nulll", b'"\\x"', b'"\\u12"',
    b"[", b"]", b"{", b"}", b",", b":", b'"', b"\\", b"],[", b"},{", b'"a":', b"[" * 1030, b"]" * 1030,
]  # fmt: skip
ALPHABET = b'[]{},:"1 e.-+0\\u\r\t\x00\x7f\xc3\xa9\xff'


def mutate(rng: random.Random, line: bytes) -> bytes:
    """One to three random edits: byte-level, or a splice of a tricky snippet."""
    for _ in range(rng.randint(1, 3)):
        pos = rng.randint(0, len(line))
        kind = rng.randrange(7)
        if kind == 0 and line:
            line = line[:pos] + line[pos + 1 :]  # delete a byte
        elif kind == 1:
            line = line[:pos] + bytes([rng.choice(ALPHABET)]) + line[pos:]  # insert a byte
        elif kind == 2 and line:
            line = line[:pos] + bytes([rng.choice(ALPHABET)]) + line[pos + 1 :]  # replace a byte
        elif kind == 3:
            line = line[:pos] + rng.choice(SNIPPETS) + line[pos:]  # splice a snippet
        elif kind == 4:
            end = rng.randint(pos, len(line))
            line = line[:pos] + line[end:]  # cut a slice
        elif kind == 5:
            line = line[:pos]  # truncate
        else:
            end = rng.randint(pos, len(line))
            line = line[:pos] + line[pos:end] * 2 + line[end:]  # duplicate a slice
    return line.replace(b"\n", b"")


def deep(levels: int) -> bytes:
    """A valid line nested ``levels`` deep (orjson accepts 1024, refuses 1025)."""
    objects, arrays = levels // 2, levels - levels // 2
    return b'{"a":' * objects + b"[" * arrays + b"1" + b"]" * arrays + b"}" * objects


def test_mutated_records_agree_with_per_line_orjson(path: str) -> None:
    """Seeded mutated records, in blocks of 1–8 lines, get exactly the per-line orjson verdicts."""
    rng = random.Random(20240614)
    done = accepted_with_mutants = 0
    while done < MUTATED:
        block = []
        mutants = False
        for _ in range(rng.randint(1, 8)):
            line = rng.choice(BASES)
            if rng.random() < 0.35:
                line, mutants = mutate(rng, line), True
            block.append(line)
        done += len(block)
        expected = reference(block)
        assert fast(block) == expected, block
        if mutants and expected.invalid_lines == expected.blank_lines == 0:
            accepted_with_mutants += 1  # the fast path's acceptance was exercised on mutants
    assert accepted_with_mutants > MUTATED // 100


@pytest.mark.parametrize("levels", [1023, 1024, 1025, 1100])
def test_depth_limit_matches_orjson(levels: int, path: str) -> None:
    """A line nested more than 1024 deep is invalid, as for orjson, even when the block parse accepts it."""
    block = [b"{}", deep(levels), b"[1]"]
    assert fast(block) == reference(block)
    assert (fast(block).invalid_lines == 1) == (levels > 1024)


def test_properties_the_grammar_does_not_see(path: str) -> None:
    """Overflowing numbers, big integers, surrogates, BOM, bad UTF-8, CRLF and JSON whitespace: as orjson."""
    cases = [b"1e400", b"[1e-400]", b"18446744073709551616", b"1" + b"0" * 400, b'"\\ud800"', b'"\\ud800\\udc00"',
             b"\xef\xbb\xbf{}", b'"\xed\xa0\x80"', b'"\xc3\xa9"', b'"\xc3"', b"{}\r", b"\r{}", b"\x0b", b"\x0c{}",
             b"  ", b'"\x7f"', b'"\x1f"']  # fmt: skip
    for case in cases:
        for block in ([case], [b"{}", case], [case, b"[1]", b"2"]):
            assert fast(block) == reference(block), block


SHORT = b'[]{},:"1 '


def strings(max_len: int) -> list[bytes]:
    """Every string of 0..max_len characters over SHORT (blank lines included)."""
    return [bytes(t) for n in range(max_len + 1) for t in itertools.product(SHORT, repeat=n)]


def valid(line: bytes) -> bool:
    """The oracle's record verdict for one line."""
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


def test_utf8_in_strings_is_judged_as_orjson_does() -> None:
    """Bytes in a string (every 2-byte sequence; 3 and 4 bytes at range edges): the proof accepts what orjson does.

    The proof has no UTF-8 check of its own: yyjson's strings are strict UTF-8, as orjson's.
    """
    edges = [0x00, 0x22, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xFF]
    leads = range(0x80, 0x100)
    sequences = [bytes([a, b]) for a in leads for b in range(0x100)]
    sequences += [bytes([a, b, c]) for a in leads for b in edges for c in edges]
    sequences += [bytes([a, b, c, d]) for a in range(0xF0, 0x100) for b in edges for c in edges for d in edges]
    for sequence in sequences:
        line = b'{"k":"' + sequence + b'"}'
        assert _lines_pass(line + b"\n{}\n", 2) == valid(line), sequence  # both documents parse it


def test_every_two_line_block_of_up_to_three_characters() -> None:
    """All 672,400 blocks of 2 lines of ≤3 characters over []{},:"1 and space: the proof holds iff both are records.

    The proof (two yyjson parses) is the only part that can accept a line orjson refuses;
    when it fails the block goes to per-line orjson itself, so the proof is tested directly.
    """
    pieces = strings(3)
    ok = {p: valid(p) for p in pieces}
    for a in pieces:
        for b in pieces:
            assert _lines_pass(a + b"\n" + b + b"\n", 2) == (ok[a] and ok[b]), (a, b)


def test_every_three_line_block_of_up_to_two_characters() -> None:
    """All 753,571 blocks of 3 lines of ≤2 characters over []{},:"1 and space: the proof holds iff all are records."""
    pieces = strings(2)
    ok = {p: valid(p) for p in pieces}
    for a, b, c in itertools.product(pieces, repeat=3):
        assert _lines_pass(b"%s\n%s\n%s\n" % (a, b, c), 3) == (ok[a] and ok[b] and ok[c]), (a, b, c)


def test_blocks_with_short_lines_through_check_block(path: str) -> None:
    """A sample of those blocks through check_block itself: counts and invalid numbers as per-line orjson."""
    rng = random.Random(7)
    pieces = strings(3)
    for _ in range(20_000):
        block = [rng.choice(pieces) for _ in range(rng.randint(1, 4))]
        assert fast(block) == reference(block), block


def test_join_traps_are_not_accepted(path: str) -> None:
    """Lines that only parse when joined (`[1` + `2]`, `1,2`) are judged one by one."""
    for block in ([b"[1", b"2]", b"3,4"], [b"[1],[2", b"3]"], [b'{"a":[{"b":1}', b'{"c":2}]}', b'{"x":1},{"y":2}'],
                  [b"[[1", b"],[2]]"], [b'"a', b'b"']):  # fmt: skip
        stats = fast(block)
        assert stats == reference(block)
        assert stats.invalid_lines >= 2


STRING_TRAPS = [[b'"', b'",1'], [b'1,["a', b'b"]'], [b'{"a":"x', b'y"},{"b":2}', b"3"]]


@pytest.mark.parametrize("block", STRING_TRAPS)
def test_strings_run_on_across_lines_are_not_accepted(block: list[bytes], path: str) -> None:
    """Lines that parse only when a string runs on into the next line fool A alone, not the proof."""
    joined = b"[" + b",".join(block) + b",0]"  # the proof's A: lines joined without their newlines
    assert len(yyjson.Document(joined)) == len(block) + 1  # the trap: A alone counts one value per line
    assert not _lines_pass(b"".join(line + b"\n" for line in block), len(block))
    stats = fast(block)
    assert stats == reference(block)
    assert stats.invalid_lines >= 2


# -- chunk boundaries ---------------------------------------------------------------------
TRICKY = st.lists(
    st.one_of(
        st.sampled_from(BASES),
        st.sampled_from(
            [b"[1", b"2]", b"3,4", b"", b" \r", b"1e400", b"18446744073709551616", b"\xff", deep(1025), b'"', b'",1']
        ),
        st.binary(max_size=8),
    ),
    max_size=40,
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets."""
    points = sorted({c % (len(data) + 1) for c in cuts}) if data else []
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def lines_of(data: bytes) -> list[bytes]:
    """The lines of a file: a final newline does not start a line."""
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return lines


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # path is the same for every example
@given(lines=TRICKY, newline=st.booleans(), cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_any_chunking_in_process(path: str, lines: list[bytes], newline: bool, cuts: list[int]) -> None:
    """LineChecker fed any chunking gives the per-line orjson result."""
    data = b"\n".join(line.replace(b"\n", b"") for line in lines) + (b"\n" if newline and lines else b"")
    checker = LineChecker()
    for chunk in chunked(data, cuts):
        checker.feed(chunk)
    assert checker.finish() == reference(lines_of(data))


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """asyncio, for the whole module: the shared pool below lives on one event loop."""
    return "asyncio"


@pytest.fixture(scope="module")
async def small_slot_pool() -> AsyncIterator[ValidatorPool]:
    """Two worker processes with small slots (some batches are checked inline), shared by the examples."""
    async with validator_pool(2, slot_bytes=256) as pool:
        yield pool


@pytest.mark.anyio
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=TRICKY, cuts=st.lists(st.integers(min_value=0), max_size=30))
async def test_any_chunking_through_the_worker_pool(
    small_slot_pool: ValidatorPool, lines: list[bytes], cuts: list[int]
) -> None:
    """Worker processes validating the batches give the per-line orjson result, whatever the chunking."""
    data = b"\n".join(line.replace(b"\n", b"") for line in lines)
    checker = small_slot_pool.checker()
    for chunk in chunked(data, cuts):
        await checker.feed(chunk)
    assert await checker.finish() == reference(lines_of(data))


def test_one_big_block_split_into_parts(path: str) -> None:
    """A block of many parts (mutants every 40 lines) gets the same counts and first 100 invalid numbers."""
    rng = random.Random(99)
    lines = [mutate(rng, line) if i % 40 == 0 else line for i, line in enumerate(rng.choices(BASES, k=60_000))]
    assert fast(lines) == reference(lines)


# -- the seams of the fast path (parts, cuts after a failed proof, ranges) -------------------
SEAMS = [deep(1025), deep(1024), b"\xef\xbb\xbf{}", b"18446744073709551616", b"1" * 400, b"1e400", b"[-1e400]",
         b'"\xff"', b'"\xed\xa0\x80"', b'"\\ud800"', b'"\\udc00x"', b'"a\x00b"', b"\x00", b"{}\r", b"\r",
         b"", b"   ", b" \t \r", b"[1", b"2]"]  # fmt: skip


@pytest.mark.parametrize("seam", SEAMS)
def test_a_seam_case_anywhere_in_a_big_block(seam: bytes, path: str) -> None:
    """Each seam case at the start, inside, at a part boundary and at the end of a many-part block: as orjson."""
    rng = random.Random(len(seam))
    records = rng.choices(BASES[:3], k=3000)  # ~390 KB: several 64 KiB parts, cut again where a proof fails
    for where in (0, 1, 700, 1500, 2999):
        lines = [*records[:where], seam, *records[where:]]
        assert fast(lines) == reference(lines), where


def test_final_line_without_newline(path: str) -> None:
    """A range whose last line lacks its newline (the end of a file) counts that line once, as orjson."""
    for last in (b"{}", b"[1", b"  ", b"1e400"):
        lines = [BASES[0]] * 2000 + [last]
        stats = LineStats()
        check_block(b"\n".join(lines), stats)
        assert stats == reference(lines), last


def test_a_block_of_only_invalid_and_blank_lines(path: str) -> None:
    """Garbage everywhere (every proof fails, parts are cut down to per-line): the first 100 numbers and all counts."""
    rng = random.Random(3)
    lines = [rng.choice([b"{bad", b"[1,]", b"", b" ", b"\xff", b"}{"]) for _ in range(30_000)]
    assert fast(lines) == reference(lines)


def test_check_block_reads_a_range_of_an_mmap(path: str) -> None:
    """The worker's call: a range of an mmap, checked in place, gives the counts of those lines alone."""
    lines = [BASES[i % len(BASES)] for i in range(5000)] + [b"{bad"]
    data = b"\n".join(lines) + b"\n"
    ring = mmap.mmap(-1, len(data) + 200)
    ring[100 : 100 + len(data)] = data
    stats = LineStats()
    check_block(ring, stats, 100, 100 + len(data))
    assert stats == reference(lines)


@given(
    lines=st.lists(st.integers(min_value=0, max_value=60), max_size=30), limit=st.integers(min_value=1, max_value=50)
)
def test_has_line_over_is_exact(lines: list[int], limit: int) -> None:
    """has_line_over says yes exactly when some line is longer than the limit, in a buffer and in a range of one."""
    data = b"\n".join(b"x" * n for n in lines)
    longer = any(n > limit for n in lines)
    assert has_line_over(data, limit) == longer
    assert has_line_over(b"y\n" + data + b"\ny", limit, 2, len(data) + 2) == longer  # a range of a buffer
