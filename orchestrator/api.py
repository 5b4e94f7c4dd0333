"""ApiClient: the one place that speaks HTTP to the mediarithmics API.

One aiohttp session per client. Every request goes through :meth:`ApiClient._call`, which
adds the token header, unwraps the ``{"status": "ok", "data": ...}`` envelope, turns
error envelopes into :class:`~orchestrator.errors.ApiError` subclasses, and retries the
transient ones (429, 5xx, connection trouble) with the ``backoff`` library.

Retry waits (seconds), for the n-th retry (n = 0, 1, ...)::

    wait_n = Retry-After                                  if the server sent one
           = uniform(0, min(max_wait_s, base_s * 2 ** n)) otherwise ("full jitter")

capped by ``max_tries`` attempts and ``max_time_s`` in all. Other 4xx fail at once.

A shared :class:`Throttle` makes the whole client slow down when the API says 429: one
pause for every request (``Retry-After`` or a growing default), and a cap on requests in
flight that halves on each 429 and climbs back by ``recovery_step`` per success (AIMD).

The token lives only in the ``Authorization`` header: never in a URL, a log line, an
exception or a repr.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import anyio
import backoff
import orjson

from orchestrator._version import __version__
from orchestrator.errors import (
    TRANSIENT,
    ApiError,
    AuthError,
    ConnectError,
    IncompleteBodyError,
    NotFoundError,
    TransientApiError,
    TransportError,
)
from orchestrator.models import Execution, Export, Page

log = logging.getLogger("orchestrator.api")
T = TypeVar("T")

DEFAULT_BASE_URL = "https://api.mediarithmics.com"
DEFAULT_CHUNK_BYTES = 1 << 20
"""1 MiB: measured (PERF-NOTES) to move bytes 2× faster than 64 KiB chunks."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-phase HTTP timeouts in seconds (None: no limit)."""

    connect_s: float | None = 10.0
    """To open a connection (TCP and TLS)."""
    read_s: float | None = 60.0
    """Between two reads on the socket: a stalled body fails after this."""
    request_s: float | None = 120.0
    """A whole non-streaming request (a download has no total limit, only read_s)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How transient failures are retried (see the module docstring for the formula)."""

    max_tries: int = 8
    max_time_s: float = 600.0
    base_s: float = 0.5
    max_wait_s: float = 30.0
    max_retry_after_s: float = 300.0
    """A larger Retry-After is capped here: a nightly batch does not sleep for hours."""


