"""Resumable, byte-exact streaming of a result file over HTTP.

The download's side of the client: :func:`resumable_stream` yields the bytes of a file
from an offset, reopening the request with ``Range`` after a cut, and never yields a
byte twice or skips one. It also knows when the file is *complete*, by every length
the server stated, and says how in :attr:`ResumableStream.length_check`:

``content-length``  a 200 whose body matched its Content-Length (aiohttp raises
                    ClientPayloadError on a shorter one);
``content-range``   the total of a ``Content-Range`` (206, or the 416 of a resume
                    from exactly the end) was reached;
``chunked``         a chunked body ended with its terminator (aiohttp raises without);
``encoding-end``    a close-delimited gzip/deflate body reached the end of its
                    compressed stream (the gzip trailer checks CRC and size);
``end-probe``       a close-delimited body, then ``Range: bytes=N-`` (N = bytes had)
                    answered 416 ``bytes */N``;
``unverified``      a close-delimited body whose end the server could not confirm (a
                    200 ignoring the probe's Range, or no usable answer).

A body shorter than a stated length is a cut: resumed from where it stopped, within
the retry budget. A 206 shorter than its stated total is not the end: the next range
is asked until the total. Bodies are read with ``auto_decompress`` off and inflated
here, because aiohttp does not notice a gzip body cut before its trailer.

Content changes. The first answer's validator (a strong ``ETag``, else
``Last-Modified``) is sent as ``If-Range`` with every later range. A resumed answer with
another validator, or a 200 whose validator does not prove the same content (RFC 9110:
If-Range not matched), raises :class:`ContentChangedError`: the caller discards what it
has and starts again from byte 0 (:func:`orchestrator.download.download` does). A 200
carrying the *same* strong validator is a server that ignores Range: the bytes already
had are skipped. A stream opened at ``start > 0`` (a part file of an earlier run) has no
validator to send: the part file is resumed only when the manifest recorded that same
execution (immutable on the platform), and the first answer's validator guards the rest.

A 2xx whose Content-Type cannot be NDJSON (HTML, XML, images, ...: a proxy's error
page) is a transient server error (:class:`UnexpectedContentError`), retried like a 5xx.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio

from orchestrator.api import _error_from, _parse_retry_after
from orchestrator.errors import ApiError, AuthError, ConnectError, IncompleteBodyError, TransportError

if TYPE_CHECKING:
    from orchestrator.api import ApiClient

log = logging.getLogger("orchestrator.stream")

LENGTH_CHECKS = ("content-length", "content-range", "chunked", "encoding-end", "end-probe", "unverified")
"""How a stream knew it had every byte (see the module docstring)."""

_NOT_NDJSON_MAJOR = frozenset({"image", "audio", "video", "font", "model", "multipart", "message"})
_NOT_NDJSON = frozenset({"application/pdf", "application/javascript", "text/css", "text/javascript"})
_INFLATED = frozenset({"gzip", "x-gzip", "deflate"})


class ContentChangedError(TransportError):
    """The file changed on the server under a resume: start again from byte 0."""


class UnexpectedContentError(TransportError):
    """A 2xx answer whose Content-Type cannot be NDJSON (an error page served as 200)."""


class _Cut(Exception):
    """A body that ended before a length it stated (no aiohttp error for this kind)."""


def _cannot_be_ndjson(content_type: str | None) -> bool:
    """True for media types that cannot hold NDJSON (HTML, XML, images...); missing is fine."""
    media = (content_type or "").partition(";")[0].strip().lower()
    if not media:
        return False
    major, _, sub = media.partition("/")
    return major in _NOT_NDJSON_MAJOR or "html" in sub or "xml" in sub or media in _NOT_NDJSON


def _validator(resp: aiohttp.ClientResponse) -> str | None:
    """The answer's strong validator: its ETag unless weak, else Last-Modified."""
    etag = resp.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return resp.headers.get("Last-Modified") or None


def _content_range(value: str) -> tuple[int, int, int | None] | None:
    """``bytes a-b/total`` → (a, b, total or None for ``*``); None when malformed."""
    unit, _, spec = value.strip().partition(" ")
    span, _, total = spec.partition("/")
    first, _, last = span.partition("-")
    if unit.lower() != "bytes" or not first.isdigit() or not last.isdigit():
        return None
    a, b = int(first), int(last)
    if b < a or not (total == "*" or total.isdigit()) or (total.isdigit() and b >= int(total)):
        return None
    return a, b, None if total == "*" else int(total)


