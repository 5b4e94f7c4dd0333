"""The download path against a hostile server: cut bodies, lying lengths, short ranges,
content changing under a resume, HTML pages, gzip without its trailer, planted part files
and symlinks, very long lines, redirects.

Each case ends one of two ways: the file byte-exact, or the job not SUCCEEDED with a
non-zero exit, no final file, no traceback, no token anywhere, and never a second
execution. Most cases run the real CLI's ``main()`` in process (``support.cli_in_process``)
against the simulator behind :mod:`hostile`; the SIGTERM case runs it as a subprocess;
behaviours of one function call it directly.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hostile import (
    Forward,
    Handler,
    HostileThread,
    Reply,
    Request,
    Wire,
    gzip_without_trailer,
    html_wire,
    is_download,
    passthrough,
)
from support import (
    TOKEN,
    assert_exact,
    cli_env,
    cli_in_process,
    jobs_by_name,
    leftovers,
    manifest,
    start_cli,
    wait_for,
    write_jobs,
)

from orchestrator.download import UnverifiedLengthError, download
from orchestrator.ndjson import LineChecker, LineStats, LineTooLongError
from orchestrator.simulator import ExportSpec, Faults, SimulatorConfig, SimulatorThread
from orchestrator.validate_worker import MODULE as VALIDATE_WORKER
from orchestrator.workers import validator_pool

SPEC = ExportSpec("1", size_bytes=60_000, pending_s=0.01, running_s=0.02)
OTHER = ExportSpec("1", size_bytes=50_000, pending_s=0.01, running_s=0.02, seed=5)  # "the new content"
EXECUTION = "879879001"  # the simulator's first execution id: names the part file a run will use


@dataclass
class Outcome:
    proc: subprocess.CompletedProcess[str]
    out: Path
    created: int
    requests: list[Request]

    @property
    def job(self) -> dict[str, Any]:
        return jobs_by_name(manifest(self.out))["j"]

    def downloads(self) -> list[Request]:
        return [r for r in self.requests if is_download(r)]


@contextlib.contextmanager
def _servers(handler: Any, spec: ExportSpec = SPEC) -> Iterator[tuple[SimulatorThread, HostileThread]]:
    with (
        SimulatorThread(SimulatorConfig(token=TOKEN, exports=(spec,), faults=Faults())) as sim,
        HostileThread(sim.url, handler) as hostile,
    ):
        yield sim, hostile


def _run(tmp_path: Path, handler: Any, spec: ExportSpec = SPEC, plant: Any = None, **job: Any) -> Outcome:
    """Run one job ``j`` through the hostile proxy; ``plant(out)`` prepares the folder first."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    if plant is not None:
        plant(out)
    with _servers(handler, spec) as (sim, hostile):
        path = write_jobs(tmp_path, [{"name": "j", "export_id": spec.id, **job}])
        proc = cli_in_process("run", str(path), env=cli_env(hostile.url))
        return Outcome(proc, out, sim.stats.executions_created[spec.id], list(hostile.requests))


def _clean(o: Outcome) -> None:
    """No traceback, no token, one execution, no temporary file left."""
    assert "Traceback" not in o.proc.stderr, o.proc.stderr
    assert TOKEN not in o.proc.stderr and TOKEN not in o.proc.stdout
    assert TOKEN not in (o.out / "manifest.json").read_text()
    assert o.created == 1
    assert leftovers(o.out) == []


def assert_succeeded(o: Outcome, spec: ExportSpec = SPEC, length_check: str | None = None) -> dict[str, Any]:
    assert o.proc.returncode == 0, o.proc.stderr
    _clean(o)
    entry = assert_exact(o.out, "j", spec)
    if length_check is not None:
        assert entry["length_check"] == length_check
    return entry


def assert_failed(o: Outcome, *, error: str = "") -> dict[str, Any]:
    assert o.proc.returncode != 0, o.proc.stderr
    _clean(o)
    entry = o.job
    assert entry["status"] != "SUCCEEDED"
    assert not (o.out / "j.ndjson").exists()
    assert error in (entry["error"] or ""), entry["error"]
    return entry


