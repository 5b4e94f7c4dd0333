"""Behaviours that had no test (issue 11), on the platform's and the network's side: an
execution cancelled on the platform, an adopted execution whose file is gone, the API down
on a rerun, creates whose answers are always lost, compressed outputs on a rerun, a
Retry-After given as an HTTP date, a 206 for another range than asked. Each is asserted as
the user sees it: the manifest entry and its error text, the file and its bytes, the exit
code, how many executions the platform was asked for.

In process through the public API (:func:`orchestrator.run` / :func:`orchestrator.run_async`)
against the simulator, behind the hostile proxy of :mod:`hostile` where an answer must be
one the simulator never gives. (Local faults are in ``test_behaviours_local.py``.)
"""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
import zstandard
from conftest import wait_until
from hostile import (
    Forward,
    HostileThread,
    Request,
    Wire,
    is_create,
    is_download,
    json_wire,
    passthrough,
    scene,
    small_spec,
)
from inprocess import FIRST, SECOND, clean_environment, job_file, only_job, simulator
from support import TOKEN, assert_exact, jobs_by_name, leftovers, manifest

import orchestrator
from orchestrator import JobStatus, RunStatus
from orchestrator.simulator import SimulatorConfig, SimulatorThread

NOT_FOUND = {"status": "error", "error": "Resource Not Found", "error_id": "0000-gone"}


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the job file says where the API is; the token is in the variable it names."""
    clean_environment(monkeypatch)


# -- the platform ----------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_an_execution_canceled_on_the_platform_is_cancelled_and_not_retried(tmp_path: Path) -> None:
    """An execution someone cancels on the platform: the job is CANCELLED naming it, no new execution
    is made although retries remain, no file is written, and the run FAILED (exit_code 1)."""
    spec = small_spec("11", stall=True)  # RUNNING until someone cancels it
    with simulator(spec) as sim:
        path = job_file(tmp_path, sim.url, [{"name": "j", "export_id": "11", "retries": 2}])
        async with aiohttp.ClientSession(sim.url, headers={"Authorization": TOKEN}) as http:

            async def running_execution() -> str | None:
                async with http.get("/v1/exports/11/executions") as answer:
                    items = (await answer.json())["data"]
                return items[0]["id"] if items and items[0]["status"] == "RUNNING" else None

            async def cancel_when_running() -> None:
                execution = await wait_until(running_execution, what="the execution to run")
                body = {"action": "CANCEL"}
                async with http.post(f"/v1/exports/11/executions/{execution}/action", json=body) as answer:
                    assert answer.status == 200, await answer.text()

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_when_running)
                with anyio.fail_after(60):
                    result = await orchestrator.run_async(path, workers=0)
        created = sim.stats.executions_created["11"]
    job = only_job(result)
    execution = "879879001"  # the simulator's first execution id
    assert job.status is JobStatus.CANCELLED and job.execution_id == execution
    assert job.error == f"execution {execution} ended CANCELED"
    assert job.attempts == 1 and created == 1
    assert result.status is RunStatus.FAILED and result.exit_code == 1
    out = tmp_path / "out"
    assert not (out / "j.ndjson").exists() and leftovers(out) == []
    assert jobs_by_name(manifest(out))["j"]["status"] == "CANCELLED"


def _gone_for(executions: set[str], state: dict[str, bool]) -> Any:
    """A proxy handler: once ``state["gone"]`` is set, the result files of ``executions`` answer 404
    (the platform no longer has them); everything else passes through."""

    async def handler(req: Request, forward: Forward) -> Wire:
        if state["gone"] and is_download(req) and any(e in req.target for e in executions):
            return json_wire(404, NOT_FOUND)
        return await passthrough(req, forward)

    return handler


def test_an_adopted_execution_whose_file_is_gone_gets_one_new_execution(tmp_path: Path) -> None:
    """A rerun adopts the recorded SUCCEEDED execution for a deleted file; its result answers 404:
    one new execution is made and its file lands byte-exact, recorded under the new id."""
    spec = small_spec("12")
    state = {"gone": False}
    with scene(_gone_for({FIRST}, state), spec, token=TOKEN) as (sim, proxy):
        path = job_file(tmp_path, proxy.url, [{"name": "j", "export_id": "12"}])
        first = orchestrator.run(path, workers=0)
        assert first.ok and only_job(first).execution_id == FIRST
        (tmp_path / "out" / "j.ndjson").unlink()
        state["gone"] = True
        again = orchestrator.run(path, workers=0)
        created = sim.stats.executions_created["12"]
        gone = [r for r in proxy.requests if is_download(r) and FIRST in r.target]
    job = only_job(again)
    assert again.ok and again.exit_code == 0
    assert job.execution_id == SECOND and job.attempts == 2 and created == 2
    assert len(gone) == 2  # the first run's download, then the rerun's one try at the adopted file
    assert_exact(tmp_path / "out", "j", spec)


def test_when_the_new_executions_file_is_gone_too_no_third_is_made(tmp_path: Path) -> None:
    """After an adopted execution's file is gone, the new execution's file answering 404 fails the
    job: exactly one execution is added, no file, exit_code 1."""
    spec = small_spec("13")
    state = {"gone": False}
    with scene(_gone_for({FIRST, SECOND, "879879003"}, state), spec, token=TOKEN) as (sim, proxy):
        path = job_file(tmp_path, proxy.url, [{"name": "j", "export_id": "13"}])
        assert orchestrator.run(path, workers=0).ok
        (tmp_path / "out" / "j.ndjson").unlink()
        state["gone"] = True
        again = orchestrator.run(path, workers=0)
        created = sim.stats.executions_created["13"]
    job = only_job(again)
    assert created == 2
    assert job.status is JobStatus.FAILED and job.execution_id == SECOND
    assert job.error == (
        f"GET /v1/exports/13/executions/{SECOND}/files/technical_name=export: "
        "HTTP 404 Resource Not Found (error_id 0000-gone)"
    )
    assert again.status is RunStatus.FAILED and again.exit_code == 1
    out = tmp_path / "out"
    assert not (out / "j.ndjson").exists() and leftovers(out) == []


# -- the API down, creates lost --------------------------------------------------------------------
QUERY = {"datamart_id": "1509", "text": "SELECT {id} FROM UserPoint"}


def test_a_verified_file_is_kept_when_the_api_is_down(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A rerun while every API call fails: a query job whose file is verified keeps it (a warning,
    no create), an export job's verified file is skipped without a request; the run SUCCEEDED."""
    state = {"down": False}

    async def handler(req: Request, forward: Forward) -> Wire:
        if state["down"]:
            return json_wire(503, {"status": "error", "error": "Service Unavailable"})
        return await passthrough(req, forward)

    config = SimulatorConfig(token=TOKEN, exports=(small_spec("14"),), time_scale=0.02)
    with SimulatorThread(config) as sim, HostileThread(sim.url, handler) as proxy:
        jobs: list[dict[str, Any]] = [{"name": "q", "query": QUERY}, {"name": "e", "export_id": "14"}]
        path = job_file(tmp_path, proxy.url, jobs)
        assert orchestrator.run(path, workers=0).ok
        out = tmp_path / "out"
        before = {name: (out / f"{name}.ndjson").read_bytes() for name in ("q", "e")}
        entries = jobs_by_name(manifest(out))
        state["down"] = True
        seen = len(proxy.requests)
        again = orchestrator.run(path, workers=0)
        during = proxy.requests[seen:]
        created = sum(sim.stats.executions_created.values())
    assert again.ok and again.exit_code == 0 and created == 2
    for name in ("q", "e"):
        job = again.job(name)
        assert job.status is JobStatus.SUCCEEDED and job.sha256 == entries[name]["sha256"]
        assert (out / f"{name}.ndjson").read_bytes() == before[name]
        assert hashlib.sha256(before[name]).hexdigest() == job.sha256
    assert during and all(r.method == "GET" and r.path == "/v1/exports" for r in during)  # the query's lookup only
    assert "keeping its complete file" in caplog.text


