"""What the API returns, as small frozen values.

Dates are kept as the API sends them (epoch milliseconds) and ids as strings, whatever
JSON type the API used, so that they are sent back exactly as shown.

The real API's typing is loose (NOTES.md): counters may be numbers, strings or null,
``error`` a string or ``{"message": ...}``, ``total`` missing. Everything optional is read
leniently (a counter that is not a number is None, never a crash). What cannot be done
without — an object where one is needed, a list where one is needed, an id — raises
:class:`~orchestrator.errors.MalformedResponseError` naming the field; the client places
it (request and field path) and retries it like a transient error.

Over ~350 lines on purpose: every shape the API returns, and its lenient readers, in one place.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from orchestrator.errors import MalformedResponseError

_TECHNICAL_NAME = re.compile(r"[A-Za-z0-9._-]+")

log = logging.getLogger("orchestrator.models")
T = TypeVar("T")


class ExecutionStatus(StrEnum):
    """The platform's job status enum (NOTES.md), plus UNKNOWN for anything new.

    An unknown value never crashes the tool: it is treated as still in progress, which
    is the safe reading (we keep polling until the timeout), and logged once per value.
    """

    WAITING_DEPENDENT_JOB = "WAITING_DEPENDENT_JOB"
    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    LOST = "LOST"
    EXECUTOR_NOT_RESPONDING = "EXECUTOR_NOT_RESPONDING"
    UNKNOWN = "UNKNOWN"

    @classmethod
    def parse(cls, value: object) -> ExecutionStatus:
        """The member for ``value``; UNKNOWN (and a warning) for anything unlisted."""
        text = str(value)
        known = _STATUS_BY_VALUE.get(text)  # a dict lookup: the enum's own call is ~10× slower (every poll)
        if known is not None:
            return known
        try:
            return cls(text)
        except ValueError:
            if text not in _warned_unknown:  # by text: the raw value may be unhashable (a list)
                _warned_unknown.add(text)
                log.warning("unknown execution status %r: treated as in progress", value)
            return cls.UNKNOWN

    @property
    def is_success(self) -> bool:
        """The execution finished and its result can be downloaded."""
        return self in _SUCCESS

    @property
    def is_final(self) -> bool:
        """The execution will not change any more (success or failure)."""
        return self in _SUCCESS or self in _FAILURE


_SUCCESS = frozenset({ExecutionStatus.SUCCEEDED, ExecutionStatus.SUCCESS})
_FAILURE = frozenset(
    {
        ExecutionStatus.FAILED,
        ExecutionStatus.CANCELED,
        ExecutionStatus.LOST,
        ExecutionStatus.EXECUTOR_NOT_RESPONDING,
    }
)
_warned_unknown: set[str] = set()
_STATUS_BY_VALUE: dict[str, ExecutionStatus] = {m.value: m for m in ExecutionStatus}


def _kind(value: Any) -> str:
    """The JSON type of ``value``, for an error message (never the value: it is the server's)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _id(value: Any) -> str | None:
    """An optional id as a string; None when absent or not an id (a list, an object...)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else None
    if isinstance(value, (str, int)):
        return str(value) or None
    return None


def required_id(data: dict[str, Any], key: str = "id") -> str:
    """``data[key]`` as an id string; MalformedResponseError when missing or not an id."""
    value = data.get(key)
    found = _id(value)
    if found is None:
        raise MalformedResponseError(key, "is missing" if value in (None, "") else f"is {_kind(value)}, not an id")
    return found


def _int(value: Any) -> int | None:
    """A counter or a date as an int: numbers, numeric strings ("12", "12.0"); else None.

    NOTES.md: the official front end types the task counters as strings or null, and a
    value like ``"n/a"`` must not fail a job: it reads as unknown.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else None
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                return None
            return int(number) if math.isfinite(number) else None
    return None


def _date(value: Any) -> int | None:
    """A date as epoch milliseconds: a number or numeric string (the API's form), or an ISO
    8601 string (``2024-05-01T10:00:00Z``; without a zone, UTC); anything else None.

    A date that cannot be read must not be mistaken for no date by accident: the lookup
    of a lost create compares ``creation_date`` with the time of the intent, and a date
    it cannot read would make it create a second execution.
    """
    number = _int(value)
    if number is not None or not isinstance(value, str):
        return number
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def require_object(value: Any, name: str = "data") -> dict[str, Any]:
    """``value`` if it is a JSON object; MalformedResponseError naming ``name`` otherwise."""
    if not isinstance(value, dict):
        raise MalformedResponseError(name, f"is {_kind(value)}, not an object")
    return value


def error_text(error: Any, limit: int = 300) -> str | None:
    """The platform's ``error`` as one short line: a string, or an object's ``message``."""
    if error is None or error == "" or error == {}:
        return None
    if isinstance(error, dict):
        for key in ("message", "error", "description", "detail"):
            if isinstance(error.get(key), str) and error[key].strip():
                error = error[key]
                break
    text = " ".join(str(error).split())
    if not text:
        return None
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class Export:
    """An export definition: a saved OTQL query whose result is NDJSON."""

    id: str
    name: str
    organisation_id: str | None
    query_id: str | None
    datamart_id: str | None
    type: str = "QUERY"
    output_format: str = "JSON"

    @classmethod
    def from_api(cls, data: Any) -> Export:
        """Build from the ``data`` object of the API's envelope (MalformedResponseError if unreadable)."""
        data = require_object(data)
        return cls(
            id=required_id(data),
            name=str(data.get("name") or ""),
            organisation_id=_id(data.get("organisation_id")),
            query_id=_id(data.get("query_id")),
            datamart_id=_id(data.get("datamart_id")),
            type=str(data.get("type") or "QUERY"),
            output_format=str(data.get("output_format") or "JSON"),
        )


@dataclass(frozen=True, slots=True)
class Execution:
    """One run of an export on the platform. Dates in epoch milliseconds."""

    id: str
    status: ExecutionStatus
    raw_status: str
    creation_date: int | None = None
    start_date: int | None = None
    end_date: int | None = None
    num_tasks: int | None = None
    completed_tasks: int | None = None
    erroneous_tasks: int | None = None
    organisation_id: str | None = None
    output_files: tuple[str, ...] = ()
    error: Any = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_api(cls, data: Any) -> Execution:
        """Build from one execution object as the API shows it (MalformedResponseError if unreadable)."""
        data = require_object(data)
        result = data.get("result")
        files = result.get("output_files") if isinstance(result, dict) else None
        raw = str(data.get("status"))
        return cls(
            id=required_id(data),
            status=ExecutionStatus.parse(raw),
            raw_status=raw,
            creation_date=_date(data.get("creation_date")),
            start_date=_date(data.get("start_date")),
            end_date=_date(data.get("end_date")),
            num_tasks=_int(data.get("num_tasks")),
            completed_tasks=_int(data.get("completed_tasks")),
            erroneous_tasks=_int(data.get("erroneous_tasks")),
            organisation_id=_id(data.get("organisation_id")),
            output_files=tuple(str(f) for f in files if isinstance(f, (str, int)) and str(f))
            if isinstance(files, list)
            else (),
            error=data.get("error"),
            extra=data,
        )

    @property
    def is_final(self) -> bool:
        """The execution will not change any more."""
        return self.status.is_final

    @property
    def is_success(self) -> bool:
        """The execution succeeded and has a result to download."""
        return self.status.is_success

    @property
    def error_message(self) -> str | None:
        """The platform's error for this execution as one line (string or ``.message``)."""
        return error_text(self.error)

    @property
    def technical_name(self) -> str:
        """The result file's technical name: the first output file, ``export`` by default.

        It comes from the server and goes into a URL path sent with the token, so it must
        be a plain name (``[A-Za-z0-9._-]+``, not ``.`` or ``..``): anything else is a
        malformed answer, never a path to follow.
        """
        name = self.output_files[0] if self.output_files else "export"
        if not _TECHNICAL_NAME.fullmatch(name) or name in (".", ".."):
            raise MalformedResponseError("result.output_files[0]", "is not a plain file name")
        return name


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a paginated list."""

    items: tuple[Any, ...]
    first_result: int
    max_results: int
    total: int | None

    @property
    def has_more(self) -> bool:
        """Whether another page may follow (older lists have no ``total``)."""
        if self.total is not None:
            return self.first_result + len(self.items) < self.total
        return len(self.items) >= self.max_results > 0

    @classmethod
    def from_api(cls, envelope: dict[str, Any], first: int, size: int, item: Callable[[Any], T] | None = None) -> Page:
        """A page from a list envelope, as asked with ``first`` and ``size``; items built by ``item``.

        ``data`` must be a list (null or missing: an empty page). ``total``, ``first_result``
        and ``max_results`` (or a stray ``max_result``) are read leniently: a ``total`` of
        ``"lots"`` is no total, and a paging key that is not a number is taken to be what was asked.
        """
        data = envelope.get("data")
        if data is None:
            data = []
        if not isinstance(data, list):
            raise MalformedResponseError("data", f"is {_kind(data)}, not a list")
        items: list[Any] = []
        for index, raw in enumerate(data):
            if item is None:
                items.append(raw)
                continue
            try:
                items.append(item(raw))
            except MalformedResponseError as exc:
                field_ = f"data[{index}].{exc.field}" if exc.field != "data" else f"data[{index}]"
                raise MalformedResponseError(field_, exc.problem) from None
        first_result = _int(envelope.get("first_result"))
        # The page size the server used: the smallest of what was asked and what it states.
        # Some lists carry a stray ``max_result`` (NOTES.md) that is the server's own cap on a
        # page, whatever was asked: without a total, a page that long may be followed by
        # another (at worst one empty page more).
        stated = [n for n in (_int(envelope.get("max_results")), _int(envelope.get("max_result"))) if n and n > 0]
        total = _int(envelope.get("total"))
        return cls(
            items=tuple(items),
            first_result=first_result if first_result is not None and first_result >= 0 else first,
            max_results=min([size, *stated]),
            total=total if total is not None and total >= 0 else None,
        )


@dataclass(frozen=True, slots=True)
class QueryCheck:
    """The answer of ``query_check/otql``: VALID, or a parsing/validation error with where it is."""

    type: str
    message: str | None = None
    position: str | None = None
    """Where the problem is, as the platform put it (e.g. ``row 1, col 5``), when it said."""

    @property
    def is_valid(self) -> bool:
        """The platform accepts the query."""
        return self.type == "VALID"

    def describe(self) -> str:
        """One line: the type, the platform's message and the position when known."""
        text = self.type
        if self.message:
            text += f": {self.message}"
        if self.position:
            text += f" (at {self.position})"
        return text

    @classmethod
    def from_api(cls, data: Any) -> QueryCheck:
        """Read leniently: the message may be ``message``, ``error`` (a string or an object)
        or ``errors[...]``, and the position may be missing; only ``type`` (or some error) is needed."""
        data = require_object(data)
        kind = data.get("type")
        errors: list[Any] = []
        for key in ("error", "errors", "message"):
            value = data.get(key)
            errors += value if isinstance(value, list) else [value] if value not in (None, "", {}) else []
        messages = [m for m in (error_text(e) for e in errors) if m]
        position = _position(data)
        for e in errors:
            position = position or (_position(e) if isinstance(e, dict) else None)
        if kind is None or kind == "":
            if not messages:
                raise MalformedResponseError("data.type", "is missing")
            kind = "INVALID"
        if not isinstance(kind, str):
            raise MalformedResponseError("data.type", f"is {_kind(kind)}, not a string")
        message = error_text("; ".join(dict.fromkeys(messages[:3]))) if messages else None
        return cls(type=kind.strip().upper(), message=message, position=position)


def _position(holder: dict[str, Any]) -> str | None:
    """``position: {row, col}`` (or line/column, or those keys on ``holder`` itself) as text."""
    where = holder.get("position")
    if isinstance(where, str) and where.strip():
        return error_text(where, 60)
    source = where if isinstance(where, dict) else holder
    row = _int(source.get("row", source.get("line")))
    col = _int(source.get("col", source.get("column")))
    if row is None and col is None:
        return None
    return ", ".join(p for p in (f"row {row}" if row is not None else "", f"col {col}" if col is not None else "") if p)


__all__ = [
    "Execution",
    "ExecutionStatus",
    "Export",
    "Page",
    "QueryCheck",
    "error_text",
    "require_object",
    "required_id",
]
