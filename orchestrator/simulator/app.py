"""The simulated mediarithmics API: an aiohttp.web application.

It follows query-exports.md and the *confirmed* lines of NOTES.md, strictly: the raw
token in ``Authorization`` (no ``Bearer``), the ``{"status": "ok", "data": ...}`` and
``{"status": "error", "error", "error_id"}`` envelopes, string ids, epoch-ms dates,
``first_result``/``max_results`` paging, executions newest first, the result file at the
path form ``.../files/technical_name=export``. Executions move through their lifecycle
over wall time. Result files are generated on the fly (see ``data.py``).

It keeps its own accounting in :class:`SimStats` so tests can check what the client did
(executions created, polls, the most executions in flight at once, requests per route).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import struct
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from typing import Any

import orjson
from aiohttp import web

from orchestrator.simulator.config import ExportSpec, SimulatorConfig

Handler = Any
_RANGE = re.compile(r"^bytes=(\d+)-$")
_DATA_FILE_URI = re.compile(
    r"^mics://data_file/tenants/(?P<org>[^/]+)/jobs/executions/(?P<exe>[^/]+)/result/export\.(?P<kind>data|error)$"
)
_OTQL = re.compile(r"^\s*SELECT\s+.+\s+FROM\s+\w+", re.IGNORECASE | re.DOTALL)


STATE: web.AppKey[SimState]


@dataclass
class SimStats:
    """What the simulator saw. Counters are keyed by route name, export id or execution id."""

    requests: Counter[str] = field(default_factory=Counter)
    executions_created: Counter[str] = field(default_factory=Counter)
    list_requests: Counter[str] = field(default_factory=Counter)
    polls: Counter[str] = field(default_factory=Counter)
    downloads_started: Counter[str] = field(default_factory=Counter)
    downloads_completed: Counter[str] = field(default_factory=Counter)
    range_starts: list[tuple[str, int]] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    bytes_served: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    queries_created: int = 0
    exports_created: int = 0
    exports_updated: int = 0
    cancels: int = 0

    @property
    def total_requests(self) -> int:
        """All requests answered, faults included."""
        return sum(self.requests.values())


@dataclass
class SimExecution:
    """One execution and the facts that decide its lifecycle."""

    id: str
    export: ExportSpec
    attempt: int  # 1-based count of executions of this export
    created_mono: float
    creation_date: int
    fails: bool
    cancelled_at: float | None = None
    done: bool = False  # no longer "in flight" for the accounting


class SimState:
    """The platform's data: exports, queries, executions, and the accounting."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.exports: dict[str, ExportSpec] = {e.id: e for e in config.exports}
        self.queries: dict[str, dict[str, str]] = {}
        self.executions: dict[str, list[SimExecution]] = {}  # export id → oldest first
        self.by_id: dict[str, SimExecution] = {}
        self.downloads: Counter[str] = Counter()  # execution id → downloads begun
        self.stats = SimStats()
        self.rng = random.Random(config.faults.seed)
        self._next_exec = 879_879_000
        self._next_query = 50_000
        self._next_export = 20_000
        self._next_error = 0
        for e in config.exports:
            if e.query_id:
                self.queries.setdefault(
                    e.query_id,
                    {"query_text": "SELECT {id} FROM UserPoint", "datamart_id": e.datamart_id},
                )

    # -- ids and clocks ----------------------------------------------------------------
    def new_error_id(self) -> str:
        """A deterministic uuid-shaped error id."""
        self._next_error += 1
        return str(uuid.UUID(int=self._next_error))

    def export(self, export_id: str) -> ExportSpec | None:
        """The export with this id, derived on demand when auto_create_exports is on."""
        spec = self.exports.get(export_id)
        if spec is None and self.config.auto_create_exports and export_id.isdigit():
            spec = self.exports[export_id] = ExportSpec.derived(export_id)
        return spec

    def create_execution(self, spec: ExportSpec) -> SimExecution:
        """Start a new execution now."""
        runs = self.executions.setdefault(spec.id, [])
        attempt = len(runs) + 1
        self._next_exec += 1
        exe = SimExecution(
            id=str(self._next_exec),
            export=spec,
            attempt=attempt,
            created_mono=time.monotonic(),
            creation_date=int(time.time() * 1000),
            fails=spec.always_fail or attempt <= spec.fail_first,
        )
        runs.append(exe)
        self.by_id[exe.id] = exe
        self.stats.executions_created[spec.id] += 1
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        return exe

    def finish(self, exe: SimExecution) -> None:
        """The client is done with this execution: it leaves the in-flight count."""
        if not exe.done:
            exe.done = True
            self.stats.in_flight -= 1

    def status_of(self, exe: SimExecution) -> dict[str, Any]:
        """The execution as the API shows it at this instant."""
        spec = exe.export
        scale = self.config.time_scale
        now = time.monotonic()
        elapsed = (exe.cancelled_at or now) - exe.created_mono
        pending, running = spec.pending_s * scale, spec.running_s * scale
        body: dict[str, Any] = {
            "parameters": {},
            "organisation_id": spec.organisation_id,
            "user_id": "2886",
            "result": None,
            "error": None,
            "id": exe.id,
            "status": "PENDING",
            "creation_date": exe.creation_date,
            "start_date": None,
            "duration": None,
            "cancel_status": None,
            "debug": None,
            "is_retryable": False,
            "permalink_uri": "MTowOjA65985NjYyOQ==",
            "num_tasks": None,
            "completed_tasks": None,
            "erroneous_tasks": None,
            "retry_count": 0,
            "job_type": "DATAMART_QUERY_EXPORT",
        }
        if elapsed < pending and exe.cancelled_at is None:
            return body
        body["start_date"] = exe.creation_date + int(pending * 1000)
        finished = elapsed >= pending + running and not spec.stall
        if exe.cancelled_at is not None:
            body.update(status="CANCELED", cancel_status="CANCELED", num_tasks=spec.num_tasks)
            return body
        if not finished:
            frac = 0.3 if spec.stall else (elapsed - pending) / running if running else 1.0
            body.update(
                status=spec.running_status,
                num_tasks=spec.num_tasks,
                completed_tasks=int(spec.num_tasks * min(1.0, frac)),
                erroneous_tasks=0,
            )
            return body
        duration = int((pending + running) * 1000)
        body.update(
            num_tasks=spec.num_tasks,
            duration=duration,
            end_date=exe.creation_date + duration,
        )
        if exe.fails:
            body.update(
                status="FAILED",
                completed_tasks=spec.num_tasks // 2,
                erroneous_tasks=spec.num_tasks - spec.num_tasks // 2,
                error={"message": f"simulated failure of attempt {exe.attempt}"},
            )
        else:
            body.update(
                status="SUCCEEDED",
                completed_tasks=spec.num_tasks - spec.erroneous_tasks,
                erroneous_tasks=spec.erroneous_tasks,
                result={"output_files": ["export"]},
            )
        return body


