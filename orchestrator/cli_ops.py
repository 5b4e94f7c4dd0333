"""The ops commands: look at exports and executions on the API, cancel one, and read a run's status.

``exports`` and ``executions`` print a table, TSV or JSON (:func:`~orchestrator.cli_common.emit`);
``status`` reads a run's manifest and exits with the code the run had (or would have).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import click

from orchestrator.api import ApiClient
from orchestrator.cli_common import (
    api_url_option,
    emit,
    execution_id_argument,
    export_id_argument,
    format_options,
    json_option,
    org_option,
    output_format,
    print_json,
    print_tsv,
    with_api,
)
from orchestrator.errors import EXIT_OK, MicsExportError, NotFoundError
from orchestrator.logs import printable


@click.group()
def exports() -> None:
    """Look at export definitions."""


@exports.command("list")
@org_option
@api_url_option
@format_options
def exports_list(organisation_id: str, api_url: str | None, fmt: str | None, as_json: bool) -> int:
    """Every export of the organisation (all pages)."""
    fmt = output_format(fmt, as_json)
    items = with_api(api_url, lambda api: api.list_exports(organisation_id))
    emit(
        fmt,
        f"{len(items)} export(s) in organisation {organisation_id}",
        ("id", "name", "query_id", "datamart_id"),
        [(e.id, e.name, e.query_id, e.datamart_id) for e in items],
        [{"id": e.id, "name": e.name, "query_id": e.query_id, "datamart_id": e.datamart_id} for e in items],
    )
    return EXIT_OK


@exports.command("show")
@export_id_argument
@org_option
@api_url_option
@format_options
def exports_show(export_id: str, organisation_id: str, api_url: str | None, fmt: str | None, as_json: bool) -> int:
    """One export's definition."""
    fmt = output_format(fmt, as_json)

    async def body(api: ApiClient) -> Any:
        try:
            return await api.get_export(export_id, organisation_id)
        except NotFoundError as exc:
            raise await _not_in_organisation(api, export_id, organisation_id, exc) from None

    e = with_api(api_url, body)
    data = {
        "id": e.id,
        "name": e.name,
        "organisation_id": e.organisation_id,
        "query_id": e.query_id,
        "datamart_id": e.datamart_id,
        "type": e.type,
        "output_format": e.output_format,
    }
    emit(fmt, f"export {e.id}", ("field", "value"), list(data.items()), data)
    return EXIT_OK


async def _not_in_organisation(
    api: ApiClient, export_id: str, organisation_id: str, exc: NotFoundError
) -> MicsExportError:
    """The error for a 404 on an export: does it exist elsewhere (its executions are visible)?"""
    from orchestrator.errors import ApiError, TransportError

    try:
        await api.list_executions(export_id, max_results=1)
    except (ApiError, TransportError):
        return MicsExportError(
            f"export {export_id} not found in organisation {organisation_id} "
            f"(check the export id and --organisation-id): {exc}"
        )
    return MicsExportError(
        f"export {export_id} not found in organisation {organisation_id} (check --organisation-id): "
        "the export exists, in another organisation"
    )


@click.group()
def executions() -> None:
    """Look at an export's executions."""


@executions.command("list")
@export_id_argument
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="How many, newest first.",
)
@api_url_option
@format_options
def executions_list(export_id: str, limit: int, api_url: str | None, fmt: str | None, as_json: bool) -> int:
    """The newest executions of an export."""
    fmt = output_format(fmt, as_json)

    async def newest(api: ApiClient) -> list[Any]:
        out = []
        async for execution in api.iter_executions(export_id, page_size=min(limit, 100)):
            out.append(execution)
            if len(out) >= limit:
                break
        return out

    items = with_api(api_url, newest)
    from orchestrator.progress import format_ms

    emit(
        fmt,
        f"newest {len(items)} execution(s) of export {export_id}",
        ("id", "status", "created", "duration", "tasks", "erroneous", "files"),
        [
            (
                e.id,
                e.raw_status,
                format_ms(e.creation_date),
                f"{(e.extra.get('duration') or 0) / 1000:.0f}s" if e.extra.get("duration") else "",
                f"{e.completed_tasks}/{e.num_tasks}" if e.num_tasks is not None else "",
                e.erroneous_tasks,
                ",".join(e.output_files),
            )
            for e in items
        ],
        [e.extra for e in items],
    )
    return EXIT_OK


