"""A hostile server that writes more after an answer, on the same kept-alive connection.

:mod:`hostile` writes each answer in one go. A proxy that sends a body longer than its
Content-Length (or a second answer to one request) puts the extra bytes on the connection
*after* the answer the client has already read and released: they wait there for the next
request. :class:`Trailing` is a :class:`hostile.Wire` with such extra bytes (``then``,
written ``after_s`` later); :class:`TrailingThread` is a :class:`hostile.HostileThread`
whose server writes them.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from hostile import HostileServer, HostileThread, Wire, _read_request, _write, json_wire


@dataclass
class Trailing(Wire):
    """An answer followed, ``after_s`` later on the same kept-alive connection, by the raw bytes ``then``."""

    then: bytes = b""
    after_s: float = 0.03


class TrailingServer(HostileServer):
    """:class:`hostile.HostileServer` that writes a :class:`Trailing` answer's extra bytes."""

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
                try:
                    wire = await self.handler(req, lambda req=req: self._forward(req))  # type: ignore[misc]
                except Exception as exc:
                    self.errors.append(exc)
                    wire = json_wire(500, {"status": "error", "error": f"hostile handler failed: {exc!r}"})
                if not await _write(writer, wire):
                    return
                if isinstance(wire, Trailing):
                    await asyncio.sleep(wire.after_s)  # the client has read and released the answer by now
                    writer.write(wire.then)
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()


class TrailingThread(HostileThread):
    """:class:`hostile.HostileThread` serving through a :class:`TrailingServer`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.server = TrailingServer(self.upstream, self.handler)


def raw_answer(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """A whole HTTP/1.1 answer as bytes on the wire, with its Content-Length."""
    head = [f"HTTP/1.1 {status} X", *(f"{k}: {v}" for k, v in headers), f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


__all__ = ["Trailing", "TrailingServer", "TrailingThread", "raw_answer"]
