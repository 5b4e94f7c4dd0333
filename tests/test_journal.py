"""The manifest journal (issue 14, part 2): bytes written linear in the changes, kill -9 safe.

A local run appends each change of a job (its changed fields) to ``.manifest.journal`` and
rewrites ``manifest.json`` whole only now and then; a reader replays the journal on top of
the manifest it names. Here: the replay rules (torn end, a journal naming an older
manifest, damage in the middle), the writer's bytes for 2,000 jobs, and real ``kill -9``s
of the CLI — at a moment chosen from outside, and inside a compaction on both sides of its
rename — each followed by a rerun (in this process: :func:`support.cli_in_process`) that
adopts or skips every job and creates no execution twice.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import orjson
import pytest
from support import TOKEN, assert_exact, cli_env, cli_in_process, leftovers, manifest, wait_for, write_jobs

from orchestrator.manifest import (
    JOURNAL_NAME,
    MANIFEST_NAME,
    JobRecord,
    JobStatus,
    Journal,
    Manifest,
    ManifestWriter,
    RunStatus,
    load_previous,
    read_manifest_with_journal,
    remove_stale_temp_files,
    replay_journal,
)
from orchestrator.simulator import ExportSpec, SimulatorConfig, SimulatorThread


def _line(doc: object) -> bytes:
    return orjson.dumps(doc) + b"\n"


def _base(journal_id: str | None = "gen-2") -> Manifest:
    """A manifest.json as compacted: job a RUNNING with its execution, b PENDING."""
    m = Manifest(journal_id=journal_id)
    m.jobs["a"] = JobRecord(name="a", export_id="1", execution_id="e1", status=JobStatus.RUNNING, attempts=1)
    m.jobs["b"] = JobRecord(name="b", export_id="2")
    return m


def _header(base: str = "gen-2") -> bytes:
    return _line({"journal": 1, "base": base})


# -- replay rules, in process -----------------------------------------------------------------
def test_lines_apply_in_order_and_a_torn_last_line_is_ignored() -> None:
    """Complete lines apply in order (later wins, new jobs appear); a torn end changes nothing."""
    m = _base()
    data = (
        _header()
        + _line({"job": "b", "set": {"creating_since": 5, "started_at": "t0"}})
        + _line({"job": "b", "set": {"creating_since": None, "execution_id": "e2", "attempts": 1}})
        + _line({"job": "c", "set": {"export_id": "3", "status": "DOWNLOADING"}})
        + b'{"job": "a", "set": {"status": "SUCC'
    )
    replay = replay_journal(m, data)
    assert replay.applied == 3 and replay.torn and replay.damaged_at is None
    assert m.jobs["a"].status is JobStatus.RUNNING  # the torn line was never acknowledged
    b = m.jobs["b"]
    assert (b.execution_id, b.creating_since, b.attempts, b.started_at) == ("e2", None, 1, "t0")
    assert m.jobs["c"].status is JobStatus.DOWNLOADING and m.jobs["c"].export_id == "3"


def test_a_journal_naming_an_older_manifest_is_ignored_whole() -> None:
    """Killed between a compaction and the journal's restart: the old journal never regresses the newer manifest."""
    m = _base("gen-3")  # compacted after the journal below was written (it holds all of it)
    m.jobs["a"].status = JobStatus.SUCCEEDED
    old = _header("gen-2") + _line({"job": "a", "set": {"status": "DOWNLOADING"}})
    replay = replay_journal(m, old)
    assert replay.applied == 0 and replay.ignored and "another manifest" in replay.ignored
    assert m.jobs["a"].status is JobStatus.SUCCEEDED
    # A manifest of an older version (no journal_id): no journal can apply to it.
    legacy = _base(None)
    assert replay_journal(legacy, old).applied == 0 and legacy.jobs["a"].status is JobStatus.RUNNING


