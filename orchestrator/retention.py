"""Retention: ``run.keep_days: N`` deletes old run folders after a run that SUCCEEDED.

Only folders the output template itself makes are candidates. The template's first path
component holding ``{date}`` (``/data/{date}/shard-1``: ``{date}``; ``./exports/run-{date}``:
``run-{date}``) names the folders; its parent (``/data``, ``./exports``) is the *output root*
that is scanned, one level deep. A folder is deleted when all of these hold:

- its name is that component with a real date (``YYYY-MM-DD``) in place of ``{date}``;
- that date is more than N days before the run's date (N = 7 on 2026-11-28 keeps
  2026-11-21 to 2026-11-28 and deletes 2026-11-20 and older);
- it is a folder, not a symlink (a link, and whatever it points to, is left alone; nothing
  inside a deleted folder is followed either);
- it is not, and does not hold, the current run's folder;
- no other run holds a ``.lock`` inside it (a rerun of an old night going right now).

Without ``{date}`` in the template nothing is deleted (a warning says why). Each deletion is
logged (event ``run_folder_deleted``); a folder that cannot be deleted is a warning, never a
failed run: the exports themselves are done.

In a bucket (:func:`prune_bucket`) the same rules hold for the prefixes the template makes
(``s3://b/exports/{date}``: ``exports/2026-11-20/`` and older), a live lock object (another
run's lease) keeps a prefix, and every object under an old prefix is deleted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from obstore.store import ObjectStore

log = logging.getLogger("orchestrator.retention")

DATE_FIELD = "{date}"
_DATE = r"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})"


@dataclass(frozen=True)
class DatedFolders:
    """Where a template's dated run folders live, and what their names look like."""

    root: Path
    name: re.Pattern[str]
    """Matches a whole folder name; group ``date`` is its date."""


def dated_folders(template: str) -> DatedFolders | None:
    """The output root and folder-name pattern of ``template``; None without ``{date}``."""
    parts = PurePath(template).parts
    for index, part in enumerate(parts):
        if DATE_FIELD in part:
            pieces = [re.escape(piece) for piece in part.split(DATE_FIELD)]
            # {date} twice in one name ("{date}-{date}") must be the same date twice.
            regex = pieces[0] + _DATE + pieces[1] + "".join("(?P=date)" + piece for piece in pieces[2:])
            root = Path(*parts[:index]) if index else Path(".")
            return DatedFolders(root, re.compile(regex))
    return None


def prune(template: str, keep_days: int, today: dt.date, current: Path) -> list[Path]:
    """Delete the run folders of ``template`` older than ``keep_days`` before ``today``.

    ``current`` is this run's output folder (never deleted). Returns the folders deleted.
    """
    found = dated_folders(template)
    if found is None:
        log.warning(
            "run.keep_days is set but the output folder %s has no {date}: no old run folder to delete",
            template,
            extra={"event": "retention_skipped"},
        )
        return []
    cutoff = today - dt.timedelta(days=keep_days)
    here = current.resolve()
    deleted: list[Path] = []
    try:
        entries = sorted(os.scandir(found.root), key=lambda e: e.name)
    except OSError as exc:
        log.warning(
            "cannot list %s to delete old run folders: %s",
            found.root,
            exc.strerror or exc,
            extra={"event": "retention_failed"},
        )
        return []
    for entry in entries:
        match = found.name.fullmatch(entry.name)
        if match is None:
            continue
        try:
            date = dt.date.fromisoformat(match["date"])
        except ValueError:  # 2026-13-45: not a date this tool wrote
            continue
        if date >= cutoff or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        if here.is_relative_to(path.resolve()):
            continue
        if _delete(path, date, keep_days):
            deleted.append(path)
    return deleted


def _delete(path: Path, date: dt.date, keep_days: int) -> bool:
    """Remove ``path`` (a real folder) unless a run holds a lock in it; log either way."""
    with _locks_of(path) as free:
        if not free:
            log.warning(
                "old run folder %s is in use by another mics-export run: kept",
                path,
                extra={"event": "retention_in_use", "path": str(path)},
            )
            return False
        problems: list[str] = []

        def on_error(function: object, name: str, exc: BaseException) -> None:
            if not isinstance(exc, FileNotFoundError):  # another shard deleting it too
                problems.append(f"{name}: {getattr(exc, 'strerror', None) or exc}")

        # rmtree never follows a symlink inside the folder: it removes the link itself.
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=on_error)
        else:
            shutil.rmtree(path, onerror=lambda f, n, info: on_error(f, n, info[1]))
    if problems:
        log.warning(
            "could not delete all of old run folder %s: %s",
            path,
            problems[0],
            extra={"event": "retention_failed", "path": str(path)},
        )
        return False
    log.info(
        "deleted run folder %s (%s: more than %d day(s) old)",
        path,
        date.isoformat(),
        keep_days,
        extra={"event": "run_folder_deleted", "path": str(path)},
    )
    return True


