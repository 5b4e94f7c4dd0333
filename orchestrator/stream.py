"""Resumable, byte-exact streaming of a result file over HTTP.

The download's side of the client: :func:`resumable_stream` yields the bytes of a file
from an offset, reopening the request with ``Range`` after a cut, and never yields a
byte twice or skips one.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio

from orchestrator.api import _describe, _error_from, _parse_retry_after
from orchestrator.errors import ApiError, ConnectError, IncompleteBodyError, TransportError

if TYPE_CHECKING:
    from orchestrator.api import ApiClient

log = logging.getLogger("orchestrator.stream")


async def _open(
    api: ApiClient, path: str, params: dict[str, Any] | None, pos: int
) -> tuple[aiohttp.ClientResponse, int, bool]:
    """Send a GET for the bytes from ``pos``: (response, bytes to skip, at end)."""
    headers = {"Range": f"bytes={pos}-"} if pos else None
    async with api.throttle.slot():
        try:
            resp = await api.session.get(api.base_url + path, params=params, headers=headers)
        except aiohttp.ClientConnectorError as exc:
            raise ConnectError(f"GET {path}: {_describe(exc)}") from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TransportError(f"GET {path}: {_describe(exc)}") from None
    if resp.status == 429:
        api.throttle.on_throttled(_parse_retry_after(resp.headers.get("Retry-After")))
    if resp.status == 416 and pos:
        # Asked from exactly the end: nothing left, if the server agrees on the size.
        total = resp.headers.get("Content-Range", "").rpartition("/")[2]
        resp.release()
        if total.isdigit() and int(total) == pos:
            return resp, 0, True
        raise ApiError(
            416,
            f"cannot resume at byte {pos} (size {total or 'unknown'})",
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
    api.throttle.on_success()
    if resp.status == 206:
        served_from = resp.headers.get("Content-Range", "").removeprefix("bytes ").partition("-")[0]
        if served_from != str(pos):
            resp.release()
            raise TransportError(f"GET {path}: asked for bytes from {pos}, got range {served_from!r}")
        return resp, 0, False
    return resp, pos, False  # 200: the whole file again; skip what we already have


async def resumable_stream(
    api: ApiClient, path: str, params: dict[str, Any] | None, start: int, chunk_bytes: int
) -> AsyncIterator[bytes]:
    pos = start
    failures = total_failures = 0
    while True:
        resp, skip, at_end = await api._retrying(functools.partial(_open, api, path, params, pos))
        if at_end:
            return
        progressed = False
        try:
            async for chunk in resp.content.iter_chunked(chunk_bytes):
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk, skip = chunk[skip:], 0
                pos += len(chunk)
                progressed = True
                yield chunk
            return
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            failures = 1 if progressed else failures + 1
            total_failures += 1
            if failures >= api.retry.max_tries or total_failures >= 10 * api.retry.max_tries:
                kind = IncompleteBodyError if isinstance(exc, aiohttp.ClientPayloadError) else TransportError
                raise kind(f"GET {path}: body cut at byte {pos}, {failures} tries: {_describe(exc)}") from None
            wait = random.uniform(0, min(api.retry.max_wait_s, api.retry.base_s * 2**failures))
            log.info(
                "download cut at byte %d (%s): resuming in %.2fs",
                pos,
                _describe(exc),
                wait,
                extra={"event": "download_resume", "offset": pos},
            )
            await anyio.sleep(wait)
        finally:
            resp.release()


__all__ = ["resumable_stream"]
