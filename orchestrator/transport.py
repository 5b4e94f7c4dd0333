"""The HTTP layer under the API client: one session, one error mapping, one status check.

:class:`Transport` owns the aiohttp session (with the token in its ``Authorization``
header), the shared :class:`Throttle`, and the two places where HTTP becomes the project's
errors, used by every request, JSON or file:

* :meth:`Transport.errors` — the one mapping of aiohttp / timeout / inflate exceptions to
  :class:`~orchestrator.errors.TransportError` (:class:`ConnectError` when nothing was sent,
  :class:`IncompleteBodyError` for a body cut short), described in one scrubbed, cut line
  (httpx's ``map_httpcore_exceptions`` is the model);
* :meth:`Transport.raise_for_status` — the one status check: 4xx/5xx to an
  :class:`~orchestrator.errors.ApiError` subclass from the error envelope, a 429 to the
  throttle (with its ``Retry-After``, seconds or an HTTP date).

:meth:`Transport.send` is both in order, inside a throttle slot.

A :class:`Throttle` makes the whole client slow down when the API says 429: one pause for
every request (``Retry-After`` or a growing default), and a cap on requests in flight (an
``anyio.CapacityLimiter`` whose ``total_tokens`` is resized) that halves on each 429 and
climbs back by ``recovery_step`` per success (AIMD).

The token lives only in the ``Authorization`` header: never in a URL, a log line, an
exception or a repr. Text the server sends back may echo it: :class:`Secret` removes it,
*before* any truncation, and a cut that ends in the token's first characters loses them.

Every request passes here, so the per-request work is kept to what differs per request:
the ``ClientTimeout`` objects are built once, and a free throttle slot is taken without a
turn of the event loop. A little over ~350 lines for the same reason the module exists:
one home for the session, the throttle and the error mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import anyio
import orjson
import yarl

from orchestrator._version import __version__
from orchestrator.errors import (
    ApiError,
    AuthError,
    ConnectError,
    IncompleteBodyError,
    NotFoundError,
    TransientApiError,
    TransportError,
)
from orchestrator.framing import CleanConnector
from orchestrator.models import error_text
from orchestrator.retry import MAX_EXPONENT
from orchestrator.secret import Secret

log = logging.getLogger("orchestrator.api")

ERROR_TEXT_CHARS = 200
"""An error body is cut to this many characters in a message (after scrubbing)."""
MAPPED: tuple[type[BaseException], ...] = (TimeoutError, aiohttp.ClientError, zlib.error)
"""What :meth:`Transport.errors` maps to a TransportError (ClientPayloadError, ClientConnectorError
are ClientErrors)."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-phase HTTP timeouts in seconds (None: no limit)."""

    connect_s: float | None = 10.0
    """To open a connection (TCP and TLS)."""
    read_s: float | None = 60.0
    """Between two reads on the socket: a stalled body fails after this."""
    request_s: float | None = 120.0
    """A whole non-streaming request (a download has no total limit, only read_s)."""


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
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.recovery_step = recovery_step
        self.base_pause_s = base_pause_s
        self.max_pause_s = max_pause_s
        self.max_retry_after_s = max_retry_after_s
        self.clock = clock
        self.sleep = sleep
        self.pause_until = 0.0
        self.throttled = 0  # 429s seen
        self._consecutive = 0
        self._limit = float(max_in_flight)
        self._slots = anyio.CapacityLimiter(max_in_flight)

    @property
    def limit(self) -> float:
        """The cap on requests in flight, as a float: it climbs by fractions of a request."""
        return self._limit

    @limit.setter
    def limit(self, value: float) -> None:
        self._limit = value
        self._slots.total_tokens = max(1, int(value))  # requests in flight keep their slot

    @property
    def in_flight(self) -> int:
        return self._slots.borrowed_tokens

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one request slot; wait for the pause to end and for a free slot first."""
        borrower = await self.acquire()
        try:
            yield
        finally:
            self.release(borrower)

    async def acquire(self) -> object:
        """Take one request slot (release it with :meth:`release`), after the pause and a free slot.

        A free slot is taken without yielding to the event loop (anyio's ``acquire`` always
        yields once: one more loop turn per request); a wait is anyio's, in order.
        """
        while (delay := self.pause_until - self.clock()) > 0:
            await self.sleep(delay)
        # One token per request, not per task: a task may have a request open while it sends another.
        borrower = object()
        try:
            self._slots.acquire_on_behalf_of_nowait(borrower)
        except anyio.WouldBlock:
            await self._slots.acquire_on_behalf_of(borrower)
        return borrower

    def release(self, borrower: object) -> None:
        """Give back the slot :meth:`acquire` returned."""
        self._slots.release_on_behalf_of(borrower)

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
        self.pause_until = max(self.pause_until, self.clock() + pause)
        new_limit = max(1.0, self.limit / 2)
        if int(new_limit) < int(self.limit):
            log.info(
                "API rate limit (429): pausing %.1fs, requests in flight capped at %d",
                pause,
                int(new_limit),
                extra={"event": "throttled", "pause_s": pause, "limit": int(new_limit)},
            )
        self.limit = new_limit


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """A ``Retry-After`` header in seconds from ``now`` (the wall clock): a number of seconds
    or an HTTP date; None when missing or unreadable. Never negative."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now())
    except (TypeError, ValueError):
        return None


