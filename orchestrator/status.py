"""``mics-export status [DIR]``: a run's summary from its manifest, and the code it exits with.

The code is the one the run had (``exit_code`` in the manifest, written with the run's last
word) or would have:

====  =========================================================================================
0     the run SUCCEEDED
1     the run FAILED (a job did not succeed, or an error stopped it)
2     no readable manifest there (or the bucket cannot be read), or a bad argument
130   the run was interrupted by SIGINT; 143 by SIGTERM (any code the run recorded is used as is)
4     the run is still going: its manifest says RUNNING and a process holds the folder's lock
5     the run stopped without recording how: RUNNING but no process holds the lock (killed,
      OOM, power loss), or INTERRUPTED in a manifest written before ``exit_code`` existed
====  =========================================================================================

Whether a run is alive is read from its lock (``.lock``, flock): the kernel releases it when
the process dies, however it dies. For a bucket prefix (``s3://...``), from its lock object:
present and within its lease means alive (a run renews it every third of the lease).
Looking at a local lock takes it shared for an instant; a run that
starts at that instant waits for it (the run's claim retries for half a second).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import EXIT_FAILED, EXIT_OK, UsageError
from orchestrator.journal import MAX_MANIFEST_BYTES, NotAFileError, read_regular
from orchestrator.manifest import (
    JOURNAL_NAME,
    MANIFEST_NAME,
    Manifest,
    RunStatus,
    as_dict,
    read_journal,
    replay_journal,
)

EXIT_RUNNING = 4
"""``status``: the run is still going."""
EXIT_STOPPED_UNRECORDED = 5
"""``status``: the run stopped without recording its exit code (killed, or an old manifest)."""

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class RunReport:
    """What ``status`` knows about one run."""

    manifest_path: Path | str
    """The manifest's path, or its URL in a bucket."""
    manifest: Manifest
    alive: bool | None
    """For a RUNNING manifest: a process holds the lock (True), none does (False), no lock file (None)."""
    exit_code: int
    explanation: str
    """One line: why ``exit_code``."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the manifest, plus what status concluded."""
        from orchestrator.progress import run_totals

        return {
            "manifest": str(self.manifest_path),
            "exit_code": self.exit_code,
            "explanation": self.explanation,
            "running": self.alive if self.manifest.status is RunStatus.RUNNING else False,
            "totals": run_totals(self.manifest).as_dict(),
            **as_dict(self.manifest),
            "recorded_exit_code": self.manifest.exit_code,
        }


def manifest_path(target: str) -> Path:
    """The manifest a ``status`` argument names: ``DIR/manifest.json``, or the file itself.

    A folder without a manifest is a UsageError that points at shard folders when there
    are some. (A bucket URL is read by :func:`read_report`.)
    """
    folder = Path(target)
    if folder.is_file():
        return folder  # the manifest itself (a copy, or a renamed one)
    if not folder.is_dir():
        if folder.exists():
            raise UsageError(f"{target}: neither a folder nor a manifest file")
        raise UsageError(f"{target}: no such folder")
    path = folder / MANIFEST_NAME
    if path.is_file():
        return path
    shards = sorted(p.parent.name for p in folder.glob(f"shard-*/{MANIFEST_NAME}"))
    hint = f" (shard folders here: {', '.join(shards)}: give one of them)" if shards else ""
    raise UsageError(f"no {MANIFEST_NAME} in {folder}: not a run's output folder, or no run has started there{hint}")


