"""The command line: argument parsing, exit codes and wiring. No business logic here.

Exit codes (SPEC.md): 0 all selected jobs succeeded; 1 the run finished and a job did not
(or an ops command failed at the API, or an unexpected error stopped it); 2 usage,
job-file error or missing token, with nothing sent; 130 / 143 interrupted by SIGINT / SIGTERM.

No traceback reaches the user: :func:`main` turns any error into one line. An unexpected
one (a bug) says so, and shows its traceback only at ``-vv``, scrubbed of the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio
import click
import orjson

from orchestrator._version import __version__
from orchestrator.api import DEFAULT_BASE_URL, ApiClient
from orchestrator.config import check_base_url, read_token
from orchestrator.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    MicsExportError,
    MissingTokenError,
    NotFoundError,
    UsageError,
    single_error,
)
from orchestrator.logs import printable

T = TypeVar("T")

_verbosity = 0
"""``-v`` count of the command being run: decides whether an unexpected error's traceback shows."""

_ID = re.compile(r"[0-9]+")


def _id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An id argument: ASCII digits only (it goes into a request path, with the token beside it)."""
    if value is not None and not _ID.fullmatch(value):
        shown = repr(value if len(value) <= 40 else value[:40] + "...")
        raise UsageError(f"{param.human_readable_name}: must be an id made of digits only, not {shown}")
    return value


def _only(values: tuple[str, ...]) -> tuple[str, ...]:
    """``--only`` as given, refused when it names no job at all.

    ``--only "$JOB"`` with an empty variable must not quietly run every job of the file.
    """
    for value in values:
        if not any(n.strip() for n in value.split(",")):
            raise UsageError(f"--only {value!r}: names no job (an empty name); give a job name")
    return values


def _output_dir(value: str | None) -> str | None:
    """``--output-dir`` checked as run.output_dir is: not empty, no NUL, no placeholder but {date}.

    A bucket URL is checked too, without echoing credentials or a signature.
    """
    if value is None:
        return None
    from orchestrator.config import output_dir_problem

    problem = output_dir_problem(value)
    if problem:
        raise UsageError(f"--output-dir: {problem}")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
        try:
            from orchestrator.objstore import parse_location
        except ImportError:
            return value  # said when the run starts: the cloud extra is missing
        parse_location(value.replace("{date}", "2000-01-01"))
    return value


def _api_url(option: str | None) -> str:
    if option:
        return check_base_url(option, "--api-url")
    if os.environ.get("MICS_API_URL"):
        return check_base_url(os.environ["MICS_API_URL"], "MICS_API_URL")
    return DEFAULT_BASE_URL


def _token(variable: str = "MICS_API_TOKEN") -> str:
    """The token for a command that has no ``--simulate``: its hint points at ``simulate`` instead."""
    try:
        return read_token(variable)
    except MissingTokenError:
        raise UsageError(
            f"the API token is missing: set the environment variable {variable} (to try without a real "
            "token, start `mics-export simulate` and export the MICS_API_URL and MICS_API_TOKEN it prints)"
        ) from None


def _ops(api_url: str | None, body: Callable[[ApiClient], Awaitable[T]]) -> T:
    """Run an ops command's coroutine with a client (token checked before any request)."""
    token = _token()
    from orchestrator.logs import setup_logging

    setup_logging("text", 0, secrets=[token], quiet=True)

    async def main() -> T:
        async with ApiClient(_api_url(api_url), token) as api:
            return await body(api)

    return anyio.run(main)


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A table on stdout: boxed and fitted to a terminal; elsewhere one unwrapped line per row.

    In a pipe or a file no width applies: ``exports list | grep NAME`` must get whole rows,
    so the title, a header and the rows are printed as aligned columns, however long.
    """
    cells = [["" if v is None else printable(_CONTROL.sub(" ", str(v))) for v in row] for row in rows]
    if not sys.stdout.isatty():
        from rich.cells import cell_len

        widths = [max([cell_len(c), *(cell_len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
        lines = [title] if title else []
        for row in [list(columns), *cells]:
            padded = (v + " " * (w - cell_len(v)) for v, w in zip(row, widths, strict=True))
            lines.append("  ".join(padded).rstrip())
        sys.stdout.write("\n".join(lines) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in cells:
        table.add_row(*row)
    Console(soft_wrap=False, highlight=False).print(table, markup=False)


def _tsv_value(value: Any) -> str:
    """One TSV field: backslash, tab and line breaks escaped (``\\``, ``\\t``, ``\\n``, ``\\r``).

    Any other control character is written ``\\xHH``: a field read from a hostile manifest
    or API answer must not send escape sequences to the terminal the output lands on.
    """
    text = "" if value is None else str(value)
    text = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return printable(text)


def _tsv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A header line, then one line per row; fields separated by tabs (for scripts)."""
    lines = ["\t".join(columns), *("\t".join(_tsv_value(v) for v in row) for row in rows)]
    sys.stdout.write("\n".join(lines) + "\n")