@click.command()
@export_id_argument
@execution_id_argument
@api_url_option
@json_option
def cancel(export_id: str, execution_id: str, api_url: str | None, as_json: bool) -> int:
    """Ask the platform to cancel an execution, and show its status afterwards.

    Exit 0 when the platform accepted the request (the status shown says whether the
    execution is CANCELED, still stopping, or had already finished); 1 when it refused it
    (unknown execution, an API error).
    """

    from orchestrator.models import ExecutionStatus

    async def body(api: ApiClient) -> Any:
        await api.cancel_execution(export_id, execution_id)
        return await api.find_execution(export_id, execution_id)

    after = with_api(api_url, body)
    status = after.raw_status if after is not None else None
    cancel_status = after.extra.get("cancel_status") if after is not None else None
    if as_json:
        print_json(
            {
                "export_id": export_id,
                "execution_id": execution_id,
                "accepted": True,
                "status": status,
                "cancel_status": cancel_status,
            }
        )
        return EXIT_OK
    if after is None:
        shown = "it is not among the export's newest executions, so its status is unknown"
    elif after.status is ExecutionStatus.CANCELED:
        shown = f"it is now {status}"
    elif after.is_final:
        shown = f"it had already finished ({status}): nothing was cancelled"
    else:
        shown = f"it is now {status}" + (f" (cancel_status {cancel_status})" if cancel_status else "")
    click.echo(f"cancel of execution {execution_id} of export {export_id} accepted by the platform: {shown}")
    return EXIT_OK


@click.command()
@click.argument("target", metavar="[DIR]", default=".", required=False)
@format_options
def status(target: str, fmt: str | None, as_json: bool) -> int:
    """A run's summary from DIR/manifest.json (default: the current folder), finished or running.

    Exits with the code the run had (recorded in its manifest) or would have: 0 SUCCEEDED,
    1 FAILED, 130/143 interrupted by SIGINT/SIGTERM; 4 still running; 5 stopped without
    recording how (killed, OOM); 2 no readable manifest there.
    """
    from rich.console import Console

    from orchestrator.progress import job_notes, print_summary
    from orchestrator.status import read_report

    fmt = output_format(fmt, as_json)
    report = read_report(target)
    manifest = report.manifest
    if fmt == "json":
        print_json(report.as_dict())
    elif fmt == "tsv":
        print_tsv(
            ("job", "status", "attempts", "bytes", "records", "invalid_lines", "erroneous_tasks", "notes"),
            [
                (
                    j.name,
                    j.status.value,
                    j.attempts,
                    j.bytes,
                    j.records,
                    j.invalid_lines,
                    j.erroneous_tasks,
                    job_notes(j),
                )
                for j in manifest.jobs.values()
            ],
        )
    else:
        console = Console(highlight=False)
        shown = _printable_manifest(manifest)
        print_summary(shown, list(shown.jobs), console)
        console.print(f"exit {report.exit_code}: {report.explanation}", soft_wrap=True, markup=False)
    return report.exit_code


def _printable_manifest(manifest: Any) -> Any:
    """A copy of ``manifest`` whose texts are :func:`printable`, for the table.

    A manifest may come from anywhere (a copy, a bucket), and its errors quote the API:
    the table must not write their escape sequences to the terminal.
    """
    from dataclasses import fields, replace

    def clean(record: Any) -> Any:
        changes = {
            f.name: printable(value)
            for f in fields(record)
            if isinstance(value := getattr(record, f.name), str) and not isinstance(value, Enum)
        }
        return replace(record, **changes)

    jobs = {printable(name): clean(job) for name, job in manifest.jobs.items()}
    return replace(clean(manifest), jobs=jobs)


__all__ = ["cancel", "executions", "exports", "status"]