def error_from(status: int, body: bytes, method: str, path: str, retry_after: str | None, secret: Secret) -> ApiError:
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
    kw: dict[str, Any] = {"method": method, "path": path, "error_code": _short(error_code, secret)}
    error_id = _short(error_id, secret)
    if status in (401, 403):
        return AuthError(status, message, error_id, **kw)
    if status == 404:
        return NotFoundError(status, message, error_id, **kw)
    if status == 429 or status >= 500:
        return TransientApiError(status, message, error_id, retry_after_s=parse_retry_after(retry_after), **kw)
    return ApiError(status, message, error_id, **kw)


def _short(value: Any, secret: Secret) -> str | None:
    """An id-like field of an error envelope (``error_id``, ``error_code``) as short, clean text."""
    if value is None or isinstance(value, (dict, list)) or value == "":
        return None
    return secret.cut(" ".join(str(value).split()), 80)


def describe(exc: BaseException) -> str:
    """A short, one-line description of a transport exception, without request headers.

    Only the first line of the library's message: aiohttp's parser errors go on with the
    raw bytes it choked on (a header line, a piece of the body), which are the server's
    and may echo the token, cut anywhere in it (see :meth:`Transport.describe`).
    """
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    message = exc.message if isinstance(exc, aiohttp.ClientResponseError) else exc
    lines = str(message).strip().splitlines()
    text = lines[0].strip().rstrip(":").strip() if lines else ""
    name = type(exc).__name__
    return f"{name}: {text}" if text and text != name else name


