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
from dataclasses import dataclass

from hostile import HostileServer, HostileThread, Wire


@dataclass
class Trailing(Wire):
    """An answer followed, ``after_s`` later on the same kept-alive connection, by the raw bytes ``then``."""

    then: bytes = b""
    after_s: float = 0.03


class TrailingServer(HostileServer):
    """:class:`hostile.HostileServer` that writes a :class:`Trailing` answer's extra bytes."""

    async def _after_answer(self, writer: asyncio.StreamWriter, wire: Wire) -> None:
        if isinstance(wire, Trailing):
            await asyncio.sleep(wire.after_s)  # the client has read and released the answer by now
            writer.write(wire.then)
            await writer.drain()


class TrailingThread(HostileThread):
    """:class:`hostile.HostileThread` serving through a :class:`TrailingServer`."""

    def make_server(self) -> HostileServer:
        return TrailingServer(self.upstream, self.handler)


def raw_answer(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """A whole HTTP/1.1 answer as bytes on the wire, with its Content-Length."""
    head = [f"HTTP/1.1 {status} X", *(f"{k}: {v}" for k, v in headers), f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


__all__ = ["Trailing", "TrailingServer", "TrailingThread", "raw_answer"]
