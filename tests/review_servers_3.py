"""A scriptable proxy in front of moto (S3) for the third adversarial review.

The bucket attacks need to stop, refuse or hold one request of obstore's conversation with
the store (the manifest's PUT, a multipart upload's completion or abort) while the rest goes
through. :class:`S3Proxy` is a :class:`hostile.HostileServer` whose forward keeps the
request's ``Host`` header (the SigV4 signature covers it, and moto checks signatures), and
whose answers keep a HEAD's ``Content-Length`` (the object's size, not the empty body's).

A test passes ``rule(req) -> Wire | None | Awaitable[...]``: a Wire answers the request
itself (a refusal), None forwards it to moto. :class:`Gate` holds matching requests until
the test opens it, and says when the first one arrived.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import yarl
from hostile import HostileServer, HostileThread, Reply, Request, Wire

Rule = Callable[[Request], Awaitable[Wire | None]]


async def forward_all(req: Request) -> Wire | None:
    """The default rule: everything goes to moto."""
    return None


def is_manifest_put(req: Request) -> bool:
    """A whole-object PUT of a run's manifest.json."""
    return req.method == "PUT" and req.path.endswith("/manifest.json")


def is_lock_put(req: Request) -> bool:
    """A PUT of the prefix's lock (taking or renewing it)."""
    return req.method == "PUT" and req.path.endswith("/.lock")


def is_complete(req: Request) -> bool:
    """CompleteMultipartUpload: ``POST KEY?uploadId=...``."""
    return req.method == "POST" and "uploadId=" in req.target


def is_abort(req: Request) -> bool:
    """AbortMultipartUpload: ``DELETE KEY?uploadId=...``."""
    return req.method == "DELETE" and "uploadId=" in req.target


def s3_error(status: int, code: str) -> Wire:
    """An S3 error answer, as AWS writes it."""
    body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>m</Message></Error>'
    return Wire(status, [("Content-Type", "application/xml")], body.encode())


class Gate:
    """Holds the requests ``matches`` accepts until :meth:`open`; :attr:`arrived` is set at the first."""

    def __init__(self, matches: Callable[[Request], bool]) -> None:
        self.matches = matches
        self.arrived = threading.Event()
        self.held: list[Request] = []
        self._open = threading.Event()

        self._drop = False

    def open(self, drop: bool = False) -> None:
        """Let the held requests (and later ones) through; with ``drop``, they never reach moto
        (answered 503, as to a client that is gone)."""
        self._drop = drop
        self._open.set()

    async def __call__(self, req: Request) -> Wire | None:
        if self.matches(req) and not self._open.is_set():
            self.held.append(req)
            self.arrived.set()
            while not self._open.is_set():
                await asyncio.sleep(0.005)
            if self._drop:
                return s3_error(503, "SlowDown")
        return None


class S3Proxy(HostileServer):
    """moto behind a proxy that forwards signed requests intact, through ``rule``."""

    def __init__(self, upstream: str, rule: Rule = forward_all) -> None:
        self.rule = rule
        super().__init__(upstream, self._answer)

    async def _answer(self, req: Request, forward: Callable[[], Awaitable[Reply]]) -> Wire:
        made = await self.rule(req)
        if made is not None:
            return made
        reply = await forward()
        wire = reply.wire()
        if req.method == "HEAD":
            # The HEAD's length is the object's: written by hand, as a body-less answer.
            head = [f"HTTP/1.1 {reply.status} X"]
            head += [f"{k}: {v}" for k, v in reply.headers if k.lower() not in ("connection", "transfer-encoding")]
            return Wire(reply.status, [], raw=("\r\n".join(head) + "\r\n\r\n").encode("latin-1"), raw_keep_open=True)
        return wire

    async def _forward(self, req: Request) -> Reply:
        assert self._session is not None
        headers = {k: v for k, v in req.headers.items() if k not in ("content-length", "connection")}
        async with self._session.request(
            req.method,
            yarl.URL(self.upstream + req.target, encoded=True),  # the signed query, not re-encoded
            headers=headers,
            data=req.body if req.body else None,
            allow_redirects=False,
            skip_auto_headers=("Content-Type", "User-Agent", "Accept-Encoding", "Accept"),
        ) as resp:
            body = await resp.read()
            return Reply(resp.status, list(resp.headers.items()), body)


class S3ProxyThread(HostileThread):
    """An :class:`S3Proxy` on its own thread and loop; a context manager with ``url``."""

    def __init__(self, upstream: str, rule: Rule = forward_all) -> None:
        self.rule = rule
        super().__init__(upstream)

    def make_server(self) -> HostileServer:
        return S3Proxy(self.upstream, self.rule)


__all__ = [
    "Gate",
    "S3Proxy",
    "S3ProxyThread",
    "forward_all",
    "is_abort",
    "is_complete",
    "is_lock_put",
    "is_manifest_put",
    "s3_error",
]
