"""Where a run's outputs go: the one place that knows how an output becomes visible.

A :class:`Sink` is a local folder (:class:`LocalSink`) or a bucket prefix
(:class:`~orchestrator.bucket_sink.BucketSink`, imported only for a bucket:
obstore is the optional ``cloud`` extra). It answers, for the run:

- how a result is written and made visible atomically (:meth:`Sink.target`, a
  :class:`~orchestrator.download.Target`): a part file renamed into place, or a multipart
  upload completed at the end (the object appears whole or not at all);
- how a part is resumed: a local part file is continued from its size; a bucket upload
  always restarts from byte 0 of the (adopted) execution's result;
- where the manifest lives (``manifest.json`` beside the outputs) and how an earlier run's is
  read. Locally, changes are appended to ``.manifest.journal`` (fsynced) and manifest.json is
  compacted from time to time by rename; a rerun reads both (``load_previous``). In a bucket
  (no append) every write is a single PUT of the whole manifest, as before;
- how a finished output is verified without downloading it again
  (:meth:`Sink.verify`): locally by hashing the file; in a bucket by a HEAD whose size
  and ETag must equal what the manifest recorded when the upload completed;
- the lock that keeps one run per folder / prefix (flock locally, taken by the
  scheduler before the folder is touched; a lease lock object in a bucket).

The download's writer thread hashes and compresses as before; for a bucket its output
goes to :func:`orchestrator.objstore.upload` (one hop to the event loop per chunk, on the
bucket path only: the local path keeps one plain file write per chunk).
"""

from __future__ import annotations

import logging
import zlib
from abc import ABC, abstractmethod
from pathlib import Path

import anyio
import zstandard

from orchestrator.manifest import (
    MANIFEST_NAME,
    JobRecord,
    Manifest,
    ManifestStore,
    load_previous,
    write_atomic,
)
from orchestrator.part_file import LocalTarget, sha256_of_file
from orchestrator.transfer import Target

log = logging.getLogger("orchestrator.sink")

LOCAL_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)
"""A local file that cannot be read back or decompressed: download it again."""


class Sink(ABC):
    """A run's output location (folder or bucket prefix)."""

    url: str
    """The folder or ``scheme://bucket/prefix``, for messages."""
    is_bucket: bool = False

    @abstractmethod
    def label(self, name: str) -> str:
        """Where ``name`` is, for messages (a path or a URL)."""

    @abstractmethod
    def manifest_store(self) -> Path | ManifestStore:
        """What :class:`~orchestrator.manifest.ManifestWriter` writes the manifest through."""

    @abstractmethod
    def target(self, name: str, tag: str, stale_tags: tuple[str, ...] = ()) -> Target:
        """Where the download of ``name`` (for execution ``tag``) is written."""

    @abstractmethod
    async def write(self, name: str, data: bytes) -> None:
        """Replace ``name`` with ``data``, atomically (an error file)."""

    @abstractmethod
    async def remove(self, name: str) -> bool:
        """Remove ``name`` if it is there (never following a link); whether it was."""

    @abstractmethod
    async def read_previous(self) -> Manifest | None:
        """The manifest an earlier run left here (a corrupt one is moved aside, loudly)."""

    @abstractmethod
    async def verify(self, rec: JobRecord, compression: str) -> bool:
        """The job's recorded output is here and unchanged (no download from the API)."""


class LocalSink(Sink):
    """A local folder: today's layout (part files, fsync, rename, flock ``.lock``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.url = str(folder)

    def label(self, name: str) -> str:
        return str(self.folder / name)

    def manifest_store(self) -> Path:
        return self.folder / MANIFEST_NAME

    def target(self, name: str, tag: str, stale_tags: tuple[str, ...] = ()) -> Target:
        return LocalTarget(self.folder / name, tag, stale_tags)

    async def write(self, name: str, data: bytes) -> None:
        await anyio.to_thread.run_sync(write_atomic, self.folder / name, data)

    async def remove(self, name: str) -> bool:
        try:
            (self.folder / name).unlink()  # a symlink is removed itself, its target left alone
        except FileNotFoundError:
            return False
        return True

    async def read_previous(self) -> Manifest | None:
        return load_previous(self.folder / MANIFEST_NAME)

    async def verify(self, rec: JobRecord, compression: str) -> bool:
        if not rec.path or not rec.sha256:
            return False
        path = self.folder / rec.path
        if not path.is_file():
            return False
        try:
            digest = await anyio.to_thread.run_sync(sha256_of_file, path, compression, abandon_on_cancel=True)
        except LOCAL_ERRORS:  # unreadable or corrupt: download it again
            return False
        return bool(digest == rec.sha256)


__all__ = ["LocalSink", "Sink"]
