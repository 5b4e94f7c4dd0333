"""check_block's second path: long lines parsed one yyjson document per line.

The path rests on one claim (point 5 of orchestrator.blockcheck's docstring): a line that
yyjson accepts alone is a line orjson accepts, except deeper than 1024 levels, which the
path asks of orjson. A refusal is never a verdict (orjson decides), so only acceptance is
tested here; tests/test_validator_diff.py runs its whole differential suite on both paths.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import orjson
import pytest
import yyjson

from orchestrator import blockcheck
from orchestrator.blockcheck import LineStats, check_block


def orjson_accepts(line: bytes) -> bool:
    """The oracle's record verdict for one line."""
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


def yyjson_accepts(line: bytes) -> bool:
    """What the per-line path asks: does one yyjson document of the line parse?"""
    try:
        yyjson.Document(line)
    except ValueError:
        return False
    return True


def test_every_line_of_up_to_five_characters() -> None:
    """All 66,430 lines of ≤5 characters over []{},:"1 and space, with and without newline: as orjson."""
    for n in range(6):
        for chars in itertools.product(b'[]{},:"1 ', repeat=n):
            line = bytes(chars)
            for text in (line, line + b"\n"):  # the path's lines keep their newline
                assert yyjson_accepts(text) == orjson_accepts(text), text


def test_bytes_in_strings_and_edges() -> None:
    """Every 2-byte sequence in a string, and the properties the grammar does not see: yyjson alone as orjson."""
    cases = [b'{"k":"' + bytes([a, b]) + b'"}' for a in range(0x80, 0x100) for b in range(0x100)]
    cases += [b"1e400", b"[-1e400]", b"1e-400", b"18446744073709551616", b"-9223372036854775809", b"1" * 400,
              b'"\\ud800"', b'"\\udc00x"', b'"\\ud83d\\ude00"', b"\xef\xbb\xbf{}", b'"\xed\xa0\x80"', b"\x00",
              b"{}\x00", b'"a\x00b"', b"{}\r", b"\r{}", b"\x0b", b"\x0c{}", b"NaN", b"[Infinity]", b"01", b"-0",
              b"1.", b".5", b'"\\x"', b'"\\u12"', b'"\x7f"', b'"\x1f"', b"tru", b"nulll", b"[1] [2]"]  # fmt: skip
    for case in cases:
        assert yyjson_accepts(case) == orjson_accepts(case), case


def test_depth_is_the_one_difference_and_is_settled_by_orjson() -> None:
    """yyjson accepts 1025 levels, orjson does not: the per-line path counts that line invalid."""
    deep = b"[" * 1025 + b"]" * 1025
    assert yyjson_accepts(deep) and not orjson_accepts(deep)
    record = b'{"id":"' + b"x" * 300 + b'"}'  # long lines: the per-line path
    stats = LineStats()
    check_block(b"\n".join([record, deep, record, b"[" * 1024 + b"]" * 1024]) + b"\n", stats)
    assert (stats.lines, stats.invalid_lines, stats.invalid_line_numbers) == (4, 1, [2])


def spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Record the size of each part given to blockcheck's ``name``, then call it."""
    sizes: list[int] = []
    real: Callable[[bytes, LineStats], None] = getattr(blockcheck, name)

    def wrapper(part: bytes, stats: LineStats) -> None:
        sizes.append(len(part))
        real(part, stats)

    monkeypatch.setattr(blockcheck, name, wrapper)
    return sizes


@pytest.mark.parametrize(("length", "path"), [(57, "_check_part"), (120, "_check_part"), (300, "_check_each"),
                                              (2000, "_check_each")])  # fmt: skip
def test_the_path_is_chosen_by_line_length(monkeypatch: pytest.MonkeyPatch, length: int, path: str) -> None:
    """Lines shorter than _LONG_LINE on average are proved by parts, longer ones parsed one by one."""
    each, proof = spy(monkeypatch, "_check_each"), spy(monkeypatch, "_check_part")
    line = b'{"k":"' + b"x" * (length - 8) + b'"}'
    stats = LineStats()
    check_block((line + b"\n") * 500, stats)
    assert stats.records == 500
    assert (each if path == "_check_each" else proof) and not (proof if path == "_check_each" else each)


def test_only_the_refused_lines_go_to_orjson(monkeypatch: pytest.MonkeyPatch) -> None:
    """Invalid and blank long-line blocks: counts and numbers are orjson's, and orjson sees only the refused lines."""
    judged: list[bytes] = []
    real = blockcheck.classify

    def spying(line: bytes) -> blockcheck.Verdict:
        judged.append(line)
        return real(line)

    monkeypatch.setattr(blockcheck, "classify", spying)
    record = b'{"id":"' + b"x" * 400 + b'"}'
    lines = [record] * 1000
    lines[600] = record[:-1]
    lines[700] = b"   "
    lines[800] = b"[" * 1025 + b"]" * 1025  # accepted by yyjson: settled by the depth check, not here
    stats = LineStats()
    check_block(b"\n".join(lines), stats)  # no final newline: the last line still counts
    assert (stats.lines, stats.blank_lines, stats.invalid_lines) == (1000, 1, 2)
    assert stats.invalid_line_numbers == [601, 801]
    assert [line.strip() for line in judged] == [record[:-1], b""]