def test_creates_whose_answers_are_always_lost_end_the_job_without_an_execution(tmp_path: Path) -> None:
    """Every create answered 504 before reaching the platform: looked up, tried again up to the
    budget (3 POSTs), then the job FAILS saying so; no execution exists, the other job succeeds."""
    lost = small_spec("15")

    async def handler(req: Request, forward: Forward) -> Wire:
        if is_create(req) and "/15/" in req.path:
            return json_wire(504, {"status": "error", "error": "Gateway Timeout"})
        return await passthrough(req, forward)

    with scene(handler, lost, small_spec("16"), token=TOKEN) as (sim, proxy):
        jobs: list[dict[str, Any]] = [{"name": "j", "export_id": "15", "retries": 2}, {"name": "ok", "export_id": "16"}]
        path = job_file(
            tmp_path, proxy.url, jobs, api={"retries": {"max_tries": 3, "base_s": 0.001, "max_wait_s": 0.01}}
        )
        result = orchestrator.run(path, workers=0)
        created = dict(sim.stats.executions_created)
        posts = proxy.count(lambda r: is_create(r) and "/15/" in r.path)
    job = result.job("j")
    assert job.status is JobStatus.FAILED and job.execution_id is None and job.attempts == 0
    assert job.error == (
        "could not create an execution of export 15: the outcome was unknown 3 times and no execution "
        "appeared (last: POST /v1/exports/15/executions: HTTP 504 Gateway Timeout)"
    )
    assert posts == 3 and created == {"16": 1}
    assert result.job("ok").ok and result.exit_code == 1
    assert not (tmp_path / "out" / "j.ndjson").exists()


