"""ApiClient: the one place that speaks the mediarithmics API.

Every request goes through :meth:`ApiClient._request`: a :class:`~orchestrator.retry.RetryPolicy`
retry loop around :meth:`~orchestrator.transport.Transport.send` (the HTTP layer: token
header, throttle, error mapping, status check), which unwraps the ``{"status": "ok",
"data": ...}`` envelope and parses it. The retry formula is in :mod:`orchestrator.retry`;
transient errors (429, 5xx, connection trouble) are retried, other 4xx fail at once.

An answer is parsed inside the retried call: a 2xx answer the models cannot read (a
missing id, an object where a list belongs) is a :class:`MalformedResponseError` naming
the field, retried like a 5xx, then raised to the job that asked. A create-execution is
the exception to blind retries: only 429 and a failed connect (nothing was sent) are
retried here; after anything else the outcome is unknown, and the caller looks for the
execution before creating another (see :meth:`ApiClient.create_execution`).

Lists are paged with ``first_result``/``max_results``; a lookup stops, with an error that
says so, when a page brings no new ids (the server ignores ``first_result``) or after
``MAX_PAGES`` pages, so a broken list can never page forever.

Files are streamed by :mod:`orchestrator.stream` (resumable, byte-exact) over the same
transport and the same retry policy.

The token lives only in the ``Authorization`` header: never in a URL, a log line, an
exception or a repr. Text the server sends back (error bodies, error files, execution
errors) may echo it: :meth:`ApiClient.scrub` removes it, before any truncation.

Over ~350 lines on purpose: it is the catalogue of the API's endpoints (fourteen methods of
a few lines each, most of them docstring); the machinery lives in transport, retry and stream.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar, cast, overload

import orjson

from orchestrator.endpoint import DEFAULT_BASE_URL
from orchestrator.errors import (
    ConnectError,
    MalformedResponseError,
    NotFoundError,
    PagingError,
    TransientApiError,
    is_transient,
)
from orchestrator.models import Execution, Export, Page, QueryCheck, require_object, required_id
from orchestrator.retry import Budget, RetryPolicy
from orchestrator.stream import ResumableStream
from orchestrator.transport import MAPPED, Throttle, Timeouts, Transport, error_from

log = logging.getLogger("orchestrator.api")
T = TypeVar("T")

DEFAULT_CHUNK_BYTES = 1 << 20
"""1 MiB: measured (PERF-NOTES) to move bytes 2× faster than 64 KiB chunks."""
MAX_PAGES = 1000
"""The most pages one walk through a list may read (50,000 exports at 50 a page)."""
FIND_EXECUTION_MAX_PAGES = 100
"""find_execution looks this deep (1,000 executions at 10 a page): ours are recent."""
_JSON_HEADERS = {"Content-Type": "application/json"}
"""A JSON body's headers, built once (aiohttp copies them into each request)."""


