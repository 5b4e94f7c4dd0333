"""Resumable, byte-exact streaming of a result file over HTTP.

The download's side of the client: a :class:`ResumableStream` yields the bytes of a file
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

A body shorter than a stated length is a cut: resumed from where it stopped. The whole
stream is one operation of the :class:`~orchestrator.retry.RetryPolicy`: failed opens and
cuts draw from one :class:`~orchestrator.retry.Budget` (new bytes restart its count and
deadline, up to ``10 * max_tries`` failures in all), so retries never nest and multiply.
A 206 shorter than its stated total is not the end: the next range is asked until the
total. Bodies are read with ``auto_decompress`` off and inflated here, because aiohttp
does not notice a gzip body cut before its trailer.

Content changes. The first answer's validator (a strong ``ETag``, else
``Last-Modified``) is sent as ``If-Range`` with every later range. A resumed answer with
another validator, or a 200 whose validator does not prove the same content (RFC 9110:
If-Range not matched), raises :class:`ContentChangedError`: the caller discards what it
has and starts again from byte 0 (:func:`orchestrator.download.download` does). A 200
carrying the *same* strong validator is a server that ignores Range: the bytes already
had are skipped. A stream opened at ``start > 0`` (a part file of an earlier, killed run)
is given the validator and size that run recorded (``validator``, ``total``) and sends the
validator from its first request: a part file of another content is never continued, and a
416 or ``Content-Range`` must agree with the size. ``on_validator`` hears the validator and
size a stream learns from its first answer, for the caller to record.

A 2xx whose Content-Type cannot be NDJSON (HTML, XML, images, ...: a proxy's error
page) is a transient server error (:class:`UnexpectedContentError`), retried like a 5xx.

A little over ~350 lines: one state machine (the stream's offset, validator, total and
probes), its steps as methods of one class; the header and decoding helpers are in
:mod:`orchestrator.framing`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import zlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from orchestrator.errors import ApiError, AuthError, TransportError
from orchestrator.framing import (
    INFLATED,
    BodyCut,
    Decoder,
    byte_count,
    cannot_be_ndjson,
    coding_list,
    content_range,
    header,
    is_error_envelope,
    validator_of,
)
from orchestrator.retry import Budget, RetryPolicy
from orchestrator.transport import Transport, error_from

log = logging.getLogger("orchestrator.stream")

LENGTH_CHECKS = ("content-length", "content-range", "chunked", "encoding-end", "end-probe", "unverified")
"""How a stream knew it had every byte (see the module docstring)."""


class ContentChangedError(TransportError):
    """The file changed on the server under a resume: start again from byte 0."""


class UnexpectedContentError(TransportError):
    """A 2xx answer whose Content-Type cannot be NDJSON (an error page served as 200)."""


@dataclass
class _Answer:
    resp: aiohttp.ClientResponse | None  # None: a 416 confirming the end
    total: int | None = None
    head: bytes = b""  # the body's first bytes, read by _open


@dataclass
class _Body:
    """How to read one answer's body: bytes to skip, where it must end, how to inflate it."""

    skip: int = 0
    end: int | None = None  # absolute offset
    inflater: Decoder | None = None
    encoding: str = ""


_CUTS = (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, zlib.error)
"""A body that stopped short: resumed (``BodyCut`` is a ClientPayloadError)."""


