"""Surviving the night: signals, kill -9, reruns, faults, bad input, secrets.

Each test runs the real CLI against a simulator on a thread of the test process, and checks
outputs byte for byte and the simulator's count of executions created. What only a process
shows (a signal, kill -9, a second run while the first holds the lock, exit 2 as a scheduler
sees it) runs ``mics-export`` in a subprocess; the rest calls its ``main()`` in this process
(:func:`support.cli_in_process`: the same code, exit code, stdout and stderr, ~10x faster).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from support import (
    TOKEN,
    assert_exact,
    cli_env,
    cli_in_process,
    jobs_by_name,
    leftovers,
    manifest,
    read_manifest_if_any,
    run_cli,
    start_cli,
    wait_for,
    write_jobs,
)

from orchestrator.simulator import ExportSpec, Faults, SimulatorConfig, SimulatorThread

MIB = 1 << 20


def _sim(*specs: ExportSpec, faults: Faults | None = None, token: str = TOKEN) -> SimulatorThread:
    return SimulatorThread(SimulatorConfig(token=token, exports=specs, faults=faults or Faults()))


def _job_state(out: Path, name: str) -> dict[str, object] | None:
    doc = read_manifest_if_any(out)
    return jobs_by_name(doc).get(name) if doc else None


def _stop(proc: subprocess.Popen[str], sig: int) -> tuple[int, float]:
    """Send ``sig``; return the exit code and the seconds it took to exit."""
    started = time.monotonic()
    proc.send_signal(sig)
    code = proc.wait(timeout=15)
    return code, time.monotonic() - started


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_poll_then_rerun_adopts_the_execution(tmp_path: Path, sig: int, code: int) -> None:
    """A signal while polling exits 143/130 with an INTERRUPTED manifest; the rerun adopts, not recreates."""
    slow = ExportSpec("1", size_bytes=200_000, pending_s=0.05, running_s=2.5)
    with _sim(slow) as sim:
        path = write_jobs(tmp_path, [{"name": "slow", "export_id": "1"}])
        out = tmp_path / "out"
        proc = start_cli("run", str(path), env=cli_env(sim.url))
        wait_for(lambda: (_job_state(out, "slow") or {}).get("execution_id"), what="execution recorded")
        exit_code, took = _stop(proc, sig)
        doc = manifest(out)
        assert exit_code == code and took < 10
        assert doc["status"] == "INTERRUPTED"
        first = jobs_by_name(doc)["slow"]
        assert first["status"] in ("PENDING", "RUNNING") and first["execution_id"]
        rerun = cli_in_process("run", str(path), env=cli_env(sim.url))
        created = sim.stats.executions_created["1"]
    assert rerun.returncode == 0, rerun.stderr
    entry = assert_exact(out, "slow", slow)
    assert entry["execution_id"] == first["execution_id"] and created == 1
    assert entry["attempts"] == 1
    assert "adopting execution" in rerun.stderr


def test_sigterm_mid_download_removes_the_temp_file_and_rerun_completes(tmp_path: Path) -> None:
    """SIGTERM mid-download exits 143 in time, leaves no temp or partial file; the rerun downloads it once more."""
    big = ExportSpec("1", size_bytes=4 * MIB, pending_s=0.01, running_s=0.02)
    with _sim(big, faults=Faults(slow_body_bps=2 * MIB)) as sim:
        path = write_jobs(tmp_path, [{"name": "big", "export_id": "1"}])
        out = tmp_path / "out"
        proc = start_cli("run", str(path), env=cli_env(sim.url))
        wait_for(lambda: list(out.glob(".big.ndjson.*.part")), what="a partial download")
        exit_code, took = _stop(proc, signal.SIGTERM)
        assert exit_code == 143 and took < 10
        assert leftovers(out) == [] and not (out / "big.ndjson").exists()
        assert manifest(out)["status"] == "INTERRUPTED"
        assert jobs_by_name(manifest(out))["big"]["status"] == "DOWNLOADING"
        rerun = cli_in_process("run", str(path), env=cli_env(sim.url))
        created = sim.stats.executions_created["1"]
    assert rerun.returncode == 0, rerun.stderr
    assert_exact(out, "big", big)
    assert created == 1


def _validator_recorded(out: Path) -> bool:
    """The download's ETag (``file_validator``) is in manifest.json or its journal (a group commit came)."""
    return any(
        p.is_file() and re.search(rb'"file_validator": ?"', p.read_bytes())
        for p in (out / "manifest.json", out / ".manifest.journal")
    )


