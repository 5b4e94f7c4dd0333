"""The Python API (orchestrator.run / run_async): typed results, no raise for job failures,
usage errors as exceptions, any thread, any event loop, and the host's logging left alone.

In-process against the simulator on its own thread: the same code path as the CLI, without
a subprocess per case.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from conftest import TOKEN, fast_spec, sim_config
from support import assert_exact, jobs_by_name, manifest, write_jobs

import orchestrator
from orchestrator import ConfigError, JobResult, JobStatus, MissingTokenError, RunResult, RunStatus, UsageError
from orchestrator.config import parse_job_file
from orchestrator.sharding import shard_of
from orchestrator.simulator import ExportSpec, SimulatorThread

TOKEN_ENV = "PYAPI_TEST_TOKEN"


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the job file says where the API is: no override, shard or deadline from outside."""
    for name in ("MICS_API_URL", "MICS_DEADLINE_S", "MICS_SHARD_COUNT", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    """Four fast exports (7003 always fails) on a simulator thread."""
    specs = [fast_spec("7001"), fast_spec("7002", size_bytes=50_000), fast_spec("7003", always_fail=True)]
    specs.append(fast_spec("7004", invalid_every=100))
    with SimulatorThread(sim_config(*specs)) as s:
        yield s


def _jobs(tmp_path: Path, sim: SimulatorThread, *exports: str, **kw: Any) -> Path:
    jobs = [{"name": f"job-{e}", "export_id": e} for e in exports]
    return write_jobs(tmp_path, jobs, api={"base_url": sim.url, "token_env": TOKEN_ENV}, **kw)


def _spec(sim: SimulatorThread, export_id: str) -> ExportSpec:
    return next(e for e in sim.sim.config.exports if e.id == export_id)


def test_run_returns_typed_results_byte_exact(tmp_path: Path, sim: SimulatorThread) -> None:
    """run() returns the manifest as frozen typed values that match the files the simulator served."""
    path = _jobs(tmp_path, sim, "7001", "7002", "7004")
    result = orchestrator.run(path, workers=0)
    out = tmp_path / "out"
    assert isinstance(result, RunResult) and result.ok
    assert result.status is RunStatus.SUCCEEDED and result.exit_code == 0
    assert result.output == str(out) and result.manifest_path == str(out / "manifest.json")
    assert [j.name for j in result.jobs] == ["job-7001", "job-7002", "job-7004"]
    entries = jobs_by_name(manifest(out))
    for job in result.jobs:
        served = _spec(sim, job.export_id or "").result()
        assert isinstance(job, JobResult) and job.status is JobStatus.SUCCEEDED and job.ok
        assert (job.bytes, job.records, job.invalid_lines) == (served.size, served.records, served.invalid_lines)
        assert job.sha256 == served.sha256() == entries[job.name]["sha256"]
        assert job.execution_id == entries[job.name]["execution_id"] is not None
        assert job.location == str(out / f"{job.name}.ndjson") and job.path == f"{job.name}.ndjson"
        assert_exact(out, job.name, _spec(sim, job.export_id or ""))
    assert result.job("job-7004").invalid_lines > 0  # counted, and still a success (on_invalid: keep)
    assert manifest(out)["run_id"] == result.run_id
    with pytest.raises(AttributeError):
        result.status = RunStatus.FAILED  # frozen: a result cannot be edited by mistake


def test_a_failing_job_is_a_result_not_an_exception(tmp_path: Path, sim: SimulatorThread) -> None:
    """A job whose executions fail gives status FAILED, ok False and exit_code 1; run() does not raise."""
    path = _jobs(tmp_path, sim, "7001", "7003", defaults={"retries": 0})
    result = orchestrator.run(path, workers=0)
    assert not result.ok and result.status is RunStatus.FAILED and result.exit_code == 1
    failed = result.job("job-7003")
    assert failed.status is JobStatus.FAILED and not failed.ok and failed.error
    assert result.failed == (failed,)
    assert result.job("job-7001").ok
    assert manifest(tmp_path / "out")["exit_code"] == 1


def test_usage_errors_raise_before_anything_is_sent(tmp_path: Path, sim: SimulatorThread) -> None:
    """A bad job file raises ConfigError, a missing token MissingTokenError, a held folder UsageError."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\njobs: [{name: a}]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        orchestrator.run(bad)
    with pytest.raises(ConfigError, match="no such file"):
        orchestrator.run(tmp_path / "missing.yaml")
    path = _jobs(tmp_path, sim, "7001")
    with pytest.raises(ConfigError, match="unknown job"):
        orchestrator.run(path, only=["nope"])
    with pytest.raises(UsageError, match="deadline"):
        orchestrator.run(path, deadline="soon")
    os.environ.pop(TOKEN_ENV)
    with pytest.raises(MissingTokenError):
        orchestrator.run(path)
    os.environ[TOKEN_ENV] = TOKEN
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds the folder
        with pytest.raises(UsageError, match="another mics-export run"):
            orchestrator.run(path, workers=0)
    finally:
        os.close(fd)
    assert sum(sim.stats.executions_created.values()) == 0


def test_run_from_a_worker_thread(tmp_path: Path, sim: SimulatorThread) -> None:
    """run() works off the main thread (an Airflow task), validation processes included, and
    leaves the process's signal handlers alone."""
    path = _jobs(tmp_path, sim, "7001", "7002")
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    results: list[RunResult | BaseException] = []

    def task() -> None:
        try:
            results.append(orchestrator.run(path, workers=1))
        except BaseException as exc:  # reported by the assertion below
            results.append(exc)

    thread = threading.Thread(target=task, name="airflow-task")
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    (result,) = results
    assert isinstance(result, RunResult) and result.ok, result
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert_exact(tmp_path / "out", "job-7002", _spec(sim, "7002"))


@pytest.mark.anyio
async def test_run_async_in_an_event_loop(tmp_path: Path, sim: SimulatorThread) -> None:
    """run_async runs inside the caller's event loop, beside the caller's own tasks."""
    path = _jobs(tmp_path, sim, "7001", "7002")
    ticks = 0

    async def other_work() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(other_work)
        result = await orchestrator.run_async(path, workers=0)
        tg.cancel_scope.cancel()
    assert result.ok and ticks > 1
    assert_exact(tmp_path / "out", "job-7001", _spec(sim, "7001"))


@pytest.mark.anyio
async def test_cancelling_run_async_interrupts_the_run(tmp_path: Path) -> None:
    """A caller's cancellation stops the run as SIGINT does: INTERRUPTED, exit_code 130, no part file."""
    with SimulatorThread(sim_config(fast_spec("7005", stall=True))) as sim:
        path = _jobs(tmp_path, sim, "7005")
        out = tmp_path / "out"
        with anyio.move_on_after(30) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(orchestrator.run_async, path)

                async def started() -> bool:
                    return (out / "manifest.json").exists() and bool(
                        manifest(out)["jobs"] and manifest(out)["jobs"][0]["execution_id"]
                    )

                while not await started():
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught
    doc = manifest(out)
    assert doc["status"] == "INTERRUPTED" and doc["exit_code"] == 130
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]


