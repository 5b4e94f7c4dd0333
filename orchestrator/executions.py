"""Where a job's execution comes from: adopted, reused, recovered or created, and the lookups.

The runner follows one execution per attempt; its :class:`Origin` says what the attempt may
assume of it. One it did not start from the beginning (an earlier run's, a reused one, a
killed run's lost create) gets a whole ``timeout_s`` from now, and when its file is gone the
attempt makes a new execution instead of failing. One this attempt created does neither.
"""

from __future__ import annotations

import logging
import time
from enum import Enum
from typing import TYPE_CHECKING

import anyio

from orchestrator.durations import describe_duration
from orchestrator.errors import JobError
from orchestrator.guards import RunHistory, expected_duration_s
from orchestrator.models import Execution

if TYPE_CHECKING:
    from orchestrator.api import ApiClient
    from orchestrator.config import Job

ADOPT_WINDOW_MS = 30_000
"""Clock skew allowed when looking for an execution whose create answer was lost."""
REUSE_PAGES = 2
"""reuse_within looks at this many pages (of 10, newest first) of the export's executions."""


class Origin(Enum):
    """Where the execution an attempt follows came from."""

    ADOPTED = "adopted"
    """The execution an earlier run recorded for the job (interrupted, or failed on our side)."""
    REUSED = "reused"
    """A recent SUCCEEDED execution of the export (``reuse_within``)."""
    RECOVERED = "recovered"
    """Made by a create of an earlier run whose answer was lost: found by a lookup."""
    CREATED = "created"
    """Made by this attempt (its answer had, or found by a lookup after this attempt lost it)."""

    @property
    def earlier(self) -> bool:
        """Started before this attempt: its timeout restarts, and a gone file means a new execution."""
        return self is not Origin.CREATED


async def find_reusable(
    api: ApiClient,
    history: RunHistory | None,
    job: Job,
    export_id: str,
    query_id: str | None,
    log: logging.LoggerAdapter[logging.Logger],
) -> tuple[Execution, str] | None:
    """The newest SUCCEEDED execution of the export created within ``reuse_within`` (first
    REUSE_PAGES pages, newest first) and its creation time (ISO), or None if there is none.

    A query job's export may have had another query when an execution was made (the
    platform does not say which query an execution ran): only an execution an earlier
    run recorded for this job on the very same query id is reused.
    """
    assert job.reuse_within is not None
    since_ms = int((time.time() - job.reuse_within) * 1000)
    known: set[str] | None = None
    if job.query is not None:
        known = history.executions_on_query(job.name, query_id) if history and query_id else set()
    seen = 0
    async for candidate in api.iter_executions(export_id, 10, max_pages=REUSE_PAGES + 1):
        seen += 1
        usable = (
            candidate.creation_date is not None
            and candidate.creation_date >= since_ms
            and candidate.is_success
            and (known is None or candidate.id in known)
        )
        if not usable:
            if seen >= REUSE_PAGES * 10:
                break  # before the walk asks for a page more
            continue
        assert candidate.creation_date is not None
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(candidate.creation_date / 1000))
        log.info(
            "reusing execution %s (SUCCEEDED, created %s, within reuse_within=%s): no new execution",
            candidate.id,
            created,
            describe_duration(job.reuse_within),
            extra={"event": "reused", "execution_id": candidate.id, "created_at": created},
        )
        return candidate, created
    log.info(
        "no SUCCEEDED execution created within reuse_within=%s among the newest %d%s: creating one",
        describe_duration(job.reuse_within),
        seen,
        " (a query job reuses only executions an earlier run recorded on its query)" if known is not None else "",
        extra={"event": "reuse_none"},
    )
    return None


async def find_lost_create(api: ApiClient, export_id: str, since_ms: int, claimed: set[str | None]) -> Execution | None:
    """The execution a lost create made: the oldest one created since the intent that no job claims."""
    page = await api.list_executions(export_id, 0, 10)
    candidates = [
        e
        for e in page.items
        if isinstance(e, Execution)
        and e.creation_date is not None
        and e.creation_date >= since_ms - ADOPT_WINDOW_MS
        and e.id not in claimed
        and (e.is_success or not e.is_final)
    ]
    return min(candidates, key=lambda e: e.creation_date or 0) if candidates else None


def check_deadline(deadline: float | None, history: RunHistory | None, job: Job) -> None:
    """Raise JobError ("skipped: deadline ...") when the job is not expected to finish before
    the run's ``deadline`` (anyio clock): no execution is created that the deadline would cut short."""
    if deadline is None:
        return
    left = deadline - anyio.current_time()
    expected, source = expected_duration_s(history, job.name, job.timeout_s)
    if left >= expected:
        return
    raise JobError(
        f"skipped: deadline: {describe_duration(left)} left before the run's deadline, and the job is "
        f"expected to take {describe_duration(expected)} ({source}): no execution created"
    )


__all__ = ["ADOPT_WINDOW_MS", "REUSE_PAGES", "Origin", "check_deadline", "find_lost_create", "find_reusable"]
