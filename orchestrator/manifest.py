"""The run manifest (``manifest.json``): what happened, and what a rerun needs to resume.

The manifest is both the report (SPEC.md fixes its fields) and the resume state: the
execution ids it records are what a rerun adopts. So it is written *before* the moment
that state would be lost: the intent to create an execution (``creating_since``) before
the POST, the id as soon as the response arrives.

Writes are grouped: many jobs changing state at once share one write
(:class:`ManifestWriter`). In a local folder a write appends the changed fields of the
changed jobs to a journal beside the manifest (``.manifest.journal``, one JSON line per job,
fsynced), and ``manifest.json`` is rewritten whole (atomically: temp file, fsync, rename,
fsync the folder) only now and then — "compacted" — and at the end of the run. So the
bytes written grow with the number of changes, not with the square of the jobs. A reader
of the resume state (:func:`load_previous`, :func:`read_manifest_with_journal`) reads
``manifest.json`` then replays the journal on top (see :func:`replay_journal`).

A write that fails (disk full, a folder in the way) is a failure, never a log line only:
:meth:`ManifestWriter.save` raises :class:`ManifestWriteError`, so the step it was to
record does not happen, and the writer remembers that the file on disk is behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import logging
import os
import re
import stat
import time
import uuid
from dataclasses import dataclass, field, fields
from enum import StrEnum
from operator import attrgetter
from pathlib import Path
from typing import Any, ClassVar, Protocol

import anyio
import orjson

from orchestrator.download import fsync_dir
from orchestrator.errors import MicsExportError, UsageError

MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = ".manifest.journal"
"""The journal beside ``manifest.json`` (see :func:`replay_journal`): never a temp file."""
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


_CLOCK = itertools.count(1)
"""Ticks on every change of a job record (:meth:`JobRecord.__setattr__`)."""


ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
"""How the manifest writes times: UTC, to the second."""


def now_iso() -> str:
    """The current UTC time as ``2026-11-28T02:00:00Z``."""
    return dt.datetime.now(dt.UTC).strftime(ISO_FORMAT)


def parse_iso(text: str | None) -> dt.datetime | None:
    """A time the manifest wrote (:func:`now_iso`), or None for none or anything else."""
    if not text:
        return None
    try:
        return dt.datetime.strptime(text, ISO_FORMAT).replace(tzinfo=dt.UTC)
    except ValueError:
        return None


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

    _v: ClassVar[int] = 0
    """When the record last changed (a tick of :data:`_CLOCK`; set per instance on assignment)."""

    def __setattr__(self, name: str, value: Any) -> None:
        # Every assignment stamps the record, so the writer finds the jobs that changed
        # without comparing all of them at every write. Fields are assigned, never mutated
        # in place (a list's append would reach disk only with the next compaction).
        object.__setattr__(self, name, value)
        object.__setattr__(self, "_v", next(_CLOCK))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobRecord:
        """Read back an entry of ``manifest.json`` (unknown keys ignored).

        Raises ValueError naming the field when a value has the wrong type: the record is
        the resume state, and a string where a count belongs would crash the run later.
        """
        if not isinstance(data, dict):
            raise ValueError("a job entry is not an object")
        values = _checked_fields(data, data.get("name"))
        if "name" not in values:
            raise ValueError("a job entry has no name")
        values.setdefault("status", JobStatus.PENDING)
        return cls(**values)


def _checked_fields(data: dict[str, Any], name: object) -> dict[str, Any]:
    """The known fields of ``data``, type-checked (ValueError naming the field); status as JobStatus."""
    values = {k: v for k, v in data.items() if k in _FIELD_TYPES}
    for key, value in values.items():
        kinds = _FIELD_TYPES[key]
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"job {name!r}: {key}: unexpected {type(value).__name__}")
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in values.get("invalid_line_numbers", [])):
        raise ValueError(f"job {name!r}: invalid_line_numbers: not a list of numbers")
    if "status" in values:
        values["status"] = JobStatus(values["status"])
    return values


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
    journal_id: str | None = None
    """Which journal continues this manifest.json: the id in the journal's first line
    (:func:`replay_journal`). Set by each compaction; null when there is no journal (a bucket)."""
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
            "journal_id": self.journal_id,
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
        journal_id = doc.get("journal_id")
        if not isinstance(journal_id, str | None):
            raise ValueError("journal_id: not a string")
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
            journal_id=journal_id,
        )

    @classmethod
    def load(cls, path: Path) -> Manifest | None:
        """The manifest at ``path`` with its journal replayed, or None if none or unreadable."""
        try:
            return read_manifest_with_journal(path)
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
        previous = Manifest.from_bytes(data)
    except ValueError as exc:
        reason = str(exc)
    else:
        replay = replay_journal(previous, read_journal(path.with_name(JOURNAL_NAME)))
        if replay.damaged_at is not None:
            # Kept for whoever wants to look: this run starts a new journal over it.
            aside = _move_aside(path.with_name(JOURNAL_NAME))
            log.warning(
                "%s is damaged at line %d (not a torn end: valid lines follow): its changes up to there "
                "are used, the rest is not (moved aside to %s); jobs whose later state is lost are "
                "recovered as after a kill -9",
                path.with_name(JOURNAL_NAME),
                replay.damaged_at,
                aside,
                extra={"event": "journal_damaged", "line": replay.damaged_at, "moved_to": aside},
            )
        return previous
    aside = _move_aside(path, reason)
    log.warning(
        "%s is not a valid manifest (%s): moved aside to %s; its jobs start afresh "
        "(executions it recorded are not adopted, complete files are downloaded again)",
        path,
        reason,
        aside,
        extra={"event": "manifest_corrupt", "moved_to": aside},
    )
    return None


def _move_aside(path: Path, reason: str | None = None) -> str:
    """Rename ``path`` to ``NAME.corrupt-<UTC time>[-n]``; returns the new name."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists() or aside.is_symlink():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    try:
        os.rename(path, aside)
    except OSError as exc:
        why = f" ({reason})" if reason else ""
        raise ManifestReadError(f"{path} is corrupt{why} and cannot be moved aside: {exc.strerror}") from None
    return aside.name


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