def _emit(fmt: str, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], data: Any) -> None:
    """Print a listing as ``fmt`` says: a table, TSV (header + rows) or ``data`` as JSON."""
    if fmt == "json":
        _print_json(data)
    elif fmt == "tsv":
        _tsv(columns, rows)
    else:
        _table(title, columns, rows)


def _format(fmt: str | None, as_json: bool) -> str:
    """The output format from ``--format`` and its ``--json`` shortcut."""
    if as_json and fmt not in (None, "json"):
        raise UsageError(f"--json and --format {fmt} contradict each other: give one")
    return "json" if as_json else (fmt or "table")


def format_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--format table|tsv|json`` and ``--json`` (its shortcut), as ``fmt`` and ``as_json``."""
    command = click.option("--json", "as_json", is_flag=True, help="Same as --format json.")(command)
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(["table", "tsv", "json"]),
        default=None,
        help="table (the default): for people; in a pipe or a file, one whole line per row, "
        "never wrapped. tsv: a header, then tab-separated rows. json: machine-readable.",
    )(command)


api_url_option = click.option(
    "--api-url", metavar="URL", help=f"API base URL [env MICS_API_URL; default {DEFAULT_BASE_URL}]"
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
org_option = click.option("--organisation-id", "organisation_id", required=True, metavar="ID", callback=_id)
export_id_argument = click.argument("export_id", callback=_id)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mics-export")
def cli() -> None:
    """Run mediarithmics Query Exports in bulk: create, poll, download, verify."""


# -- run and validate ----------------------------------------------------------------------
@cli.command()
@click.argument("jobs_file", metavar="JOBS.yaml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--simulate", is_flag=True, help="Run against the built-in simulator (no token needed).")
@click.option(
    "--output-dir",
    metavar="DIR",
    callback=lambda c, p, v: _output_dir(v),
    help="Override run.output_dir ({date} allowed).",
)
@click.option("--concurrency", type=click.IntRange(min=1, max=1_000_000), help="Exports in flight at once.")
@click.option(
    "--only",
    multiple=True,
    metavar="NAME",
    callback=lambda c, p, v: _only(v),
    help="Run only this job (repeat, or comma-separate).",
)
@click.option(
    "--shard",
    metavar="I/N",
    help="Run only shard I of N (0-based) by a stable hash of job names. Without it, a Kubernetes "
    "Indexed Job's JOB_COMPLETION_INDEX (I) and MICS_SHARD_COUNT (N) give the shard. Without "
    "--output-dir, a shard writes into OUTPUT_DIR/shard-I-of-N/; a shard with no job exits 0.",
)
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
    help="Processes that validate lines [default: the CPUs available; 0: on the event loop; "
    "more than 4x the CPUs is refused (exit 2): they would only compete for the same cores].",
)
@click.option(
    "--metrics-pushgateway",
    metavar="URL",
    default=lambda: os.environ.get("MICS_METRICS_PUSHGATEWAY"),
    help="Push Prometheus metrics here at the end [env MICS_METRICS_PUSHGATEWAY].",
)
@click.option(
    "--deadline",
    metavar="DURATION",
    default=None,
    help="Stop the run this long after it starts (5h30m, 90m, 1d or seconds) [env MICS_DEADLINE_S, "
    "in seconds; default: run.deadline]: no execution is created for a job not expected to end "
    "before it (its last run's duration, else its timeout_s); at the deadline the run stops as on "
    "SIGTERM, INTERRUPTED, exit 124.",
)
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="More logs: -v every poll and HTTP retry, in any log format (-vv: library debug logs too).",
)
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
    deadline: str | None,
    verbose: int,
) -> int:
    """Run the exports of a job file and write results and manifest.json."""
    global _verbosity
    _verbosity = verbose
    # A thin layer over the Python API's code path (orchestrator/app.py): the CLI adds its
    # logging, the live display, signal handling and the exit code.
    from orchestrator.app import Console, RunOptions, check_workers, execute, job_names, resolve_deadline

    if workers is not None:
        check_workers(workers, f"--workers {workers}")
    options = RunOptions(
        jobs_file=jobs_file,
        simulate=simulate,
        output_dir=output_dir,
        concurrency=concurrency,
        only=job_names(only),
        shard=shard,
        workers=workers,
        metrics_pushgateway=metrics_pushgateway,
        deadline_s=resolve_deadline(deadline, "--deadline"),
    )
    return execute(options, Console(log_format=log_format, verbosity=verbose, progress=progress))


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

        token = _token(job_file.api.token_env)
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
@format_options
def exports_list(organisation_id: str, api_url: str | None, fmt: str | None, as_json: bool) -> int:
    """Every export of the organisation (all pages)."""
    fmt = _format(fmt, as_json)
    items = _ops(api_url, lambda api: api.list_exports(organisation_id))
    _emit(
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
    fmt = _format(fmt, as_json)

    async def body(api: ApiClient) -> Any:
        try:
            return await api.get_export(export_id, organisation_id)
        except NotFoundError as exc:
            raise await _not_in_organisation(api, export_id, organisation_id, exc) from None

    e = _ops(api_url, body)
    data = {
        "id": e.id,
        "name": e.name,
        "organisation_id": e.organisation_id,
        "query_id": e.query_id,
        "datamart_id": e.datamart_id,
        "type": e.type,
        "output_format": e.output_format,
    }
    _emit(fmt, f"export {e.id}", ("field", "value"), list(data.items()), data)
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


@cli.group()
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
    fmt = _format(fmt, as_json)

    async def newest(api: ApiClient) -> list[Any]:
        out = []
        async for execution in api.iter_executions(export_id, page_size=min(limit, 100)):
            out.append(execution)
            if len(out) >= limit:
                break
        return out

    items = _ops(api_url, newest)
    from orchestrator.progress import format_ms

    _emit(
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


@cli.command()
@export_id_argument
@click.argument("execution_id", callback=_id)
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

    after = _ops(api_url, body)
    status = after.raw_status if after is not None else None
    cancel_status = after.extra.get("cancel_status") if after is not None else None
    if as_json:
        _print_json(
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


# -- status ------------------------------------------------------------------------------------
@cli.command()
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

    fmt = _format(fmt, as_json)
    report = read_report(target)
    manifest = report.manifest
    if fmt == "json":
        _print_json(report.as_dict())
    elif fmt == "tsv":
        _tsv(
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


_COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd"}
_OTHER_COMPRESSIONS = {".bz2", ".xz", ".lz4", ".lzma", ".zip", ".tgz", ".7z", ".br", ".z", ".zstd", ".gzip"}


def _compression_of(name: str) -> str:
    """The compression an output's name asks for: ``.gz`` gzip, ``.zst`` zstd, else none.

    Anything else that looks like compression (``.bz2``, ``.xz``, ``.gz.zst``...) is refused
    rather than written uncompressed under a name that promises otherwise.
    """
    suffixes = [s.lower() for s in Path(name).suffixes]
    last = suffixes[-1] if suffixes else ""
    before = suffixes[-2] if len(suffixes) > 1 else ""
    stacked = last in _COMPRESSION_SUFFIXES and before in {*_COMPRESSION_SUFFIXES, *_OTHER_COMPRESSIONS}
    if last in _OTHER_COMPRESSIONS or stacked:
        raise UsageError(
            f"{name}: unsupported compression suffix {''.join(suffixes[-2:]) if before else last}: "
            "end the name with .gz (gzip), .zst (zstd) or neither (uncompressed)"
        )
    return _COMPRESSION_SUFFIXES.get(last, "none")


class _StdoutTarget:
    """``-o -``: the checked bytes go to stdout as they come (no temporary file, no rename)."""

    name = "-"
    can_rename = True

    @property
    def where(self) -> Path:
        return Path("-")

    async def open(self, resume: bool) -> int:
        return 0

    async def read_back(self, size: int, checker: Any, digest: Any) -> None:
        raise AssertionError("stdout is never resumed")

    def output(self) -> Any:
        out = sys.stdout.buffer

        class _Out:
            write = out.write

            @staticmethod
            def finish() -> None:
                out.flush()

            @staticmethod
            def close() -> None:
                pass

        return _Out()

    async def restart(self) -> None:
        # Bytes already on stdout cannot be taken back: the reader would get them twice.
        raise UsageError("the result changed on the server while it was written to stdout: run the command again")

    async def prepare_commit(self) -> str | None:
        return None

    async def commit(self, name: str | None) -> tuple[str | None, int] | None:
        return None

    async def abort(self) -> None:
        pass

    def retarget(self, name: str) -> Any:
        raise NotImplementedError


@cli.command()
@export_id_argument
@click.argument("execution_id", callback=_id)
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    metavar="FILE|-|URL",
    help="A file (.gz / .zst: compressed so), - for stdout, or s3:// gs:// az:// abfs:// URL of the object.",
)
@click.option(
    "--error-file",
    is_flag=True,
    help="Download a FAILED execution's error file instead of its result (to FILE or -).",
)
@api_url_option
@json_option
def download(
    export_id: str, execution_id: str, output: str, error_file: bool, api_url: str | None, as_json: bool
) -> int:
    """Download one execution's result to FILE, stdout or a bucket (atomically; lines are checked).

    A file appears under its name only when complete (part file, rename); an object only
    when its multipart upload completes. With ``-o -`` the bytes go to stdout as they are
    checked and the summary to stderr (a failure midway leaves a partial stream: check the
    exit code). An execution that did not succeed has no result: the error says so, and
    ``--error-file`` fetches a FAILED execution's error file.
    """
    if error_file:
        return _download_error_file(export_id, execution_id, output, api_url)
    from orchestrator.download import Target
    from orchestrator.download import download as fetch

    target: Path | Target
    to_stdout = output == "-"
    compression = "none"
    bucket: Any = None
    if to_stdout:
        target = cast("Target", _StdoutTarget())
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", output):
        from orchestrator.objstore import Location, parse_location

        location = parse_location(output)
        prefix, _, name = location.prefix.rpartition("/")
        if not name:
            raise UsageError(f"{output}: name the object (scheme://bucket/path/NAME.ndjson)")
        compression = _compression_of(name)
        from orchestrator.bucket_sink import BucketSink

        bucket = BucketSink(Location(location.scheme, location.bucket, prefix, location.account))
        target = bucket.target(name, execution_id)
    else:
        path = Path(output)
        if output.endswith("/") or path.is_dir():
            raise UsageError(f"{output}: is a folder: name the file to write (FOLDER/NAME.ndjson)")
        if not path.parent.is_dir():
            raise UsageError(f"{output}: folder {path.parent} does not exist")
        compression = _compression_of(path.name)
        target = path

    async def body(api: ApiClient) -> Any:
        if bucket is not None:
            from orchestrator.objstore import check_access

            await check_access(bucket.store, bucket.location.prefix)  # one line for a missing bucket
        execution = await api.find_execution(export_id, execution_id)
        if execution is not None and not execution.is_success:
            # No result to fetch: say what the execution is instead of a bare 404.
            if execution.is_final:
                why = f": {execution.error_message}" if execution.error_message else ""
                raise MicsExportError(
                    f"execution {execution_id} of export {export_id} ended {execution.raw_status}{why}; "
                    f"it has no result (its error file: mics-export download {export_id} {execution_id} "
                    "--error-file -o FILE)"
                )
            raise MicsExportError(
                f"execution {execution_id} of export {export_id} is {execution.raw_status}: no result yet "
                f"(mics-export executions list {export_id} shows when it ends)"
            )
        name = execution.technical_name if execution else "export"
        return await fetch(
            lambda start: api.stream_result(export_id, execution_id, technical_name=name, start=start),
            target,
            tag=execution_id,
            compression=compression,
        )

    result = _ops(api_url, body)
    summary = {
        "path": output,
        "bytes": result.bytes,
        "records": result.records,
        "invalid_lines": result.stats.invalid_lines,
        "sha256": result.sha256,
    }
    if as_json:
        text = orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode() + "\n"
    else:
        text = (
            f"{output}: {result.bytes} bytes, {result.records} records, "
            f"{result.stats.invalid_lines} invalid lines, sha256 {result.sha256}\n"
        )
    # With -o - stdout holds the data: the summary goes to stderr.
    (sys.stderr if to_stdout else sys.stdout).write(text)
    return EXIT_OK


def _download_error_file(export_id: str, execution_id: str, output: str, api_url: str | None) -> int:
    """``download --error-file``: a FAILED execution's error file (scrubbed) to FILE or stdout."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", output):
        raise UsageError(f"{output}: --error-file writes to a local file or - (stdout)")
    path = None if output == "-" else Path(output)
    if path is not None and (output.endswith("/") or path.is_dir() or not path.parent.is_dir()):
        raise UsageError(f"{output}: name a file in an existing folder")

    from orchestrator.models import ExecutionStatus

    async def body(api: ApiClient) -> bytes:
        execution = await api.find_execution(export_id, execution_id)
        if execution is None:
            raise MicsExportError(f"export {export_id} has no execution {execution_id}")
        if execution.status is not ExecutionStatus.FAILED or not execution.organisation_id:
            raise MicsExportError(
                f"execution {execution_id} of export {export_id} is {execution.raw_status}: "
                "only a FAILED execution has an error file"
            )
        text = await api.fetch_error_file(execution.organisation_id, execution_id)
        if text is None:
            raise MicsExportError(f"execution {execution_id} of export {export_id} FAILED without an error file")
        return text

    text = _ops(api_url, body)
    if path is None:
        sys.stdout.buffer.write(text)
        sys.stdout.flush()
    else:
        from orchestrator.manifest import write_atomic

        write_atomic(path, text)
        click.echo(f"{output}: the error file of execution {execution_id}, {len(text)} bytes")
    return EXIT_OK


