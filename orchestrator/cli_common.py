"""What the commands of the CLI share: argument checks, the API client for ops commands, output.

Listings print as a table for people, TSV or JSON for scripts (:func:`emit`); every field
that comes from a server or a file is made printable first. Nothing here is a command.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
import click
import orjson

from orchestrator.api import ApiClient
from orchestrator.config import API_URL_ENV, api_url, is_url, output_dir_problem, read_token
from orchestrator.endpoint import DEFAULT_BASE_URL
from orchestrator.errors import MissingTokenError, UsageError
from orchestrator.logs import printable

T = TypeVar("T")
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class Verbosity:
    """``-v`` count of the command being run: decides whether an unexpected error's traceback
    shows. Set by ``run`` (the only command with ``-v``), read by ``main``'s error report."""

    level = 0


_ID = re.compile(r"[0-9]+")


def options(*decorators: Decorator) -> Decorator:
    """Apply click decorators listed top to bottom, as if written above the command."""

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


def id_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An id argument: ASCII digits only (it goes into a request path, with the token beside it)."""
    if value is not None and not _ID.fullmatch(value):
        shown = repr(value if len(value) <= 40 else value[:40] + "...")
        raise UsageError(f"{param.human_readable_name}: must be an id made of digits only, not {shown}")
    return value


def check_only(values: tuple[str, ...]) -> tuple[str, ...]:
    """``--only`` as given, refused when it names no job at all.

    ``--only "$JOB"`` with an empty variable must not quietly run every job of the file.
    """
    for value in values:
        if not any(n.strip() for n in value.split(",")):
            raise UsageError(f"--only {value!r}: names no job (an empty name); give a job name")
    return values


def check_output_dir(value: str | None) -> str | None:
    """``--output-dir`` checked as run.output_dir is: not empty, no NUL, no placeholder but {date}.

    A bucket URL is checked too, without echoing credentials or a signature.
    """
    if value is None:
        return None
    problem = output_dir_problem(value)
    if problem:
        raise UsageError(f"--output-dir: {problem}")
    if is_url(value):
        try:
            from orchestrator.objstore import parse_location
        except ImportError:
            return value  # said when the run starts: the cloud extra is missing
        parse_location(value.replace("{date}", "2000-01-01"))
    return value


def token_for(variable: str = "MICS_API_TOKEN") -> str:
    """The token for a command that has no ``--simulate``: its hint points at ``simulate`` instead."""
    try:
        return read_token(variable)
    except MissingTokenError:
        raise UsageError(
            f"the API token is missing: set the environment variable {variable} (to try without a real "
            "token, start `mics-export simulate` and export the MICS_API_URL and MICS_API_TOKEN it prints)"
        ) from None


def with_api(option: str | None, body: Callable[[ApiClient], Awaitable[T]]) -> T:
    """Run an ops command's coroutine with a client (token checked before any request).

    ``option`` is ``--api-url``; without it ``MICS_API_URL``, else the default API.
    """
    token = token_for()
    from orchestrator.logs import setup_logging

    setup_logging("text", 0, secrets=[token], quiet=True)

    async def main() -> T:
        async with ApiClient(api_url(option), token) as api:
            return await body(api)

    return anyio.run(main)


def print_json(data: Any) -> None:
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


def print_tsv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A header line, then one line per row; fields separated by tabs (for scripts)."""
    lines = ["\t".join(columns), *("\t".join(_tsv_value(v) for v in row) for row in rows)]
    sys.stdout.write("\n".join(lines) + "\n")


def emit(fmt: str, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], data: Any) -> None:
    """Print a listing as ``fmt`` says: a table, TSV (header + rows) or ``data`` as JSON."""
    if fmt == "json":
        print_json(data)
    elif fmt == "tsv":
        print_tsv(columns, rows)
    else:
        _table(title, columns, rows)


def output_format(fmt: str | None, as_json: bool) -> str:
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
    "--api-url", metavar="URL", help=f"API base URL [env {API_URL_ENV}; default {DEFAULT_BASE_URL}]"
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
org_option = click.option("--organisation-id", "organisation_id", required=True, metavar="ID", callback=id_callback)
export_id_argument = click.argument("export_id", callback=id_callback)
execution_id_argument = click.argument("execution_id", callback=id_callback)


__all__ = [
    "Verbosity",
    "api_url_option",
    "check_only",
    "check_output_dir",
    "emit",
    "execution_id_argument",
    "export_id_argument",
    "format_options",
    "id_callback",
    "json_option",
    "options",
    "org_option",
    "output_format",
    "print_json",
    "print_tsv",
    "token_for",
    "with_api",
]
