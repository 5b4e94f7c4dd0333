"""A SUCCEEDED execution's file: received, judged by the guards, recorded, committed, reported.

The order is the integrity property of a run: the complete file is recorded in the manifest
(on disk) and then committed, inside one shielded scope — the manifest says SUCCEEDED only
for a file that is about to be committed, and a manifest write that fails means no commit.
A file a guard rejects is committed under another name (``NAME.ndjson.rejected``), never
under its final one.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import anyio

from orchestrator.download import DownloadOptions, DownloadResult, output_name, receive
from orchestrator.errors import JobError
from orchestrator.failures import storage_fails_job
from orchestrator.guards import Limits, Measured, RunHistory, committed_name, evaluate, previous_records
from orchestrator.record import Durability, JobRecord, JobStatus, Manifest

if TYPE_CHECKING:
    from orchestrator.api import ApiClient
    from orchestrator.config import Job
    from orchestrator.manifest import ManifestWriter
    from orchestrator.models import Execution
    from orchestrator.sink import Sink
    from orchestrator.workers import ValidatorPool

JobLog = logging.LoggerAdapter[logging.Logger]

MAX_VALIDATOR_CHARS = 256
"""A longer ETag / Last-Modified is not recorded (it is server text bound for the manifest)."""


class Fetcher:
    """Downloads the results of a run's SUCCEEDED executions into its sink."""

    def __init__(
        self, api: ApiClient, sink: Sink, writer: ManifestWriter, manifest: Manifest, pool: ValidatorPool | None
    ) -> None:
        self.api = api
        self.sink = sink
        self.writer = writer
        self.manifest = manifest
        self.pool = pool

    async def fetch(
        self,
        job: Job,
        rec: JobRecord,
        jl: JobLog,
        execution: Execution,
        stale: tuple[str, ...],
        history: RunHistory | None,
    ) -> None:
        """Get ``execution``'s file for ``job`` (``stale``: part files of its other executions)."""
        export_id = rec.export_id
        assert export_id is not None
        dest = self.sink.target(output_name(job.name, job.compression), execution.id, stale)
        # A part file is ours to resume only if the manifest recorded this very execution's
        # download (a killed run): anything else under its name was planted or is stale. And
        # only with the file's validator recorded, sent as If-Range: a file that changed since
        # is downloaded again, never continued (a complete one is checked by its sha256 below).
        resume = rec.execution_id == execution.id and (
            rec.status is JobStatus.SUCCEEDED
            or (rec.status is JobStatus.DOWNLOADING and None not in (rec.file_validator, rec.file_size))
        )
        validator, size = (rec.file_validator, rec.file_size) if resume else (None, None)
        # Ours: an earlier success, or a file a guard failed but on_guard_failure: keep left there.
        ours_at_dest = rec.path == dest.name and (rec.status is JobStatus.SUCCEEDED or rec.guard is not None)
        # Killed between the record and the rename: the part file must still be what was recorded.
        recorded_sha256 = rec.sha256 if resume and rec.status is JobStatus.SUCCEEDED else None
        live = self.manifest.live_of(job.name)
        live.downloaded = 0
        await self.writer.persist(rec.downloading())
        started = time.monotonic()

        def progress(n: int) -> None:
            live.downloaded = n

        def learned(tag: str, total: int) -> None:
            # Server text bound for the manifest: an odd one is not kept (the part file then
            # cannot be resumed by a rerun, only downloaded again).
            if len(tag) <= MAX_VALIDATOR_CHARS and tag.isprintable() and not self.api.transport.secret.echoed_in(tag):
                rec.validated(tag, total)
                self.writer.mark()  # Durability.SOON: the next group commit carries it

        async def starting(start: int) -> None:
            if start == 0 and (rec.file_validator, rec.file_size) != (None, None):
                await self.writer.persist(rec.rewriting())  # never a validator for other bytes

        # One retry budget for the whole download: a restart from byte 0 after a content change
        # opens a new stream on the same budget, so the restarts never multiply its tries.
        budget = self.api.retry.budget(resumable=True)
        with storage_fails_job():
            part = await receive(
                lambda start: self.api.stream_result(
                    export_id,
                    execution.id,
                    technical_name=execution.technical_name,
                    start=start,
                    budget=budget,
                    validator=validator,  # the stream uses them only when it starts past byte 0
                    total=size,
                    on_validator=learned,
                ),
                dest,
                DownloadOptions.of(job),
                resume=resume,
                on_progress=progress,
                on_start=starting,
                pool=self.pool,
            )
            async with part:  # removed (the upload aborted) unless committed
                if recorded_sha256 is not None and part.result.sha256 != recorded_sha256:
                    raise JobError(
                        f"the part file of {dest.name} no longer has the sha256 recorded when its download "
                        "completed: discarded (the next run downloads it again)"
                    )
                with anyio.CancelScope(shield=True):
                    # Recorded, then committed, with no moment a signal could fall between the two.
                    name = await self._record(job, rec, jl, execution, part.result, dest.name, history)
                    await part.commit(name)
                result = await part.finish()
        if rec.guard is not None and rec.path != dest.name:
            await self._remove_earlier(rec, jl, dest.name)
        if result.etag is not None:
            await self.writer.persist(rec.stored(result.etag, result.object_size))
        self._report(job, rec, jl, execution, result, dest.name, ours_at_dest, time.monotonic() - started)

    async def _remove_earlier(self, rec: JobRecord, jl: JobLog, final_name: str) -> None:
        """Rejected: an earlier file under the final name (another query, another export, an
        earlier night's rerun) must not stay there for downstream to load either."""
        with storage_fails_job():
            if await self.sink.remove(final_name):
                jl.warning(
                    "removed the earlier %s: the job's new file was rejected, kept as %s",
                    final_name,
                    rec.path,
                    extra={"event": "output_removed"},
                )

    async def _record(
        self,
        job: Job,
        rec: JobRecord,
        jl: JobLog,
        execution: Execution,
        result: DownloadResult,
        final_name: str,
        history: RunHistory | None,
    ) -> str | None:
        """Record the complete file and the guards' verdict, on disk before the commit. Returns
        the name to commit it under instead of ``final_name`` when a guard rejected it."""
        recorded = rec.succeeded(final_name, result)
        # The guards judge the complete file here, before anything can see it.
        name, judged = await self._judge(job, rec, jl, execution, result, final_name, history)
        await self.writer.persist(recorded, judged)
        return name

    async def _judge(
        self,
        job: Job,
        rec: JobRecord,
        jl: JobLog,
        execution: Execution,
        result: DownloadResult,
        final_name: str,
        history: RunHistory | None,
    ) -> tuple[str | None, Durability]:
        """Apply the job's guards to the complete file; a trip makes ``rec`` FAILED with the
        guard, value and limit. Returns the name to commit the file under instead of
        ``final_name`` (``NAME.ndjson.rejected``) or None, and what the change needs."""
        limits = Limits.of(job)
        before: int | None = None
        if limits.max_drop_pct is not None:
            # Earlier manifests are read from disk (once each): off the event loop.
            before, where = await anyio.to_thread.run_sync(previous_records, history, job.name)
            if where is not None:
                jl.debug("max_drop_pct: compared with %d record(s) of the run in %s", before, where)
        measured = Measured(
            result.records, result.stats.invalid_lines, execution.erroneous_tasks, execution.num_tasks, before
        )
        verdict = evaluate(limits, measured)
        judged = rec.judged("; ".join(verdict.notes) or None, before)
        for note in verdict.notes:
            jl.info("%s", note, extra={"event": "guard_note"})
        if verdict.trip is None:
            return None, judged
        name = committed_name(final_name, limits, verdict)
        return name, rec.rejected(verdict.trip.as_dict(), verdict.error, name or final_name)

    def _report(
        self,
        job: Job,
        rec: JobRecord,
        jl: JobLog,
        execution: Execution,
        result: DownloadResult,
        dest_name: str,
        ours_at_dest: bool,
        elapsed: float,
    ) -> None:
        """Say what was had: the success line (or a guard's failure), and what to look at."""
        elapsed = max(1e-9, elapsed)
        if result.replaced is not None:
            (jl.info if ours_at_dest else jl.warning)(
                "replaced %s that was already at %s%s",
                result.replaced,
                dest_name,
                " (this job's earlier output)" if ours_at_dest else ", not written by mics-export",
                extra={"event": "output_replaced"},
            )
        if result.length_check == "unverified":
            jl.warning(
                "the server stated no length and could not confirm the end of the file: kept as "
                "on_unverified_length says (length_check: unverified in the manifest)",
                extra={"event": "length_unverified"},
            )
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
                # elapsed_s: from the execution's creation (the platform's creation_date, so an
                # adopted execution counts from when it was created) to this success; None when
                # the platform sent no date. download_s: the download alone (request to commit).
                "elapsed_s": round(time.time() - execution.creation_date / 1000, 3)
                if execution.creation_date
                else None,
                "download_s": round(elapsed, 4),
            },
        )
        self._warn(jl, execution, result)

    @staticmethod
    def _warn(jl: JobLog, execution: Execution, result: DownloadResult) -> None:
        """What a person should look at in a file that was had all the same."""
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


__all__ = ["Fetcher"]
