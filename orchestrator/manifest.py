"""The run manifest (``manifest.json``): what happened, and what a rerun needs to resume.

The manifest is both the report (SPEC.md fixes its fields) and the resume state: the
execution ids it records are what a rerun adopts. So it is written *before* the moment
that state would be lost: the intent to create an execution (``creating_since``) before
the POST, the id as soon as the response arrives.

Writes are atomic (temp file, fsync, rename, fsync the folder) and grouped: many jobs
changing state at once share one write (:class:`ManifestWriter`), so 1,000 jobs do not
mean thousands of fsyncs of a growing file.

A write that fails (disk full, a folder in the way) is a failure, never a log line only:
:meth:`ManifestWriter.save` raises :class:`ManifestWriteError`, so the step it was to
record does not happen, and the writer remembers that the file on disk is behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import stat
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import anyio
import orjson

from orchestrator.download import fsync_dir
from orchestrator.errors import MicsExportError, UsageError

MANIFEST_NAME = "manifest.json"
log = logging.getLogger("orchestrator.manifest")

_STALE_TMP = re.compile(r"\.(?:manifest\.json|[A-Za-z0-9._-]+\.error\.txt)\.[0-9]+\.tmp")
"""The temporary files :func:`write_atomic` makes in an output folder (manifest and error
files), which a killed run leaves behind."""


class ManifestWriteError(MicsExportError, OSError):
    """The manifest could not be written, so what it was to record must not happen.

    An OSError too: the run's per-job handling of local errors (disk full, a folder in the
    way) then fails the job whose step it was, and the other jobs go on.
    """


class ManifestReadError(UsageError):
    """The manifest of an earlier run is there but cannot be read (not a regular file...)."""


class RunStatus(StrEnum):
    """The run as a whole."""

    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    INTERRUPTED = "INTERRUPTED"


class JobStatus(StrEnum):
    """One job, from the tool's point of view."""

    PENDING = "PENDING"  # not started, or waiting for its execution to start
    RUNNING = "RUNNING"  # the platform is running its execution
    DOWNLOADING = "DOWNLOADING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    CANCELLED = "CANCELLED"  # the platform cancelled the execution

    @property
    def is_final(self) -> bool:
        """The job will not change in this run."""
        return self in (
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.TIMED_OUT,
            JobStatus.CANCELLED,
        )