# -- compressed outputs on a rerun ---------------------------------------------------------------
def _decompressed(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz":
        return gzip.decompress(data)
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


@pytest.mark.parametrize(("compression", "suffix"), [("gzip", ".ndjson.gz"), ("zstd", ".ndjson.zst")])
def test_a_rerun_skips_a_complete_compressed_file_and_redoes_a_damaged_one(
    tmp_path: Path, compression: str, suffix: str
) -> None:
    """A complete .gz/.zst output is verified by its content's sha256 and skipped without a request;
    a truncated one is fetched again from the same execution and ends exact."""
    spec = small_spec("17", size_bytes=60_000)
    with simulator(spec) as sim:
        path = job_file(tmp_path, sim.url, [{"name": "j", "export_id": "17", "compression": compression}])
        assert orchestrator.run(path, workers=0).ok
        target = tmp_path / "out" / f"j{suffix}"
        written = target.read_bytes()
        seen = sim.stats.total_requests
        skipped = orchestrator.run(path, workers=0)
        requests_on_skip = sim.stats.total_requests - seen
        assert target.read_bytes() == written
        target.write_bytes(written[: len(written) // 2])
        redone = orchestrator.run(path, workers=0)
        created, downloads = sim.stats.executions_created["17"], sim.stats.downloads_completed[FIRST]
    assert skipped.ok and requests_on_skip == 0
    assert redone.ok and only_job(redone).execution_id == FIRST
    assert created == 1 and downloads == 2
    assert _decompressed(target) == spec.result().read_all()
    assert_exact(tmp_path / "out", "j", spec, suffix)


# -- HTTP: Retry-After, ranges -----------------------------------------------------------------------
def test_a_retry_after_given_as_an_http_date_is_waited_for(tmp_path: Path) -> None:
    """A 429 whose Retry-After is an HTTP date (RFC 9110 §10.2.3) one to two seconds ahead: the
    create is sent again no earlier than that date, once, and the job succeeds exact."""
    spec = small_spec("18")
    sent: list[float] = []  # wall-clock instants of the creates
    until: list[float] = []

    async def handler(req: Request, forward: Forward) -> Wire:
        if not is_create(req):
            return await passthrough(req, forward)
        sent.append(time.time())
        if len(sent) > 1:
            return await passthrough(req, forward)
        date = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: 1 to 2 s from now
        until.append(email.utils.parsedate_to_datetime(date).timestamp())
        return json_wire(429, {"status": "error", "error": "Too Many Requests"}).with_header("Retry-After", date)

    with scene(handler, spec, token=TOKEN) as (sim, proxy):
        result = orchestrator.run(job_file(tmp_path, proxy.url, [{"name": "j", "export_id": "18"}]), workers=0)
        created = sim.stats.executions_created["18"]
    assert result.ok and created == 1 and len(sent) == 2
    assert sent[1] >= until[0] - 0.05, f"sent again {until[0] - sent[1]:.2f}s before the date"
    assert_exact(tmp_path / "out", "j", spec)


def test_a_206_starting_elsewhere_than_asked_is_never_spliced_in(tmp_path: Path) -> None:
    """A download cut at byte 10,000, then every resume answered with a 206 of the whole file
    (``bytes 0-…``): the job FAILS naming the mismatch, with no file and one execution."""
    spec = small_spec("19", size_bytes=60_000)
    data = spec.result().read_all()
    etag = spec.result().etag

    async def handler(req: Request, forward: Forward) -> Wire:
        if not is_download(req):
            return await passthrough(req, forward)
        if "range" not in req.headers:
            return (await forward()).wire(cut_at=10_000)
        content_range = f"bytes 0-{len(data) - 1}/{len(data)}"
        return Wire(
            206, [("ETag", etag), ("Content-Type", "application/x-ndjson"), ("Content-Range", content_range)], data
        )

    with scene(handler, spec, token=TOKEN) as (sim, proxy):
        result = orchestrator.run(job_file(tmp_path, proxy.url, [{"name": "j", "export_id": "19"}]), workers=0)
        created = sim.stats.executions_created["19"]
        ranges = [r.headers.get("range") for r in proxy.requests if is_download(r)]
    job = only_job(result)
    assert job.status is JobStatus.FAILED and result.exit_code == 1 and created == 1
    assert ranges[:2] == [None, "bytes=10000-"]  # the resume asked for the exact offset
    assert job.error == (
        f"GET /v1/exports/19/executions/{FIRST}/files/technical_name=export: asked for bytes from 10000, "
        f"got range 'bytes 0-{len(data) - 1}/{len(data)}'"
    )
    out = tmp_path / "out"
    assert not (out / "j.ndjson").exists() and leftovers(out) == []
