"""The command line: argument parsing, exit codes and wiring. No business logic here.

Exit codes (SPEC.md): 0 all selected jobs succeeded; 1 the run finished and a job did not
(or an ops command failed at the API, or an unexpected error stopped it); 2 usage,
job-file error or missing token, with nothing sent; 130 / 143 interrupted by SIGINT / SIGTERM
(:mod:`orchestrator.errors` names them all).

No traceback reaches the user: :func:`main` turns any error into one line. An unexpected
one (a bug) says so, and shows its traceback only at ``-vv``, scrubbed of the token.

This module holds the group and :func:`main`; the commands live beside it, by group:
:mod:`~orchestrator.cli_run` (run, validate, simulate), :mod:`~orchestrator.cli_ops`
(exports, executions, cancel, status), :mod:`~orchestrator.cli_download` (download), and
what they share in :mod:`~orchestrator.cli_common`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Sequence

import click

from orchestrator._version import __version__
from orchestrator.cli_common import Verbosity
from orchestrator.cli_download import download
from orchestrator.cli_ops import cancel, executions, exports, status
from orchestrator.cli_run import run, simulate, validate
from orchestrator.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_USAGE,
    MicsExportError,
    UsageError,
    single_error,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mics-export")
def cli() -> None:
    """Run mediarithmics Query Exports in bulk: create, poll, download, verify."""


for _command in (run, validate, simulate, exports, executions, cancel, status, download):
    cli.add_command(_command)


def _report(exc: BaseException, group: BaseException | None = None) -> int:
    """One line on stderr for ``exc`` (a group's chosen error); the exit code it means."""
    from orchestrator.logs import redact

    if isinstance(exc, KeyboardInterrupt):
        return EXIT_SIGINT
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else EXIT_FAILED
    if isinstance(exc, MicsExportError):
        click.echo(f"mics-export: error: {_one_line(redact(str(exc)))}", err=True)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED
    # A bug, or a failure nobody foresaw: still one line, never the token, exit 1. The
    # manifest was already written on the way out (the run's own last write).
    if Verbosity.level >= 2:
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
        code = EXIT_SIGINT
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


__all__ = ["cli", "main", "redact_env"]
