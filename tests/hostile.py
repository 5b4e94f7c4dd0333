"""A hostile HTTP server for tests: the simulator behind a proxy that misbehaves on demand.

The well-behaved simulator proves little about a client's defences. This proxy sits in
front of it on loopback and answers at the level of raw bytes on the socket, so a test
can break anything a real proxy, gateway or flaky network breaks: framing (no length and
a cut at a line end, a lying Content-Length, a chunked body without its terminator, a
gzip body without its trailer, a connection reset), status and content type (an HTML
page with status 200), ranges (a 206 shorter than asked), JSON (loose typing, missing
ids, pages that never advance), timing (a body trickling at a few bytes a second), and
echoes of the request's headers.

A test passes a *handler*: ``async def handler(req, forward) -> Wire``. ``forward()``
sends the request on to the simulator and returns its answer as a :class:`Reply`;
the handler returns the :class:`Wire` to write back, usually the reply changed a little
(:meth:`Reply.wire`). Every request seen is kept in :attr:`HostileServer.requests`.

Runs on its own thread and event loop (:class:`HostileThread`), so that the CLI in a
subprocess or an in-process run can talk to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import parse_qs, urlsplit

import aiohttp
import orjson
from support import TOKEN

from orchestrator.simulator import ExportSpec, SimulatorConfig, SimulatorThread

Framing = Literal["length", "chunked", "close"]


@dataclass
class Request:
    """One request as the hostile server read it off the socket."""

    method: str
    target: str  # path and query, as sent
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.target).query).items()}

    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None


@dataclass
class Wire:
    """What to write back, byte for byte.

    ``framing``: ``length`` (Content-Length), ``chunked``, or ``close`` (no length: the
    body ends when the connection closes). ``stated_length`` lies about Content-Length
    when set. ``cut_at``: stop after that many body bytes and close (``reset``: with a
    TCP RST). ``trickle_bps``: send the body this slowly. ``omit_terminator``: a chunked
    body without its last zero-size chunk.
    """

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    framing: Framing = "length"
    stated_length: int | None = None
    cut_at: int | None = None
    reset: bool = False
    trickle_bps: float | None = None
    omit_terminator: bool = False
    raw: bytes | None = None
    """When set: written as is, instead of a head and body built from the fields above (a
    framing no field can express: two Content-Lengths, chunk extensions, a bad chunk size)."""
    raw_keep_open: bool = False
    """With ``raw``: leave the connection open afterwards, as if the answer were complete
    (a body that stalls short of its length); otherwise it is closed."""

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def with_header(self, name: str, value: str | None) -> Wire:
        """A copy with header ``name`` set to ``value`` (removed when None)."""
        headers = [(k, v) for k, v in self.headers if k.lower() != name.lower()]
        if value is not None:
            headers.append((name, value))
        return replace(self, headers=headers)


_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}


@dataclass
class Reply:
    """The simulator's answer to a forwarded request (body whole, never decompressed)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return orjson.loads(self.body)

    def wire(self, **changes: Any) -> Wire:
        """The reply as it would be sent, with ``changes`` to the :class:`Wire` fields."""
        headers = [(k, v) for k, v in self.headers if k.lower() not in _HOP]
        return replace(Wire(self.status, headers, self.body), **changes)

    def with_json(self, doc: Any, **changes: Any) -> Wire:
        """The reply with its body replaced by ``doc`` as JSON."""
        return self.wire(body=orjson.dumps(doc), **changes)


Forward = Callable[[], Awaitable[Reply]]
Handler = Callable[[Request, Forward], Awaitable[Wire]]


async def passthrough(req: Request, forward: Forward) -> Wire:
    """The default handler: the simulator's answer, unchanged."""
    return (await forward()).wire()


def json_wire(status: int, doc: Any, **changes: Any) -> Wire:
    """A JSON answer made up by the test."""
    return Wire(status, [("Content-Type", "application/json")], orjson.dumps(doc), **changes)


def html_wire(status: int = 200, text: str = "<html><body><h1>502 Bad Gateway</h1></body></html>") -> Wire:
    """An HTML page, as a proxy sends when the upstream fails."""
    return Wire(status, [("Content-Type", "text/html; charset=utf-8")], text.encode())


