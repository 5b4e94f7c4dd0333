"""A manifest that cannot be written is a failure, never a log line under an exit 0.

Issue 10 item 4: the manifest is the run's record and its resume state. When a write
fails (a full disk, a folder in the way) the step it was recording does not happen (no
rename after a failed record), the job fails, and the run does not exit 0; a failed write
leaves no temp file, and the temp files a killed run left are cleaned up. A corrupt
manifest from an earlier run is moved aside with a warning, not silently ignored.

The disk-full cases use a real, small tmpfs (root and mount(2) needed; skipped otherwise):
full of inodes to fail the next new file at a chosen moment while a growing file still
grows, or full of pages so that the data fits and the manifest does not. The chosen moment
is a wrapped method of the run (the part file just opened, the run's work just done), so
the CLI's ``main()`` runs in this process (:func:`support.cli_in_process`).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import wait_until
from support import (
    TOKEN,
    assert_exact,
    cli_env,
    cli_in_process,
    jobs_by_name,
    leftovers,
    manifest,
    write_jobs,
)

import orchestrator.manifest as manifest_module
from orchestrator.errors import MicsExportError
from orchestrator.manifest import (
    MANIFEST_NAME,
    JobRecord,
    JobStatus,
    Manifest,
    ManifestReadError,
    ManifestWriteError,
    ManifestWriter,
    load_previous,
    remove_stale_temp_files,
    write_atomic,
)
from orchestrator.simulator import ExportSpec, Faults, SimulatorConfig, SimulatorThread

PAGE = 4096


def _sim(*specs: ExportSpec, faults: Faults | None = None) -> SimulatorThread:
    # Small chunks: slow_body_bps paces the body chunk by chunk.
    config = SimulatorConfig(token=TOKEN, exports=specs, faults=faults or Faults(), chunk_bytes=16 << 10)
    return SimulatorThread(config)


def _tmps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# -- the writer, in process --------------------------------------------------------------------
@pytest.mark.anyio
async def test_a_failed_save_raises_and_leaves_no_temp_file(tmp_path: Path) -> None:
    """A folder at manifest.json: save() raises a clear error (an OSError a job fails on), no temp file stays."""
    (tmp_path / MANIFEST_NAME).mkdir()
    writer = ManifestWriter(Manifest(), tmp_path / MANIFEST_NAME)
    with pytest.raises(ManifestWriteError, match=r"cannot write .*manifest\.json: Is a directory") as caught:
        await writer.save()
    assert isinstance(caught.value, OSError) and isinstance(caught.value, MicsExportError)
    assert writer.behind and writer.required_failures == 1
    assert _tmps(tmp_path) == []
    (tmp_path / MANIFEST_NAME).rmdir()
    await writer.save()  # the next good write carries everything and clears the flag
    assert not writer.behind
    assert Manifest.from_bytes((tmp_path / MANIFEST_NAME).read_bytes()).run_id == writer.manifest.run_id


def test_the_last_write_raises_when_the_folder_is_a_file(tmp_path: Path) -> None:
    """save_now() into a 'folder' that is a file raises ManifestWriteError naming the cause."""
    (tmp_path / "out").write_text("not a folder")
    writer = ManifestWriter(Manifest(), tmp_path / "out" / MANIFEST_NAME)
    with pytest.raises(ManifestWriteError, match="Not a directory"):
        writer.save_now()
    assert writer.behind


@pytest.mark.anyio
async def test_the_flusher_survives_failures_and_remembers_the_manifest_is_behind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A marked change that cannot be flushed: no crash, one error logged, behind set until a later write succeeds."""
    import anyio

    attempts: list[Path] = []
    real_write = manifest_module.write_atomic

    def counted_write(path: Path, data: bytes) -> None:
        attempts.append(path)
        real_write(path, data)

    monkeypatch.setattr(manifest_module, "write_atomic", counted_write)
    folder = tmp_path / "gone"
    writer = ManifestWriter(Manifest(), folder / MANIFEST_NAME, flush_interval_s=0.005)
    caplog.set_level(logging.ERROR, "orchestrator.manifest")
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run_flusher)
        writer.mark()

        async def behind_for_a_while() -> bool:
            return writer.behind and len(caplog.records) == 1 and writer._written == 0

        await wait_until(behind_for_a_while, what="a failed flush")
        failed = len(attempts)

        async def more_failures() -> bool:
            return len(attempts) >= failed + 3

        await wait_until(more_failures, what="three more failing flushes")  # still one line, no crash
        assert len(caplog.records) == 1 and writer.required_failures == 0
        folder.mkdir()

        async def caught_up() -> bool:
            return not writer.behind

        await wait_until(caught_up, what="the flusher to catch up")
        tg.cancel_scope.cancel()
    assert (folder / MANIFEST_NAME).is_file()