def test_kill_9_mid_download_then_rerun_resumes_with_range(tmp_path: Path) -> None:
    """After kill -9 mid-download the rerun continues from the bytes on disk (Range) and the file is byte-exact."""
    big = ExportSpec("1", size_bytes=6 * MIB, pending_s=0.01, running_s=0.02, shape="user")
    with _sim(big, faults=Faults(slow_body_bps=3 * MIB)) as sim:
        path = write_jobs(tmp_path, [{"name": "big", "export_id": "1"}])
        out = tmp_path / "out"
        proc = start_cli("run", str(path), env=cli_env(sim.url))
        part = wait_for(
            lambda: [p for p in out.glob(".big.ndjson.*.part") if p.stat().st_size > MIB and _validator_recorded(out)],
            what="1 MiB on disk and the file's validator in the manifest",
        )[0]
        proc.kill()
        proc.wait(timeout=10)
        kept = part.stat().st_size
        assert kept > 0 and not (out / "big.ndjson").exists()
        rerun = cli_in_process("run", str(path), env=cli_env(sim.url))
        created = sim.stats.executions_created["1"]
        starts = [start for _, start in sim.stats.range_starts]
    assert rerun.returncode == 0, rerun.stderr
    assert_exact(out, "big", big)
    assert created == 1
    assert starts and starts[0] >= kept  # resumed where the killed run stopped, not from 0
    assert leftovers(out) == []


def test_lost_create_answer_is_found_not_duplicated(tmp_path: Path) -> None:
    """When the create-execution answer is lost, the tool finds the execution it made instead of making another."""
    spec = ExportSpec("1", size_bytes=10_000, pending_s=0.01, running_s=0.05)
    with _sim(spec, faults=Faults(lose_create_first_k=1)) as sim:
        proc = cli_in_process("run", str(write_jobs(tmp_path, [{"name": "j", "export_id": "1"}])), env=cli_env(sim.url))
        created, lost = sim.stats.executions_created["1"], sim.stats.faults["lost_create"]
    assert proc.returncode == 0, proc.stderr
    assert lost == 1 and created == 1
    assert_exact(tmp_path / "out", "j", spec)


@pytest.mark.parametrize("retry_after", [0.01, None])
def test_429_5xx_and_resets_everywhere(tmp_path: Path, retry_after: float | None) -> None:
    """20% 429 (with or without Retry-After), 10% 5xx and a reset in every file: all jobs land byte-exact."""
    specs = [
        ExportSpec(str(i), size_bytes=300_000 + i * 50_000, seed=i, pending_s=0.01, running_s=0.03) for i in range(1, 9)
    ]
    faults = Faults(
        seed=7, rate_429=0.2, retry_after_s=retry_after, rate_5xx=0.1, reset_after_bytes=100_000, reset_first_k=1
    )
    with _sim(*specs, faults=faults) as sim:
        path = write_jobs(
            tmp_path,
            [{"name": f"j{s.id}", "export_id": s.id} for s in specs],
            api={"retries": {"max_tries": 12, "base_s": 0.005, "max_wait_s": 0.05, "max_time_s": 60}},
        )
        proc = cli_in_process("run", str(path), "--log-format", "json", env=cli_env(sim.url))
        stats = sim.stats
    assert proc.returncode == 0, proc.stderr
    for s in specs:
        assert_exact(tmp_path / "out", f"j{s.id}", s)
    assert stats.faults["429"] > 0 and stats.faults["5xx"] > 0 and stats.faults["reset"] >= len(specs)
    assert sum(stats.executions_created.values()) == len(specs)
    events = [orjson.loads(line)["event"] for line in proc.stderr.splitlines()]
    assert "throttled" in events  # the whole client slowed down, not just one request