def _line_end_before(data: bytes, offset: int) -> int:
    return data.rfind(b"\n", 0, offset) + 1


def _full(spec: ExportSpec, body: bytes | None = None, **changes: Any) -> Wire:
    """The whole file as a 200, with the simulator's validator, framed as ``changes`` say."""
    result = spec.result()
    headers = [("Content-Type", "application/x-ndjson"), ("ETag", result.etag)]
    return Wire(200, headers, result.read_all() if body is None else body, **changes)


# -- bodies without a length ------------------------------------------------------------------
def test_close_delimited_body_cut_at_a_line_end_then_probe_continues(tmp_path: Path) -> None:
    """A body without a length that stops at a line end is probed with Range; the 206 brings the rest: exact."""
    data = SPEC.result().read_all()
    cut = _line_end_before(data, 25_000)

    async def handler(req: Request, forward: Forward) -> Wire:
        if is_download(req) and "range" not in req.headers:
            return _full(SPEC, data[:cut], framing="close")
        return await passthrough(req, forward)

    o = _run(tmp_path, handler)
    assert_succeeded(o, length_check="content-range")
    assert [r.headers.get("range") for r in o.downloads()] == [None, f"bytes={cut}-"]


def test_close_delimited_whole_body_is_confirmed_by_a_416(tmp_path: Path) -> None:
    """A whole body without a length is complete only once the end probe answers 416 bytes */N."""

    async def handler(req: Request, forward: Forward) -> Wire:
        if is_download(req) and "range" not in req.headers:
            return _full(SPEC, framing="close")
        return await passthrough(req, forward)

    o = _run(tmp_path, handler)
    assert_succeeded(o, length_check="end-probe")
    probe = o.downloads()[-1]
    assert probe.headers["range"] == f"bytes={SPEC.result().size}-"
    assert probe.headers["if-range"] == SPEC.result().etag


def _no_ranges(cut: int | None = None) -> Any:
    """A server with no lengths and no Range support, cutting every body at ``cut``."""

    async def handler(req: Request, forward: Forward) -> Wire:
        if is_download(req):
            body = SPEC.result().read_all()
            return _full(SPEC, body[:cut] if cut else body, framing="close")
        return await passthrough(req, forward)

    return handler


def test_cut_at_a_line_end_without_lengths_or_ranges_never_succeeds(tmp_path: Path) -> None:
    """The issue's case: no length, no Range support, half the lines: the job fails, no file."""
    cut = _line_end_before(SPEC.result().read_all(), 30_000)
    entry = assert_failed(_run(tmp_path, _no_ranges(cut)), error="could not confirm")
    assert entry["sha256"] is None


def test_unconfirmable_end_fails_by_default(tmp_path: Path) -> None:
    """A whole body without a length, and a server ignoring the probe's Range: FAILED by default."""
    assert_failed(_run(tmp_path, _no_ranges()), error="on_unverified_length")


def test_unconfirmable_end_is_kept_when_the_job_says_so(tmp_path: Path) -> None:
    """With on_unverified_length: keep the file is kept and the manifest says length_check unverified."""
    o = _run(tmp_path, _no_ranges(), on_unverified_length="keep")
    assert_succeeded(o, length_check="unverified")
    assert "could not confirm the end" in o.proc.stderr


# -- lengths that lie, framings cut short ---------------------------------------------------
def _once(bad: Callable[[Reply], Wire]) -> Handler:
    """A handler whose first download answer is ``bad(reply)``, the rest passed through."""
    seen: list[int] = []

    async def handler(req: Request, forward: Forward) -> Wire:
        if is_download(req) and not seen:
            seen.append(1)
            return bad(await forward())
        return await passthrough(req, forward)

    return handler


