"""Not paying the platform twice (reuse_within, adopting a SUCCEEDED execution after our own
failure) and deadline-aware runs, end to end: the CLI against a SimulatorThread.

The CLI's ``main()`` runs in this process (:func:`support.cli_in_process`: the same code, exit
code and stderr); only SIGTERM against a deadline needs a real ``mics-export`` process."""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DATAMART, TOKEN, fast_spec, sim_config
from support import (
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

from orchestrator.simulator import SimulatorThread

FAST_EXPORT, SLOW_EXPORT, QUERY_EXPORT = "811", "812", "813"
QUERY_TEXT = "SELECT {id} FROM UserPoint"  # the text the simulator gives the query of a configured export


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorThread]:
    """A fast export, one whose executions run for a minute, and the export of query job 'q'."""
    specs = (
        fast_spec(FAST_EXPORT),
        fast_spec(SLOW_EXPORT, running_s=60.0),
        fast_spec(QUERY_EXPORT, name="mics-export:q", query_id="65987"),
    )
    with SimulatorThread(sim_config(*specs, token=TOKEN)) as thread:
        yield thread


def _today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


def _run(sim: SimulatorThread, jobs_file: Path, out: Path, *args: str, **env: str) -> tuple[int, str, dict[str, Any]]:
    proc = cli_in_process(
        "run", str(jobs_file), "--progress", "off", "--workers", "0", "--output-dir", str(out), *args,
        env=cli_env(sim.url, TOKEN, **env),
    )  # fmt: skip
    assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr
    return proc.returncode, proc.stderr, manifest(Path(str(out).replace("{date}", _today())))


def test_reuse_within_downloads_a_recent_succeeded_execution(sim: SimulatorThread, tmp_path: Path) -> None:
    """reuse_within finds the SUCCEEDED execution another run made minutes ago: no create, the same
    file, recorded as reused with its creation time; outside the window a new execution is made."""
    jobs_file = write_jobs(tmp_path, [{"name": "j", "export_id": FAST_EXPORT}])
    assert _run(sim, jobs_file, tmp_path / "first")[0] == 0
    created = sim.stats.executions_created[FAST_EXPORT]
    first = jobs_by_name(manifest(tmp_path / "first"))["j"]

    jobs_file = write_jobs(tmp_path, [{"name": "j", "export_id": FAST_EXPORT, "reuse_within": "6h"}])
    code, stderr, doc = _run(sim, jobs_file, tmp_path / "second")
    assert code == 0, stderr
    assert sim.stats.executions_created[FAST_EXPORT] == created, "a reused execution must not be paid twice"
    entry = assert_exact(tmp_path / "second", "j", sim.state.exports[FAST_EXPORT])
    assert entry["execution_id"] == first["execution_id"]
    assert entry["reused_from"]["execution_id"] == first["execution_id"]
    assert entry["reused_from"]["created_at"].endswith("Z")
    assert "reusing execution" in stderr

    jobs_file = write_jobs(tmp_path, [{"name": "j", "export_id": FAST_EXPORT, "reuse_within": "0.001"}])
    code, stderr, doc = _run(sim, jobs_file, tmp_path / "third")
    assert code == 0, stderr
    assert sim.stats.executions_created[FAST_EXPORT] == created + 1
    assert jobs_by_name(doc)["j"]["reused_from"] is None


def test_query_job_reuses_only_an_execution_of_its_unchanged_query(sim: SimulatorThread, tmp_path: Path) -> None:
    """A query job reuses the execution yesterday's run recorded on the same query; once its text
    changes (a new query on the export), it creates a new execution instead."""
    runs = tmp_path / "runs"
    yesterday = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()
    job = {"name": "q", "query": {"datamart_id": DATAMART, "text": QUERY_TEXT}, "reuse_within": "1d"}
    jobs_file = write_jobs(tmp_path, [job])
    assert _run(sim, jobs_file, runs / yesterday)[0] == 0
    created = sim.stats.executions_created[QUERY_EXPORT]

    code, stderr, doc = _run(sim, jobs_file, runs / "{date}")
    assert code == 0, stderr
    assert sim.stats.executions_created[QUERY_EXPORT] == created
    assert jobs_by_name(doc)["q"]["reused_from"] is not None

    job["query"] = {"datamart_id": DATAMART, "text": QUERY_TEXT + ' WHERE segments {id="1"}'}
    jobs_file = write_jobs(tmp_path, [job])
    code, stderr, doc = _run(sim, jobs_file, runs / "{date}")
    assert code == 0, stderr
    assert sim.stats.executions_created[QUERY_EXPORT] == created + 1
    assert jobs_by_name(doc)["q"]["reused_from"] is None


