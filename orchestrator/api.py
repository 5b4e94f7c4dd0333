"""ApiClient: the one place that speaks HTTP to the mediarithmics API.

One aiohttp session per client. Every request goes through :meth:`ApiClient._call`, which
adds the token header, unwraps the ``{"status": "ok", "data": ...}`` envelope, turns
error envelopes into :class:`~orchestrator.errors.ApiError` subclasses, and retries the
transient ones (429, 5xx, connection trouble) with the ``backoff`` library.

Retry waits (seconds), for the n-th retry (n = 0, 1, ...)::

    wait_n = Retry-After                                  if the server sent one
           = uniform(0, min(max_wait_s, base_s * 2 ** n)) otherwise ("full jitter")

capped by ``max_tries`` attempts and ``max_time_s`` in all (the exponent is capped too,
so a huge ``max_tries`` never overflows a float). Other 4xx fail at once.

An answer is parsed inside the retried call: a 2xx answer the models cannot read (a
missing id, an object where a list belongs) is a :class:`MalformedResponseError` naming
the field, retried like a 5xx, then raised to the job that asked. A create-execution is
the exception to blind retries: only 429 and a failed connect (nothing was sent) are
retried here; after anything else the outcome is unknown, and the caller looks for the
execution before creating another (see :meth:`ApiClient.create_execution`).

Lists are paged with ``first_result``/``max_results``; a lookup stops, with an error that
says so, when a page brings no new ids (the server ignores ``first_result``) or after
``MAX_PAGES`` pages, so a broken list can never page forever.

A shared :class:`Throttle` makes the whole client slow down when the API says 429: one
pause for every request (``Retry-After`` or a growing default), and a cap on requests in
flight that halves on each 429 and climbs back by ``recovery_step`` per success (AIMD).

The token lives only in the ``Authorization`` header: never in a URL, a log line, an
exception or a repr. Text the server sends back (error bodies, error files, execution
errors) may echo it: :meth:`ApiClient.scrub` removes it, before any truncation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar, cast, overload

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
    MalformedResponseError,
    NotFoundError,
    PagingError,
    TransientApiError,
    TransportError,
)
from orchestrator.models import Execution, Export, Page, QueryCheck, error_text, require_object, required_id

log = logging.getLogger("orchestrator.api")
T = TypeVar("T")

DEFAULT_BASE_URL = "https://api.mediarithmics.com"
DEFAULT_CHUNK_BYTES = 1 << 20
"""1 MiB: measured (PERF-NOTES) to move bytes 2× faster than 64 KiB chunks."""
MAX_PAGES = 1000
"""The most pages one walk through a list may read (50,000 exports at 50 a page)."""
FIND_EXECUTION_MAX_PAGES = 100
"""find_execution looks this deep (1,000 executions at 10 a page): ours are recent."""
ERROR_TEXT_CHARS = 200
"""An error body is cut to this many characters in a message (after scrubbing)."""
MAX_EXPONENT = 32
"""Exponential waits stop doubling here: 2**32 times any base is past every cap."""


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
        return None if text is None else str(text).replace(self._value, "***") if self._value else str(text)

    def scrub_bytes(self, data: bytes) -> bytes:
        """``data`` with the secret (UTF-8) replaced by ``***``."""
        return data.replace(self._value.encode(), b"***") if self._value else data

    def cut(self, text: str, limit: int) -> str:
        """``text`` scrubbed, then cut to ``limit`` characters; a cut that ends in the first
        characters of the secret (text that was itself cut short) loses them too."""
        text = self.scrub(text) or ""
        if len(text) > limit:
            text = text[:limit].rstrip() + "…"
        return self.scrub_tail(text)

    def scrub_tail(self, text: str) -> str:
        """``text`` without a trailing beginning of the secret (4+ characters)."""
        for n in range(min(len(self._value) - 1, len(text)), 3, -1):
            if text.endswith(self._value[:n]):
                return text[:-n] + "***"
        return text

    def cut_bytes(self, data: bytes, limit: int) -> bytes:
        """:meth:`cut` for bytes: scrubbed whole, cut to ``limit``, no trailing start of the secret."""
        data = self.scrub_bytes(data)[:limit]
        secret = self._value.encode()
        for n in range(min(len(secret) - 1, len(data)), 3, -1):
            if data.endswith(secret[:n]):
                return data[:-n] + b"***"
        return data

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
            # Hours of 429s in a row must not overflow the float: the exponent is capped.
            pause = min(self.max_pause_s, self.base_pause_s * 2 ** min(self._consecutive - 1, MAX_EXPONENT))
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

    The answer's text is the server's, so it is scrubbed of the token *before* it is cut
    to a readable length: a gateway page that echoes the Authorization header must not
    put the token, or the first characters of it, in a manifest or an error line.
    """
    error = error_id = error_code = None
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
        env = orjson.loads(body)
        error, error_id, error_code = env.get("error"), env.get("error_id"), env.get("error_code")
    text = error_text(error, limit=1 << 16)
    if text is None:
        text = " ".join(body.decode("utf-8", "replace").split()) or None
    message = secret.cut(text, ERROR_TEXT_CHARS) if text else None
    kw: dict[str, Any] = {
        "method": method,
        "path": path,
        "error_code": _short(error_code, secret),
    }
    error_id = _short(error_id, secret)
    if status in (401, 403):
        return AuthError(status, message, error_id, **kw)
    if status == 404:
        return NotFoundError(status, message, error_id, **kw)
    if status == 429 or status >= 500:
        return TransientApiError(status, message, error_id, retry_after_s=_parse_retry_after(retry_after), **kw)
    return ApiError(status, message, error_id, **kw)


