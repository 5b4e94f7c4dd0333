"""The line checker: counts that do not depend on how the bytes were chunked.

The property through worker processes uses one pool for the whole module (starting two
processes per hypothesis example cost seconds); each example gets its own checker on it,
which is how concurrent downloads share the run's pool.
"""

from __future__ import annotations

import io
import mmap
import subprocess
import sys
from array import array
from collections.abc import AsyncIterator

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.ndjson import (
    MAX_INVALID_LINE_NUMBERS,
    LineChecker,
    LineStats,
    LineTooLongError,
    Split,
    classify,
    split_chunk,
)
from orchestrator.validate_worker import REQUEST, RESPONSE, serve
from orchestrator.workers import ValidatorPool, validator_pool

LINES = st.lists(
    st.one_of(
        st.just(b""),
        st.just(b"   \r"),
        st.just(b'{"emails":[{"id":"1"}]}'),
        st.just(b'{"a":1}\r'),
        st.just(b"[1,2,3]"),
        st.just(b"1,2"),  # not one JSON value: invalid
        st.just(b'{"broken":'),
        st.just(b'"caf\xc3\xa9"'),
        st.just(b'"\xff"'),  # not UTF-8: invalid
        st.binary(max_size=12),
    ),
    max_size=60,
)


def reference(data: bytes) -> LineStats:
    """An obviously-correct recount: split everything at once, parse line by line."""
    stats = LineStats()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for number, line in enumerate(lines, 1):
        stats.lines += 1
        if not line.strip():
            stats.blank_lines += 1
            continue
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError:
            stats.invalid_lines += 1
            if len(stats.invalid_line_numbers) < MAX_INVALID_LINE_NUMBERS:
                stats.invalid_line_numbers.append(number)
    return stats


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (sorted, deduplicated, within bounds)."""
    points = sorted({c % (len(data) + 1) for c in cuts}) if data else []
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return out


@given(lines=LINES, trailing_newline=st.booleans(), cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_any_chunking_gives_the_same_counts(lines: list[bytes], trailing_newline: bool, cuts: list[int]) -> None:
    """Whatever the chunk boundaries, lines, records, blanks and invalid line numbers are the same."""
    data = b"\n".join(line.replace(b"\n", b"") for line in lines) + (b"\n" if trailing_newline and lines else b"")
    checker = LineChecker()
    for chunk in chunked(data, cuts):
        checker.feed(chunk)
    assert checker.finish() == reference(data)


LONG_LINES = st.lists(
    st.one_of(
        LINES.flatmap(lambda ls: st.just(b"".join(ls).replace(b"\n", b""))),
        st.integers(min_value=0, max_value=400).map(lambda n: b'"' + b"x" * n + b'"'),  # long and valid
        st.integers(min_value=0, max_value=400).map(lambda n: b"{" + b"y" * n),  # long and invalid
        st.integers(min_value=0, max_value=400).map(lambda n: b" " * n),  # long and blank
    ),
    max_size=30,
)


@given(
    lines=LONG_LINES,
    trailing_newline=st.booleans(),
    cuts=st.lists(st.integers(min_value=0), max_size=40),
    defer_over=st.integers(min_value=1, max_value=300),
)
def test_any_chunking_gives_the_same_counts_with_long_lines(
    lines: list[bytes], trailing_newline: bool, cuts: list[int], defer_over: int
) -> None:
    """Lines held back over many chunks, or deferred for checking elsewhere, count exactly as in one piece."""
    data = b"\n".join(lines) + (b"\n" if trailing_newline and lines else b"")
    checker = LineChecker(max_line_bytes=1 << 20, defer_over=defer_over)
    for chunk in chunked(data, cuts):
        checker.feed(chunk)
    stats = checker.finish()
    for number, pieces in checker.take_deferred():
        assert len(b"".join(pieces)) > defer_over
        stats.settle(number, classify(b"".join(pieces)))
    assert stats == reference(data)


def test_first_hundred_invalid_line_numbers_are_kept() -> None:
    """Only the first 100 invalid line numbers are listed, all invalid lines are counted."""
    data = b"".join(b"{bad\n" if i % 3 == 0 else b"{}\n" for i in range(1000))
    checker = LineChecker()
    checker.feed(data)
    stats = checker.finish()
    assert stats.invalid_lines == 334
    assert stats.invalid_line_numbers == [i * 3 + 1 for i in range(100)]
    assert stats.records == 1000 - 334


def test_last_line_without_newline_counts() -> None:
    """A final line with no newline is still a line (and a record if it parses)."""
    checker = LineChecker()
    checker.feed(b'{"a":1}\n{"b"')
    checker.feed(b":2}")
    stats = checker.finish()
    assert (stats.lines, stats.records, stats.invalid_lines) == (2, 2, 0)


def test_merge_offsets_line_numbers() -> None:
    """Merging stats of consecutive batches shifts the second batch's line numbers."""
    first = LineStats(lines=10, invalid_lines=1, invalid_line_numbers=[4])
    first.merge(LineStats(lines=5, blank_lines=1, invalid_lines=2, invalid_line_numbers=[1, 5]))
    assert first == LineStats(lines=15, blank_lines=1, invalid_lines=3, invalid_line_numbers=[4, 11, 15])


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """asyncio, for the whole module: the shared pool below lives on one event loop."""
    return "asyncio"