@contextlib.contextmanager
def _locks_of(folder: Path) -> Iterator[bool]:
    """Hold every run lock (``.lock``) inside ``folder``; yields False if one is taken.

    Held through the deletion, so that a run starting there meanwhile fails on its lock
    (exit 2, "another run is using") instead of writing into a folder being deleted.
    """
    fds: list[int] = []
    free = True
    try:
        for top, _dirs, files in os.walk(folder):  # never follows symlinks to folders
            if ".lock" not in files:
                continue
            try:
                fd = os.open(os.path.join(top, ".lock"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue  # a symlink named .lock, or gone: not a run's lock
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                free = False
                break
        yield free
    finally:
        for fd in fds:
            os.close(fd)


__all__ = ["DatedFolders", "dated_folders", "prune"]


async def prune_bucket(
    template: str, keep_days: int, today: dt.date, current_prefix: str, store: ObjectStore
) -> list[str]:
    """Delete the run prefixes of the bucket ``template`` older than ``keep_days`` before ``today``.

    ``current_prefix`` is this run's prefix (never deleted, nor one holding it); ``store``
    the run's object store. Returns the prefixes deleted. Like :func:`prune`, a problem is
    a warning, never a failed run.
    """
    import obstore

    from orchestrator import objstore

    location = objstore.parse_location(template)
    parts = [p for p in location.prefix.split("/") if p]
    index = next((i for i, part in enumerate(parts) if DATE_FIELD in part), None)
    if index is None:
        log.warning(
            "run.keep_days is set but the output prefix %s has no {date}: no old run prefix to delete",
            template,
            extra={"event": "retention_skipped"},
        )
        return []
    found = dated_folders(parts[index])
    assert found is not None
    root = "/".join(parts[:index])
    deleted: list[str] = []
    cutoff = today - dt.timedelta(days=keep_days)
    here = current_prefix.strip("/") + "/"
    try:
        listing = await obstore.list_with_delimiter_async(store, root or None)
        for child in sorted(listing["common_prefixes"]):
            name = child.rstrip("/").rpartition("/")[2]
            match = found.name.fullmatch(name)
            if match is None:
                continue
            try:
                date = dt.date.fromisoformat(match["date"])
            except ValueError:
                continue
            prefix = child.rstrip("/")
            if date >= cutoff or here.startswith(prefix + "/"):
                continue
            if await _delete_prefix(store, prefix, date, keep_days):
                deleted.append(prefix)
    except Exception as exc:  # a listing or a delete refused: the exports are done all the same
        log.warning(
            "could not delete old run prefixes under %s: %s",
            root or "the bucket",
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            extra={"event": "retention_failed"},
        )
    return deleted


async def _delete_prefix(store: ObjectStore, prefix: str, date: dt.date, keep_days: int) -> bool:
    """Delete every object under an old run ``prefix`` unless a live lock in it says a run
    (or a shard) still uses it; False when it is kept. Errors go up to :func:`prune_bucket`."""
    import obstore

    from orchestrator import objstore

    keys = [meta["path"] async for batch in obstore.list(store, prefix + "/") for meta in batch]
    # The run's own lock, and a shard's (PREFIX/shard-I-of-N/.lock): any live one keeps it.
    locked = [k[: -len("/" + objstore.LOCK_NAME)] for k in keys if k.endswith("/" + objstore.LOCK_NAME)]
    if any([await objstore.lock_alive(store, where) for where in locked]):
        log.warning(
            "old run prefix %s is in use by another mics-export run: kept",
            prefix,
            extra={"event": "retention_in_use", "path": prefix},
        )
        return False
    for key in keys:
        await objstore.delete(store, key)
    log.info(
        "deleted run prefix %s (%s: more than %d day(s) old, %d object(s))",
        prefix,
        date.isoformat(),
        keep_days,
        len(keys),
        extra={"event": "run_folder_deleted", "path": prefix},
    )
    return True
