"""More of the hostile server (issue 10): HTTP framing as real proxies break it, odd statuses,
redirects, ranges, encodings, stalls, odd NDJSON bytes and the real API's loose dialect.

Every case ends one of two ways: the file byte-exact, or a failure (in process: an
exception, no file, no part file; through the CLI: the job not SUCCEEDED and exit != 0),
and never a traceback, the token, a hang past the deadline or a second execution. Framing
cases run in process against made-up answers (:func:`_fetch`), so that they take
milliseconds; what is the run's (deadlines, adoption, the dialect) runs the real CLI: its
``main()`` in process (``support.cli_in_process``), the deadline case as a subprocess.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hostile import (
    Forward,
    Handler,
    HostileThread,
    Request,
    Wire,
    is_create,
    is_download,
    is_executions_list,
    json_wire,
    passthrough,
    scene,
    small_spec,
)
from support import TOKEN, assert_exact, cli_env, cli_in_process, jobs_by_name, leftovers, manifest, run_cli, write_jobs

from orchestrator.api import ApiClient
from orchestrator.download import DownloadResult, download
from orchestrator.errors import ApiError, JobError, TransportError
from orchestrator.models import Execution
from orchestrator.retry import RetryPolicy
from orchestrator.transport import Timeouts

DATA = b"".join(b'{"i":%d,"pad":"%s"}\n' % (i, b"x" * 40) for i in range(1500))
N = len(DATA)
ETAG = '"v1"'
PREFIX = TOKEN[:8]
RETRY = RetryPolicy(max_tries=3, max_time_s=10, base_s=0.001, max_wait_s=0.01)
TIMEOUTS = Timeouts(connect_s=2, read_s=0.4, request_s=2)
"""A read timeout of 0.4 s: a stalled answer fails (or resumes) in well under a second."""


# -- made-up answers, byte for byte ----------------------------------------------------------------
def _head(status: int, headers: list[tuple[str, Any]], reason: str = "OK") -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _raw(headers: list[tuple[str, Any]], body: bytes, status: int = 200, keep_open: bool = False) -> Wire:
    """An answer written exactly as given (its framing whatever ``headers`` say)."""
    return Wire(status, [], raw=_head(status, headers) + body, raw_keep_open=keep_open)


def _chunked(data: bytes, size: int = 4096, ext: str = "", lie: int = 0, trailer: bytes = b"") -> bytes:
    """``data`` in chunks (``lie`` added to every stated size), the last chunk and ``trailer``."""
    out = b""
    for i in range(0, len(data), size):
        piece = data[i : i + size]
        out += f"{len(piece) + lie:x}{ext}\r\n".encode() + piece + b"\r\n"
    return out + b"0\r\n" + trailer + b"\r\n"


def _start(req: Request) -> int | None:
    """Where the request's ``Range: bytes=N-`` starts (None without one)."""
    value = req.headers.get("range")
    return int(value.removeprefix("bytes=").rstrip("-")) if value else None


def _honest(req: Request) -> Wire:
    """What a well-behaved server answers: 200, 206 from the Range, or 416 past the end."""
    start = _start(req)
    if start is None:
        return Wire(200, [("ETag", ETAG)], DATA)
    if start >= N:
        return Wire(416, [("Content-Range", f"bytes */{N}")])
    return Wire(206, [("ETag", ETAG), ("Content-Range", f"bytes {start}-{N - 1}/{N}")], DATA[start:])


Bad = Callable[[Request], Wire]


def _first(bad: Bad) -> Handler:
    """The first download answered by ``bad``, the rest honestly."""
    seen = {"n": 0}

    async def handler(req: Request, forward: Forward) -> Wire:
        seen["n"] += 1
        return bad(req) if seen["n"] == 1 else _honest(req)

    return handler


def _always(bad: Bad) -> Handler:
    """Every download answered by ``bad``."""

    async def handler(req: Request, forward: Forward) -> Wire:
        return bad(req)

    return handler