def test_a_bad_line_in_the_middle_stops_the_replay_there() -> None:
    """Damage (a bad line with valid ones after it) stops the replay: later changes are not applied over a gap."""
    m = _base()
    data = (
        _header()
        + _line({"job": "b", "set": {"execution_id": "e2"}})
        + _line({"job": "b", "set": {"attempts": "many"}})  # valid JSON, wrong type: not a line we write
        + _line({"job": "b", "set": {"status": "SUCCEEDED"}})
    )
    replay = replay_journal(m, data)
    assert replay.applied == 1 and replay.damaged_at == 3 and not replay.torn
    assert m.jobs["b"].execution_id == "e2" and m.jobs["b"].status is JobStatus.PENDING
    # Garbage to the end only is an interrupted append's tail, not damage.
    tail = _header() + _line({"job": "b", "set": {"execution_id": "e2"}}) + b"\x00\x00\n\x00"
    replay = replay_journal(_base(), tail)
    assert replay.applied == 1 and replay.torn and replay.damaged_at is None


def test_run_lines_replay_the_run_state() -> None:
    """A run line restores the run's status, end and exit code."""
    m = _base()
    run = {"run_id": m.run_id, "started_at": m.started_at, "finished_at": "t9", "status": "FAILED", "exit_code": 1}
    replay_journal(m, _header() + _line({"run": run}))
    assert (m.status, m.finished_at, m.exit_code) == (RunStatus.FAILED, "t9", 1)


def test_load_previous_replays_and_moves_a_damaged_journal_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rerun reads manifest.json then the journal; a damaged journal is used up to the damage, kept aside, warned."""
    (tmp_path / MANIFEST_NAME).write_bytes(_base().to_bytes())
    journal = tmp_path / JOURNAL_NAME
    journal.write_bytes(_header() + _line({"job": "b", "set": {"execution_id": "e2"}}))
    assert remove_stale_temp_files(tmp_path) == [] and journal.exists()  # never taken for a temp file
    previous = load_previous(tmp_path / MANIFEST_NAME)
    assert previous is not None and previous.jobs["b"].execution_id == "e2"
    assert read_manifest_with_journal(tmp_path / MANIFEST_NAME).jobs["b"].execution_id == "e2"

    journal.write_bytes(journal.read_bytes() + b"{oops\n" + _line({"job": "a", "set": {"status": "FAILED"}}))
    caplog.set_level(logging.WARNING, "orchestrator.manifest")
    previous = load_previous(tmp_path / MANIFEST_NAME)
    assert previous is not None and previous.jobs["b"].execution_id == "e2"
    assert previous.jobs["a"].status is JobStatus.RUNNING
    assert "damaged at line 3" in caplog.text
    assert not journal.exists() and list(tmp_path.glob(f"{JOURNAL_NAME}.corrupt-*"))


def test_a_half_written_append_is_rolled_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full mid-append: the half line is cut off, so the next append does not read as damage."""
    (tmp_path / MANIFEST_NAME).write_bytes(_base().to_bytes())
    journal = Journal(tmp_path / JOURNAL_NAME)
    journal.append(_line({"job": "b", "set": {"execution_id": "e2"}}), restart_for="gen-2")
    real_write = os.write

    def half_then_full(fd: int, data: bytes | memoryview) -> int:
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="No space"):
        journal.append(_line({"job": "b", "set": {"status": "RUNNING", "attempts": 1}}))
    monkeypatch.setattr(os, "write", real_write)
    journal.append(_line({"job": "b", "set": {"status": "DOWNLOADING"}}))
    journal.close()
    m = read_manifest_with_journal(tmp_path / MANIFEST_NAME)
    assert m.jobs["b"].status is JobStatus.DOWNLOADING and m.jobs["b"].attempts == 0


