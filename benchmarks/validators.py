"""Line validators side by side: MB/s per core, × per-line orjson, and exactness (issue 14, §1).

For each record shape (small ~57 B lines, big ~460 B lines; ``ResultFile(size, shape)``, the
bytes `mics-export` downloads from the simulator) held in memory as 1 MiB chunks, each
approach runs over the same chunks on one core, approaches alternating every repeat:

- per-line orjson: ``orjson.loads`` per line with try/except, the old hot loop and the
  baseline (``benchmarks.throughput.perline_mb_s``, the loop throughput.py compares with);
- per-line ``map`` loops (exceptions send the chunk to a per-line loop): orjson, yyjson
  ``Document``, pysimdjson ``Parser().parse``, msgspec ``json.decode`` and msgspec
  ``Raw`` + a UTF-8 check. pysimdjson and msgspec are optional: "not installed" if missing;
- single batch: ~32 KiB of lines joined into one JSON array, one yyjson parse, the element
  count checked against the line count (per-line orjson when that fails);
- the product: ``orchestrator.ndjson.LineChecker`` fed the chunks (the download path's call):
  lines proved by parts (two yyjson parses per ~32 KiB), or one yyjson document per line when
  they are long (over ``blockcheck._LONG_LINE`` bytes on average: the big records);
- the same with the proof forced on every part (the product before long lines had their path);
- split only: ``bytes.split`` per chunk, no parse (the floor of a line-oriented design).

Exactness: every approach's verdicts over a seeded differential corpus (``--corpus`` mutated
records from both shapes and a few hand-made ones, plus edge lines: depth 1024/1025, BOM,
2**64, 2**70, 1e400, 400-digit integers, invalid UTF-8, lone surrogates, NUL, CR, blanks…,
plus join traps such as ``[1],[2`` then ``3]``, and strings run on across lines such as ``"`` then
``",1``) against per-line orjson
(``orchestrator.blockcheck.classify``). Per-line approaches are compared line by line
(record / blank / invalid); block approaches block by block (1–12 lines; line, blank and
invalid counts and the invalid line numbers), LineChecker fed each block in three pieces.

    python benchmarks/validators.py                # 64 MiB per shape, 100,000 records, 3 repeats
    python benchmarks/validators.py --repeats 5    # on a quiet machine, for the README
    python benchmarks/validators.py --quick        # smoke test: 8 MiB, 20,000 records

One file over the ~350-line guideline on purpose: the loops timed, the corpus they are judged
on and the table are read together.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import random
import shlex
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness.base import MiB, alternate, fmt_size, parse_size
from benchmarks.harness.ceiling import ceiling_chunks, ceiling_mb_s
from benchmarks.harness.report import print_footer, print_header, ratio, save_json, summarize, table
from benchmarks.throughput import perline_mb_s
from orchestrator.blockcheck import LineStats, Verdict, check_lines, classify
from orchestrator.ndjson import LineChecker

Parse = Callable[[bytes], object]
T = TypeVar("T")
R = TypeVar("R")
PART = 32 << 10
"""Single batch parses ~32 KiB of lines at once: the product's part size (bigger parts are
slower with yyjson, see orchestrator.blockcheck._PART_BYTES)."""


@dataclass(frozen=True)
class Approach:
    """A validator: its speed over chunks, and its verdicts per line or per block of lines."""

    label: str
    mb_s: Callable[[list[bytes]], float] | None  # None: not installed
    per_line: Callable[[bytes], Verdict] | None = None
    per_block: Callable[[list[bytes]], LineStats] | None = None


# -- the timed loops ------------------------------------------------------------------------
def _lines(chunks: list[bytes]) -> Iterator[tuple[bytes, list[bytes]]]:
    """Each chunk after the previous one's incomplete end, and its complete lines."""
    tail = b""
    for chunk in chunks:
        data = tail + chunk
        lines = data.split(b"\n")
        tail = lines.pop()
        yield data, lines


def _timed(fn: Callable[[list[bytes]], object], chunks: list[bytes]) -> float:
    t0 = time.perf_counter()
    fn(chunks)
    return sum(map(len, chunks)) / (time.perf_counter() - t0) / 1e6


