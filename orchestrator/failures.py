"""What the runner does around an execution that gave no file: its error file, a cancel,
and a bucket's refusal turned into one job's failure.

All of it is best effort and bounded: an error file is fetched within ERROR_FILE_TIMEOUT_S
(never past the attempt's deadline) and ERROR_FILE_MAX_BYTES; a cancel gets 10 s. The
server's text is scrubbed of the token before it goes anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Generator
from typing import TYPE_CHECKING

import anyio

from orchestrator.errors import JobError, MicsExportError
from orchestrator.models import Execution, ExecutionStatus
from orchestrator.record import Durability, JobRecord

if TYPE_CHECKING:
    from orchestrator.api import ApiClient
    from orchestrator.config import Job
    from orchestrator.sink import Sink

JobLog = logging.LoggerAdapter[logging.Logger]

ERROR_FILE_TIMEOUT_S = 30.0
"""The most a FAILED execution's error file may take (never past the attempt's deadline)."""
ERROR_FILE_MAX_BYTES = 1 << 20
"""The most of an error file kept: it is for a person to read."""


async def record_failure(
    api: ApiClient, sink: Sink, job: Job, rec: JobRecord, jl: JobLog, execution: Execution, deadline: float
) -> tuple[str | None, Durability]:
    """Keep the FAILED execution's error file beside the outputs, when the API has one;
    returns the platform's own error and the file's first line, as one line (or None), and
    what the record's change needs.

    Best effort, and bounded: ERROR_FILE_TIMEOUT_S and ERROR_FILE_MAX_BYTES at most, and
    never past the attempt's ``deadline`` (anyio clock). The file and the line are the
    server's text, so both are scrubbed of the token before they go anywhere.
    """
    parts = [execution.error_message] if execution.error_message else []
    error_file: str | None = None
    org = job.organisation_id or execution.organisation_id
    if org and execution.status is ExecutionStatus.FAILED:
        text: bytes | None = None
        budget = min(ERROR_FILE_TIMEOUT_S, deadline - anyio.current_time())
        if budget <= 0:
            jl.warning("no time left in the attempt to fetch the error file: skipped")
        else:
            with anyio.move_on_after(budget) as scope:
                try:
                    text = await api.fetch_error_file(org, execution.id, ERROR_FILE_MAX_BYTES)
                except MicsExportError as exc:
                    jl.warning("could not fetch the error file: %s", exc)
            if scope.cancelled_caught:
                jl.warning("the error file did not arrive within %.1fs: skipped", budget)
        if text is not None:
            text = api.scrub(text)
            name = f"{job.name}.error.txt"
            with storage_fails_job():
                await sink.write(name, text)
            error_file = name
            first = text.decode("utf-8", "replace").strip().splitlines()[:1]
            line = " ".join(first[0].split())[:200] if first else ""
            if line and all(line not in p for p in parts):
                parts.append(f"error file: {line}")
    detail = api.scrub("; ".join(parts)) if parts else None
    ended = f"execution {execution.id} ended {execution.raw_status}"
    return detail, rec.execution_failed(f"{ended}: {detail}" if detail else ended, error_file)


async def cancel_execution(api: ApiClient, export_id: str, execution_id: str, jl: JobLog) -> None:
    """Best effort: the cancel endpoint is assumed, and its failure changes nothing."""
    with anyio.move_on_after(10, shield=True) as scope:
        try:
            await api.cancel_execution(export_id, execution_id)
        except MicsExportError as exc:
            jl.warning(
                "could not cancel execution %s: the platform answered %s",
                execution_id,
                api.scrub(str(exc)),
                extra={"event": "cancel_failed", "error": api.scrub(str(exc))},
            )
            return
        # What the platform says now: a cancel it accepted but did not act on is worth knowing.
        try:
            after = await api.find_execution(export_id, execution_id)
        except MicsExportError as exc:
            after, why = None, f"its status could not be read ({api.scrub(str(exc))})"
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
def storage_fails_job() -> Generator[None, None, None]:
    """A bucket refusing one object fails that job (like a full disk), not the whole run."""
    try:
        yield
    except MicsExportError as exc:
        if not is_storage_error(exc):
            raise
        raise JobError(str(exc)) from None


def is_storage_error(exc: BaseException) -> bool:
    """An object-storage error (objstore is imported only when a bucket is used)."""
    objstore = sys.modules.get("orchestrator.objstore")
    return objstore is not None and isinstance(exc, objstore.StorageError | objstore.StorageUsageError)


__all__ = [
    "ERROR_FILE_MAX_BYTES",
    "ERROR_FILE_TIMEOUT_S",
    "cancel_execution",
    "is_storage_error",
    "record_failure",
    "storage_fails_job",
]
