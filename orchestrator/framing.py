"""What the headers and the framing of a file answer mean, and inflating its body.

The pieces :class:`~orchestrator.stream.ResumableStream` reads an answer with: its strong
validator, its ``Content-Range``, header lines joined as lists, whether a Content-Type can
hold NDJSON, and gzip / deflate decoding that knows whether the compressed stream reached
its end (aiohttp does not notice a gzip body cut before its trailer); and a connection pool
that never hands out a kept-alive connection holding an answer nobody asked for.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson


class BodyCut(aiohttp.ClientPayloadError):
    """A body that ended before a length it stated (aiohttp raises nothing for this kind):
    a payload error, so that the one error mapping makes it an IncompleteBodyError."""


_NOT_NDJSON_MAJOR = frozenset({"image", "audio", "video", "font", "model", "multipart", "message"})
_NOT_NDJSON = frozenset({"application/pdf", "application/javascript", "text/css", "text/javascript"})
INFLATED = frozenset({"gzip", "x-gzip", "deflate"})


def cannot_be_ndjson(content_type: str | None) -> bool:
    """True for media types that cannot hold NDJSON (HTML, XML, images...); missing is fine."""
    media = (content_type or "").partition(";")[0].strip().lower()
    if not media:
        return False
    major, _, sub = media.partition("/")
    return major in _NOT_NDJSON_MAJOR or "html" in sub or "xml" in sub or media in _NOT_NDJSON


class CleanConnector(aiohttp.TCPConnector):
    """A TCPConnector that closes, instead of reusing, a pooled connection on which bytes came
    while it was idle (a proxy answering one request twice, garbage after a length).

    aiohttp parses what an idle connection receives and hands it to the next request sent on
    it as that request's answer: a stray 200 would become a file. Such a connection says
    ``should_close`` (buffered input), as does one the transport marked after an error answer
    (a second answer may still be on its way); aiohttp's own pool checks only that it is connected.
    """

    async def _get(self, key: Any, traces: Any) -> Any:  # aiohttp >= 3.10: a Connection or None
        while True:
            conn = await super()._get(key, traces)
            if conn is None or conn.protocol is None or not conn.protocol.should_close:
                return conn
            conn.close()  # never read: the next pooled one, or a new connection


def validator_of(resp: aiohttp.ClientResponse) -> str | None:
    """The answer's strong validator: its ETag unless weak, else Last-Modified."""
    etag = resp.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return resp.headers.get("Last-Modified") or None


_BYTE_COUNT = re.compile(r"[0-9]{1,19}")
"""A byte count as HTTP writes one: ASCII digits only (``str.isdigit`` also takes "²", which
``int`` refuses), and at most 19 of them (no file is 10**19 bytes; ``int`` refuses 4,300)."""


def byte_count(text: str | None) -> int | None:
    """A header's byte count (Content-Length, a Content-Range bound), or None unless it is one."""
    return int(text) if text is not None and _BYTE_COUNT.fullmatch(text) else None


def content_range(value: str) -> tuple[int, int, int | None] | None:
    """``bytes a-b/total`` → (a, b, total or None for ``*``); None when malformed."""
    unit, _, spec = value.strip().partition(" ")
    span, _, total_text = spec.partition("/")
    first, _, last = span.partition("-")
    a, b, total = byte_count(first), byte_count(last), byte_count(total_text)
    if unit.lower() != "bytes" or a is None or b is None or b < a:
        return None
    if total is None:
        return (a, b, None) if total_text == "*" else None
    return (a, b, total) if b < total else None


def header(resp: aiohttp.ClientResponse, name: str) -> str:
    """Every value of header ``name``, joined as one list: a second ``Content-Encoding: gzip``
    line means gzip twice, and two ``Content-Range`` lines are no range at all."""
    return ", ".join(resp.headers.getall(name, ()))


def coding_list(value: str) -> list[str]:
    """A coding list (``gzip, chunked``) in order, lower case, without empty items."""
    return [c.strip().lower() for c in value.split(",") if c.strip()]


class Inflater:
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
            raise BodyCut("data after the end of the compressed stream")
        yield self._z.decompress(data, self.limit)
        while self._z.unconsumed_tail:
            yield self._z.decompress(self._z.unconsumed_tail, self.limit)
        if self._z.unused_data:
            raise BodyCut("data after the end of the compressed stream")

    @property
    def eof(self) -> bool:
        return self._z is not None and bool(self._z.eof)


class Decoder:
    """A Content-Encoding's codings (``gzip, gzip`` is gzip applied twice) undone in reverse."""

    def __init__(self, codings: list[str], limit: int) -> None:
        self.layers = [Inflater(c, limit) for c in reversed(codings)]

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


_ENVELOPE_KEYS = frozenset({"status", "error", "error_id", "error_code"})


def is_error_envelope(body: bytes, codings: list[str], limit: int) -> bool:
    """Whether a whole body, once its ``codings`` are undone (at most ``limit`` bytes of it), is
    the API's JSON error envelope (``{"status": "error", "error": ...}``), which the API may
    serve where a file was asked for (NOTES.md: errors on a download endpoint)."""
    if codings:
        if any(c not in INFLATED for c in codings):
            return False
        decoder, out = Decoder(codings, limit + 1), bytearray()
        try:
            for piece in decoder.feed(body):
                out += piece
                if len(out) > limit:
                    return False
        except (zlib.error, BodyCut):
            return False  # not a whole compressed body: the stream's own decoder says so
        if not decoder.eof:
            return False
        body = bytes(out)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    # The envelope's keys and no other (NOTES.md): a one-record result that merely has a
    # "status": "error" and an "error" among other keys is data.
    return isinstance(doc, dict) and doc.get("status") == "error" and "error" in doc and doc.keys() <= _ENVELOPE_KEYS


__all__ = [
    "INFLATED",
    "BodyCut",
    "CleanConnector",
    "Decoder",
    "Inflater",
    "byte_count",
    "cannot_be_ndjson",
    "coding_list",
    "content_range",
    "header",
    "is_error_envelope",
    "validator_of",
]
