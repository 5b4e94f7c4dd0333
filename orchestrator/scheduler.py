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

Every state change is a transition of the job's record (:mod:`orchestrator.record`) that
says how durable it must be; the manifest writer makes it so before the step it enables. One
job's failure is recorded and never stops the others. The wiring around it — sink, lock,
client, pool, signals, deadline, report — is :mod:`orchestrator.app`'s: a cancelled Runner
leaves no temporary file, and app writes the manifest INTERRUPTED.

Beside it: where an execution comes from (:mod:`orchestrator.executions`), following it to
its end (:mod:`orchestrator.polling`), getting its file (:mod:`orchestrator.fetch`), and what
is done with one that gave none (:mod:`orchestrator.failures`). Past ~350 lines because the
lifecycle — job, attempt, adopt-or-create with its one retry budget — reads best as one
class whose methods share the job's record and log; its helpers live in those modules.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
import zstandard

from orchestrator.api import ApiClient, nothing_created
from orchestrator.config import QUERY_EXPORT_PREFIX, Job
from orchestrator.context import bind_job
from orchestrator.download import output_name
from orchestrator.errors import (
    ApiError,
    AuthError,
    ExecutionFailedError,
    ExecutionTimeoutError,
    JobError,
    MicsExportError,
    NotFoundError,
    TransportError,
    is_transient,
)
from orchestrator.executions import Origin, check_deadline, find_lost_create, find_reusable
from orchestrator.failures import cancel_execution, is_storage_error, record_failure
from orchestrator.fetch import Fetcher
from orchestrator.guards import RunHistory
from orchestrator.manifest import ManifestWriter
from orchestrator.models import Execution, ExecutionStatus
from orchestrator.polling import Poller
from orchestrator.record import Durability, JobRecord, JobStatus, Manifest, RunStatus
from orchestrator.retry import Budget
from orchestrator.sink import LocalSink, Sink
from orchestrator.workers import ValidatorPool

log = logging.getLogger("orchestrator.scheduler")

LOCAL_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)
"""Errors of this machine (files, disk, decompression) that fail one job, not the run."""
RETRIED_STATUSES = frozenset({ExecutionStatus.FAILED, ExecutionStatus.LOST, ExecutionStatus.EXECUTOR_NOT_RESPONDING})
CREATE_TRIES_MIN = 3
"""Creates whose outcome is unknown (5xx, cut answer) tried at least this often (else max_tries)."""


@dataclass(frozen=True, slots=True)
class _Ended:
    """An execution that ended without a file, and the deadline of the attempt that followed it."""

    execution: Execution
    deadline: float