def _ranged(whole: Wire, ranged: Callable[[int], Wire]) -> Bad:
    """``whole`` to a request without Range, ``ranged(start)`` to one with."""
    return lambda req: whole if _start(req) is None else ranged(_start(req) or 0)


async def _hang(req: Request) -> Wire:
    await asyncio.sleep(30)  # longer than any test: the client's timeouts must end it
    return _honest(req)


async def _fetch(folder: Path, handler: Handler) -> tuple[DownloadResult | BaseException, list[Request]]:
    """download() of execution 2's file through a proxy answering with ``handler`` (no upstream)."""
    with HostileThread("http://127.0.0.1:9", handler) as proxy:
        async with ApiClient(proxy.url, TOKEN, retry=RETRY, timeouts=TIMEOUTS) as api:
            try:
                outcome: DownloadResult | BaseException = await download(
                    lambda start: api.stream_result("1", "2", start=start), folder / "f.ndjson"
                )
            except (ApiError, TransportError, JobError) as exc:
                outcome = exc
    return outcome, list(proxy.requests)


def _exact(folder: Path, outcome: DownloadResult | BaseException) -> DownloadResult:
    assert isinstance(outcome, DownloadResult), outcome
    assert (folder / "f.ndjson").read_bytes() == DATA
    assert outcome.sha256 == hashlib.sha256(DATA).hexdigest() and outcome.bytes == N
    assert outcome.records == 1500 and outcome.length_check != "unverified"
    assert sorted(p.name for p in folder.iterdir()) == ["f.ndjson"]
    return outcome


def _failed(folder: Path, outcome: DownloadResult | BaseException, caplog: pytest.LogCaptureFixture) -> str:
    assert isinstance(outcome, BaseException), f"succeeded: {outcome}"
    assert list(folder.iterdir()) == [], "a file or part file was left"
    text = str(outcome)
    assert "\n" not in text, text
    for seen in [text, repr(outcome), *(r.getMessage() for r in caplog.records)]:
        assert PREFIX not in seen, seen
    return text