# -- the journal ----------------------------------------------------------------------------
#
# ``.manifest.journal`` continues one particular ``manifest.json``: its first line names it
# (``{"journal": 1, "base": ID}``, where ID is that manifest's ``journal_id``, new at each
# compaction). Each further line is one change of one job — the fields that changed,
# ``{"job": NAME, "set": {FIELD: VALUE, ...}}`` — or of the run (``{"run": {...}}``), in the
# order they happened. Reading = manifest.json, then the lines of a journal whose base is
# its journal_id, in order. So:
# - a kill between a compaction and the journal's restart leaves a journal naming the
#   previous manifest: it is ignored whole (the new manifest.json already holds all of it),
#   never replayed over newer state;
# - a kill during an append leaves a torn last line: ignored (its write was never
#   acknowledged, so the step it was recording did not happen);
# - a bad line with valid lines after it cannot come from a kill (appends are sequential
#   and fsynced): damage. Replay stops there, loudly: a line only says what changed, so
#   applying later lines without it could combine states that never existed together.

JOURNAL_FORMAT = 1
COMPACT_RATIO = 1.0
"""A compaction waits until the journal has grown by this many times the manifest's size
since the last one: compactions then write at most as many bytes as the journal did."""
COMPACT_RATE = 32 << 10
"""... and until ``manifest size / COMPACT_RATE`` seconds have passed since the last one (a
6 MB manifest: 3 minutes), so that a long run's manifest.json costs little bandwidth too."""
FRESH_BYTES = 64 << 10
"""A manifest up to this size (about 100 jobs) is written whole at every write, as it was
before the journal: cheap at that size, and manifest.json is current to the last write."""

_JOB_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(JobRecord))
_job_values = attrgetter(*_JOB_FIELDS)
_RUN_FIELDS = ("run_id", "started_at", "finished_at", "status", "exit_code")
_run_values = attrgetter(*_RUN_FIELDS)
_DEFAULTS: tuple[Any, ...] = _job_values(JobRecord(name=""))


