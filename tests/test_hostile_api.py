"""The run against a hostile API (issue 10): endless lists, trickles, loose typing, echoed tokens, 5xx after create.

Each test runs the real CLI (in process: ``support.cli_in_process``, the same ``main()``
without a Python start-up; `exports list` in a subprocess) against the hostile proxy
(tests/hostile.py) in front of a simulator, and checks what the issue asks of every case: the outcome is a
byte-exact file or a job that is not SUCCEEDED with exit code 1; no traceback; the token
(nor its first characters) nowhere in stderr, the manifest or any file; no second
execution; no hang past the deadline. Client-level behaviour is tested in-process in
test_api.py; what is here is the run's: which job fails, with what line, and what the
others do meanwhile.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from hostile import (
    Forward,
    Handler,
    HostileThread,
    Request,
    Wire,
    html_wire,
    is_create,
    is_download,
    is_error_file,
    is_executions_list,
    json_wire,
    passthrough,
    scene,
    small_spec,
)
from support import TOKEN, assert_exact, cli_env, cli_in_process, jobs_by_name, leftovers, manifest, run_cli, write_jobs

from orchestrator.context import bind_job

PREFIX = TOKEN[:8]
"""The token's first characters: an error cut at the wrong place would leak these."""


def _run(
    tmp_path: Path, proxy: HostileThread, jobs: list[dict[str, Any]], *args: str, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """``mics-export run`` of ``jobs`` through the proxy, in process (a hang fails at pytest's timeout)."""
    path = write_jobs(tmp_path, jobs, **kw)
    return cli_in_process("run", str(path), *args, env=cli_env(proxy.url))


def _clean(proc: subprocess.CompletedProcess[str], out: Path, code: int) -> dict[str, dict[str, Any]]:
    """The checks every case shares: exit code, one-line errors, no token anywhere; the manifest's jobs."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for text in (proc.stderr, proc.stdout):
        assert TOKEN not in text and PREFIX not in text
    for path in out.iterdir():
        if path.is_file():
            data = path.read_bytes()
            assert TOKEN.encode() not in data and PREFIX.encode() not in data, path.name
    doc = manifest(out)
    assert doc["status"] == ("SUCCEEDED" if code == 0 else "FAILED")
    assert leftovers(out) == []
    return jobs_by_name(doc)


def _for_export(export_id: str, predicate: Callable[[Request], bool]) -> Callable[[Request], bool]:
    return lambda req: predicate(req) and req.path.startswith(f"/v1/exports/{export_id}/")


def _rewrite_list(change: Callable[[dict[str, Any]], dict[str, Any]], only: Callable[[Request], bool]) -> Handler:
    """Forward; answers to executions lists that ``only`` picks get their envelope changed."""

    async def handler(req: Request, forward: Forward) -> Wire:
        reply = await forward()
        if reply.status == 200 and is_executions_list(req) and only(req):
            return reply.with_json(change(reply.json()))
        return reply.wire()

    return handler


def _chain(*pairs: tuple[Callable[[Request], bool], Handler]) -> Handler:
    """The first handler whose predicate picks the request answers it; the rest pass through."""

    async def handler(req: Request, forward: Forward) -> Wire:
        for picks, chosen in pairs:
            if picks(req):
                return await chosen(req, forward)
        return await passthrough(req, forward)

    return handler


# -- item 5: lists that never end ----------------------------------------------------------------
async def _same_exports_page(req: Request, forward: Forward) -> Wire:
    items = [{"id": str(100 + i), "name": f"someone-else-{i}", "organisation_id": "1426"} for i in range(50)]
    return json_wire(200, {"status": "ok", "data": items, "count": 50, "total": 10**6, "first_result": 0})


def test_an_export_lookup_that_repeats_its_page_fails_that_job_only(tmp_path: Path) -> None:
    """A query job whose exports list ignores first_result fails after 2 pages, saying why; the other job succeeds."""
    plain = small_spec("7")
    handler = _chain((lambda r: r.method == "GET" and r.path == "/v1/exports", _same_exports_page))
    with scene(handler, plain) as (sim, proxy):
        jobs: list[dict[str, Any]] = [
            {"name": "q", "query": {"datamart_id": "1509", "text": "SELECT {id} FROM UserPoint"}},
            {"name": "plain", "export_id": "7"},
        ]
        proc = _run(tmp_path, proxy, jobs)
        lists = proxy.count(lambda r: r.path == "/v1/exports")
        created = sim.stats.exports_created
    entries = _clean(proc, tmp_path / "out", 1)
    assert entries["q"]["status"] == "FAILED"
    assert "the API kept returning the same page" in entries["q"]["error"]
    assert "stopped after 2 pages" in entries["q"]["error"]
    assert lists == 2 and created == 0
    assert_exact(tmp_path / "out", "plain", plain)


def test_exports_list_that_repeats_its_page_ends_with_one_line() -> None:
    """`exports list` against a list that ignores first_result exits 1 with one line after 2 pages."""
    with scene(_chain((lambda r: r.path == "/v1/exports", _same_exports_page))) as (_sim, proxy):
        proc = run_cli("exports", "list", "--organisation-id", "1426", env=cli_env(proxy.url), timeout=30)
        lists = proxy.count(lambda r: r.path == "/v1/exports")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and TOKEN not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "the API kept returning the same page" in line and "stopped after 2 pages" in line
    assert lists == 2


def test_a_poll_whose_list_repeats_its_page_fails_that_job(tmp_path: Path) -> None:
    """Polling a list that never shows the execution and repeats its page stops with an error, not a loop."""

    async def other_executions(req: Request, forward: Forward) -> Wire:
        items = [{"id": f"9{i}", "status": "RUNNING"} for i in range(10)]
        return json_wire(200, {"status": "ok", "data": items, "total": 500, "first_result": 0, "max_results": 10})

    with scene(_chain((is_executions_list, other_executions)), small_spec("1")) as (sim, proxy):
        proc = _run(tmp_path, proxy, [{"name": "j", "export_id": "1"}])
        lists = proxy.count(is_executions_list)
        created = sim.stats.executions_created["1"]
    entries = _clean(proc, tmp_path / "out", 1)
    assert "the API kept returning the same page" in entries["j"]["error"]
    assert lists == 2 and created == 1


# -- item 6: every call within the deadline ------------------------------------------------------
async def _trickle(req: Request, forward: Forward) -> Wire:
    """The simulator's answer, or a made-up one when it has none, sent at 1 byte a second."""
    reply = await forward()
    if reply.status == 404 or not reply.body:
        return Wire(200, [("Content-Type", "text/plain")], b"x" * 120, trickle_bps=1)
    return reply.wire(trickle_bps=1)


def test_a_trickling_error_file_does_not_outlive_the_deadline(tmp_path: Path) -> None:
    """A FAILED execution whose error file trickles at 1 byte/s ends its job within timeout_s=2, not minutes later."""
    with scene(_chain((is_error_file, _trickle)), small_spec("1", always_fail=True)) as (sim, proxy):
        started = time.monotonic()
        proc = _run(tmp_path, proxy, [{"name": "bad", "export_id": "1", "timeout_s": 2, "retries": 0}])
        elapsed = time.monotonic() - started
        created = sim.stats.executions_created["1"]
    entries = _clean(proc, tmp_path / "out", 1)
    assert elapsed < 15, elapsed  # the 120-byte file alone would take 2 minutes
    assert entries["bad"]["status"] == "FAILED"
    assert "ended FAILED; 1 attempt(s) used" in entries["bad"]["error"]
    assert entries["bad"]["error_file"] is None and created == 1


def test_lookups_that_trickle_end_at_the_deadline(tmp_path: Path) -> None:
    """A trickling exports lookup and a trickling lost-create lookup each end their job TIMED_OUT within timeout_s."""

    async def gateway_timeout(req: Request, forward: Forward) -> Wire:
        return json_wire(504, {"status": "error", "error": "Gateway Timeout"})

    handler = _chain(
        (lambda r: r.path == "/v1/exports", _trickle),
        (_for_export("2", is_create), gateway_timeout),
        (_for_export("2", is_executions_list), _trickle),
    )
    with scene(handler, small_spec("2")) as (_sim, proxy):
        started = time.monotonic()
        jobs = [
            {"name": "q", "query": {"datamart_id": "1509", "text": "SELECT {id} FROM UserPoint"}, "timeout_s": 2},
            {"name": "lost", "export_id": "2", "timeout_s": 2},
        ]
        proc = _run(tmp_path, proxy, jobs)
        elapsed = time.monotonic() - started
    entries = _clean(proc, tmp_path / "out", 1)
    assert elapsed < 15, elapsed
    assert entries["q"]["status"] == "TIMED_OUT" and "timeout_s=2" in entries["q"]["error"]
    assert entries["lost"]["status"] == "TIMED_OUT"
    assert "no execution could be adopted or created within timeout_s=2" in entries["lost"]["error"]


# -- item 13: the outcome of a create that failed is looked up, never guessed --------------------
async def _created_then_504(req: Request, forward: Forward) -> Wire:
    await forward()  # the platform made it...
    return json_wire(504, {"status": "error", "error": "Gateway Timeout", "error_id": "g-1"})  # ...and no one heard


async def _created_then_reset(req: Request, forward: Forward) -> Wire:
    return (await forward()).wire(cut_at=0, reset=True)


async def _created_then_null(req: Request, forward: Forward) -> Wire:
    reply = await forward()
    return reply.with_json({**reply.json(), "data": None})


@pytest.mark.parametrize("answer", [_created_then_504, _created_then_reset, _created_then_null])
def test_a_create_with_an_unknown_outcome_is_found_not_repeated(tmp_path: Path, answer: Handler) -> None:
    """A create that made the execution but answered 504, a reset or data: null is found: one execution, exact file."""
    spec = small_spec("1")
    once = {"done": False}

    async def first_create(req: Request, forward: Forward) -> Wire:
        if once["done"]:
            return await passthrough(req, forward)
        once["done"] = True
        return await answer(req, forward)

    with scene(_chain((is_create, first_create)), spec) as (sim, proxy):
        proc = _run(tmp_path, proxy, [{"name": "j", "export_id": "1"}])
        created, posts = sim.stats.executions_created["1"], proxy.count(is_create)
    entries = _clean(proc, tmp_path / "out", 0)
    assert created == 1 and posts == 1
    assert entries["j"]["attempts"] == 1
    assert_exact(tmp_path / "out", "j", spec)


# -- item 9: loose typing fails the job it hits, never the run -----------------------------------
def test_loose_and_malformed_answers_fail_only_their_jobs(tmp_path: Path) -> None:
    """String counters and "total": "lots" are fine; a missing id or an object for a list fails that job alone."""

    def loosen(env: dict[str, Any]) -> dict[str, Any]:
        items = [{**i, "num_tasks": "1000", "completed_tasks": "n/a", "erroneous_tasks": None} for i in env["data"]]
        return {**env, "data": items, "total": "lots"}

    def drop_ids(env: dict[str, Any]) -> dict[str, Any]:
        return {**env, "data": [{k: v for k, v in i.items() if k != "id"} for i in env["data"]]}

    def as_object(env: dict[str, Any]) -> dict[str, Any]:
        return {**env, "data": {"items": env["data"]}}

    handler = _chain(
        (_for_export("1", is_executions_list), _rewrite_list(loosen, lambda r: True)),
        (_for_export("2", is_executions_list), _rewrite_list(drop_ids, lambda r: True)),
        (_for_export("3", is_executions_list), _rewrite_list(as_object, lambda r: True)),
    )
    specs = [small_spec("1"), small_spec("2"), small_spec("3"), small_spec("4")]
    with scene(handler, *specs) as (sim, proxy):
        jobs = [{"name": f"j{s.id}", "export_id": s.id} for s in specs]
        proc = _run(tmp_path, proxy, jobs)
        created = dict(sim.stats.executions_created)
    entries = _clean(proc, tmp_path / "out", 1)
    assert_exact(tmp_path / "out", "j1", specs[0])
    assert_exact(tmp_path / "out", "j4", specs[3])
    assert entries["j2"]["status"] == "FAILED" and "data[0].id is missing" in entries["j2"]["error"]
    assert entries["j3"]["status"] == "FAILED" and "data is an object, not a list" in entries["j3"]["error"]
    assert "malformed answer" in entries["j3"]["error"] and "/v1/exports/3/executions" in entries["j3"]["error"]
    assert created == {"1": 1, "2": 1, "3": 1, "4": 1}


# -- items 12 and 15: the platform's own errors, without the token -------------------------------
def test_errors_show_the_platform_error_codes_and_never_the_token(tmp_path: Path) -> None:
    """Manifest errors carry the execution's error, error_code and error_id, and no echo of the token survives."""

    async def echoing_error_file(req: Request, forward: Forward) -> Wire:
        body = f"Task 3 failed\nrequest headers: Authorization: {req.headers['authorization']}\n".encode()
        return Wire(200, [("Content-Type", "text/plain")], body)

    def echo_in_error(env: dict[str, Any]) -> dict[str, Any]:
        items = [
            {**i, "error": {"message": f"{i['error']['message']} (auth {TOKEN})"}} if i.get("error") else i
            for i in env["data"]
        ]
        return {**env, "data": items}

    async def refused(req: Request, forward: Forward) -> Wire:
        doc = {"status": "error", "error": "quota exceeded", "error_code": "QUOTA_EXCEEDED", "error_id": "id-42"}
        return json_wire(400, doc)

    async def gateway_echo(req: Request, forward: Forward) -> Wire:
        # The token straddles the 200-character cut of an error text: cut first, scrub second leaks its start.
        page = "<html><body>" + "p" * 170 + f" Authorization: {req.headers['authorization']}</body></html>"
        assert page.index(TOKEN) < 200 < page.index(TOKEN) + len(TOKEN)
        return html_wire(400, page)

    handler = _chain(
        (is_error_file, echoing_error_file),
        (_for_export("1", is_executions_list), _rewrite_list(echo_in_error, lambda r: True)),
        (_for_export("2", is_create), refused),
        (_for_export("3", is_executions_list), gateway_echo),
    )
    specs = [small_spec("1", always_fail=True), small_spec("2"), small_spec("3")]
    with scene(handler, *specs) as (_sim, proxy):
        jobs: list[dict[str, Any]] = [
            {"name": "failed", "export_id": "1", "retries": 0},
            {"name": "refused", "export_id": "2"},
        ]
        jobs.append({"name": "gateway", "export_id": "3"})
        proc = _run(tmp_path, proxy, jobs, "-v", "--log-format", "json")
    out = tmp_path / "out"
    entries = _clean(proc, out, 1)
    failed = entries["failed"]["error"]
    assert failed.startswith("execution ") and "ended FAILED; 1 attempt(s) used, no retries left" in failed
    assert "simulated failure of attempt 1 (auth ***)" in failed and "error file: Task 3 failed" in failed
    assert (out / "failed.error.txt").read_bytes() == b"Task 3 failed\nrequest headers: Authorization: ***\n"
    assert "quota exceeded (error_code QUOTA_EXCEEDED, error_id id-42)" in entries["refused"]["error"]
    assert entries["gateway"]["error"].startswith("GET /v1/exports/3/executions: HTTP 400 <html><body>ppp")


# -- item 17: records and log lines -------------------------------------------------------------
def test_a_failed_rename_leaves_no_sha256_in_the_record(tmp_path: Path) -> None:
    """When the rename after record() fails (a folder at the name), the FAILED record keeps no sha256, path or size."""
    with scene(passthrough, small_spec("1")) as (_sim, proxy):
        (tmp_path / "out" / "a.ndjson").mkdir(parents=True)
        proc = _run(tmp_path, proxy, [{"name": "a", "export_id": "1"}])
    entry = _clean(proc, tmp_path / "out", 1)["a"]
    assert entry["status"] == "FAILED"
    assert (entry["sha256"], entry["path"], entry["bytes"], entry["records"]) == (None, None, None, None)


def test_retry_resume_and_unknown_status_lines_name_their_job(tmp_path: Path) -> None:
    """In JSON logs, the client's retry, the stream's resume and the unknown-status warning carry job, not null."""
    spec = small_spec("1", size_bytes=60_000)
    seen = {"list": 0, "download": 0}

    async def flaky(req: Request, forward: Forward) -> Wire:
        if is_executions_list(req):
            seen["list"] += 1
            if seen["list"] == 1:
                return json_wire(503, {"status": "error", "error": "Service Unavailable"})
            reply = await forward()
            if seen["list"] == 2:
                env = reply.json()
                return reply.with_json({**env, "data": [{**i, "status": "QUANTUM"} for i in env["data"]]})
            return reply.wire()
        if is_download(req):
            seen["download"] += 1
            reply = await forward()
            return reply.wire(cut_at=5_000) if seen["download"] == 1 else reply.wire()
        return await passthrough(req, forward)

    with scene(flaky, spec) as (_sim, proxy):
        proc = _run(tmp_path, proxy, [{"name": "j", "export_id": "1"}], "--log-format", "json")
    _clean(proc, tmp_path / "out", 0)
    assert_exact(tmp_path / "out", "j", spec)
    lines = [orjson.loads(line) for line in proc.stderr.splitlines()]
    retries = [x for x in lines if x["event"] == "retry"]
    unknown = [x for x in lines if "unknown execution status" in x["message"]]
    resumes = [x for x in lines if x["event"] == "download_resume"]
    assert retries and unknown and resumes, proc.stderr
    for line in retries + unknown + resumes:
        assert line["job"] == "j" and line["export_id"] == "1", line


@pytest.mark.anyio
async def test_the_job_context_reaches_records_of_the_client_loggers() -> None:
    """A record logged by the client inside a job's task gets the job's fields; outside any job, none are added."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("orchestrator.api")
    keep, level = Keep(logging.INFO), logger.level
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)

    async def job(name: str) -> None:
        bind_job(lambda: {"job": name, "export_id": "1", "execution_id": "e"})
        await anyio.sleep(0)
        logger.info("inside %s", name)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(job, "a")
            tg.start_soon(job, "b")
        logger.info("outside")
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
    tagged = {r.getMessage(): getattr(r, "job", None) for r in records}
    assert tagged == {"inside a": "a", "inside b": "b", "outside": None}