class _Secret:
    """Holds the token so that no repr, log or traceback local shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def scrub(self, text: object) -> str | None:
        """``text`` as a string with the secret replaced by ``***`` (None stays None)."""
        return None if text is None else str(text).replace(self._value, "***")

    def __repr__(self) -> str:
        return "<token redacted>"

    __str__ = __repr__


class Throttle:
    """Shared back-pressure: a pause and an AIMD cap on requests in flight.

    On a 429, every request waits until the pause ends and the cap halves; each success
    raises the cap by ``recovery_step`` until ``max_in_flight``. The pause is the server's
    ``Retry-After`` or, without one, ``min(max_pause_s, base_pause_s * 2 ** k)`` for the
    k-th 429 in a row (seconds).
    """

    def __init__(
        self,
        max_in_flight: int = 64,
        recovery_step: float = 0.25,
        base_pause_s: float = 0.5,
        max_pause_s: float = 30.0,
        max_retry_after_s: float = 300.0,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.base_pause_s = base_pause_s
        self.max_pause_s = max_pause_s
        self.max_retry_after_s = max_retry_after_s
        self.limit = float(max_in_flight)
        self.recovery_step = recovery_step
        self.in_flight = 0
        self.pause_until = 0.0
        self.throttled = 0  # 429s seen
        self._consecutive = 0
        self._wake: anyio.Event | None = None

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one request slot; wait for the pause and for a free slot first."""
        while True:
            delay = self.pause_until - time.monotonic()
            if delay > 0:
                await anyio.sleep(delay)
                continue
            if self.in_flight < max(1, int(self.limit)):
                break
            if self._wake is None:
                self._wake = anyio.Event()
            await self._wake.wait()
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            if self._wake is not None:
                self._wake.set()
                self._wake = None

    def on_success(self) -> None:
        """A request went through: recover a little."""
        self._consecutive = 0
        if self.limit < self.max_in_flight:
            self.limit = min(float(self.max_in_flight), self.limit + self.recovery_step)

    def on_throttled(self, retry_after_s: float | None) -> None:
        """The API said 429: pause everyone and halve the cap."""
        self.throttled += 1
        self._consecutive += 1
        if retry_after_s is not None:
            pause = min(retry_after_s, self.max_retry_after_s)
        else:
            pause = min(self.max_pause_s, self.base_pause_s * 2 ** (self._consecutive - 1))
        self.pause_until = max(self.pause_until, time.monotonic() + pause)
        new_limit = max(1.0, self.limit / 2)
        if int(new_limit) < int(self.limit):
            log.info(
                "API rate limit (429): pausing %.1fs, requests in flight capped at %d",
                pause,
                int(new_limit),
                extra={"event": "throttled", "pause_s": pause, "limit": int(new_limit)},
            )
        self.limit = new_limit


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        # An HTTP date is allowed too.
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _error_from(status: int, body: bytes, method: str, path: str, retry_after: str | None, secret: _Secret) -> ApiError:
    """The ApiError for an error answer, from its envelope when it has one.

    The answer's text is the server's, so it is scrubbed of the token: a gateway that
    echoes the Authorization header must not put it in a manifest or an error line.
    """
    error = error_id = None
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
        env = orjson.loads(body)
        error, error_id = env.get("error"), env.get("error_id")
    if error is None:
        error = body[:200].decode("utf-8", "replace").strip() or None
    error, error_id = secret.scrub(error), secret.scrub(error_id)
    kw: dict[str, Any] = {"method": method, "path": path}
    if status in (401, 403):
        return AuthError(status, error, error_id, **kw)
    if status == 404:
        return NotFoundError(status, error, error_id, **kw)
    if status == 429 or status >= 500:
        return TransientApiError(status, error, error_id, retry_after_s=_parse_retry_after(retry_after), **kw)
    return ApiError(status, error, error_id, **kw)


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
        self.base_url = base_url.rstrip("/")
        self._token = _Secret(token)
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self.max_connections = max_connections
        self.throttle = Throttle(
            max_requests_in_flight,
            base_pause_s=self.retry.base_s,
            max_pause_s=self.retry.max_wait_s,
            max_retry_after_s=self.retry.max_retry_after_s,
        )
        # The files compress ~4× but inflating costs ~2.6 CPU-s/GB on the event loop
        # (PERF-NOTES): ask for identity unless the link is slower than ~100 MB/s.
        self.accept_gzip = accept_gzip
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"ApiClient(base_url={self.base_url!r})"

    async def __aenter__(self) -> ApiClient:
        connector = aiohttp.TCPConnector(limit=self.max_connections, ssl=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={
                "Authorization": self._token.reveal(),
                "User-Agent": f"mics-export/{__version__}",
                "Accept-Encoding": "gzip, deflate" if self.accept_gzip else "identity",
            },
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.timeouts.connect_s, sock_read=self.timeouts.read_s
            ),
            read_bufsize=1 << 21,
            raise_for_status=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ApiClient used outside `async with`")
        return self._session

    # -- the request machinery -----------------------------------------------------------
    def _waits(self) -> Generator[float, Any, None]:
        """backoff wait generator: Retry-After when sent, else exponential full jitter."""
        policy = self.retry
        n = 0
        exc = yield 0.0  # backoff primes the generator with send(None); this value is unused
        while True:
            retry_after = getattr(exc, "retry_after_s", None)
            if retry_after is not None:
                wait = min(float(retry_after), policy.max_retry_after_s)
            else:
                wait = random.uniform(0, min(policy.max_wait_s, policy.base_s * 2**n))
            n += 1
            exc = yield wait

    def _on_backoff(self, details: Any) -> None:
        exc = details.get("exception")
        log.info(
            "retrying after %s (try %d, waiting %.2fs)",
            exc,
            details["tries"],
            details["wait"],
            extra={"event": "retry", "error": str(exc), "tries": details["tries"]},
        )

    async def _retrying(
        self,
        func: Callable[[], Awaitable[T]],
        retry_on: tuple[type[Exception], ...] = TRANSIENT,
    ) -> T:
        """Run ``func`` and retry it on ``retry_on`` (the transient errors), per the RetryPolicy."""

        async def call() -> T:  # backoff needs a coroutine function to retry asynchronously
            return await func()

        wrapped = backoff.on_exception(
            self._waits,
            retry_on,
            max_tries=self.retry.max_tries,
            max_time=self.retry.max_time_s,
            jitter=None,
            on_backoff=self._on_backoff,
            logger=None,
        )(call)
        result: T = await wrapped()
        return result

    async def _once(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None,
        body: bytes | None,
        content_type: str | None,
    ) -> Any:
        """One request; returns the parsed envelope or raises an ApiError/TransportError."""
        headers = {"Content-Type": content_type} if content_type else None
        timeout = aiohttp.ClientTimeout(
            total=self.timeouts.request_s,
            sock_connect=self.timeouts.connect_s,
            sock_read=self.timeouts.read_s,
        )
        async with self.throttle.slot():
            try:
                async with self.session.request(
                    method,
                    self.base_url + path,
                    params=params,
                    data=body,
                    headers=headers,
                    timeout=timeout,
                ) as resp:
                    raw = await resp.read()
                    status, retry_after = resp.status, resp.headers.get("Retry-After")
            except aiohttp.ClientPayloadError as exc:
                raise IncompleteBodyError(f"{method} {path}: response cut short ({exc})") from None
            except aiohttp.ClientConnectorError as exc:
                raise ConnectError(f"{method} {path}: {_describe(exc)}") from None
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise TransportError(f"{method} {path}: {_describe(exc)}") from None
        if status == 429:
            self.throttle.on_throttled(_parse_retry_after(retry_after))
        if status >= 400:
            raise _error_from(status, raw, method, path, retry_after, self._token)
        self.throttle.on_success()
        try:
            envelope = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ApiError(status, "response is not JSON", method=method, path=path) from None
        if not isinstance(envelope, dict) or envelope.get("status") != "ok":
            err = envelope.get("error") if isinstance(envelope, dict) else None
            raise ApiError(status, err or "unexpected response", method=method, path=path)
        return envelope

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        text: str | None = None,
    ) -> Any:
        """A retried request; returns the whole envelope (``data`` and paging keys)."""
        body: bytes | None = None
        content_type = None
        if json is not None:
            body, content_type = orjson.dumps(json), "application/json"
        elif text is not None:
            body, content_type = text.encode(), "text/plain; charset=utf-8"
        return await self._retrying(lambda: self._once(method, path, params, body, content_type))

    async def _page(self, path: str, params: dict[str, Any], first: int, size: int) -> Page:
        env = await self._call("GET", path, params={**params, "first_result": first, "max_results": size})
        total = env.get("total")
        return Page(
            items=tuple(env.get("data") or ()),
            first_result=int(env.get("first_result", first)),
            max_results=int(env.get("max_results", size)),
            total=None if total is None else int(total),
        )

    async def _iter_pages(self, path: str, params: dict[str, Any], page_size: int) -> AsyncIterator[Any]:
        first = 0
        while True:
            page = await self._page(path, params, first, page_size)
            for item in page.items:
                yield item
            if not page.items or not page.has_more:
                return
            first += len(page.items)

    # -- exports and queries -------------------------------------------------------------
    async def iter_exports(self, organisation_id: str, page_size: int = 50) -> AsyncIterator[Export]:
        """Every export of the organisation, through all pages."""
        async for item in self._iter_pages("/v1/exports", {"organisation_id": organisation_id}, page_size):
            yield Export.from_api(item)

    async def list_exports(self, organisation_id: str, page_size: int = 50) -> list[Export]:
        """Every export of the organisation, through all pages."""
        return [e async for e in self.iter_exports(organisation_id, page_size)]

    async def get_export(self, export_id: str, organisation_id: str) -> Export:
        """One export's definition."""
        env = await self._call("GET", f"/v1/exports/{export_id}", params={"organisation_id": organisation_id})
        return Export.from_api(env["data"])

    async def create_export(self, organisation_id: str, name: str, query_id: str) -> Export:
        """A new QUERY export with JSON output on an existing query."""
        payload = {"name": name, "output_format": "JSON", "query_id": query_id, "type": "QUERY"}
        env = await self._call("POST", "/v1/exports", params={"organisation_id": organisation_id}, json=payload)
        return Export.from_api(env["data"])

    async def update_export(self, export: Export, **changes: str) -> Export:
        """Change an export's fields (e.g. ``query_id``) with PUT."""
        payload = {
            "name": export.name,
            "output_format": export.output_format,
            "query_id": export.query_id,
            "type": export.type,
            **changes,
        }
        env = await self._call(
            "PUT",
            f"/v1/exports/{export.id}",
            params={"organisation_id": export.organisation_id} if export.organisation_id else None,
            json=payload,
        )
        return Export.from_api(env["data"])

    async def create_query(self, datamart_id: str, text: str) -> str:
        """Create an OTQL query; returns its id."""
        payload = {"query_text": text, "datamart_id": datamart_id, "query_language": "OTQL"}
        env = await self._call("POST", f"/v1/datamarts/{datamart_id}/queries", json=payload)
        return str(env["data"]["id"])

    async def get_query(self, datamart_id: str, query_id: str) -> dict[str, Any]:
        """An OTQL query as the API shows it (``query_text``, ...)."""
        env = await self._call("GET", f"/v1/datamarts/{datamart_id}/queries/{query_id}")
        data: dict[str, Any] = env["data"]
        return data

    async def check_query(self, datamart_id: str, text: str) -> dict[str, Any]:
        """Run the query once to check it; raises ApiError with the API's message if bad."""
        env = await self._call(
            "POST",
            f"/v1/datamarts/{datamart_id}/query_executions/otql",
            params={"use_cache": "true", "limit": 10},
            text=text,
        )
        data: dict[str, Any] = env.get("data") or {}
        return data

    # -- executions ----------------------------------------------------------------------
    async def create_execution(self, export_id: str) -> Execution:
        """Start a new execution of the export (the body is ``{}``, as the API demands).

        Not retried: a retry after a lost response would create a second execution. The
        caller (the scheduler) recovers from that window by looking at the list.
        """
        path = f"/v1/exports/{export_id}/executions"
        # 429 and 5xx answers and failed connects are safe to retry (nothing was created);
        # a transport error after sending is not, so it is raised to the caller.
        env = await self._retrying(
            lambda: self._once("POST", path, None, b"{}", "application/json"),
            retry_on=(TransientApiError, ConnectError),
        )
        return Execution.from_api(env["data"])

    async def list_executions(self, export_id: str, first_result: int = 0, max_results: int = 10) -> Page:
        """One page of the export's executions, newest first; items are Execution."""
        page = await self._page(f"/v1/exports/{export_id}/executions", {}, first_result, max_results)
        return Page(
            items=tuple(Execution.from_api(i) for i in page.items),
            first_result=page.first_result,
            max_results=page.max_results,
            total=page.total,
        )

    async def iter_executions(self, export_id: str, page_size: int = 10) -> AsyncIterator[Execution]:
        """The export's executions, newest first, paging as needed."""
        async for item in self._iter_pages(f"/v1/exports/{export_id}/executions", {}, page_size):
            yield Execution.from_api(item)

    async def find_execution(self, export_id: str, execution_id: str, page_size: int = 10) -> Execution | None:
        """The execution with this id, looked up page by page (no single GET exists)."""
        async for execution in self.iter_executions(export_id, page_size):
            if execution.id == execution_id:
                return execution
        return None

    async def cancel_execution(self, export_id: str, execution_id: str) -> None:
        """Ask the platform to cancel an execution (an *assumed* endpoint: best effort)."""
        await self._call(
            "POST",
            f"/v1/exports/{export_id}/executions/{execution_id}/action",
            json={"action": "CANCEL"},
        )

    # -- files -----------------------------------------------------------------------------
    def stream_result(
        self,
        export_id: str,
        execution_id: str,
        *,
        technical_name: str = "export",
        start: int = 0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> AsyncIterator[bytes]:
        """The result file's bytes from offset ``start``, in chunks of up to ``chunk_bytes``.

        A connection cut mid-body is resumed at the right offset with ``Range``; if the
        server ignores Range (200), the bytes already had are skipped, so the stream is
        byte-exact either way. A body shorter than its Content-Length is an error that
        is retried like a reset, never a silent short file.
        """
        path = f"/v1/exports/{export_id}/executions/{execution_id}/files/technical_name={technical_name}"
        return self._stream(path, None, start, chunk_bytes)

    def stream_data_file(
        self,
        organisation_id: str,
        execution_id: str,
        kind: str = "data",
        *,
        start: int = 0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> AsyncIterator[bytes]:
        """An execution's data file (``kind`` "data" or "error") via the data_file API."""
        uri = f"mics://data_file/tenants/{organisation_id}/jobs/executions/{execution_id}/result/export.{kind}"
        return self._stream("/v1/data_file/data", {"uri": uri}, start, chunk_bytes)

    def _stream(self, path: str, params: dict[str, Any] | None, start: int, chunk_bytes: int) -> AsyncIterator[bytes]:
        from orchestrator.stream import resumable_stream

        return resumable_stream(self, path, params, start, chunk_bytes)

    async def fetch_error_file(
        self, organisation_id: str, execution_id: str, limit_bytes: int = 1 << 20
    ) -> bytes | None:
        """A FAILED execution's error file (first ``limit_bytes``), or None if there is none."""
        out = bytearray()
        try:
            async for chunk in self.stream_data_file(organisation_id, execution_id, "error"):
                out += chunk
                if len(out) >= limit_bytes:
                    break
        except NotFoundError:
            return None
        return bytes(out[:limit_bytes])


def _describe(exc: BaseException) -> str:
    """A short description of a transport exception, without request headers."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_CHUNK_BYTES",
    "ApiClient",
    "RetryPolicy",
    "Throttle",
    "Timeouts",
]