def mapped(parse: Parse, utf8: bool = False) -> Callable[[list[bytes]], float]:
    """MB/s of ``parse`` mapped over each chunk's lines (C iteration, no Python code per line);
    an exception sends that chunk to the per-line loop. ``utf8``: a strict UTF-8 decode of
    each non-ASCII chunk first (for a parser that does not check it)."""
    judge = verdict(parse, utf8)

    def run(chunks: list[bytes]) -> None:
        for data, lines in _lines(chunks):
            try:
                if utf8 and not data.isascii():  # one C call per chunk for ASCII data
                    deque(map(bytes.decode, lines), 0)
                deque(map(parse, lines), 0)
            except Exception:  # the rare path: some line is invalid or blank
                deque(map(judge, lines), 0)

    return lambda chunks: _timed(run, chunks)


def single_batch_mb_s(chunks: list[bytes]) -> float:
    """One yyjson parse of ``[l1,l2,…]`` per ~32 KiB of lines, count-checked (inexact: lines join)."""
    batch = single_batch()

    def run(chunks: list[bytes]) -> None:
        tail = b""
        for chunk in chunks:
            data = tail + chunk
            cut = data.rfind(b"\n") + 1
            tail, start = data[cut:], 0
            while start < cut:
                stop = data.find(b"\n", start + PART, cut) + 1 or cut
                batch(data[start : stop - 1].split(b"\n"))
                start = stop

    return _timed(run, chunks)


def split_only_mb_s(chunks: list[bytes]) -> float:
    """Lines cut out and dropped: what any line-oriented validator pays before parsing."""
    return _timed(lambda chunks: deque(_lines(chunks), 0), chunks)


# -- the verdicts ---------------------------------------------------------------------------
def verdict(parse: Parse, utf8: bool = False) -> Callable[[bytes], Verdict]:
    """One line's verdict by ``parse``: record when it returns, else blank or invalid as the oracle says."""

    def judge(line: bytes) -> Verdict:
        try:
            if utf8:
                line.decode()
            parse(line)
        except Exception:  # any refusal (parsers raise ValueError, RuntimeError, RecursionError…)
            return "invalid" if line.strip() else "blank"
        return "record"

    return judge


def single_batch() -> Callable[[list[bytes]], LineStats]:
    """Single batch over a list of lines: all records when ``[l1,…,ln]`` has n elements, else per line."""
    import yyjson

    document = yyjson.Document

    def check(lines: list[bytes]) -> LineStats:
        stats = LineStats()
        try:
            if len(document(b"[" + b",".join(lines) + b"]")) == len(lines):
                stats.lines = len(lines)
                return stats
        except ValueError:
            pass
        check_lines(lines, stats)
        return stats

    return check


