"""What the API returns, as small frozen values.

Dates are kept as the API sends them (epoch milliseconds) and ids as strings, whatever
JSON type the API used, so that they are sent back exactly as shown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

log = logging.getLogger("orchestrator.models")


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


def _id(value: Any) -> str | None:
    return None if value is None else str(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


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
    def from_api(cls, data: dict[str, Any]) -> Export:
        """Build from the ``data`` object of the API's envelope."""
        return cls(
            id=str(data["id"]),
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
    def from_api(cls, data: dict[str, Any]) -> Execution:
        """Build from one execution object as the API shows it."""
        result = data.get("result") or {}
        raw = str(data.get("status"))
        return cls(
            id=str(data["id"]),
            status=ExecutionStatus.parse(raw),
            raw_status=raw,
            creation_date=_int(data.get("creation_date")),
            start_date=_int(data.get("start_date")),
            end_date=_int(data.get("end_date")),
            num_tasks=_int(data.get("num_tasks")),
            completed_tasks=_int(data.get("completed_tasks")),
            erroneous_tasks=_int(data.get("erroneous_tasks")),
            organisation_id=_id(data.get("organisation_id")),
            output_files=tuple(str(f) for f in (result.get("output_files") or ())),
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
    def technical_name(self) -> str:
        """The result file's technical name: the first output file, ``export`` by default."""
        return self.output_files[0] if self.output_files else "export"


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


__all__ = ["Execution", "ExecutionStatus", "Export", "Page"]