STATE = web.AppKey("state", SimState)


# -- helpers -------------------------------------------------------------------------------
def _hard_reset(transport: asyncio.Transport) -> None:
    """Close with a TCP RST, like a crashed proxy: SO_LINGER 0 drops unsent bytes too."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _ok(data: Any, **extra: Any) -> web.Response:
    return web.Response(body=orjson.dumps({"status": "ok", "data": data, **extra}), content_type="application/json")


def _error(state: SimState, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"status": "error", "error": message, "error_id": state.new_error_id()}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def _page_params(request: web.Request, default: int) -> tuple[int, int]:
    try:
        first = int(request.query.get("first_result", 0))
        size = int(request.query.get("max_results", default))
    except ValueError as exc:
        raise web.HTTPBadRequest(text="first_result and max_results must be integers") from exc
    return max(0, first), max(1, min(size, 1000))


def _paged(items: list[Any], first: int, size: int) -> web.Response:
    page = items[first : first + size]
    return _ok(
        page,
        count=len(page),
        total=len(items),
        first_result=first,
        max_result=size,  # the API's stray singular key, kept for fidelity
        max_results=size,
    )


async def _json_body(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise _BadRequest("Content-Type must be application/json")
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise _BadRequest("request body is not valid JSON") from exc


class _BadRequest(Exception):
    pass


def _export_json(spec: ExportSpec) -> dict[str, Any]:
    return {
        "type": "QUERY",
        "id": spec.id,
        "organisation_id": spec.organisation_id,
        "name": spec.name,
        "query_id": spec.query_id,
        "datamart_id": spec.datamart_id,
        "output_format": "JSON",
    }


# -- the application -----------------------------------------------------------------------
def create_app(config: SimulatorConfig) -> web.Application:
    """The simulator as an aiohttp application; ``app[STATE]`` is its :class:`SimState`."""
    state = SimState(config)
    faults = config.faults

    @web.middleware
    async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name or "unknown"
        state.stats.requests[route] += 1
        # Faults come first, as a real gateway's rate limiter would answer before the API.
        roll = state.rng.random()
        if roll < faults.rate_429:
            state.stats.faults["429"] += 1
            headers = {}
            if faults.retry_after_s is not None:
                headers["Retry-After"] = f"{faults.retry_after_s:g}"
            return _error(state, 429, "Too Many Requests", headers)
        if roll < faults.rate_429 + faults.rate_5xx:
            state.stats.faults["5xx"] += 1
            return _error(state, state.rng.choice((500, 502, 503)), "Internal Server Error")
        if request.headers.get("Authorization") != config.token:
            return _error(state, 401, "Authentication failed: invalid or missing API token")
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except _BadRequest as exc:
            return _error(state, 400, str(exc))
        except web.HTTPNotFound:
            return _error(state, 404, "Resource Not Found")
        except web.HTTPException as exc:
            return _error(state, exc.status, exc.text or exc.reason)

    def org_of(request: web.Request) -> str:
        org = request.query.get("organisation_id")
        if not org:
            raise _BadRequest("organisation_id is required")
        return org

    def export_or_404(request: web.Request) -> ExportSpec:
        spec = state.export(request.match_info["export_id"])
        if spec is None:
            raise web.HTTPNotFound()
        return spec

    def execution_or_404(request: web.Request, spec: ExportSpec) -> SimExecution:
        exe = state.by_id.get(request.match_info["execution_id"])
        if exe is None or exe.export.id != spec.id:
            raise web.HTTPNotFound()
        return exe

    async def list_exports(request: web.Request) -> web.Response:
        org = org_of(request)
        first, size = _page_params(request, 50)
        items = [_export_json(s) for s in state.exports.values() if s.organisation_id == org]
        return _paged(items, first, size)

    async def get_export(request: web.Request) -> web.Response:
        spec = export_or_404(request)
        if spec.organisation_id != org_of(request):
            raise web.HTTPNotFound()
        return _ok(_export_json(spec))

    async def create_export(request: web.Request) -> web.Response:
        org = org_of(request)
        body = await _json_body(request)
        if not isinstance(body, dict) or not body.get("name") or not body.get("query_id"):
            raise _BadRequest("name and query_id are required")
        if body.get("output_format", "JSON") != "JSON" or body.get("type", "QUERY") != "QUERY":
            raise _BadRequest("only output_format JSON and type QUERY are supported")
        query = state.queries.get(str(body["query_id"]))
        if query is None:
            raise _BadRequest(f"query {body['query_id']} does not exist")
        state._next_export += 1
        export_id = str(state._next_export)
        spec = ExportSpec.derived(
            export_id,
            name=str(body["name"]),
            organisation_id=org,
            datamart_id=query["datamart_id"],
            query_id=str(body["query_id"]),
        )
        state.exports[export_id] = spec
        state.stats.exports_created += 1
        return _ok(_export_json(spec))

    async def update_export(request: web.Request) -> web.Response:
        spec = export_or_404(request)
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise _BadRequest("body must be an object")
        changes: dict[str, Any] = {}
        if "name" in body:
            changes["name"] = str(body["name"])
        if "query_id" in body:
            if str(body["query_id"]) not in state.queries:
                raise _BadRequest(f"query {body['query_id']} does not exist")
            changes["query_id"] = str(body["query_id"])
            changes["datamart_id"] = state.queries[changes["query_id"]]["datamart_id"]
        spec = state.exports[spec.id] = replace(spec, **changes)
        state.stats.exports_updated += 1
        return _ok(_export_json(spec))

    async def create_query(request: web.Request) -> web.Response:
        datamart = request.match_info["datamart_id"]
        body = await _json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("query_text"), str):
            raise _BadRequest("query_text is required")
        if body.get("query_language", "OTQL") != "OTQL":
            raise _BadRequest("only OTQL queries are supported")
        state._next_query += 1
        query_id = str(state._next_query)
        state.queries[query_id] = {"query_text": body["query_text"], "datamart_id": datamart}
        state.stats.queries_created += 1
        return _ok(
            {
                "id": query_id,
                "datamart_id": datamart,
                "query_language": "OTQL",
                "query_text": body["query_text"],
                "major_version": None,
                "minor_version": None,
            }
        )

    async def get_query(request: web.Request) -> web.Response:
        query = state.queries.get(request.match_info["query_id"])
        if query is None or query["datamart_id"] != request.match_info["datamart_id"]:
            raise web.HTTPNotFound()
        return _ok({"id": request.match_info["query_id"], "query_language": "OTQL", **query})

    async def check_query_syntax(request: web.Request) -> web.Response:
        # query_check/otql checks without running (NOTES.md): data.type VALID,
        # PARSING_ERROR or VALIDATION_ERROR, with where the problem is.
        body = await _json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            raise _BadRequest('the body must be {"query": "<OTQL text>"}')
        text = body["query"]
        if not _OTQL.match(text):
            return _ok(
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
            return _ok(
                {
                    "type": "PARSING_ERROR",
                    "error": {"message": "unbalanced braces", "position": {"row": 1, "col": col}},
                }
            )
        return _ok({"type": "VALID"})

    async def run_query(request: web.Request) -> web.Response:
        text = (await request.read()).decode("utf-8", "replace")
        if not _OTQL.match(text) or text.count("{") != text.count("}"):
            raise _BadRequest(f"Invalid OTQL query: cannot parse {text[:60]!r}")
        return _ok(
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

    async def create_execution(request: web.Request) -> web.Response:
        spec = export_or_404(request)
        body = await _json_body(request)
        if body != {}:
            raise _BadRequest("the body must be an empty JSON object: {}")
        exe = state.create_execution(spec)
        if state.stats.executions_created[spec.id] <= faults.lose_create_first_k:
            state.stats.faults["lost_create"] += 1
            if request.transport is not None:
                request.transport.abort()  # created, but the client never hears of it
        return _ok(state.status_of(exe))

    async def list_executions(request: web.Request) -> web.Response:
        spec = export_or_404(request)
        first, size = _page_params(request, 10)
        state.stats.list_requests[spec.id] += 1
        runs = list(reversed(state.executions.get(spec.id, [])))  # newest first
        items = []
        for i, exe in enumerate(runs):
            shown = state.status_of(exe)
            if first <= i < first + size:
                if not exe.done:
                    state.stats.polls[exe.id] += 1
                if shown["status"] in ("FAILED", "CANCELED"):
                    state.finish(exe)  # the client now knows it is over
            items.append(shown)
        return _paged(items, first, size)

    async def cancel_execution(request: web.Request) -> web.Response:
        spec = export_or_404(request)
        exe = execution_or_404(request, spec)
        body = await _json_body(request)
        if body != {"action": "CANCEL"}:
            raise _BadRequest('the body must be {"action": "CANCEL"}')
        if state.status_of(exe)["status"] not in ("SUCCEEDED", "FAILED", "CANCELED"):
            exe.cancelled_at = time.monotonic()
        state.stats.cancels += 1
        state.finish(exe)
        return _ok(state.status_of(exe))

    async def serve_result(request: web.Request, exe: SimExecution) -> web.StreamResponse:
        status = state.status_of(exe)["status"]
        if status != "SUCCEEDED":
            raise web.HTTPNotFound()
        result = exe.export.result()
        total = result.size
        etag = result.etag
        end_ms = exe.creation_date + int(state.status_of(exe).get("duration") or 0)
        last_modified = formatdate(end_ms / 1000, usegmt=True)
        start = 0
        match = _RANGE.match(request.headers.get("Range", ""))
        if_range = request.headers.get("If-Range")
        # RFC 9110 §13.1.5: a Range is honoured only if If-Range (when sent) still matches,
        # by strong comparison of the ETag or an exact Last-Modified; else the whole file.
        ranged = match is not None and not faults.ignore_range and if_range in (None, etag, last_modified)
        if match and ranged:
            start = int(match.group(1))
            if start >= total:
                # RFC 9110 §14.4: a range starting at or past the end is unsatisfiable; the
                # 416 says the size, so a client that already has every byte knows it.
                return _error(state, 416, "Requested Range Not Satisfiable", {"Content-Range": f"bytes */{total}"})
            state.stats.range_starts.append((exe.id, start))
        resp = web.StreamResponse(status=206 if ranged else 200)
        resp.content_type = "application/x-ndjson"
        resp.content_length = total - start
        if resp.status == 206:
            resp.headers["Content-Range"] = f"bytes {start}-{total - 1}/{total}"
        resp.headers["ETag"] = etag
        resp.headers["Last-Modified"] = last_modified
        resp.headers["Accept-Ranges"] = "bytes"
        state.downloads[exe.id] += 1
        state.stats.downloads_started[exe.id] += 1
        # The cut is at an absolute offset of the file: a resumed download that starts at
        # or past it is cut at once, like a server that always dies at the same byte.
        cut = (
            max(0, faults.reset_after_bytes - start)
            if faults.reset_after_bytes is not None and state.downloads[exe.id] <= faults.reset_first_k
            else None
        )
        await resp.prepare(request)
        sent = 0
        for view in result.iter_chunks(start, config.chunk_bytes):
            if cut is not None and sent + len(view) >= cut:
                await resp.write(view[: max(0, cut - sent)])
                state.stats.bytes_served += max(0, cut - sent)
                state.stats.faults["reset"] += 1
                transport = request.transport
                if transport is not None:
                    if faults.reset_mode == "reset":
                        _hard_reset(transport)
                    else:
                        transport.close()
                return resp
            await resp.write(view)
            sent += len(view)
            state.stats.bytes_served += len(view)
            if faults.slow_body_bps:
                await asyncio.sleep(len(view) / faults.slow_body_bps)
        await resp.write_eof()
        state.stats.downloads_completed[exe.id] += 1
        state.finish(exe)
        return resp

    async def download_file(request: web.Request) -> web.StreamResponse:
        spec = export_or_404(request)
        exe = execution_or_404(request, spec)
        if request.match_info["name"] != "export":
            raise web.HTTPNotFound()
        return await serve_result(request, exe)

    async def data_file(request: web.Request) -> web.StreamResponse:
        match = _DATA_FILE_URI.match(request.query.get("uri", ""))
        if match is None:
            raise _BadRequest("uri must be mics://data_file/tenants/:org/jobs/executions/:id/result/export.data|error")
        exe = state.by_id.get(match["exe"])
        if exe is None or exe.export.organisation_id != match["org"]:
            raise web.HTTPNotFound()
        if match["kind"] == "data":
            return await serve_result(request, exe)
        if state.status_of(exe)["status"] != "FAILED":
            raise web.HTTPNotFound()
        text = (
            f"Execution {exe.id} of export {exe.export.id} failed (attempt {exe.attempt}).\n"
            "task 17: OTQL evaluation error: simulated executor failure\n"
        )
        return web.Response(body=text.encode(), content_type="text/plain")

    app = web.Application(middlewares=[envelope], client_max_size=1 << 20)
    app[STATE] = state
    r = app.router
    r.add_get("/v1/exports", list_exports, name="exports.list")
    r.add_post("/v1/exports", create_export, name="exports.create")
    r.add_get("/v1/exports/{export_id}", get_export, name="exports.get")
    r.add_put("/v1/exports/{export_id}", update_export, name="exports.update")
    r.add_post("/v1/exports/{export_id}/executions", create_execution, name="executions.create")
    r.add_get("/v1/exports/{export_id}/executions", list_executions, name="executions.list")
    r.add_post(
        "/v1/exports/{export_id}/executions/{execution_id}/action",
        cancel_execution,
        name="executions.action",
    )
    r.add_get(
        "/v1/exports/{export_id}/executions/{execution_id}/files/technical_name={name}",
        download_file,
        name="executions.file",
    )
    r.add_get("/v1/data_file/data", data_file, name="data_file")
    r.add_post("/v1/datamarts/{datamart_id}/queries", create_query, name="queries.create")
    r.add_get("/v1/datamarts/{datamart_id}/queries/{query_id}", get_query, name="queries.get")
    r.add_post("/v1/datamarts/{datamart_id}/query_check/otql", check_query_syntax, name="queries.check")
    r.add_post("/v1/datamarts/{datamart_id}/query_executions/otql", run_query, name="queries.run")
    return app
