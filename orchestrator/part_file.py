"""A download's local part file: opened safely, resumed only when ours, renamed into place.

Hostile folders. Part files and outputs are opened without following symlinks
(``O_NOFOLLOW``, ``O_EXCL`` for a new part file), a part file is resumed only when the
caller says this execution's part file is ours *and* it is a plain regular file of this
user with one link; anything else under its name is deleted and the download starts
from byte 0. The rename checks that the part name still holds the file written (same
inode), so nothing outside the folder is ever written; a symlink at the final name is
replaced by the file, never written through. The end: flush, fsync, rename, fsync the
folder — so the final name only ever holds a complete file. The rename and the folder's
fsync run in one worker-thread hop, off the event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path, PurePath
from typing import Any

import zstandard

from orchestrator import offload
from orchestrator.ndjson import LineChecker
from orchestrator.transfer import READ_BACK_BYTES, Output, Target, read_back

log = logging.getLogger("orchestrator.download")  # the download's events (part_discarded)


_PLAIN_TAG = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


def part_path(dest: Path, tag: str) -> Path:
    """The temporary file for ``dest``: hidden, in the same folder (rename is atomic there).

    ``tag`` is an execution id, the server's (or a manifest's) to choose: a plain one is used
    as it is; any other (a ``/``, a NUL, 5,000 digits...) by its hash, never as a path."""
    if not _PLAIN_TAG.fullmatch(tag):
        tag = "h" + hashlib.sha256(tag.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return dest.with_name(f".{dest.name}.{tag}.part")


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileOutput:
    """A file of its own on a dup of the part file's descriptor (closing it leaves the caller's open)."""

    def __init__(self, fd: int) -> None:
        self._file = os.fdopen(os.dup(fd), "wb")
        self._file.seek(0, os.SEEK_END)
        self.write = self._file.write

    def finish(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _not_ours(st: os.stat_result) -> str | None:
    """Why a part file must not be resumed, or None when it is a plain file of ours."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return "owned by another user"
    if st.st_nlink != 1:
        return f"{st.st_nlink} hard links"
    return None


def _open_part(part: Path, resume: bool) -> tuple[int, int]:
    """Open the part file: (descriptor, bytes to resume from). Never follows a symlink."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    if resume:
        why: str | None = None
        try:
            # O_NONBLOCK: a FIFO planted under the name must not block the open.
            fd = os.open(part, flags | os.O_NONBLOCK)
        except FileNotFoundError:
            why = None
        except OSError as exc:  # ELOOP: a symlink; EISDIR; EACCES...
            why = exc.strerror or type(exc).__name__
        else:
            why = _not_ours(os.fstat(fd))
            if why is None:
                os.set_blocking(fd, True)
                return fd, os.fstat(fd).st_size
            os.close(fd)
        if why is not None:
            log.warning("%s is %s: deleted, downloading from byte 0", part.name, why, extra={"event": "part_discarded"})
    try:
        os.unlink(part)  # a symlink goes, never its target
        if not resume:
            log.info(
                "%s was not recorded for this execution: deleted, downloading from byte 0",
                part.name,
                extra={"event": "part_discarded"},
            )
    except FileNotFoundError:
        pass
    return os.open(part, flags | os.O_CREAT | os.O_EXCL, 0o666), 0


def _commit(part: Path, final: Path, fd: int) -> None:
    """Rename the (fsynced) part file into place, fsync the folder, close the part's descriptor."""
    try:
        os.replace(part, final)
        fsync_dir(final.parent)
    finally:
        os.close(fd)


def _describe_existing(dest: Path) -> str | None:
    """What is at the final name now (before it is replaced), or None."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    if stat.S_ISREG(st.st_mode):
        return f"a regular file of {st.st_size} bytes"
    return "a special file"


class LocalTarget:
    """A file in a local folder: part file, fsync, same-inode check, rename, folder fsync."""

    can_rename = True

    def __init__(self, dest: Path, tag: str = "download", stale_tags: Iterable[str] = ()) -> None:
        self.dest = dest
        self.name = dest.name
        self.tag = tag
        self.stale_tags = tuple(stale_tags)
        self.part = part_path(dest, tag)
        self.fd = -1

    @property
    def where(self) -> PurePath:
        return self.dest

    async def open(self, resume: bool) -> int:
        for old in self.stale_tags:  # part files a killed run left for other executions of this job
            if old != self.tag:
                part_path(self.dest, old).unlink(missing_ok=True)
        self.fd, start = _open_part(self.part, resume)
        return start

    async def read_back(self, size: int, checker: LineChecker, digest: Any) -> None:
        await read_back(self.fd, size, checker, digest)

    def output(self) -> Output:
        return _FileOutput(self.fd)

    async def restart(self) -> None:
        os.ftruncate(self.fd, 0)

    async def prepare_commit(self) -> str | None:
        """Check the part name still holds the file written; what is at the final name now."""
        mine = os.fstat(self.fd)
        now = os.lstat(self.part)
        if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            raise OSError(f"{self.part.name} was replaced while it was written: not renamed into place")
        return _describe_existing(self.dest)

    async def commit(self, name: str | None) -> tuple[str | None, int] | None:
        # One worker-thread hop for rename, folder fsync and close: the folder's fsync waits on
        # the disk and must not stall the event loop (and every other download) meanwhile. Not
        # abandoned on cancel: the caller shields the commit, and the fd is ours until closed.
        fd, self.fd = self.fd, -1
        await offload.run_sync(_commit, self.part, self.dest if name is None else self.dest.with_name(name), fd)
        return None

    async def abort(self) -> None:
        # Sync and instant: no await for a cancel to hit.
        with contextlib.suppress(OSError):
            self.part.unlink()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def retarget(self, name: str) -> Target:
        raise NotImplementedError("a local part file is renamed, never rewritten")


def sha256_of_file(path: Path, compression: str = "none") -> str:
    """sha256 of a file's uncompressed content (blocking: call it in a thread)."""
    import gzip

    digest = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        stream: Any = stack.enter_context(path.open("rb"))
        if compression == "gzip":
            stream = stack.enter_context(gzip.open(stream))
        elif compression == "zstd":
            stream = stack.enter_context(zstandard.ZstdDecompressor().stream_reader(stream))
        while block := stream.read(READ_BACK_BYTES):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["LocalTarget", "fsync_dir", "part_path", "sha256_of_file"]