async def _open(
    transport: Transport, path: str, params: dict[str, Any] | None, pos: int | None, validator: str | None
) -> _Answer:
    """Send a GET for the whole file (``pos`` None) or the bytes from ``pos`` (``If-Range:
    validator`` when given)."""
    headers: dict[str, str] | None = None
    if pos is not None:
        headers = {"Range": f"bytes={pos}-"}
        if validator:
            headers["If-Range"] = validator
    resp = await transport.send(
        "GET",
        path,
        params=params,
        headers=headers,
        raw=True,
        own_statuses=(416,) if pos is not None else (),
        error_bytes=1 << 16,
    )
    cut = transport.secret.cut
    if resp.status == 416:
        # Asked from exactly the end: nothing left, if the server's size is pos (the stream judges).
        unit, _, total_text = header(resp, "Content-Range").strip().partition(" */")
        resp.release()
        total = byte_count(total_text) if unit.lower() == "bytes" else None
        if total is not None:
            return _Answer(None, total)
        raise ApiError(416, f"cannot resume at byte {pos} (size unknown)", method="GET", path=path)
    problem = None
    transfer = header(resp, "Transfer-Encoding")
    content_type = header(resp, "Content-Type") or None
    if resp.status not in (200, 206):
        problem = f"HTTP {resp.status} where a file was asked for"  # 204, 3xx left unfollowed...: no file in it
    elif resp.status == 206 and pos is None:
        # RFC 9110 §15.3.7: a 206 answers a Range only. Unasked, its Content-Range is no proof
        # of the file's size (a cache serving a piece it holds): a server error, retried.
        problem = "HTTP 206 to a request without Range"
    elif [c for c in coding_list(transfer) if c != "identity"] not in ([], ["chunked"]):
        # aiohttp removes one chunked framing, nothing else: another transfer coding, or
        # chunked twice, would be saved as it came (compressed bytes or chunk sizes in the file).
        problem = f"unsupported Transfer-Encoding {cut(transfer, 80)!r}"
    elif cannot_be_ndjson(content_type):
        media = cut((content_type or "").partition(";")[0].strip(), 80)
        _refuse(transport, resp)
        raise UnexpectedContentError(f"GET {path}: HTTP {resp.status} with Content-Type {media}, not a result file")
    if problem is not None:
        _refuse(transport, resp)
        raise TransportError(f"GET {path}: {problem}")
    head = b""
    if not pos and resp.status == 200 and _is_json(content_type):
        # The API's JSON error envelope served with 200 where the file was asked for (from
        # byte 0: the whole file, or the check of an empty answer), gzipped or not, is an
        # error, retried like a 5xx, never a one-record result (a JSON body of another kind,
        # or longer than an envelope, is the file: its first bytes are passed on).
        try:
            with transport.errors(f"GET {path}"):  # a cut here is a failed open: asked again
                head, whole = await _first_bytes(resp, ENVELOPE_BYTES)
        except BaseException:
            resp.release()
            raise
        codings = [c for c in coding_list(header(resp, "Content-Encoding")) if c != "identity"]
        if whole and is_error_envelope(head, codings, ENVELOPE_BYTES):
            _refuse(transport, resp)
            error = str(error_from(200, head, "GET", path, None, transport.secret))
            raise UnexpectedContentError(f"{error}: the API's error envelope instead of the file")
    return _Answer(resp, head=head)


def _refuse(transport: Transport, resp: aiohttp.ClientResponse) -> None:
    """Release an answer the stream will not read, and keep its connection out of the pool."""
    transport.never_reuse(resp)
    resp.release()


ENVELOPE_BYTES = 1 << 16
"""A 200 JSON body up to this size is read whole, to tell the API's error envelope from a file."""


def _is_json(content_type: str | None) -> bool:
    return (content_type or "").partition(";")[0].strip().lower() == "application/json"