def lock_held(folder: Path) -> bool | None:
    """Does a process hold ``folder/.lock`` (a run going on)? None when there is no lock file."""
    try:
        fd = os.open(folder / ".lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        return None
    finally:
        os.close(fd)  # closing releases the shared lock at once
    return False


def _read_bucket(url: str) -> tuple[str, bytes, bool | None]:
    """(manifest URL, its bytes, whether a live lock holds the prefix) from a bucket prefix."""
    import anyio

    try:
        from orchestrator import objstore
    except ImportError:
        raise UsageError(f"{url}: reading a bucket needs the cloud extra: pip install 'mics-export[cloud]'") from None
    location = objstore.parse_location(url)
    if location.prefix.endswith(MANIFEST_NAME):
        location = objstore.Location(
            location.scheme, location.bucket, location.prefix[: -len(MANIFEST_NAME)].rstrip("/"), location.account
        )
    key = location.key(MANIFEST_NAME)

    async def read() -> tuple[bytes | None, bool | None]:
        store = objstore.open_store(location)
        data = await objstore.get_bytes(store, key, MAX_MANIFEST_BYTES)
        return data, await objstore.lock_alive(store, location.prefix) if data is not None else None

    try:
        data, alive = anyio.run(read)
    except objstore.StorageError as exc:  # a store error is this command's usage problem: exit 2
        raise UsageError(str(exc)) from None
    if data is None:
        raise UsageError(f"no {MANIFEST_NAME} at {location.url(key)}: no run has written this prefix")
    return location.url(key), data, alive


def _read_local(path: Path) -> bytes:
    """The manifest's bytes: a regular file (never a pipe that blocks), at most MAX_MANIFEST_BYTES."""
    try:
        return read_regular(path, MAX_MANIFEST_BYTES)
    except NotAFileError as exc:
        if exc.too_large:
            raise UsageError(f"{path} is not a valid manifest: {exc}") from None
        raise UsageError(f"cannot read {path}: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _recorded_code(manifest: Manifest) -> int | None:
    """The exit code the manifest records, if it is one a run could have exited with.

    A code outside 0-255 cannot be an exit status (256 would reach the shell as 0), and a
    0 beside a status other than SUCCEEDED contradicts itself: neither is trusted, and the
    code is derived from the status instead, so a damaged manifest never reads as success.
    """
    code = manifest.exit_code
    if code is None or not 0 <= code <= 255:
        return None
    if code == EXIT_OK and manifest.status is not RunStatus.SUCCEEDED:
        return None
    return code


def read_report(target: str) -> RunReport:
    """Read the run at ``target`` (a folder, its manifest, or a bucket prefix); UsageError if there is none."""
    path: Path | str
    bucket_alive: bool | None = None
    if _URL.match(target):
        path, data, bucket_alive = _read_bucket(target)
    else:
        path = manifest_path(target)
        data = _read_local(path)
    try:
        manifest = Manifest.from_bytes(data)
    except ValueError as exc:
        raise UsageError(f"{path} is not a valid manifest: {exc}") from None
    if isinstance(path, Path):
        # A large run compacts manifest.json only now and then: its journal holds the
        # changes since (read-only here; a damaged tail is used up to its last good line).
        replay_journal(manifest, read_journal(path.with_name(JOURNAL_NAME)))
    alive = None
    status = manifest.status
    if status is RunStatus.RUNNING:
        alive = lock_held(path.parent) if isinstance(path, Path) else bucket_alive
        if alive is False:
            return RunReport(
                path,
                manifest,
                alive,
                EXIT_STOPPED_UNRECORDED,
                "the manifest says RUNNING but no process holds the folder's lock: the run was killed "
                "before its last word (a rerun into this folder resumes it)",
            )
        if alive:
            why = "the run is still going (a process holds the folder's lock)"
        else:
            why = "the manifest says RUNNING (no lock file here: cannot tell whether it is still going)"
        return RunReport(path, manifest, alive, EXIT_RUNNING, why)
    recorded = _recorded_code(manifest)
    if recorded is not None:
        return RunReport(path, manifest, alive, recorded, f"the run {status.value} and exited with this code")
    if status is RunStatus.SUCCEEDED:
        return RunReport(path, manifest, alive, EXIT_OK, "the run SUCCEEDED")
    if status is RunStatus.FAILED:
        return RunReport(path, manifest, alive, EXIT_FAILED, "the run FAILED")
    return RunReport(
        path,
        manifest,
        alive,
        EXIT_STOPPED_UNRECORDED,
        "the run was INTERRUPTED (its manifest does not say by which signal)",
    )


__all__ = ["EXIT_RUNNING", "EXIT_STOPPED_UNRECORDED", "RunReport", "lock_held", "manifest_path", "read_report"]
