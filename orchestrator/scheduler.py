"""The run: every job's lifecycle, under one task group and one concurrency limit.

Per job::

    skip if an earlier run into this folder already has it (file present, sha256 equal)
    ── hold a slot of the CapacityLimiter (at most ``concurrency`` jobs in flight) ──
    adopt the execution an earlier run recorded, or create one (intent saved first)
    poll it with jittered exponential backoff until final (per-attempt deadline)
    SUCCEEDED → stream-download, check, write atomically → SUCCEEDED
    FAILED    → save its error file; while retries remain, a new execution
    timeout   → cancel it (best effort) → TIMED_OUT (not retried: see README)

Every state change is saved to the manifest before the next step. One job's failure is
recorded and never stops the others. SIGTERM / SIGINT cancel the task group: downloads
delete their temporary files, the manifest is written INTERRUPTED, exit 143 / 130.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import signal
import sys
import time
import zlib
from collections.abc import Generator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import backoff
import zstandard

from orchestrator.api import ApiClient, RetryPolicy
from orchestrator.config import Job, JobFile, load_job_file, read_token
from orchestrator.context import bind_job
from orchestrator.download import DownloadResult, download, output_name, sha256_of_file
from orchestrator.errors import (
    EXIT_FAILED,
    EXIT_OK,
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
    UsageError,
)
from orchestrator.manifest import (
    MANIFEST_NAME,
    JobRecord,
    JobStatus,
    Manifest,
    ManifestWriteError,
    ManifestWriter,
    RunStatus,
    load_previous,
    now_iso,
    remove_stale_temp_files,
    write_atomic,
)
from orchestrator.models import Execution, ExecutionStatus
from orchestrator.workers import ValidatorPool, default_workers, validator_pool

log = logging.getLogger("orchestrator.scheduler")

EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
ADOPT_WINDOW_MS = 30_000
"""Clock skew allowed when looking for an execution whose create answer was lost."""
LOCAL_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)
"""Errors of this machine (files, disk, decompression) that fail one job, not the run."""
RETRIED_STATUSES = frozenset({ExecutionStatus.FAILED, ExecutionStatus.LOST, ExecutionStatus.EXECUTOR_NOT_RESPONDING})
ERROR_FILE_TIMEOUT_S = 30.0
"""The most a FAILED execution's error file may take (never past the attempt's deadline)."""
ERROR_FILE_MAX_BYTES = 1 << 20
"""The most of an error file kept: it is for a person to read."""
CREATE_TRIES_MIN = 3
"""Creates whose outcome is unknown (5xx, cut answer) tried at least this often (else max_tries)."""
POLL_MAX_EXPONENT = 32
"""poll_waits stops doubling here: initial_s * 2**32 is past any max_s, and 2**1024 overflows."""


class JobLog(logging.LoggerAdapter[logging.Logger]):
    """Adds job, export_id and execution_id to every record, merged with the call's extra."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


@dataclass(frozen=True)
class RunOptions:
    """What the command line asked for."""

    jobs_file: Path
    simulate: bool = False
    output_dir: str | None = None
    concurrency: int | None = None
    only: tuple[str, ...] = ()
    shard: str | None = None
    log_format: str = "text"
    progress: str = "auto"
    workers: int | None = None
    metrics_pushgateway: str | None = None
    verbosity: int = 0