def now_iso() -> str:
    """The current UTC time as ``2026-11-28T02:00:00Z``."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class JobRecord:
    """One job's line in the manifest (SPEC.md fields, then resume state).

    Every field is written (``query_id`` is null for export_id jobs); figures that only
    the live display needs are kept apart, in :class:`LiveFigures`.
    """

    name: str
    export_id: str | None = None
    execution_id: str | None = None
    status: JobStatus = JobStatus.PENDING
    attempts: int = 0
    path: str | None = None
    bytes: int | None = None
    records: int | None = None
    invalid_lines: int = 0
    invalid_line_numbers: list[int] = field(default_factory=list)
    sha256: str | None = None
    erroneous_tasks: int | None = None
    num_tasks: int | None = None
    error: str | None = None
    error_file: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    query_id: str | None = None
    length_check: str | None = None
    """How the file was known complete: content-length, content-range, chunked, end-probe or unverified."""
    creating_since: int | None = None
    """Epoch ms just before a create-execution request whose answer is not yet recorded."""
    etag: str | None = None
    """In a bucket: the object's ETag once complete (a rerun trusts ``sha256`` while it is unchanged)."""
    object_size: int | None = None
    """In a bucket: the object's stored size (compressed, when compressed)."""
    guard: dict[str, Any] | None = None
    """The guard that failed the job: ``{"name", "reason", "value", "limit"}`` (orchestrator/guards.py)."""
    previous_records: int | None = None
    """The records of the job's last SUCCEEDED run, when a guard compared with it (max_drop_pct)."""
    note: str | None = None
    """What a reader should know of a job that is not an error (a first run's max_drop_pct...)."""
    reused_from: dict[str, Any] | None = None
    """``{"execution_id", "created_at"}`` when reuse_within picked an existing execution."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobRecord:
        """Read back an entry of ``manifest.json`` (unknown keys ignored).

        Raises ValueError naming the field when a value has the wrong type: the record is
        the resume state, and a string where a count belongs would crash the run later.
        """
        if not isinstance(data, dict):
            raise ValueError("a job entry is not an object")
        values = {k: v for k, v in data.items() if k in _FIELD_TYPES}
        for key, value in values.items():
            kinds = _FIELD_TYPES[key]
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ValueError(f"job {data.get('name')!r}: {key}: unexpected {type(value).__name__}")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in values.get("invalid_line_numbers", [])):
            raise ValueError(f"job {data.get('name')!r}: invalid_line_numbers: not a list of numbers")
        if "name" not in values:
            raise ValueError("a job entry has no name")
        values["status"] = JobStatus(values.get("status", "PENDING"))
        return cls(**values)


_OPTIONAL_STR = (str, type(None))
_OPTIONAL_INT = (int, type(None))
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "export_id": _OPTIONAL_STR,
    "execution_id": _OPTIONAL_STR,
    "status": (str,),
    "attempts": (int,),
    "path": _OPTIONAL_STR,
    "bytes": _OPTIONAL_INT,
    "records": _OPTIONAL_INT,
    "invalid_lines": (int,),
    "invalid_line_numbers": (list,),
    "sha256": _OPTIONAL_STR,
    "erroneous_tasks": _OPTIONAL_INT,
    "num_tasks": _OPTIONAL_INT,
    "error": _OPTIONAL_STR,
    "error_file": _OPTIONAL_STR,
    "started_at": _OPTIONAL_STR,
    "finished_at": _OPTIONAL_STR,
    "query_id": _OPTIONAL_STR,
    "length_check": _OPTIONAL_STR,
    "creating_since": _OPTIONAL_INT,
    "etag": _OPTIONAL_STR,
    "object_size": _OPTIONAL_INT,
    "guard": (dict, type(None)),
    "previous_records": _OPTIONAL_INT,
    "note": _OPTIONAL_STR,
    "reused_from": (dict, type(None)),
}
"""What each field of a job entry may hold when read back (bool is refused apart)."""


@dataclass
class LiveFigures:
    """What the progress display shows of a job that the manifest does not keep."""

    completed_tasks: int | None = None
    downloaded: int = 0


@dataclass
class Manifest:
    """The whole manifest."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: str = field(default_factory=now_iso)
    finished_at: str | None = None
    status: RunStatus = RunStatus.RUNNING
    jobs: dict[str, JobRecord] = field(default_factory=dict)
    version: int = 1
    exit_code: int | None = None
    """The code the run exited with, written with its last word (null while it runs, or if it
    was killed before that): what ``mics-export status`` exits with."""
    live: dict[str, LiveFigures] = field(default_factory=dict, repr=False)
    """Display-only figures per job name; never written."""

    def live_of(self, name: str) -> LiveFigures:
        """The live figures of a job (created on first use)."""
        return self.live.setdefault(name, LiveFigures())

    def to_bytes(self) -> bytes:
        """The manifest as indented JSON."""
        doc = {
            "version": self.version,
            "run_id": self.run_id,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "status": self.status,
            "exit_code": self.exit_code,
            # orjson writes dataclasses and enums natively: 0.5 ms for 1,000 jobs, where
            # building dicts in Python took 7 ms — and the manifest is written often.
            "jobs": list(self.jobs.values()),
        }
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse ``manifest.json``; ValueError (saying what is wrong) if it is not a manifest."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        for key in ("run_id", "started_at", "status"):
            if not isinstance(doc.get(key), str):
                raise ValueError(f"{key}: missing or not a string")
        if not isinstance(doc.get("finished_at"), str | None):
            raise ValueError("finished_at: not a string")
        exit_code = doc.get("exit_code")
        if isinstance(exit_code, bool) or not isinstance(exit_code, int | None):
            raise ValueError("exit_code: not a number")
        entries = doc.get("jobs", [])
        if not isinstance(entries, list):
            raise ValueError("jobs: not a list")
        records = [JobRecord.from_json(j) for j in entries]
        return cls(
            run_id=doc["run_id"],
            started_at=doc["started_at"],
            finished_at=doc.get("finished_at"),
            status=RunStatus(doc["status"]),
            jobs={r.name: r for r in records},
            exit_code=exit_code,
        )

    @classmethod
    def load(cls, path: Path) -> Manifest | None:
        """The manifest at ``path``, or None if there is none or it is unreadable."""
        try:
            return cls.from_bytes(path.read_bytes())
        except (OSError, ValueError):
            return None