# -- framing: lengths, chunks ------------------------------------------------------------------------
EXACT: dict[str, Handler] = {
    # Content-Length larger than the body on a keep-alive connection: the read timeout, then a resume.
    "length-too-large-kept-open": _first(
        lambda r: _raw([("Content-Length", N + 100), ("ETag", ETAG)], DATA, keep_open=True)
    ),
    "two-content-lengths-once": _first(lambda r: _raw([("Content-Length", N // 2), ("Content-Length", N)], DATA)),
    "chunk-extension": _always(lambda r: _raw([("Transfer-Encoding", "chunked")], _chunked(DATA, ext=';name="v"'))),
    "trailers": _always(
        lambda r: _raw(
            [("Transfer-Encoding", "chunked"), ("Trailer", "X-Sum")], _chunked(DATA, trailer=b"X-Sum: 1\r\n")
        )
    ),
    "chunked-cut-before-the-last-chunk": _first(
        lambda r: _raw([("Transfer-Encoding", "chunked"), ("ETag", ETAG)], _chunked(DATA)[:-5])
    ),
    "100-continue-then-200": _always(
        lambda r: Wire(200, [], raw=_head(100, [], "Continue") + _head(200, [("Content-Length", N)]) + DATA)
    ),
    # An empty 200 once (Content-Length: 0, or no length at all): never believed without asking again.
    "empty-200-once": _first(lambda r: Wire(200, [("ETag", ETAG)], b"")),
    "empty-200-without-length-once": _first(lambda r: Wire(200, [("ETag", ETAG)], b"", framing="close")),
    # Content codings, asked for identity but served anyway: inflated here, ends checked.
    "deflate-zlib-wrapped": _always(lambda r: Wire(200, [("Content-Encoding", "deflate")], zlib.compress(DATA))),
    "deflate-raw": _always(
        lambda r: Wire(
            200,
            [("Content-Encoding", "deflate")],
            (c := zlib.compressobj(6, zlib.DEFLATED, -15)).compress(DATA) + c.flush(),
        )
    ),
    "gzip-gzip-in-one-header": _always(
        lambda r: Wire(200, [("Content-Encoding", "gzip, gzip")], gzip.compress(gzip.compress(DATA)))
    ),
    "gzip-in-two-headers": _always(
        lambda r: Wire(
            200, [("Content-Encoding", "gzip"), ("Content-Encoding", "gzip")], gzip.compress(gzip.compress(DATA))
        )
    ),
    "206-cut-then-honest": _first(lambda r: Wire(200, [("ETag", ETAG)], DATA, cut_at=10_000)),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", list(EXACT))
async def test_framing_that_can_be_read_gives_the_exact_file(tmp_path: Path, case: str) -> None:
    """Odd but readable framing (lying lengths resumed, chunk extensions, trailers, codings, empty once): exact."""
    outcome, _ = await _fetch(tmp_path, EXACT[case])
    _exact(tmp_path, outcome)


FAILS: dict[str, Handler] = {
    "two-content-lengths": _always(lambda r: _raw([("Content-Length", N), ("Content-Length", N)], DATA)),
    "content-length-list": _always(lambda r: _raw([("Content-Length", f"{N // 2}, {N}")], DATA)),
    "chunked-and-content-length": _always(
        lambda r: _raw([("Content-Length", N // 2), ("Transfer-Encoding", "chunked")], _chunked(DATA))
    ),
    "chunk-sizes-too-small": _always(lambda r: _raw([("Transfer-Encoding", "chunked")], _chunked(DATA, lie=-10))),
    "chunk-sizes-too-large": _always(lambda r: _raw([("Transfer-Encoding", "chunked")], _chunked(DATA, lie=10))),
    "invalid-chunk-size-line": _always(lambda r: _raw([("Transfer-Encoding", "chunked")], b"zz\r\n" + DATA)),
    "chunk-size-overflow": _always(lambda r: _raw([("Transfer-Encoding", "chunked")], b"f" * 40 + b"\r\n" + DATA)),
    # aiohttp removes one chunked framing and nothing else: the rest would be saved as the file.
    "transfer-encoding-gzip-chunked": _always(
        lambda r: _raw([("Transfer-Encoding", "gzip, chunked")], _chunked(gzip.compress(DATA)))
    ),
    "transfer-encoding-chunked-twice": _always(
        lambda r: _raw([("Transfer-Encoding", "chunked, chunked")], _chunked(_chunked(DATA)))
    ),
    "transfer-encoding-in-two-headers": _always(
        lambda r: _raw([("Transfer-Encoding", "gzip"), ("Transfer-Encoding", "chunked")], _chunked(gzip.compress(DATA)))
    ),
    "transfer-encoding-unknown": _always(lambda r: _raw([("Transfer-Encoding", "x-mangle")], DATA)),
    "length-too-large-kept-open-always": _always(lambda r: _raw([("Content-Length", N + 100)], DATA, keep_open=True)),
    "body-stalls-mid-way": _always(lambda r: _raw([("Content-Length", N)], DATA[:5000], keep_open=True)),
    "slow-headers": lambda req, forward: _hang(req),
    "http-1.0-without-length-or-ranges": _always(
        lambda r: Wire(200, [], raw=b"HTTP/1.0 200 OK\r\n\r\n" + DATA[: N // 2])
    ),
    "empty-200-without-length-always": _always(lambda r: Wire(200, [], b"", framing="close")),
}

STATUSES: dict[str, Handler] = {
    "204": _always(lambda r: _raw([], b"", status=204)),
    "304": _always(lambda r: _raw([("ETag", ETAG)], b"", status=304)),
    **{
        f"{code}-loop": _always(
            lambda r, code=code: Wire(code, [("Location", "/v1/exports/1/executions/2/files/technical_name=export")])  # type: ignore[misc]
        )
        for code in (301, 302, 307, 308)
    },
    "redirect-to-file": _always(lambda r: Wire(302, [("Location", "file:///etc/passwd")])),
    "redirect-to-ftp": _always(lambda r: Wire(307, [("Location", "ftp://127.0.0.1/export")])),
    "redirect-without-location": _always(lambda r: Wire(302, [])),
    "206-to-no-range-half-the-file": _always(
        _ranged(
            Wire(206, [("Content-Range", f"bytes 0-{N // 2 - 1}/{N // 2}")], DATA[: N // 2]), lambda s: _honest_at(s)
        )
    ),
    "206-encoded-always": _always(
        lambda r: Wire(
            206, [("Content-Encoding", "gzip"), ("Content-Range", f"bytes 0-{N - 1}/{N}")], gzip.compress(DATA)
        )
    ),
    "206-beyond-the-total": _always(
        _ranged(
            Wire(200, [("ETag", ETAG)], DATA, cut_at=10_000),
            lambda s: Wire(
                206, [("ETag", ETAG), ("Content-Range", f"bytes {s}-{N + 99}/{N + 100}")], DATA[s:] + b"x" * 100
            ),
        )
    ),
    "206-total-changes": _always(
        _ranged(
            Wire(200, [("ETag", ETAG)], DATA, cut_at=10_000),
            lambda s: Wire(206, [("ETag", ETAG), ("Content-Range", f"bytes {s}-{N - 1}/{N + 5}")], DATA[s:]),
        )
    ),
    "206-two-content-ranges": _always(
        _ranged(
            Wire(200, [("ETag", ETAG)], DATA, cut_at=10_000),
            lambda s: Wire(
                206,
                [
                    ("ETag", ETAG),
                    ("Content-Range", f"bytes {s}-{N - 1}/{N}"),
                    ("Content-Range", f"bytes {s}-{N + 9}/{N + 10}"),
                ],
                DATA[s:],
            ),
        )
    ),
    "416-with-another-total": _always(
        _ranged(
            Wire(200, [("ETag", ETAG)], DATA, framing="close"),
            lambda s: Wire(416, [("Content-Range", f"bytes */{N + 7}")]),
        )
    ),
    "200-to-a-range-with-another-length": _always(
        _ranged(
            Wire(200, [("ETag", ETAG)], DATA, cut_at=10_000),
            lambda s: Wire(200, [("ETag", ETAG)], DATA + b'{"i":-1}\n'),
        )
    ),
    "content-encoding-br": _always(lambda r: Wire(200, [("Content-Encoding", "br")], DATA)),
    "content-encoding-zstd": _always(lambda r: Wire(200, [("Content-Encoding", "zstd")], DATA)),
    "content-encoding-unknown": _always(lambda r: Wire(200, [("Content-Encoding", "x-squash")], DATA)),
    "gzip-with-a-wrong-crc": _always(
        lambda r: Wire(
            200, [("Content-Encoding", "gzip")], (g := gzip.compress(DATA))[:-8] + bytes([g[-8] ^ 0xFF]) + g[-7:]
        )
    ),
    "two-content-types-one-html": _always(
        lambda r: Wire(200, [("Content-Type", "application/x-ndjson"), ("Content-Type", "text/html")], DATA)
    ),
}


def _honest_at(start: int) -> Wire:
    return Wire(206, [("ETag", ETAG), ("Content-Range", f"bytes {start}-{N - 1}/{N}")], DATA[start:])


@pytest.mark.anyio
@pytest.mark.parametrize("case", [*FAILS, *STATUSES])
async def test_framing_that_cannot_be_trusted_fails_cleanly(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Broken framing, 204/304, redirect loops and schemes, lying ranges, unknown codings: an error, never a file."""
    caplog.set_level(logging.INFO, logger="orchestrator")
    started = time.monotonic()
    outcome, _ = await _fetch(tmp_path, {**FAILS, **STATUSES}[case])
    _failed(tmp_path, outcome, caplog)
    assert time.monotonic() - started < 8  # stalls end by the read timeout, loops by a count


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["content-length", "header-line", "chunk"])
async def test_a_token_echoed_into_a_malformed_answer_never_shows(
    tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The parser's error quotes the bad bytes; when they echo the token, neither error nor log shows any of it."""
    caplog.set_level(logging.INFO, logger="orchestrator")

    def bad(req: Request) -> Wire:
        token = req.headers["authorization"]
        if where == "content-length":
            return _raw([("Content-Length", token)], DATA)
        if where == "header-line":
            return Wire(200, [], raw=_head(200, [("Content-Length", N)])[:-2] + token.encode() + b"\r\n\r\n" + DATA)
        return _raw([("Transfer-Encoding", "chunked")], b"10\r\n" + token.encode() * 3 + b"\r\n0\r\n\r\n")

    outcome, requests = await _fetch(tmp_path, _always(bad))
    text = _failed(tmp_path, outcome, caplog)
    assert requests[0].headers["authorization"] == TOKEN and TOKEN not in text


@pytest.mark.anyio
@pytest.mark.parametrize("code", [301, 302, 307, 308])
async def test_redirects_to_another_host_never_carry_the_token(tmp_path: Path, code: int) -> None:
    """A download redirected (301/302/307/308) to another host is exact; that host never gets Authorization."""
    with HostileThread("http://127.0.0.1:9", _always(_honest)) as storage:
        target = f"http://localhost:{storage.server.port}/bucket/export.ndjson"
        outcome, requests = await _fetch(tmp_path, _always(lambda r: Wire(code, [("Location", target)])))
        seen = list(storage.requests)
    _exact(tmp_path, outcome)
    assert seen and all("authorization" not in r.headers for r in seen)
    assert all(r.headers["authorization"] == TOKEN for r in requests)


@pytest.mark.anyio
async def test_an_empty_file_is_confirmed_by_a_416(tmp_path: Path) -> None:
    """A really empty result (Content-Length: 0, then 416 bytes */0 to Range: bytes=0-) succeeds, empty."""

    def empty(req: Request) -> Wire:
        if _start(req) is None:
            return Wire(200, [("ETag", ETAG)], b"")
        return Wire(416, [("Content-Range", "bytes */0")])

    outcome, requests = await _fetch(tmp_path, _always(empty))
    assert isinstance(outcome, DownloadResult), outcome
    assert outcome.bytes == 0 and (tmp_path / "f.ndjson").read_bytes() == b""
    assert [r.headers.get("range") for r in requests] == [None, "bytes=0-"]


# -- NDJSON bytes ----------------------------------------------------------------------------------
class _Fixed:
    """A stream of fixed bytes, in small pieces, that states its length."""

    def __init__(self, data: bytes, start: int) -> None:
        self.data, self.pos = data, start
        self.length_check = "content-length"

    def __aiter__(self) -> _Fixed:
        return self

    async def __anext__(self) -> bytes:
        if self.pos >= len(self.data):
            raise StopAsyncIteration
        piece = self.data[self.pos : self.pos + 7]
        self.pos += len(piece)
        return piece


def _reference(data: bytes) -> tuple[int, int, list[int]]:
    """SPEC: records are non-empty lines orjson parses; blank lines neither; invalid ones numbered."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    records, invalid = 0, []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            orjson.loads(line)
            records += 1
        except orjson.JSONDecodeError:
            invalid.append(number)
    return records, len(invalid), invalid


ODD_NDJSON = {
    "nul-byte": b'{"a":1}\n{"a":"x\x00y"}\n{"a":\x002}\n\x00\n{"b":2}\n',
    "bom-at-start": b'\xef\xbb\xbf{"a":1}\n{"a":2}\n',
    "crlf": b'{"a":1}\r\n{"a":2}\r\n\r\n{"a":3}\r\n',
    "invalid-utf8": b'{"a":"\xff\xfe"}\n{"a":"ok"}\n{"a":"\xc3\x28"}\n\xed\xa0\x80\n',
    "no-final-newline": b'{"a":1}\n{"a":2}',
    "lone-surrogate-escape": b'{"a":"\\ud800"}\n{"a":"\\u00e9"}\n',
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", list(ODD_NDJSON))
async def test_odd_ndjson_bytes_are_kept_exact_and_counted_as_the_spec_says(tmp_path: Path, case: str) -> None:
    """NUL bytes, a BOM, CRLF, invalid UTF-8: the file byte-exact, records and invalid lines as orjson says per line."""
    data = ODD_NDJSON[case]
    result = await download(lambda start: _Fixed(data, start), tmp_path / "f.ndjson")
    assert (tmp_path / "f.ndjson").read_bytes() == data
    stats = result.stats
    assert (stats.records, stats.invalid_lines, list(stats.invalid_line_numbers)) == _reference(data)


# -- the real API's dialect, through the CLI --------------------------------------------------------


def _clean(proc: Any, out: Path) -> dict[str, dict[str, Any]]:
    """No traceback, no token (nor its start) in stderr, stdout or any file; no part file left."""
    assert "Traceback" not in proc.stderr, proc.stderr
    for text in (proc.stderr, proc.stdout):
        assert PREFIX not in text
    for path in out.iterdir():
        if path.is_file():
            assert PREFIX.encode() not in path.read_bytes(), path.name
    assert leftovers(out) == []
    return jobs_by_name(manifest(out))


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _dialect(export_id: str, item: dict[str, Any]) -> dict[str, Any]:
    """One execution as the real API may show it: what each export's job is about."""
    status = item["status"]
    if export_id == "1":  # SUCCESS, result null, counters as strings, ids as numbers, dates as ISO strings
        return {
            **item,
            "id": int(item["id"]),
            "status": "SUCCESS" if status == "SUCCEEDED" else status,
            "result": None,
            "num_tasks": str(item.get("num_tasks")),
            "completed_tasks": str(item.get("completed_tasks")),
            "erroneous_tasks": "0",
            "creation_date": _iso(item["creation_date"]),
            "error": {"message": None},
        }
    if export_id == "2":  # output_files: [], dates as numeric strings, an error object on a success
        return {**item, "result": {"output_files": []}, "creation_date": str(item["creation_date"]), "error": {}}
    final = {"3": "CANCELED", "4": "LOST", "5": "EXECUTOR_NOT_RESPONDING"}[export_id]
    return {**item, "status": final, "error": {"message": f"the platform says {final.lower()}"}}


async def _dialect_handler(req: Request, forward: Forward) -> Wire:
    reply = await forward()
    if reply.status != 200 or not is_executions_list(req):
        return reply.wire()
    env = reply.json()
    export_id = req.path.split("/")[3]
    data = [_dialect(export_id, i) for i in env["data"]]
    # An older list: a stray max_result, no total, no count.
    return reply.with_json({"status": "ok", "data": data, "first_result": env.get("first_result"), "max_result": 10})


def test_the_real_apis_dialect_on_executions(tmp_path: Path) -> None:
    """SUCCESS, result null, output_files [], string counters, numeric ids, ISO dates, no total: exact; others final."""
    specs = [small_spec(str(i)) for i in range(1, 6)]
    with scene(_dialect_handler, *specs) as (sim, proxy):
        jobs = [{"name": f"j{s.id}", "export_id": s.id, "retries": 0} for s in specs]
        proc = cli_in_process("run", str(write_jobs(tmp_path, jobs)), env=cli_env(proxy.url))
        created = dict(sim.stats.executions_created)
    out = tmp_path / "out"
    entries = _clean(proc, out)
    assert proc.returncode == 1, proc.stderr
    assert_exact(out, "j1", specs[0])
    assert_exact(out, "j2", specs[1])
    assert entries["j3"]["status"] == "CANCELLED" and "ended CANCELED" in entries["j3"]["error"]
    for name, raw in (("j4", "LOST"), ("j5", "EXECUTOR_NOT_RESPONDING")):
        assert entries[name]["status"] == "FAILED", entries[name]
        assert f"ended {raw}" in entries[name]["error"] and f"the platform says {raw.lower()}" in entries[name]["error"]
    assert created == {s.id: 1 for s in specs}


def test_numeric_ids_and_iso_dates_do_not_break_the_lost_create_lookup(tmp_path: Path) -> None:
    """A create answered 504 after it created; the list shows numeric ids and ISO dates: found, one execution, exact."""
    spec = small_spec("1")
    state = {"created": False}

    async def handler(req: Request, forward: Forward) -> Wire:
        if is_create(req) and not state["created"]:
            state["created"] = True
            await forward()
            return json_wire(504, {"status": "error", "error": "Gateway Timeout"})
        if is_executions_list(req):
            reply = await forward()
            items = [{**i, "id": int(i["id"]), "creation_date": _iso(i["creation_date"])} for i in reply.json()["data"]]
            return reply.with_json({**reply.json(), "data": items})
        return await passthrough(req, forward)

    with scene(handler, spec) as (sim, proxy):
        proc = cli_in_process(
            "run", str(write_jobs(tmp_path, [{"name": "j", "export_id": "1"}])), env=cli_env(proxy.url)
        )
        created, posts = sim.stats.executions_created["1"], proxy.count(is_create)
    _clean(proc, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert created == 1 and posts == 1
    assert_exact(tmp_path / "out", "j", spec)


def test_execution_dates_and_ids_are_read_in_every_form() -> None:
    """creation_date as epoch ms, a numeric string or ISO 8601 (with or without zone) reads as the same epoch ms."""
    ms = 1_714_557_600_123
    for value in (ms, str(ms), float(ms), _iso(ms), _iso(ms).replace("Z", "+00:00"), _iso(ms)[:-1]):
        execution = Execution.from_api({"id": 879879001, "status": "SUCCESS", "creation_date": value})
        assert execution.creation_date == ms, value
        assert execution.id == "879879001" and execution.is_success and execution.technical_name == "export"
    assert Execution.from_api({"id": "1", "status": "RUNNING", "creation_date": "yesterday"}).creation_date is None


# -- stalls and slow headers against the job's deadline ----------------------------------------------
def test_stalls_on_create_poll_and_download_end_at_the_deadline(tmp_path: Path) -> None:
    """A create that never answers, a poll that never answers, a body that stops mid-way: each job ends by timeout_s."""
    specs = [small_spec("1"), small_spec("2"), small_spec("3", size_bytes=60_000)]
    polls = {"n": 0}

    async def handler(req: Request, forward: Forward) -> Wire:
        export_id = req.path.split("/")[3] if req.path.startswith("/v1/exports/") else ""
        if export_id == "1" and is_create(req):
            await forward()  # created on the platform, the answer never comes
            return await _hang(req)
        if export_id == "2" and is_executions_list(req):
            polls["n"] += 1
            if polls["n"] == 1:  # the first poll hangs; the cancel's lookup afterwards is answered
                return await _hang(req)
        if export_id == "3" and is_download(req):
            reply = await forward()
            head = [(k, v) for k, v in reply.wire().headers] + [("Content-Length", len(reply.body))]
            return _raw(head, reply.body[:7_000], keep_open=True)
        return await passthrough(req, forward)

    with scene(handler, *specs) as (sim, proxy):
        jobs = [{"name": f"j{s.id}", "export_id": s.id, "timeout_s": 2} for s in specs]
        started = time.monotonic()
        proc = run_cli("run", str(write_jobs(tmp_path, jobs)), env=cli_env(proxy.url), timeout=60)
        elapsed = time.monotonic() - started
        created = dict(sim.stats.executions_created)
    entries = _clean(proc, tmp_path / "out")
    assert proc.returncode != 0
    for name in ("j1", "j2", "j3"):
        assert entries[name]["status"] == "TIMED_OUT", entries[name]
        assert "timeout_s=2" in entries[name]["error"]
    assert not (tmp_path / "out" / "j3.ndjson").exists()
    assert created == {"1": 1, "2": 1, "3": 1}
    assert elapsed < 15, elapsed  # 2 s per job (in parallel), the start-up, and a cancel
