"""The command line: argument parsing, exit codes and wiring. No business logic here.

Exit codes (SPEC.md): 0 all selected jobs succeeded; 1 the run finished and a job did not
(or an ops command failed at the API); 2 usage, job-file error or missing token, with
nothing sent; 130 / 143 interrupted by SIGINT / SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio
import click
import orjson

from orchestrator._version import __version__
from orchestrator.api import DEFAULT_BASE_URL, ApiClient
from orchestrator.config import check_base_url, read_token
from orchestrator.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, MicsExportError, UsageError, single_error

T = TypeVar("T")


def _api_url(option: str | None) -> str:
    if option:
        return check_base_url(option, "--api-url")
    if os.environ.get("MICS_API_URL"):
        return check_base_url(os.environ["MICS_API_URL"], "MICS_API_URL")
    return DEFAULT_BASE_URL


def _ops(api_url: str | None, body: Callable[[ApiClient], Awaitable[T]]) -> T:
    """Run an ops command's coroutine with a client (token checked before any request)."""
    token = read_token()
    from orchestrator.logs import setup_logging

    setup_logging("text", 0, secrets=[token], quiet=True)

    async def main() -> T:
        async with ApiClient(_api_url(api_url), token) as api:
            return await body(api)

    return anyio.run(main)


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    Console(soft_wrap=False).print(table)


