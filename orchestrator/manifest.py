"""The run manifest (``manifest.json``): what happened, and what a rerun needs to resume.

The manifest is both the report (SPEC.md fixes its fields) and the resume state: the
execution ids it records are what a rerun adopts. So it is written *before* the moment
that state would be lost: the intent to create an execution (``creating_since``) before
the POST, the id as soon as the response arrives. Which change needs what is said by the
record's transitions (:mod:`orchestrator.record`, :class:`~orchestrator.record.Durability`);
this module makes it so.

Writes are grouped: many jobs changing state at once share one write
(:class:`ManifestWriter`). In a local folder a write appends the changed fields of the
changed jobs to a journal beside the manifest (``.manifest.journal``, one JSON line per job,
fsynced: :mod:`orchestrator.journal`), and ``manifest.json`` is rewritten whole (atomically:
temp file, fsync, rename, fsync the folder) only now and then — "compacted" — and at the end
of the run. So the bytes written grow with the number of changes, not with the square of the
jobs. A reader of the resume state (:func:`~orchestrator.journal.load_previous`,
:func:`~orchestrator.journal.read_manifest_with_journal`) reads ``manifest.json`` then
replays the journal on top.

A write that fails (disk full, a folder in the way) is a failure, never a log line only:
:meth:`ManifestWriter.save` raises :class:`ManifestWriteError`, so the step it was to
record does not happen, and the writer remembers that the file on disk is behind.

Past ~350 lines because the group-commit writer is one state machine (what is on disk
against what changed) best read whole; :func:`write_atomic` stays beside it because
benchmarks count manifest writes by patching this module's name. The names that moved to
:mod:`orchestrator.record` and :mod:`orchestrator.journal` are importable from here too.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.lowlevel
import orjson

from orchestrator import offload
from orchestrator.errors import MicsExportError
from orchestrator.journal import (
    JOB_DEFAULTS,
    JOB_FIELDS,
    JOURNAL_FORMAT,
    JOURNAL_NAME,
    MANIFEST_NAME,
    RUN_FIELDS,
    Journal,
    ManifestReadError,
    Replay,
    job_values,
    load_manifest,
    load_previous,
    read_journal,
    read_manifest_with_journal,
    replay_journal,
    run_values,
)
from orchestrator.part_file import fsync_dir
from orchestrator.record import (
    _CLOCK,
    Durability,
    JobRecord,
    JobStatus,
    LiveFigures,
    Manifest,
    RunStatus,
    as_dict,
    now_iso,
    parse_iso,
    unwatch,
    watch,
)

log = logging.getLogger("orchestrator.manifest")

_STALE_TMP = re.compile(r"\.(?:manifest\.json|[A-Za-z0-9._-]+\.error\.txt)\.[0-9]+(?:-[0-9]+)?\.tmp")
"""The temporary files :func:`write_atomic` makes in an output folder (manifest and error
files), which a killed run leaves behind."""


class ManifestWriteError(MicsExportError, OSError):
    """The manifest could not be written, so what it was to record must not happen.

    An OSError too: the run's per-job handling of local errors (disk full, a folder in the
    way) then fails the job whose step it was, and the other jobs go on.
    """


def remove_stale_temp_files(folder: Path) -> list[str]:
    """Remove the temporary files of :func:`write_atomic` a killed run left in ``folder``.

    Only names of that exact pattern go (never :data:`JOURNAL_NAME`, which holds the killed
    run's last changes), only non-folders, and unlink never follows a
    symlink (a planted link is removed, its target untouched). The caller holds the
    folder's lock, so no other run is writing them. Returns the names removed.
    """
    removed: list[str] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name == JOURNAL_NAME:
                continue  # never a temp file: the resume state a killed run left (replayed later)
            if not _STALE_TMP.fullmatch(entry.name) or entry.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed


_TMP_SEQ = itertools.count()
"""Numbers the temp files of :func:`write_atomic` (``next`` on it is atomic under the GIL)."""


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync the folder.

    The temp file is opened without following symlinks and removed if anything fails,
    so a full disk leaves no half-written temp file behind.
    """
    # Unique per write, not only per process: a write whose task was cancelled goes on in its
    # worker thread, and a later write sharing its temp name would rename the other's file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{next(_TMP_SEQ)}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # one a killed process with our pid left (never a folder: that fails)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


COMPACT_RATIO = 1.0
"""A compaction waits until the journal has grown by this many times the manifest's size
since the last one: compactions then write at most as many bytes as the journal did."""
COMPACT_RATE = 32 << 10
"""... and until ``manifest size / COMPACT_RATE`` seconds have passed since the last one (a
6 MB manifest: 3 minutes), so that a long run's manifest.json costs little bandwidth too."""
FRESH_BYTES = 64 << 10
"""A manifest up to this size (about 100 jobs) is written whole at every write, as it was
before the journal: cheap at that size, and manifest.json is current to the last write."""


class ManifestStore(Protocol):
    """Where the manifest is written whole: a local file or a bucket object (orchestrator.sink)."""

    label: str
    """The manifest's path or URL, for messages."""

    async def write_manifest(self, data: bytes) -> None: ...
    async def write_manifest_last(self, data: bytes) -> None:
        """The run's last word, after cancellation: the caller shields it."""
        ...


class FileManifestStore:
    """``manifest.json`` in a local folder, replaced atomically (:func:`write_atomic`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.label = str(path)

    async def write_manifest(self, data: bytes) -> None:
        await offload.run_sync(write_atomic, self.path, data)

    async def write_manifest_last(self, data: bytes) -> None:
        write_atomic(self.path, data)  # blocking on purpose: no await for a second signal to hit


@dataclass
class _Pending:
    """What one write is to make durable, gathered on the event loop before its I/O."""

    clock: int
    data: bytes
    jobs: dict[str, tuple[Any, ...]]
    run: tuple[Any, ...]
    journal_id: str | None = None
    """Set for a compaction: the new manifest.json's id."""


class ManifestWriter:
    """Group commit: callers of :meth:`save` share writes; each returns once its change is on disk.

    Changes that need not be on disk before the next step (a status moving on, a
    failure's details) are only :meth:`mark`-ed: :meth:`run_flusher` writes them within
    ``flush_interval_s``, or an earlier :meth:`save` takes them along. A kill -9 can lose at
    most that much of them, and every one of them is redone or recovered by a rerun.

    In a local folder a write appends the changed fields of the jobs changed since the last
    write to the journal (:class:`Journal`, fsynced), and manifest.json is compacted (written
    whole with a new ``journal_id``) at the first write, at every write while it is small
    (FRESH_BYTES), when COMPACT_RATIO and COMPACT_RATE allow, and at the last word
    (:meth:`save_last`, :meth:`save_now`, which also delete the journal). A bucket has no
    append: every write is a whole PUT, as before.

    A failed write raises :class:`ManifestWriteError` from :meth:`save` and
    :meth:`save_now` (the caller's step must not happen); the flusher's failures are
    remembered in :attr:`behind` until a later write succeeds, and
    :attr:`required_failures` counts the saves that raised.
    """

    def __init__(
        self,
        manifest: Manifest,
        path: Path | ManifestStore,
        flush_interval_s: float = 1.0,
        *,
        journal: bool = True,
    ) -> None:
        self.manifest = manifest
        self.store: ManifestStore = FileManifestStore(path) if isinstance(path, Path) else path
        self.path: Path | str = path if isinstance(path, Path) else path.label
        """Where the manifest is: a local path, or its bucket URL."""
        self.flush_interval_s = flush_interval_s
        self.writes = 0
        self.compactions = 0
        """Whole writes of manifest.json (every write, in a bucket)."""
        self.bytes_written = 0
        """Bytes written to manifest.json and the journal by this writer."""
        self.behind = False
        """A change is not on disk because a write failed (cleared by a later good write)."""
        self.required_failures = 0
        """Saves that raised: steps that did not happen because they could not be recorded."""
        self.journal = Journal(path.with_name(JOURNAL_NAME)) if journal and isinstance(path, Path) else None
        self._lock = anyio.Lock()
        self._changes = 0
        self._written = 0
        self._reported: set[str] = set()
        # What is on disk (manifest.json + journal), per job and for the run: the next
        # append writes only what differs. Valid once a compaction succeeded (_base set).
        # The records assigned to since the last good write (record.watch() fills it): an
        # append looks at these, not at every job. Dropped from it once a write covered them.
        self._touched: dict[int, JobRecord] = {}
        watch(self._touched)
        weakref.finalize(self, unwatch, self._touched)
        self._disk_jobs: dict[str, tuple[Any, ...]] = {}
        self._disk_run: tuple[Any, ...] = ()
        self._base: str | None = None  # journal_id of the manifest.json on disk
        self._restart = True  # the journal on disk still names an older manifest.json
        self._base_size = 0
        self._base_at = 0.0
        self._journal_since = 0  # journal bytes since the last compaction

    async def save(self) -> None:
        """Persist the manifest as it is now (or later: a later write includes this change).

        Raises ManifestWriteError if the change could not be written.
        """
        self._changes += 1
        try:
            await self._write(self._changes)
        except ManifestWriteError:
            self.required_failures += 1
            raise

    def mark(self) -> None:
        """Note a change that the next write (within ``flush_interval_s``) will carry."""
        self._changes += 1

    async def persist(self, *needs: Durability) -> None:
        """Make a record's change as durable as its transitions say (the strongest of ``needs``):
        NOW saves (ManifestWriteError if it fails), SOON marks, WITH_NEXT waits for the next write."""
        need = max(needs, default=Durability.WITH_NEXT)
        if need is Durability.NOW:
            await self.save()
        elif need is Durability.SOON:
            self.mark()

    async def run_flusher(self) -> None:
        """Write marked changes every ``flush_interval_s`` seconds, until cancelled.

        A failed write does not stop it (nor the run): :attr:`behind` stays set, and the
        next tick, a save, or the run's last write tries again. A tick also compacts a
        journal that is due for it while nothing changes.
        """
        while True:
            await anyio.sleep(self.flush_interval_s)
            if self._written < self._changes or (self._journal_since and self._compaction_due()):
                with contextlib.suppress(ManifestWriteError):
                    await self._write(self._changes, refresh=True)

    def _compaction_due(self) -> bool:
        if self.journal is None or self._base is None or self._base_size <= FRESH_BYTES:
            return True
        if time.monotonic() - self._base_at < self._base_size / COMPACT_RATE:
            return False
        return self._journal_since >= COMPACT_RATIO * self._base_size

    async def _write(self, wanted: int, *, refresh: bool = False) -> None:
        async with self._lock:
            if self._written >= wanted and not refresh:
                return  # someone else's write already covered this change
            # One turn of the loop before the snapshot: the saves of the jobs woken in this turn
            # join this write (group commit) instead of each paying a journal fsync and a scan
            # of every job. anyio's thread hop had this turn built in; the cheaper hop has not.
            await anyio.lowlevel.checkpoint()
            covered = self._changes
            try:
                if self._compaction_due():
                    pending = self._compaction()
                    await self.store.write_manifest(pending.data)
                    self._compacted(pending)
                else:
                    pending = self._changed()
                    if pending.data:
                        restart = self._base if self._restart else None
                        assert self.journal is not None
                        await offload.run_sync(self.journal.append, pending.data, restart)
                        self._appended(pending, restart)
            except (OSError, MicsExportError) as exc:  # MicsExportError: a bucket's StorageError
                raise self._failed(exc) from exc
            self._done(covered)

    def save_now(self) -> None:
        """Blocking write of a local manifest, for the last word after cancellation."""
        if not isinstance(self.store, FileManifestStore):
            raise TypeError("save_now is for a local manifest: use save_last")
        covered = self._changes
        pending = self._compaction()
        try:
            write_atomic(self.store.path, pending.data)
        except OSError as exc:
            self._rescue()
            raise self._failed(exc) from exc
        self._compacted(pending, last=True)
        self._done(covered)

    async def save_last(self) -> None:
        """The run's last word (the caller shields it); ManifestWriteError if it fails."""
        covered = self._changes
        pending = self._compaction()
        try:
            await self.store.write_manifest_last(pending.data)
        except (OSError, MicsExportError) as exc:
            self._rescue()
            raise self._failed(exc) from exc
        self._compacted(pending, last=True)
        self._done(covered)

    def _compaction(self) -> _Pending:
        """The whole manifest with a new journal_id (the manifest keeps its old one until written)."""
        clock = next(_CLOCK)
        old, new = self.manifest.journal_id, (uuid.uuid4().hex if self.journal is not None else None)
        self.manifest.journal_id = new
        try:
            data = self.manifest.to_bytes()
        finally:
            self.manifest.journal_id = old
        jobs = {name: job_values(rec) for name, rec in self.manifest.jobs.items()} if self.journal else {}
        return _Pending(clock, data, jobs, run_values(self.manifest), new)

    def _compacted(self, pending: _Pending, *, last: bool = False) -> None:
        self.compactions += 1
        self.bytes_written += len(pending.data)
        self._covered(pending.clock)
        if self.journal is None:
            return
        self.manifest.journal_id = pending.journal_id
        self._disk_jobs, self._disk_run = pending.jobs, pending.run
        self._base, self._restart = pending.journal_id, True
        self._base_size, self._base_at, self._journal_since = len(pending.data), time.monotonic(), 0
        if last:
            # All of it is in manifest.json: the folder keeps that one file. (Not durable
            # before a crash? Then the journal names an older manifest: ignored.)
            with contextlib.suppress(OSError):
                self.journal.remove()

    def _changed(self) -> _Pending:
        """The journal lines of what changed since the last write (on the loop: a consistent view).

        The jobs looked at are the records assigned to since the last good write that are
        this manifest's (not a replaced or another manifest's record), and any job whose name
        the disk does not have yet (one added since, even with an older record: found when the
        count of jobs outgrows what is on disk; jobs are never removed from a manifest).
        """
        clock = next(_CLOCK)
        lines: list[bytes] = []
        jobs: dict[str, tuple[Any, ...]] = {}
        disk, current = self._disk_jobs, self.manifest.jobs
        changed = {rec.name: rec for rec in self._touched.values() if current.get(rec.name) is rec}
        if len(current) > len(disk):
            changed.update((name, rec) for name, rec in current.items() if name not in disk)
        for name, rec in changed.items():
            now = job_values(rec)
            before = disk.get(name, JOB_DEFAULTS)
            diff = {k: v for k, v, b in zip(JOB_FIELDS, now, before, strict=True) if v != b or k == "name"}
            if len(diff) > 1 or name not in disk:
                del diff["name"]
                lines.append(orjson.dumps({"job": name, "set": diff}))
                jobs[name] = now
        run = run_values(self.manifest)
        if run != self._disk_run:
            lines.append(orjson.dumps({"run": dict(zip(RUN_FIELDS, run, strict=True))}))
        data = b"\n".join(lines) + b"\n" if lines else b""
        return _Pending(clock, data, jobs, run)

    def _covered(self, clock: int) -> None:
        """A write whose snapshot was taken at ``clock`` is on disk: the records not assigned
        to since then need no look at the next write."""
        touched = self._touched
        for key in [key for key, rec in touched.items() if rec._v <= clock]:
            del touched[key]

    def _appended(self, pending: _Pending, restart: str | None) -> None:
        self._covered(pending.clock)
        self._disk_jobs.update(pending.jobs)
        self._disk_run = pending.run
        written = len(pending.data) + (self._header_size if restart is not None else 0)
        self._restart = False
        self._journal_since += written
        self.bytes_written += written

    @property
    def _header_size(self) -> int:
        return len(orjson.dumps({"journal": JOURNAL_FORMAT, "base": self._base})) + 1

    def _rescue(self) -> None:
        """After a failed last word: put what changed in the journal if that still works,
        so that a rerun has it even though manifest.json is behind (best effort)."""
        if self.journal is None or self._base is None:
            return
        pending = self._changed()
        if not pending.data:
            return
        restart = self._base if self._restart else None
        with contextlib.suppress(OSError):
            self.journal.append(pending.data, restart)
            self._appended(pending, restart)

    def _done(self, covered: int) -> None:
        self._written = max(self._written, covered)
        self.behind = False  # writes are serialised: this one carries every change a failed one had
        self.writes += 1

    def _failed(self, exc: OSError | MicsExportError) -> ManifestWriteError:
        self.behind = True
        if isinstance(exc, OSError):
            error = ManifestWriteError(f"cannot write {self.path}: {exc.strerror or exc}")
        else:
            error = ManifestWriteError(str(exc))  # already one line naming the object
        if str(error) not in self._reported:  # once per kind of error, not once per job
            self._reported.add(str(error))
            log.error("%s", error, extra={"event": "manifest_failed"})
        return error


__all__ = [
    "JOURNAL_NAME",
    "MANIFEST_NAME",
    "Durability",
    "FileManifestStore",
    "JobRecord",
    "JobStatus",
    "Journal",
    "LiveFigures",
    "Manifest",
    "ManifestReadError",
    "ManifestStore",
    "ManifestWriteError",
    "ManifestWriter",
    "Replay",
    "RunStatus",
    "as_dict",
    "load_manifest",
    "load_previous",
    "now_iso",
    "parse_iso",
    "read_journal",
    "read_manifest_with_journal",
    "remove_stale_temp_files",
    "replay_journal",
    "write_atomic",
]
