"""The journal beside ``manifest.json``, and reading a run's state back (manifest + journal).

In a local folder :class:`~orchestrator.manifest.ManifestWriter` appends the changed fields
of the changed jobs to ``.manifest.journal`` (:class:`Journal`, fsynced) and rewrites
``manifest.json`` whole only now and then. A reader of the resume state
(:func:`load_previous`, :func:`read_manifest_with_journal`) reads ``manifest.json`` then
replays the journal on top (:func:`replay_journal`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import stat
from dataclasses import dataclass, fields
from operator import attrgetter
from pathlib import Path
from typing import Any

import orjson

from orchestrator.errors import UsageError
from orchestrator.part_file import fsync_dir
from orchestrator.record import JobRecord, Manifest, RunStatus, _checked_fields

MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = ".manifest.journal"
"""The journal beside ``manifest.json`` (see :func:`replay_journal`): never a temp file."""
# The manifest's logger, as before the journal had a module of its own: its events
# (manifest_corrupt, journal_damaged) are what operators and tests filter on.
log = logging.getLogger("orchestrator.manifest")


MAX_MANIFEST_BYTES = 256 << 20
"""A manifest larger than this is not read: a planted or runaway file, not a run's (10,000 jobs
make ~8 MB)."""


class ManifestReadError(UsageError):
    """The manifest of an earlier run is there but cannot be read (not a regular file...)."""


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
    if info.st_size > MAX_MANIFEST_BYTES:
        # Read whole, it would cost its size in memory: no run writes one this large.
        raise ManifestReadError(
            f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a run's manifest: move it out of the way"
        )
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

# What one job's and the run's journal lines hold (the writer diffs these tuples).
JOB_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(JobRecord))
job_values = attrgetter(*JOB_FIELDS)
RUN_FIELDS = ("run_id", "started_at", "finished_at", "status", "exit_code")
run_values = attrgetter(*RUN_FIELDS)
JOB_DEFAULTS: tuple[Any, ...] = job_values(JobRecord(name=""))


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
    """The journal's bytes (empty when there is none, or it is not a regular file).

    Raises ManifestReadError for one over :data:`MAX_MANIFEST_BYTES` (read whole, it would cost
    its size in memory; compaction keeps a run's well under it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            return b""
        if info.st_size > MAX_MANIFEST_BYTES:
            raise ManifestReadError(
                f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a run's journal: move it out of the way"
            )
        return f.read(MAX_MANIFEST_BYTES)


def read_manifest_with_journal(path: Path) -> Manifest:
    """The state of the run whose ``manifest.json`` is at ``path``: the file, then its journal.

    What ``mics-export status`` wants of a running run: manifest.json alone may lag (it is
    compacted now and then), its journal is current to the last write. Raises OSError when
    the file cannot be read, ValueError when it is not a manifest; a torn or damaged
    journal is used up to its last good line (read-only: nothing is moved).
    """
    manifest = Manifest.from_bytes(read_regular(path, MAX_MANIFEST_BYTES))
    replay_journal(manifest, read_journal(path.with_name(JOURNAL_NAME)))
    return manifest


class NotAFileError(ValueError):
    """What :func:`read_regular` refuses to read: no regular file, or one over its limit."""

    def __init__(self, reason: str, *, too_large: bool = False) -> None:
        super().__init__(reason)
        self.too_large = too_large


def read_regular(path: Path, limit: int) -> bytes:
    """A regular file's bytes, at most ``limit`` of them. Opened without blocking and checked on
    the open descriptor: a FIFO, a device (a symlink to /dev/zero) or a file too large is
    refused (NotAFileError, whose text is the reason), never read (a FIFO would block for
    ever). OSError when it cannot be opened or read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotAFileError("not a regular file")
        # Its size as stated, then as read (a file that grows while it is read).
        data = f.read(limit + 1) if info.st_size <= limit else None
    if data is None or len(data) > limit:
        raise NotAFileError(f"larger than {limit >> 20} MiB", too_large=True)
    return data


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


def load_manifest(path: Path) -> Manifest | None:
    """The manifest at ``path`` with its journal replayed, or None if none or unreadable."""
    try:
        return read_manifest_with_journal(path)
    except (OSError, ValueError, ManifestReadError):
        return None


__all__ = [
    "JOURNAL_NAME",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "Journal",
    "ManifestReadError",
    "NotAFileError",
    "Replay",
    "load_manifest",
    "load_previous",
    "read_journal",
    "read_manifest_with_journal",
    "read_regular",
    "replay_journal",
]