@pytest.fixture(scope="module")
async def tiny_slot_pool() -> AsyncIterator[ValidatorPool]:
    """Two worker processes with tiny slots (oversize batches too), shared by the module's examples."""
    async with validator_pool(2, slot_bytes=64) as pool:
        yield pool


@pytest.mark.anyio
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=LINES, cuts=st.lists(st.integers(min_value=0), max_size=20))
async def test_worker_pool_agrees_with_the_inline_checker(
    tiny_slot_pool: ValidatorPool, lines: list[bytes], cuts: list[int]
) -> None:
    """Batches validated by worker processes merge, in order, to exactly the inline result."""
    data = b"\n".join(line.replace(b"\n", b"") for line in lines)
    checker = tiny_slot_pool.checker()
    for chunk in chunked(data, cuts):
        await checker.feed(chunk)
    assert await checker.finish() == reference(data)


@pytest.mark.anyio
async def test_worker_pool_serves_concurrent_downloads_in_order() -> None:
    """Several downloads sharing the pool each get their own exact counts."""
    import anyio

    payloads = [b"".join(b"{bad\n" if (i * k) % 7 == 0 else b'{"i":%d}\n' % i for i in range(5000)) for k in (1, 2, 3)]
    results: dict[int, LineStats] = {}
    async with validator_pool(2) as pool:

        async def one(k: int) -> None:
            checker = pool.checker()
            data = payloads[k]
            for start in range(0, len(data), 7001):
                await checker.feed(data[start : start + 7001])
            results[k] = await checker.finish()

        async with anyio.create_task_group() as tg:
            for k in range(3):
                tg.start_soon(one, k)
        assert pool.batches > 3
    for k in range(3):
        assert results[k] == reference(payloads[k])


def test_split_chunk_says_which_bytes_end_the_held_line_which_are_lines_and_which_are_held() -> None:
    """The one place that cuts chunks: held-line end, complete lines, incomplete end, in two C calls."""
    assert split_chunk(b'1}\n{"a":1}\n{"b', holding=True) == Split(2, 3, 11)
    assert split_chunk(b'{"a":1}\n{"b', holding=False) == Split(-1, 0, 8)
    assert split_chunk(b"no newline", holding=True) == Split(-1, 0, 0)
    assert split_chunk(b"end\n", holding=True) == Split(3, 4, 4)


def test_worker_checks_requested_slots_in_place() -> None:
    """The worker loop answers each request with the counts and invalid numbers of its slot alone."""
    ring = mmap.mmap(-1, 4096)
    ring[0:16] = b'{"a":1}\n{bad\n  \n'
    ring[1000:1011] = b"[1]\n[2\n[3]\n"
    requests = io.BytesIO(REQUEST.pack(0, 16, 7) + REQUEST.pack(1000, 11, 8))
    answers = io.BytesIO()
    serve(ring, requests, answers)
    out = answers.getvalue()
    first, second = RESPONSE.unpack_from(out, 0), RESPONSE.unpack_from(out, RESPONSE.size + 4)
    assert first == (7, 0, 3, 1, 1, 1) and out[RESPONSE.size : RESPONSE.size + 4] == array("I", [2]).tobytes()
    assert second == (8, 1000, 3, 0, 1, 1) and out[-4:] == array("I", [2]).tobytes()


def test_the_worker_process_imports_neither_anyio_nor_the_pool() -> None:
    """A worker process starts light: its module pulls in neither anyio nor orchestrator.workers."""
    code = (
        "import sys, orchestrator.validate_worker; print(sorted({'anyio', 'orchestrator.workers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.anyio
@pytest.mark.parametrize("workers", [0, 2])
async def test_a_too_long_end_of_a_chunk_is_numbered_after_the_lines_before_it(workers: int) -> None:
    """A line over max_line_bytes that starts in the chunk of complete lines before it gets its own number."""
    data = b'{"a":1}\n' * 3 + b'"' + b"x" * 1500
    too_long = pytest.raises(LineTooLongError, match=r"line 4 is longer than max_line_bytes=1000")
    if workers:
        async with validator_pool(workers) as pool:
            with too_long:
                await pool.checker(max_line_bytes=1000).feed(data)
    else:
        with too_long:
            LineChecker(max_line_bytes=1000).feed(data)
