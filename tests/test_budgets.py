"""One retry budget per operation: the retries inside an operation draw from its budget, never multiply.

Counted on the simulator behind a hostile proxy (real loopback HTTP, in-process runs): the
creates of one attempt and the client's own retries of a 429 share one budget; a download
restarted from byte 0 after a content change keeps the budget of the download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hostile import Forward, Request, Wire, is_create, is_download, json_wire, passthrough, scene, small_spec
from inprocess import clean_environment, job_file, only_job
from support import TOKEN

import orchestrator
from orchestrator import JobStatus

RETRIES = {"max_tries": 4, "base_s": 0.001, "max_wait_s": 0.01}


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the job file says where the API is; the token is in the variable it names."""
    clean_environment(monkeypatch)


def test_a_create_and_its_429_retries_share_one_budget(tmp_path: Path) -> None:
    """Creates answered 429, then 504 (outcome unknown), in turn: max_tries POSTs in all (4), not
    max_tries unknown outcomes each retried on a budget of its own (8 before); no execution."""
    spec = small_spec("21")
    posts: list[int] = []

    async def handler(req: Request, forward: Forward) -> Wire:
        if not is_create(req):
            return await passthrough(req, forward)
        posts.append(len(posts))
        if len(posts) % 2:
            return json_wire(429, {"status": "error", "error": "Too Many Requests"})
        return json_wire(504, {"status": "error", "error": "Gateway Timeout"})

    with scene(handler, spec, token=TOKEN) as (sim, _proxy):
        path = job_file(tmp_path, _proxy.url, [{"name": "j", "export_id": "21"}], api={"retries": RETRIES})
        result = orchestrator.run(path, workers=0)
        created = dict(sim.stats.executions_created)
    job = only_job(result)
    assert job.status is JobStatus.FAILED and job.execution_id is None
    assert len(posts) == RETRIES["max_tries"] and created == {}
    assert job.error is not None and job.error.startswith(
        "could not create an execution of export 21: the outcome was unknown 2 times"
    )


def changing_download(data: bytes) -> tuple[Any, list[Request]]:
    """Downloads without Range: two 503s, then the file cut after 1,000 bytes, in turn; every
    resume (Range) gets a 206 with another ETag (the file changed: restart from byte 0)."""
    opens: list[Request] = []

    async def handler(req: Request, forward: Forward) -> Wire:
        if not is_download(req):
            return await passthrough(req, forward)
        opens.append(req)
        if "range" in req.headers:
            start = int(req.headers["range"].removeprefix("bytes=").rstrip("-"))
            headers = [
                ("ETag", '"changed"'),
                ("Content-Type", "application/x-ndjson"),
                ("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"),
            ]
            return Wire(206, headers, data[start:])
        if sum("range" not in r.headers for r in opens) % 3:
            return json_wire(503, {"status": "error", "error": "busy"})
        return (await forward()).wire(cut_at=1_000)

    return handler, opens


def test_a_download_restarted_after_a_content_change_keeps_its_budget(tmp_path: Path) -> None:
    """503, 503, a cut, a changed file (restart), then 503s: the restarted stream draws on the
    download's budget and gives up after its last try — 6 requests, not a fresh budget per
    restart (16: four streams of 503, 503, cut, change); no file is left."""
    spec = small_spec("22", size_bytes=20_000)
    handler, opens = changing_download(spec.result().read_all())
    retries = {**RETRIES, "max_tries": 3}
    with scene(handler, spec, token=TOKEN) as (_sim, proxy):
        path = job_file(tmp_path, proxy.url, [{"name": "j", "export_id": "22"}], api={"retries": retries})
        result = orchestrator.run(path, workers=0)
    job = only_job(result)
    assert job.status is JobStatus.FAILED
    assert job.error is not None and "503" in job.error and "restarts" not in job.error
    assert len(opens) == 6
    assert [("range" in r.headers) for r in opens] == [False, False, False, True, False, False]
    assert not (tmp_path / "out" / "j.ndjson").exists()
