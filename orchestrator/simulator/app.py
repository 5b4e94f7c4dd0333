"""The simulated mediarithmics API: an aiohttp.web application.

It follows query-exports.md and the *confirmed* lines of NOTES.md, strictly: the raw
token in ``Authorization`` (no ``Bearer``), the ``{"status": "ok", "data": ...}`` and
``{"status": "error", "error", "error_id"}`` envelopes, string ids, epoch-ms dates,
``first_result``/``max_results`` paging, executions newest first, the result file at the
path form ``.../files/technical_name=export``. Executions move through their lifecycle
over wall time (:mod:`~orchestrator.simulator.state`). Result files are generated on the
fly (``data.py``) and served by :mod:`~orchestrator.simulator.files`.

:class:`SimApi` holds one handler method per route; :func:`create_app` wires them. The
simulator keeps its own accounting in :class:`~orchestrator.simulator.state.SimStats` so
tests can check what the client did.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from typing import Any

from aiohttp import web

from orchestrator.simulator.config import ExportSpec, SimulatorConfig
from orchestrator.simulator.files import error_file, serve_result
from orchestrator.simulator.responses import (
    BadRequest,
    error,
    export_json,
    json_body,
    ok,
    page_params,
    paged,
)
from orchestrator.simulator.state import SimExecution, SimState, SimStats

Handler = Any
_DATA_FILE_URI = re.compile(
    r"^mics://data_file/tenants/(?P<org>[^/]+)/jobs/executions/(?P<exe>[^/]+)/result/export\.(?P<kind>data|error)$"
)
_OTQL = re.compile(r"^\s*SELECT\s+.+\s+FROM\s+\w+", re.IGNORECASE | re.DOTALL)

STATE = web.AppKey("state", SimState)


class SimApi:
    """The API's routes over one :class:`SimState`: one method per route, plus the envelope
    middleware that injects faults and checks the token before any handler runs."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.state = SimState(config)
        self.faults = config.faults

    @web.middleware
    async def envelope(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name or "unknown"
        self.state.stats.requests[route] += 1
        # Faults come first, as a real gateway's rate limiter would answer before the API.
        roll = self.state.rng.random()
        if roll < self.faults.rate_429:
            self.state.stats.faults["429"] += 1
            headers = {}
            if self.faults.retry_after_s is not None:
                headers["Retry-After"] = f"{self.faults.retry_after_s:g}"
            return error(self.state, 429, "Too Many Requests", headers)
        if roll < self.faults.rate_429 + self.faults.rate_5xx:
            self.state.stats.faults["5xx"] += 1
            return error(self.state, self.state.rng.choice((500, 502, 503)), "Internal Server Error")
        if request.headers.get("Authorization") != self.state.config.token:
            return error(self.state, 401, "Authentication failed: invalid or missing API token")
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except BadRequest as exc:
            return error(self.state, 400, str(exc))
        except web.HTTPNotFound:
            return error(self.state, 404, "Resource Not Found")
        except web.HTTPException as exc:
            return error(self.state, exc.status, exc.text or exc.reason)

    def org_of(self, request: web.Request) -> str:
        org = request.query.get("organisation_id")
        if not org:
            raise BadRequest("organisation_id is required")
        return org

    def export_or_404(self, request: web.Request) -> ExportSpec:
        spec = self.state.export(request.match_info["export_id"])
        if spec is None:
            raise web.HTTPNotFound()
        return spec

    def execution_or_404(self, request: web.Request, spec: ExportSpec) -> SimExecution:
        exe = self.state.by_id.get(request.match_info["execution_id"])
        if exe is None or exe.export.id != spec.id:
            raise web.HTTPNotFound()
        return exe

    async def list_exports(self, request: web.Request) -> web.Response:
        org = self.org_of(request)
        first, size = page_params(request, 50)
        items = [export_json(s) for s in self.state.exports.values() if s.organisation_id == org]
        return paged(items, first, size)

    async def get_export(self, request: web.Request) -> web.Response:
        spec = self.export_or_404(request)
        if spec.organisation_id != self.org_of(request):
            raise web.HTTPNotFound()
        return ok(export_json(spec))

    async def create_export(self, request: web.Request) -> web.Response:
        org = self.org_of(request)
        body = await json_body(request)
        if not isinstance(body, dict) or not body.get("name") or not body.get("query_id"):
            raise BadRequest("name and query_id are required")
        if body.get("output_format", "JSON") != "JSON" or body.get("type", "QUERY") != "QUERY":
            raise BadRequest("only output_format JSON and type QUERY are supported")
        query = self.state.queries.get(str(body["query_id"]))
        if query is None:
            raise BadRequest(f"query {body['query_id']} does not exist")
        self.state._next_export += 1
        export_id = str(self.state._next_export)
        spec = ExportSpec.derived(
            export_id,
            name=str(body["name"]),
            organisation_id=org,
            datamart_id=query["datamart_id"],
            query_id=str(body["query_id"]),
        )
        self.state.exports[export_id] = spec
        self.state.stats.exports_created += 1
        return ok(export_json(spec))

    async def update_export(self, request: web.Request) -> web.Response:
        spec = self.export_or_404(request)
        body = await json_body(request)
        if not isinstance(body, dict):
            raise BadRequest("body must be an object")
        changes: dict[str, Any] = {}
        if "name" in body:
            changes["name"] = str(body["name"])
        if "query_id" in body:
            if str(body["query_id"]) not in self.state.queries:
                raise BadRequest(f"query {body['query_id']} does not exist")
            changes["query_id"] = str(body["query_id"])
            changes["datamart_id"] = self.state.queries[changes["query_id"]]["datamart_id"]
        spec = self.state.exports[spec.id] = replace(spec, **changes)
        self.state.stats.exports_updated += 1
        return ok(export_json(spec))

    async def create_query(self, request: web.Request) -> web.Response:
        datamart = request.match_info["datamart_id"]
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("query_text"), str):
            raise BadRequest("query_text is required")
        if body.get("query_language", "OTQL") != "OTQL":
            raise BadRequest("only OTQL queries are supported")
        self.state._next_query += 1
        query_id = str(self.state._next_query)
        self.state.queries[query_id] = {"query_text": body["query_text"], "datamart_id": datamart}
        self.state.stats.queries_created += 1
        return ok(
            {
                "id": query_id,
                "datamart_id": datamart,
                "query_language": "OTQL",
                "query_text": body["query_text"],
                "major_version": None,
                "minor_version": None,
            }
        )

    async def get_query(self, request: web.Request) -> web.Response:
        query = self.state.queries.get(request.match_info["query_id"])
        if query is None or query["datamart_id"] != request.match_info["datamart_id"]:
            raise web.HTTPNotFound()
        return ok({"id": request.match_info["query_id"], "query_language": "OTQL", **query})

    async def check_query_syntax(self, request: web.Request) -> web.Response:
        # query_check/otql checks without running (NOTES.md): data.type VALID,
        # PARSING_ERROR or VALIDATION_ERROR, with where the problem is.
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            raise BadRequest('the body must be {"query": "<OTQL text>"}')
        text = body["query"]
        if not _OTQL.match(text):
            return ok(
                {
                    "type": "PARSING_ERROR",
                    "error": {
                        "message": "mismatched input: expected SELECT ... FROM ...",
                        "position": {"row": 1, "col": 1},
                    },
                }
            )
        if text.count("{") != text.count("}"):
            col = (text.rfind("{") + 1) if text.count("{") > text.count("}") else (text.rfind("}") + 1)
            return ok(
                {
                    "type": "PARSING_ERROR",
                    "error": {"message": "unbalanced braces", "position": {"row": 1, "col": col}},
                }
            )
        return ok({"type": "VALID"})

    async def run_query(self, request: web.Request) -> web.Response:
        text = (await request.read()).decode("utf-8", "replace")
        if not _OTQL.match(text) or text.count("{") != text.count("}"):
            raise BadRequest(f"Invalid OTQL query: cannot parse {text[:60]!r}")
        return ok(
            {
                "took": 3,
                "timed_out": False,
                "offset": None,
                "limit": None,
                "result_type": "ROWS",
                "precision": "FULL",
                "sampling_ratio": None,
                "rows": [],
                "cache_hit": False,
            }
        )

    async def create_execution(self, request: web.Request) -> web.Response:
        spec = self.export_or_404(request)
        body = await json_body(request)
        if body != {}:
            raise BadRequest("the body must be an empty JSON object: {}")
        exe = self.state.create_execution(spec)
        if self.state.stats.executions_created[spec.id] <= self.faults.lose_create_first_k:
            self.state.stats.faults["lost_create"] += 1
            if request.transport is not None:
                request.transport.abort()  # created, but the client never hears of it
        return ok(self.state.status_of(exe))

    async def list_executions(self, request: web.Request) -> web.Response:
        spec = self.export_or_404(request)
        first, size = page_params(request, 10)
        self.state.stats.list_requests[spec.id] += 1
        runs = list(reversed(self.state.executions.get(spec.id, [])))  # newest first
        items = []
        for i, exe in enumerate(runs):
            shown = self.state.status_of(exe)
            if first <= i < first + size:
                if not exe.done:
                    self.state.stats.polls[exe.id] += 1
                if shown["status"] in ("FAILED", "CANCELED"):
                    self.state.finish(exe)  # the client now knows it is over
            items.append(shown)
        return paged(items, first, size)

    async def cancel_execution(self, request: web.Request) -> web.Response:
        spec = self.export_or_404(request)
        exe = self.execution_or_404(request, spec)
        body = await json_body(request)
        if body != {"action": "CANCEL"}:
            raise BadRequest('the body must be {"action": "CANCEL"}')
        if self.state.status_of(exe)["status"] not in ("SUCCEEDED", "FAILED", "CANCELED"):
            exe.cancelled_at = time.monotonic()
        self.state.stats.cancels += 1
        self.state.finish(exe)
        return ok(self.state.status_of(exe))

    async def download_file(self, request: web.Request) -> web.StreamResponse:
        spec = self.export_or_404(request)
        exe = self.execution_or_404(request, spec)
        if request.match_info["name"] != "export":
            raise web.HTTPNotFound()
        return await serve_result(self.state, request, exe)

    async def data_file(self, request: web.Request) -> web.StreamResponse:
        match = _DATA_FILE_URI.match(request.query.get("uri", ""))
        if match is None:
            raise BadRequest("uri must be mics://data_file/tenants/:org/jobs/executions/:id/result/export.data|error")
        exe = self.state.by_id.get(match["exe"])
        if exe is None or exe.export.organisation_id != match["org"]:
            raise web.HTTPNotFound()
        if match["kind"] == "data":
            return await serve_result(self.state, request, exe)
        return error_file(self.state, exe)