def test_truncated_body_is_never_a_silent_short_file(tmp_path: Path) -> None:
    """A body that ends before its Content-Length is detected and resumed; the file is complete."""
    spec = ExportSpec("1", size_bytes=2 * MIB, pending_s=0.01, running_s=0.02)
    faults = Faults(reset_after_bytes=MIB // 2, reset_first_k=2, reset_mode="close")
    with _sim(spec, faults=faults) as sim:
        proc = cli_in_process("run", str(write_jobs(tmp_path, [{"name": "t", "export_id": "1"}])), env=cli_env(sim.url))
        starts = [start for _, start in sim.stats.range_starts]
    assert proc.returncode == 0, proc.stderr
    assert_exact(tmp_path / "out", "t", spec)
    assert starts == [MIB // 2, MIB // 2]  # the second try is cut at the same offset, the third passes


def test_server_ignoring_range_still_gives_exact_bytes(tmp_path: Path) -> None:
    """If the server answers a Range request with the whole file (200), the bytes already had are skipped."""
    spec = ExportSpec("1", size_bytes=2 * MIB, pending_s=0.01, running_s=0.02)
    faults = Faults(reset_after_bytes=700_000, reset_first_k=1, ignore_range=True)
    with _sim(spec, faults=faults) as sim:
        proc = cli_in_process("run", str(write_jobs(tmp_path, [{"name": "r", "export_id": "1"}])), env=cli_env(sim.url))
    assert proc.returncode == 0, proc.stderr
    assert_exact(tmp_path / "out", "r", spec)


def test_retries_exhausted_fail_that_job_only(tmp_path: Path) -> None:
    """A file cut on every try fails its job with a clear error once the bounds run out; the others succeed."""
    cursed = ExportSpec("1", size_bytes=MIB, pending_s=0.01, running_s=0.02)
    fine = ExportSpec("2", size_bytes=1000, pending_s=0.01, running_s=0.02)
    faults = Faults(reset_after_bytes=500_000, reset_first_k=10_000)  # 'fine' is smaller than the cut
    with _sim(cursed, fine, faults=faults) as sim:
        path = write_jobs(
            tmp_path,
            [{"name": "cursed", "export_id": "1"}, {"name": "fine", "export_id": "2"}],
            api={"retries": {"max_tries": 3, "base_s": 0.001, "max_wait_s": 0.01, "max_time_s": 10}},
        )
        proc = cli_in_process("run", str(path), env=cli_env(sim.url))
    assert proc.returncode == 1
    jobs = jobs_by_name(manifest(tmp_path / "out"))
    assert jobs["cursed"]["status"] == "FAILED"
    assert "cut at byte 500000" in jobs["cursed"]["error"]
    assert not (tmp_path / "out" / "cursed.ndjson").exists()
    assert leftovers(tmp_path / "out") == []
    assert_exact(tmp_path / "out", "fine", fine)


def test_stall_is_reported_and_can_time_out(tmp_path: Path) -> None:
    """completed_tasks frozen for stall_s is logged; with stall_action: timeout the job is TIMED_OUT early."""
    stuck = ExportSpec("1", stall=True, pending_s=0.01)
    with _sim(stuck) as sim:
        path = write_jobs(
            tmp_path,
            [
                {"name": "warned", "export_id": "1", "stall_s": 0.2, "timeout_s": 1},
                {"name": "stopped", "export_id": "1", "stall_s": 0.2, "stall_action": "timeout", "timeout_s": 60},
            ],
        )
        started = time.monotonic()
        proc = cli_in_process("run", str(path), "--log-format", "json", env=cli_env(sim.url))
        took = time.monotonic() - started
    assert proc.returncode == 1
    jobs = jobs_by_name(manifest(tmp_path / "out"))
    assert jobs["warned"]["status"] == "TIMED_OUT"
    assert jobs["stopped"]["status"] == "TIMED_OUT" and "stalled" in jobs["stopped"]["error"]
    assert took < 30
    stalled = {e["job"] for e in map(orjson.loads, proc.stderr.splitlines()) if e["event"] == "stalled"}
    assert stalled == {"warned", "stopped"}


def test_wrong_token_stops_the_run_with_a_clear_message(tmp_path: Path) -> None:
    """A 401 exits 1 with a message naming the token as the likely cause; no traceback; no other job hammers the API."""
    specs = [ExportSpec(str(i), size_bytes=100) for i in range(1, 6)]
    with _sim(*specs) as sim:
        path = write_jobs(tmp_path, [{"name": f"j{i}", "export_id": str(i)} for i in range(1, 6)], concurrency=1)
        proc = cli_in_process("run", str(path), env=cli_env(sim.url, token="not-the-token"))
        requests = sim.stats.total_requests
    assert proc.returncode == 1
    assert "token" in proc.stderr and "401" in proc.stderr and "Traceback" not in proc.stderr
    assert requests <= 2
    jobs = jobs_by_name(manifest(tmp_path / "out"))
    assert all(j["status"] == "FAILED" for j in jobs.values())


BAD_JOB_FILES = [
    ("version: 2\njobs: [{name: a, export_id: '1'}]\n", "version"),
    ("version: 1\ncolour: red\njobs: [{name: a, export_id: '1'}]\n", "colour"),
    ("version: 1\njobs: [{name: a, export_id: '1', colour: red}]\n", "job 'a': colour"),
    ("version: 1\njobs: [{name: a, export_id: '1'}, {name: a, export_id: '2'}]\n", "duplicate"),
    ("version: 1\njobs: [{name: Daily, export_id: '1'}, {name: daily, export_id: '2'}]\n", "only in case"),
    ("version: 1\njobs: [{name: ../evil, export_id: '1'}]\n", "name"),
    ("version: 1\njobs: [{name: a/b, export_id: '1'}]\n", "name"),
    ("version: 1\njobs: [{name: .hidden, export_id: '1'}]\n", "name"),
    ("version: 1\njobs: [{name: a}]\n", "export_id"),
    ("version: 1\njobs: [{name: a, export_id: '1', query: {datamart_id: '1', text: 'SELECT'}}]\n", "exactly one"),
    ("version: 1\njobs: [{name: a, export_id: '1', timeout_s: 0}]\n", "timeout_s"),
    ("version: 1\njobs: [{name: a, export_id: '1', timeout_s: -5}]\n", "timeout_s"),
    ("version: 1\nrun: {concurrency: 0}\njobs: [{name: a, export_id: '1'}]\n", "concurrency"),
    ("version: 1\ndefaults: {retries: -1}\njobs: [{name: a, export_id: '1'}]\n", "retries"),
    ("version: 1\njobs: [{name: a, export_id: '1', poll: {initial_s: 10, max_s: 1}}]\n", "max_s"),
    ("version: 1\njobs: [{name: a, export_id: '1', compression: bzip2}]\n", "compression"),
    ("version: 1\njobs: [{name: a, export_id: true}]\n", "export_id"),
    ("version: 1\njobs: []\n", "jobs"),
    ("version: 1\njobs:\n  - name: a\n   export_id: 1\n", "YAML"),
    ("- just\n- a list\n", "mapping"),
    ("version: 1\njobs: [just-a-string]\n", "job #1"),
]


@pytest.fixture(scope="module")
def idle_sim() -> Iterator[SimulatorThread]:
    """One simulator for the usage-error cases, which must send it nothing (each counts its requests)."""
    with _sim(ExportSpec("1")) as sim:
        yield sim


def _bad_job_file_refused(proc: subprocess.CompletedProcess[str], path: Path, named: str) -> None:
    """Exit 2 with one line naming the file and the problem, no traceback."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0] and named in lines[0]


@pytest.mark.parametrize(("text", "named"), BAD_JOB_FILES)
def test_bad_job_files_exit_2_with_one_line_and_no_request(
    tmp_path: Path, idle_sim: SimulatorThread, text: str, named: str
) -> None:
    """Every job-file mistake: exit 2, one line naming the file and the problem, no traceback, no API call."""
    path = tmp_path / "jobs.yaml"
    path.write_text(text)
    requests = idle_sim.stats.total_requests
    _bad_job_file_refused(cli_in_process("run", str(path), env=cli_env(idle_sim.url)), path, named)
    assert idle_sim.stats.total_requests == requests


def test_a_bad_job_file_exits_2_from_the_real_command(tmp_path: Path, idle_sim: SimulatorThread) -> None:
    """The same refusal as a scheduler sees it: the `mics-export` process exits 2 with one line, sends nothing."""
    path = tmp_path / "jobs.yaml"
    path.write_text(BAD_JOB_FILES[2][0])
    requests = idle_sim.stats.total_requests
    _bad_job_file_refused(run_cli("run", str(path), env=cli_env(idle_sim.url)), path, BAD_JOB_FILES[2][1])
    assert idle_sim.stats.total_requests == requests


@pytest.mark.parametrize(
    "args",
    [
        ["--concurrency", "0"],
        ["--shard", "5/3"],
        ["--shard", "abc"],
        ["--no-such-option"],
        ["--progress", "sometimes"],
        ["--log-format", "xml"],
    ],
)
def test_bad_command_lines_exit_2(tmp_path: Path, idle_sim: SimulatorThread, args: list[str]) -> None:
    """A bad command line exits 2 with a short message and no traceback, before any request."""
    path = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}])
    requests = idle_sim.stats.total_requests
    proc = cli_in_process("run", str(path), *args, env=cli_env(idle_sim.url))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and idle_sim.stats.total_requests == requests


def test_missing_token_exits_2_before_any_request(tmp_path: Path, idle_sim: SimulatorThread) -> None:
    """No token in the environment: exit 2, one line naming the variable, nothing sent."""
    path = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}])
    requests = idle_sim.stats.total_requests
    proc = cli_in_process("run", str(path), env=cli_env(idle_sim.url, token=None))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "MICS_API_TOKEN" in proc.stderr
    assert idle_sim.stats.total_requests == requests


def test_token_never_appears_anywhere_at_the_most_verbose_level(tmp_path: Path) -> None:
    """A run at -vv with faults, retries, failures and an error file never prints or writes the token."""
    specs = [
        ExportSpec("1", size_bytes=500_000, pending_s=0.01, running_s=0.02),
        ExportSpec("2", always_fail=True, pending_s=0.01, running_s=0.02),
        ExportSpec("3", size_bytes=200_000, invalid_every=10, pending_s=0.01, running_s=0.02),
    ]
    faults = Faults(seed=3, rate_429=0.2, retry_after_s=0.01, rate_5xx=0.1, reset_after_bytes=50_000, reset_first_k=1)
    with _sim(*specs, faults=faults) as sim:
        path = write_jobs(tmp_path, [{"name": f"j{s.id}", "export_id": s.id} for s in specs], defaults={"retries": 1})
        outputs = []
        # Once as a real process (everything written to fd 1 and 2, whoever writes it), once in process.
        for run, log_format in ((run_cli, "text"), (cli_in_process, "json")):
            proc = run("run", str(path), "-vv", "--log-format", log_format, env=cli_env(sim.url))
            assert proc.returncode == 1
            outputs += [proc.stdout, proc.stderr]
        # A wrong-but-similar token must not be echoed either.
        wrong = cli_in_process("run", str(path), "-vv", env=cli_env(sim.url, token=TOKEN + "-wrong"))
        outputs += [wrong.stdout, wrong.stderr]
    assert any("retrying" in o for o in outputs)  # the verbose paths really ran
    for text in outputs:
        assert TOKEN not in text
    for file in (tmp_path / "out").iterdir():
        assert TOKEN.encode() not in file.read_bytes(), file


def test_adopted_execution_past_its_timeout_is_still_downloaded(tmp_path: Path) -> None:
    """A rerun after timeout_s has passed still uses the earlier run's SUCCEEDED execution; it is not cancelled."""
    spec = ExportSpec("1", size_bytes=50_000, pending_s=0.01, running_s=0.02)
    with _sim(spec) as sim:
        path = write_jobs(tmp_path, [{"name": "a", "export_id": "1", "timeout_s": 0.5}])
        assert cli_in_process("run", str(path), env=cli_env(sim.url)).returncode == 0
        done_at = time.time()
        (tmp_path / "out" / "a.ndjson").unlink()
        wait_for(lambda: time.time() > done_at + 0.6, what="the timeout to pass")
        rerun = cli_in_process("run", str(path), env=cli_env(sim.url))
        created, cancels = sim.stats.executions_created["1"], sim.stats.cancels
    assert rerun.returncode == 0, rerun.stderr
    assert_exact(tmp_path / "out", "a", spec)
    assert created == 1 and cancels == 0


def test_a_local_file_error_fails_one_job_not_the_run(tmp_path: Path) -> None:
    """A folder standing where a job's file should go fails that job with one line; the others succeed."""
    a = ExportSpec("1", size_bytes=10_000, pending_s=0.01, running_s=0.02)
    b = ExportSpec("2", size_bytes=10_000, pending_s=0.01, running_s=0.02, seed=1)
    with _sim(a, b) as sim:
        path = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}, {"name": "b", "export_id": "2"}])
        (tmp_path / "out" / "a.ndjson").mkdir(parents=True)
        proc = cli_in_process("run", str(path), env=cli_env(sim.url))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    jobs = jobs_by_name(manifest(tmp_path / "out"))
    assert jobs["a"]["status"] == "FAILED" and "a.ndjson" in jobs["a"]["error"]
    assert_exact(tmp_path / "out", "b", b)
    assert manifest(tmp_path / "out")["status"] == "FAILED"


