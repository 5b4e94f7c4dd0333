"""Every error mics-export raises on purpose, rooted at one class.

The tree::

    MicsExportError                 root: the CLI turns any of these into one line
    ├── UsageError                  bad command line or job file → exit 2, nothing sent
    │   ├── ConfigError             the job file (names the file, the job and the key)
    │   └── MissingTokenError       the token's variable is unset or empty
    ├── ApiError                    the API answered with an error envelope or status
    │   ├── AuthError               401 / 403: the token is wrong, expired or lacks rights
    │   ├── NotFoundError           404: unknown export, execution or file
    │   ├── TransientApiError       429 / 5xx: worth retrying (carries Retry-After)
    │   └── MalformedResponseError  a 2xx answer that cannot be read (names the field);
    │       │                       retried like a transient error, then fails the job
    │       └── PagingError         a list that never ends (same page again, page cap)
    ├── TransportError              the connection failed, timed out or was cut short
    │   ├── ConnectError            could not connect: nothing was sent
    │   └── IncompleteBodyError     a body shorter than its Content-Length
    └── JobError                    one job could not finish (the run goes on)
        ├── ExecutionFailedError    the platform reported FAILED / CANCELED / LOST ...
        ├── ExecutionTimeoutError   the attempt outlived its timeout_s
        └── InvalidDataError        invalid lines with ``on_invalid: fail``

Transient errors (:class:`TransientApiError`, :class:`TransportError`,
:class:`MalformedResponseError`) are the ones the client retries; :func:`is_transient` is
the single place that decides it. A create-execution is the exception: only a 429 or a
failed connect (nothing was sent) is retried blindly; any other failure leaves the
outcome unknown, and the scheduler looks for the execution before creating another.

No message built here ever contains the API token: errors are built from the API's
answer (status, ``error``, ``error_code``, ``error_id``, scrubbed of the token by the
client) and from URLs, and URLs never carry the token.
"""

from __future__ import annotations


class MicsExportError(Exception):
    """Root of every error mics-export raises on purpose."""


class UsageError(MicsExportError):
    """The command line or the job file is wrong; nothing was sent to the API."""


class ConfigError(UsageError):
    """The job file is invalid. The message names the file, the job and the key."""


class MissingTokenError(UsageError):
    """The environment variable that should hold the API token is unset or empty."""

    def __init__(self, variable: str) -> None:
        super().__init__(
            f"the API token is missing: set the environment variable {variable} "
            "(or use --simulate to run against the built-in simulator)"
        )
        self.variable = variable


class ApiError(MicsExportError):
    """The API answered with an error.

    Carries the HTTP ``status``, the API's ``error`` message, its ``error_code`` (when
    the envelope has one) and ``error_id`` (support asks for it), and the request's
    method and path (without the token, which is only ever in a header).
    """

    def __init__(
        self,
        status: int,
        error: str | None = None,
        error_id: str | None = None,
        *,
        method: str = "",
        path: str = "",
        error_code: str | None = None,
    ) -> None:
        self.status = status
        self.error = error
        self.error_id = error_id
        self.error_code = error_code
        self.method = method
        self.path = path
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = f"{self.method} {self.path}: " if self.method else ""
        text = f"{where}HTTP {self.status}"
        if self.error:
            text += f" {self.error}"
        ids = [f"error_code {self.error_code}"] if self.error_code else []
        ids += [f"error_id {self.error_id}"] if self.error_id else []
        if ids:
            text += f" ({', '.join(ids)})"
        return text


class AuthError(ApiError):
    """401 or 403: the token was refused."""

    def _describe(self) -> str:
        hint = "the API refused the token: check that it is valid, not expired, and allowed on this organisation"
        return f"{super()._describe()} — {hint}"


class NotFoundError(ApiError):
    """404: the export, execution or file does not exist (or is not visible)."""


