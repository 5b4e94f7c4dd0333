"""The Runner: every job's lifecycle, under one task group and one concurrency limit.

Per job::

    skip if an earlier run into this folder / prefix already has it (the sink verifies it)
    ── hold a slot of the CapacityLimiter (at most ``concurrency`` jobs in flight) ──
    adopt the execution an earlier run recorded, reuse a recent SUCCEEDED one
    (reuse_within), or create one (intent saved first; a lost or 5xx create is looked up
    before creating again); no new execution past the run's deadline
    poll it with jittered exponential backoff until final — every call of the attempt,
    lookups included, inside its timeout_s
    SUCCEEDED → stream-download, check, judge by the guards, commit atomically
    FAILED    → save its (scrubbed) error file; while retries remain, a new execution
    timeout   → cancel it (best effort) → TIMED_OUT (not retried: see README)

Every state change is recorded in the manifest before the step it enables. One job's
failure is recorded and never stops the others. The wiring around it — sink, lock, client,
pool, signals, deadline, report — is :mod:`orchestrator.app`'s: a cancelled Runner leaves
no temporary file, and app writes the manifest INTERRUPTED.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import sys
import time
import zlib
from collections.abc import Generator, MutableMapping
from pathlib import Path
from typing import Any

import anyio
import backoff
import zstandard

from orchestrator.api import ApiClient
from orchestrator.config import Job
from orchestrator.context import bind_job
from orchestrator.download import DownloadResult, download, output_name
from orchestrator.errors import (
    ApiError,
    AuthError,
    ConnectError,
    ExecutionFailedError,
    ExecutionTimeoutError,
    JobError,
    MalformedResponseError,
    MicsExportError,
    NotFoundError,
    TransientApiError,
    TransportError,
)
from orchestrator.guards import (
    Limits,
    Measured,
    RunHistory,
    committed_name,
    describe_duration,
    evaluate,
    expected_duration_s,
    previous_records,
)
from orchestrator.manifest import (
    JobRecord,
    JobStatus,
    Manifest,
    ManifestWriter,
    RunStatus,
    now_iso,
)
from orchestrator.models import Execution, ExecutionStatus
from orchestrator.sink import LocalSink, Sink
from orchestrator.workers import ValidatorPool

log = logging.getLogger("orchestrator.scheduler")

EXIT_DEADLINE = 124
"""The run reached its deadline (run.deadline / --deadline) and stopped as on SIGTERM (like timeout(1))."""
DEADLINE_SIGNAL = signal.SIGALRM
"""Stands for the deadline in the list of stop reasons: the run's own alarm clock, never sent."""
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143, DEADLINE_SIGNAL: EXIT_DEADLINE}
ADOPT_WINDOW_MS = 30_000
"""Clock skew allowed when looking for an execution whose create answer was lost."""
LOCAL_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)
"""Errors of this machine (files, disk, decompression) that fail one job, not the run."""
RETRIED_STATUSES = frozenset({ExecutionStatus.FAILED, ExecutionStatus.LOST, ExecutionStatus.EXECUTOR_NOT_RESPONDING})
ERROR_FILE_TIMEOUT_S = 30.0
"""The most a FAILED execution's error file may take (never past the attempt's deadline)."""
ERROR_FILE_MAX_BYTES = 1 << 20
"""The most of an error file kept: it is for a person to read."""
REUSE_PAGES = 2
"""reuse_within looks at this many pages (of 10, newest first) of the export's executions."""
CREATE_TRIES_MIN = 3
"""Creates whose outcome is unknown (5xx, cut answer) tried at least this often (else max_tries)."""
POLL_MAX_EXPONENT = 32
"""poll_waits stops doubling here: initial_s * 2**32 is past any max_s, and 2**1024 overflows."""