def test_two_runs_cannot_share_an_output_folder(tmp_path: Path) -> None:
    """While one run works in a folder, a second run into it exits 2 without touching anything."""
    # The first run's execution never ends (stall), so it certainly holds the lock while the
    # second starts, however loaded the machine is.
    slow = ExportSpec("1", size_bytes=1000, pending_s=0.01, stall=True)
    with _sim(slow) as sim:
        path = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}])
        first = start_cli("run", str(path), env=cli_env(sim.url))
        wait_for(lambda: (_job_state(tmp_path / "out", "a") or {}).get("execution_id"), what="the first run")
        second = cli_in_process("run", str(path), env=cli_env(sim.url))
        _stop(first, signal.SIGTERM)
        created = sim.stats.executions_created["1"]
    assert second.returncode == 2 and "another mics-export run" in second.stderr
    assert created == 1


@pytest.mark.parametrize("url", ["api.mediarithmics.com", "ftp://example.org", "http://"])
def test_a_malformed_api_url_is_a_usage_error(tmp_path: Path, url: str) -> None:
    """A base URL without http(s) and a host exits 2 at once, naming where it came from."""
    path = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}])
    proc = cli_in_process("run", str(path), env=cli_env(url))
    assert proc.returncode == 2 and "MICS_API_URL" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_error_text_echoing_the_token_is_scrubbed() -> None:
    """An API or gateway error that echoes the Authorization header never carries the token onward."""
    from orchestrator.transport import Secret as _Secret
    from orchestrator.transport import error_from as _error_from

    body = orjson.dumps({"status": "error", "error": f"bad token {TOKEN}", "error_id": "x"})
    exc = _error_from(401, body, "GET", "/v1/exports", None, _Secret(TOKEN))
    assert TOKEN not in str(exc) and TOKEN not in (exc.error or "") and "***" in str(exc)
    raw = _error_from(502, f"<html>{TOKEN}</html>".encode(), "GET", "/v1/x", None, _Secret(TOKEN))
    assert TOKEN not in str(raw)