def test_write_atomic_does_not_follow_a_planted_temp_symlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A symlink planted at the temp file's name is replaced, not written through: its target is untouched."""
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    monkeypatch.setattr(manifest_module, "_TMP_SEQ", itertools.count(7))  # so the next temp name is known
    (tmp_path / f".{MANIFEST_NAME}.{os.getpid()}-7.tmp").symlink_to(victim)
    write_atomic(tmp_path / MANIFEST_NAME, b"{}")
    assert victim.read_text() == "keep me"
    assert (tmp_path / MANIFEST_NAME).read_bytes() == b"{}" and _tmps(tmp_path) == []


def test_a_write_left_running_by_a_cancel_never_renames_a_later_writes_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writes of one manifest at once (a cancelled write goes on in its thread): each renames its own temp file."""
    path = tmp_path / MANIFEST_NAME
    first_synced, second_written, release_first = threading.Event(), threading.Event(), threading.Event()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if threading.current_thread().name == "first":
            real_fsync(fd)
            first_synced.set()
            release_first.wait(10)  # the first write stops between its fsync and its rename
        elif threading.current_thread().name == "second" and not second_written.is_set():
            second_written.set()  # the second stops after writing, before its own fsync
            assert release_first.wait(10)
            first.join(10)  # the first has renamed its file before this one goes on
            real_fsync(fd)
        else:
            real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    first = threading.Thread(target=write_atomic, args=(path, b'{"write": 1}'), name="first")
    second = threading.Thread(target=write_atomic, args=(path, b'{"write": 2}'), name="second")
    first.start()
    assert first_synced.wait(10)
    second.start()
    assert second_written.wait(10)
    release_first.set()  # the first renames now, while the second's temp file is not yet synced
    first.join(10)
    assert path.read_bytes() == b'{"write": 1}'  # its own bytes, not the second's unsynced file
    second.join(10)
    assert path.read_bytes() == b'{"write": 2}'
    assert _tmps(tmp_path) == []


def test_only_our_stale_temp_files_are_removed(tmp_path: Path) -> None:
    """Cleanup removes our temp files (a planted link too, not its target) and nothing else."""
    ours = [".manifest.json.123.tmp", ".daily.error.txt.9.tmp"]
    theirs = [
        "manifest.json",
        ".a.ndjson.879879001.part",
        ".manifest.json.x.tmp",
        "x.manifest.json.1.tmp",
        ".manifest.json.1.tmp.bak",
        "notes.tmp",
    ]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    target = tmp_path / "target"
    target.write_text("keep")
    (tmp_path / ".manifest.json.77.tmp").symlink_to(target)
    (tmp_path / ".manifest.json.88.tmp").mkdir()  # a folder is never ours: left alone
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted([*ours, ".manifest.json.77.tmp"])
    assert target.read_text() == "keep"
    left = {p.name for p in tmp_path.iterdir()}
    assert set(theirs) <= left and ".manifest.json.88.tmp" in left


# -- a corrupt manifest from an earlier run ----------------------------------------------------
CORRUPT = [
    b'{"version": 1, "run_id": "r", "started_at": "t", "sta',
    b"[1, 2]",
    b'{"version": 1, "run_id": "r", "started_at": "t", "status": "DANCING", "jobs": []}',
    b'{"version": 1, "run_id": "r", "started_at": "t", "status": "RUNNING", "jobs": [{"name": "a", "attempts": "x"}]}',
    b'{"version": 1, "run_id": "r", "started_at": "t", "status": "RUNNING", "jobs": [{"name": "a", "bytes": true}]}',
    b'{"version": 1, "run_id": "r", "started_at": "t", "status": "RUNNING", "jobs": {"a": {}}}',
    b"\xff\xfe",
]


@pytest.mark.parametrize("data", CORRUPT)
def test_a_corrupt_manifest_is_moved_aside_with_a_warning(
    tmp_path: Path, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A manifest that does not parse or holds a wrong type: kept aside as .corrupt-<time>, named in a warning."""
    caplog.set_level(logging.WARNING, "orchestrator.manifest")
    (tmp_path / MANIFEST_NAME).write_bytes(data)
    assert load_previous(tmp_path / MANIFEST_NAME) is None
    aside = list(tmp_path.glob(f"{MANIFEST_NAME}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == data
    assert not (tmp_path / MANIFEST_NAME).exists()
    assert [r.getMessage() for r in caplog.records if aside[0].name in r.getMessage()], caplog.text


def test_a_valid_manifest_is_read_back(tmp_path: Path) -> None:
    """A manifest this tool wrote loads whole: the records a rerun resumes from."""
    doc = Manifest(jobs={"a": JobRecord(name="a", export_id="1", execution_id="9", status=JobStatus.DOWNLOADING)})
    (tmp_path / MANIFEST_NAME).write_bytes(doc.to_bytes())
    loaded = load_previous(tmp_path / MANIFEST_NAME)
    assert loaded is not None and loaded.jobs["a"] == doc.jobs["a"] and loaded.run_id == doc.run_id
    assert load_previous(tmp_path / "none.json") is None


def test_a_manifest_that_is_not_a_file_is_a_usage_error(tmp_path: Path) -> None:
    """A folder or a symlink at manifest.json is not moved or followed: a one-line usage error."""
    (tmp_path / MANIFEST_NAME).mkdir()
    with pytest.raises(ManifestReadError, match="not a regular file"):
        load_previous(tmp_path / MANIFEST_NAME)
    (tmp_path / MANIFEST_NAME).rmdir()
    (tmp_path / MANIFEST_NAME).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ManifestReadError, match="not a regular file"):
        load_previous(tmp_path / MANIFEST_NAME)


def test_a_rerun_over_a_corrupt_manifest_says_so_and_cleans_up(tmp_path: Path) -> None:
    """Over a corrupt manifest and a killed run's temp files: says so, keeps the corrupt copy, removes the temps."""
    spec = ExportSpec("1", size_bytes=20_000, pending_s=0.01, running_s=0.02)
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST_NAME).write_bytes(b'{"jobs": [')
    (out / ".manifest.json.4242.tmp").write_bytes(b'{"half')
    with _sim(spec) as sim:
        path = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}])
        proc = cli_in_process("run", str(path), "--workers", "0", env=cli_env(sim.url))
    assert proc.returncode == 0, proc.stderr
    assert "not a valid manifest" in proc.stderr and "moved aside to manifest.json.corrupt-" in proc.stderr
    assert ".manifest.json.4242.tmp" in proc.stderr  # the cleanup is logged
    assert [p.read_bytes() for p in out.glob("manifest.json.corrupt-*")] == [b'{"jobs": [']
    assert_exact(out, "a", spec)
    assert leftovers(out) == []