class TransientApiError(ApiError):
    """429 or 5xx: the API is overloaded or failing; the request may be retried.

    ``retry_after_s`` is the server's ``Retry-After`` in seconds, when it sent one.
    """

    def __init__(
        self,
        status: int,
        error: str | None = None,
        error_id: str | None = None,
        *,
        method: str = "",
        path: str = "",
        error_code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(status, error, error_id, method=method, path=path, error_code=error_code)
        self.retry_after_s = retry_after_s


class MalformedResponseError(ApiError):
    """A 2xx answer the client cannot read: not JSON, or ``field`` missing or of the wrong type.

    The real API's typing is loose (NOTES.md), so the models accept every documented form;
    what is left is a broken answer. It is retried like a transient error (a gateway may
    have mangled one answer), then fails the one job that asked, never the run. The text
    names the field and the JSON type found, never the value (the value is the server's,
    and could echo anything).
    """

    def __init__(self, field: str, problem: str, *, status: int = 200, method: str = "", path: str = "") -> None:
        self.field = field
        self.problem = problem
        super().__init__(status, None, None, method=method, path=path)

    def _describe(self) -> str:
        where = f"{self.method} {self.path}: " if self.method else ""
        return f"{where}malformed answer (HTTP {self.status}): {self.field} {self.problem}"

    def at(self, *, method: str, path: str, status: int, prefix: str = "") -> MalformedResponseError:
        """The same error, placed: the request it answered and the field's full path."""
        field = f"{prefix}.{self.field}" if prefix and self.field else prefix or self.field
        return MalformedResponseError(field, self.problem, status=status, method=method, path=path)


class PagingError(MalformedResponseError):
    """A list that would page forever: a page with no new ids (``first_result`` ignored),
    or more pages than a lookup may read. Not retried: the walk would only repeat."""

    def _describe(self) -> str:
        where = f"{self.method} {self.path}: " if self.method else ""
        return f"{where}{self.problem}"


class TransportError(MicsExportError):
    """The connection failed, timed out or closed early."""


class ConnectError(TransportError):
    """The connection could not be opened, so the request was never sent."""


class IncompleteBodyError(TransportError):
    """The body ended before its Content-Length: never a silent short file."""


class JobError(MicsExportError):
    """One job could not finish. Recorded in the manifest; the other jobs go on."""


class ExecutionFailedError(JobError):
    """The platform ended the execution without success."""


class ExecutionTimeoutError(JobError):
    """The attempt did not finish within the job's timeout_s."""


class InvalidDataError(JobError):
    """The result had invalid lines and the job asked for ``on_invalid: fail``."""


EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
"""SPEC.md's exit codes: all succeeded; the run (or an API call) failed; usage error."""
EXIT_DEADLINE = 124
"""The run reached its deadline (run.deadline / --deadline) and stopped as on SIGTERM (like timeout(1))."""
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
"""Stopped by SIGINT (Ctrl-C, or a Python caller's cancellation) / by SIGTERM: 128 + the signal."""


TRANSIENT: tuple[type[MicsExportError], ...] = (TransientApiError, TransportError, MalformedResponseError)
"""The errors worth retrying (429, 5xx, connection trouble, an unreadable answer)."""


def is_transient(exc: BaseException) -> bool:
    """Whether a failed request is worth retrying (429, 5xx, connection trouble, unreadable answer)."""
    return isinstance(exc, TRANSIENT)


def single_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error that matters in a task group's exception group.

    anyio wraps even a single failure in an ExceptionGroup; callers of a helper that uses
    a task group internally want the failure itself. Cancellations are skipped in favour
    of a real error when there is one.
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    real = [e for e in leaves if not _is_cancellation(e)]
    return (real or leaves or [group])[0]


def _is_cancellation(exc: BaseException) -> bool:
    import asyncio  # the tool runs anyio on its asyncio backend

    return isinstance(exc, asyncio.CancelledError)


__all__ = [
    "EXIT_DEADLINE",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "EXIT_USAGE",
    "TRANSIENT",
    "ApiError",
    "AuthError",
    "ConfigError",
    "ConnectError",
    "ExecutionFailedError",
    "ExecutionTimeoutError",
    "IncompleteBodyError",
    "InvalidDataError",
    "JobError",
    "MalformedResponseError",
    "MicsExportError",
    "MissingTokenError",
    "NotFoundError",
    "PagingError",
    "TransientApiError",
    "TransportError",
    "UsageError",
    "is_transient",
    "single_error",
]
