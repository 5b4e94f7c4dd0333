"""A small, fully scripted fake of the Query Exports API for the adversarial review tests.

:mod:`hostile` puts a proxy in front of the simulator; some attacks need answers the
simulator never gives at all (an execution id with a slash, a list that loses the
execution, a status in lower case, a file that is a different file on a resume). A
:class:`FakeApi` is a :mod:`hostile` handler that answers every request itself (no
upstream), from a few fields a test sets and methods it may replace:

- any export id; the executions of all are ``executions`` (newest first), each a dict as
  the API shows it plus ``"export"`` (its export's id); a create puts ``new_execution()``
  on top and answers it; a listing shows the executions of the export asked for;
- the result file is ``data``, served honestly (200 with Content-Length and ETag, 206 from
  a Range, 416 past the end) by :meth:`FakeApi.file`, unless ``download`` is replaced;
- every request is counted by kind in ``seen``.

Run it with ``hostile.HostileThread("http://127.0.0.1:9", fake)``: the upstream is never used.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from hostile import Forward, Request, Wire, is_create, is_download, is_error_file, is_executions_list, json_wire

DATA = b"".join(b'{"i":%d,"pad":"%s"}\n' % (i, b"x" * 40) for i in range(1500))
"""The result file: 1,500 valid records, ~80 kB."""
ETAG = '"v1"'

Answer = Callable[[Request], Awaitable[Wire]]


def range_start(req: Request) -> int | None:
    """Where the request's ``Range: bytes=N-`` starts (None without one)."""
    value = req.headers.get("range")
    return int(value.removeprefix("bytes=").rstrip("-")) if value else None


def honest(data: bytes, req: Request, etag: str | None = ETAG) -> Wire:
    """What a well-behaved file server answers: 200, 206 from the Range, or 416 past the end."""
    tag = [("ETag", etag)] if etag else []
    start = range_start(req)
    if start is None:
        return Wire(200, [*tag, ("Content-Type", "application/octet-stream")], data)
    if start >= len(data):
        return Wire(416, [("Content-Range", f"bytes */{len(data)}")])
    return Wire(206, [*tag, ("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")], data[start:])


def export_of(req: Request) -> str:
    """The export id in a ``/v1/exports/ID/...`` path ("" elsewhere)."""
    parts = req.path.split("/")
    return parts[3] if len(parts) > 3 and parts[1:3] == ["v1", "exports"] else ""


def envelope_list(items: list[dict[str, Any]], first: int = 0) -> dict[str, Any]:
    """A list envelope as the API writes it."""
    return {
        "status": "ok",
        "data": items,
        "count": len(items),
        "total": len(items),
        "first_result": first,
        "max_results": 10,
    }


@dataclass
class FakeApi:
    """A scripted API: see the module docstring."""

    data: bytes = DATA
    status: str = "SUCCEEDED"
    """The status a new execution is listed with (and answered with by the create)."""
    next_id: Callable[[], str] = field(default_factory=lambda: (str(n) for n in itertools.count(700)).__next__)
    executions: list[dict[str, Any]] = field(default_factory=list)
    seen: Counter[str] = field(default_factory=Counter)
    result: Any = field(default_factory=lambda: {"output_files": ["export"]})
    """A new execution's ``result`` (where its ``output_files`` are)."""
    error_body: bytes | None = None
    """A FAILED execution's error file (None: 404)."""

    def new_execution(self) -> dict[str, Any]:
        """The execution a create makes, as the API shows it."""
        return {
            "id": self.next_id(),
            "status": self.status,
            "creation_date": 1_700_000_000_000,
            "result": self.result,
            "num_tasks": 10,
            "completed_tasks": 10,
            "erroneous_tasks": 0,
            "error": None,
        }

    async def create(self, req: Request) -> Wire:
        execution = {**self.new_execution(), "export": export_of(req)}
        self.executions.insert(0, execution)
        return json_wire(200, {"status": "ok", "data": execution})

    async def listing(self, req: Request) -> Wire:
        first = int(req.query.get("first_result", "0"))
        size = int(req.query.get("max_results", "10"))
        mine = [e for e in self.executions if e.get("export", export_of(req)) == export_of(req)]
        page = mine[first : first + size]
        return json_wire(200, {**envelope_list(page, first), "total": len(mine)})

    async def download(self, req: Request) -> Wire:
        return self.file(req)

    def file(self, req: Request) -> Wire:
        return honest(self.data, req)

    async def error_file(self, req: Request) -> Wire:
        if self.error_body is None:
            return json_wire(404, {"status": "error", "error": "Resource Not Found", "error_id": "e-1"})
        return Wire(200, [("Content-Type", "text/plain")], self.error_body)

    async def other(self, req: Request) -> Wire:
        if req.method == "POST" and req.path.endswith("/action"):
            return json_wire(200, {"status": "ok", "data": {}})
        return json_wire(404, {"status": "error", "error": "Resource Not Found", "error_id": "e-2"})

    async def __call__(self, req: Request, forward: Forward) -> Wire:
        for kind, matches, answer in (
            ("create", is_create, self.create),
            ("list", is_executions_list, self.listing),
            ("download", is_download, self.download),
            ("error_file", is_error_file, self.error_file),
        ):
            if matches(req):
                self.seen[kind] += 1
                return await answer(req)
        self.seen["other"] += 1
        return await self.other(req)


__all__ = ["DATA", "ETAG", "FakeApi", "envelope_list", "export_of", "honest", "range_start"]