def test_content_length_lie_is_resumed_to_exact(tmp_path: Path) -> None:
    """A body shorter than its Content-Length is a cut: resumed with Range, exact."""
    o = _run(tmp_path, _once(lambda reply: reply.wire(cut_at=20_000)))
    assert_succeeded(o, length_check="content-range")
    assert o.downloads()[1].headers["range"] == "bytes=20000-"


@pytest.mark.parametrize("cut", [20_000, None])
def test_chunked_body_without_terminator_is_a_cut(tmp_path: Path, cut: int | None) -> None:
    """A chunked body with no zero-size last chunk is not complete, cut mid-way or not: resumed, exact."""
    data = SPEC.result().read_all()
    o = _run(tmp_path, _once(lambda reply: reply.wire(framing="chunked", omit_terminator=True, body=data[:cut])))
    assert_succeeded(o, length_check="content-range")
    assert o.downloads()[1].headers["range"] == f"bytes={cut or len(data)}-"


def test_gzip_body_cut_before_its_trailer_never_succeeds(tmp_path: Path) -> None:
    """A gzip-encoded body without a length, always cut before its trailer: the job fails, no file."""

    async def handler(req: Request, forward: Forward) -> Wire:
        if is_download(req):
            body = gzip_without_trailer(SPEC.result().read_all())
            return _full(SPEC, body, framing="close").with_header("Content-Encoding", "gzip")
        return await passthrough(req, forward)

    assert_failed(_run(tmp_path, handler), error="gzip stream cut")


def test_gzip_body_without_a_length_is_complete_at_its_end(tmp_path: Path) -> None:
    """A whole gzip-encoded body without a length is inflated here and complete at the end of its stream."""

    async def handler(req: Request, forward: Forward) -> Wire:
        if is_download(req):
            body = gzip.compress(SPEC.result().read_all())
            return _full(SPEC, body, framing="close").with_header("Content-Encoding", "gzip")
        return await passthrough(req, forward)

    assert_succeeded(_run(tmp_path, handler), length_check="encoding-end")