def _header(resp: aiohttp.ClientResponse, name: str) -> str:
    """Every value of header ``name``, joined as one list: a second ``Content-Encoding: gzip``
    line means gzip twice, and two ``Content-Range`` lines are no range at all."""
    return ", ".join(resp.headers.getall(name, ()))


def _codings(value: str) -> list[str]:
    """A coding list (``gzip, chunked``) in order, lower case, without empty items."""
    return [c.strip().lower() for c in value.split(",") if c.strip()]


@dataclass
class _Answer:
    resp: aiohttp.ClientResponse | None  # None: a 416 confirming the end
    total: int | None = None


async def _open(
    api: ApiClient, path: str, params: dict[str, Any] | None, pos: int | None, validator: str | None
) -> _Answer:
    """Send a GET for the whole file (``pos`` None) or the bytes from ``pos`` (``If-Range:
    validator`` when given)."""
    headers: dict[str, str] | None = None
    if pos is not None:
        headers = {"Range": f"bytes={pos}-"}
        if validator:
            headers["If-Range"] = validator
    async with api.throttle.slot():
        try:
            resp = await api.session.get(api.base_url + path, params=params, headers=headers, auto_decompress=False)
        except aiohttp.ClientConnectorError as exc:
            raise ConnectError(f"GET {path}: {api.describe(exc)}") from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TransportError(f"GET {path}: {api.describe(exc)}") from None
    if resp.status == 429:
        api.throttle.on_throttled(_parse_retry_after(resp.headers.get("Retry-After")))
    if resp.status == 416 and pos is not None:
        # Asked from exactly the end: nothing left, if the server agrees on the size.
        unit, _, total = _header(resp, "Content-Range").strip().partition(" */")
        resp.release()
        if unit.lower() == "bytes" and total.isdigit() and int(total) == pos:
            return _Answer(None, pos)
        raise ApiError(
            416,
            f"cannot resume at byte {pos} (size {total if total.isdigit() else 'unknown'})",
            method="GET",
            path=path,
        )
    if resp.status >= 400:
        try:
            raw = await resp.content.read(1 << 16)
        except (TimeoutError, aiohttp.ClientError):
            raw = b""
        resp.release()
        raise _error_from(resp.status, raw, "GET", path, resp.headers.get("Retry-After"), api._token)
    if resp.status not in (200, 206):
        resp.release()  # 204, 3xx left unfollowed...: no file in it
        raise TransportError(f"GET {path}: unexpected HTTP {resp.status} for a file")
    if resp.status == 206 and pos is None:
        # RFC 9110 §15.3.7: a 206 answers a Range only. Unasked, its Content-Range is no proof
        # of the file's size (a cache serving a piece it holds): a server error, retried.
        resp.release()
        raise TransportError(f"GET {path}: HTTP 206 to a request without Range")
    transfer = _header(resp, "Transfer-Encoding")
    if [c for c in _codings(transfer) if c != "identity"] not in ([], ["chunked"]):
        # aiohttp removes one chunked framing, nothing else: another transfer coding, or
        # chunked twice, would be saved as it came (compressed bytes or chunk sizes in the file).
        resp.release()
        raise TransportError(f"GET {path}: unsupported Transfer-Encoding {api._token.cut(transfer, 80)!r}")
    content_type = _header(resp, "Content-Type") or None
    if _cannot_be_ndjson(content_type):
        resp.release()
        media = api._token.cut((content_type or "").partition(";")[0].strip(), 80)
        raise UnexpectedContentError(f"GET {path}: HTTP {resp.status} with Content-Type {media}, not a result file")
    api.throttle.on_success()
    return _Answer(resp)


class _Inflater:
    """gzip / deflate decoding that knows whether the compressed stream reached its end."""

    def __init__(self, encoding: str, limit: int) -> None:
        self.encoding = encoding
        self.limit = limit  # most bytes out per step: no inflating a bomb in one go
        self._z: Any = None

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The bytes ``data`` inflates to, ``limit`` at a time: a generator, so that each piece
        is written before the next is inflated (a list of them would hold a bomb whole)."""
        if not data:
            return
        if self._z is None:
            # deflate is meant to be zlib-wrapped; some servers send it raw (aiohttp sniffs too).
            wbits = 31 if self.encoding != "deflate" else (15 if data[0] & 0x0F == 8 else -15)
            self._z = zlib.decompressobj(wbits)
        if self._z.eof:
            raise _Cut("data after the end of the compressed stream")
        yield self._z.decompress(data, self.limit)
        while self._z.unconsumed_tail:
            yield self._z.decompress(self._z.unconsumed_tail, self.limit)
        if self._z.unused_data:
            raise _Cut("data after the end of the compressed stream")

    @property
    def eof(self) -> bool:
        return self._z is not None and bool(self._z.eof)


class _Decoder:
    """A Content-Encoding's codings (``gzip, gzip`` is gzip applied twice) undone in reverse."""

    def __init__(self, codings: list[str], limit: int) -> None:
        self.layers = [_Inflater(c, limit) for c in reversed(codings)]

    def feed(self, data: bytes, layer: int = 0) -> Iterator[bytes]:
        if layer == len(self.layers):
            yield data
            return
        for piece in self.layers[layer].feed(data):
            if piece:
                yield from self.feed(piece, layer + 1)

    @property
    def eof(self) -> bool:
        """Every coding reached the end of its stream (the gzip trailers checked)."""
        return all(layer.eof for layer in self.layers)


