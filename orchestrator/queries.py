"""Exports defined in the job file by their OTQL query.

The reference's way to make an export: check the query (a bad one silently yields an
empty file), create the OTQL query, create a QUERY export with JSON output on it. A job
with ``query:`` does all of that once, then reuses the export on later runs.

Naming and reuse rules (also in the README):

- the export the tool owns for job NAME is the organisation's export named
  ``api.query_export_prefix + NAME`` (default prefix ``mics-export:``);
- none: check the query (``query_check/otql``: checked, never run), create it, create
  the export;
- one whose query (datamart and text) equals the job's: reused as is;
- one whose query differs, or is gone (404): the job's text is checked, a new query is created and the
  export is pointed at it (PUT). The old query is left alone: earlier executions refer
  to it, and deleting platform objects is not this tool's business.
"""

from __future__ import annotations

import logging
from typing import Any

from orchestrator.api import ApiClient
from orchestrator.config import Job
from orchestrator.errors import ApiError, JobError, MalformedResponseError, NotFoundError
from orchestrator.models import Export


def export_name(prefix: str, job_name: str) -> str:
    """The name of the export the tool keeps for a query job."""
    return f"{prefix}{job_name}"


async def _check(api: ApiClient, datamart_id: str, text: str) -> None:
    """Check the query without running it (``query_check/otql``); JobError for a bad one.

    The platform's verdict (PARSING_ERROR / VALIDATION_ERROR with its message and
    position) or its 4xx answer is the job's error. A 5xx, a 429 or a refused token is
    raised as is: that is about the API, not the query.
    """
    try:
        check = await api.check_query(datamart_id, text)
    except MalformedResponseError:
        raise  # an unreadable answer says nothing about the query
    except ApiError as exc:
        if exc.status >= 500 or exc.status in (401, 403, 429):
            raise
        detail = exc.error or f"HTTP {exc.status}"
        ids = [f"error_code {exc.error_code}"] if exc.error_code else []
        ids += [f"error_id {exc.error_id}"] if exc.error_id else []
        suffix = f" ({', '.join(ids)})" if ids else ""
        raise JobError(f"the API rejected the query: {detail}{suffix}") from None
    if not check.is_valid:
        raise JobError(f"the API rejected the query: {check.describe()}")


def _age(export_id: str) -> tuple[int, int, str]:
    """Sort key, oldest first: numeric ids in numeric order, compared as text (no ``int()``:
    it takes "²" and refuses 4,300 digits, both a server's to send), then any other id."""
    digits = export_id.lstrip("0") or "0"
    if export_id.isascii() and export_id.isdigit():
        return 0, len(digits), digits
    return 1, 0, export_id


async def ensure_query_export(
    api: ApiClient, job: Job, prefix: str, log: logging.LoggerAdapter[Any] | logging.Logger
) -> Export:
    """The export for a query job: found by name, updated if its text changed, or created."""
    assert job.query is not None and job.organisation_id is not None
    org, query = job.organisation_id, job.query
    name = export_name(prefix, job.name)
    mine = sorted(
        [e async for e in api.iter_exports(org) if e.name == name],
        key=lambda e: _age(e.id),
    )
    if len(mine) > 1:
        log.warning("%d exports are named %r: using the oldest, %s", len(mine), name, mine[0].id)
    if mine:
        export = mine[0]
        current: tuple[str, str] | None = None
        if export.query_id:
            datamart = export.datamart_id or query.datamart_id
            try:
                found = await api.get_query(datamart, export.query_id)
            except NotFoundError:
                found = None  # the query is gone: the export gets a new one
            if found is not None:
                current = (str(found.get("datamart_id") or datamart), found.get("query_text") or "")
        if current == (query.datamart_id, query.text):
            return export
        await _check(api, query.datamart_id, query.text)
        query_id = await api.create_query(query.datamart_id, query.text)
        export = await api.update_export(export, query_id=query_id)
        log.info(
            "query changed: export %s now uses new query %s",
            export.id,
            query_id,
            extra={"event": "query_updated", "query_id": query_id},
        )
        return export
    await _check(api, query.datamart_id, query.text)
    query_id = await api.create_query(query.datamart_id, query.text)
    export = await api.create_export(org, name, query_id)
    log.info(
        "created query %s and export %s (%r)",
        query_id,
        export.id,
        name,
        extra={"event": "export_created", "query_id": query_id},
    )
    return export


async def check_queries(base_url: str, token: str, jobs: list[Job]) -> list[tuple[str, str]]:
    """Check every query job's OTQL with the API, creating nothing; (job, problem) pairs."""
    failures: list[tuple[str, str]] = []
    async with ApiClient(base_url, token) as api:
        for job in jobs:
            assert job.query is not None
            try:
                await _check(api, job.query.datamart_id, job.query.text)
            except JobError as exc:
                failures.append((job.name, str(exc)))
    return failures


__all__ = ["check_queries", "ensure_query_export", "export_name"]
