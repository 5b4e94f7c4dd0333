"""End-to-end: `mics-export run` against the simulator over loopback HTTP.

Most runs go through the real CLI in this process (:func:`support.cli_in_process`: same exit
code, stdout and stderr, no Python start-up). Two stay subprocesses because the process is the
point: the README's first command (`run --simulate`, as a user types it) and JSON logs (every
line a real process writes to stderr must be JSON, whatever else writes there).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import orjson
import pytest
import zstandard
from support import (
    TOKEN,
    assert_exact,
    cli_env,
    cli_in_process,
    jobs_by_name,
    leftovers,
    manifest,
    run_cli,
    write_jobs,
)

from orchestrator.simulator import ExportSpec, SimulatorConfig, SimulatorThread

MIB = 1 << 20


def _sim(*specs: ExportSpec, **kw: object) -> SimulatorThread:
    return SimulatorThread(SimulatorConfig(token=TOKEN, exports=specs, **kw))  # type: ignore[arg-type]


def test_many_exports_under_the_concurrency_limit(tmp_path: Path) -> None:
    """24 exports of mixed sizes and lifecycles all land byte-exact, never more than `concurrency` in flight."""
    shapes = ("small", "user", "big")
    sizes = (0, 100, 5_000, 300_000, MIB - 10, MIB + 10, 3 * MIB)
    specs = [
        ExportSpec(
            str(7000 + i),
            size_bytes=sizes[i % len(sizes)],
            shape=shapes[i % 3],
            seed=i,
            pending_s=0.01 * (i % 4),
            running_s=0.05 + 0.02 * (i % 5),
        )
        for i in range(24)
    ]
    jobs = [{"name": f"job-{i:02d}", "export_id": spec.id} for i, spec in enumerate(specs)]
    with _sim(*specs) as sim:
        path = write_jobs(tmp_path, jobs, concurrency=5)
        proc = cli_in_process("run", str(path), env=cli_env(sim.url))
        stats = sim.stats
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    doc = manifest(out)
    assert doc["status"] == "SUCCEEDED" and doc["version"] == 1 and doc["finished_at"]
    for i, spec in enumerate(specs):
        entry = assert_exact(out, f"job-{i:02d}", spec)
        assert entry["attempts"] == 1
        assert entry["export_id"] == spec.id
        assert isinstance(entry["execution_id"], str)
    assert 2 <= stats.max_in_flight <= 5
    assert sum(stats.executions_created.values()) == 24
    assert leftovers(out) == []


def test_failed_execution_is_retried_then_reported_with_its_error_file(tmp_path: Path) -> None:
    """An always-failing export uses 1 + retries executions, keeps the error file, and fails the run (exit 1) alone."""
    bad = ExportSpec("1", always_fail=True, pending_s=0.01, running_s=0.02)
    good = ExportSpec("2", size_bytes=50_000, pending_s=0.01, running_s=0.02)
    with _sim(bad, good) as sim:
        path = write_jobs(
            tmp_path, [{"name": "bad", "export_id": "1", "retries": 1}, {"name": "good", "export_id": "2"}]
        )
        proc = cli_in_process("run", str(path), env=cli_env(sim.url))
        created = dict(sim.stats.executions_created)
    assert proc.returncode == 1, proc.stderr
    out = tmp_path / "out"
    entry = jobs_by_name(manifest(out))["bad"]
    assert entry["status"] == "FAILED"
    assert entry["attempts"] == 2 and created["1"] == 2
    assert entry["error_file"] == "bad.error.txt"
    assert "failed" in (out / "bad.error.txt").read_text()
    assert "FAILED" in entry["error"]
    assert not (out / "bad.ndjson").exists()
    assert_exact(out, "good", good)
    assert manifest(out)["status"] == "FAILED"


def test_fail_once_then_succeed(tmp_path: Path) -> None:
    """An export that fails on its first execution succeeds on the second, and the manifest says 2 attempts."""
    spec = ExportSpec("5", fail_first=1, size_bytes=20_000, pending_s=0.01, running_s=0.02)
    with _sim(spec) as sim:
        proc = cli_in_process(
            "run", str(write_jobs(tmp_path, [{"name": "flaky", "export_id": 5}])), env=cli_env(sim.url)
        )
        created = sim.stats.executions_created["5"]
    assert proc.returncode == 0, proc.stderr
    entry = assert_exact(tmp_path / "out", "flaky", spec)
    assert entry["attempts"] == 2 and created == 2
    assert entry["error_file"] == "flaky.error.txt"


def test_invalid_and_blank_lines_are_kept_and_counted(tmp_path: Path) -> None:
    """Invalid lines stay in the file as served, are counted with their line numbers; blank lines are neither."""
    spec = ExportSpec("9", size_bytes=1_200_000, invalid_every=97, blank_every=41, pending_s=0.01, running_s=0.02)
    with _sim(spec) as sim:
        proc = cli_in_process(
            "run", str(write_jobs(tmp_path, [{"name": "dirty", "export_id": "9"}])), env=cli_env(sim.url)
        )
    assert proc.returncode == 0, proc.stderr
    entry = assert_exact(tmp_path / "out", "dirty", spec)
    assert entry["invalid_lines"] > 100 and len(entry["invalid_line_numbers"]) == 100
    assert entry["records"] + entry["invalid_lines"] < spec.result().lines  # the blank lines are neither
    assert "invalid line" in proc.stderr


def test_on_invalid_fail_fails_the_job_without_a_final_file(tmp_path: Path) -> None:
    """With on_invalid: fail, invalid lines fail the job and no file appears under the final name."""
    spec = ExportSpec("9", size_bytes=100_000, invalid_every=50, pending_s=0.01, running_s=0.02)
    with _sim(spec) as sim:
        path = write_jobs(tmp_path, [{"name": "strict", "export_id": "9", "on_invalid": "fail"}])
        proc = cli_in_process("run", str(path), env=cli_env(sim.url))
    assert proc.returncode == 1
    entry = jobs_by_name(manifest(tmp_path / "out"))["strict"]
    assert entry["status"] == "FAILED" and "invalid line" in entry["error"]
    assert not (tmp_path / "out" / "strict.ndjson").exists()
    assert leftovers(tmp_path / "out") == []


def test_timeout_cancels_the_execution_and_others_go_on(tmp_path: Path) -> None:
    """An execution that never finishes times out (TIMED_OUT, cancelled on the platform); other jobs succeed."""
    stuck = ExportSpec("1", stall=True, pending_s=0.01)
    fine = ExportSpec("2", size_bytes=10_000, pending_s=0.01, running_s=0.02)
    with _sim(stuck, fine) as sim:
        path = write_jobs(
            tmp_path, [{"name": "stuck", "export_id": "1", "timeout_s": 0.5}, {"name": "fine", "export_id": "2"}]
        )
        proc = cli_in_process("run", str(path), env=cli_env(sim.url))
        cancels = sim.stats.cancels
    assert proc.returncode == 1, proc.stderr
    entry = jobs_by_name(manifest(tmp_path / "out"))["stuck"]
    assert entry["status"] == "TIMED_OUT" and "timeout_s=0.5" in entry["error"]
    assert entry["attempts"] == 1 and cancels == 1
    assert_exact(tmp_path / "out", "fine", fine)


@pytest.mark.parametrize(
    ("compression", "suffix"), [("gzip", ".ndjson.gz"), ("zstd", ".ndjson.zst"), ("none", ".ndjson")]
)
def test_compression_round_trips(tmp_path: Path, compression: str, suffix: str) -> None:
    """Each compression writes NAME.ndjson[.gz|.zst] whose decompressed bytes are exactly what was served."""
    spec = ExportSpec("3", size_bytes=2 * MIB + 77, shape="user", pending_s=0.01, running_s=0.02)
    with _sim(spec) as sim:
        path = write_jobs(tmp_path, [{"name": "c", "export_id": "3", "compression": compression}])
        proc = cli_in_process("run", str(path), env=cli_env(sim.url))
    assert proc.returncode == 0, proc.stderr
    assert_exact(tmp_path / "out", "c", spec, suffix)
    raw = (tmp_path / "out" / f"c{suffix}").read_bytes()
    if compression == "gzip":
        assert gzip.decompress(raw) == spec.result().read_all()
    elif compression == "zstd":
        assert zstandard.ZstdDecompressor().decompressobj().decompress(raw) == spec.result().read_all()


def test_empty_result_and_erroneous_tasks_are_reported(tmp_path: Path) -> None:
    """A 0-record result and erroneous tasks on a SUCCEEDED execution both succeed, with warnings."""
    empty = ExportSpec("1", size_bytes=0, pending_s=0.01, running_s=0.02)
    partial = ExportSpec("2", size_bytes=5000, erroneous_tasks=7, num_tasks=100, pending_s=0.01, running_s=0.02)
    with _sim(empty, partial) as sim:
        path = write_jobs(tmp_path, [{"name": "empty", "export_id": "1"}, {"name": "partial", "export_id": "2"}])
        proc = cli_in_process("run", str(path), "--log-format", "json", env=cli_env(sim.url))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert assert_exact(out, "empty", empty)["records"] == 0
    entry = assert_exact(out, "partial", partial)
    assert entry["erroneous_tasks"] == 7 and entry["num_tasks"] == 100
    events = [orjson.loads(line) for line in proc.stderr.splitlines()]
    warnings = {(e["job"], e["event"]) for e in events if e["level"] == "warning"}
    assert ("empty", "empty_result") in warnings
    assert ("partial", "erroneous_tasks") in warnings


def test_json_logs_have_the_spec_fields(tmp_path: Path) -> None:
    """--log-format json writes one object per stderr line with ts, level, event, job, export_id, execution_id."""
    spec = ExportSpec("4", size_bytes=1000, pending_s=0.01, running_s=0.02)
    with _sim(spec) as sim:
        path = write_jobs(tmp_path, [{"name": "j", "export_id": "4"}])
        proc = run_cli("run", str(path), "--log-format", "json", env=cli_env(sim.url))
    assert proc.returncode == 0
    lines = proc.stderr.splitlines()
    assert lines
    events = [orjson.loads(line) for line in lines]  # every line is JSON
    for e in events:
        assert {"ts", "level", "event", "job", "export_id", "execution_id"} <= set(e)
    done = [e for e in events if e["event"] == "job_succeeded"]
    assert done and done[0]["job"] == "j" and done[0]["export_id"] == "4" and done[0]["execution_id"]


def test_rerun_skips_complete_jobs_and_redoes_tampered_ones(tmp_path: Path) -> None:
    """A rerun into the same folder creates nothing for intact files and redoes a file whose sha256 changed."""
    a = ExportSpec("1", size_bytes=30_000, pending_s=0.01, running_s=0.02)
    b = ExportSpec("2", size_bytes=30_000, pending_s=0.01, running_s=0.02, seed=1)
    with _sim(a, b) as sim:
        path = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}, {"name": "b", "export_id": "2"}])
        assert cli_in_process("run", str(path), env=cli_env(sim.url)).returncode == 0
        assert cli_in_process("run", str(path), env=cli_env(sim.url)).returncode == 0
        assert sum(sim.stats.executions_created.values()) == 2
        target = tmp_path / "out" / "b.ndjson"
        target.write_bytes(target.read_bytes()[:-5] + b"oops\n")
        assert cli_in_process("run", str(path), env=cli_env(sim.url)).returncode == 0
        created = dict(sim.stats.executions_created)
        downloads = dict(sim.stats.downloads_completed)
    out = tmp_path / "out"
    assert_exact(out, "a", a)
    assert_exact(out, "b", b)
    assert created == {"1": 1, "2": 1}  # b's succeeded execution was adopted and downloaded again
    assert sum(downloads.values()) == 3


def test_only_runs_the_named_jobs(tmp_path: Path) -> None:
    """--only (repeated or comma-separated) restricts the run; an unknown name is a usage error (exit 2)."""
    specs = [ExportSpec(str(i), size_bytes=100, pending_s=0.01, running_s=0.01) for i in range(1, 4)]
    with _sim(*specs) as sim:
        path = write_jobs(tmp_path, [{"name": f"j{i}", "export_id": str(i)} for i in range(1, 4)])
        proc = cli_in_process("run", str(path), "--only", "j1,j3", env=cli_env(sim.url))
        bad = cli_in_process("run", str(path), "--only", "nope", env=cli_env(sim.url))
        created = dict(sim.stats.executions_created)
    assert proc.returncode == 0, proc.stderr
    assert set(jobs_by_name(manifest(tmp_path / "out"))) == {"j1", "j3"}
    assert created == {"1": 1, "3": 1}
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr


def test_simulate_runs_the_example_job_file(tmp_path: Path) -> None:
    """`mics-export run jobs.yaml.example --simulate` (the README's first command) succeeds with no token."""
    example = Path(__file__).resolve().parent.parent / "jobs.yaml.example"
    out = tmp_path / "demo"
    proc = run_cli("run", str(example), "--simulate", "--output-dir", str(out), env=cli_env(token=None))
    assert proc.returncode == 0, proc.stderr
    doc = manifest(out)
    assert doc["status"] == "SUCCEEDED"
    names = set(jobs_by_name(doc))
    assert {"fb-adwords-segments", "visitors", "active-emails"} <= names
    assert jobs_by_name(doc)["active-emails"]["query_id"]
    assert TOKEN not in proc.stderr


def test_validate_accepts_the_example_and_rejects_a_bad_file(tmp_path: Path) -> None:
    """`validate` says OK for the example file and exits 2 with one line for a broken one."""
    example = Path(__file__).resolve().parent.parent / "jobs.yaml.example"
    ok = cli_in_process("validate", str(example), env=cli_env(token=None))
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\njobs:\n  - name: x\n    export_id: '1'\n    colour: red\n")
    proc = cli_in_process("validate", str(bad), env=cli_env(token=None))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "job 'x'" in proc.stderr and "colour" in proc.stderr


def test_partial_rerun_keeps_the_other_jobs_records(tmp_path: Path) -> None:
    """A run with --only into the same folder keeps the other jobs' records, so a later full run still skips them."""
    a = ExportSpec("1", size_bytes=3000, pending_s=0.01, running_s=0.02)
    b = ExportSpec("2", size_bytes=3000, pending_s=0.01, running_s=0.02, seed=2)
    with _sim(a, b) as sim:
        path = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}, {"name": "b", "export_id": "2"}])
        assert cli_in_process("run", str(path), env=cli_env(sim.url)).returncode == 0
        (tmp_path / "out" / "a.ndjson").unlink()
        assert cli_in_process("run", str(path), "--only", "a", env=cli_env(sim.url)).returncode == 0
        assert set(jobs_by_name(manifest(tmp_path / "out"))) == {"a", "b"}
        assert cli_in_process("run", str(path), env=cli_env(sim.url)).returncode == 0
        downloads = sum(sim.stats.downloads_completed.values())
    assert downloads == 3  # a twice (its file was deleted), b once
    assert_exact(tmp_path / "out", "a", a)
    assert_exact(tmp_path / "out", "b", b)