# -- the writer, in process -------------------------------------------------------------------
async def _lifecycle(writer: ManifestWriter, rec: JobRecord, i: int) -> None:
    """One job's record through the scheduler's steps: the saves and marks it makes, in order."""
    rec.started_at, rec.creating_since = "2026-11-28T12:00:00Z", 1796313765558 + i
    await writer.save()  # the intent, before the POST
    rec.execution_id, rec.attempts, rec.creating_since = str(879_879_000 + i), 1, None
    writer.mark()
    await anyio.sleep(0)
    rec.status = JobStatus.RUNNING
    writer.mark()
    await anyio.sleep(0)
    rec.status, rec.num_tasks, rec.erroneous_tasks = JobStatus.DOWNLOADING, 1000, 0
    await writer.save()  # before the part file grows
    rec.status, rec.path, rec.bytes, rec.records = JobStatus.SUCCEEDED, f"{rec.name}.ndjson", 2000 + i, 35
    rec.sha256, rec.length_check = f"{i:064x}", "content-length"
    await writer.save()  # before the rename
    rec.finished_at = "2026-11-28T12:00:02Z"
    writer.mark()


async def _drive(folder: Path, n: int, journal: bool) -> tuple[ManifestWriter, Manifest]:
    m = Manifest()
    for i in range(n):
        m.jobs[f"e{i}"] = JobRecord(name=f"e{i}", export_id=str(10_000 + i))
    writer = ManifestWriter(m, folder / MANIFEST_NAME, flush_interval_s=0.01, journal=journal)
    await writer.save()
    limiter = anyio.CapacityLimiter(200)

    async def job(rec: JobRecord, i: int) -> None:
        async with limiter:
            await _lifecycle(writer, rec, i)

    async with anyio.create_task_group() as flushing:
        flushing.start_soon(writer.run_flusher)
        async with anyio.create_task_group() as tg:
            for i, rec in enumerate(list(m.jobs.values())):
                tg.start_soon(job, rec, i)
        # Before the last word: what a kill -9 here would leave is the whole state.
        await writer.save()
        assert read_manifest_with_journal(folder / MANIFEST_NAME).to_bytes() == m.to_bytes()
        flushing.cancel_scope.cancel()
    m.status, m.exit_code = RunStatus.SUCCEEDED, 0
    await writer.save_last()
    return writer, m


@pytest.mark.anyio
async def test_bytes_written_for_2000_jobs_stay_within_3x_the_final_manifest(tmp_path: Path) -> None:
    """2,000 jobs through every save and mark: manifest + journal bytes ≤ 3× the final manifest."""
    (tmp_path / "j").mkdir()
    writer, m = await _drive(tmp_path / "j", 2000, journal=True)
    final = (tmp_path / "j" / MANIFEST_NAME).read_bytes()
    assert Manifest.from_bytes(final).to_bytes() == m.to_bytes() and not (tmp_path / "j" / JOURNAL_NAME).exists()
    assert writer.bytes_written <= 3 * len(final), (writer.bytes_written, len(final))
    assert writer.compactions < writer.writes  # the journal carried most writes
    (tmp_path / "w").mkdir()
    whole, _ = await _drive(tmp_path / "w", 2000, journal=False)
    assert whole.bytes_written > 10 * len(final)  # what this test would see without the journal


# -- kill -9 of the CLI, then a rerun ---------------------------------------------------------
# Test-only: compactions every few writes (not once or twice a run), and optionally a
# SIGKILL of the run inside its Nth compaction — with half a temp file written before the
# rename, or just after the rename before the journal restarts — which no outside timing
# can hit reliably.
KILLABLE = textwrap.dedent(
    """
    import os, signal, sys
    import orchestrator.manifest as m
    m.FRESH_BYTES, m.COMPACT_RATE, m.COMPACT_RATIO = 0, 1 << 40, 0.1
    at, where = int(os.environ.get("KILL_AT_COMPACTION", "0")), os.environ.get("KILL_WHERE", "")
    seen = [0]
    real = m.write_atomic

    def write_atomic(path, data):
        if path.name == "manifest.json":
            seen[0] += 1
            if seen[0] == at and where == "before_rename":
                path.with_name(f".{path.name}.{os.getpid()}.tmp").write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
        real(path, data)
        if path.name == "manifest.json" and seen[0] == at and where == "after_rename":
            os.kill(os.getpid(), signal.SIGKILL)

    m.write_atomic = write_atomic
    sys.argv[0] = "mics-export"
    from orchestrator.cli import main
    main()
    """
)
JOBS = 60