def _short(value: Any, secret: _Secret) -> str | None:
    """An id-like field of an error envelope (``error_id``, ``error_code``) as short, clean text."""
    if value is None or isinstance(value, (dict, list)) or value == "":
        return None
    return secret.cut(" ".join(str(value).split()), 80)


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
            return self._token.scrub_bytes(text)
        return self._token.scrub(text) or ""

    def describe(self, exc: BaseException) -> str:
        """:func:`_describe` of a transport exception, scrubbed of the token, then cut."""
        return self._token.cut(_describe(exc), ERROR_TEXT_CHARS)

    # -- the request machinery -----------------------------------------------------------
    def retry_wait(self, n: int, exc: BaseException | None = None) -> float:
        """Seconds to wait before the n-th retry (n = 0, 1, ...) after ``exc``: the
        server's Retry-After when it sent one, else exponential full jitter."""
        policy = self.retry
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:
            return min(float(retry_after), policy.max_retry_after_s)
        return random.uniform(0, min(policy.max_wait_s, policy.base_s * 2 ** min(n, MAX_EXPONENT)))

    def _waits(self) -> Generator[float, Any, None]:
        """backoff wait generator: Retry-After when sent, else exponential full jitter."""
        n = 0
        exc = yield 0.0  # backoff primes the generator with send(None); this value is unused
        while True:
            wait = self.retry_wait(n, exc)
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
        *,
        giveup: Callable[[Exception], bool] | None = None,
    ) -> T:
        """Run ``func`` and retry it on ``retry_on`` (the transient errors), per the RetryPolicy,
        unless ``giveup`` says an error is not worth another try."""

        async def call() -> T:  # backoff needs a coroutine function to retry asynchronously
            return await func()

        wrapped = backoff.on_exception(
            self._waits,
            retry_on,
            max_tries=self.retry.max_tries,
            max_time=self.retry.max_time_s,
            jitter=None,
            giveup=giveup or (lambda exc: False),
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
    ) -> tuple[int, dict[str, Any]]:
        """One request; returns (status, the parsed envelope) or raises an ApiError/TransportError."""
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
                raise IncompleteBodyError(f"{method} {path}: response cut short ({self.describe(exc)})") from None
            except aiohttp.ClientConnectorError as exc:
                raise ConnectError(f"{method} {path}: {self.describe(exc)}") from None
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise TransportError(f"{method} {path}: {self.describe(exc)}") from None
        if status == 429:
            self.throttle.on_throttled(_parse_retry_after(retry_after))
        if status >= 400:
            raise _error_from(status, raw, method, path, retry_after, self._token)
        self.throttle.on_success()
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
            raise _error_from(status, raw, method, path, None, self._token)
        return status, envelope

    async def _request(
        self,
        method: str,
        path: str,
        parse: Callable[[dict[str, Any]], T],
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        text: str | None = None,
        retry_on: tuple[type[Exception], ...] = TRANSIENT,
        giveup: Callable[[Exception], bool] | None = None,
    ) -> T:
        """A retried request whose envelope ``parse`` turns into the result, inside the retry:
        an answer that cannot be read is retried like a 5xx (MalformedResponseError)."""
        body: bytes | None = None
        content_type = None
        if json is not None:
            body, content_type = orjson.dumps(json), "application/json"
        elif text is not None:
            body, content_type = text.encode(), "text/plain; charset=utf-8"

        async def once() -> T:
            status, envelope = await self._once(method, path, params, body, content_type)
            try:
                return parse(envelope)
            except MalformedResponseError as exc:
                raise exc.at(method=method, path=path, status=status) from None
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                # A shape no model foresaw: the job's problem, never a traceback.
                raise MalformedResponseError(
                    "data", f"cannot be read ({type(exc).__name__})", status=status, method=method, path=path
                ) from None

        return await self._retrying(once, retry_on, giveup=giveup)

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
        return await self._request(method, path, lambda env: env, params=params, json=json, text=text)

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
    ) -> AsyncIterator[T]:
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
                key = getattr(thing, "id", None)
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
        return QueryCheck(check.type, self._token.cut(check.message, 300), check.position)

    # -- executions ----------------------------------------------------------------------
    async def create_execution(self, export_id: str) -> Execution:
        """Start a new execution of the export (the body is ``{}``, as the API demands).

        Retried here only when nothing can have been created: a 429 (the platform
        refused the request) or a failed connect (nothing was sent). After a 5xx, a
        timeout, a reset after sending or an unreadable answer, the platform may have
        created the execution: the error is raised, and the caller (the scheduler) looks
        for the execution in the list before creating another — a blind retry would
        make two.
        """
        path = f"/v1/exports/{export_id}/executions"
        return await self._request(
            "POST",
            path,
            lambda env: Execution.from_api(env.get("data")),
            json={},
            retry_on=(TransientApiError, ConnectError),
            giveup=lambda exc: not isinstance(exc, ConnectError) and getattr(exc, "status", None) != 429,
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
        """The execution with this id, looked up page by page (no single GET exists)."""
        async for execution in self.iter_executions(export_id, page_size, max_pages=max_pages):
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
        return self._token.cut_bytes(bytes(out), limit_bytes)


def _describe(exc: BaseException) -> str:
    """A short, one-line description of a transport exception, without request headers.

    Only the first line of the library's message: aiohttp's parser errors go on with the
    raw bytes it choked on (a header line, a piece of the body), which are the server's
    and may echo the token, cut anywhere in it (see :meth:`ApiClient.describe`).
    """
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    message = exc.message if isinstance(exc, aiohttp.ClientResponseError) else exc
    lines = str(message).strip().splitlines()
    text = lines[0].strip().rstrip(":").strip() if lines else ""
    name = type(exc).__name__
    return f"{name}: {text}" if text and text != name else name


__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_CHUNK_BYTES",
    "ApiClient",
    "RetryPolicy",
    "Throttle",
    "Timeouts",
]
