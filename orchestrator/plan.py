"""A run's plan: what was asked for (:class:`RunOptions`), checked and resolved before anything starts.

:func:`make_plan` loads and selects the jobs (``--only``, the shard), reads the token and
resolves the output folder or bucket prefix. Everything here either succeeds or raises a
:class:`~orchestrator.errors.UsageError` with nothing sent and no resource taken: the
composition root (:mod:`orchestrator.app`) opens resources only from a valid :class:`Plan`.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.config import Job, JobFile, load_job_file, read_token, utc_today
from orchestrator.errors import UsageError
from orchestrator.workers import default_workers

if TYPE_CHECKING:
    from os import PathLike

    from orchestrator.objstore import Location
    from orchestrator.simulator import SimulatorConfig


@dataclass(frozen=True)
class RunOptions:
    """What a run was asked for: the CLI's options or :func:`run`'s arguments, checked."""

    jobs_file: Path | JobFile
    simulate: bool = False
    output_dir: str | None = None
    concurrency: int | None = None
    only: tuple[str, ...] = ()
    shard: str | tuple[int, int] | None = None
    """``"I/N"`` or ``(I, N)``; None: JOB_COMPLETION_INDEX + MICS_SHARD_COUNT, else every job."""
    workers: int | None = None
    metrics_pushgateway: str | None = None
    deadline_s: float | None = None
    """Seconds from the start of the run (--deadline, MICS_DEADLINE_S); None: run.deadline."""


@dataclass(frozen=True)
class Console:
    """What only the command line adds around a run: its log handler and the live display."""

    log_format: str = "text"
    verbosity: int = 0
    progress: str = "auto"

    def live(self) -> bool:
        """Whether the live display is on (``auto``: when stderr is a terminal)."""
        return self.progress == "on" or (self.progress == "auto" and sys.stderr.isatty())

    def setup_logging(self, token: str | None, live: bool) -> None:
        """Send logs to stderr in the chosen format (quiet under the live display)."""
        from orchestrator.logs import setup_logging

        setup_logging(self.log_format, self.verbosity, secrets=[token] if token else [], quiet=live)


def options_for(
    job_file: str | PathLike[str] | JobFile,
    output: str | None = None,
    only: Sequence[str] = (),
    shard: tuple[int, int] | str | None = None,
    concurrency: int | None = None,
    simulate: bool = False,
    workers: int | None = None,
    deadline: float | str | None = None,
) -> RunOptions:
    """:class:`RunOptions` from :func:`run`'s arguments, checked as the CLI checks its options."""
    if concurrency is not None and (isinstance(concurrency, bool) or concurrency < 1):
        raise UsageError(f"concurrency={concurrency!r}: must be at least 1")
    if workers is not None:
        check_workers(workers, f"workers={workers!r}")
    return RunOptions(
        jobs_file=job_file if isinstance(job_file, JobFile) else Path(job_file),
        simulate=simulate,
        output_dir=output,
        concurrency=concurrency,
        only=job_names(only),
        shard=shard,
        workers=workers,
        deadline_s=resolve_deadline(deadline, "deadline"),
    )


def job_names(only: str | Sequence[str]) -> tuple[str, ...]:
    """``--only`` values: repeated and comma-separated names, blanks dropped (a lone str too)."""
    items = (only,) if isinstance(only, str) else only
    return tuple(n.strip() for item in items for n in item.split(",") if n.strip())


def check_workers(workers: int, source: str) -> None:
    """Refuse more validation processes than 4x the CPUs: they would only compete for them."""
    limit = 4 * default_workers()
    if isinstance(workers, bool) or workers < 0:
        raise UsageError(f"{source}: must be 0 or more")
    if workers > limit:
        raise UsageError(f"{source}: at most {limit} (4x the {limit // 4} CPU(s) this process may use)")


def resolve_deadline(value: float | str | None, source: str, environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds from ``value``, else from ``MICS_DEADLINE_S``; None: the job file's run.deadline."""
    from orchestrator.durations import parse_duration

    if value is None:
        source, value = "MICS_DEADLINE_S", environ.get("MICS_DEADLINE_S", "")
        if not value.strip():
            return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise UsageError(f"{source}: {exc}") from None


@dataclass(frozen=True)
class Endpoint:
    """The API a run talks to: its URL and token (both checked)."""

    base_url: str
    token: str


@dataclass(frozen=True)
class Plan:
    """Everything checked before the first request or resource: a run starts only from a valid plan."""

    options: RunOptions
    job_file: JobFile
    jobs: tuple[Job, ...]
    shard: tuple[int, int] | None
    api: Endpoint | SimulatorConfig
    """The real API, or the simulator to start for the run (``simulate``)."""
    output: Path | Location
    """The output folder (the shard folder appended) or bucket prefix."""
    today: dt.date
    """One date for {date} and for retention, even across midnight."""

    @property
    def token(self) -> str | None:
        return self.api.token if isinstance(self.api, Endpoint) else None

    @property
    def source(self) -> str:
        """The job file, for messages."""
        jobs_file = self.options.jobs_file
        return str(jobs_file) if isinstance(jobs_file, Path) else jobs_file.path or "<job file>"


def make_plan(options: RunOptions) -> Plan:
    """Load and select the jobs, read the token, resolve the output: errors here send nothing."""
    jobs_file = options.jobs_file
    job_file = jobs_file if isinstance(jobs_file, JobFile) else load_job_file(jobs_file)
    jobs, shard = _select(job_file, options)
    api: Endpoint | SimulatorConfig
    if options.simulate:
        from orchestrator.simulator import demo_config

        api = demo_config()
    else:
        token = read_token(job_file.api.token_env)
        api = Endpoint(job_file.base_url(), token)
    today = utc_today()
    resolved = job_file.output_dir(options.output_dir, today)
    from orchestrator.sharding import shard_folder

    # Shards started at once must not share a folder: the second would fail on the lock, and
    # they cannot share a manifest. An explicit output is used as given.
    sub = shard_folder(*shard) if shard is not None and options.output_dir is None else None
    output: Path | Location
    if isinstance(resolved, str):
        from orchestrator.objstore import Location, parse_location

        output = location = parse_location(resolved)
        if sub is not None:
            output = Location(location.scheme, location.bucket, location.key(sub), location.account)
    else:
        output = resolved / sub if sub is not None else resolved
    return Plan(options, job_file, jobs, shard, api, output, today)


def _select(job_file: JobFile, options: RunOptions) -> tuple[tuple[Job, ...], tuple[int, int] | None]:
    """The jobs ``--only`` and the shard select (job-file order), and the shard (None: every job)."""
    from orchestrator.sharding import parse_shard, resolve_shard, select

    jobs = job_file.select(options.only)
    try:
        if isinstance(options.shard, tuple):
            index, count = options.shard
            shard: tuple[int, int] | None = parse_shard(f"{index}/{count}")  # one set of range checks
        else:
            shard = resolve_shard(options.shard, os.environ)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if shard is not None:
        chosen = set(select([j.name for j in jobs], *shard))
        jobs = tuple(j for j in jobs if j.name in chosen)
    return jobs, shard


__all__ = [
    "Console",
    "Endpoint",
    "Plan",
    "RunOptions",
    "check_workers",
    "job_names",
    "make_plan",
    "options_for",
    "resolve_deadline",
]
