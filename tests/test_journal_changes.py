"""The writer's journal appends look only at the records changed since the last write (issue 14
part 3), and still carry every change: a replaced record, a job added with an older record, a
change made while a write is in flight, a change whose write failed, and two writers at once.

Each case ends by reading the folder back as a rerun would (manifest.json, then the journal) and
comparing it with the manifest in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator import offload
from orchestrator.journal import job_values
from orchestrator.manifest import (
    JOURNAL_NAME,
    MANIFEST_NAME,
    JobRecord,
    JobStatus,
    Journal,
    Manifest,
    ManifestWriteError,
    ManifestWriter,
    read_manifest_with_journal,
)

JOBS = 400
"""Past FRESH_BYTES: the writes after the first are journal appends, not whole manifests."""


def _manifest(prefix: str = "job") -> Manifest:
    m = Manifest()
    for i in range(JOBS):
        m.jobs[f"{prefix}-{i:04d}"] = JobRecord(name=f"{prefix}-{i:04d}", export_id=str(i + 1))
    return m


def _on_disk(folder: Path) -> bytes:
    """What a rerun would read: manifest.json with its journal replayed."""
    return read_manifest_with_journal(folder / MANIFEST_NAME).to_bytes()


async def _compacted(folder: Path, m: Manifest) -> ManifestWriter:
    """A writer whose first write (a compaction) is done: later writes append to the journal."""
    writer = ManifestWriter(m, folder / MANIFEST_NAME, journal=True)
    await writer.save()
    assert writer.compactions == 1
    return writer


@pytest.mark.anyio
async def test_an_append_looks_at_the_changed_jobs_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a change to 2 of 400 jobs, the append reads those 2 records, not all 400."""
    m = _manifest()
    writer = await _compacted(tmp_path, m)
    looked: list[str] = []

    def counted(rec: JobRecord) -> Any:
        looked.append(rec.name)
        return job_values(rec)

    monkeypatch.setattr("orchestrator.manifest.job_values", counted)
    m.jobs["job-0007"].status = JobStatus.RUNNING
    m.jobs["job-0300"].num_tasks = 12
    await writer.save()
    assert sorted(looked) == ["job-0007", "job-0300"] and writer.compactions == 1
    looked.clear()
    await writer.save()  # nothing changed since: nothing to look at
    assert looked == []
    assert _on_disk(tmp_path) == m.to_bytes()


@pytest.mark.anyio
async def test_replaced_and_added_records_reach_the_journal(tmp_path: Path) -> None:
    """A job's record replaced by a new one, and a new job with a record older than the last write."""
    m = _manifest()
    older = JobRecord(name="late", export_id="999", status=JobStatus.SUCCEEDED, attempts=2)
    writer = await _compacted(tmp_path, m)
    m.jobs["job-0001"] = JobRecord(name="job-0001", attempts=3)  # as a new attempt does
    m.jobs["late"] = older  # not assigned to since the last write: found by the job count
    await writer.save()
    assert writer.compactions == 1 and (tmp_path / JOURNAL_NAME).exists()
    assert _on_disk(tmp_path) == m.to_bytes()


@pytest.mark.anyio
async def test_a_change_made_during_a_write_is_carried_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record assigned to after a write's snapshot, while its fsync runs, is not dropped as written."""
    m = _manifest()
    writer = await _compacted(tmp_path, m)
    real = offload.run_sync

    async def meanwhile(func: Callable[..., Any], *args: Any) -> Any:
        m.jobs["job-0002"].status = JobStatus.DOWNLOADING  # another task, while the I/O is away
        return await real(func, *args)

    m.jobs["job-0002"].status = JobStatus.RUNNING
    monkeypatch.setattr(offload, "run_sync", meanwhile)
    await writer.save()
    monkeypatch.setattr(offload, "run_sync", real)
    assert read_manifest_with_journal(tmp_path / MANIFEST_NAME).jobs["job-0002"].status is JobStatus.RUNNING
    await writer.save()
    assert _on_disk(tmp_path) == m.to_bytes()


@pytest.mark.anyio
async def test_a_change_whose_append_failed_is_written_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append that fails (disk full) keeps its changes for the next write, which carries them."""
    m = _manifest()
    writer = await _compacted(tmp_path, m)

    def full(*_: object) -> int:
        raise OSError(28, "No space left on device")

    m.jobs["job-0003"].status = JobStatus.FAILED
    monkeypatch.setattr(Journal, "append", full)
    with pytest.raises(ManifestWriteError):
        await writer.save()
    monkeypatch.undo()
    await writer.save()
    assert _on_disk(tmp_path) == m.to_bytes()


def test_two_writers_at_once_each_journal_their_own_changes(tmp_path: Path) -> None:
    """Two live writers (two folders): each append carries its own manifest's changes, none lost."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ma, mb = _manifest("a"), _manifest("b")

    async def main() -> None:
        wa, wb = await _compacted(tmp_path / "a", ma), await _compacted(tmp_path / "b", mb)
        ma.jobs["a-0005"].status = JobStatus.RUNNING
        mb.jobs["b-0006"].status = JobStatus.PENDING
        mb.jobs["b-0006"].attempts = 4
        await wa.save()
        ma.jobs["a-0005"].attempts = 2
        await wb.save()
        await wa.save()

    anyio.run(main)
    assert _on_disk(tmp_path / "a") == ma.to_bytes() and _on_disk(tmp_path / "b") == mb.to_bytes()


def test_a_dead_writer_never_stops_a_live_one_from_journaling(tmp_path: Path) -> None:
    """A writer collected while a live one's change set equals its own (both empty): the live writer still
    journals every later change (a finaliser that removed an *equal* change set silenced it)."""
    import gc

    (tmp_path / "dead").mkdir()
    (tmp_path / "live").mkdir()
    m, other = _manifest("live"), _manifest("dead")

    async def main() -> None:
        live = await _compacted(tmp_path / "live", m)
        dead: ManifestWriter | None = ManifestWriter(other, tmp_path / "dead" / MANIFEST_NAME, journal=True)
        assert dead is not None and live._touched == dead._touched == {}  # equal; the live one registered first
        del dead
        gc.collect()
        m.jobs["live-0009"].status = JobStatus.RUNNING
        await live.save()

    anyio.run(main)
    assert _on_disk(tmp_path / "live") == m.to_bytes()
