"""The simulated API's envelopes and request parsing, shared by its route handlers.

``{"status": "ok", "data": ...}`` and ``{"status": "error", "error", "error_id"}``; paging
with ``first_result`` / ``max_results`` (and the API's stray ``max_result``).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from orchestrator.simulator.config import ExportSpec
from orchestrator.simulator.state import SimState


def ok(data: Any, **extra: Any) -> web.Response:
    return web.Response(body=orjson.dumps({"status": "ok", "data": data, **extra}), content_type="application/json")


def error(state: SimState, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"status": "error", "error": message, "error_id": state.new_error_id()}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def page_params(request: web.Request, default: int) -> tuple[int, int]:
    try:
        first = int(request.query.get("first_result", 0))
        size = int(request.query.get("max_results", default))
    except ValueError as exc:
        raise web.HTTPBadRequest(text="first_result and max_results must be integers") from exc
    return max(0, first), max(1, min(size, 1000))


def paged(items: list[Any], first: int, size: int) -> web.Response:
    page = items[first : first + size]
    return ok(
        page,
        count=len(page),
        total=len(items),
        first_result=first,
        max_result=size,  # the API's stray singular key, kept for fidelity
        max_results=size,
    )


async def json_body(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise BadRequest("Content-Type must be application/json")
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise BadRequest("request body is not valid JSON") from exc


class BadRequest(Exception):
    """A request the API would answer with 400 (its message is the error text)."""


def export_json(spec: ExportSpec) -> dict[str, Any]:
    return {
        "type": "QUERY",
        "id": spec.id,
        "organisation_id": spec.organisation_id,
        "name": spec.name,
        "query_id": spec.query_id,
        "datamart_id": spec.datamart_id,
        "output_format": "JSON",
    }


__all__ = ["BadRequest", "error", "export_json", "json_body", "ok", "page_params", "paged"]