# -- a real full disk ----------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mounts small tmpfs file systems under tmp_path (unmounted after); skips where mount is not permitted."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        try:
            proc = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                capture_output=True,
                text=True,
                check=False,
            )
        except FileNotFoundError:
            pytest.skip("no mount command: the disk-full cases need a small tmpfs")
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): the disk-full cases need one")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill_inodes(folder: Path) -> int:
    """Create empty files in ``folder`` until the file system has no inode left; returns how many."""
    folder.mkdir()
    count = 0
    while True:
        try:
            (folder / str(count)).touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            return count
        count += 1


def _free_pages(folder: Path) -> int:
    info = os.statvfs(folder)
    assert info.f_bsize == PAGE
    return info.f_bavail


def test_no_rename_after_a_record_that_could_not_be_written(
    tmp_path: Path, tmpfs: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of inodes mid-download: the data fits, the record does not: no final file, exit 1; a rerun completes."""
    from orchestrator.part_file import LocalTarget

    fs = tmpfs("size=8m,nr_inodes=64")
    out = fs / "out"
    spec = ExportSpec("1", size_bytes=200_000, pending_s=0.01, running_s=0.02)
    real_open = LocalTarget.open

    async def open_then_fill(self: LocalTarget, resume: bool) -> int:
        start = await real_open(self, resume)
        if not (fs / "filler").exists():  # the first download only: the part file has its inode and grows;
            fill_inodes(fs / "filler")  # no new file (a manifest temp) can be made from now on
        return start

    monkeypatch.setattr(LocalTarget, "open", open_then_fill)
    with _sim(spec) as sim:
        path = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}])
        args = ("run", str(path), "--output-dir", str(out), "--workers", "0")
        proc = cli_in_process(*args, env=cli_env(sim.url))
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr
        assert not (out / "a.ndjson").exists()
        assert leftovers(out) == []
        # The removed part file gave its inode back: the last write could say what happened.
        entry = jobs_by_name(manifest(out))["a"]
        assert entry["status"] == "FAILED" and "cannot write" in entry["error"], entry
        assert "No space left on device" in entry["error"]

        monkeypatch.setattr(LocalTarget, "open", real_open)
        shutil.rmtree(fs / "filler")
        rerun = cli_in_process(*args, env=cli_env(sim.url))
    assert rerun.returncode == 0, rerun.stderr
    assert_exact(out, "a", spec)


def test_data_that_fits_with_a_manifest_that_does_not_fails_the_job(
    tmp_path: Path, tmpfs: Callable[[str], Path]
) -> None:
    """Pages for the data but none for the record: no rename, the temp file removed, the job FAILED on disk, exit 1."""
    fs = tmpfs("size=2m")
    out = fs / "out"
    out.mkdir()
    spec = ExportSpec("1", size_bytes=300_000, pending_s=0.01, running_s=0.02)
    data_pages = -(-spec.result().size // PAGE)
    # Leave exactly the data's pages plus the one manifest.json takes: every manifest write
    # before the download fits (its temp file is the page the data takes later), the
    # record's write after it does not.
    filler = fs / "filler"
    filler.write_bytes(b"\0" * ((_free_pages(fs) - data_pages - 1) * PAGE))
    assert _free_pages(fs) == data_pages + 1
    with _sim(spec) as sim:
        path = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}])
        proc = cli_in_process("run", str(path), "--output-dir", str(out), "--workers", "0", env=cli_env(sim.url))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "a.ndjson").exists()
    assert leftovers(out) == [] and _tmps(out) == []
    doc = manifest(out)  # the failed download freed its pages: the last write went through
    entry = jobs_by_name(doc)["a"]
    assert doc["status"] == "FAILED" and entry["status"] == "FAILED"
    assert "cannot write" in entry["error"] and "No space left on device" in entry["error"], entry


def test_a_last_manifest_write_that_fails_is_not_exit_0(
    tmp_path: Path, tmpfs: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every job succeeded but the last manifest write hits a full disk: exit 1, the log says it is behind."""
    from orchestrator.scheduler import Runner

    fs = tmpfs("size=8m,nr_inodes=64")
    out = fs / "out"
    real_run = Runner.run

    async def run_then_fill(self: Runner) -> Any:
        # After every job is done and recorded, before the run's last manifest write: a moment
        # no outside timing can hit.
        status = await real_run(self)
        fill_inodes(fs / "filler")
        return status

    monkeypatch.setattr(Runner, "run", run_then_fill)
    spec = ExportSpec("1", size_bytes=20_000, pending_s=0.01, running_s=0.02)
    with _sim(spec) as sim:
        path = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}])
        proc = cli_in_process("run", str(path), "--output-dir", str(out), "--workers", "0", env=cli_env(sim.url))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "behind" in proc.stderr and "No space left on device" in proc.stderr
    assert jobs_by_name(manifest(out))["a"]["status"] == "SUCCEEDED"  # recorded before its rename
    assert_exact(out, "a", spec)
    assert _tmps(out) == []


