"""`mics-export status [DIR]`: a run's summary from its manifest, exiting with the run's code.

Runs are real (`mics-export run` against the simulator); status is the real CLI too, mostly in
this process (:func:`support.cli_in_process`, the same exit code and output). Subprocesses stay
where the process is the point: a run stopped by SIGTERM or killed with SIGKILL, and one
`status` whose exit status is read from a separate process, as an alerting script reads it.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from support import (
    TOKEN,
    cli_env,
    cli_in_process,
    jobs_by_name,
    manifest,
    read_manifest_if_any,
    run_cli,
    start_cli,
    wait_for,
    write_jobs,
)

from orchestrator.errors import UsageError
from orchestrator.simulator import ExportSpec, SimulatorConfig, SimulatorThread
from orchestrator.status import read_report


def _sim(*specs: ExportSpec) -> SimulatorThread:
    return SimulatorThread(SimulatorConfig(token=TOKEN, exports=specs))


def status(*args: str, process: bool = False) -> subprocess.CompletedProcess[str]:
    """`mics-export status ARGS` with no token and no API URL (it needs neither); in a subprocess if ``process``."""
    command = run_cli if process else cli_in_process
    return command("status", *args, env=cli_env(None, token=None))


def _recorded(out: Path) -> object:
    """The manifest's jobs once every one has an execution id (falsy before)."""
    doc = read_manifest_if_any(out)
    return doc and all(j.get("execution_id") for j in doc["jobs"]) and doc["jobs"]


GOOD = ExportSpec("1", size_bytes=3_000, pending_s=0.01, running_s=0.02, erroneous_tasks=12)
BAD = ExportSpec("2", always_fail=True, pending_s=0.01, running_s=0.02)


def test_a_succeeded_run_exits_0_in_every_format(tmp_path: Path) -> None:
    """After a run that SUCCEEDED, status exits 0 and shows jobs and totals as table, TSV and JSON."""
    with _sim(GOOD) as sim:
        path = write_jobs(tmp_path, [{"name": "good", "export_id": "1"}])
        assert cli_in_process("run", str(path), env=cli_env(sim.url)).returncode == 0
    out = tmp_path / "out"
    table, tsv, as_json = status(str(out)), status(str(out), "--format", "tsv"), status(str(out), "--json")
    assert (table.returncode, tsv.returncode, as_json.returncode) == (0, 0, 0), table.stderr
    assert "good" in table.stdout and "SUCCEEDED" in table.stdout and "12 erroneous tasks" in table.stdout
    assert "total: 1 job(s), 1 SUCCEEDED" in table.stdout and "exit 0" in table.stdout
    header, row = tsv.stdout.splitlines()
    assert header.split("\t")[:5] == ["job", "status", "attempts", "bytes", "records"]
    records = jobs_by_name(manifest(out))["good"]["records"]
    assert row.split("\t")[:5] == ["good", "SUCCEEDED", "1", str(GOOD.result().size), str(records)]
    doc = orjson.loads(as_json.stdout)
    assert doc["exit_code"] == doc["recorded_exit_code"] == 0 and doc["status"] == "SUCCEEDED"
    assert doc["totals"]["jobs"] == 1 and doc["totals"]["bytes"] == GOOD.result().size
    assert doc["totals"]["duration_s"] is not None and doc["jobs"][0]["name"] == "good"


def test_a_failed_run_exits_1(tmp_path: Path) -> None:
    """After a run where a job FAILED (exit 1), status exits 1 and shows the failure's note."""
    with _sim(GOOD, BAD) as sim:
        path = write_jobs(
            tmp_path, [{"name": "good", "export_id": "1"}, {"name": "bad", "export_id": "2", "retries": 0}]
        )
        assert cli_in_process("run", str(path), env=cli_env(sim.url)).returncode == 1
    done = status(str(tmp_path / "out"))
    assert done.returncode == 1
    assert manifest(tmp_path / "out")["exit_code"] == 1
    bad_line = next(line for line in done.stdout.splitlines() if line.startswith("bad "))
    assert "FAILED" in bad_line and "simulated failure" in bad_line  # one line per job in a pipe
    assert "total: 2 job(s), 1 SUCCEEDED, 1 FAILED" in done.stdout


