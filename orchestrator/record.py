"""The manifest as data: the run's and each job's record, their statuses, and how a job moves.

:class:`JobRecord` is one job's line of ``manifest.json``; its transitions (``created``,
``downloading``, ``succeeded``, ``failed`` ...) are the only way the scheduler changes it,
and each returns the :class:`Durability` the change needs: whether it must be on disk
before the step it enables (``NOW``: :meth:`~orchestrator.manifest.ManifestWriter.save`),
may wait for the next group commit (``SOON``: ``mark``), or rides along with the next write
(``WITH_NEXT``). The writer honours it (:meth:`~orchestrator.manifest.ManifestWriter.persist`),
so no caller chooses between a save and a mark.

How the manifest reaches disk is :mod:`orchestrator.manifest` (the group-commit writer) and
:mod:`orchestrator.journal` (the append-only journal and reading it back).

Past ~350 lines because it is the manifest's one schema: every field of a job's record, the
transitions that change them, and the checks that read them back from JSON must agree, and
are kept in one file so that a new field is added in one place. It imports nothing of the
package (a download result is a :class:`Received` protocol), so every layer may use it.
"""

from __future__ import annotations

import datetime as dt
import itertools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, ClassVar, Protocol

import orjson


class _LineCounts(Protocol):
    @property
    def invalid_lines(self) -> int: ...
    @property
    def invalid_line_numbers(self) -> Sequence[int]: ...


class Received(Protocol):
    """What :meth:`JobRecord.succeeded` records of a complete download (a
    :class:`~orchestrator.download.DownloadResult`): a protocol, so that the record — a model
    at the bottom of the import graph — does not depend on the download layer."""

    @property
    def bytes(self) -> int: ...
    @property
    def sha256(self) -> str: ...
    @property
    def records(self) -> int: ...
    @property
    def stats(self) -> _LineCounts: ...
    @property
    def length_check(self) -> str: ...


class Durability(IntEnum):
    """How soon a change of a job record must be on disk (ordered: ``max`` of several is the need)."""

    WITH_NEXT = 0
    """No write of its own: the next write, which the step that follows makes, carries it."""
    SOON = 1
    """The next group commit (within the writer's flush interval): a kill -9 before it loses
    the change, and a rerun redoes or recovers it (README: what a kill costs)."""
    NOW = 2
    """On disk (fsynced) before the step it enables: if the write fails, the step must not happen."""


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
_WATCHING: tuple[dict[int, JobRecord], ...] = ()
"""The change sets of the live manifest writers (:class:`~orchestrator.manifest.ManifestWriter`):
every assignment to a record puts it in each (by ``id``), so a writer's next write finds the
records that changed without looking at all of them (a scan cost ~1 ms per write at 10,000 jobs).
A tuple replaced whole, never changed in place: a writer's finaliser (run by the garbage
collector, at any allocation) cannot disturb an assignment's loop over it."""


def watch(changes: dict[int, JobRecord]) -> None:
    """From now on, every record assigned to is put in ``changes``."""
    global _WATCHING
    _WATCHING = (*_WATCHING, changes)