def _report(exc: BaseException, group: BaseException | None = None) -> int:
    """One line on stderr for ``exc`` (a group's chosen error); the exit code it means."""
    from orchestrator.logs import redact

    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else EXIT_FAILED
    if isinstance(exc, MicsExportError):
        click.echo(f"mics-export: error: {_one_line(redact(str(exc)))}", err=True)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED
    # A bug, or a failure nobody foresaw: still one line, never the token, exit 1. The
    # manifest was already written on the way out (the run's own last write).
    if _verbosity >= 2:
        text = "".join(traceback.format_exception(group or exc))
        sys.stderr.write(redact(_with_env_secrets(text)))
        hint = "traceback above"
    else:
        hint = "run with -vv for the traceback"
    message = _one_line(redact(_with_env_secrets(str(exc))))
    click.echo(f"mics-export: error: unexpected {type(exc).__name__}: {message} ({hint})", err=True)
    return EXIT_FAILED


def redact_env(text: str) -> str:
    """``text`` scrubbed of every secret known or in the default token variable."""
    from orchestrator.logs import redact

    return redact(_with_env_secrets(text))


def _with_env_secrets(text: str) -> str:
    """``text`` scrubbed of the default token variable's value too, in case the error came
    before the token was read (and registered with the redactor)."""
    from orchestrator.logs import redact

    token = os.environ.get("MICS_API_TOKEN", "").strip()
    return redact(text, [token]) if token else text


def _one_line(text: str, limit: int = 500) -> str:
    """Whitespace collapsed to single spaces, cut at ``limit`` characters (after scrubbing)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


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
        # One line, like every other error (click's own is four: usage, hint, blank, error).
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see {exc.ctx.command_path} --help)"
        click.echo(f"mics-export: error: {_one_line(redact_env(exc.format_message()))}{hint}", err=True)
        code = exc.exit_code
    except click.exceptions.Abort:
        code = 130
    except BaseExceptionGroup as group:  # a task group's wrapper around one real error
        code = _report(single_error(group), group)
    except BaseException as exc:  # the last resort: one line, never a traceback
        code = _report(exc)
    code = code if isinstance(code, int) else EXIT_OK
    if "obstore" in sys.modules and argv is None:
        # obstore's Rust runtime keeps threads that can abort the interpreter while it
        # finalizes (seen as a rare SIGABRT after the command's last line). Everything is
        # written, fsynced and closed by now: flush what is buffered and leave without
        # finalizing, so the exit code is the command's own.
        import logging

        with contextlib.suppress(Exception):  # a closed pipe (| head) changes nothing here
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


__all__ = ["cli", "main"]