async def _first_bytes(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit + 1`` bytes of a body, and whether that is all of it (its end was reached)."""
    buf = bytearray()
    while len(buf) <= limit:
        data = await resp.content.read(limit + 1 - len(buf))
        if not data:
            return bytes(buf), True
        buf += data
    return bytes(buf), False


async def _chunks(resp: aiohttp.ClientResponse, head: bytes, size: int) -> AsyncGenerator[bytes, None]:
    if head:
        yield head
    async for raw in resp.content.iter_chunked(size):
        yield raw


class ResumableStream:
    """The bytes of a file from ``start``; see the module docstring. Async iterator."""

    def __init__(
        self,
        transport: Transport,
        policy: RetryPolicy,
        path: str,
        params: dict[str, Any] | None,
        start: int,
        chunk_bytes: int,
        budget: Budget | None = None,
        validator: str | None = None,
        on_validator: Callable[[str, int], None] | None = None,
        total: int | None = None,
    ) -> None:
        self.transport = transport
        self.policy = policy
        self.path = path
        self.params = params
        self.pos = start
        self.chunk_bytes = chunk_bytes
        self.length_check: str | None = None
        """Set once the stream is exhausted: one of :data:`LENGTH_CHECKS`."""
        self.validator = validator if start > 0 else None
        """The file's validator: given (a resume across runs) or the first answer's."""
        self._given = self.validator is not None  # the bytes before start are of this validator's content
        self._on_validator = on_validator
        self.total: int | None = total if self._given else None
        self.budget = budget or policy.budget(resumable=True)
        """The stream's one retry budget: opens and cuts alike (the caller's, when the stream
        is one part of its operation: a download restarted after a content change)."""
        self._answered = False  # without a given validator, a stream at start > 0 trusts its first answer
        self._probing = False  # the last body had no stated length, or none at all: is pos its end?
        self._ranges = True  # False after an encoded answer: ranges of it cannot be inflated
        self._empty_checked = False  # an empty answer is believed only once asked again
        self._failed_at = start  # the offset of the last failure: bytes beyond it are progress
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
        while True:
            # At byte 0 a Range is sent only to check an empty answer: "bytes=0-" gets a 416
            # "bytes */0" from a server whose file is really empty.
            range_from = self.pos if self._ranges and (self.pos > 0 or self._probing) else None
            answer = await self._open(range_from)
            if answer is None:
                return
            if answer.resp is None:
                if answer.total != self.pos:
                    # "Nothing after byte N" for N short of the bytes had: the file is not the
                    # one they came from (a changed file, a part file of another content).
                    raise self._changed(f"a 416 says the file has {answer.total} bytes, {self.pos} were had")
                if self.total is not None and answer.total != self.total:
                    # "Nothing after byte N" from a server that stated a larger size: a 416
                    # cannot shorten a file, a changed one can (start again, never end short).
                    raise self._changed(f"size {self.total} became {answer.total}")
                self.length_check = "end-probe" if self._probing else "content-range"
                return
            resp = answer.resp
            try:
                body = self._expect(resp)
                if body is None:
                    if self.length_check is not None:
                        return
                    continue
                async with contextlib.aclosing(self._read(resp, body, answer.head)) as chunks:
                    async for data in chunks:
                        yield data
            except _CUTS as exc:
                resp.release()  # before the wait, not after it
                await self._resume_after(exc)
                continue
            except (ApiError, TransportError):
                self.transport.never_reuse(resp)  # an answer refused: its connection too
                raise
            finally:
                resp.release()
            if self._ended(resp, body, range_from):
                return

    async def _open(self, range_from: int | None) -> _Answer | None:
        """The next answer, its opening retried within the stream's budget; None when the
        end of a body without a length could not be confirmed (``length_check`` says so)."""
        validator = self.validator if range_from is not None else None
        try:
            return await self.policy.call(
                functools.partial(_open, self.transport, self.path, self.params, range_from, validator),
                budget=self.budget,
                logger=log,
            )
        except (ApiError, TransportError) as exc:
            if not self._probing or isinstance(exc, AuthError):
                raise
            log.info(
                "could not confirm the end of a body without a length at byte %d (%s)",
                self.pos,
                self.transport.secret.scrub(str(exc)),
                extra={"event": "length_unverified", "offset": self.pos},
            )
            self.length_check = "unverified"
            return None

    async def _resume_after(self, exc: BaseException) -> None:
        """A cut: wait, within the budget, before asking for the rest; past it, raise ``exc``
        mapped (IncompleteBodyError for a body shorter than stated)."""
        if self.pos > self._failed_at:
            self.budget.progressed()
        self._failed_at = self.pos
        wait = self.budget.next_wait(exc)
        if wait is None:
            with self.transport.errors(f"GET {self.path}: body cut at byte {self.pos}, {self.budget.failures} tries"):
                raise exc
        log.info(
            "download cut at byte %d (%s): resuming in %.2fs",
            self.pos,
            self.transport.describe(exc),
            wait,
            extra={"event": "download_resume", "offset": self.pos},
        )
        await self.policy.sleep(wait)
        self._probing = False

    def _expect(self, resp: aiohttp.ClientResponse) -> _Body | None:
        """Check an answer's headers against what was asked and had: how to read its body, or
        None to ask again (a range of compressed bytes: the whole file instead)."""
        encoding = header(resp, "Content-Encoding")
        codings = [c for c in coding_list(encoding) if c != "identity"]
        if any(c not in INFLATED for c in codings):
            # br, zstd...: asked for identity (or gzip/deflate), never guessed at.
            raise TransportError(
                f"GET {self.path}: unsupported Content-Encoding {self.transport.secret.cut(encoding, 80)!r}"
            )
        body = _Body(inflater=Decoder(codings, self.chunk_bytes) if codings else None, encoding=encoding)
        if resp.status == 206:
            if body.inflater is not None:
                self._ranges = False
                return None
            body.end = self._expect_range(resp, validator_of(resp))
        elif not self._expect_whole(resp, body, validator_of(resp)):
            return None
        tell = None if self._answered or self._given else self._on_validator
        if tell is not None and self.validator is not None and self.total is not None:
            tell(self.validator, self.total)  # what a resume after a kill needs
        self._answered = True
        return body

    def _expect_range(self, resp: aiohttp.ClientResponse, tag: str | None) -> int:
        """A 206: where its body must end, once its range and validator are checked."""
        parsed = content_range(header(resp, "Content-Range"))
        if parsed is None or parsed[0] != self.pos:
            raise TransportError(
                f"GET {self.path}: asked for bytes from {self.pos}, got range "
                f"{self.transport.secret.cut(header(resp, 'Content-Range'), 80)!r}"
            )
        if self.validator and tag != self.validator:
            # If-Range was sent: a server that honours it and still has the same content
            # sends that validator back (RFC 9110 §15.3.7). A weak one, or none, proves nothing.
            raise self._changed(f"validator {self.validator} became {tag or 'none (or a weak one)'}")
        self._learned(tag)
        _, last, total = parsed
        if total is not None and self.total is not None and total != self.total:
            raise self._changed(f"size {self.total} became {total}")
        self.total = total if total is not None else self.total
        self._probing = False
        return last + 1

    def _expect_whole(self, resp: aiohttp.ClientResponse, body: _Body, tag: str | None) -> bool:
        """A 200, the whole file from byte 0: set what to skip and where it ends; False when it
        ends the stream (a probe the server cannot answer: ``length_check`` unverified)."""
        if self.pos > 0:
            same = self.validator is not None and tag == self.validator
            if self._probing and (same or self.validator is None or tag is None):
                # The server cannot answer a range here: the end stays unproven.
                self.length_check = "unverified"
                log.info(
                    "the server ignored the Range that checks the end of a body without a length "
                    "(byte %d): its length is unverified",
                    self.pos,
                    extra={"event": "length_unverified", "offset": self.pos},
                )
                return False
            if not same and (self._answered or self._given):
                raise self._changed(
                    f"HTTP 200 to a resume with If-Range {self.validator}, validator {tag}"
                    if self.validator
                    else "HTTP 200 to a resume, and no validator to prove the content is the same"
                )
            body.skip = self.pos  # same content, Range ignored: skip what we already have
        self._learned(tag)
        length = byte_count(resp.headers.get("Content-Length"))
        if body.inflater is None and length is not None:
            if self.total is not None and length != self.total:
                raise self._changed(f"size {self.total} became {length}")
            self.total = body.end = length
        return True

    def _learned(self, tag: str | None) -> None:
        """The first answer's validator (if any) guards every later range."""
        if self.validator is None and tag is not None:
            self.validator = tag

    async def _read(self, resp: aiohttp.ClientResponse, body: _Body, head: bytes) -> AsyncGenerator[bytes, None]:
        """The body's new bytes (``head``, its first ones read already, then the rest; inflated,
        what was had skipped); raises a cut when it ends before what its framing, its encoding
        or its stated length promised."""
        start_pos, skip, end, inflater = self.pos, body.skip, body.end, body.inflater
        async for raw in _chunks(resp, head, self.chunk_bytes):
            for data in inflater.feed(raw) if inflater is not None else (raw,):
                if skip:
                    if len(data) <= skip:
                        skip -= len(data)
                        continue
                    data, skip = data[skip:], 0
                if not data:
                    continue
                if end is not None and self.pos + len(data) > end:
                    raise TransportError(f"GET {self.path}: more bytes than the {end - start_pos} stated")
                self.pos += len(data)
                yield data
        if inflater is not None and not inflater.eof:
            raise BodyCut(f"{body.encoding} stream cut before its end")
        if skip:
            raise BodyCut("body ended before the bytes already had")
        if end is not None and self.pos < end:
            raise BodyCut(f"body ended at byte {self.pos} of {end}")

    def _ended(self, resp: aiohttp.ClientResponse, body: _Body, range_from: int | None) -> bool:
        """The body ended as its framing says: is it the whole file? (Sets ``length_check``.)"""
        if self.pos > self._failed_at:
            self.budget.progressed()
            self._failed_at = self.pos
        if self.pos == 0 and self._ranges and not self._empty_checked:
            # Nothing at all, even with "Content-Length: 0": a proxy's empty 200 looks just
            # like an empty result. Asked again with "Range: bytes=0-", a server whose file is
            # empty answers 416 "bytes */0" (or empty again); one with bytes sends them, and
            # its other size restarts the download (ContentChangedError).
            self._empty_checked = self._probing = True
            return False
        if self.total is not None:
            if self.pos < self.total:
                return False  # a 206 shorter than the file: ask for the rest
            self.length_check = "content-range" if resp.status == 206 else "content-length"
            return True
        if resp.status == 200:
            if "chunked" in coding_list(header(resp, "Transfer-Encoding")):
                self.length_check = "chunked"
                return True
            if body.inflater is not None:  # its end was checked by _read
                self.length_check = "content-length" if "Content-Length" in resp.headers else "encoding-end"
                return True
            if range_from is not None:
                # A 200 without a length to a Range (the check of an empty answer, or a
                # resume): this server cannot answer the probe either.
                self.length_check = "unverified"
                log.info(
                    "the server ignores Range and states no length: the length of the body (%d bytes) is unverified",
                    self.pos,
                    extra={"event": "length_unverified", "offset": self.pos},
                )
                return True
        self._probing = True  # no length stated (or a 206 of unknown total): ask for the byte after the end
        return False


__all__ = [
    "LENGTH_CHECKS",
    "ContentChangedError",
    "ResumableStream",
    "UnexpectedContentError",
]