def test_a_huge_retry_after_pauses_no_longer_than_the_cap() -> None:
    """A Retry-After of hours pauses the whole client only up to max_retry_after_s."""
    from orchestrator.transport import Throttle

    throttle = Throttle(max_retry_after_s=2.0)
    throttle.on_throttled(7200.0)
    assert throttle.pause_until - time.monotonic() <= 2.0


def test_a_complete_part_file_is_finished_without_downloading_again(tmp_path: Path) -> None:
    """Killed between recording a complete download and renaming it: the rerun renames it, fetching nothing."""
    spec = ExportSpec("1", size_bytes=300_000, pending_s=0.01, running_s=0.02)
    with _sim(spec) as sim:
        path = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}])
        assert cli_in_process("run", str(path), env=cli_env(sim.url)).returncode == 0
        out = tmp_path / "out"
        execution_id = jobs_by_name(manifest(out))["a"]["execution_id"]
        (out / "a.ndjson").rename(out / f".a.ndjson.{execution_id}.part")  # the state such a kill leaves
        rerun = cli_in_process("run", str(path), env=cli_env(sim.url))
        bytes_served = sim.stats.bytes_served
    assert rerun.returncode == 0, rerun.stderr
    assert_exact(out, "a", spec)
    assert bytes_served == spec.result().size  # served once, by the first run
    assert leftovers(out) == []