class Transport:
    """One aiohttp session to ``base_url``; use as ``async with``. See the module docstring."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeouts: Timeouts,
        throttle: Throttle,
        max_connections: int = 100,
        accept_gzip: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._origin = yarl.URL(self.base_url).origin()
        self.secret = Secret(token)
        self.timeouts = timeouts
        self.throttle = throttle
        self.max_connections = max_connections
        self.accept_gzip = accept_gzip
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float | None, aiohttp.ClientTimeout] = {}
        """One ClientTimeout per ``total_s`` in use (two, in practice): built once, not per request."""

    async def __aenter__(self) -> Transport:
        t = self.timeouts
        self._session = aiohttp.ClientSession(
            connector=CleanConnector(limit=self.max_connections, ssl=True),
            headers={
                "Authorization": self.secret.reveal(),
                "User-Agent": f"mics-export/{__version__}",
                # The files compress ~4× but inflating costs ~2.6 CPU-s/GB on the event loop
                # (PERF-NOTES): ask for identity unless the link is slower than ~100 MB/s.
                "Accept-Encoding": "gzip, deflate" if self.accept_gzip else "identity",
            },
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=t.connect_s, sock_read=t.read_s),
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

    def describe(self, exc: BaseException) -> str:
        """:func:`describe` of a transport exception, scrubbed of the token, then cut."""
        return self.secret.cut(describe(exc), ERROR_TEXT_CHARS)

    @contextlib.contextmanager
    def errors(self, where: str) -> Iterator[None]:
        """Map what aiohttp (or inflating a body) raises to a TransportError, ``where: what``."""
        try:
            yield
        except MAPPED as exc:
            raise self.mapped(exc, where) from None

    def mapped(self, exc: BaseException, where: str) -> TransportError:
        """The TransportError for one of :data:`MAPPED` (what :meth:`errors` raises).

        The hot paths (every request's send and read) catch :data:`MAPPED` themselves and call
        this: a generator-based context manager costs a few µs per use, twice per request.
        """
        if isinstance(exc, aiohttp.ClientPayloadError):
            return IncompleteBodyError(f"{where}: response cut short ({self.describe(exc)})")
        if isinstance(exc, aiohttp.ClientConnectorError):
            return ConnectError(f"{where}: {self.describe(exc)}")
        return TransportError(f"{where}: {self.describe(exc)}")

    async def send(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        total_s: float | None = None,
        raw: bool = False,
        own_statuses: Container[int] = (),
        error_bytes: int | None = None,
    ) -> aiohttp.ClientResponse:
        """One request, in a throttle slot, its errors mapped; the open response (the caller
        releases it) once :meth:`raise_for_status` passed it (``own_statuses`` the caller
        handles itself). ``total_s``: a limit on the whole request, body included; ``raw``: the
        body is not inflated (the caller does it); ``error_bytes``: read at most this much of an
        error body."""
        timeout = self._timeouts.get(total_s)
        if timeout is None:
            timeout = self._timeouts[total_s] = aiohttp.ClientTimeout(
                total=total_s, sock_connect=self.timeouts.connect_s, sock_read=self.timeouts.read_s
            )
        borrower = await self.throttle.acquire()
        try:
            resp = await self.session.request(
                method,
                self.base_url + path,
                params=params,
                data=body,
                headers=headers,
                timeout=timeout,
                auto_decompress=not raw,
            )
        except MAPPED as exc:
            raise self.mapped(exc, f"{method} {path}") from None
        except ValueError as exc:
            # aiohttp refuses some answers with a ValueError, not a ClientError: a redirect
            # whose Location carries credentials, for one. The server's doing: a failed request.
            raise TransportError(f"{method} {path}: cannot follow the answer ({self.describe(exc)})") from None
        finally:
            self.throttle.release(borrower)
        if resp.status not in own_statuses:
            await self.raise_for_status(resp, method, path, error_bytes)
        return resp

    @staticmethod
    def never_reuse(resp: aiohttp.ClientResponse) -> None:
        """Keep ``resp``'s connection out of the pool: after an error answer, or any answer
        refused, a proxy that errs may still send a second answer, which would be read as the
        next request's (a retry is sent at once). aiohttp has pooled the connection already when
        a short body came whole; marked, :class:`~orchestrator.framing.CleanConnector` closes it
        instead of reusing it."""
        protocol = getattr(resp, "_protocol", None)  # aiohttp >= 3.10 sets it in start()
        if protocol is not None:
            protocol.force_close()

    async def raise_for_status(
        self, resp: aiohttp.ClientResponse, method: str, path: str, limit: int | None = None
    ) -> None:
        """Tell the throttle how it went; for a 4xx/5xx, release ``resp`` and raise its ApiError
        (its body read whole, or its first ``limit`` bytes, for the error envelope)."""
        if resp.status < 400:
            self.throttle.on_success()
            return
        retry_after = resp.headers.get("Retry-After")
        if resp.status == 429:
            self.throttle.on_throttled(parse_retry_after(retry_after))
        else:
            self.never_reuse(resp)
        try:
            with self.errors(f"{method} {path}"):
                data = await (resp.read() if limit is None else resp.content.read(limit))
        except TransportError:
            if limit is None:
                raise
            data = b""  # a file's error page cut short: its status says enough
        finally:
            resp.release()
        error = error_from(resp.status, data, method, path, retry_after, self.secret)
        if isinstance(error, AuthError) and resp.url.origin() != self._origin:
            # A redirect's other host (object storage) never saw the token: its refusal fails
            # this request, and says nothing of the token the rest of the run goes on with.
            host = self.secret.cut(resp.url.host or "another host", 80)
            error = ApiError(
                resp.status, f"{host} refused the redirected download", error.error_id, method=method, path=path
            )
        raise error


__all__ = [
    "ERROR_TEXT_CHARS",
    "MAPPED",
    "Secret",
    "Throttle",
    "Timeouts",
    "Transport",
    "describe",
    "error_from",
    "parse_retry_after",
]
