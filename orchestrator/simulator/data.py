"""Deterministic NDJSON result files of any size, never held in memory.

A result file is a sequence of fixed-size *blocks* (``BLOCK`` bytes, line-aligned).
Block ``i`` is one of ``TEMPLATES`` pre-generated templates, chosen by ``(seed + i)``,
and the file ends with a line-aligned prefix of the next template. So a 4 GiB file costs
a few MiB of templates, any byte range can be served without generating what precedes
it (HTTP ``Range``), and the byte, line, record and invalid-line counts are arithmetic
over per-template tables. Only the sha256 needs a pass over the bytes; it is computed
on demand by streaming and cached.

``size_bytes`` is a target: the file is the smallest line-aligned size at or above it
(0 gives an empty file).
"""

from __future__ import annotations

import bisect
import hashlib
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, cached_property

import orjson

BLOCK = 1 << 20
"""Bytes per block (1 MiB): big enough to write in one call, small enough to cache."""

TEMPLATES = 4
"""Distinct block templates per shape; blocks rotate through them."""

SHAPES = ("small", "user", "big")
"""Record shapes: ~55-byte email records, ~150-byte user points, ~500-byte profiles."""

_BLANK, _RECORD, _INVALID = 0, 1, 2


def check_shape(shape: str, invalid_every: int, blank_every: int) -> None:
    """Refuse settings that would silently serve something else (a typo in a shape name)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} (one of {', '.join(SHAPES)})")
    if invalid_every < 0 or blank_every < 0:
        raise ValueError("invalid_every and blank_every must be >= 0 (0: never)")


def _record(rng: random.Random, shape: str) -> dict[str, object]:
    upid = f"up-{rng.randrange(10**9, 10**10)}"
    emails = [{"id": str(rng.randrange(10**19, 10**20))} for _ in range(rng.choice((0, 1, 1, 1)))]
    if shape == "small":
        return {"id": upid, "emails": emails}
    segments = [{"id": str(rng.randrange(1000, 99999))} for _ in range(rng.randrange(1, 4))]
    if shape == "user":
        return {"user_point_id": upid, "emails": emails, "segments": segments}
    return {
        "user_point_id": upid,
        "creation_ts": 1_600_000_000_000 + rng.randrange(10**11),
        "emails": [
            {"id": e["id"], "hash": f"{rng.getrandbits(128):032x}", "consent": rng.random() < 0.7} for e in emails
        ],
        "profile": {
            "gender": rng.choice(("F", "M", None)),
            "age_bucket": rng.choice(("18-24", "25-34", "35-44", "45-54", "55+")),
            "city": rng.choice(("Paris", "Lyon", "Nantes", "Lille", "Bordeaux", "Marseille")),
            "loyalty": {
                "tier": rng.choice(("gold", "silver", "none")),
                "points": rng.randrange(10**5),
            },
        },
        "segments": segments + [{"id": str(rng.randrange(1000, 99999))} for _ in range(3)],
        "activities": [
            {
                "type": rng.choice(("SITE_VISIT", "APP_VISIT", "EMAIL_OPEN")),
                "ts": 1_700_000_000_000 + rng.randrange(10**10),
                "channel_id": str(rng.randrange(100, 999)),
            }
            for _ in range(2)
        ],
    }


@dataclass(frozen=True, slots=True)
class _Template:
    """One block: its bytes and, per line, where it ends and what it is."""

    data: bytes
    ends: list[int]  # offset just past each line's b"\n"
    records: list[int]  # cumulative counts up to and including each line
    invalid: list[int]
    invalid_idx: list[int]  # 0-based line indexes of invalid lines


@cache
def _template(shape: str, invalid_every: int, blank_every: int, k: int) -> _Template:
    """Generate template ``k``: exactly BLOCK bytes of whole lines."""
    rng = random.Random(f"{shape}/{k}")
    parts: list[bytes] = []
    ends: list[int] = []
    kinds: list[int] = []
    size = 0
    while True:
        n = len(kinds) + 1
        if blank_every and n % blank_every == 0:
            line, kind = b"\n", _BLANK
        else:
            body = orjson.dumps(_record(rng, shape))
            if invalid_every and n % invalid_every == 0:
                line, kind = body[: len(body) // 2] + b"\n", _INVALID
            else:
                line, kind = body + b"\n", _RECORD
        if size + len(line) + 64 > BLOCK:
            break
        parts.append(line)
        size += len(line)
        ends.append(size)
        kinds.append(kind)
    # One padding record fills the block exactly, so every block is line-aligned.
    pad = BLOCK - size - len(b'{"pad":""}\n')
    parts.append(b'{"pad":"' + b"x" * pad + b'"}\n')
    ends.append(BLOCK)
    kinds.append(_RECORD)
    records, invalid, invalid_idx = [], [], []
    r = i = 0
    for idx, kind in enumerate(kinds):
        r += kind == _RECORD
        i += kind == _INVALID
        if kind == _INVALID:
            invalid_idx.append(idx)
        records.append(r)
        invalid.append(i)
    data = b"".join(parts)
    assert len(data) == BLOCK
    return _Template(data, ends, records, invalid, invalid_idx)


@dataclass(frozen=True)
class ResultFile:
    """A deterministic NDJSON file: its counts, its bytes by range, its sha256."""

    size_bytes: int
    shape: str = "small"
    seed: int = 0
    invalid_every: int = 0
    blank_every: int = 0

    def __post_init__(self) -> None:
        check_shape(self.shape, self.invalid_every, self.blank_every)

    def _tpl(self, block: int) -> _Template:
        return _template(self.shape, self.invalid_every, self.blank_every, (self.seed + block) % TEMPLATES)

    @cached_property
    def _layout(self) -> tuple[int, int]:
        """(number of full blocks, bytes of the final partial block)."""
        full, rest = divmod(max(0, self.size_bytes), BLOCK)
        if rest == 0:
            return full, 0
        tpl = self._tpl(full)
        return full, tpl.ends[bisect.bisect_left(tpl.ends, rest)]

    @property
    def size(self) -> int:
        """Exact size of the file in bytes."""
        full, rest = self._layout
        return full * BLOCK + rest

    def _counts(self, which: str) -> int:
        full, rest = self._layout
        total = 0
        for k in range(TEMPLATES):
            # Blocks rotate with period TEMPLATES: how many of the full ones use template k.
            n_blocks = full // TEMPLATES + (1 if (k - self.seed) % TEMPLATES < full % TEMPLATES else 0)
            if n_blocks:
                tpl = _template(self.shape, self.invalid_every, self.blank_every, k)
                total += n_blocks * (len(tpl.ends) if which == "lines" else getattr(tpl, which)[-1])
        if rest:
            tpl = self._tpl(full)
            idx = tpl.ends.index(rest)
            total += idx + 1 if which == "lines" else getattr(tpl, which)[idx]
        return total

    @property
    def lines(self) -> int:
        """Lines in the file (every line ends with a newline)."""
        return self._counts("lines")

    @property
    def records(self) -> int:
        """Non-empty lines that parse as JSON."""
        return self._counts("records")

    @property
    def invalid_lines(self) -> int:
        """Non-empty lines that do not parse as JSON."""
        return self._counts("invalid")

    def invalid_line_numbers(self, limit: int = 100) -> list[int]:
        """The first ``limit`` invalid lines, 1-based, counting every line."""
        out: list[int] = []
        if not self.invalid_every:
            return out
        full, rest = self._layout
        base = 0
        for block in range(full + (1 if rest else 0)):
            tpl = self._tpl(block)
            n_lines = len(tpl.ends) if block < full else tpl.ends.index(rest) + 1
            for idx in tpl.invalid_idx:
                if idx >= n_lines:
                    break
                out.append(base + idx + 1)
                if len(out) >= limit:
                    return out
            base += n_lines
        return out

    def iter_chunks(self, start: int = 0, chunk: int = BLOCK) -> Iterator[memoryview]:
        """The file's bytes from ``start`` on, as zero-copy views of at most ``chunk`` bytes."""
        full, rest = self._layout
        total = full * BLOCK + rest
        pos = max(0, start)
        while pos < total:
            block, off = divmod(pos, BLOCK)
            end = BLOCK if block < full else rest
            view = memoryview(self._tpl(block).data)[off : min(end, off + chunk)]
            pos += len(view)
            yield view

    def sha256(self) -> str:
        """Hex sha256 of the whole file, computed by streaming once and cached."""
        key = (self.size_bytes, self.shape, self.seed, self.invalid_every, self.blank_every)
        with _sha_lock:
            if key in _sha_cache:
                return _sha_cache[key]
        h = hashlib.sha256()
        for view in self.iter_chunks():
            h.update(view)
        digest = h.hexdigest()
        with _sha_lock:
            _sha_cache[key] = digest
        return digest

    @property
    def etag(self) -> str:
        """A strong ETag: a digest of what decides every byte (the generator is deterministic),
        so equal ETags mean equal bytes without a pass over the file."""
        key = f"{self.size_bytes}:{self.shape}:{self.seed}:{self.invalid_every}:{self.blank_every}"
        return '"' + hashlib.sha256(key.encode()).hexdigest()[:32] + '"'

    def read_all(self) -> bytes:
        """The whole file in memory: for tests on small files only."""
        return b"".join(bytes(v) for v in self.iter_chunks())


_sha_cache: dict[tuple[int, str, int, int, int], str] = {}
_sha_lock = threading.Lock()