@dataclass
class Replay:
    """What :func:`replay_journal` did."""

    applied: int = 0
    """Lines applied."""
    ignored: str | None = None
    """Why the whole journal was not used (none, empty, continues another manifest.json)."""
    damaged_at: int | None = None
    """The line number of a bad line that valid lines follow (replay stopped there)."""
    torn: bool = False
    """The journal ended in an incomplete or unreadable line (a kill mid-append): ignored."""


def replay_journal(manifest: Manifest, data: bytes) -> Replay:
    """Apply to ``manifest`` (as read from manifest.json) the journal ``data`` that continues it.

    A journal whose first line does not name ``manifest.journal_id`` is ignored whole; a
    torn or unreadable end is ignored; a bad line followed by valid ones stops the replay
    (``damaged_at``). Each line is checked whole before any of it is applied.
    """
    lines = data.split(b"\n")
    complete, torn = lines[:-1], bool(lines[-1])
    if not complete:
        return Replay(ignored="no journal" if not data else "no complete first line", torn=torn)
    header = _loads(complete[0])
    if not isinstance(header, dict) or header.get("journal") != JOURNAL_FORMAT:
        return Replay(ignored="its first line is not a journal header")
    if manifest.journal_id is None or header.get("base") != manifest.journal_id:
        return Replay(ignored="it continues another manifest.json (a compaction came after it)")
    replay = Replay(torn=torn)
    for number, raw in enumerate(complete[1:], start=2):
        try:
            _apply(manifest, raw)
        except ValueError:
            if any(_loads(rest) is not None for rest in complete[number:]):
                replay.damaged_at = number
            else:
                replay.torn = True  # garbage to the end only: the tail of an interrupted append
            return replay
        replay.applied += 1
    return replay


def _loads(raw: bytes) -> Any:
    """A JSON value, or None when ``raw`` is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _apply(manifest: Manifest, raw: bytes) -> None:
    """Apply one journal line (ValueError, nothing applied, if it is not a valid one)."""
    line = _loads(raw)
    if not isinstance(line, dict):
        raise ValueError("not a JSON object")
    if isinstance(line.get("job"), str) and isinstance(line.get("set"), dict):
        name: str = line["job"]
        values = _checked_fields(line["set"], name)
        values.pop("name", None)
        rec = manifest.jobs.get(name)
        if rec is None:
            rec = manifest.jobs[name] = JobRecord(name=name)
        for key, value in values.items():
            setattr(rec, key, value)
    elif isinstance(line.get("run"), dict):
        run: dict[str, Any] = line["run"]
        if not all(isinstance(run.get(k), str) for k in ("run_id", "started_at", "status")):
            raise ValueError("run: a field is missing")
        code = run.get("exit_code")
        if (
            not isinstance(run.get("finished_at"), str | None)
            or isinstance(code, bool)
            or not isinstance(code, int | None)
        ):
            raise ValueError("run: a field has the wrong type")
        status = RunStatus(run["status"])
        manifest.run_id, manifest.started_at, manifest.status = run["run_id"], run["started_at"], status
        manifest.finished_at, manifest.exit_code = run.get("finished_at"), code
    else:
        raise ValueError("neither a job's nor the run's change")


def read_journal(path: Path) -> bytes:
    """The journal's bytes (empty when there is none, or it is not a regular file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return b""
        return f.read()


def read_manifest_with_journal(path: Path) -> Manifest:
    """The state of the run whose ``manifest.json`` is at ``path``: the file, then its journal.

    What ``mics-export status`` wants of a running run: manifest.json alone may lag (it is
    compacted now and then), its journal is current to the last write. Raises OSError when
    the file cannot be read, ValueError when it is not a manifest; a torn or damaged
    journal is used up to its last good line (read-only: nothing is moved).
    """
    manifest = Manifest.from_bytes(path.read_bytes())
    replay_journal(manifest, read_journal(path.with_name(JOURNAL_NAME)))
    return manifest