def test_short_206_every_time_continues_to_the_total(tmp_path: Path) -> None:
    """Every range answered with fewer bytes than asked (valid Content-Range): asked again until the total."""
    total = SPEC.result().size

    async def handler(req: Request, forward: Forward) -> Wire:
        if not is_download(req):
            return await passthrough(req, forward)
        if "range" not in req.headers:
            return (await forward()).wire(cut_at=7_000)
        reply = await forward()
        start = int(req.headers["range"].removeprefix("bytes=").rstrip("-"))
        body = reply.body[:7_000]
        wire = reply.wire(body=body)
        return wire.with_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{total}")

    o = _run(tmp_path, handler)
    assert_succeeded(o, length_check="content-range")
    assert len(o.downloads()) == -(-total // 7_000)


@pytest.mark.parametrize("server", ["honours-if-range", "ignores-if-range"])
def test_content_changed_behind_a_resume_restarts_from_zero(tmp_path: Path, server: str) -> None:
    """After a cut, the file changed (new ETag): the download starts over and ends exact with the new content."""
    old, new = SPEC.result(), OTHER.result()
    new_data = new.read_all()

    async def handler(req: Request, forward: Forward) -> Wire:
        if not is_download(req):
            return await passthrough(req, forward)
        if not any(is_download(r) for r in hostile_requests[:-1]):
            return (await forward()).wire(cut_at=20_000)  # the old content, cut
        headers = [("Content-Type", "application/x-ndjson"), ("ETag", new.etag)]
        rng = req.headers.get("range")
        if rng and (server == "ignores-if-range" or req.headers.get("if-range") == new.etag):
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            cr = ("Content-Range", f"bytes {start}-{len(new_data) - 1}/{len(new_data)}")
            return Wire(206, [*headers, cr], new_data[start:])
        return Wire(200, headers, new_data)

    hostile_requests: list[Request] = []

    async def recording(req: Request, forward: Forward) -> Wire:
        hostile_requests.append(req)
        return await handler(req, forward)

    o = _run(tmp_path, recording)
    assert_succeeded(o, OTHER)
    assert o.downloads()[1].headers["if-range"] == old.etag
    assert "downloading again from byte 0" in o.proc.stderr


def test_content_changing_again_and_again_fails(tmp_path: Path) -> None:
    """A file whose validator changes on every answer never yields a mixed file: the job fails."""
    data = SPEC.result().read_all()
    count: list[int] = []

    async def handler(req: Request, forward: Forward) -> Wire:
        if not is_download(req):
            return await passthrough(req, forward)
        count.append(1)
        wire = Wire(200, [("Content-Type", "application/x-ndjson"), ("ETag", f'"v{len(count)}"')], data)
        return wire if "range" in req.headers else Wire(200, wire.headers, data, cut_at=20_000)

    assert_failed(_run(tmp_path, handler), error="changed on the server")


# -- content types ----------------------------------------------------------------------------
def test_html_page_with_status_200_once_is_retried(tmp_path: Path) -> None:
    """A proxy's HTML error page served as 200 is a transient error: retried, then the real file, exact."""
    o = _run(tmp_path, _once(lambda reply: html_wire()))
    assert_succeeded(o, length_check="content-length")
    assert len(o.downloads()) == 2


def test_html_page_with_status_200_always_fails_without_a_file(tmp_path: Path) -> None:
    """An HTML page on every try: the job fails with a clear error, and the page is never the file."""

    async def handler(req: Request, forward: Forward) -> Wire:
        return html_wire() if is_download(req) else await passthrough(req, forward)

    assert_failed(_run(tmp_path, handler), error="Content-Type text/html")


@pytest.mark.parametrize(
    "content_type", [None, "application/octet-stream", "text/plain; charset=utf-8", "binary/octet-stream"]
)
def test_content_types_that_can_be_ndjson_are_accepted(tmp_path: Path, content_type: str | None) -> None:
    """A missing Content-Type, octet-stream, or text/plain with a charset is a result file."""
    o = _run(tmp_path, _once(lambda reply: reply.wire().with_header("Content-Type", content_type)))
    assert_succeeded(o)
    assert len(o.downloads()) == 1


# -- planted files ------------------------------------------------------------------------------
def test_planted_symlink_part_file_and_output_are_not_followed(tmp_path: Path) -> None:
    """Symlinks planted at the part and output names: targets untouched, the output a regular file."""
    outside = {name: tmp_path / name for name in ("precious-part", "precious-output")}
    for path in outside.values():
        path.write_bytes(b"precious\n")

    def plant(out: Path) -> None:
        (out / f".j.ndjson.{EXECUTION}.part").symlink_to(outside["precious-part"])
        (out / "j.ndjson").symlink_to(outside["precious-output"])

    o = _run(tmp_path, passthrough, plant=plant)
    assert_succeeded(o)
    assert all(path.read_bytes() == b"precious\n" for path in outside.values())
    assert not (o.out / "j.ndjson").is_symlink()
    assert "replaced a symlink" in o.proc.stderr


def test_planted_garbage_part_file_of_an_unrecorded_execution_is_discarded(tmp_path: Path) -> None:
    """A part file the manifest never recorded is deleted and the file downloaded from byte 0."""

    def plant(out: Path) -> None:
        (out / f".j.ndjson.{EXECUTION}.part").write_bytes(b'{"planted": true}\n' * 500)

    o = _run(tmp_path, passthrough, plant=plant)
    assert_succeeded(o)
    assert "range" not in o.downloads()[0].headers


def test_existing_user_file_at_the_output_name_is_replaced_with_a_warning(tmp_path: Path) -> None:
    """A file nobody recorded at the output's name is replaced, and the log says so."""
    o = _run(tmp_path, passthrough, plant=lambda out: (out / "j.ndjson").write_bytes(b"mine\n"))
    assert_succeeded(o)
    assert "replaced a regular file of 5 bytes" in o.proc.stderr and "not written by mics-export" in o.proc.stderr


class _Stream:
    """A stream of fixed bytes (from ``start``, in one chunk) that states its length like a ResumableStream."""

    def __init__(self, data: bytes, start: int) -> None:
        self.data, self.start = data, start
        self.length_check = "content-length"
        self._sent = False

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> bytes:
        if self._sent:
            raise StopAsyncIteration
        self._sent = True
        return self.data[self.start :]


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
async def test_a_part_file_that_is_not_a_plain_file_of_ours_is_never_resumed(tmp_path: Path, kind: str) -> None:
    """Even when resuming is allowed, a symlink, hard-linked file or FIFO at the part name is replaced."""
    data = b'{"a":1}\n' * 1000
    target = tmp_path / "outside"
    target.write_bytes(b'{"x":0}\n' * 10)
    folder = tmp_path / "out"
    folder.mkdir()
    part = folder / ".f.ndjson.t.part"
    if kind == "symlink":
        part.symlink_to(target)
    elif kind == "hardlink":
        os.link(target, part)
    else:
        os.mkfifo(part)
    starts: list[int] = []

    def open_stream(start: int) -> Any:
        starts.append(start)
        return _Stream(data, start)

    result = await download(open_stream, folder / "f.ndjson", tag="t", resume=True)
    assert starts == [0]
    assert (folder / "f.ndjson").read_bytes() == data and result.length_check == "content-length"
    assert target.read_bytes() == b'{"x":0}\n' * 10


@pytest.mark.anyio
async def test_a_stream_without_a_stated_length_fails_unless_kept(tmp_path: Path) -> None:
    """download() refuses a stream whose completeness is unverified, and leaves nothing behind."""

    class Unverified(_Stream):
        def __init__(self, data: bytes, start: int) -> None:
            super().__init__(data, start)
            self.length_check = "unverified"

    dest = tmp_path / "f.ndjson"
    with pytest.raises(UnverifiedLengthError):
        await download(lambda start: Unverified(b"{}\n", start), dest)
    assert list(tmp_path.iterdir()) == []
    kept = await download(lambda start: Unverified(b"{}\n", start), dest, on_unverified_length="keep")
    assert kept.length_check == "unverified" and dest.read_bytes() == b"{}\n"


# -- long lines ---------------------------------------------------------------------------------
def test_a_50_mb_line_is_held_back_in_linear_time() -> None:
    """Holding back one 50 MB line fed in 16 KiB chunks costs well under a second of CPU (it was quadratic)."""
    piece = b"7" * (16 << 10)
    checker = LineChecker(defer_over=1 << 20)
    started = time.process_time()
    checker.feed(b"[")
    for _ in range((50 << 20) // len(piece)):
        checker.feed(piece)
    checker.feed(b"]\n")
    took = time.process_time() - started
    assert took < 1.0, f"{took:.2f}s of CPU"
    assert [n for n, _ in checker.take_deferred()] == [1] and checker.stats.lines == 1


@pytest.mark.anyio
@pytest.mark.parametrize("workers", [0, 2])
async def test_a_line_over_max_line_bytes_fails_with_its_number(workers: int) -> None:
    """A line over max_line_bytes fails once past the limit, naming the line, with or without workers."""
    lines = b'{"a":1}\n' * 3 + b'"' + b"x" * 5000
    if workers:
        async with validator_pool(workers) as pool:
            checker: Any = pool.checker(max_line_bytes=1000)
            with pytest.raises(LineTooLongError, match=r"line 4 is longer than max_line_bytes=1000"):
                for start in range(0, len(lines), 300):
                    await checker.feed(lines[start : start + 300])
    else:
        inline = LineChecker(max_line_bytes=1000)
        with pytest.raises(LineTooLongError, match=r"line 4 is longer than max_line_bytes=1000"):
            for start in range(0, len(lines), 300):
                inline.feed(lines[start : start + 300])


def _long_line_handler(line: bytes) -> Any:
    async def handler(req: Request, forward: Forward) -> Wire:
        if is_download(req):
            return _full(SPEC, b'{"a":1}\n' + line + b"\n")
        return await passthrough(req, forward)

    return handler


def test_a_line_over_max_line_bytes_fails_the_job(tmp_path: Path) -> None:
    """A 2 MB line with max_line_bytes: 1000000 fails the job with the line's number, no file."""
    line = b'{"a":"' + b"x" * 2_000_000 + b'"}'
    assert_failed(
        _run(tmp_path, _long_line_handler(line), max_line_bytes=1_000_000),
        error="line 2 is longer than max_line_bytes=1000000",
    )


def _line_checkers(parent: int) -> list[int]:
    """Children of ``parent`` checking a long line (``python -m orchestrator.validate_worker --line``);
    only its own, so a test running at the same time on another xdist worker is not counted."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if ppid == parent and b"--line" in argv and VALIDATE_WORKER.encode() in argv:
                    found.append(int(proc.name))
    return found


def test_sigterm_while_a_long_line_is_parsed_exits_in_time(tmp_path: Path) -> None:
    """SIGTERM while a 40 MB line is being parsed stops the run with 143 well within 10 s, its parser killed."""
    line = b"[" + b"1," * (20 << 20) + b"1]"  # ~2 s of orjson holding the GIL, had it run in process
    with _servers(_long_line_handler(line)) as (_sim, hostile):
        out = tmp_path / "out"
        path = write_jobs(tmp_path, [{"name": "j", "export_id": "1"}])
        proc = start_cli("run", str(path), env=cli_env(hostile.url))
        checkers = wait_for(lambda: _line_checkers(proc.pid), what="the long line's parser")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        took = time.monotonic() - started
        stderr = proc.stderr.read() if proc.stderr else ""
    assert code == 143 and took < 10, (code, took)
    assert "Traceback" not in stderr
    assert not (out / "j.ndjson").exists() and leftovers(out) == []
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in checkers), timeout=5, what="the parser to go")


@pytest.mark.anyio
async def test_long_lines_are_checked_in_a_child_with_exact_counts() -> None:
    """Lines beyond the in-process limit are checked by a child process; counts and numbers stay exact."""
    data = b'{"a":1}\n' + b'"' + b"y" * 3000 + b'"\n' + b"{bad" + b"z" * 3000 + b"\n" + b"   " * 2000 + b"\n{}\n"
    inline = LineChecker(defer_over=1000)
    for start in range(0, len(data), 700):
        inline.feed(data[start : start + 700])
    inline.finish()
    from orchestrator.transfer import _settle

    await _settle(inline)
    assert inline.stats == LineStats(lines=5, blank_lines=1, invalid_lines=1, invalid_line_numbers=[3])
    async with validator_pool(2, long_line_bytes=1000) as pool:
        pooled = pool.checker()
        for start in range(0, len(data), 700):
            await pooled.feed(data[start : start + 700])
        assert await pooled.finish() == inline.stats


# -- redirects ---------------------------------------------------------------------------------
def test_redirect_to_another_host_is_followed_without_the_token(tmp_path: Path) -> None:
    """A download redirected (302) to another host is followed; that host never receives the Authorization header."""
    storage_seen: list[Request] = []

    async def storage(req: Request, forward: Forward) -> Wire:
        storage_seen.append(req)
        return _full(SPEC)

    with HostileThread("http://127.0.0.1:9", storage) as bucket:
        target = f"http://localhost:{bucket.server.port}/bucket/export.ndjson"

        async def handler(req: Request, forward: Forward) -> Wire:
            if is_download(req):
                return Wire(302, [("Location", target)])
            return await passthrough(req, forward)

        o = _run(tmp_path, handler)
    assert_succeeded(o)
    assert len(storage_seen) == 1
    assert "authorization" not in storage_seen[0].headers
    assert o.downloads()[0].headers["authorization"] == TOKEN