def test_a_new_execution_after_a_failed_adoption_is_not_treated_as_adopted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An earlier run's execution is gone, so one is created: a 404 on its file fails the job, no third execution."""
    from hostile import Forward, Request, Wire, is_download, json_wire, passthrough, scene

    import orchestrator
    from orchestrator.manifest import JobRecord, JobStatus, Manifest

    for name in ("MICS_API_URL", "MICS_DEADLINE_S", "MICS_SHARD_COUNT", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RESILIENCE_TOKEN", TOKEN)

    async def handler(req: Request, forward: Forward) -> Wire:
        if is_download(req):
            return json_wire(404, {"status": "error", "error": "Not Found"})
        return await passthrough(req, forward)

    out = tmp_path / "out"
    out.mkdir()
    earlier = Manifest()  # killed while the platform ran an execution it no longer lists
    earlier.jobs["a"] = JobRecord(name="a", export_id="1", execution_id="987654", status=JobStatus.RUNNING, attempts=1)
    (out / "manifest.json").write_bytes(earlier.to_bytes())
    spec = ExportSpec("1", size_bytes=20_000, pending_s=0.01, running_s=0.02)
    with scene(handler, spec, token=TOKEN) as (sim, proxy):
        jobs = write_jobs(
            tmp_path, [{"name": "a", "export_id": "1"}], api={"base_url": proxy.url, "token_env": "RESILIENCE_TOKEN"}
        )
        result = orchestrator.run(jobs, workers=0)
        created = sim.stats.executions_created["1"]
    assert result.job("a").status is JobStatus.FAILED
    assert created == 1  # the execution this run created is not "adopted": its gone file is a failure
