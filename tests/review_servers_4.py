"""A hostile server whose second answer to one request comes late: after the client's next request.

:mod:`review_servers_2`'s :class:`~review_servers_2.Trailing` writes its extra answer a fixed
time after the first, while the connection is idle in the client's pool (where
``framing.CleanConnector`` sees it and closes the connection). A proxy that answers one
request twice may just as well be slower than the client's retry: the stray answer then comes
*after* the next request was sent on the kept-alive connection, and is read as its answer.
:class:`Late` is a :class:`hostile.Wire` whose extra bytes (``then``) are written once the next
request has arrived on the same connection, before that request's own answer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from hostile import HostileServer, HostileThread, Wire


@dataclass
class Late(Wire):
    """An answer followed, once the next request has come on the same connection, by the raw bytes ``then``."""

    then: bytes = b""


class LateServer(HostileServer):
    """:class:`hostile.HostileServer` that writes a :class:`Late` answer's extra bytes before the next answer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._late: dict[asyncio.StreamWriter, bytes] = {}  # per connection: the second answer still owed

    async def _before_answer(self, writer: asyncio.StreamWriter) -> None:
        pending = self._late.pop(writer, b"")
        if pending:
            writer.write(pending)  # the late second answer to the previous request
            await writer.drain()

    async def _after_answer(self, writer: asyncio.StreamWriter, wire: Wire) -> None:
        if isinstance(wire, Late):
            self._late[writer] = wire.then


class LateThread(HostileThread):
    """:class:`hostile.HostileThread` serving through a :class:`LateServer`."""

    def make_server(self) -> HostileServer:
        return LateServer(self.upstream, self.handler)


__all__ = ["Late", "LateServer", "LateThread"]
