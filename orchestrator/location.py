"""Bucket URLs: which ones a run accepts, and the :class:`Location` (bucket + prefix) they name.

Pure parsing, without obstore (the optional ``cloud`` extra): the job file's validation
and the command line can check a URL with it before anything is opened. The rules, and
why no message ever shows a password or a query string, are in :mod:`orchestrator.objstore`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from orchestrator.errors import UsageError

Scheme = Literal["s3", "gs", "az"]
_SCHEMES: dict[str, Scheme] = {"s3": "s3", "gs": "gs", "az": "az", "abfs": "az", "abfss": "az"}
_URL_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$", re.DOTALL)
_BUCKET_RE: dict[Scheme, re.Pattern[str]] = {
    # Lenient on purpose: legacy S3 buckets may hold capitals and underscores.
    "s3": re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$"),
    "gs": re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$"),
    "az": re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}$"),
}
_AZURE_HOST_RE = re.compile(r"^(?P<account>[a-z0-9]{3,24})\.(?:dfs|blob)\.core\.windows\.net$")
_ACCEPTED = "s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX or abfs://CONTAINER/PREFIX"


def is_bucket_url(text: str) -> bool:
    """Whether ``text`` is a URL (``scheme://…``) rather than a local path.

    Any scheme counts, so that ``s3a://…`` or ``gcs://…`` is refused by :func:`parse_location`
    with a clear message instead of becoming a local folder named ``s3a:``.
    """
    return _URL_RE.match(text) is not None


@dataclass(frozen=True)
class Location:
    """A bucket (or Azure container) and a prefix inside it."""

    scheme: Scheme
    bucket: str
    prefix: str
    """No leading or trailing slash; empty for the bucket's root."""
    account: str | None = None
    """The Azure storage account when the URL names it (``abfs://c@ACCOUNT.dfs.core.windows.net``)."""

    def key(self, name: str) -> str:
        """The object key of ``name`` under the prefix."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, key: str | None = None) -> str:
        """``scheme://bucket/key`` (the prefix itself without ``key``)."""
        return f"{self.scheme}://{self.bucket}/{self.prefix if key is None else key}"

    def __str__(self) -> str:
        return self.url()


_SECRET_PARTS = re.compile(r"(?<=://)[^/@]*:[^/@]*@|[?#].*", re.DOTALL)


def _shown_url(url: str) -> str:
    """``url`` for a message: a ``user:password@`` and a query (a SAS signature) blanked out, cut when long."""
    text = _SECRET_PARTS.sub(lambda m: "***@" if m.group().endswith("@") else m.group()[0] + "***", url)
    return repr(text if len(text) <= 120 else text[:120] + "...")


def parse_location(url: str) -> Location:
    """Parse a bucket URL; anything else is a :class:`UsageError` of one line.

    No message shows a password or a query string from the URL: either may be a secret
    (``s3://key:secret@...``, an Azure SAS ``?sig=...``).
    """
    shown = _shown_url(url)
    match = _URL_RE.match(url)
    if match is None:
        raise UsageError(f"not a bucket URL: {shown} (expected {_ACCEPTED})")
    raw_scheme = match.group("scheme").lower()
    scheme = _SCHEMES.get(raw_scheme)
    if scheme is None:
        raise UsageError(f"unsupported storage URL scheme {raw_scheme}:// in {shown}: use {_ACCEPTED}")
    rest = match.group("rest")
    if any(c in rest for c in "?#"):
        raise UsageError(
            f"invalid bucket URL {shown}: no query, fragment or signature (credentials come from the environment)"
        )
    if any((c.isspace() and c != " ") or ord(c) < 32 or ord(c) == 0x7F for c in rest):
        raise UsageError(f"invalid bucket URL {shown}: no control characters allowed")
    bucket, _, prefix = rest.partition("/")
    account = None
    if ":" in bucket.partition("@")[0] and "@" in bucket:
        raise UsageError(f"invalid bucket URL {shown}: no user:password@ (credentials come from the environment)")
    if "@" in bucket:
        if scheme != "az":
            raise UsageError(f"invalid bucket URL {shown}: user@host is only for Azure (abfs://CONTAINER@ACCOUNT...)")
        bucket, _, host = bucket.partition("@")
        host_match = _AZURE_HOST_RE.match(host.lower())
        if host_match is None:
            raise UsageError(
                f"invalid bucket URL {shown}: expected abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/PREFIX"
            )
        account = host_match.group("account")
    if not bucket:
        raise UsageError(f"invalid bucket URL {shown}: the bucket (container) name is missing")
    if not _BUCKET_RE[scheme].match(bucket):
        raise UsageError(f"invalid bucket URL {shown}: {bucket!r} is not a valid bucket (container) name")
    prefix = prefix.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise UsageError(f"invalid bucket URL {shown}: the prefix has an empty, '.' or '..' segment")
    return Location(scheme=scheme, bucket=bucket, prefix=prefix, account=account)


__all__ = ["Location", "Scheme", "is_bucket_url", "parse_location"]