class Runner:
    """Runs a set of jobs against one API client, recording everything in the manifest."""

    def __init__(
        self,
        jobs: tuple[Job, ...],
        api: ApiClient,
        output_dir: Path,
        *,
        concurrency: int,
        manifest: Manifest,
        previous: Manifest | None = None,
        query_prefix: str = "mics-export:",
        pool: ValidatorPool | None = None,
    ) -> None:
        self.jobs = jobs
        self.api = api
        self.output_dir = output_dir
        self.limiter = anyio.CapacityLimiter(concurrency)
        self.manifest = manifest
        self.writer = ManifestWriter(manifest, output_dir / MANIFEST_NAME)
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
        """An earlier run into this folder left this job's complete, intact file."""
        if rec.status is not JobStatus.SUCCEEDED or not rec.path or not rec.sha256:
            return False
        path = self.output_dir / rec.path
        if not path.is_file() or rec.path != output_name(job.name, job.compression):
            return False
        try:
            digest = await anyio.to_thread.run_sync(sha256_of_file, path, job.compression, abandon_on_cancel=True)
        except LOCAL_ERRORS:
            return False  # unreadable or corrupt: download it again
        return digest == rec.sha256

    async def _attempts(self, job: Job, rec: JobRecord, jl: JobLog) -> None:
        export_id = rec.export_id
        assert export_id is not None
        # An interrupted earlier run keeps its retry budget; a finished, failed one gets a fresh one.
        budget_start = rec.attempts if rec.status.is_final else 0
        adopt = (rec.execution_id is not None and not rec.status.is_final) or rec.status is JobStatus.SUCCEEDED
        while True:
            execution: Execution | None = None
            latest: Execution | None = None
            # Every API call of the attempt counts against its deadline: the adoption lookup
            # and the create as much as the polls and the download.
            try:
                with anyio.fail_after(job.timeout_s) as attempt:
                    execution, adopted = await self._adopt_or_create(job, rec, jl, export_id, adopt=adopt)
                    adopt = False
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
                            return
                        except NotFoundError:
                            if not adopted:
                                raise
                            jl.warning("the adopted execution's file is gone: starting a new execution")
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
        self, job: Job, rec: JobRecord, jl: JobLog, export_id: str, *, adopt: bool
    ) -> tuple[Execution, bool]:
        """The execution to follow: an earlier run's (once), a lost create's, or a new one;
        and whether it was adopted from before this attempt (its timeout then restarts)."""
        if adopt and rec.execution_id:
            found = await self.api.find_execution(export_id, rec.execution_id)
            if found is not None and (found.is_success or not found.is_final):
                jl.info(
                    "adopting execution %s (%s) from an earlier run",
                    found.id,
                    found.raw_status,
                    extra={"event": "adopted", "execution_id": found.id},
                )
                return found, True
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
        dest = self.output_dir / output_name(job.name, job.compression)
        # A part file is ours to resume only if the manifest recorded this very execution's
        # download (a killed run): anything else under its name was planted or is stale.
        resume = rec.execution_id == execution.id and rec.status in (JobStatus.DOWNLOADING, JobStatus.SUCCEEDED)
        ours_at_dest = rec.status is JobStatus.SUCCEEDED and rec.path == dest.name
        rec.status = JobStatus.DOWNLOADING
        live = self.manifest.live_of(job.name)
        live.downloaded = 0
        await self.writer.save()  # on disk before the part file grows: what lets a rerun resume it
        started = time.monotonic()

        def progress(n: int) -> None:
            live.downloaded = n

        async def record(result: DownloadResult) -> None:
            # Saved before the rename: a kill between the two leaves a complete part file
            # that the rerun finishes at once (416 at its end), never a second download.
            rec.status = JobStatus.SUCCEEDED
            rec.path = dest.name
            rec.bytes, rec.records, rec.sha256 = result.bytes, result.records, result.sha256
            rec.invalid_lines = result.stats.invalid_lines
            rec.invalid_line_numbers = list(result.stats.invalid_line_numbers)
            rec.length_check = result.length_check
            await self.writer.save()

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
            stale_tags=self._stale.pop(job.name, ()),
            before_rename=record,
            max_line_bytes=job.max_line_bytes,
            on_unverified_length=job.on_unverified_length,
        )
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
            "SUCCEEDED: %d records, %d bytes in %.1fs (%.1f MB/s)%s",
            result.records,
            result.bytes,
            elapsed,
            (result.bytes - result.resumed_from) / elapsed / 1e6,
            f", resumed at byte {result.resumed_from}" if result.resumed_from else "",
            extra={
                "event": "job_succeeded",
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
                await anyio.to_thread.run_sync(write_atomic, self.output_dir / name, text)
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
        with anyio.move_on_after(10, shield=True):
            try:
                await self.api.cancel_execution(export_id, execution_id)
                jl.info("asked the platform to cancel execution %s", execution_id)
            except MicsExportError as exc:
                jl.info("could not cancel execution %s: %s", execution_id, exc)


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


# -- the command ---------------------------------------------------------------------------
def _select(job_file: JobFile, options: RunOptions) -> tuple[tuple[Job, ...], tuple[int, int] | None]:
    from orchestrator.sharding import resolve_shard, shard_of

    jobs = job_file.select(options.only)
    try:
        shard = resolve_shard(options.shard, os.environ)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if shard is not None:
        index, count = shard
        jobs = tuple(j for j in jobs if shard_of(j.name, count) == index)
    return jobs, shard


def execute(options: RunOptions) -> int:
    """``mics-export run``: load, check, run, report. Returns the exit code."""
    job_file = load_job_file(options.jobs_file)
    jobs, shard = _select(job_file, options)
    token = None
    if not options.simulate:
        token = read_token(job_file.api.token_env)
    base_url = job_file.base_url() if not options.simulate else ""
    from orchestrator.config import utc_today

    today = utc_today()  # one date for {date} and for retention, even across midnight
    output_dir = job_file.output_dir(options.output_dir, today)
    if shard is not None and options.output_dir is None:
        from orchestrator.sharding import shard_folder

        # Shards started at once must not share a folder: the second would fail on the
        # lock, and they cannot share a manifest. An explicit --output-dir is used as given.
        output_dir /= shard_folder(*shard)
    lock = _claim(output_dir)
    try:
        live = options.progress == "on" or (options.progress == "auto" and sys.stderr.isatty())
        from orchestrator.logs import setup_logging

        setup_logging(
            options.log_format,
            options.verbosity,
            secrets=[token] if token else [],
            quiet=live,
        )
        # Under the lock, so no other run is writing them; before the first request.
        try:
            removed = remove_stale_temp_files(output_dir)
        except OSError as exc:
            raise UsageError(f"cannot use output folder {output_dir}: {exc.strerror or exc}") from None
        if removed:
            log.info(
                "removed %d temporary file(s) a killed run left: %s",
                len(removed),
                ", ".join(removed),
                extra={"event": "temp_files_removed"},
            )
        if shard is not None and not jobs:
            log.warning(
                "shard %d/%d selects none of the %d job(s) of %s: nothing to do",
                *shard,
                len(job_file.select(options.only)),
                options.jobs_file,
                extra={"event": "empty_shard"},
            )
        previous = load_previous(output_dir / MANIFEST_NAME)  # a corrupt one is moved aside, loudly
        plan = _Plan(options, job_file, jobs, shard, token, base_url, output_dir, live, previous)
        code = anyio.run(_main, plan)
        if code == EXIT_OK and job_file.run.keep_days is not None:
            from orchestrator.retention import prune

            # Only after a run that SUCCEEDED: a failed night keeps every earlier one.
            prune(job_file.output_template(options.output_dir), job_file.run.keep_days, today, output_dir)
        return code
    finally:
        os.close(lock)


def _claim(output_dir: Path) -> int:
    """Create ``output_dir`` and lock it for this run (exit 2 if it cannot be, or is taken).

    Two runs in one folder would resume each other's part files and overwrite each
    other's manifest; the lock (``.lock``, flock) is released by the kernel even on kill -9.
    """
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(output_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise UsageError(f"cannot use output folder {output_dir}: {getattr(exc, 'strerror', None) or exc}") from None
    # A few tries over half a second: `mics-export status` takes the lock shared for an
    # instant to see whether a run is alive, and must never make a starting run fail.
    for attempt in range(CLAIM_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            if attempt + 1 < CLAIM_TRIES:
                time.sleep(CLAIM_WAIT_S)
    os.close(fd)
    raise UsageError(f"another mics-export run is using {output_dir}: wait for it, or use another folder") from None


CLAIM_TRIES = 25
CLAIM_WAIT_S = 0.02


@dataclass(frozen=True)
class _Plan:
    """Everything checked before the first request: a run starts only from a valid plan."""

    options: RunOptions
    job_file: JobFile
    jobs: tuple[Job, ...]
    shard: tuple[int, int] | None
    token: str | None
    base_url: str
    output_dir: Path
    live: bool
    previous: Manifest | None = None
    """The manifest an earlier run into this folder left (what this run resumes)."""


async def _main(plan: _Plan) -> int:
    options, job_file, jobs, output_dir = plan.options, plan.job_file, plan.jobs, plan.output_dir
    token, base_url = plan.token, plan.base_url
    async with contextlib.AsyncExitStack() as stack:
        if options.simulate:
            from orchestrator.simulator import Simulator, demo_config

            sim = await stack.enter_async_context(Simulator(demo_config()))
            base_url, token = sim.url, sim.token
            log.info("simulator serving on %s", sim.url, extra={"event": "simulator_started"})
        assert token is not None
        settings = job_file.api
        api = await stack.enter_async_context(
            ApiClient(
                base_url,
                token,
                retry=RetryPolicy(
                    max_tries=settings.retries.max_tries,
                    base_s=settings.retries.base_s,
                    max_wait_s=settings.retries.max_wait_s,
                    max_time_s=settings.retries.max_time_s,
                ),
                max_requests_in_flight=settings.max_requests_in_flight,
                accept_gzip=settings.accept_gzip,
            )
        )
        workers = default_workers() if options.workers is None else options.workers
        pool = await stack.enter_async_context(validator_pool(workers)) if workers > 0 else None
        previous = plan.previous
        manifest = Manifest()
        runner = Runner(
            jobs,
            api,
            output_dir,
            concurrency=options.concurrency or job_file.run.concurrency,
            manifest=manifest,
            previous=previous,
            query_prefix=job_file.api.query_export_prefix,
            pool=pool,
        )
        log.info(
            "run %s: %d job(s) into %s, concurrency %d, %d validation worker(s)%s",
            manifest.run_id,
            len(jobs),
            output_dir,
            runner.limiter.total_tokens,
            workers,
            f", resuming run {previous.run_id}" if previous else "",
            extra={"event": "run_started", "run_id": manifest.run_id},
        )
        received: list[signal.Signals] = []
        crashed: BaseException | None = None
        manifest_written = True
        view = None
        if plan.live:
            from orchestrator.progress import ProgressView

            view = ProgressView(manifest, [j.name for j in jobs]).__enter__()
        try:
            async with anyio.create_task_group() as tg:

                async def watch_signals() -> None:
                    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                        async for signum in signals:
                            received.append(signal.Signals(signum))
                            log.warning(
                                "%s received: stopping",
                                signal.Signals(signum).name,
                                extra={"event": "interrupted"},
                            )
                            tg.cancel_scope.cancel()
                            return

                async def work() -> None:
                    manifest.status = await runner.run()
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_signals)
                tg.start_soon(work)
        except BaseException as exc:
            crashed = exc  # reported by the CLI as one line; here only the manifest's last word
            raise
        finally:
            if received or _is_interrupt(crashed):
                manifest.status = RunStatus.INTERRUPTED
            elif manifest.status is RunStatus.RUNNING:
                # Only an error can end the run before runner.run() returns: a failed run,
                # whose in-flight jobs keep their execution ids for a rerun to adopt.
                manifest.status = RunStatus.FAILED
            elif manifest.status is RunStatus.SUCCEEDED and runner.writer.required_failures:
                manifest.status = RunStatus.FAILED  # a step was skipped for want of a manifest write
            manifest.finished_at = now_iso()
            manifest.exit_code = _exit_code(manifest.status, received, crashed)
            try:
                runner.writer.save_now()
            except ManifestWriteError:
                # Already logged by the writer. The file on disk is behind (it may still say
                # RUNNING): never exit 0 on it.
                manifest_written = False
                log.error(
                    "%s is behind this run (the last write failed): the run fails",
                    runner.writer.path,
                    extra={"event": "manifest_behind"},
                )
            if view is not None:
                view.__exit__(None, None, None)
                view.summary(str(output_dir / MANIFEST_NAME))
        if not manifest_written and manifest.status is RunStatus.SUCCEEDED:
            manifest.status = RunStatus.FAILED  # what the report and the metrics say
        _report(manifest, jobs)
        await _push_metrics(options.metrics_pushgateway, manifest, plan.shard)
    if received:
        return EXIT_SIGNAL[received[0]]
    return EXIT_OK if manifest.status is RunStatus.SUCCEEDED and manifest_written else EXIT_FAILED


def _exit_code(status: RunStatus, received: list[signal.Signals], crashed: BaseException | None) -> int:
    """The code this run exits with (recorded in the manifest for ``mics-export status``)."""
    from orchestrator.errors import EXIT_USAGE, single_error

    if received:
        return EXIT_SIGNAL[received[0]]
    if _is_interrupt(crashed):
        return 130
    if crashed is not None:  # the CLI's code for the error that stopped the run
        error = single_error(crashed) if isinstance(crashed, BaseExceptionGroup) else crashed
        return EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILED
    return EXIT_OK if status is RunStatus.SUCCEEDED else EXIT_FAILED


def _is_interrupt(exc: BaseException | None) -> bool:
    """A Ctrl-C that arrived outside the signal receiver (before or after the run proper)."""
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_interrupt(e) for e in exc.exceptions)
    return isinstance(exc, KeyboardInterrupt)


def _report(manifest: Manifest, jobs: tuple[Job, ...]) -> None:
    counts: dict[str, int] = {}
    for job in jobs:
        status = manifest.jobs[job.name].status.value
        counts[status] = counts.get(status, 0) + 1
    log.info(
        "run %s %s: %s",
        manifest.run_id,
        manifest.status.value,
        ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no job selected (an empty shard)",
        extra={"event": "run_finished", "status": manifest.status.value, "counts": counts},
    )


async def _push_metrics(gateway: str | None, manifest: Manifest, shard: tuple[int, int] | None) -> None:
    """Push the run's metrics (in a thread: the client blocks); a failure is only a warning."""
    if not gateway:
        return
    from orchestrator.manifest import as_dict
    from orchestrator.metrics import MetricsPushError, push_run_metrics, shard_grouping_key

    # After a signal the whole stop must fit in 10 s: keep the push short then.
    timeout_s = 3.0 if manifest.status is RunStatus.INTERRUPTED else 10.0
    try:
        await anyio.to_thread.run_sync(
            lambda: push_run_metrics(
                as_dict(manifest), gateway, grouping_key=shard_grouping_key(shard), timeout_s=timeout_s
            )
        )
        log.info("metrics pushed to the Pushgateway", extra={"event": "metrics_pushed"})
    except MetricsPushError as exc:
        log.warning("could not push metrics: %s", exc, extra={"event": "metrics_failed"})


__all__ = ["RunOptions", "Runner", "execute"]