class Journal:
    """The append-only ``.manifest.journal`` of a folder (blocking I/O: call it in a thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self._size = 0

    def append(self, data: bytes, restart_for: str | None = None) -> int:
        """Append ``data`` (whole lines) and fsync; returns the bytes written.

        With ``restart_for``: first empty the journal and write the header naming that
        manifest.json (the one just compacted: what the journal held is in it).
        """
        if self._fd < 0:
            # O_NOFOLLOW: a planted symlink is refused, not written through.
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, 0o644)
            self._size = os.fstat(self._fd).st_size
            fsync_dir(self.path.parent)  # the file's name is durable before anything relies on it
        start = self._size
        if restart_for is not None:
            start = 0
            data = orjson.dumps({"journal": JOURNAL_FORMAT, "base": restart_for}) + b"\n" + data
        try:
            if restart_for is not None:
                os.ftruncate(self._fd, 0)
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except BaseException:
            # A half-written append (disk full) must not stay: the next good one would follow
            # it, and a bad line followed by good ones reads as damage (the replay stops there).
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            raise
        self._size = start + len(data)
        return len(data)

    def remove(self) -> None:
        """Close and delete the journal (after the last compaction: the manifest holds it all)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


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
        self._seen = 0  # the _CLOCK tick up to which every record change is on disk
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
                        await anyio.to_thread.run_sync(self.journal.append, pending.data, restart)
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
        jobs = {name: _job_values(rec) for name, rec in self.manifest.jobs.items()} if self.journal else {}
        return _Pending(clock, data, jobs, _run_values(self.manifest), new)

    def _compacted(self, pending: _Pending, *, last: bool = False) -> None:
        self.compactions += 1
        self.bytes_written += len(pending.data)
        if self.journal is None:
            return
        self.manifest.journal_id = pending.journal_id
        self._seen, self._disk_jobs, self._disk_run = pending.clock, pending.jobs, pending.run
        self._base, self._restart = pending.journal_id, True
        self._base_size, self._base_at, self._journal_since = len(pending.data), time.monotonic(), 0
        if last:
            # All of it is in manifest.json: the folder keeps that one file. (Not durable
            # before a crash? Then the journal names an older manifest: ignored.)
            with contextlib.suppress(OSError):
                self.journal.remove()

    def _changed(self) -> _Pending:
        """The journal lines of what changed since the last write (on the loop: a consistent view)."""
        clock = next(_CLOCK)
        lines: list[bytes] = []
        jobs: dict[str, tuple[Any, ...]] = {}
        seen, disk = self._seen, self._disk_jobs
        for name, rec in self.manifest.jobs.items():
            if rec._v <= seen and name in disk:
                continue
            now = _job_values(rec)
            before = disk.get(name, _DEFAULTS)
            diff = {k: v for k, v, b in zip(_JOB_FIELDS, now, before, strict=True) if v != b or k == "name"}
            if len(diff) > 1 or name not in disk:
                del diff["name"]
                lines.append(orjson.dumps({"job": name, "set": diff}))
                jobs[name] = now
        run = _run_values(self.manifest)
        if run != self._disk_run:
            lines.append(orjson.dumps({"run": dict(zip(_RUN_FIELDS, run, strict=True))}))
        data = b"\n".join(lines) + b"\n" if lines else b""
        return _Pending(clock, data, jobs, run)

    def _appended(self, pending: _Pending, restart: str | None) -> None:
        self._seen = pending.clock
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


def as_dict(manifest: Manifest) -> dict[str, Any]:
    """The manifest as plain JSON-ready data (what ``manifest.json`` holds)."""
    parsed: dict[str, Any] = orjson.loads(manifest.to_bytes())
    return parsed


__all__ = [
    "JOURNAL_NAME",
    "MANIFEST_NAME",
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
    "load_previous",
    "now_iso",
    "read_manifest_with_journal",
    "remove_stale_temp_files",
    "replay_journal",
    "write_atomic",
]
