"""The simulated API's result and error files: ranges, validators, and the faults of a download.

A result is served whole (200) or from an offset (206, ``Range: bytes=N-``) when ``If-Range``
(if sent) still matches the ETag or Last-Modified. Faults cut the body at an absolute
offset (a clean close or a TCP reset) for the first K downloads, or slow it down.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from email.utils import formatdate

from aiohttp import web

from orchestrator.simulator.data import ResultFile
from orchestrator.simulator.responses import error
from orchestrator.simulator.state import SimExecution, SimState

_RANGE = re.compile(r"^bytes=(\d+)-$")


def hard_reset(transport: asyncio.Transport) -> None:
    """Close with a TCP RST, like a crashed proxy: SO_LINGER 0 drops unsent bytes too."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def serve_result(state: SimState, request: web.Request, exe: SimExecution) -> web.StreamResponse:
    """A SUCCEEDED execution's result file, from the offset a valid Range asks for."""
    if state.status_of(exe)["status"] != "SUCCEEDED":
        raise web.HTTPNotFound()
    result = exe.export.result()
    total = result.size
    end_ms = exe.creation_date + int(state.status_of(exe).get("duration") or 0)
    last_modified = formatdate(end_ms / 1000, usegmt=True)
    start = 0
    match = _RANGE.match(request.headers.get("Range", ""))
    if_range = request.headers.get("If-Range")
    # RFC 9110 §13.1.5: a Range is honoured only if If-Range (when sent) still matches,
    # by strong comparison of the ETag or an exact Last-Modified; else the whole file.
    ranged = (
        match is not None and not state.config.faults.ignore_range and if_range in (None, result.etag, last_modified)
    )
    if match and ranged:
        start = int(match.group(1))
        if start >= total:
            # RFC 9110 §14.4: a range starting at or past the end is unsatisfiable; the
            # 416 says the size, so a client that already has every byte knows it.
            return error(state, 416, "Requested Range Not Satisfiable", {"Content-Range": f"bytes */{total}"})
        state.stats.range_starts.append((exe.id, start))
    resp = web.StreamResponse(status=206 if ranged else 200)
    resp.content_type = "application/x-ndjson"
    resp.content_length = total - start
    if resp.status == 206:
        resp.headers["Content-Range"] = f"bytes {start}-{total - 1}/{total}"
    resp.headers["ETag"] = result.etag
    resp.headers["Last-Modified"] = last_modified
    resp.headers["Accept-Ranges"] = "bytes"
    state.downloads[exe.id] += 1
    state.stats.downloads_started[exe.id] += 1
    await resp.prepare(request)
    if await _send_body(state, request, resp, exe, result, start):
        await resp.write_eof()
        state.stats.downloads_completed[exe.id] += 1
        state.finish(exe)
    return resp


async def _send_body(
    state: SimState, request: web.Request, resp: web.StreamResponse, exe: SimExecution, result: ResultFile, start: int
) -> bool:
    """Write the body from ``start``; False when a fault cut it (the connection is gone then)."""
    faults = state.config.faults
    # The cut is at an absolute offset of the file: a resumed download that starts at
    # or past it is cut at once, like a server that always dies at the same byte.
    cut = (
        max(0, faults.reset_after_bytes - start)
        if faults.reset_after_bytes is not None and state.downloads[exe.id] <= faults.reset_first_k
        else None
    )
    sent = 0
    for view in result.iter_chunks(start, state.config.chunk_bytes):
        if cut is not None and sent + len(view) >= cut:
            await resp.write(view[: max(0, cut - sent)])
            state.stats.bytes_served += max(0, cut - sent)
            state.stats.faults["reset"] += 1
            transport = request.transport
            if transport is not None:
                if faults.reset_mode == "reset":
                    hard_reset(transport)
                else:
                    transport.close()
            return False
        await resp.write(view)
        sent += len(view)
        state.stats.bytes_served += len(view)
        if faults.slow_body_bps:
            await asyncio.sleep(len(view) / faults.slow_body_bps)
    return True


def error_file(state: SimState, exe: SimExecution) -> web.Response:
    """A FAILED execution's error file (plain text); 404 for any other execution."""
    if state.status_of(exe)["status"] != "FAILED":
        raise web.HTTPNotFound()
    text = (
        f"Execution {exe.id} of export {exe.export.id} failed (attempt {exe.attempt}).\n"
        "task 17: OTQL evaluation error: simulated executor failure\n"
    )
    return web.Response(body=text.encode(), content_type="text/plain")


__all__ = ["error_file", "hard_reset", "serve_result"]
