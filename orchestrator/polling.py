"""Following one execution until it ends: polls on the retry policy's schedule, a stall watch,
and what each poll tells the job's record.

The execution a poll starts from was just had from the API (a create's answer, an adopting
lookup), so the first poll is one wait after it, not at once; every wait comes from the
policy's :class:`~orchestrator.retry.PollSchedule` (its rng and clock: see :mod:`orchestrator.retry`).
A stall — ``completed_tasks`` unchanged for ``stall_s`` — is reported once, and with
``stall_action: timeout`` the execution is cancelled (best effort) and the attempt times out.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from orchestrator.errors import ExecutionTimeoutError, JobError
from orchestrator.failures import cancel_execution
from orchestrator.models import Execution, ExecutionStatus
from orchestrator.record import JobRecord, JobStatus, Manifest

if TYPE_CHECKING:
    from orchestrator.api import ApiClient
    from orchestrator.config import Job
    from orchestrator.manifest import ManifestWriter

JobLog = logging.LoggerAdapter[logging.Logger]

_WAITING = (ExecutionStatus.PENDING, ExecutionStatus.SCHEDULED, ExecutionStatus.WAITING_DEPENDENT_JOB)
"""Statuses of an execution that has not started: the job is PENDING, not RUNNING."""


class StallWatch:
    """Notices when completed_tasks has not moved for ``stall_s`` seconds (once)."""

    def __init__(self, stall_s: float | None) -> None:
        self.stall_s = stall_s
        self.value: int | None = None
        self.since = time.monotonic()
        self.reported = False

    def stalled(self, value: int | None) -> bool:
        now = time.monotonic()
        if value != self.value:
            self.value, self.since, self.reported = value, now, False
            return False
        if self.stall_s is None or self.reported or value is None or now - self.since < self.stall_s:
            return False
        self.reported = True
        return True


class Poller:
    """Polls a run's executions through its API client, recording what it sees in the manifest."""

    def __init__(self, api: ApiClient, writer: ManifestWriter, manifest: Manifest) -> None:
        self.api = api
        self.writer = writer
        self.manifest = manifest

    async def poll(self, job: Job, rec: JobRecord, jl: JobLog, export_id: str, execution: Execution) -> Execution:
        """Poll until final: exponential from initial_s, full jitter, capped at max_s.

        ``execution`` was just had from the API (a create's answer, or the lookup that adopted
        it): it is what a poll at once would see, so the first poll waits the schedule's first
        wait after it. A poll at once cost one request per execution (~15% of a small
        export's requests) and could only see what ``execution`` says.
        """
        await self.observe(rec, execution)
        if execution.is_final:
            return execution
        schedule = self.api.retry.poll_schedule(job.poll.initial_s, job.poll.max_s)
        stall = StallWatch(job.stall_s)
        stall.stalled(execution.completed_tasks)
        sleep = self.api.retry.sleep
        await sleep(schedule.next_wait(execution))
        tries = 0
        while True:
            tries += 1
            execution = await self._once(job, rec, jl, export_id, execution.id, stall)
            if execution.is_final:
                _log_poll(jl, tries, execution, None)
                return execution
            wait = schedule.next_wait(execution)
            _log_poll(jl, tries, execution, wait)
            await sleep(wait)

    async def _once(
        self, job: Job, rec: JobRecord, jl: JobLog, export_id: str, execution_id: str, stall: StallWatch
    ) -> Execution:
        """One poll: the execution as listed now, recorded; ExecutionTimeoutError on a stall
        with ``stall_action: timeout``."""
        found = await self.api.find_execution(export_id, execution_id)
        if found is None:
            raise JobError(f"execution {execution_id} is no longer listed by the API")
        await self.observe(rec, found)
        if stall.stalled(found.completed_tasks):
            jl.warning(
                "execution %s: completed_tasks stuck at %s/%s for %.0fs",
                found.id,
                found.completed_tasks,
                found.num_tasks,
                job.stall_s,
                extra={"event": "stalled"},
            )
            if job.stall_action == "timeout":
                await cancel_execution(self.api, export_id, found.id, jl)
                raise ExecutionTimeoutError(
                    f"execution {found.id} stalled at {found.completed_tasks}/{found.num_tasks} tasks "
                    f"for {job.stall_s:g}s"
                )
        return found

    async def observe(self, rec: JobRecord, execution: Execution) -> None:
        """Record what a poll saw: the job's status, its task counts, its live progress."""
        status = JobStatus.PENDING if execution.status in _WAITING else JobStatus.RUNNING
        self.manifest.live_of(rec.name).completed_tasks = execution.completed_tasks
        moved = rec.observed(None if execution.is_final else status, execution.num_tasks, execution.erroneous_tasks)
        await self.writer.persist(moved)


def _log_poll(jl: JobLog, tries: int, found: Execution, wait: float | None) -> None:
    """Every poll at DEBUG (-v), in any log format and whether or not stderr is a terminal."""
    if not jl.isEnabledFor(logging.DEBUG):
        return  # its arguments and extra cost more than the check, at every poll
    jl.debug(
        "poll %d: execution %s %s, %s/%s tasks done%s%s",
        tries,
        found.id,
        found.raw_status,
        "?" if found.completed_tasks is None else found.completed_tasks,
        "?" if found.num_tasks is None else found.num_tasks,
        f" ({found.erroneous_tasks} erroneous)" if found.erroneous_tasks else "",
        f"; next poll in {wait:.2f}s" if wait is not None else "",
        extra={
            "event": "poll",
            "status": found.raw_status,
            "completed_tasks": found.completed_tasks,
            "num_tasks": found.num_tasks,
            "next_wait_s": None if wait is None else round(wait, 3),
        },
    )


__all__ = ["Poller", "StallWatch"]
