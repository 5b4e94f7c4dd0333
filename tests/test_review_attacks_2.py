"""Adversarial review, second round: attacks on the promises not covered by the first review
(test_review_attacks.py) nor by the hostile and fuzz suites.

Each test runs the real CLI (``support.cli_in_process``) against a scripted loopback server
(:class:`review_servers.FakeApi` behind :mod:`hostile`, or the raw servers of
review_servers_2.py where the answer must be written in pieces) and checks one promise. A
fault the review finds is kept here as ``xfail(strict=True)`` with its cause as the reason.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from hostile import HostileThread, Request, Wire, json_wire
from review_servers import DATA, ETAG, FakeApi, honest, range_start
from review_servers_2 import Trailing, TrailingThread, raw_answer
from support import (
    cli_env,
    cli_in_process,
    cli_with_memory_cap,
    content_sha256,
    jobs_by_name,
    read_manifest_if_any,
    write_jobs,
)
from test_review_attacks import (
    OTHER,
    _killed_while_downloading,
    assert_clean,
    assert_exact_or_failed,
    first_then,
    run_fake,
)

N = len(DATA)
SHA = hashlib.sha256(DATA).hexdigest()
ENVELOPE = b'{"status":"error","error":"Internal server error","error_id":"e-77"}'
JSON = [("Content-Type", "application/json")]


async def _answer(wire: Wire) -> Wire:
    return wire


# -- 1. the API's error envelope, in the forms the new check does not look at ------------------------
@pytest.mark.parametrize("accept_gzip", [True, False], ids=["accept-gzip", "gzip-unasked"])
def test_a_gzipped_error_envelope_served_as_the_file_is_never_saved(tmp_path: Path, accept_gzip: bool) -> None:
    """The API's envelope with 200 application/json and Content-Encoding: gzip (nginx gzips JSON), then the
    file: the envelope is never saved as a one-record result."""
    fake = FakeApi()
    zipped = Wire(200, [*JSON, ("Content-Encoding", "gzip")], gzip.compress(ENVELOPE))
    fake.download = first_then(zipped, lambda req: honest(DATA, req))  # type: ignore[method-assign]
    with HostileThread("http://127.0.0.1:9", fake) as proxy:
        jobs = write_jobs(tmp_path, [{"name": "j", "export_id": "1"}], api={"accept_gzip": accept_gzip})
        proc = cli_in_process("run", str(jobs), env=cli_env(proxy.url))
    out = tmp_path / "out"
    doc = read_manifest_if_any(out)
    assert_exact_or_failed(proc, jobs_by_name(doc)["j"] if doc else None, out)


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_an_error_envelope_answering_the_check_of_an_empty_answer_is_never_saved(tmp_path: Path, framing: Any) -> None:
    """An empty 200 without a length (chunked, or closed), then the check of it (Range: bytes=0-) answered by the
    envelope with 200 application/json, then the file: the envelope is never saved as the result."""
    fake = FakeApi()
    calls = {"n": 0}

    async def download(req: Request) -> Wire:
        calls["n"] += 1
        if calls["n"] == 1:
            return Wire(200, [("Content-Type", "application/octet-stream")], b"", framing=framing)
        if calls["n"] == 2:
            return Wire(200, JSON, ENVELOPE)
        return honest(DATA, req)

    fake.download = download  # type: ignore[method-assign]
    proc, entry, out = run_fake(tmp_path, fake)
    assert_exact_or_failed(proc, entry, out)


# -- 2. a part file resumed across a kill: what the rerun no longer knows ------------------------------
def _resumed(tmp_path: Path, later: Any) -> tuple[Any, Any, Path, list[tuple[str | None, str | None]]]:
    """kill -9 after 10,000 bytes of DATA with ETag "v1" recorded; the rerun's download requests are
    answered by ``later(req)``. Returns (process, entry, out, the (Range, If-Range) of each request)."""
    fake = _killed_while_downloading(tmp_path, DATA[:10_000], file_validator=ETAG, file_size=N)
    asked: list[tuple[str | None, str | None]] = []

    async def download(req: Request) -> Wire:
        asked.append((req.headers.get("range"), req.headers.get("if-range")))
        return later(req) if len(asked) == 1 else honest(DATA, req)

    fake.download = download  # type: ignore[method-assign]
    proc, entry, out = run_fake(tmp_path, fake)
    return proc, entry, out, asked


def test_a_416_at_the_part_files_size_after_a_kill_is_not_the_end(tmp_path: Path) -> None:
    """Rerun of a part file of 10,000 bytes (ETag "v1" recorded): a 416 'bytes */10000' to its resume is the
    lie the first review refused within one run (the killed run saw Content-Length 88,890): never a 10 kB success."""
    proc, entry, out, asked = _resumed(tmp_path, lambda req: Wire(416, [("Content-Range", "bytes */10000")]))
    assert asked[0] == ("bytes=10000-", ETAG)
    assert_exact_or_failed(proc, entry, out)


def test_a_206_total_that_shrinks_after_a_kill_is_not_the_end(tmp_path: Path) -> None:
    """Rerun of a 10,000-byte part file (ETag "v1" recorded): a 206 'bytes 10000-10099/10100' with the same ETag
    (the killed run saw Content-Length 88,890): never a 10 kB file reported as the whole one."""
    proc, entry, out, _ = _resumed(
        tmp_path,
        lambda req: Wire(206, [("ETag", ETAG), ("Content-Range", "bytes 10000-10099/10100")], DATA[10_000:10_100]),
    )
    assert_exact_or_failed(proc, entry, out)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.parametrize("status", ["DOWNLOADING", "SUCCEEDED"])
def test_a_compressed_part_file_left_by_a_kill_is_downloaded_again_exact(
    tmp_path: Path, compression: str, status: str
) -> None:
    """kill -9 mid-download (or between the record and the rename) of a gzip/zstd job: the compressed part file
    is never continued, the rerun's .gz/.zst holds the server's exact bytes and the sha256 recorded."""
    suffix = {"gzip": ".gz", "zstd": ".zst"}[compression]
    name = f"j.ndjson{suffix}"
    fake = _killed_while_downloading(
        tmp_path,
        b"",
        status=status,
        file_validator=ETAG,
        file_size=N,
        path=name if status == "SUCCEEDED" else None,
        sha256=SHA if status == "SUCCEEDED" else None,
    )
    (tmp_path / "out" / ".j.ndjson.700.part").unlink()  # the helper's uncompressed part file
    part = tmp_path / "out" / f".{name}.700.part"
    part.write_bytes(gzip.compress(DATA[:10_000]) if status == "DOWNLOADING" else gzip.compress(OTHER))
    asked: list[str | None] = []
    plain = fake.download

    async def download(req: Request) -> Wire:
        asked.append(req.headers.get("range"))
        return await plain(req)

    fake.download = download  # type: ignore[method-assign]
    proc, entry, out = run_fake(tmp_path, fake, compression=compression)
    assert_clean(proc, out)
    assert entry is not None and entry["status"] == "SUCCEEDED", proc.stderr
    assert content_sha256(out / name) == SHA == entry["sha256"]
    assert asked == [None]


# -- 3. HTTP framing a proxy breaks: bytes after an answer on a kept-alive connection ------------------
def test_garbage_after_an_answers_length_on_a_kept_alive_connection_is_not_the_next_answer(tmp_path: Path) -> None:
    """A 503 whose body runs past its Content-Length (the rest comes after the client has read it): the retried
    download is exact, the stray bytes never become part of the next answer."""
    fake = FakeApi()
    bad = Trailing(503, JSON, ENVELOPE, then=b"...the rest of a longer error page</html>\r\n")
    fake.download = first_then(bad, lambda req: honest(DATA, req))  # type: ignore[method-assign]
    proc, entry, out = run_fake(tmp_path, fake, via=TrailingThread)
    assert assert_exact_or_failed(proc, entry, out) == "SUCCEEDED"


def test_a_second_answer_to_one_request_never_becomes_the_file(tmp_path: Path) -> None:
    """A 503 followed on the same kept-alive connection by a stray whole 200 answer (a proxy answering one request
    twice): the retried download gets the server's own file, never the stray answer's bytes."""
    fake = FakeApi()
    stray = raw_answer(200, [("ETag", ETAG), ("Content-Type", "application/x-ndjson")], OTHER)
    bad = Trailing(503, JSON, ENVELOPE, then=stray)
    fake.download = first_then(bad, lambda req: honest(DATA, req))  # type: ignore[method-assign]
    proc, entry, out = run_fake(tmp_path, fake, via=TrailingThread)
    assert_exact_or_failed(proc, entry, out)


# -- 4. lists in the older dialect: no total, a stray max_result, a page size the server chooses -------
def _capped_exports(count: int, cap: int = 10) -> FakeApi:
    """``count`` exports in organisation 1426, listed ``cap`` a page whatever was asked, as an older list: no
    ``total``, no ``max_results``, a stray ``max_result`` saying the page size the server used."""
    fake = FakeApi()
    exports = [
        {"id": str(100 + i), "name": f"export-{i}", "query_id": str(i), "datamart_id": "1509"} for i in range(count)
    ]

    async def other(req: Request) -> Wire:
        if req.method == "GET" and req.path == "/v1/exports":
            first = int(req.query.get("first_result", "0"))
            page = exports[first : first + cap]
            return json_wire(
                200, {"status": "ok", "data": page, "count": len(page), "first_result": first, "max_result": cap}
            )
        return json_wire(404, {"status": "error", "error": "Resource Not Found", "error_id": "e-2"})

    fake.other = other  # type: ignore[method-assign]
    return fake


def test_exports_list_pages_past_a_server_capped_page_without_total(tmp_path: Path) -> None:
    """`exports list` on an older list (no total, stray max_result: 10, ten a page whatever was asked): every one
    of the 12 exports is printed, as SPEC promises ('pages through every page')."""
    fake = _capped_exports(12)
    with HostileThread("http://127.0.0.1:9", fake) as proxy:
        proc = cli_in_process("exports", "list", "--organisation-id", "1426", "--json", env=cli_env(proxy.url))
    assert_clean(proc, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(e["id"] for e in orjson.loads(proc.stdout)) == [str(100 + i) for i in range(12)]


def test_a_query_jobs_export_past_a_capped_first_page_is_found_not_made_again(tmp_path: Path) -> None:
    """A query job whose export (made by an earlier run) is the 12th of an older list capped at ten a page: the run
    reuses it (exact file), never checks or creates a query or an export again."""
    text = 'SELECT {id} FROM UserPoint WHERE segments {id="1"}'
    fake = _capped_exports(11)
    listing = fake.other
    mine = {"id": "555", "name": "mics-export:j", "query_id": "77", "datamart_id": "1509", "organisation_id": "1426"}
    posts: list[str] = []

    async def other(req: Request) -> Wire:
        if req.method == "GET" and req.path == "/v1/exports" and req.query.get("first_result") == "10":
            return json_wire(200, {"status": "ok", "data": [mine], "count": 1, "first_result": 10, "max_result": 10})
        if req.method == "GET" and req.path == "/v1/datamarts/1509/queries/77":
            return json_wire(200, {"status": "ok", "data": {"id": "77", "datamart_id": "1509", "query_text": text}})
        if req.method in ("POST", "PUT"):
            posts.append(f"{req.method} {req.path}")
        return await listing(req)

    fake.other = other  # type: ignore[method-assign]
    with HostileThread("http://127.0.0.1:9", fake) as proxy:
        jobs = write_jobs(tmp_path, [{"name": "j", "query": {"datamart_id": "1509", "text": text}, "retries": 0}])
        proc = cli_in_process("run", str(jobs), env=cli_env(proxy.url))
    out = tmp_path / "out"
    doc = read_manifest_if_any(out)
    assert posts == []
    assert assert_exact_or_failed(proc, jobs_by_name(doc)["j"] if doc else None, out) == "SUCCEEDED"


# -- 5. what is planted between runs: a journal as large as a disk hole makes it ----------------------
@pytest.mark.parametrize("command", ["status", "run"])
def test_a_journal_larger_than_memory_is_one_line_not_an_unexpected_error(tmp_path: Path, command: str) -> None:
    """A 1.2 GiB (sparse) .manifest.journal beside a good manifest.json, memory capped at 900 MiB: `status` and a
    rerun say what is wrong in one line (or ignore it), never an unexpected MemoryError or an OOM kill."""

    fake = FakeApi()
    with HostileThread("http://127.0.0.1:9", fake) as proxy:
        jobs = write_jobs(tmp_path, [{"name": "j", "export_id": "1"}])
        first = cli_in_process("run", str(jobs), env=cli_env(proxy.url))
        assert first.returncode == 0, first.stderr
        with open(tmp_path / "out" / ".manifest.journal", "wb") as journal:
            journal.write(b'{"journal": 1, "base": "x"}\n')
            journal.truncate(1200 << 20)
        args = ["status", str(tmp_path / "out")] if command == "status" else ["run", "--workers", "0", str(jobs)]
        proc = cli_with_memory_cap(*args, env=cli_env(proxy.url))
    assert "unexpected" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 2), proc.stderr


# -- 6. a restart from byte 0 keeps the validator of the content it threw away ------------------------
BIG = DATA * 25
"""2.2 MB: past the 1 MiB a download holds in memory, so its part file grows on disk while it runs."""
BIG_OTHER = OTHER * 25


def test_a_restart_then_a_kill_never_resumes_the_new_bytes_with_the_old_validator(tmp_path: Path) -> None:
    """Replicas out of sync: v1 (ETag "v1") is cut, the resume comes from a replica with other content and no
    ETag, so the download restarts from byte 0 on that one; kill -9 while it runs (after another job's success
    wrote the manifest). The manifest never keeps "v1" for the new bytes, and the rerun, answered by the v1
    replica again, never continues the other content's part file with v1's bytes."""
    import asyncio
    import signal

    from support import start_cli, wait_for

    fake = FakeApi(data=BIG)
    calls = {"n": 0}
    restarted = asyncio.Event()  # both handlers run on the proxy's one loop

    async def replicas(req: Request) -> Wire:
        if "/exports/2/" in req.path:
            await restarted.wait()  # job k's file only once j restarted: its SUCCEEDED write comes after
            return honest(DATA, req)
        calls["n"] += 1
        if calls["n"] == 3:
            restarted.set()
        start = range_start(req) or 0
        if calls["n"] == 1:
            return Wire(200, [("ETag", ETAG)], BIG, cut_at=10_000)
        if calls["n"] == 2:  # the other replica: no ETag, other bytes
            return Wire(206, [("Content-Range", f"bytes {start}-{len(BIG) - 1}/{len(BIG)}")], BIG_OTHER[start:])
        if calls["n"] == 3:  # the restart, from the other replica: stalls after 1.5 MB
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(BIG_OTHER)}\r\n\r\n".encode()
            return Wire(200, [], raw=head + BIG_OTHER[:1_500_000], raw_keep_open=True)
        return honest(BIG, req)  # the v1 replica again

    fake.download = replicas  # type: ignore[method-assign]
    out = tmp_path / "out"
    with HostileThread("http://127.0.0.1:9", fake) as proxy:
        jobs = write_jobs(tmp_path, [{"name": "j", "export_id": "1"}, {"name": "k", "export_id": "2"}])
        child = start_cli("run", "--workers", "0", str(jobs), env=cli_env(proxy.url))
        try:
            part = wait_for(
                lambda: [p for p in out.glob(".j.ndjson.*.part") if p.stat().st_size > 1_100_000],
                what="the restart's bytes on disk",
            )[0]
            # k SUCCEEDED after j's restart: its write (fsynced) carried every change of j marked until then.
            wait_for(lambda: (out / "k.ndjson").exists(), what="job k's file")
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        recorded = jobs_by_name(read_manifest_if_any(out) or {"jobs": []})["j"]
        assert recorded["status"] == "DOWNLOADING" and recorded["file_validator"] is None, recorded
        assert part.read_bytes()[:1000] == BIG_OTHER[:1000]  # the part file holds the other replica's bytes
        proc = cli_in_process("run", str(jobs), env=cli_env(proxy.url))
    entry = jobs_by_name(read_manifest_if_any(out) or {"jobs": []}).get("j")
    assert_clean(proc, out)
    assert entry is not None and entry["status"] == "SUCCEEDED", proc.stderr
    assert (out / "j.ndjson").read_bytes() == BIG, "a mix of two replicas' files"
