"""Every error mics-export raises on purpose, rooted at one class.

The tree::

    MicsExportError                 root: the CLI turns any of these into one line
    ├── UsageError                  bad command line or job file → exit 2, nothing sent
    │   ├── ConfigError             the job file (names the file, the job and the key)
    │   └── MissingTokenError       the token's variable is unset or empty
    ├── ApiError                    the API answered with an error envelope or status
    │   ├── AuthError               401 / 403: the token is wrong, expired or lacks rights
    │   ├── NotFoundError           404: unknown export, execution or file
    │   └── TransientApiError       429 / 5xx: worth retrying (carries Retry-After)
    ├── TransportError              the connection failed, timed out or was cut short
    │   ├── ConnectError            could not connect: nothing was sent
    │   └── IncompleteBodyError     a body shorter than its Content-Length
    └── JobError                    one job could not finish (the run goes on)
        ├── ExecutionFailedError    the platform reported FAILED / CANCELED / LOST ...
        ├── ExecutionTimeoutError   the attempt outlived its timeout_s
        └── InvalidDataError        invalid lines with ``on_invalid: fail``

Transient errors (:class:`TransientApiError`, :class:`TransportError`) are the ones the
client retries; :func:`is_transient` is the single place that decides it.

No message built here ever contains the API token: errors are built from the API's
answer (status, ``error``, ``error_id``) and from URLs, and URLs never carry the token.
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

    Carries the HTTP ``status``, the API's ``error`` message and ``error_id`` (support
    asks for it), and the request's method and path (without the token, which is only
    ever in a header).
    """

    def __init__(
        self,
        status: int,
        error: str | None = None,
        error_id: str | None = None,
        *,
        method: str = "",
        path: str = "",
    ) -> None:
        self.status = status
        self.error = error
        self.error_id = error_id
        self.method = method
        self.path = path
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = f"{self.method} {self.path}: " if self.method else ""
        text = f"{where}HTTP {self.status}"
        if self.error:
            text += f" {self.error}"
        if self.error_id:
            text += f" (error_id {self.error_id})"
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
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(status, error, error_id, method=method, path=path)
        self.retry_after_s = retry_after_s


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


TRANSIENT: tuple[type[MicsExportError], ...] = (TransientApiError, TransportError)
"""The errors worth retrying (429, 5xx, connection trouble): the client retries these."""


def is_transient(exc: BaseException) -> bool:
    """Whether a failed request is worth retrying (429, 5xx, connection trouble)."""
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
    "EXIT_FAILED",
    "EXIT_OK",
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
    "MicsExportError",
    "MissingTokenError",
    "NotFoundError",
    "TransientApiError",
    "TransportError",
    "UsageError",
    "is_transient",
    "single_error",
]