class _OutcomeUnknown(Exception):
    """A create that may have made the execution all the same: look before creating again."""

    def __init__(self, error: MicsExportError) -> None:
        super().__init__(str(error))
        self.error = error


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
        query_prefix: str = QUERY_EXPORT_PREFIX,
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
        self.fetcher = Fetcher(api, self.sink, self.writer, manifest, pool)
        self.poller = Poller(api, self.writer, manifest)
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
                        # A job's task starts once it has its slot: 10,000 jobs are then 200
                        # tasks at a time, not 10,000 tasks queued on the limiter (memory).
                        slot = object()
                        await self.limiter.acquire_on_behalf_of(slot)
                        tg.start_soon(self._job, job, slot)
            flushing.cancel_scope.cancel()
        if self.auth_error is not None:
            needs = [
                self.manifest.jobs[job.name].not_run(f"not run: {self.auth_error}")
                for job in self.jobs
                if not self.manifest.jobs[job.name].status.is_final
            ]
            await self.writer.persist(Durability.NOW, *needs)
        ok = all(self.manifest.jobs[j.name].status is JobStatus.SUCCEEDED for j in self.jobs)
        return RunStatus.SUCCEEDED if ok else RunStatus.FAILED

    async def _job(self, job: Job, slot: object) -> None:
        """One job, holding ``slot`` of the limiter (acquired for it by :meth:`run`) until it ends."""
        jl = JobLog(log, {"job": job.name, "export_id": job.export_id, "execution_id": None})
        # Lines the client, the stream and the models log for this job (a retry, a resume,
        # an unknown status) carry its fields too. Each job is its own task, with its own
        # copy of the context, so the binding ends with the task.
        bind_job(lambda: jl.extra)
        try:
            rec = self.manifest.jobs[job.name]
            try:
                resolved = await self._resolve(job, rec, jl)
                if resolved is None:
                    return
                rec = resolved
                await self.writer.persist(rec.begin())
                await self._attempts(job, rec, jl)
            except JobError as exc:
                status = JobStatus.TIMED_OUT if isinstance(exc, ExecutionTimeoutError) else JobStatus.FAILED
                await self._fail(rec, jl, status, str(exc))
            except AuthError as exc:
                # Every other job would get the same answer: stop the run, say why once.
                await self._fail(rec, jl, JobStatus.FAILED, str(exc))
                self.auth_error = exc
                self._stop.cancel()
            except (ApiError, TransportError) as exc:
                await self._fail(rec, jl, JobStatus.FAILED, str(exc))
            except LOCAL_ERRORS as exc:
                # Disk full, a folder in the way, a corrupt file: this job fails, the run goes on.
                await self._fail(rec, jl, JobStatus.FAILED, f"{type(exc).__name__}: {exc}")
            if rec.status.is_final:
                await self.writer.persist(rec.finished())
        finally:
            self.limiter.release_on_behalf_of(slot)

    async def _resolve(self, job: Job, rec: JobRecord, jl: JobLog) -> JobRecord | None:
        """The record to run the job with, or None when its complete file is kept (skipped)."""
        done = await self._already_done(job, rec)
        if done and job.query is None and rec.export_id == job.export_id:
            jl.info("already complete in this folder (sha256 verified): skipped", extra={"event": "job_skipped"})
            return None
        try:
            # The export lookup is an API call of the job: it gets the job's deadline.
            with anyio.fail_after(job.timeout_s):
                rec, afresh = await self._prepare(job, jl)
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
            return None
        if done and not afresh:  # the query export it was had from is unchanged
            jl.info("already complete in this folder (sha256 verified): skipped", extra={"event": "job_skipped"})
            return None
        return rec

    async def _prepare(self, job: Job, jl: JobLog) -> tuple[JobRecord, bool]:
        """The job's record, its export resolved, and whether it starts afresh: an earlier run's
        state is dropped if it was for another export or query (the job file changed), so
        nothing stale is adopted or kept."""
        rec = self.manifest.jobs[job.name]
        export_id, query_id = job.export_id, None
        if job.query is not None:
            from orchestrator.queries import ensure_query_export

            export = await ensure_query_export(self.api, job, self.query_prefix, jl)
            export_id, query_id = export.id, export.query_id
        afresh = (rec.export_id or export_id) != export_id or (rec.query_id or query_id) != query_id
        if afresh:
            jl.info("the job now points at export %s (query %s): starting afresh", export_id, query_id)
            rec = self.manifest.jobs[job.name] = JobRecord(name=job.name, attempts=rec.attempts)
        await self.writer.persist(rec.points_at(export_id, query_id))
        jl.extra = {**(jl.extra or {}), "export_id": export_id, "execution_id": rec.execution_id}
        return rec, afresh

    async def _fail(self, rec: JobRecord, jl: JobLog, status: JobStatus, message: str) -> None:
        # The message may quote the server (an error body, an execution's error): no token.
        message = self.api.scrub(message)
        await self.writer.persist(rec.failed(status, message))
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
            if not is_storage_error(exc):
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
        await self.writer.persist(rec.new_verdict())  # this run's verdict replaces an earlier one
        while True:
            ended = await self._attempt(job, rec, jl, export_id, adopt=adopt, reclaim=reclaim)
            adopt = reclaim = False
            if ended == "done":
                return
            if ended != "again" and not await self._unsuccessful(job, rec, jl, ended, budget_start):
                return

    async def _attempt(
        self, job: Job, rec: JobRecord, jl: JobLog, export_id: str, *, adopt: bool, reclaim: bool
    ) -> Literal["done", "again"] | _Ended:
        """One execution, followed to its end within the job's timeout_s: "done" once its file
        is had, "again" for a new execution at once, or the execution that ended without one."""
        execution: Execution | None = None
        latest: Execution | None = None
        # Every API call of the attempt counts against its deadline: the adoption lookup
        # and the create as much as the polls and the download.
        try:
            with anyio.fail_after(job.timeout_s) as attempt:
                execution, origin = await self._adopt_or_create(job, rec, jl, export_id, adopt=adopt, reclaim=reclaim)
                # A file had from an execution this run did not follow from the start (reused,
                # or reclaimed from a failed run) that cannot be had whole gets one new execution.
                second_hand = origin.earlier and ((adopt and reclaim) or rec.reused_from is not None)
                jl.extra = {**(jl.extra or {}), "execution_id": execution.id}
                if origin.earlier:
                    # An execution adopted from an interrupted run gets a whole timeout_s from
                    # now: cutting it short would throw away the platform's work (and a
                    # resumable part file). The lookup that found it was bounded all the same.
                    attempt.deadline = anyio.current_time() + job.timeout_s
                final = latest = await self.poller.poll(job, rec, jl, export_id, execution)
                if final.is_success:
                    return await self._fetch(job, rec, jl, final, origin, second_hand=second_hand)
                return _Ended(final, attempt.deadline)
        except TimeoutError:
            if rec.status is JobStatus.SUCCEEDED:
                return "done"  # the deadline fell after the file was complete and recorded
            if execution is None:
                raise ExecutionTimeoutError(
                    f"no execution could be adopted or created within timeout_s={job.timeout_s:g}"
                ) from None
            if latest is None or not latest.is_final:
                await cancel_execution(self.api, export_id, execution.id, jl)
            raise ExecutionTimeoutError(
                f"execution {execution.id} did not finish within timeout_s={job.timeout_s:g}"
            ) from None

    async def _fetch(
        self, job: Job, rec: JobRecord, jl: JobLog, final: Execution, origin: Origin, *, second_hand: bool
    ) -> Literal["done", "again"]:
        """Get the SUCCEEDED execution's file; "again" when an execution started before this
        attempt cannot give it (its file is gone, or it cannot be had whole)."""
        try:
            await self.fetcher.fetch(job, rec, jl, final, tuple(self._stale.pop(job.name, ())), self.history)
        except NotFoundError:
            if not origin.earlier:
                raise
            jl.warning("the adopted execution's file is gone: starting a new execution")
            return "again"
        except (JobError, TransportError, ApiError) as exc:
            if not second_hand or isinstance(exc, AuthError):
                raise
            jl.warning(
                "could not get the file of execution %s (%s): starting a new execution",
                final.id,
                self.api.scrub(str(exc)),
                extra={"event": "second_hand_failed"},
            )
            await self.writer.persist(rec.not_reused())
            return "again"
        if rec.guard is not None:
            jl.error(
                "FAILED by a guard: %s (file kept as %s)",
                rec.error,
                rec.path,
                extra={"event": "guard_failed", "guard": rec.guard, "error": rec.error},
            )
        return "done"

    async def _unsuccessful(self, job: Job, rec: JobRecord, jl: JobLog, ended: _Ended, budget_start: int) -> bool:
        """Record an execution that ended without a file; whether to retry with a new one
        (ExecutionFailedError when no retries are left)."""
        final = ended.execution
        detail, need = await record_failure(self.api, self.sink, job, rec, jl, final, ended.deadline)
        await self.writer.persist(need)
        ended_as = f"execution {final.id} ended {final.raw_status}"
        if final.status not in RETRIED_STATUSES:
            await self.writer.persist(rec.cancelled(self.api.scrub(f"{ended_as}: {detail}" if detail else ended_as)))
            return False
        used = rec.attempts - budget_start
        if used > job.retries:
            raise ExecutionFailedError(
                f"{ended_as}; {used} attempt(s) used, no retries left" + (f": {detail}" if detail else "")
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
        return True

    async def _adopt_or_create(
        self, job: Job, rec: JobRecord, jl: JobLog, export_id: str, *, adopt: bool, reclaim: bool = False
    ) -> tuple[Execution, Origin]:
        """The execution to follow and where it came from: an earlier run's (once), a recent
        SUCCEEDED one (``reuse_within``), a lost create's, or a new one (if it fits before the
        deadline). ``reclaim``: the earlier run's record is final (FAILED on our side): only a
        SUCCEEDED execution of it is worth adopting."""
        if adopt and rec.execution_id:
            found = await self._adopt(rec, jl, export_id, reclaim)
            if found is not None:
                return found, Origin.ADOPTED
        if job.reuse_within is not None and rec.creating_since is None:
            reusable = await find_reusable(self.api, self.history, job, export_id, rec.query_id, jl)
            if reusable is not None:
                # An execution this job used: it counts in attempts.
                await self.writer.persist(self._started(rec, reusable[0], reused_at=reusable[1]))
                return reusable[0], Origin.REUSED
        # One budget for the whole operation: the creates whose outcome was unknown and the
        # client's own retries of a 429 or a failed connect draw from it (never multiplied).
        budget = self.api.retry.budget(min_tries=CREATE_TRIES_MIN)
        unknown: MicsExportError | None = None
        unknowns = 0
        while True:
            if rec.creating_since is not None:
                # A create whose outcome is unknown (this attempt's, or a killed run's): the
                # platform may have made the execution. Look before making another.
                lost = await self._find_lost(rec, jl, export_id)
                if lost is not None:
                    return lost, Origin.CREATED if unknown is not None else Origin.RECOVERED
            check_deadline(self.deadline, self.history, job)
            try:
                return await self._create(rec, jl, export_id, budget), Origin.CREATED
            except _OutcomeUnknown as exc:
                unknown, unknowns = exc.error, unknowns + 1
            wait = budget.next_wait(unknown)
            if wait is None:
                raise JobError(
                    f"could not create an execution of export {export_id}: the outcome was unknown "
                    f"{unknowns} times and no execution appeared (last: {unknown})"
                )
            await self.api.retry.sleep(wait)

    async def _find_lost(self, rec: JobRecord, jl: JobLog, export_id: str) -> Execution | None:
        """The execution a create with a lost answer made, adopted (recorded) if found."""
        assert rec.creating_since is not None
        claimed = {r.execution_id for r in self.manifest.jobs.values()}
        lost = await find_lost_create(self.api, export_id, rec.creating_since, claimed)
        if lost is not None:
            jl.info(
                "adopting execution %s whose create answer was lost",
                lost.id,
                extra={"event": "adopted", "execution_id": lost.id},
            )
            await self.writer.persist(self._started(rec, lost))
        return lost

    async def _adopt(self, rec: JobRecord, jl: JobLog, export_id: str, reclaim: bool) -> Execution | None:
        """The execution an earlier run recorded, if it is still worth following."""
        assert rec.execution_id is not None
        found = await self.api.find_execution(export_id, rec.execution_id)
        if found is None or not (found.is_success or not (found.is_final or reclaim)):
            return None
        jl.info(
            "adopting execution %s (%s) from an earlier run%s",
            found.id,
            found.raw_status,
            " that failed after it (no new execution to pay for)" if reclaim else "",
            extra={"event": "adopted", "execution_id": found.id},
        )
        return found

    async def _create(self, rec: JobRecord, jl: JobLog, export_id: str, budget: Budget) -> Execution:
        """One create, its intent on disk before the POST; _OutcomeUnknown when it may have
        created the execution all the same (5xx, a timeout or reset after sending, a bad answer)."""
        await self.writer.persist(rec.creating())
        try:
            execution = await self.api.create_execution(export_id, budget=budget)
        except MicsExportError as exc:
            # Nothing sent (a failed connect) or refused (429): the client already retried
            # those within the budget; they end the attempt. Any other transient failure may
            # have created the execution.
            if not is_transient(exc) or nothing_created(exc):
                raise
            jl.warning(
                "create-execution outcome unknown (%s): looking for it before creating again",
                exc,
                extra={"event": "create_unknown", "error": str(exc)},
            )
            raise _OutcomeUnknown(exc) from None
        await self.writer.persist(self._started(rec, execution))
        jl.info(
            "created execution %s",
            execution.id,
            extra={"event": "execution_created", "execution_id": execution.id, "attempt": rec.attempts},
        )
        return execution

    def _started(self, rec: JobRecord, execution: Execution, reused_at: str | None = None) -> Durability:
        if rec.execution_id and rec.execution_id != execution.id:
            self._stale.setdefault(rec.name, set()).add(rec.execution_id)  # its part file may linger
        return rec.created(execution.id) if reused_at is None else rec.reused(execution.id, reused_at)


__all__ = ["Runner"]
