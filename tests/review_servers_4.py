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
import contextlib
from dataclasses import dataclass

from hostile import HostileServer, HostileThread, Request, Wire, _read_request, _write, json_wire


@dataclass
class Late(Wire):
    """An answer followed, once the next request has come on the same connection, by the raw bytes ``then``."""

    then: bytes = b""


class LateServer(HostileServer):
    """:class:`hostile.HostileServer` that writes a :class:`Late` answer's extra bytes before the next answer."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        pending = b""
        try:
            while True:
                req = await _read_request(reader)
                if req is None:
                    return
                self.requests.append(req)
                if pending:
                    writer.write(pending)  # the late second answer to the previous request
                    await writer.drain()
                    pending = b""
                wire = await self._answer(req)
                if not await _write(writer, wire):
                    return
                if isinstance(wire, Late):
                    pending = wire.then
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(self, req: Request) -> Wire:
        try:
            return await self.handler(req, lambda req=req: self._forward(req))  # type: ignore[misc]
        except Exception as exc:
            self.errors.append(exc)
            return json_wire(500, {"status": "error", "error": f"hostile handler failed: {exc!r}"})


class LateThread(HostileThread):
    """:class:`hostile.HostileThread` serving through a :class:`LateServer`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.server = LateServer(self.upstream, self.handler)


__all__ = ["Late", "LateServer", "LateThread"]