api_url_option = click.option(
    "--api-url", metavar="URL", help=f"API base URL [env MICS_API_URL; default {DEFAULT_BASE_URL}]"
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
org_option = click.option("--organisation-id", "organisation_id", required=True, metavar="ID")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mics-export")
def cli() -> None:
    """Run mediarithmics Query Exports in bulk: create, poll, download, verify."""


# -- run and validate ----------------------------------------------------------------------
@cli.command()
@click.argument("jobs_file", metavar="JOBS.yaml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--simulate", is_flag=True, help="Run against the built-in simulator (no token needed).")
@click.option("--output-dir", metavar="DIR", help="Override run.output_dir ({date} allowed).")
@click.option("--concurrency", type=click.IntRange(min=1), help="Exports in flight at once.")
@click.option("--only", multiple=True, metavar="NAME", help="Run only this job (repeat, or comma-separate).")
@click.option("--shard", metavar="I/N", help="Run only shard I of N (0-based) by a stable hash of job names.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=lambda: os.environ.get("MICS_LOG_FORMAT", "text"),
    show_default="text, or $MICS_LOG_FORMAT",
)
@click.option("--progress", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Processes that validate lines [default: the CPUs available; 0: on the event loop].",
)
@click.option(
    "--metrics-pushgateway",
    metavar="URL",
    default=lambda: os.environ.get("MICS_METRICS_PUSHGATEWAY"),
    help="Push Prometheus metrics here at the end [env MICS_METRICS_PUSHGATEWAY].",
)
@click.option("-v", "--verbose", count=True, help="More logs (-vv: library debug logs too).")
def run(
    jobs_file: Path,
    simulate: bool,
    output_dir: str | None,
    concurrency: int | None,
    only: tuple[str, ...],
    shard: str | None,
    log_format: str,
    progress: str,
    workers: int | None,
    metrics_pushgateway: str | None,
    verbose: int,
) -> int:
    """Run the exports of a job file and write results and manifest.json."""
    from orchestrator.scheduler import RunOptions, execute

    names = tuple(n.strip() for item in only for n in item.split(",") if n.strip())
    options = RunOptions(
        jobs_file=jobs_file,
        simulate=simulate,
        output_dir=output_dir,
        concurrency=concurrency,
        only=names,
        shard=shard,
        log_format=log_format,
        progress=progress,
        workers=workers,
        metrics_pushgateway=metrics_pushgateway,
        verbosity=verbose,
    )
    return execute(options)


@cli.command()
@click.argument("jobs_file", metavar="JOBS.yaml", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--check-queries",
    is_flag=True,
    help="Ask the API to check every query job's OTQL (creates nothing).",
)
def validate(jobs_file: Path, check_queries: bool) -> int:
    """Parse and check a job file; with --check-queries, also check queries on the API."""
    from orchestrator.config import load_job_file

    job_file = load_job_file(jobs_file)
    query_jobs = [j for j in job_file.jobs if j.query is not None]
    if check_queries and query_jobs:
        from orchestrator.queries import check_queries as check

        token = read_token(job_file.api.token_env)
        base = job_file.base_url()
        failures = anyio.run(check, base, token, query_jobs)
        for name, message in failures:
            click.echo(f"{jobs_file}: job {name!r}: query: {message}", err=True)
        if failures:
            return EXIT_FAILED
    click.echo(
        f"{jobs_file}: OK, {len(job_file.jobs)} job(s)"
        + (f", {len(query_jobs)} query(ies) checked" if check_queries and query_jobs else "")
    )
    return EXIT_OK


# -- the simulator -----------------------------------------------------------------------------
@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option(
    "--scenario",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML scenario file.",
)
@click.option("--token", help="The token the simulator accepts [default: sim-token].")
@click.option("--rate-429", type=click.FloatRange(0, 1), help="Fraction of requests answered 429.")
@click.option("--retry-after", type=click.FloatRange(min=0), help="Retry-After seconds sent with 429.")
@click.option("--rate-5xx", type=click.FloatRange(0, 1), help="Fraction of requests answered 5xx.")
@click.option("--reset-after-bytes", type=click.IntRange(min=0), help="Cut downloads after this many bytes...")
@click.option("--reset-first-k", type=click.IntRange(min=0), help="...for the first K downloads of each file.")
@click.option("--slow-body-bps", type=click.IntRange(min=1), help="Cap download speed (bytes/s).")
@click.option("--time-scale", type=click.FloatRange(min=0), help="Multiply execution durations.")
@click.option("--seed", type=int, help="Fault injection seed.")
def simulate(
    host: str,
    port: int,
    scenario: Path | None,
    token: str | None,
    rate_429: float | None,
    retry_after: float | None,
    rate_5xx: float | None,
    reset_after_bytes: int | None,
    reset_first_k: int | None,
    slow_body_bps: int | None,
    time_scale: float | None,
    seed: int | None,
) -> int:
    """Serve the simulated API (default: the demo exports, any other id derived on demand)."""
    from dataclasses import replace

    from orchestrator.simulator import Simulator, SimulatorConfig, demo_config

    try:
        config = SimulatorConfig.from_file(scenario) if scenario else demo_config()
    except (ValueError, TypeError, OSError) as exc:
        raise UsageError(f"{scenario}: {exc}") from None
    fault_changes = {
        k: v
        for k, v in {
            "rate_429": rate_429,
            "retry_after_s": retry_after,
            "rate_5xx": rate_5xx,
            "reset_after_bytes": reset_after_bytes,
            "reset_first_k": reset_first_k,
            "slow_body_bps": slow_body_bps,
            "seed": seed,
        }.items()
        if v is not None
    }
    config = replace(config, faults=replace(config.faults, **cast(Any, fault_changes)))
    if token:
        config = replace(config, token=token)
    if time_scale is not None:
        config = replace(config, time_scale=time_scale)

    async def serve() -> None:
        async with Simulator(config, host, port) as sim:
            click.echo(f"simulator listening on {sim.url}", err=True)
            click.echo(f"  export MICS_API_URL={sim.url} MICS_API_TOKEN={sim.token}", err=True)
            await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return EXIT_OK


# -- ops commands ------------------------------------------------------------------------------
@cli.group()
def exports() -> None:
    """Look at export definitions."""


@exports.command("list")
@org_option
@api_url_option
@json_option
def exports_list(organisation_id: str, api_url: str | None, as_json: bool) -> int:
    """Every export of the organisation (all pages)."""
    items = _ops(api_url, lambda api: api.list_exports(organisation_id))
    if as_json:
        _print_json([{"id": e.id, "name": e.name, "query_id": e.query_id, "datamart_id": e.datamart_id} for e in items])
    else:
        _table(
            f"{len(items)} export(s) in organisation {organisation_id}",
            ("id", "name", "query id", "datamart id"),
            [(e.id, e.name, e.query_id, e.datamart_id) for e in items],
        )
    return EXIT_OK


@exports.command("show")
@click.argument("export_id")
@org_option
@api_url_option
@json_option
def exports_show(export_id: str, organisation_id: str, api_url: str | None, as_json: bool) -> int:
    """One export's definition."""
    e = _ops(api_url, lambda api: api.get_export(export_id, organisation_id))
    data = {
        "id": e.id,
        "name": e.name,
        "organisation_id": e.organisation_id,
        "query_id": e.query_id,
        "datamart_id": e.datamart_id,
        "type": e.type,
        "output_format": e.output_format,
    }
    if as_json:
        _print_json(data)
    else:
        _table(f"export {e.id}", ("field", "value"), list(data.items()))
    return EXIT_OK


@cli.group()
def executions() -> None:
    """Look at an export's executions."""


@executions.command("list")
@click.argument("export_id")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="How many, newest first.",
)
@api_url_option
@json_option
def executions_list(export_id: str, limit: int, api_url: str | None, as_json: bool) -> int:
    """The newest executions of an export."""

    async def newest(api: ApiClient) -> list[Any]:
        out = []
        async for execution in api.iter_executions(export_id, page_size=min(limit, 100)):
            out.append(execution)
            if len(out) >= limit:
                break
        return out

    items = _ops(api_url, newest)
    if as_json:
        _print_json([e.extra for e in items])
        return EXIT_OK
    from orchestrator.progress import format_ms

    _table(
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
    )
    return EXIT_OK