def _specs() -> list[ExportSpec]:
    rng = random.Random(14)
    return [
        ExportSpec(str(100 + i), size_bytes=2_000, seed=i, pending_s=0.0, running_s=rng.uniform(0.05, 0.5))
        for i in range(JOBS)
    ]


def _killable(path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", KILLABLE, "run", str(path), "--workers", "0", "--progress", "off"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def _journal_lines(out: Path) -> int:
    try:
        return (out / JOURNAL_NAME).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize(
    "kill",
    ["from_outside", "compaction_before_rename", "compaction_after_rename"],
)
def test_kill_9_at_any_moment_then_rerun_adopts_or_skips_every_job(tmp_path: Path, kill: str) -> None:
    """kill -9 mid-run or mid-compaction: the rerun finishes every job exactly, no execution created twice."""
    specs = _specs()
    with SimulatorThread(SimulatorConfig(token=TOKEN, exports=tuple(specs))) as sim:
        path = write_jobs(tmp_path, [{"name": f"j{i}", "export_id": s.id} for i, s in enumerate(specs)], concurrency=15)
        out = tmp_path / "out"
        env = cli_env(sim.url)
        if kill != "from_outside":
            env |= {"KILL_AT_COMPACTION": "4", "KILL_WHERE": kill.removeprefix("compaction_")}
        proc = _killable(path, env)
        if kill == "from_outside":
            # Mid-run with the journal in use: it has lines and a compaction came after the first write.
            first = wait_for(lambda: manifest(out).get("journal_id") if (out / MANIFEST_NAME).exists() else None)
            wait_for(lambda: manifest(out)["journal_id"] != first and _journal_lines(out) > 5, what="a compaction")
            wait_for(lambda: len(list(out.glob("j*.ndjson"))) >= JOBS // 4, what="a quarter of the outputs")
            proc.kill()
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, stderr
        done_before = {p.name for p in out.glob("j*.ndjson")}
        assert 0 < len(done_before) < JOBS, "the kill came mid-run"
        assert (out / JOURNAL_NAME).exists()
        created_before = dict(sim.stats.executions_created)

        rerun = cli_in_process("run", str(path), "--workers", "0", env=cli_env(sim.url))
        created = dict(sim.stats.executions_created)
    assert rerun.returncode == 0, rerun.stderr
    assert all(n == 1 for n in created.values()) and len(created) == JOBS, "an execution was created twice"
    assert sum(created_before.values()) > len(done_before)  # some were in flight: adopted, not recreated
    for i, spec in enumerate(specs):
        assert_exact(out, f"j{i}", spec)
    assert "already complete" in rerun.stderr  # the completed outputs were skipped, not fetched again
    assert leftovers(out) == [] and not (out / JOURNAL_NAME).exists()
    assert os.path.getsize(out / MANIFEST_NAME) > 0


def test_status_shows_what_the_journal_holds_beyond_a_lagging_manifest(tmp_path: Path) -> None:
    """`mics-export status` replays the journal: a job manifest.json still shows PENDING reads SUCCEEDED."""
    from orchestrator.manifest import JobRecord, JobStatus, ManifestWriter
    from orchestrator.status import read_report

    manifest = Manifest()
    for i in range(400):  # well past the size below which every write rewrites manifest.json
        manifest.jobs[f"job-{i:04d}"] = JobRecord(name=f"job-{i:04d}", export_id=str(i + 1))
    writer = ManifestWriter(manifest, tmp_path / "manifest.json", journal=True)
    anyio.run(writer.save)
    compacted = (tmp_path / "manifest.json").read_bytes()
    manifest.jobs["job-0007"].status = JobStatus.SUCCEEDED
    anyio.run(writer.save)
    assert (tmp_path / "manifest.json").read_bytes() == compacted  # the change is in the journal only
    assert read_report(str(tmp_path)).manifest.jobs["job-0007"].status is JobStatus.SUCCEEDED