class ResumableStream:
    """The bytes of a file from ``start``; see the module docstring. Async iterator."""

    def __init__(self, api: ApiClient, path: str, params: dict[str, Any] | None, start: int, chunk_bytes: int) -> None:
        self.api = api
        self.path = path
        self.params = params
        self.pos = start
        self.chunk_bytes = chunk_bytes
        self.length_check: str | None = None
        """Set once the stream is exhausted: one of :data:`LENGTH_CHECKS`."""
        self.validator: str | None = None
        self.total: int | None = None
        self._answered = False  # a stream opened at start > 0 trusts its first answer (see above)
        self._gen = self._run()

    def __aiter__(self) -> ResumableStream:
        return self

    async def __anext__(self) -> bytes:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()

    def _changed(self, why: str) -> ContentChangedError:
        return ContentChangedError(f"GET {self.path}: the file changed on the server ({why}) at byte {self.pos}")

    async def _run(self) -> AsyncGenerator[bytes, None]:
        api, path = self.api, self.path
        failures = total_failures = 0
        probing = False  # the last body had no stated length, or none at all: is pos its end?
        ranges = True  # False after an encoded answer: ranges of it cannot be inflated
        empty_checked = False  # an empty answer is believed only once asked again
        while True:
            # At byte 0 a Range is sent only to check an empty answer: "bytes=0-" gets a 416
            # "bytes */0" from a server whose file is really empty.
            range_from = self.pos if ranges and (self.pos > 0 or probing) else None
            try:
                answer = await api._retrying(
                    functools.partial(
                        _open,
                        api,
                        path,
                        self.params,
                        range_from,
                        self.validator if range_from is not None else None,
                    )
                )
            except (ApiError, TransportError) as exc:
                if not probing or isinstance(exc, AuthError):
                    raise
                log.info(
                    "could not confirm the end of a body without a length at byte %d (%s)",
                    self.pos,
                    api.scrub(str(exc)),
                    extra={"event": "length_unverified", "offset": self.pos},
                )
                self.length_check = "unverified"
                return
            if answer.resp is None:
                self.length_check = "end-probe" if probing else "content-range"
                return
            resp = answer.resp
            progressed = False
            try:
                tag = _validator(resp)
                skip = 0
                end: int | None = None  # where this answer's body must end (absolute)
                encoding = _header(resp, "Content-Encoding")
                codings = [c for c in _codings(encoding) if c != "identity"]
                if any(c not in _INFLATED for c in codings):
                    # br, zstd...: asked for identity (or gzip/deflate), never guessed at.
                    raise TransportError(f"GET {path}: unsupported Content-Encoding {api._token.cut(encoding, 80)!r}")
                inflater = _Decoder(codings, self.chunk_bytes) if codings else None
                if resp.status == 206:
                    if inflater is not None:
                        ranges = False  # a range of compressed bytes: ask for the whole file instead
                        continue
                    parsed = _content_range(_header(resp, "Content-Range"))
                    if parsed is None or parsed[0] != self.pos:
                        raise TransportError(
                            f"GET {path}: asked for bytes from {self.pos}, got range "
                            f"{api._token.cut(_header(resp, 'Content-Range'), 80)!r}"
                        )
                    if self.validator and tag and tag != self.validator:
                        raise self._changed(f"validator {self.validator} became {tag}")
                    self.validator = self.validator or tag
                    _, last, total = parsed
                    if total is not None and self.total is not None and total != self.total:
                        raise self._changed(f"size {self.total} became {total}")
                    self.total = total if total is not None else self.total
                    end = last + 1
                    probing = False
                else:  # 200: the whole file from byte 0
                    if self.pos > 0:
                        same = self.validator is not None and tag == self.validator
                        if probing and (same or self.validator is None or tag is None):
                            # The server cannot answer a range here: the end stays unproven.
                            self.length_check = "unverified"
                            log.info(
                                "the server ignored the Range that checks the end of a body without a length "
                                "(byte %d): its length is unverified",
                                self.pos,
                                extra={"event": "length_unverified", "offset": self.pos},
                            )
                            return
                        if not same and self._answered:
                            raise self._changed(
                                f"HTTP 200 to a resume with If-Range {self.validator}, validator {tag}"
                                if self.validator
                                else "HTTP 200 to a resume, and no validator to prove the content is the same"
                            )
                        skip = self.pos  # same content, Range ignored: skip what we already have
                    self.validator = self.validator or tag
                    length = resp.headers.get("Content-Length")
                    if inflater is None and length is not None and length.isdigit():
                        if self.total is not None and int(length) != self.total:
                            raise self._changed(f"size {self.total} became {length}")
                        self.total = end = int(length)
                self._answered = True
                start_pos = self.pos
                async for raw in resp.content.iter_chunked(self.chunk_bytes):
                    for data in inflater.feed(raw) if inflater is not None else (raw,):
                        if skip:
                            if len(data) <= skip:
                                skip -= len(data)
                                continue
                            data, skip = data[skip:], 0
                        if not data:
                            continue
                        if end is not None and self.pos + len(data) > end:
                            raise TransportError(f"GET {path}: more bytes than the {end - start_pos} stated")
                        self.pos += len(data)
                        progressed = True
                        yield data
                if inflater is not None and not inflater.eof:
                    raise _Cut(f"{encoding} stream cut before its end")
                if skip:
                    raise _Cut("body ended before the bytes already had")
                if end is not None and self.pos < end:
                    raise _Cut(f"body ended at byte {self.pos} of {end}")
            except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, _Cut, zlib.error) as exc:
                failures = 1 if progressed else failures + 1
                total_failures += 1
                if failures >= api.retry.max_tries or total_failures >= 10 * api.retry.max_tries:
                    kind = IncompleteBodyError if isinstance(exc, aiohttp.ClientPayloadError | _Cut) else TransportError
                    raise kind(
                        f"GET {path}: body cut at byte {self.pos}, {failures} tries: {api.describe(exc)}"
                    ) from None
                wait = api.retry_wait(failures)
                log.info(
                    "download cut at byte %d (%s): resuming in %.2fs",
                    self.pos,
                    api.describe(exc),
                    wait,
                    extra={"event": "download_resume", "offset": self.pos},
                )
                await anyio.sleep(wait)
                probing = False
                continue
            finally:
                resp.release()
            # The body ended as its framing says. Is it the whole file?
            failures = 0
            if self.pos == 0 and ranges and not empty_checked:
                # Nothing at all, even with "Content-Length: 0": a proxy's empty 200 looks just
                # like an empty result. Asked again with "Range: bytes=0-", a server whose file is
                # empty answers 416 "bytes */0" (or empty again); one with bytes sends them, and
                # its other size restarts the download (ContentChangedError).
                empty_checked = probing = True
                continue
            if self.total is not None and self.pos < self.total:
                continue  # a 206 shorter than the file: ask for the rest
            if self.total is not None:
                self.length_check = "content-range" if resp.status == 206 else "content-length"
                return
            if resp.status == 200:
                if "chunked" in _codings(_header(resp, "Transfer-Encoding")):
                    self.length_check = "chunked"
                    return
                if inflater is not None:  # its end was checked above
                    self.length_check = "content-length" if "Content-Length" in resp.headers else "encoding-end"
                    return
                if range_from is not None:
                    # A 200 without a length to a Range (the check of an empty answer, or a
                    # resume): this server cannot answer the probe either.
                    self.length_check = "unverified"
                    log.info(
                        "the server ignores Range and states no length: the length of the body (%d bytes) "
                        "is unverified",
                        self.pos,
                        extra={"event": "length_unverified", "offset": self.pos},
                    )
                    return
            probing = True  # no length stated (or a 206 of unknown total): ask for the byte after the end


def resumable_stream(
    api: ApiClient, path: str, params: dict[str, Any] | None, start: int, chunk_bytes: int
) -> AsyncIterator[bytes]:
    """A :class:`ResumableStream` of ``path`` from byte ``start``."""
    return ResumableStream(api, path, params, start, chunk_bytes)


__all__ = [
    "LENGTH_CHECKS",
    "ContentChangedError",
    "ResumableStream",
    "UnexpectedContentError",
    "resumable_stream",
]