def unwatch(changes: dict[int, JobRecord]) -> None:
    """Stop filling ``changes`` (found by identity: two change sets may be equal)."""
    global _WATCHING
    _WATCHING = tuple(w for w in _WATCHING if w is not changes)


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
    file_validator: str | None = None
    """The result file's validator (a strong ETag, else Last-Modified) from its download's first
    answer: sent as ``If-Range`` when a killed run's part file is resumed, so that a file that
    changed in between is downloaded again, never continued (no validator: never resumed)."""
    file_size: int | None = None
    """The size that first answer stated: a resume's 416 or ``Content-Range`` must agree with it."""
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
        for changed in _WATCHING:
            changed[id(self)] = self

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

    # -- transitions: each change the scheduler makes, and how durable it must be ---------
    def begin(self) -> Durability:
        """This run takes the job up: started (once), not finished, no error yet."""
        self.started_at = self.started_at or now_iso()
        self.finished_at = None
        self.error = None
        return Durability.WITH_NEXT

    def points_at(self, export_id: str | None, query_id: str | None) -> Durability:
        """The export (and query) the job resolved to in this run."""
        self.export_id, self.query_id = export_id, query_id
        return Durability.WITH_NEXT

    def new_verdict(self) -> Durability:
        """This run's guard verdict and reuse replace an earlier run's."""
        self.guard = self.note = self.previous_records = self.reused_from = None
        return Durability.WITH_NEXT

    def creating(self) -> Durability:
        """About to ask for a new execution: the intent (epoch ms) is on disk before the POST,
        so that an answer lost on the way is looked up (``creating_since``), never made twice."""
        self.creating_since = int(time.time() * 1000)
        return Durability.NOW

    def created(self, execution_id: str) -> Durability:
        """Following ``execution_id`` (new, a lost create's, an earlier run's or reused): one
        more attempt. Marked only: the intent already on disk covers the window (README)."""
        self.execution_id = execution_id
        self.creating_since = None
        self.attempts += 1
        self.status = JobStatus.PENDING
        self.error = None  # error_file stays: the last failed attempt's file is still worth reading
        self.bytes = self.records = self.sha256 = self.path = self.file_validator = self.file_size = None
        self.invalid_lines, self.invalid_line_numbers = 0, []
        return Durability.SOON

    def reused(self, execution_id: str, created_at: str) -> Durability:
        """Following a recent SUCCEEDED execution (reuse_within): it counts as an attempt."""
        durability = self.created(execution_id)
        self.reused_from = {"execution_id": execution_id, "created_at": created_at}
        return durability

    def observed(self, status: JobStatus | None, num_tasks: int | None, erroneous_tasks: int | None) -> Durability:
        """A poll's answer; ``status`` (PENDING or RUNNING) is None once the execution is final.
        A status that moves is marked; the task counts ride along with the next write.
        Unchanged counts are not assigned: an assignment stamps the record as changed, and
        the next write would compare it field by field for nothing (most polls change nothing)."""
        if num_tasks != self.num_tasks:
            self.num_tasks = num_tasks
        if erroneous_tasks != self.erroneous_tasks:
            self.erroneous_tasks = erroneous_tasks
        if status is None or status is self.status:
            return Durability.WITH_NEXT
        self.status = status
        return Durability.SOON

    def downloading(self) -> Durability:
        """The download starts. Marked: what lets a rerun resume the part file is the file's
        validator and size (:meth:`validated`, marked too); a kill before the next write costs
        that rerun a download from byte 0, never a wrong file (the part file is not resumed)."""
        self.status = JobStatus.DOWNLOADING
        return Durability.SOON

    def validated(self, validator: str, size: int) -> Durability:
        """The download's first answer named the file's validator and size. Marked: a kill before
        the next write leaves a part file without them, which the rerun downloads again."""
        self.file_validator, self.file_size = validator, size
        return Durability.SOON

    def rewriting(self) -> Durability:
        """The part file is written from byte 0 again: what was recorded of the bytes it held is
        forgotten on disk first, so that a kill never leaves a validator for other bytes."""
        self.file_validator = self.file_size = None
        return Durability.NOW

    def succeeded(self, path: str, result: Received) -> Durability:
        """The complete file, recorded before it is committed: on disk first, so that a kill
        between the two leaves a complete part file that the rerun finishes at once (416 at
        its end), never a second download; and a failed write means no commit."""
        self.status = JobStatus.SUCCEEDED
        self.path = path
        self.bytes, self.records, self.sha256 = result.bytes, result.records, result.sha256
        self.invalid_lines = result.stats.invalid_lines
        self.invalid_line_numbers = list(result.stats.invalid_line_numbers)
        self.length_check = result.length_check
        self.etag = self.object_size = None  # known once the upload completes (stored())
        return Durability.NOW

    def judged(self, note: str | None, previous_records: int | None) -> Durability:
        """What the guards noted of the complete file (saved with :meth:`succeeded`)."""
        self.note, self.previous_records = note, previous_records
        return Durability.NOW

    def rejected(self, guard: dict[str, Any], error: str | None, path: str) -> Durability:
        """A guard failed the complete file, committed as ``path`` (saved before that commit)."""
        self.status = JobStatus.FAILED
        self.guard, self.error, self.path = guard, error, path
        return Durability.NOW

    def not_reused(self) -> Durability:
        """The reused execution's file could not be had whole: the next execution is new."""
        self.reused_from = None
        return Durability.WITH_NEXT

    def stored(self, etag: str, object_size: int | None) -> Durability:
        """A bucket object's ETag and size once its upload completed: what a rerun compares
        with a HEAD. Marked: a kill before the next write only costs that rerun a download."""
        self.etag, self.object_size = etag, object_size
        return Durability.SOON

    def execution_failed(self, error: str, error_file: str | None) -> Durability:
        """The execution ended without a result: the platform's error, its error file if kept."""
        if error_file is not None:
            self.error_file = error_file
        self.error = error
        return Durability.SOON

    def cancelled(self, error: str) -> Durability:
        """The platform cancelled the execution (not retried)."""
        self.status, self.error = JobStatus.CANCELLED, error
        return Durability.SOON

    def failed(self, status: JobStatus, error: str) -> Durability:
        """FAILED or TIMED_OUT. A failed job vouches for no file: the result is noted before
        its commit, so a commit or a manifest write that then failed would leave the sha256
        and path of a file that is not (or not from this attempt) at that name."""
        self.status, self.error = status, error
        self.path = self.sha256 = None
        self.bytes = self.records = None
        return Durability.SOON

    def not_run(self, error: str) -> Durability:
        """The run stopped before the job could finish (a refused token): said on disk at once."""
        self.status, self.error = JobStatus.FAILED, error
        return Durability.NOW

    def finished(self) -> Durability:
        """The job will not change in this run."""
        self.finished_at = now_iso()
        return Durability.SOON


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
    "file_validator": _OPTIONAL_STR,
    "file_size": _OPTIONAL_INT,
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
        """The live figures of a job (created on first use: not built at every poll to be dropped)."""
        figures = self.live.get(name)
        if figures is None:
            figures = self.live[name] = LiveFigures()
        return figures

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


def as_dict(manifest: Manifest) -> dict[str, Any]:
    """The manifest as plain JSON-ready data (what ``manifest.json`` holds)."""
    parsed: dict[str, Any] = orjson.loads(manifest.to_bytes())
    return parsed


__all__ = [
    "Durability",
    "JobRecord",
    "JobStatus",
    "LiveFigures",
    "Manifest",
    "Received",
    "RunStatus",
    "as_dict",
    "now_iso",
    "parse_iso",
    "unwatch",
    "watch",
]