def test_a_disk_full_from_the_start_sends_nothing(tmp_path: Path, tmpfs: Callable[[str], Path]) -> None:
    """No room for the run's first manifest write: exit 1 with one error line, and not one request sent."""
    fs = tmpfs("size=8m,nr_inodes=64")
    out = fs / "out"
    out.mkdir()
    (out / ".lock").touch()  # the run's lock file exists: only the manifest needs a new inode
    fill_inodes(fs / "filler")
    with _sim(ExportSpec("1", size_bytes=1000)) as sim:
        path = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}])
        proc = cli_in_process("run", str(path), "--output-dir", str(out), "--workers", "0", env=cli_env(sim.url))
        requests = sim.stats.total_requests
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mics-export: error: cannot write") and "No space left on device" in last
    assert requests == 0
    assert not (out / MANIFEST_NAME).exists() and _tmps(out) == []


def test_manifest_json_is_what_from_bytes_reads() -> None:
    """to_bytes and from_bytes round-trip every field (the check on types accepts what the tool writes)."""
    rec = JobRecord(
        name="a",
        export_id="1",
        execution_id="2",
        status=JobStatus.SUCCEEDED,
        attempts=2,
        path="a.ndjson",
        bytes=10,
        records=3,
        invalid_lines=1,
        invalid_line_numbers=[2],
        sha256="0" * 64,
        erroneous_tasks=0,
        num_tasks=4,
        error=None,
        error_file="a.error.txt",
        started_at="s",
        finished_at="f",
        query_id="5",
        length_check="content-length",
        creating_since=123,
    )
    doc = Manifest(jobs={"a": rec})
    assert Manifest.from_bytes(doc.to_bytes()).jobs["a"] == rec
    assert orjson.loads(doc.to_bytes())["jobs"][0]["creating_since"] == 123


def test_a_rerun_over_a_planted_huge_manifest_refuses_it_without_reading_it(tmp_path: Path) -> None:
    """A (sparse) 300 MiB manifest.json: one line naming it and exit 2, before a byte of it is read or moved."""
    out = tmp_path / "out"
    out.mkdir()
    with open(out / MANIFEST_NAME, "wb") as planted:
        planted.truncate(300 << 20)
    jobs = write_jobs(tmp_path, [{"name": "j", "export_id": "1"}])
    proc = cli_in_process("run", str(jobs), env=cli_env("http://127.0.0.1:9"))
    assert proc.returncode == 2, proc.stderr
    assert "larger than 256 MiB" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert (out / MANIFEST_NAME).stat().st_size == 300 << 20