def line_checker(lines: list[bytes]) -> LineStats:
    """The download path's call: LineChecker fed the block in three pieces cut mid-line."""
    data = b"\n".join(lines) + b"\n"
    checker = LineChecker()
    for a, b in ((0, len(data) // 3), (len(data) // 3, 2 * len(data) // 3), (2 * len(data) // 3, len(data))):
        checker.feed(data[a:b])
    return checker.finish()


def proof_only(fn: Callable[[T], R]) -> Callable[[T], R]:
    """``fn`` with blockcheck's per-line path off: every part proved by the two parses."""
    from orchestrator import blockcheck

    def run(arg: T) -> R:
        saved, blockcheck._LONG_LINE = blockcheck._LONG_LINE, 1 << 62
        try:
            return fn(arg)
        finally:
            blockcheck._LONG_LINE = saved

    return run


def approaches() -> dict[str, Approach]:
    """Every approach; the optional libraries are imported here, lazily."""
    import orjson
    import yyjson

    out = {
        "orjson": Approach("per-line `orjson.loads` loop (baseline, the oracle)", perline_mb_s, classify),
        "orjson_map": Approach("`orjson.loads`, per line (`map`)", mapped(orjson.loads), verdict(orjson.loads)),
        "yyjson": Approach("yyjson `Document`, per line (`map`)", mapped(yyjson.Document), verdict(yyjson.Document)),
    }
    simdjson = _optional("simdjson")
    parser = simdjson.Parser() if simdjson else None
    parse = parser.parse if parser else None
    out["simdjson"] = Approach(
        "pysimdjson `Parser().parse`, per line (`map`)", parse and mapped(parse), parse and verdict(parse)
    )
    msgspec = _optional("msgspec")
    decode = msgspec.json.decode if msgspec else None
    raw = msgspec.json.Decoder(msgspec.Raw).decode if msgspec else None
    out["msgspec"] = Approach(
        "msgspec `json.decode`, per line (`map`)", decode and mapped(decode), decode and verdict(decode)
    )
    out["msgspec_raw"] = Approach(
        "msgspec `Raw` + UTF-8 check, per line (`map`)", raw and mapped(raw, utf8=True), raw and verdict(raw, utf8=True)
    )
    batch = "single batch: ~32 KiB of lines as one array, yyjson, count check"
    out["batch"] = Approach(batch, single_batch_mb_s, per_block=single_batch())
    out["product"] = Approach("the product: `LineChecker.feed` (blockcheck)", ceiling_mb_s, per_block=line_checker)
    out["proof"] = Approach(
        "the product with every part proved (no per-line path)",
        proof_only(ceiling_mb_s),
        per_block=proof_only(line_checker),
    )
    out["split"] = Approach("split only, no parse (the floor)", split_only_mb_s)
    return out


def _optional(name: str) -> Any:
    """The module, or None when it is not installed (pysimdjson and msgspec are not dependencies)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# -- the differential corpus ----------------------------------------------------------------
def deep(levels: int) -> bytes:
    """A valid line nested ``levels`` deep (orjson accepts 1024, refuses 1025)."""
    half = levels // 2
    return b'{"a":' * half + b"[" * (levels - half) + b"1" + b"]" * (levels - half) + b"}" * half


EDGES: dict[str, list[bytes]] = {
    "depth 1024": [deep(1024)],
    "depth 1025": [deep(1025), b"[" * 1025 + b"]" * 1025],
    "BOM": [b"\xef\xbb\xbf{}", b'\xef\xbb\xbf{"a":1}'],
    "beyond 64 bits": [str(2**64).encode(), b"[-%d]" % (2**63 + 1)],
    "2**70": [str(2**70).encode(), b'{"n":%d}' % 2**70],
    "400-digit integer": [b"1" * 400, b"[" + b"9" * 400 + b"]"],
    "double overflow (1e400)": [b"1e400", b"[-1e400]", b"1.7976931348623159e308", b"1e-400"],
    "invalid UTF-8": [b'"\xff"', b'"\xc3"', b'"\xc0\x80"', b'"\xf4\x90\x80\x80"', b'{"a":"\xff"}'],
    "UTF-8 surrogate": [b'"\xed\xa0\x80"', b'{"a":"\xed\xb0\x80"}'],
    "lone surrogate escape": [b'"\\ud800"', b'"\\udc00x"', b'{"a":"\\ud83d"}', b'"\\ud83d\\ude00"'],
    "NUL": [b'"a\x00b"', b"\x00", b"{}\x00", b'{"a":"\x00"}'],
    "CR": [b"{}\r", b"\r", b"\r{}", b'{"a":1}\r'],
    "blank": [b"", b"   ", b" \t\r", b"\x0b", b"\x0c{}"],
    "control character": [b'"\x1f"', b'"\x7f"', b'"\t"'],
    "not JSON": [b"NaN", b"[Infinity]", b"[1,]", b'{"a":1,}', b"01", b"{} x", b"[1] [2]", b"tru"],
}
TRAPS = [[b"[1],[2", b"3]"], [b"[1", b"2]"], [b"[1", b"2]", b"3,4"], [b'{"a":[{"b":1}', b'{"c":2}]}'],
         [b'"a', b'b"'], [b"[[1", b"],[2]]"], [b'{"a":1', b'"b":2}'], [b"1,2", b"3"]]  # fmt: skip
STRING_TRAPS = [[b'"', b'",1'], [b'1,["a', b'b"]'], [b'{"a":"x', b'y"},{"b":2}', b"3"]]
"""Lines that parse only when a string opened in one runs on into the next: they fool any
document that joins lines without their newlines (the product's A, ``[`` L1 ``,`` L2 … ``]``,
and the single batch); a raw newline inside a string is an error, which B keeps."""
HAND_MADE = [
    b'{"a":[1,2.5,-3e10,true,false,null],"b":{"c":"caf\xc3\xa9 \\u00e9 \\ud83d\\ude00 \\n\\"x"}}',
    b"[1,[2,[3,[4]]],{}]",
    b'"just a string"',
    b' {"k" : [ 1 , 2 ] } \r',
]
ALPHABET = b'[]{},:"1 \\u\ne.-0\r\t\x00\xc3\xa9\xff'
SNIPPETS = [(name, line) for name, lines in EDGES.items() for line in lines if len(line) < 100]
Line = tuple[bytes, str]  # a line and what it is: "record", "mutant", an EDGES name, "join trap", "string across lines"


def mutate(rng: random.Random, line: bytes) -> tuple[list[bytes], str]:
    """One to three edits (delete, insert, replace a byte; splice an edge snippet; truncate); an
    inserted newline splits the line, as it would in a stream. Also what the result is: "mutant",
    or "mutant + <edge>" when an edge line was spliced in."""
    what = "mutant"
    for _ in range(rng.randint(1, 3)):
        pos, kind = rng.randint(0, len(line)), rng.randrange(5)
        if kind == 0:
            line = line[:pos] + line[pos + 1 :]
        elif kind == 1:
            line = line[:pos] + ALPHABET[rng.randrange(len(ALPHABET)) :][:1] + line[pos:]
        elif kind == 2:
            line = line[:pos] + ALPHABET[rng.randrange(len(ALPHABET)) :][:1] + line[pos + 1 :]
        elif kind == 3:
            name, snippet = rng.choice(SNIPPETS)
            line, what = line[:pos] + snippet + line[pos:], f"mutant + {name}"
        else:
            line = line[:pos]
    return line.split(b"\n"), what


def corpus(records: int, seed: int = 20240614) -> list[list[Line]]:
    """Blocks of 1–12 lines: ``records`` records (35% mutated), then every edge line, join trap
    and string trap alone, first, in the middle and last among records; shuffled (seeded)."""
    from orchestrator.simulator.data import ResultFile

    rng = random.Random(seed)
    bases = HAND_MADE + [
        line for shape in ("small", "big") for line in ResultFile(256 << 10, shape).read_all().split(b"\n")[:300]
    ]
    blocks: list[list[Line]] = []
    done = 0
    while done < records:
        block: list[Line] = []
        for _ in range(rng.randint(1, 12)):
            base = rng.choice(bases)
            if rng.random() < 0.35:
                lines, what = mutate(rng, base)
                block += [(x, what) for x in lines]
            else:
                block.append((base, "record"))
        blocks.append(block)
        done += len(block)
    specials = [[(x, name)] for name, lines in EDGES.items() for x in lines]
    specials += [[(x, "join trap") for x in trap] for trap in TRAPS]
    specials += [[(x, "string across lines") for x in trap] for trap in STRING_TRAPS]
    for special in specials:
        rec = [(rng.choice(bases), "record") for _ in range(4)]
        blocks += [special, special + rec[:2], rec[:2] + special + rec[2:], rec + special]
    rng.shuffle(blocks)
    return blocks


def _short(data: bytes, room: int = 24) -> str:
    text = repr(data)[2:-1]
    return f"`{text[:room]}…`" if len(text) > room else f"`{text}`"


def _counts(stats: LineStats) -> str:
    return f"{stats.records} rec/{stats.blank_lines} blank/{stats.invalid_lines} inv"


Disagreements = tuple[Counter[str], dict[str, str], int]
"""How many disagree by kind, the first disagreement of each kind described, and how many were judged."""


def line_disagreements(judge: Callable[[bytes], Verdict], blocks: list[list[Line]]) -> Disagreements:
    """Per-line verdicts against per-line orjson, line by line."""
    kinds: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for line, what in (item for block in blocks for item in block):
        got, want = judge(line), classify(line)
        if got != want:
            kinds[what] += 1
            examples.setdefault(what, f"{what} {_short(line)}: {got}, orjson {want}")
    return kinds, examples, sum(map(len, blocks))


def block_disagreements(check: Callable[[list[bytes]], LineStats], blocks: list[list[Line]]) -> Disagreements:
    """A block validator's counts and invalid line numbers against per-line orjson, block by block."""
    kinds: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for block in blocks:
        lines = [line for line, _ in block]
        want = LineStats()
        check_lines(lines, want)
        got = check(lines)
        if got != want:
            what = ", ".join(sorted({w for _, w in block if w != "record"})) or "records"
            kinds[what] += 1
            odd = b" / ".join(line for line, w in block if w != "record") or lines[0]
            examples.setdefault(what, f"{what} {_short(odd)}: {_counts(got)}, orjson {_counts(want)}")
    return kinds, examples, len(blocks)


def exactness(approach: Approach, blocks: list[list[Line]]) -> tuple[str, list[str]]:
    """The exactness cell ("yes", "no: N … (e.g. the most frequent kind)", "—") and, per kind of
    disagreement, its count and first example."""
    if approach.per_line is not None:
        (kinds, examples, total), unit = line_disagreements(approach.per_line, blocks), "lines"
    elif approach.per_block is not None:
        (kinds, examples, total), unit = block_disagreements(approach.per_block, blocks), "blocks"
    else:
        return "—", []
    if not kinds:
        return "yes", []
    cell = f"no: {kinds.total():,} of {total:,} {unit} disagree (e.g. {examples[kinds.most_common(1)[0][0]]})"
    return cell, [f"{n:,} × {examples[what]}" for what, n in kinds.most_common()]


# -- the run ---------------------------------------------------------------------------------
SHAPES = ("small", "big")


def measure(apps: dict[str, Approach], size: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """MB/s samples per shape and approach: the same chunks for all, approaches alternating."""
    samples: dict[str, dict[str, list[float]]] = {}
    for shape in SHAPES:
        chunks = ceiling_chunks(size, shape)
        runnable = {k: a.mb_s for k, a in apps.items() if a.mb_s is not None}
        samples[shape] = {k: [] for k in runnable}
        for rep, k in alternate(list(runnable), repeats):
            gc.collect()
            samples[shape][k].append(runnable[k](chunks))
            print(f"  [{shape} rep {rep + 1}] {k:12s} {samples[shape][k][-1]:8.1f} MB/s", file=sys.stderr, flush=True)
        del chunks
    return samples


def parser() -> argparse.ArgumentParser:
    """The flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=None, help="bytes per shape held in memory (default 64M)")
    p.add_argument(
        "--corpus", type=int, default=None, help="mutated records in the differential corpus (default 100000)"
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per approach and shape, alternating (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke test: 8 MiB per shape, 20,000 records")
    p.add_argument("--json", action="store_true", help="save raw results under benchmarks/results/")
    return p


def main() -> None:
    args = parser().parse_args()
    size = args.size or (8 * MiB if args.quick else 64 * MiB)
    n_corpus = args.corpus or (20_000 if args.quick else 100_000)
    repeats = max(1, args.repeats)
    meta = print_header(f"validators: MB/s on one core over {fmt_size(size)} per shape in memory, and exactness")
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"repeats: {repeats} per approach and shape, alternating; corpus: {n_corpus:,} mutated records + edges\n")
    apps = approaches()
    samples = measure(apps, size, repeats)
    t0 = time.perf_counter()
    blocks = corpus(n_corpus)
    exact = {k: exactness(a, blocks) for k, a in apps.items()}
    print(f"  [exactness] {sum(map(len, blocks)):,} lines in {len(blocks):,} blocks, "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)  # fmt: skip
    rows = []
    for k, a in apps.items():
        cells: list[str] = []
        for shape in SHAPES:
            mine, base = samples[shape].get(k, []), samples[shape]["orjson"]
            if a.mb_s is None:
                cells += ["not installed", ""]
            else:
                cells += [summarize(mine).fmt(0), ratio(mine, base).fmt(2, "×")]
        rows.append((a.label, *cells, "not installed" if a.mb_s is None else exact[k][0]))
    headers = ("approach", "small MB/s", "small × orjson", "big MB/s", "big × orjson", "exact vs per-line orjson?")
    print(f"## {fmt_size(size)} per shape, MB/s median (min–max) of {repeats}; × the per-line orjson loop, same run\n")
    print(table(headers, rows))
    print(f"\nDisagreements by kind ({sum(map(len, blocks)):,} lines in {len(blocks):,} blocks of 1–12 lines):\n")
    for k, a in apps.items():
        if exact[k][1]:
            print(f"- {a.label}:\n" + "".join(f"  - {kind}\n" for kind in exact[k][1]), end="")
    print_footer()
    if args.json:
        result = {"machine": meta, "size": size, "corpus": n_corpus, "repeats": repeats, "mb_s": samples}
        result["exact"] = {k: {"cell": cell, "kinds": kinds} for k, (cell, kinds) in exact.items()}
        save_json("validators" + ("-quick" if args.quick else ""), result)


if __name__ == "__main__":
    main()