def load_previous(path: Path) -> Manifest | None:
    """The manifest an earlier run left at ``path`` (its resume state), or None if none.

    A corrupt one is not silently ignored: it is moved aside to
    ``manifest.json.corrupt-<UTC time>`` and a warning says so, because this run then
    starts every job afresh (its executions are not adopted). Something that is not a
    regular file (a folder, a symlink, a pipe) is left alone: ManifestReadError, exit 2.
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ManifestReadError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ManifestReadError(f"{path} is not a regular file: move it out of the way")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestReadError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return Manifest.from_bytes(data)
    except ValueError as exc:
        reason = str(exc)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists() or aside.is_symlink():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    try:
        os.rename(path, aside)
    except OSError as exc:
        raise ManifestReadError(f"{path} is corrupt ({reason}) and cannot be moved aside: {exc.strerror}") from None
    log.warning(
        "%s is not a valid manifest (%s): moved aside to %s; its jobs start afresh "
        "(executions it recorded are not adopted, complete files are downloaded again)",
        path,
        reason,
        aside.name,
        extra={"event": "manifest_corrupt", "moved_to": aside.name},
    )
    return None


def remove_stale_temp_files(folder: Path) -> list[str]:
    """Remove the temporary files of :func:`write_atomic` a killed run left in ``folder``.

    Only names of that exact pattern go, only non-folders, and unlink never follows a
    symlink (a planted link is removed, its target untouched). The caller holds the
    folder's lock, so no other run is writing them. Returns the names removed.
    """
    removed: list[str] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if not _STALE_TMP.fullmatch(entry.name) or entry.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync the folder.

    The temp file is opened without following symlinks and removed if anything fails,
    so a full disk leaves no half-written temp file behind.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
        await anyio.to_thread.run_sync(write_atomic, self.path, data)

    async def write_manifest_last(self, data: bytes) -> None:
        write_atomic(self.path, data)  # blocking on purpose: no await for a second signal to hit


class ManifestWriter:
    """Group commit: callers of :meth:`save` share writes; each returns once its change is on disk.

    Changes that need not be on disk before the next step (a status moving on, a
    failure's details) are only :meth:`mark`-ed: :meth:`run_flusher` writes them within
    ``flush_interval_s``, or an earlier :meth:`save` takes them along. A kill -9 can lose at
    most that much of them, and every one of them is redone or recovered by a rerun.

    A failed write raises :class:`ManifestWriteError` from :meth:`save` and
    :meth:`save_now` (the caller's step must not happen); the flusher's failures are
    remembered in :attr:`behind` until a later write succeeds, and
    :attr:`required_failures` counts the saves that raised.
    """

    def __init__(self, manifest: Manifest, path: Path | ManifestStore, flush_interval_s: float = 1.0) -> None:
        self.manifest = manifest
        self.store: ManifestStore = FileManifestStore(path) if isinstance(path, Path) else path
        self.path: Path | str = path if isinstance(path, Path) else path.label
        """Where the manifest is: a local path, or its bucket URL."""
        self.flush_interval_s = flush_interval_s
        self.writes = 0
        self.behind = False
        """A change is not on disk because a write failed (cleared by a later good write)."""
        self.required_failures = 0
        """Saves that raised: steps that did not happen because they could not be recorded."""
        self._lock = anyio.Lock()
        self._changes = 0
        self._written = 0
        self._reported: set[str] = set()

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

    async def run_flusher(self) -> None:
        """Write marked changes every ``flush_interval_s`` seconds, until cancelled.

        A failed write does not stop it (nor the run): :attr:`behind` stays set, and the
        next tick, a save, or the run's last write tries again.
        """
        while True:
            await anyio.sleep(self.flush_interval_s)
            if self._written < self._changes:
                with contextlib.suppress(ManifestWriteError):
                    await self._write(self._changes)

    async def _write(self, wanted: int) -> None:
        async with self._lock:
            if self._written >= wanted:
                return  # someone else's write already covered this change
            covered = self._changes
            data = self.manifest.to_bytes()
            try:
                await self.store.write_manifest(data)
            except (OSError, MicsExportError) as exc:  # MicsExportError: a bucket's StorageError
                raise self._failed(exc) from exc
            self._done(covered)

    def save_now(self) -> None:
        """Blocking write of a local manifest, for the last word after cancellation."""
        if not isinstance(self.store, FileManifestStore):
            raise TypeError("save_now is for a local manifest: use save_last")
        covered = self._changes
        try:
            write_atomic(self.store.path, self.manifest.to_bytes())
        except OSError as exc:
            raise self._failed(exc) from exc
        self._done(covered)

    async def save_last(self) -> None:
        """The run's last word (the caller shields it); ManifestWriteError if it fails."""
        covered = self._changes
        try:
            await self.store.write_manifest_last(self.manifest.to_bytes())
        except (OSError, MicsExportError) as exc:
            raise self._failed(exc) from exc
        self._done(covered)

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


def as_dict(manifest: Manifest) -> dict[str, Any]:
    """The manifest as plain JSON-ready data (what ``manifest.json`` holds)."""
    parsed: dict[str, Any] = orjson.loads(manifest.to_bytes())
    return parsed


__all__ = [
    "MANIFEST_NAME",
    "FileManifestStore",
    "JobRecord",
    "JobStatus",
    "LiveFigures",
    "Manifest",
    "ManifestReadError",
    "ManifestStore",
    "ManifestWriteError",
    "ManifestWriter",
    "RunStatus",
    "as_dict",
    "load_previous",
    "now_iso",
    "remove_stale_temp_files",
    "write_atomic",
]