@cli.command()
@click.argument("export_id")
@click.argument("execution_id")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@api_url_option
@json_option
def download(export_id: str, execution_id: str, output: Path, api_url: str | None, as_json: bool) -> int:
    """Download one execution's result to FILE (atomically; lines are checked)."""
    from orchestrator.download import download as fetch

    if not output.parent.is_dir():
        raise UsageError(f"{output}: folder {output.parent} does not exist")

    async def body(api: ApiClient) -> Any:
        execution = await api.find_execution(export_id, execution_id)
        name = execution.technical_name if execution else "export"
        return await fetch(
            lambda start: api.stream_result(export_id, execution_id, technical_name=name, start=start),
            output,
            tag=execution_id,
        )

    result = _ops(api_url, body)
    summary = {
        "path": str(output),
        "bytes": result.bytes,
        "records": result.records,
        "invalid_lines": result.stats.invalid_lines,
        "sha256": result.sha256,
    }
    if as_json:
        _print_json(summary)
    else:
        click.echo(
            f"{output}: {result.bytes} bytes, {result.records} records, "
            f"{result.stats.invalid_lines} invalid lines, sha256 {result.sha256}"
        )
    return EXIT_OK


def _report(exc: BaseException) -> int:
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if not isinstance(exc, MicsExportError):
        raise exc
    click.echo(f"mics-export: error: {exc}", err=True)
    return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: run the CLI and exit with the code SPEC.md gives."""
    try:
        code = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="mics-export",
            standalone_mode=False,
        )
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.exceptions.Abort:
        code = 130
    except BaseExceptionGroup as group:  # a task group's wrapper around one real error
        code = _report(single_error(group))
    except UsageError as exc:
        click.echo(f"mics-export: error: {exc}", err=True)
        code = EXIT_USAGE
    except MicsExportError as exc:
        click.echo(f"mics-export: error: {exc}", err=True)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        code = 130
    sys.exit(code if isinstance(code, int) else EXIT_OK)


__all__ = ["cli", "main"]