def test_a_job_failed_on_our_side_adopts_its_succeeded_execution(sim: SimulatorThread, tmp_path: Path) -> None:
    """A job that FAILED here after its execution SUCCEEDED (a local check refused the file) adopts
    that execution on the rerun instead of creating another."""
    jobs_file = write_jobs(tmp_path, [{"name": "j", "export_id": FAST_EXPORT, "max_line_bytes": 8}])
    code, stderr, doc = _run(sim, jobs_file, tmp_path / "out")
    assert code == 1 and jobs_by_name(doc)["j"]["status"] == "FAILED", stderr
    created = sim.stats.executions_created[FAST_EXPORT]
    jobs_file = write_jobs(tmp_path, [{"name": "j", "export_id": FAST_EXPORT}])
    code, stderr, doc = _run(sim, jobs_file, tmp_path / "out")
    assert code == 0, stderr
    assert sim.stats.executions_created[FAST_EXPORT] == created
    assert "that failed after it" in stderr
    assert_exact(tmp_path / "out", "j", sim.state.exports[FAST_EXPORT])


def test_deadline_skips_a_job_that_would_not_fit(sim: SimulatorThread, tmp_path: Path) -> None:
    """MICS_DEADLINE_S shorter than a job's timeout_s (no earlier run): no execution, FAILED with
    'skipped: deadline', exit 1; a job that fits still runs."""
    jobs = [
        {"name": "long", "export_id": SLOW_EXPORT, "timeout_s": 600},
        {"name": "short", "export_id": FAST_EXPORT, "timeout_s": 30},
    ]
    before = sim.stats.executions_created[SLOW_EXPORT]
    code, stderr, doc = _run(sim, write_jobs(tmp_path, jobs), tmp_path / "out", MICS_DEADLINE_S="300")
    assert code == 1, stderr
    entries = jobs_by_name(doc)
    assert entries["long"]["status"] == "FAILED" and entries["long"]["error"].startswith("skipped: deadline")
    assert entries["long"]["execution_id"] is None
    assert sim.stats.executions_created[SLOW_EXPORT] == before
    assert entries["short"]["status"] == "SUCCEEDED"


def test_run_stops_at_the_deadline_with_exit_124(sim: SimulatorThread, tmp_path: Path) -> None:
    """A job expected to be quick (its earlier run) starts, the platform runs long: at --deadline the
    run stops within seconds, INTERRUPTED, exit 124, no temporary file; -v logged every poll in a pipe."""
    runs = tmp_path / "runs"
    yesterday = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()
    assert _run(sim, write_jobs(tmp_path, [{"name": "j", "export_id": FAST_EXPORT}]), runs / yesterday)[0] == 0

    jobs_file = write_jobs(tmp_path, [{"name": "j", "export_id": SLOW_EXPORT, "timeout_s": 600}])
    started = time.monotonic()
    code, stderr, doc = _run(sim, jobs_file, runs / "{date}", "--deadline", "1.5s", "-v")
    took = time.monotonic() - started
    assert code == 124, stderr
    assert took < 10, f"the run took {took:.1f}s to stop at a 1.5s deadline"
    assert doc["status"] == "INTERRUPTED" and doc["exit_code"] == 124
    entry = jobs_by_name(doc)["j"]
    assert entry["execution_id"] is not None and entry["status"] in ("PENDING", "RUNNING")
    assert leftovers(runs / _today()) == []
    assert "deadline reached" in stderr
    polls = [line for line in stderr.splitlines() if "[j] poll " in line]
    assert len(polls) >= 3 and all("tasks done" in p for p in polls), stderr[-2000:]
    assert any("next poll in" in p for p in polls)


def test_deadline_option_is_checked(sim: SimulatorThread, tmp_path: Path) -> None:
    """A bad --deadline or MICS_DEADLINE_S is one line, exit 2, and nothing is sent."""
    jobs_file = write_jobs(tmp_path, [{"name": "j", "export_id": FAST_EXPORT}])
    requests = sim.stats.total_requests
    for args, env in ((["--deadline", "soon"], {}), ([], {"MICS_DEADLINE_S": "-3"})):
        proc = cli_in_process("run", str(jobs_file), *args, env=cli_env(sim.url, TOKEN, **env))
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "deadline" in proc.stderr.lower()
    assert sim.stats.total_requests == requests


def test_sigterm_still_wins_over_a_later_deadline(sim: SimulatorThread, tmp_path: Path) -> None:
    """With a deadline set, SIGTERM before it still exits 143 (the deadline's 124 is its own)."""
    jobs_file = write_jobs(tmp_path, [{"name": "j", "export_id": SLOW_EXPORT, "timeout_s": 60}])
    out = tmp_path / "out"
    proc = start_cli(
        "run", str(jobs_file), "--progress", "off", "--output-dir", str(out), "--deadline", "1h",
        env=cli_env(sim.url, TOKEN), stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: (out / "manifest.json").exists() and "RUNNING" in (out / "manifest.json").read_text())
        proc.terminate()
        assert proc.wait(timeout=15) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    assert manifest(out)["status"] == "INTERRUPTED"