def test_a_job_file_object_and_simulate(tmp_path: Path) -> None:
    """A JobFile parsed in Python is accepted as is; simulate=True needs no token and no URL."""
    doc = yaml.safe_load(write_jobs(tmp_path, [{"name": "visitors", "export_id": "9879"}]).read_text())
    job_file = parse_job_file(doc, "in-memory")
    os.environ.pop(TOKEN_ENV)
    result = orchestrator.run(job_file, simulate=True, workers=0, output=str(tmp_path / "sim-out"))
    assert result.ok and result.output == str(tmp_path / "sim-out")
    (job,) = result.jobs
    assert job.name == "visitors" and job.records and job.sha256
    assert (tmp_path / "sim-out" / "visitors.ndjson").stat().st_size == job.bytes


def test_only_and_shard_select_jobs(tmp_path: Path, sim: SimulatorThread) -> None:
    """only= picks jobs by name (a list or a comma-separated string); shard= (I, N) or "I/N" a
    stable subset, written into the shard's own folder."""
    names = ["job-7001", "job-7002", "job-7004"]
    path = _jobs(tmp_path, sim, "7001", "7002", "7004")
    result = orchestrator.run(path, only=["job-7001", "job-7004"], workers=0)
    assert [j.name for j in result.jobs] == ["job-7001", "job-7004"] and result.ok
    assert [j.name for j in orchestrator.run(path, only="job-7002", workers=0).jobs] == ["job-7002"]
    for shard in ((0, 2), "1/2"):
        index = shard[0] if isinstance(shard, tuple) else 1
        result = orchestrator.run(path, shard=shard, workers=0)
        assert [j.name for j in result.jobs] == [n for n in names if shard_of(n, 2) == index]
        assert result.output == str(tmp_path / "out" / f"shard-{index}-of-2") and result.ok
    with pytest.raises(UsageError, match="out of range"):
        orchestrator.run(path, shard=(2, 2))


def test_the_library_leaves_logging_to_its_host(tmp_path: Path, sim: SimulatorThread, caplog: Any) -> None:
    """No handler is added or removed and no level changed; the run's lines reach the host's handlers."""
    root, ours = logging.getLogger(), logging.getLogger("orchestrator")
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        before = list(root.handlers), root.level, list(ours.handlers), ours.level
        result = orchestrator.run(_jobs(tmp_path, sim, "7001"), workers=0)
        after = list(root.handlers), root.level, list(ours.handlers), ours.level
    assert result.ok and after == before
    assert any(getattr(r, "event", None) == "run_finished" for r in caplog.records)