class ApiClient:
    """Async client of the Query Exports API. Use as ``async with ApiClient(...) as api``."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        max_connections: int = 100,
        max_requests_in_flight: int = 64,
        accept_gzip: bool = False,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.throttle = Throttle(
            max_requests_in_flight,
            base_pause_s=self.retry.base_s,
            max_pause_s=self.retry.max_wait_s,
            max_retry_after_s=self.retry.max_retry_after_s,
            clock=self.retry.clock,
            sleep=self.retry.sleep,
        )
        self.transport = Transport(
            base_url,
            token,
            timeouts=timeouts or Timeouts(),
            throttle=self.throttle,
            max_connections=max_connections,
            accept_gzip=accept_gzip,
        )

    @property
    def base_url(self) -> str:
        return self.transport.base_url

    @base_url.setter
    def base_url(self, value: str) -> None:
        self.transport.base_url = value.rstrip("/")

    def __repr__(self) -> str:
        return f"ApiClient(base_url={self.base_url!r})"

    async def __aenter__(self) -> ApiClient:
        await self.transport.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session and its connections."""
        await self.transport.aclose()

    # -- secrets -----------------------------------------------------------------------------
    @overload
    def scrub(self, text: str) -> str: ...
    @overload
    def scrub(self, text: bytes) -> bytes: ...
    def scrub(self, text: str | bytes) -> str | bytes:
        """``text`` (str or bytes) with the token replaced by ``***``.

        For anything the server sent back that goes to a log, a manifest or a file: a
        gateway or an error file that echoes the Authorization header must not carry
        the token any further.
        """
        if isinstance(text, bytes):
            return self.transport.secret.scrub_bytes(text)
        return self.transport.secret.scrub(text) or ""

    # -- the request machinery -----------------------------------------------------------
    async def _once(
        self, method: str, path: str, params: dict[str, Any] | None, body: bytes | None, headers: dict[str, str] | None
    ) -> tuple[int, dict[str, Any]]:
        """One request; returns (status, the parsed envelope) or raises an ApiError/TransportError."""
        transport = self.transport
        resp = await transport.send(
            method, path, params=params, body=body, headers=headers, total_s=transport.timeouts.request_s
        )
        try:
            raw = await resp.read()
        except MAPPED as exc:  # transport.errors(), without a context manager's cost on every request
            raise transport.mapped(exc, f"{method} {path}") from None
        finally:
            resp.release()
        status = resp.status
        try:
            envelope = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise MalformedResponseError("the body", "is not JSON", status=status, method=method, path=path) from None
        if not isinstance(envelope, dict):
            raise MalformedResponseError(
                "the body", "is not a JSON object (no envelope)", status=status, method=method, path=path
            )
        # An envelope without "status" but with "data" is read as ok (loose typing); an
        # explicit non-ok status is an error answer sent with a 2xx code.
        if envelope.get("status", "ok" if "data" in envelope else None) != "ok":
            if "status" not in envelope:
                raise MalformedResponseError("status", "is missing", status=status, method=method, path=path)
            raise error_from(status, raw, method, path, None, self.transport.secret)
        return status, envelope

    async def _request(
        self,
        method: str,
        path: str,
        parse: Callable[[dict[str, Any]], T],
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        retry_if: Callable[[BaseException], bool] = is_transient,
        budget: Budget | None = None,
    ) -> T:
        """A retried request whose envelope ``parse`` turns into the result, inside the retry:
        an answer that cannot be read is retried like a 5xx (MalformedResponseError)."""
        body = None if json is None else orjson.dumps(json)
        headers = None if json is None else _JSON_HEADERS

        async def once() -> T:
            status, envelope = await self._once(method, path, params, body, headers)
            try:
                return parse(envelope)
            except MalformedResponseError as exc:
                raise exc.at(method=method, path=path, status=status) from None
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                # A shape no model foresaw: the job's problem, never a traceback.
                raise MalformedResponseError(
                    "data", f"cannot be read ({type(exc).__name__})", status=status, method=method, path=path
                ) from None

        return await self.retry.call(once, budget=budget, retry_if=retry_if, logger=log)

    async def _page(
        self, path: str, params: dict[str, Any], first: int, size: int, item: Callable[[Any], T] | None = None
    ) -> Page:
        """One page, its items built by ``item`` (inside the retry: a bad item is retried)."""
        return await self._request(
            "GET",
            path,
            lambda env: Page.from_api(env, first, size, item),
            params={**params, "first_result": first, "max_results": size},
        )

    async def _iter_pages(
        self,
        path: str,
        params: dict[str, Any],
        page_size: int,
        item: Callable[[Any], T],
        *,
        max_pages: int = MAX_PAGES,
    ) -> AsyncGenerator[T, None]:
        """Every item of a list, page by page, each id once.

        A list can shift while it is read (a new execution lands on top of a newest-first
        list), so an item seen on an earlier page is skipped, not an error. A page with
        items but none new means the server ignores ``first_result``; that, or more than
        ``max_pages`` pages, stops the walk with a PagingError rather than paging forever.
        """
        first = 0
        seen: set[str] = set()
        for number in range(1, max_pages + 1):
            page = await self._page(path, params, first, page_size, item)
            new = 0
            for thing in page.items:
                # An item is a model with an id, or (find_execution's other executions) the id alone.
                key = thing if isinstance(thing, str) else getattr(thing, "id", None)
                if key is not None:
                    if key in seen:
                        continue
                    seen.add(key)
                new += 1
                yield thing
            if not page.items or not page.has_more:
                return
            if not new:
                raise PagingError(
                    "first_result",
                    f"the API kept returning the same page (first_result={first} ignored?): "
                    f"stopped after {number} pages",
                    method="GET",
                    path=path,
                )
            first += len(page.items)
        raise PagingError(
            "total",
            f"the list did not end after {max_pages} pages of {page_size} (total {page.total}): stopped",
            method="GET",
            path=path,
        )

    # -- exports and queries -------------------------------------------------------------
    async def iter_exports(
        self, organisation_id: str, page_size: int = 50, *, max_pages: int = MAX_PAGES
    ) -> AsyncIterator[Export]:
        """Every export of the organisation, through all pages (at most ``max_pages``)."""
        async for export in self._iter_pages(
            "/v1/exports", {"organisation_id": organisation_id}, page_size, Export.from_api, max_pages=max_pages
        ):
            yield export

    async def list_exports(self, organisation_id: str, page_size: int = 50) -> list[Export]:
        """Every export of the organisation, through all pages."""
        return [e async for e in self.iter_exports(organisation_id, page_size)]

    async def get_export(self, export_id: str, organisation_id: str) -> Export:
        """One export's definition."""
        return await self._request(
            "GET",
            f"/v1/exports/{export_id}",
            lambda env: Export.from_api(env.get("data")),
            params={"organisation_id": organisation_id},
        )

    async def create_export(self, organisation_id: str, name: str, query_id: str) -> Export:
        """A new QUERY export with JSON output on an existing query."""
        payload = {"name": name, "output_format": "JSON", "query_id": query_id, "type": "QUERY"}
        return await self._request(
            "POST",
            "/v1/exports",
            lambda env: Export.from_api(env.get("data")),
            params={"organisation_id": organisation_id},
            json=payload,
        )

    async def update_export(self, export: Export, **changes: str) -> Export:
        """Change an export's fields (e.g. ``query_id``) with PUT."""
        payload = {
            "name": export.name,
            "output_format": export.output_format,
            "query_id": export.query_id,
            "type": export.type,
            **changes,
        }
        return await self._request(
            "PUT",
            f"/v1/exports/{export.id}",
            lambda env: Export.from_api(env.get("data")),
            params={"organisation_id": export.organisation_id} if export.organisation_id else None,
            json=payload,
        )

    async def create_query(self, datamart_id: str, text: str) -> str:
        """Create an OTQL query; returns its id."""
        payload = {"query_text": text, "datamart_id": datamart_id, "query_language": "OTQL"}
        return await self._request(
            "POST",
            f"/v1/datamarts/{datamart_id}/queries",
            lambda env: required_id(require_object(env.get("data"))),
            json=payload,
        )

    async def get_query(self, datamart_id: str, query_id: str) -> dict[str, Any]:
        """An OTQL query as the API shows it (``query_text``, ...)."""
        return await self._request(
            "GET", f"/v1/datamarts/{datamart_id}/queries/{query_id}", lambda env: require_object(env.get("data"))
        )

    async def check_query(self, datamart_id: str, text: str) -> QueryCheck:
        """Check an OTQL query *without running it* (``query_check/otql``).

        The answer says VALID, PARSING_ERROR or VALIDATION_ERROR, with the platform's
        message and position for a bad query (scrubbed: it is the server's text).
        """
        check = await self._request(
            "POST",
            f"/v1/datamarts/{datamart_id}/query_check/otql",
            lambda env: QueryCheck.from_api(env.get("data")),
            json={"query": text},
        )
        if check.message is None:
            return check
        return QueryCheck(check.type, self.transport.secret.cut(check.message, 300), check.position)

    # -- executions ----------------------------------------------------------------------
    async def create_execution(self, export_id: str, *, budget: Budget | None = None) -> Execution:
        """Start a new execution of the export (the body is ``{}``, as the API demands).

        Retried here only when nothing can have been created: a 429 (the platform
        refused the request) or a failed connect (nothing was sent). After a 5xx, a
        timeout, a reset after sending or an unreadable answer, the platform may have
        created the execution: the error is raised, and the caller (the scheduler) looks
        for the execution in the list before creating another — a blind retry would
        make two. ``budget``: the caller's, when this create is one try of its operation.
        """
        return await self._request(
            "POST",
            f"/v1/exports/{export_id}/executions",
            lambda env: self._own_execution(env.get("data")),
            json={},
            retry_if=nothing_created,
            budget=budget,
        )

    async def list_executions(self, export_id: str, first_result: int = 0, max_results: int = 10) -> Page:
        """One page of the export's executions, newest first; items are Execution."""
        return await self._page(
            f"/v1/exports/{export_id}/executions", {}, first_result, max_results, Execution.from_api
        )

    async def iter_executions(
        self, export_id: str, page_size: int = 10, *, max_pages: int = MAX_PAGES
    ) -> AsyncIterator[Execution]:
        """The export's executions, newest first, paging as needed (at most ``max_pages``)."""
        async for execution in self._iter_pages(
            f"/v1/exports/{export_id}/executions", {}, page_size, Execution.from_api, max_pages=max_pages
        ):
            yield execution

    async def find_execution(
        self, export_id: str, execution_id: str, page_size: int = 10, *, max_pages: int = FIND_EXECUTION_MAX_PAGES
    ) -> Execution | None:
        """The execution with this id, looked up page by page (no single GET exists).

        This is every poll, so only the wanted item is modelled whole; the others are checked
        as :meth:`Execution.from_api` would check them first (an object with an id: all it can
        refuse in them) and kept as their id, for the paging's each-id-once rule. The walk is
        closed here, not left to the garbage collector's finaliser (a wake-up of the loop).
        """

        def pick(raw: Any) -> Execution | str:
            data = require_object(raw)
            found = required_id(data)
            return Execution.from_api(data) if found == execution_id else found

        walk = self._iter_pages(f"/v1/exports/{export_id}/executions", {}, page_size, pick, max_pages=max_pages)
        async with contextlib.aclosing(walk) as items:
            async for item in items:
                if isinstance(item, Execution):
                    return item
        return None

    async def cancel_execution(self, export_id: str, execution_id: str) -> None:
        """Ask the platform to cancel an execution (an *assumed* endpoint: best effort)."""
        await self._request(
            "POST",
            f"/v1/exports/{export_id}/executions/{execution_id}/action",
            lambda env: env,
            json={"action": "CANCEL"},
        )

    # -- files -----------------------------------------------------------------------------
    def _own_execution(self, data: Any) -> Execution:
        """The execution a create answered with; an id that echoes the token is no id (it would
        go into the manifest and a file name)."""
        execution = Execution.from_api(data)
        if self.transport.secret.echoed_in(execution.id):
            raise MalformedResponseError("data.id", "echoes the request's credentials")
        return execution

    def stream_result(
        self,
        export_id: str,
        execution_id: str,
        *,
        technical_name: str = "export",
        start: int = 0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        budget: Budget | None = None,
        validator: str | None = None,
        total: int | None = None,
        on_validator: Callable[[str, int], None] | None = None,
    ) -> ResumableStream:
        """The result file's bytes from offset ``start``, in chunks of up to ``chunk_bytes``
        (a :class:`~orchestrator.stream.ResumableStream`: resumed after a cut, byte-exact).
        ``budget``: the caller's (resumable), when this stream is one part of its operation.
        ``validator``, ``total``: what an earlier run recorded of the file whose bytes before
        ``start`` it kept (If-Range is sent; every size stated must be ``total``);
        ``on_validator`` hears the validator and size of a first answer, to record them."""
        if self.transport.secret.echoed_in(technical_name):
            # Never put the token in a URL (NOTES.md), even one that echoes it back.
            raise MalformedResponseError("result.output_files[0]", "echoes the request's credentials")
        path = f"/v1/exports/{export_id}/executions/{execution_id}/files/technical_name={technical_name}"
        return ResumableStream(
            self.transport, self.retry, path, None, start, chunk_bytes, budget, validator, on_validator, total
        )

    def stream_data_file(
        self,
        organisation_id: str,
        execution_id: str,
        kind: str = "data",
        *,
        start: int = 0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> ResumableStream:
        """An execution's data file (``kind`` "data" or "error") via the data_file API."""
        uri = f"mics://data_file/tenants/{organisation_id}/jobs/executions/{execution_id}/result/export.{kind}"
        return ResumableStream(self.transport, self.retry, "/v1/data_file/data", {"uri": uri}, start, chunk_bytes)

    async def fetch_error_file(
        self, organisation_id: str, execution_id: str, limit_bytes: int = 1 << 20
    ) -> bytes | None:
        """A FAILED execution's error file (first ``limit_bytes``), or None if there is none.

        Scrubbed of the token (the file is the server's text, and goes to disk): the
        whole text read is scrubbed before it is cut, and a cut that ends in the first
        bytes of the token loses them. The caller bounds the time it may take.
        """
        out = bytearray()
        try:
            # Closed at once when the cap is reached: its connection is released now, not at GC.
            stream = cast(AsyncGenerator[bytes, None], self.stream_data_file(organisation_id, execution_id, "error"))
            async with contextlib.aclosing(stream) as chunks:
                async for chunk in chunks:
                    out += chunk
                    if len(out) >= limit_bytes:
                        break
        except NotFoundError:
            return None
        return self.transport.secret.cut_bytes(bytes(out), limit_bytes)


def nothing_created(exc: BaseException) -> bool:
    """Whether a failed create-execution is safe to send again: a 429 or a failed connect."""
    return isinstance(exc, ConnectError) or (isinstance(exc, TransientApiError) and exc.status == 429)


__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_CHUNK_BYTES",
    "ApiClient",
]