def gzip_without_trailer(data: bytes) -> bytes:
    """``data`` gzipped, minus the 8-byte trailer (CRC32 and size) and the final block's end."""
    whole = gzip.compress(data)
    return whole[: len(whole) // 2]


def is_download(req: Request) -> bool:
    """A request for an execution's result file (either endpoint)."""
    return "/files/technical_name=" in req.path or (
        req.path == "/v1/data_file/data" and req.query.get("uri", "").endswith("export.data")
    )


def is_error_file(req: Request) -> bool:
    """A request for a FAILED execution's error file."""
    return req.path == "/v1/data_file/data" and req.query.get("uri", "").endswith("export.error")


def is_create(req: Request) -> bool:
    """A request that creates an execution."""
    return req.method == "POST" and req.path.endswith("/executions")


def is_executions_list(req: Request) -> bool:
    """A request that lists an export's executions."""
    return req.method == "GET" and req.path.endswith("/executions")


class HostileServer:
    """A raw HTTP/1.1 server on loopback that forwards to ``upstream`` through ``handler``."""

    def __init__(self, upstream: str, handler: Handler = passthrough) -> None:
        self.upstream = upstream.rstrip("/")
        self.handler = handler
        self.requests: list[Request] = []
        self.errors: list[BaseException] = []
        self._server: asyncio.Server | None = None
        self._session: aiohttp.ClientSession | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            # A handler may still be waiting (a hang, a trickle): end it here, not as a
            # "Task was destroyed but it is pending" when the thread's loop closes.
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, req: Request) -> Reply:
        assert self._session is not None
        headers = {k: v for k, v in req.headers.items() if k not in ("host", "content-length", "connection")}
        async with self._session.request(
            req.method, self.upstream + req.target, headers=headers, data=req.body or None, allow_redirects=False
        ) as resp:
            body = await resp.read()
            return Reply(resp.status, list(resp.headers.items()), body)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        try:
            while True:
                req = await _read_request(reader)
                if req is None:
                    return
                self.requests.append(req)
                await self._before_answer(writer)
                try:
                    wire = await self.handler(req, lambda req=req: self._forward(req))  # type: ignore[misc]
                except Exception as exc:  # a broken test handler: say so in the test, not silently
                    self.errors.append(exc)
                    wire = json_wire(500, {"status": "error", "error": f"hostile handler failed: {exc!r}"})
                keep = await _write(writer, wire)
                if not keep:
                    return
                await self._after_answer(writer, wire)
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _before_answer(self, writer: asyncio.StreamWriter) -> None:
        """A request has come on this connection, before its answer (a hook: nothing here)."""

    async def _after_answer(self, writer: asyncio.StreamWriter, wire: Wire) -> None:
        """``wire`` was written and the connection stays open (a hook: nothing here)."""

    def count(self, predicate: Callable[[Request], bool]) -> int:
        """How many requests seen so far match ``predicate``."""
        return sum(1 for r in self.requests if predicate(r))


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += data[:-2]
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    return Request(method, target, headers, body)


async def _write(writer: asyncio.StreamWriter, wire: Wire) -> bool:
    """Write ``wire``; True when the connection may serve another request."""
    if wire.raw is not None:
        writer.write(wire.raw)
        await writer.drain()
        if wire.raw_keep_open:
            return True
        writer.close()
        return False
    try:
        reason = HTTPStatus(wire.status).phrase
    except ValueError:
        reason = "Whatever"
    head = [f"HTTP/1.1 {wire.status} {reason}"]
    head += [f"{k}: {v}" for k, v in wire.headers if k.lower() not in ("content-length", "transfer-encoding")]
    if wire.framing == "length":
        head.append(f"Content-Length: {wire.stated_length if wire.stated_length is not None else len(wire.body)}")
    elif wire.framing == "chunked":
        head.append("Transfer-Encoding: chunked")
    if wire.framing == "close" or wire.cut_at is not None:
        head.append("Connection: close")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    body = wire.body if wire.cut_at is None else wire.body[: wire.cut_at]
    step = 64 << 10
    if wire.trickle_bps:
        step = max(1, int(wire.trickle_bps // 10))
    for i in range(0, len(body), step):
        piece = body[i : i + step]
        if wire.framing == "chunked":
            piece = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        writer.write(piece)
        await writer.drain()
        if wire.trickle_bps:
            await asyncio.sleep(len(body[i : i + step]) / wire.trickle_bps)
    if wire.cut_at is not None:
        await writer.drain()
        if wire.reset:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()
        return False
    if wire.framing == "chunked" and not wire.omit_terminator:
        writer.write(b"0\r\n\r\n")
    await writer.drain()
    if wire.framing == "close" or wire.omit_terminator:
        writer.close()
        return False
    if wire.framing == "length" and wire.stated_length is not None and wire.stated_length != len(wire.body):
        writer.close()  # a lying length: the connection cannot carry another answer
        return False
    return True


@dataclass
class HostileThread:
    """A :class:`HostileServer` on its own thread and event loop; a context manager."""

    upstream: str
    handler: Handler = passthrough
    server: HostileServer = field(init=False)

    def __post_init__(self) -> None:
        self.server = self.make_server()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hostile", daemon=True)

    def make_server(self) -> HostileServer:
        """The server this thread runs (a subclass may serve another kind)."""
        return HostileServer(self.upstream, self.handler)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def requests(self) -> list[Request]:
        return self.server.requests

    def count(self, predicate: Callable[[Request], bool]) -> int:
        return self.server.count(predicate)

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        if self.server.errors and et is None:
            raise AssertionError(f"the hostile handler failed: {self.server.errors[0]!r}")


def small_spec(export_id: str, **kw: Any) -> ExportSpec:
    """An export whose executions last milliseconds and whose 20 kB file is seeded by its id."""
    values: dict[str, Any] = {"size_bytes": 20_000, "pending_s": 0.01, "running_s": 0.02, "seed": int(export_id)}
    values.update(kw)
    return ExportSpec(export_id, **values)


@contextlib.contextmanager
def scene(handler: Handler, *specs: ExportSpec, token: str = TOKEN) -> Iterator[tuple[SimulatorThread, HostileThread]]:
    """A simulator serving ``specs`` (accepting ``token``) behind a hostile proxy answering through ``handler``."""
    with (
        SimulatorThread(SimulatorConfig(token=token, exports=specs)) as sim,
        HostileThread(sim.url, handler) as proxy,
    ):
        yield sim, proxy


__all__ = [
    "Forward",
    "Handler",
    "HostileServer",
    "HostileThread",
    "Reply",
    "Request",
    "Wire",
    "gzip_without_trailer",
    "html_wire",
    "is_create",
    "is_download",
    "is_error_file",
    "is_executions_list",
    "json_wire",
    "passthrough",
    "scene",
    "small_spec",
]