class JobLog(logging.LoggerAdapter[logging.Logger]):
    """Adds job, export_id and execution_id to every record, merged with the call's extra."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


class Runner:
    """Runs a set of jobs against one API client, recording everything in the manifest."""

    deadline: float | None = None
    """anyio clock time when the run stops (set by _arm): no execution is created past what fits."""
    history: RunHistory | None = None
    """Earlier runs, for max_drop_pct, reuse of a query job's execution and expected durations."""

    def __init__(
        self,
        jobs: tuple[Job, ...],
        api: ApiClient,
        output_dir: Path | Sink,
        *,
        concurrency: int,
        manifest: Manifest,
        previous: Manifest | None = None,
        query_prefix: str = "mics-export:",
        pool: ValidatorPool | None = None,
    ) -> None:
        self.jobs = jobs
        self.api = api
        # Where outputs, error files and the manifest go: a folder or a bucket prefix.
        self.sink: Sink = LocalSink(output_dir) if isinstance(output_dir, Path) else output_dir
        self.output_dir = output_dir if isinstance(output_dir, Path) else None
        """The local folder (None for a bucket)."""
        self.limiter = anyio.CapacityLimiter(concurrency)
        self.manifest = manifest
        self.writer = ManifestWriter(manifest, self.sink.manifest_store())
        self.query_prefix = query_prefix
        self.pool = pool
        self.auth_error: AuthError | None = None
        self._stop = anyio.CancelScope()
        self._stale: dict[str, set[str]] = {}  # job → executions whose part files may linger
        for job in jobs:
            old = previous.jobs.get(job.name) if previous else None
            manifest.jobs[job.name] = old if old is not None else JobRecord(name=job.name, export_id=job.export_id)
        # Jobs left out of this run (--only, a smaller job file) keep their earlier records:
        # they are what a later full rerun needs to skip or adopt instead of starting over.
        for name, old in (previous.jobs if previous else {}).items():
            manifest.jobs.setdefault(name, old)

    # -- the run -------------------------------------------------------------------------
    async def run(self) -> RunStatus:
        """Run every job; returns SUCCEEDED only if every job succeeded."""
        await self.writer.save()
        async with anyio.create_task_group() as flushing:
            flushing.start_soon(self.writer.run_flusher)
            with self._stop:
                async with anyio.create_task_group() as tg:
                    for job in self.jobs:
                        tg.start_soon(self._job, job)
            flushing.cancel_scope.cancel()
        if self.auth_error is not None:
            for job in self.jobs:
                rec = self.manifest.jobs[job.name]
                if not rec.status.is_final:
                    rec.status, rec.error = JobStatus.FAILED, f"not run: {self.auth_error}"
            await self.writer.save()
        ok = all(self.manifest.jobs[j.name].status is JobStatus.SUCCEEDED for j in self.jobs)
        return RunStatus.SUCCEEDED if ok else RunStatus.FAILED

    async def _job(self, job: Job) -> None:
        jl = JobLog(log, {"job": job.name, "export_id": job.export_id, "execution_id": None})
        # Lines the client, the stream and the models log for this job (a retry, a resume,
        # an unknown status) carry its fields too. Each job is its own task, with its own
        # copy of the context, so the binding ends with the task.
        bind_job(lambda: jl.extra)
        async with self.limiter:
            rec = self.manifest.jobs[job.name]
            try:
                done = await self._already_done(job, rec)
                if done and job.query is None and rec.export_id == job.export_id:
                    jl.info(
                        "already complete in this folder (sha256 verified): skipped", extra={"event": "job_skipped"}
                    )
                    return
                try:
                    # The export lookup is an API call of the job: it gets the job's deadline.
                    with anyio.fail_after(job.timeout_s):
                        rec = await self._prepare(job, jl)
                except (ApiError, TransportError, TimeoutError) as exc:
                    if not done:
                        if isinstance(exc, TimeoutError):
                            raise ExecutionTimeoutError(
                                f"the job's query export could not be looked up within timeout_s={job.timeout_s:g}"
                            ) from None
                        raise
                    # Never downgrade a verified file because the API is unwell tonight.
                    why = str(exc) if not isinstance(exc, TimeoutError) else f"no answer within {job.timeout_s:g}s"
                    jl.warning("could not check the job's query (%s): keeping its complete file", why)
                    return
                if done and rec is self.manifest.jobs[job.name] and rec.status is JobStatus.SUCCEEDED:
                    jl.info(
                        "already complete in this folder (sha256 verified): skipped", extra={"event": "job_skipped"}
                    )
                    return
                rec.started_at = rec.started_at or now_iso()
                rec.finished_at = None
                rec.error = None
                await self._attempts(job, rec, jl)
            except JobError as exc:
                status = JobStatus.TIMED_OUT if isinstance(exc, ExecutionTimeoutError) else JobStatus.FAILED
                self._fail(rec, jl, status, str(exc))
            except AuthError as exc:
                # Every other job would get the same answer: stop the run, say why once.
                self._fail(rec, jl, JobStatus.FAILED, str(exc))
                self.auth_error = exc
                self._stop.cancel()
            except (ApiError, TransportError) as exc:
                self._fail(rec, jl, JobStatus.FAILED, str(exc))
            except LOCAL_ERRORS as exc:
                # Disk full, a folder in the way, a corrupt file: this job fails, the run goes on.
                self._fail(rec, jl, JobStatus.FAILED, f"{type(exc).__name__}: {exc}")
            if rec.status.is_final:
                rec.finished_at = now_iso()
                self.writer.mark()

    async def _prepare(self, job: Job, jl: JobLog) -> JobRecord:
        """The job's record, its export resolved; an earlier run's state is dropped if it was
        for another export or query (the job file changed), so nothing stale is adopted or kept."""
        rec = self.manifest.jobs[job.name]
        export_id, query_id = job.export_id, None
        if job.query is not None:
            from orchestrator.queries import ensure_query_export

            export = await ensure_query_export(self.api, job, self.query_prefix, jl)
            export_id, query_id = export.id, export.query_id
        if (rec.export_id or export_id) != export_id or (rec.query_id or query_id) != query_id:
            jl.info("the job now points at export %s (query %s): starting afresh", export_id, query_id)
            rec = self.manifest.jobs[job.name] = JobRecord(name=job.name, attempts=rec.attempts)
        rec.export_id, rec.query_id = export_id, query_id
        jl.extra = {**(jl.extra or {}), "export_id": export_id, "execution_id": rec.execution_id}
        return rec

    def _fail(self, rec: JobRecord, jl: JobLog, status: JobStatus, message: str) -> None:
        # The message may quote the server (an error body, an execution's error): no token.
        message = self.api.scrub(message)
        rec.status, rec.error = status, message
        # A failed job vouches for no file. record() notes the file before its rename, so a
        # rename or a manifest save that then fails would leave the sha256 and path of a
        # file that is not (or not from this attempt) at that name.
        rec.path = rec.sha256 = None
        rec.bytes = rec.records = None
        jl.error(
            "%s: %s",
            status.value,
            message,
            extra={"event": "job_failed", "status": status.value, "error": message},
        )

    async def _already_done(self, job: Job, rec: JobRecord) -> bool:
        """An earlier run into this folder (prefix) left this job's complete, intact file:
        locally its sha256 is checked; in a bucket the object's size and ETag must be those
        recorded when its upload completed (no download either way)."""
        if rec.status is not JobStatus.SUCCEEDED or not rec.path or not rec.sha256:
            return False
        if rec.path != output_name(job.name, job.compression):
            return False
        try:
            return await self.sink.verify(rec, job.compression)
        except MicsExportError as exc:
            if not _is_storage_error(exc):
                raise
            log.warning("cannot check %s (%s): fetching it again", self.sink.label(rec.path), exc)
            return False

    async def _attempts(self, job: Job, rec: JobRecord, jl: JobLog) -> None:
        export_id = rec.export_id
        assert export_id is not None
        # An interrupted earlier run keeps its retry budget; a finished, failed one gets a fresh one.
        budget_start = rec.attempts if rec.status.is_final else 0
        # A job that FAILED or TIMED_OUT on our side (disk full, a manifest write, a cut
        # download) may have left a SUCCEEDED execution: adopt it rather than pay for another.
        # Not one a guard rejected: the same file would get the same verdict, and the usual
        # cure of a suspect export is fresh data (reuse_within re-judges it when wanted).
        reclaim = rec.status in (JobStatus.FAILED, JobStatus.TIMED_OUT) and rec.guard is None
        adopt = (
            (rec.execution_id is not None and not rec.status.is_final) or rec.status is JobStatus.SUCCEEDED or reclaim
        )
        rec.guard = rec.note = rec.previous_records = rec.reused_from = None  # this run's verdict replaces them
        while True:
            execution: Execution | None = None
            latest: Execution | None = None
            # Every API call of the attempt counts against its deadline: the adoption lookup
            # and the create as much as the polls and the download.
            try:
                with anyio.fail_after(job.timeout_s) as attempt:
                    execution, adopted = await self._adopt_or_create(
                        job, rec, jl, export_id, adopt=adopt, reclaim=reclaim
                    )
                    # A file had from an execution this run did not follow from the start (reused,
                    # or reclaimed from a failed run) that cannot be had whole gets one new execution.
                    second_hand = adopted and ((adopt and reclaim) or rec.reused_from is not None)
                    adopt = reclaim = False
                    jl.extra = {**(jl.extra or {}), "execution_id": execution.id}
                    if adopted:
                        # An execution adopted from an interrupted run gets a whole timeout_s from
                        # now: cutting it short would throw away the platform's work (and a
                        # resumable part file). The lookup that found it was bounded all the same.
                        attempt.deadline = anyio.current_time() + job.timeout_s
                    final = latest = await self._poll(job, rec, jl, export_id, execution)
                    if final.is_success:
                        try:
                            await self._download(job, rec, jl, export_id, final)
                            if rec.guard is not None:
                                jl.error(
                                    "FAILED by a guard: %s (file kept as %s)",
                                    rec.error,
                                    rec.path,
                                    extra={"event": "guard_failed", "guard": rec.guard, "error": rec.error},
                                )
                            return
                        except NotFoundError:
                            if not adopted:
                                raise
                            jl.warning("the adopted execution's file is gone: starting a new execution")
                            continue
                        except (JobError, TransportError, ApiError) as exc:
                            if not second_hand or isinstance(exc, AuthError):
                                raise
                            jl.warning(
                                "could not get the file of execution %s (%s): starting a new execution",
                                final.id,
                                self.api.scrub(str(exc)),
                                extra={"event": "second_hand_failed"},
                            )
                            rec.reused_from = None
                            continue
                    deadline = attempt.deadline
            except TimeoutError:
                if rec.status is JobStatus.SUCCEEDED:
                    return  # the deadline fell after the file was complete and recorded
                if execution is None:
                    raise ExecutionTimeoutError(
                        f"no execution could be adopted or created within timeout_s={job.timeout_s:g}"
                    ) from None
                if latest is None or not latest.is_final:
                    await self._cancel(export_id, execution.id, jl)
                raise ExecutionTimeoutError(
                    f"execution {execution.id} did not finish within timeout_s={job.timeout_s:g}"
                ) from None
            detail = await self._record_failure(job, rec, jl, final, deadline)
            ended = f"execution {final.id} ended {final.raw_status}"
            if final.status not in RETRIED_STATUSES:
                rec.status = JobStatus.CANCELLED
                rec.error = self.api.scrub(f"{ended}: {detail}" if detail else ended)
                return
            used = rec.attempts - budget_start
            if used > job.retries:
                raise ExecutionFailedError(
                    f"{ended}; {used} attempt(s) used, no retries left" + (f": {detail}" if detail else "")
                )
            jl.warning(
                "execution %s ended %s: retrying (%d of %d retries)%s",
                final.id,
                final.raw_status,
                used,
                job.retries,
                f": {detail}" if detail else "",
                extra={"event": "retry_execution"},
            )

    async def _adopt_or_create(
        self, job: Job, rec: JobRecord, jl: JobLog, export_id: str, *, adopt: bool, reclaim: bool = False
    ) -> tuple[Execution, bool]:
        """The execution to follow: an earlier run's (once), a recent SUCCEEDED one
        (``reuse_within``), a lost create's, or a new one (if it fits before the deadline);
        and whether it was adopted from before this attempt (its timeout then restarts).
        ``reclaim``: the earlier run's record is final (FAILED on our side): only a SUCCEEDED
        execution of it is worth adopting."""
        if adopt and rec.execution_id:
            found = await self.api.find_execution(export_id, rec.execution_id)
            if found is not None and (found.is_success or not (found.is_final or reclaim)):
                jl.info(
                    "adopting execution %s (%s) from an earlier run%s",
                    found.id,
                    found.raw_status,
                    " that failed after it (no new execution to pay for)" if reclaim else "",
                    extra={"event": "adopted", "execution_id": found.id},
                )
                return found, True
        if job.reuse_within is not None and rec.creating_since is None:
            reused = await self._find_reusable(job, rec, jl, export_id)
            if reused is not None:
                return reused, True
        tries = max(CREATE_TRIES_MIN, self.api.retry.max_tries)
        unknown: MicsExportError | None = None
        for n in range(tries):
            if unknown is not None:
                await anyio.sleep(self.api.retry_wait(n - 1, unknown))
            if rec.creating_since is not None:
                # A create whose outcome is unknown (this attempt's, or a killed run's): the
                # platform may have made the execution. Look before making another.
                lost = await self._find_lost_create(export_id, rec.creating_since)
                if lost is not None:
                    jl.info(
                        "adopting execution %s whose create answer was lost",
                        lost.id,
                        extra={"event": "adopted", "execution_id": lost.id},
                    )
                    self._started(rec, lost)
                    self.writer.mark()
                    return lost, unknown is None
            self._check_deadline(job, jl)
            rec.creating_since = int(time.time() * 1000)
            await self.writer.save()  # the intent is on disk before the POST
            try:
                execution = await self.api.create_execution(export_id)
            except (TransientApiError, TransportError, MalformedResponseError) as exc:
                # Nothing sent (a failed connect) or refused (429): the client already retried
                # those; they end the attempt. Anything else (5xx, a timeout or reset after
                # sending, an unreadable answer) may have created the execution.
                if isinstance(exc, ConnectError) or getattr(exc, "status", None) == 429:
                    raise
                unknown = exc
                jl.warning(
                    "create-execution outcome unknown (%s): looking for it before creating again",
                    exc,
                    extra={"event": "create_unknown", "error": str(exc)},
                )
                continue
            self._started(rec, execution)
            self.writer.mark()  # the intent already on disk covers this window (see README)
            jl.info(
                "created execution %s",
                execution.id,
                extra={
                    "event": "execution_created",
                    "execution_id": execution.id,
                    "attempt": rec.attempts,
                },
            )
            return execution, False
        raise JobError(
            f"could not create an execution of export {export_id}: the outcome was unknown {tries} times "
            f"and no execution appeared (last: {unknown})"
        )

    def _started(self, rec: JobRecord, execution: Execution) -> None:
        if rec.execution_id and rec.execution_id != execution.id:
            self._stale.setdefault(rec.name, set()).add(rec.execution_id)
        rec.execution_id = execution.id
        rec.creating_since = None
        rec.attempts += 1
        rec.status = JobStatus.PENDING
        rec.error = None  # error_file stays: the last failed attempt's file is still worth reading
        rec.bytes = rec.records = rec.sha256 = rec.path = None
        rec.invalid_lines, rec.invalid_line_numbers = 0, []

    async def _find_reusable(self, job: Job, rec: JobRecord, jl: JobLog, export_id: str) -> Execution | None:
        """The newest SUCCEEDED execution of the export created within ``reuse_within`` (first
        REUSE_PAGES pages, newest first), recorded as reused; None if there is none.

        A query job's export may have had another query when an execution was made (the
        platform does not say which query an execution ran): only an execution an earlier
        run recorded for this job on the very same query id is reused.
        """
        assert job.reuse_within is not None
        since_ms = int((time.time() - job.reuse_within) * 1000)
        known: set[str] | None = None
        if job.query is not None:
            known = self.history.executions_on_query(job.name, rec.query_id) if self.history and rec.query_id else set()
        seen = 0
        async for candidate in self.api.iter_executions(export_id, 10, max_pages=REUSE_PAGES + 1):
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
            self._started(rec, candidate)  # an execution this job used: it counts in attempts
            rec.reused_from = {"execution_id": candidate.id, "created_at": created}
            self.writer.mark()
            jl.info(
                "reusing execution %s (SUCCEEDED, created %s, within reuse_within=%s): no new execution",
                candidate.id,
                created,
                describe_duration(job.reuse_within),
                extra={"event": "reused", "execution_id": candidate.id, "created_at": created},
            )
            return candidate
        jl.info(
            "no SUCCEEDED execution created within reuse_within=%s among the newest %d%s: creating one",
            describe_duration(job.reuse_within),
            seen,
            " (a query job reuses only executions an earlier run recorded on its query)" if known is not None else "",
            extra={"event": "reuse_none"},
        )
        return None

    def _check_deadline(self, job: Job, jl: JobLog) -> None:
        """Raise JobError ("skipped: deadline ...") when the job is not expected to finish before
        the run's deadline: no execution is created that the deadline would cut short."""
        if self.deadline is None:
            return
        left = self.deadline - anyio.current_time()
        expected, source = expected_duration_s(self.history, job.name, job.timeout_s)
        if left >= expected:
            return
        raise JobError(
            f"skipped: deadline: {describe_duration(left)} left before the run's deadline, and the job is "
            f"expected to take {describe_duration(expected)} ({source}): no execution created"
        )

    async def _find_lost_create(self, export_id: str, since_ms: int) -> Execution | None:
        """The execution a lost create made: the oldest one created since the intent."""
        claimed = {r.execution_id for r in self.manifest.jobs.values()}
        page = await self.api.list_executions(export_id, 0, 10)
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

    async def _poll(self, job: Job, rec: JobRecord, jl: JobLog, export_id: str, execution: Execution) -> Execution:
        """Poll until final: exponential from initial_s, full jitter, capped at max_s."""
        stall = _StallWatch(job.stall_s)

        async def once() -> Execution:
            nonlocal execution
            found = await self.api.find_execution(export_id, execution.id)
            if found is None:
                raise JobError(f"execution {execution.id} is no longer listed by the API")
            execution = found
            await self._observe(rec, found)
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
                    await self._cancel(export_id, found.id, jl)
                    raise ExecutionTimeoutError(
                        f"execution {found.id} stalled at {found.completed_tasks}/{found.num_tasks} tasks "
                        f"for {job.stall_s:g}s"
                    )
            return found

        def polled(details: Any) -> None:
            # Every poll at DEBUG (-v), in any log format and whether or not stderr is a terminal.
            found: Execution = details["value"]
            wait = details.get("wait")
            jl.debug(
                "poll %d: execution %s %s, %s/%s tasks done%s%s",
                details["tries"],
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

        await self._observe(rec, execution)
        if execution.is_final:
            return execution
        poller = backoff.on_predicate(
            poll_waits,
            lambda e: not e.is_final,
            initial_s=job.poll.initial_s,
            max_s=job.poll.max_s,
            jitter=None,  # poll_waits draws its own
            logger=None,
            on_backoff=polled,
            on_success=polled,
        )(once)
        result: Execution = await poller()
        return result

    async def _observe(self, rec: JobRecord, execution: Execution) -> None:
        status = (
            JobStatus.RUNNING
            if execution.status
            not in (
                ExecutionStatus.PENDING,
                ExecutionStatus.SCHEDULED,
                ExecutionStatus.WAITING_DEPENDENT_JOB,
            )
            else JobStatus.PENDING
        )
        rec.num_tasks = execution.num_tasks
        self.manifest.live_of(rec.name).completed_tasks = execution.completed_tasks
        rec.erroneous_tasks = execution.erroneous_tasks
        if not execution.is_final and status is not rec.status:
            rec.status = status
            self.writer.mark()

    async def _download(self, job: Job, rec: JobRecord, jl: JobLog, export_id: str, execution: Execution) -> None:
        stale = tuple(self._stale.pop(job.name, ()))
        dest = self.sink.target(output_name(job.name, job.compression), execution.id, stale)
        # A part file is ours to resume only if the manifest recorded this very execution's
        # download (a killed run): anything else under its name was planted or is stale.
        resume = rec.execution_id == execution.id and rec.status in (JobStatus.DOWNLOADING, JobStatus.SUCCEEDED)
        # Ours: an earlier success, or a file a guard failed but on_guard_failure: keep left there.
        ours_at_dest = rec.path == dest.name and (rec.status is JobStatus.SUCCEEDED or rec.guard is not None)
        rec.status = JobStatus.DOWNLOADING
        live = self.manifest.live_of(job.name)
        live.downloaded = 0
        await self.writer.save()  # on disk before the part file grows: what lets a rerun resume it
        started = time.monotonic()

        def progress(n: int) -> None:
            live.downloaded = n

        async def record(result: DownloadResult) -> str | None:
            # Saved before the rename: a kill between the two leaves a complete part file
            # that the rerun finishes at once (416 at its end), never a second download.
            rec.status = JobStatus.SUCCEEDED
            rec.path = dest.name
            rec.bytes, rec.records, rec.sha256 = result.bytes, result.records, result.sha256
            rec.invalid_lines = result.stats.invalid_lines
            rec.invalid_line_numbers = list(result.stats.invalid_line_numbers)
            rec.length_check = result.length_check
            rec.etag = rec.object_size = None  # known once the upload completes (below)
            # The guards judge the complete file here, before anything can see it: a rejected
            # file is committed under another name (returned), never under its final one.
            name = await self._judge(job, rec, jl, execution, result.records, result.stats.invalid_lines, dest.name)
            await self.writer.save()
            return name

        with _storage_fails_job():
            result = await download(
                lambda start: self.api.stream_result(
                    export_id, execution.id, technical_name=execution.technical_name, start=start
                ),
                dest,
                compression=job.compression,
                tag=execution.id,
                resume=resume,
                on_invalid=job.on_invalid,
                on_progress=progress,
                pool=self.pool,
                before_rename=record,
                max_line_bytes=job.max_line_bytes,
                on_unverified_length=job.on_unverified_length,
            )
        if rec.guard is not None and rec.path != dest.name:
            # Rejected: an earlier file under the final name (another query, another export,
            # an earlier night's rerun) must not stay there for downstream to load either.
            with _storage_fails_job():
                if await self.sink.remove(dest.name):
                    jl.warning(
                        "removed the earlier %s: the job's new file was rejected, kept as %s",
                        dest.name,
                        rec.path,
                        extra={"event": "output_removed"},
                    )
        if result.etag is not None:
            # What a rerun compares with a HEAD to trust the object without downloading it.
            # Marked, not saved: a kill before the next write only costs that rerun a download.
            rec.etag, rec.object_size = result.etag, result.object_size
            self.writer.mark()
        if result.replaced is not None:
            (jl.info if ours_at_dest else jl.warning)(
                "replaced %s that was already at %s%s",
                result.replaced,
                dest.name,
                " (this job's earlier output)" if ours_at_dest else ", not written by mics-export",
                extra={"event": "output_replaced"},
            )
        if result.length_check == "unverified":
            jl.warning(
                "the server stated no length and could not confirm the end of the file: kept as "
                "on_unverified_length says (length_check: unverified in the manifest)",
                extra={"event": "length_unverified"},
            )
        elapsed = max(1e-9, time.monotonic() - started)
        jl.info(
            "%s: %d records, %d bytes in %.1fs (%.1f MB/s)%s",
            # A guard may have failed the complete file (record() said so): say what it is.
            "SUCCEEDED" if rec.status is JobStatus.SUCCEEDED else f"downloaded (then {rec.status.value} by a guard)",
            result.records,
            result.bytes,
            elapsed,
            (result.bytes - result.resumed_from) / elapsed / 1e6,
            f", resumed at byte {result.resumed_from}" if result.resumed_from else "",
            extra={
                "event": "job_succeeded" if rec.status is JobStatus.SUCCEEDED else "job_downloaded",
                "records": result.records,
                "bytes": result.bytes,
                "sha256": result.sha256,
            },
        )
        if result.stats.invalid_lines:
            jl.warning(
                "%d invalid line(s) kept as served, first at line %d",
                result.stats.invalid_lines,
                result.stats.invalid_line_numbers[0],
                extra={"event": "invalid_lines"},
            )
        if execution.erroneous_tasks:
            jl.warning(
                "the platform reports %d erroneous task(s) of %s",
                execution.erroneous_tasks,
                execution.num_tasks,
                extra={"event": "erroneous_tasks"},
            )
        if result.records == 0:
            jl.warning(
                "the export is empty (0 records): check its query — a bad query silently yields an empty file",
                extra={"event": "empty_result"},
            )

    async def _judge(
        self, job: Job, rec: JobRecord, jl: JobLog, execution: Execution, records: int, invalid: int, final_name: str
    ) -> str | None:
        """Apply the job's guards to a complete file (inside record(), before the commit);
        a trip makes ``rec`` FAILED with the guard, value and limit. Returns the name to
        commit the file under instead of ``final_name`` (``NAME.ndjson.rejected``), or None."""
        limits = Limits.of(job)
        before: int | None = None
        if limits.max_drop_pct is not None:
            # Earlier manifests are read from disk (once each): off the event loop.
            before, where = await anyio.to_thread.run_sync(previous_records, self.history, job.name)
            rec.previous_records = before
            if where is not None:
                jl.debug("max_drop_pct: compared with %d record(s) of the run in %s", before, where)
        verdict = evaluate(
            limits,
            Measured(records, invalid, execution.erroneous_tasks, execution.num_tasks, before),
        )
        rec.note = "; ".join(verdict.notes) or None
        for note in verdict.notes:
            jl.info("%s", note, extra={"event": "guard_note"})
        if verdict.trip is None:
            return None
        name = committed_name(final_name, limits, verdict)
        rec.status = JobStatus.FAILED
        rec.guard = verdict.trip.as_dict()
        rec.error = verdict.error
        rec.path = name or final_name
        return name

    async def _record_failure(
        self, job: Job, rec: JobRecord, jl: JobLog, execution: Execution, deadline: float
    ) -> str | None:
        """Keep the FAILED execution's error file beside the outputs, when the API has one;
        returns the platform's own error and the file's first line, as one line (or None).

        Best effort, and bounded: ERROR_FILE_TIMEOUT_S and ERROR_FILE_MAX_BYTES at most, and
        never past the attempt's ``deadline`` (anyio clock). The file and the line are the
        server's text, so both are scrubbed of the token before they go anywhere.
        """
        parts = [execution.error_message] if execution.error_message else []
        org = job.organisation_id or execution.organisation_id
        if org and execution.status is ExecutionStatus.FAILED:
            text: bytes | None = None
            budget = min(ERROR_FILE_TIMEOUT_S, deadline - anyio.current_time())
            if budget <= 0:
                jl.warning("no time left in the attempt to fetch the error file: skipped")
            else:
                with anyio.move_on_after(budget) as scope:
                    try:
                        text = await self.api.fetch_error_file(org, execution.id, ERROR_FILE_MAX_BYTES)
                    except MicsExportError as exc:
                        jl.warning("could not fetch the error file: %s", exc)
                if scope.cancelled_caught:
                    jl.warning("the error file did not arrive within %.1fs: skipped", budget)
            if text is not None:
                text = self.api.scrub(text)
                name = f"{job.name}.error.txt"
                with _storage_fails_job():
                    await self.sink.write(name, text)
                rec.error_file = name
                first = text.decode("utf-8", "replace").strip().splitlines()[:1]
                line = " ".join(first[0].split())[:200] if first else ""
                if line and all(line not in p for p in parts):
                    parts.append(f"error file: {line}")
        detail = self.api.scrub("; ".join(parts)) if parts else None
        ended = f"execution {execution.id} ended {execution.raw_status}"
        rec.error = f"{ended}: {detail}" if detail else ended
        self.writer.mark()
        return detail

    async def _cancel(self, export_id: str, execution_id: str, jl: JobLog) -> None:
        """Best effort: the cancel endpoint is assumed, and its failure changes nothing."""
        with anyio.move_on_after(10, shield=True) as scope:
            try:
                await self.api.cancel_execution(export_id, execution_id)
            except MicsExportError as exc:
                jl.warning(
                    "could not cancel execution %s: the platform answered %s",
                    execution_id,
                    self.api.scrub(str(exc)),
                    extra={"event": "cancel_failed", "error": self.api.scrub(str(exc))},
                )
                return
            # What the platform says now: a cancel it accepted but did not act on is worth knowing.
            try:
                after = await self.api.find_execution(export_id, execution_id)
            except MicsExportError as exc:
                after, why = None, f"its status could not be read ({self.api.scrub(str(exc))})"
            else:
                why = "it is no longer listed" if after is None else f"it is now {after.raw_status}"
            jl.info(
                "asked the platform to cancel execution %s: accepted; %s",
                execution_id,
                why,
                extra={"event": "cancelled", "status": after.raw_status if after else None},
            )
        if scope.cancelled_caught:
            jl.warning("the platform did not answer the cancel of execution %s within 10s", execution_id)


@contextlib.contextmanager
def _storage_fails_job() -> Generator[None, None, None]:
    """A bucket refusing one object fails that job (like a full disk), not the whole run."""
    try:
        yield
    except MicsExportError as exc:
        if not _is_storage_error(exc):
            raise
        raise JobError(str(exc)) from None


def _is_storage_error(exc: BaseException) -> bool:
    """An object-storage error (objstore is imported only when a bucket is used)."""
    objstore = sys.modules.get("orchestrator.objstore")
    return objstore is not None and isinstance(exc, objstore.StorageError | objstore.StorageUsageError)


def poll_waits(initial_s: float, max_s: float) -> Generator[float, Any, None]:
    """Seconds to wait before each poll (a ``backoff`` wait generator).

    The n-th wait is ``uniform(0, min(max_s, initial_s * 2 ** min(n, 32)))`` (full jitter). Once
    the execution reports progress, the wait is its estimated time to finish instead
    (times ``uniform(1, 1.1)``, to land just after it, and no less than about
    ``initial_s``) or, when that is beyond ``max_s``, ``max_s`` times ``uniform(0.9, 1)``:
    a 5-minute execution then costs ~9 polls, not ~15, and its end is noticed promptly.
    The estimate comes from how fast ``completed_tasks`` moved between two polls, on this
    machine's monotonic clock, so the platform's clock does not matter.
    """
    n = 0
    last: tuple[float, int] | None = None
    execution = yield 0.0  # backoff primes the generator; this value is unused
    while True:
        wait = random.uniform(0, min(max_s, initial_s * 2**n))
        # Capped: 2.0**1024 overflows, and a long execution polled every max_s reaches
        # n = 1024 within hours; past the cap the draw is bounded by max_s anyway.
        n = min(n + 1, POLL_MAX_EXPONENT)
        # Not started yet counts as 0 done: the first progress seen then gives a rate that
        # is too low (it started later), so a long first step — which is the right step.
        done = getattr(execution, "completed_tasks", None) or 0
        total = getattr(execution, "num_tasks", None)
        now = time.monotonic()
        if total and last is not None and done > last[1]:
            eta = (total - done) * (now - last[0]) / (done - last[1])
            # Far from the end: a full max_s step. Near it: land just after the finish.
            hint = max_s * random.uniform(0.9, 1.0) if eta > max_s else eta * random.uniform(1.0, 1.1)
            # The estimate replaces the random draw: a draw up to max_s near the end
            # would notice the finish up to max_s late.
            wait = min(max_s, max(hint, initial_s * random.uniform(0.5, 1.0)))
        last = (now, done)
        execution = yield wait


class _StallWatch:
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


__all__ = ["Runner"]
