"""Adversarial review, fourth round: attacks on the day's changes (signals handled from the first
step, the error envelope and the pool's marked connections, resumes that need a recorded
validator, the size limits on earlier manifests, YAML numbers kept as text).

Each test runs the real CLI (``support.cli_in_process``, or a subprocess where the process
itself is the point: signals, hangs) against a scripted loopback server and checks one
promise. A fault the review finds is kept as ``xfail(strict=True)`` with its cause.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cloud import S3Bucket, moto_server_fixture, s3_fixture
from review_servers_3 import Gate, S3ProxyThread, is_lock_put
from support import TOKEN, cli_env, cli_with_memory_cap, start_cli, stop_cli, write_jobs

__all__ = ["moto_server_fixture", "s3_fixture"]

PREFIX = TOKEN[:8]


def _bucket_jobs(folder: Path, output: str) -> Path:
    return write_jobs(folder, [{"name": "a", "export_id": "1"}], output=output, concurrency=2)


# -- 1. a signal during start-up: the receiver is open, nothing reads it yet -----------------------
def _is_list(req: Any) -> bool:
    return bool(req.method == "GET" and "list-type=2" in req.target)


@pytest.mark.parametrize(
    ("sig", "code", "held"), [(signal.SIGTERM, 143, "lock-put"), (signal.SIGINT, 130, "check-access-list")]
)
def test_a_signal_while_the_bucket_lock_is_taken_stops_promptly(
    s3: S3Bucket, tmp_path: Path, sig: signal.Signals, code: int, held: str
) -> None:
    """SIGTERM / SIGINT while the store holds the start-up's LIST or the lock's PUT: the run stops within
    seconds with 143 / 130 (a Kubernetes pod deleted while its store is slow), never waits on the store."""
    gate = Gate(_is_list if held == "check-access-list" else is_lock_put)
    with S3ProxyThread(s3.server.endpoint, gate) as proxy:
        path = _bucket_jobs(tmp_path, f"s3://{s3.bucket}/p")
        env = cli_env("http://127.0.0.1:9", AWS_ENDPOINT_URL=proxy.url)
        child = start_cli("run", "--workers", "0", str(path), env=env)
        try:
            assert gate.arrived.wait(30), "the held request never came"
            child.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(6)
            returncode = child.poll()
        finally:
            gate.open(drop=True)
            stderr = stop_cli(child)
    assert returncode == code, f"still running 6 s after {sig.name} (exit {returncode}): {stderr[-2000:]}"
    assert "Traceback" not in stderr and PREFIX not in stderr, stderr


# -- 2. the error envelope answered with 200: its connection is not marked ---------------------------
ENVELOPE = b'{"status":"error","error":"Internal server error","error_id":"e-77"}'
HTML = b"<html><body><h1>502 Bad Gateway</h1></body></html>"


@pytest.mark.parametrize(
    ("status", "ctype", "body"),
    [
        (503, "application/json", ENVELOPE),
        (200, "application/json", ENVELOPE),
        (200, "text/html", HTML),
        (204, "application/json", b""),
    ],
    ids=["503", "200-envelope", "200-html", "204"],
)
def test_a_late_second_answer_after_a_refused_answer_never_becomes_the_file(
    tmp_path: Path, status: int, ctype: str, body: bytes
) -> None:
    """A proxy answers the download with something refused (a 503, the API's envelope or an HTML page with 200,
    a 204), then a second time (another file, ETag "v1") once the retry is on the same kept-alive connection:
    the retry's answer is the server's file, never the stray one (SUCCEEDED only with the exact bytes)."""
    from review_servers import ETAG, FakeApi, honest
    from review_servers_2 import raw_answer
    from review_servers_4 import Late, LateThread
    from test_review_attacks import OTHER, assert_exact_or_failed, first_then, run_fake

    stray = raw_answer(200, [("ETag", ETAG), ("Content-Type", "application/x-ndjson")], OTHER)
    fake = FakeApi()
    bad = Late(status, [("Content-Type", ctype)], body, then=stray)
    fake.download = first_then(bad, lambda req: honest(fake.data, req))  # type: ignore[method-assign]
    proc, entry, out = run_fake(tmp_path, fake, via=LateThread)
    assert_exact_or_failed(proc, entry, out)


# -- 3. the size limit on an earlier run folder's manifest: a FIFO has no size ----------------------
HANGS = (
    "guards.RunHistory reads a sibling run folder's manifest.json through journal.read_manifest_with_journal, "
    "whose new size check is path.stat().st_size (0 for a FIFO) then path.read_bytes(): no regular-file check, "
    "no O_NONBLOCK (load_previous and read_journal have both); the read blocks a worker thread that "
    "anyio.to_thread.run_sync cannot abandon, so the run never ends and SIGTERM cannot stop it"
)


def test_a_fifo_as_an_earlier_run_folders_manifest_never_hangs_the_run(tmp_path: Path) -> None:
    """max_drop_pct looks in ./exports/2020-01-01 for the job's last run, whose manifest.json is a FIFO (planted,
    or a named pipe left by a tool): the run ends by itself, or at least a SIGTERM stops it with 143."""
    from hostile import HostileThread
    from review_servers import FakeApi
    from support import wait_for, write_jobs

    earlier = tmp_path / "exports" / "2020-01-01"
    earlier.mkdir(parents=True)
    fifo = earlier / "manifest.json"
    os.mkfifo(fifo)
    writer: int | None = None

    def reader_waits() -> bool:
        nonlocal writer
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # kept open: the reader then waits in read()
        except OSError:
            return False
        return True

    with HostileThread("http://127.0.0.1:9", FakeApi()) as proxy:
        jobs = write_jobs(tmp_path, [{"name": "j", "export_id": "1", "max_drop_pct": 10}])
        doc = yaml.safe_load(jobs.read_text())
        doc["run"]["output_dir"] = str(tmp_path / "exports" / "{date}")
        jobs.write_text(yaml.safe_dump(doc))
        child = start_cli("run", "--workers", "0", str(jobs), env=cli_env(proxy.url))
        try:
            ended = False
            try:
                wait_for(lambda: child.poll() is not None or reader_waits(), timeout=30, what="the FIFO's reader")
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
                child.wait(8)
                ended = True
            except subprocess.TimeoutExpired:
                pass
            returncode = child.poll()
        finally:
            if writer is not None:
                os.close(writer)  # EOF: the reader (if any) goes on
            stderr = stop_cli(child)
    assert ended and returncode in (0, 1, 143), f"still running 8 s after SIGTERM: {stderr[-2000:]}"
    assert "Traceback" not in stderr and "unexpected" not in stderr, stderr


def test_an_earlier_run_folders_manifest_linked_to_dev_zero_is_ignored(tmp_path: Path) -> None:
    """max_drop_pct looks in ./exports/2020-01-01, whose manifest.json is a symlink to /dev/zero (memory capped at
    900 MiB): that folder is passed over (the size limit's promise), the job SUCCEEDS, no unexpected error."""

    from hostile import HostileThread
    from review_servers import FakeApi
    from support import jobs_by_name, read_manifest_if_any, write_jobs

    earlier = tmp_path / "exports" / "2020-01-01"
    earlier.mkdir(parents=True)
    (earlier / "manifest.json").symlink_to("/dev/zero")
    with HostileThread("http://127.0.0.1:9", FakeApi()) as proxy:
        jobs = write_jobs(tmp_path, [{"name": "j", "export_id": "1", "max_drop_pct": 10}])
        doc = yaml.safe_load(jobs.read_text())
        doc["run"]["output_dir"] = str(tmp_path / "exports" / "{date}")
        jobs.write_text(yaml.safe_dump(doc))
        proc = cli_with_memory_cap("run", "--workers", "0", str(jobs), env=cli_env(proxy.url))
    assert "unexpected" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    outs = [p for p in (tmp_path / "exports").iterdir() if p.name != "2020-01-01"]
    assert jobs_by_name(read_manifest_if_any(outs[0]) or {"jobs": []})["j"]["status"] == "SUCCEEDED"


# -- 4. a stray max_result larger than the page asked for -------------------------------------------
def _exports_server(count: int, stray: dict[str, Any]) -> Any:
    """``count`` exports, paged as asked (first_result, max_results), as an older list: no ``total``, no
    ``max_results`` back, and the ``stray`` keys (e.g. a ``max_result`` that is not the page's size)."""
    from hostile import Request, Wire, json_wire
    from review_servers import FakeApi

    fake = FakeApi()
    exports = [
        {"id": str(100 + i), "name": f"export-{i}", "query_id": str(i), "datamart_id": "1509"} for i in range(count)
    ]

    async def other(req: Request) -> Wire:
        if req.method == "GET" and req.path == "/v1/exports":
            first, size = int(req.query.get("first_result", "0")), int(req.query.get("max_results", "10"))
            page = exports[first : first + size]
            return json_wire(200, {"status": "ok", "data": page, "count": len(page), "first_result": first, **stray})
        return json_wire(404, {"status": "error", "error": "Resource Not Found", "error_id": "e-2"})

    fake.other = other  # type: ignore[method-assign]
    return fake


def test_a_stray_max_result_larger_than_the_page_asked_never_ends_the_list_early(tmp_path: Path) -> None:
    """`exports list` on an older list (no total) that pages as asked (50) but carries a stray max_result of 1000
    (the server's own cap, not this page's size): every one of the 120 exports is printed."""
    import orjson
    from hostile import HostileThread
    from support import cli_in_process

    fake = _exports_server(120, {"max_result": 1000})
    with HostileThread("http://127.0.0.1:9", fake) as proxy:
        proc = cli_in_process("exports", "list", "--organisation-id", "1426", "--json", env=cli_env(proxy.url))
    assert proc.returncode == 0, proc.stderr
    assert len(orjson.loads(proc.stdout)) == 120, "exports missing from the list"


# -- 5. the error-envelope check refuses a real one-record file of that shape ------------------------
def test_a_one_record_result_shaped_like_the_envelope_is_the_file(tmp_path: Path) -> None:
    """A result of one record {"status":"error","error":"timeout"} (an export of job logs), served as
    application/json with its NDJSON newline and an ETag: it is the file, saved byte for byte."""
    from hostile import Wire
    from review_servers import ETAG, FakeApi
    from test_review_attacks import assert_exact_or_failed, run_fake

    data = b'{"status":"error","error":"timeout","job":"nightly-42"}\n'
    fake = FakeApi(data=data)

    async def download(req: Any) -> Wire:
        return Wire(200, [("Content-Type", "application/json"), ("ETag", ETAG)], data)

    fake.download = download  # type: ignore[method-assign]
    proc, entry, out = run_fake(tmp_path, fake, retries=0)
    assert assert_exact_or_failed(proc, entry, out, data) == "SUCCEEDED"