def test_running_then_interrupted_run(tmp_path: Path) -> None:
    """A run in progress gives exit 4 (and is not disturbed); after SIGTERM status exits 143 as the run did."""
    slow = ExportSpec("1", size_bytes=1_000, pending_s=0.01, running_s=30)
    with _sim(slow) as sim:
        path = write_jobs(tmp_path, [{"name": "slow", "export_id": "1"}])
        out = tmp_path / "out"
        proc = start_cli("run", str(path), env=cli_env(sim.url))
        try:
            wait_for(lambda: _recorded(out), what="the execution recorded")
            running = status(str(out), "--json")
            assert proc.poll() is None  # looking at the lock did not stop the run
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=15)
    assert running.returncode == 4, running.stderr
    assert orjson.loads(running.stdout)["running"] is True
    assert code == 143
    stopped = status(str(out))
    assert stopped.returncode == 143 and "INTERRUPTED" in stopped.stdout
    assert manifest(out)["exit_code"] == 143


def test_a_killed_run_exits_5(tmp_path: Path) -> None:
    """A run killed with SIGKILL leaves RUNNING and no lock holder: status exits 5 and says it was killed."""
    slow = ExportSpec("1", size_bytes=1_000, pending_s=0.01, running_s=30)
    with _sim(slow) as sim:
        path = write_jobs(tmp_path, [{"name": "slow", "export_id": "1"}])
        out = tmp_path / "out"
        proc = start_cli("run", str(path), env=cli_env(sim.url))
        wait_for(lambda: _recorded(out), what="the execution recorded")
        proc.kill()
        proc.wait(timeout=15)
    done = status(str(out))
    assert done.returncode == 5
    assert manifest(out)["status"] == "RUNNING" and "killed" in done.stdout


def _write(folder: Path, **fields: object) -> None:
    """A hand-written manifest in ``folder`` (created), with ``fields`` over a minimal one."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"version": 1, "run_id": "r1", "started_at": "2026-11-28T02:00:00Z", "finished_at": None, "jobs": []}
    (folder / "manifest.json").write_bytes(orjson.dumps({**doc, **fields}))


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"status": "INTERRUPTED"}, 5),  # written before exit_code existed: the signal is unknown
        ({"status": "INTERRUPTED", "exit_code": 130}, 130),
        ({"status": "FAILED"}, 1),
        ({"status": "SUCCEEDED", "exit_code": 0}, 0),
        ({"status": "RUNNING"}, 4),  # no .lock beside it: cannot tell, so still running
    ],
)
def test_exit_code_per_manifest_state(tmp_path: Path, fields: dict[str, object], code: int) -> None:
    """Each manifest state maps to its documented exit code; a recorded exit_code wins."""
    _write(tmp_path / "run", **fields)
    assert read_report(str(tmp_path / "run")).exit_code == code
    assert read_report(str(tmp_path / "run" / "manifest.json")).exit_code == code  # the file itself works too


def test_the_cli_exits_with_the_recorded_code(tmp_path: Path) -> None:
    """The exit status of a separate `status` process is the report's code (here a recorded 130)."""
    _write(tmp_path / "run", status="INTERRUPTED", exit_code=130)
    done = status(str(tmp_path / "run"), "--format", "tsv", process=True)
    assert done.returncode == 130 and done.stdout.splitlines()[0].startswith("job\tstatus")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.mkdir(), "no manifest.json in"),
        (lambda p: None, "no such folder"),
        (lambda p: _write(p / "shard-0-of-2", status="SUCCEEDED"), "shard folders here: shard-0-of-2"),
        (lambda p: _write(p, status="DANCING"), "not a valid manifest"),
    ],
)
def test_no_readable_manifest_is_a_usage_error(tmp_path: Path, make: Callable[[Path], object], message: str) -> None:
    """No manifest, no folder, only shard folders or a corrupt manifest: a one-line UsageError."""
    target = tmp_path / "run"
    make(target)
    with pytest.raises(UsageError, match=re.escape(message)):
        read_report(str(target))


def test_no_manifest_exits_2_with_one_line(tmp_path: Path) -> None:
    """The CLI turns a missing manifest into exit 2 and one line on stderr, nothing on stdout."""
    done = status(str(tmp_path))
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "no manifest.json in" in done.stderr