def create_app(config: SimulatorConfig) -> web.Application:
    """The simulator as an aiohttp application; ``app[STATE]`` is its :class:`SimState`."""
    api = SimApi(config)
    app = web.Application(middlewares=[api.envelope], client_max_size=1 << 20)
    app[STATE] = api.state
    r = app.router
    r.add_get("/v1/exports", api.list_exports, name="exports.list")
    r.add_post("/v1/exports", api.create_export, name="exports.create")
    r.add_get("/v1/exports/{export_id}", api.get_export, name="exports.get")
    r.add_put("/v1/exports/{export_id}", api.update_export, name="exports.update")
    r.add_post("/v1/exports/{export_id}/executions", api.create_execution, name="executions.create")
    r.add_get("/v1/exports/{export_id}/executions", api.list_executions, name="executions.list")
    r.add_post(
        "/v1/exports/{export_id}/executions/{execution_id}/action",
        api.cancel_execution,
        name="executions.action",
    )
    r.add_get(
        "/v1/exports/{export_id}/executions/{execution_id}/files/technical_name={name}",
        api.download_file,
        name="executions.file",
    )
    r.add_get("/v1/data_file/data", api.data_file, name="data_file")
    r.add_post("/v1/datamarts/{datamart_id}/queries", api.create_query, name="queries.create")
    r.add_get("/v1/datamarts/{datamart_id}/queries/{query_id}", api.get_query, name="queries.get")
    r.add_post("/v1/datamarts/{datamart_id}/query_check/otql", api.check_query_syntax, name="queries.check")
    r.add_post("/v1/datamarts/{datamart_id}/query_executions/otql", api.run_query, name="queries.run")
    return app


__all__ = ["STATE", "SimApi", "SimExecution", "SimState", "SimStats", "create_app"]
