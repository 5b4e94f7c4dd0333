"""The composition root: one run assembled from its parts, for the CLI and for Python callers.

::

    orchestrator.run() / run_async()        cli.run  (+ logging, live display, signals, exit code)
                         \\                  /
                          execute_async(options, console, signals)
        _plan:   load and select the jobs, read the token, resolve the output   (no resource yet)
        one AsyncExitStack, entered in this order and left in the reverse one:
                 the output's lock (flock; a bucket's lease is taken once the manifest exists)
                 the simulator (``simulate``) · the API client · the validator pool
                 the Runner under one task group with the signal, deadline and lease watchers
        then:    the last manifest write, the report, the metrics push, retention
        result:  RunResult — the manifest as typed values, and the exit code

The scheduler (:class:`~orchestrator.scheduler.Runner`) is the per-job lifecycle and knows
nothing of this module. Only the CLI configures logging (:class:`Console`): the library
adds no handler and changes no level, so a host (Airflow, Dagster, Prefect) keeps its own.

Over ~350 lines for now: the command's wiring was moved here whole from scheduler.py (the
result types and the watchers are the natural next split).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import functools
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from orchestrator.api import ApiClient, RetryPolicy
from orchestrator.config import Job, JobFile, load_job_file, read_token, utc_today
from orchestrator.errors import EXIT_FAILED, EXIT_OK, MicsExportError, UsageError, single_error
from orchestrator.guards import RunHistory, describe_duration
from orchestrator.manifest import (
    MANIFEST_NAME,
    JobRecord,
    JobStatus,
    Manifest,
    ManifestWriteError,
    RunStatus,
    load_previous,
    now_iso,
    remove_stale_temp_files,
)
from orchestrator.scheduler import DEADLINE_SIGNAL, EXIT_SIGNAL, Runner
from orchestrator.sink import LocalSink, Sink
from orchestrator.workers import default_workers, validator_pool

if TYPE_CHECKING:
    from os import PathLike

    from orchestrator.objstore import Location
    from orchestrator.simulator import SimulatorConfig

log = logging.getLogger("orchestrator.app")

EXIT_INTERRUPTED = EXIT_SIGNAL[signal.SIGINT]
"""A run stopped by Ctrl-C outside the signal watcher, or by its caller's cancellation."""
CLAIM_TRIES = 25
CLAIM_WAIT_S = 0.02


# -- what a run is asked for, and what it gives back -----------------------------------------
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


@dataclass(frozen=True)
class GuardResult:
    """The guard that failed a job: what it measured against which limit, and why."""

    name: str
    reason: str
    value: float | int
    limit: float | int


@dataclass(frozen=True)
class JobResult:
    """One job of a run, as its manifest entry records it."""

    name: str
    status: JobStatus
    export_id: str | None
    execution_id: str | None
    attempts: int
    path: str | None
    """The output's name inside the run's output (``visitors.ndjson``); None without one."""
    location: str | None
    """Where the output is: a file path, or a bucket URL."""
    bytes: int | None
    records: int | None
    invalid_lines: int
    sha256: str | None
    error: str | None
    error_file: str | None
    guard: GuardResult | None
    query_id: str | None = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        """The job SUCCEEDED."""
        return self.status is JobStatus.SUCCEEDED

    @classmethod
    def of(cls, rec: JobRecord, sink: Sink) -> JobResult:
        """The typed, frozen view of a manifest entry."""
        guard = None
        if rec.guard is not None:
            g = rec.guard
            guard = GuardResult(str(g.get("name")), str(g.get("reason")), g.get("value", 0), g.get("limit", 0))
        return cls(
            name=rec.name,
            status=rec.status,
            export_id=rec.export_id,
            execution_id=rec.execution_id,
            attempts=rec.attempts,
            path=rec.path,
            location=sink.label(rec.path) if rec.path else None,
            bytes=rec.bytes,
            records=rec.records,
            invalid_lines=rec.invalid_lines,
            sha256=rec.sha256,
            error=rec.error,
            error_file=rec.error_file,
            guard=guard,
            query_id=rec.query_id,
            note=rec.note,
        )


@dataclass(frozen=True)
class RunResult:
    """A finished run: its manifest as typed values, and the exit code the CLI would give."""

    status: RunStatus
    exit_code: int
    """0 succeeded, 1 failed, 124 deadline, 130 / 143 interrupted (SIGINT or cancelled / SIGTERM)."""
    run_id: str
    output: str
    """The output folder or bucket URL (``{date}`` and the shard folder resolved)."""
    manifest_path: str
    jobs: tuple[JobResult, ...]
    """The jobs this run selected, in job-file order (the manifest may hold others, from earlier runs)."""
    started_at: str
    finished_at: str | None

    @property
    def ok(self) -> bool:
        """Every selected job SUCCEEDED (and the manifest says so on disk)."""
        return self.status is RunStatus.SUCCEEDED and self.exit_code == EXIT_OK

    @property
    def failed(self) -> tuple[JobResult, ...]:
        """The jobs that did not succeed."""
        return tuple(j for j in self.jobs if not j.ok)

    def job(self, name: str) -> JobResult:
        """The result of the job called ``name`` (KeyError if it was not selected)."""
        for j in self.jobs:
            if j.name == name:
                return j
        raise KeyError(name)


# -- the public API ----------------------------------------------------------------------------
def run(
    job_file: str | PathLike[str] | JobFile,
    *,
    output: str | None = None,
    only: Sequence[str] = (),
    shard: tuple[int, int] | str | None = None,
    concurrency: int | None = None,
    simulate: bool = False,
    workers: int | None = None,
    deadline: float | str | None = None,
) -> RunResult:
    """Run the exports of a job file to completion; the same run as ``mics-export run``.

    ``job_file``: a path, or a :class:`~orchestrator.config.JobFile` already parsed
    (``parse_job_file``). ``output``: a folder or bucket URL (``{date}`` allowed) instead of
    ``run.output_dir``. ``only``: job names (comma-separated names allowed). ``shard``:
    ``(I, N)`` or ``"I/N"``; None reads JOB_COMPLETION_INDEX + MICS_SHARD_COUNT like the CLI.
    ``workers``: validation processes (None: the CPUs available; 0: none). ``deadline``:
    seconds or ``"5h30m"``; None: MICS_DEADLINE_S, else ``run.deadline``. The token comes
    from the variable the job file names (``api.token_env``); ``MICS_API_URL`` overrides
    ``api.base_url``. ``simulate``: against the built-in simulator (no token, no network).

    Job failures raise nothing: look at ``result.ok``, ``result.status``, ``result.jobs``.
    Raises :class:`~orchestrator.errors.UsageError` (its subclasses ConfigError for a bad job
    file, MissingTokenError; a held lock, a bad output or option) before any request is sent,
    and another :class:`~orchestrator.errors.MicsExportError` for a run that could not go on
    (the bucket lock lost): the manifest is written first in every case. Logging is left as
    the host configured it (loggers under ``orchestrator``).

    Synchronous: it runs its own event loop, so call :func:`run_async` from inside one.
    From the main thread, SIGINT / SIGTERM stop the run as they stop the CLI (INTERRUPTED,
    exit_code 130 / 143, part files removed); from another thread (an Airflow task) signals
    are left alone.
    """
    options = options_for(job_file, output, only, shard, concurrency, simulate, workers, deadline)
    signals = threading.current_thread() is threading.main_thread()
    return anyio.run(functools.partial(_library_run, options, signals))


async def run_async(
    job_file: str | PathLike[str] | JobFile,
    *,
    output: str | None = None,
    only: Sequence[str] = (),
    shard: tuple[int, int] | str | None = None,
    concurrency: int | None = None,
    simulate: bool = False,
    workers: int | None = None,
    deadline: float | str | None = None,
) -> RunResult:
    """:func:`run` for a caller already in an event loop (asyncio; anyio-compatible).

    Signals are the caller's business: none is watched. Cancelling the calling task stops the
    run as SIGINT would (INTERRUPTED in the manifest, part files removed) and re-raises.
    """
    options = options_for(job_file, output, only, shard, concurrency, simulate, workers, deadline)
    return await _library_run(options, signals=False)


async def _library_run(options: RunOptions, signals: bool) -> RunResult:
    """The run for Python callers: a task group's lone error raised as itself."""
    try:
        return await execute_async(options, None, signals=signals)
    except BaseExceptionGroup as group:
        error = single_error(group)
        if isinstance(error, MicsExportError):
            raise error from group  # `except UsageError` must work, not only `except*`
        raise


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
    from orchestrator.guards import parse_duration

    if value is None:
        source, value = "MICS_DEADLINE_S", environ.get("MICS_DEADLINE_S", "")
        if not value.strip():
            return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise UsageError(f"{source}: {exc}") from None


# -- the command -------------------------------------------------------------------------------
def execute(options: RunOptions, console: Console | None = None) -> int:
    """``mics-export run``: load, check, run, report, with the CLI's logging, display and signals.

    Returns the exit code; a usage error or a crash is raised for the CLI to report in one line.
    """
    result = anyio.run(functools.partial(execute_async, options, console or Console(), signals=True))
    return result.exit_code


@dataclass(frozen=True)
class Endpoint:
    """The API a run talks to: its URL and token (both checked)."""

    base_url: str
    token: str


@dataclass(frozen=True)
class _Plan:
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


def _plan(options: RunOptions) -> _Plan:
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
    return _Plan(options, job_file, jobs, shard, api, output, today)


def _select(job_file: JobFile, options: RunOptions) -> tuple[tuple[Job, ...], tuple[int, int] | None]:
    from orchestrator.sharding import parse_shard, resolve_shard, shard_of

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
        index, count = shard
        jobs = tuple(j for j in jobs if shard_of(j.name, count) == index)
    return jobs, shard


async def execute_async(options: RunOptions, console: Console | None, *, signals: bool) -> RunResult:
    """The run, every resource in one AsyncExitStack; ``console`` and ``signals``: the CLI's."""
    plan = _plan(options)
    live = console is not None and console.live()
    async with contextlib.AsyncExitStack() as stack:
        sink, previous = await _open_output(stack, plan, console, live)
        api = await _connect(stack, plan)
        workers = default_workers() if options.workers is None else options.workers
        pool = await stack.enter_async_context(validator_pool(workers)) if workers > 0 else None
        manifest = Manifest()
        if sink.is_bucket:
            from orchestrator.bucket_sink import BucketSink

            assert isinstance(sink, BucketSink)
            # Before any execution: a missing bucket or a refused credential is one line (exit
            # 2), and a prefix another run holds is refused; the lock is released on the way out.
            await sink.open(manifest.run_id)
            stack.push_async_callback(_shielded, sink.release)
            previous = await sink.read_previous()
        runner = Runner(
            plan.jobs,
            api,
            sink,
            concurrency=options.concurrency or plan.job_file.run.concurrency,
            manifest=manifest,
            previous=previous,
            query_prefix=plan.job_file.api.query_export_prefix,
            pool=pool,
        )
        log.info(
            "run %s: %d job(s) into %s, concurrency %d, %d validation worker(s)%s",
            manifest.run_id,
            len(plan.jobs),
            sink.url,
            runner.limiter.total_tokens,
            workers,
            f", resuming run {previous.run_id}" if previous else "",
            extra={"event": "run_started", "run_id": manifest.run_id},
        )
        code = await _supervise(plan, runner, live, signals)
        _report(manifest, plan.jobs)
        await _push_metrics(options.metrics_pushgateway, manifest, plan.shard)
        await _retain(plan, sink, code)
    return RunResult(
        status=manifest.status,
        exit_code=code,
        run_id=manifest.run_id,
        output=sink.url,
        manifest_path=sink.label(MANIFEST_NAME),
        jobs=tuple(JobResult.of(manifest.jobs[j.name], sink) for j in plan.jobs),
        started_at=manifest.started_at,
        finished_at=manifest.finished_at,
    )


async def _open_output(
    stack: contextlib.AsyncExitStack, plan: _Plan, console: Console | None, live: bool
) -> tuple[Sink, Manifest | None]:
    """The run's sink (a local folder is locked here), and the manifest an earlier run left."""
    previous = None
    if isinstance(plan.output, Path):
        folder = plan.output
        # The first resource in, the last out. On the loop: nothing else runs yet, and only a
        # `mics-export status` peeking at the lock makes it wait (at most half a second).
        stack.callback(os.close, _claim(folder))
        if console is not None:
            console.setup_logging(plan.token, live)
        # Under the lock, so no other run is writing them; before the first request.
        try:
            removed = remove_stale_temp_files(folder)
        except OSError as exc:
            raise UsageError(f"cannot use output folder {folder}: {exc.strerror or exc}") from None
        if removed:
            log.info(
                "removed %d temporary file(s) a killed run left: %s",
                len(removed),
                ", ".join(removed),
                extra={"event": "temp_files_removed"},
            )
        sink: Sink = LocalSink(folder)
    else:
        if console is not None:
            console.setup_logging(plan.token, live)
        from orchestrator.bucket_sink import BucketSink, lease_from_env

        sink = BucketSink(plan.output, lease_s=lease_from_env())  # configuration only: no request yet
    if plan.shard is not None and not plan.jobs:
        log.warning(
            "shard %d/%d selects none of the %d job(s) of %s: nothing to do",
            *plan.shard,
            len(plan.job_file.select(plan.options.only)),
            plan.source,
            extra={"event": "empty_shard"},
        )
    if isinstance(plan.output, Path):
        previous = load_previous(plan.output / MANIFEST_NAME)  # a corrupt one is moved aside, loudly
    return sink, previous


def _claim(output_dir: Path) -> int:
    """Create ``output_dir`` and lock it for this run (UsageError if it cannot be, or is taken).

    Two runs in one folder would resume each other's part files and overwrite each
    other's manifest; the lock (``.lock``, flock) is released by the kernel even on kill -9.
    """
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a .lock planted as a symlink must not make us create or lock a file
        # outside the folder; only a regular file of the folder is a lock.
        fd = os.open(output_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"cannot use output folder {output_dir}: its .lock is a symlink (remove it)") from None
        raise UsageError(f"cannot use output folder {output_dir}: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL in the path
        raise UsageError(f"cannot use output folder {output_dir}: {exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"cannot use output folder {output_dir}: its .lock is not a regular file")
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


async def _connect(stack: contextlib.AsyncExitStack, plan: _Plan) -> ApiClient:
    """The API client, against the real API or a simulator started for this run."""
    if isinstance(plan.api, Endpoint):
        base_url, token = plan.api.base_url, plan.api.token
    else:
        from orchestrator.simulator import Simulator

        sim = await stack.enter_async_context(Simulator(plan.api))
        base_url, token = sim.url, sim.token
        log.info("simulator serving on %s", sim.url, extra={"event": "simulator_started"})
    settings = plan.job_file.api
    return await stack.enter_async_context(
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


async def _supervise(plan: _Plan, runner: Runner, live: bool, signals: bool) -> int:
    """Run the jobs beside their watchers; whatever ends it, the manifest has the last word."""
    manifest, sink = runner.manifest, runner.sink
    received: list[signal.Signals] = []  # why the run stopped early (the deadline counts as one)
    crashed: BaseException | None = None
    view = None
    if live:
        from orchestrator.progress import ProgressView

        view = ProgressView(manifest, [j.name for j in plan.jobs]).__enter__()
    try:
        async with anyio.create_task_group() as tg:

            async def work() -> None:
                manifest.status = await runner.run()
                tg.cancel_scope.cancel()

            _arm(plan, runner, tg, received)  # earlier runs, and the deadline watcher
            if signals:
                tg.start_soon(_watch_signals, tg, received)
            tg.start_soon(work)
            keep_alive = getattr(sink, "keep_alive", None)
            if keep_alive is not None:
                tg.start_soon(keep_alive)  # LockLostError stops the run: another may write here
    except BaseException as exc:
        crashed = exc  # reported by the caller (one line from the CLI); here only the manifest's last word
        raise
    finally:
        written = await _finish(runner, received, crashed)
        if view is not None:
            view.__exit__(None, None, None)
            view.summary(sink.label(MANIFEST_NAME))
    if not written and manifest.status is RunStatus.SUCCEEDED:
        manifest.status = RunStatus.FAILED  # what the report and the metrics say
    if received:
        return EXIT_SIGNAL[received[0]]
    return EXIT_OK if manifest.status is RunStatus.SUCCEEDED and written else EXIT_FAILED


async def _watch_signals(tg: anyio.abc.TaskGroup, received: list[signal.Signals]) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            received.append(signal.Signals(signum))
            log.warning("%s received: stopping", signal.Signals(signum).name, extra={"event": "interrupted"})
            tg.cancel_scope.cancel()
            return


async def _finish(runner: Runner, received: list[signal.Signals], crashed: BaseException | None) -> bool:
    """Settle the run's status and exit code and write the manifest a last time (False: failed)."""
    manifest = runner.manifest
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
        with anyio.CancelScope(shield=True):
            await runner.writer.save_last()
    except ManifestWriteError:
        # Already logged by the writer. The file on disk is behind (it may still say
        # RUNNING): never exit 0 on it.
        log.error(
            "%s is behind this run (the last write failed): the run fails",
            runner.writer.path,
            extra={"event": "manifest_behind"},
        )
        return False
    return True


async def _shielded(step: Callable[[], Awaitable[None]]) -> None:
    """Run a clean-up step even while the run is being cancelled."""
    with anyio.CancelScope(shield=True):
        await step()


def _arm(plan: _Plan, runner: Runner, tg: anyio.abc.TaskGroup, received: list[signal.Signals]) -> None:
    """Give the runner what earlier runs say (guards, reuse, expected durations) and, with a
    deadline (--deadline, MICS_DEADLINE_S, run.deadline), a watcher that stops the run
    there as SIGTERM would: INTERRUPTED, part files removed, exit 124 (EXIT_DEADLINE)."""
    template = plan.job_file.output_template(plan.options.output_dir)
    # Before the run changes them: the records are this folder's previous manifest now.
    folder = runner.sink.folder if isinstance(runner.sink, LocalSink) else None  # buckets: see guards.py
    runner.history = RunHistory.local(folder, template, runner.manifest.jobs)
    deadline_s = plan.options.deadline_s if plan.options.deadline_s is not None else plan.job_file.run.deadline
    if deadline_s is None:
        return
    runner.deadline = deadline = anyio.current_time() + deadline_s

    async def watch_deadline() -> None:
        await anyio.sleep_until(deadline)
        received.append(DEADLINE_SIGNAL)
        log.warning(
            "deadline reached (%s after the start): stopping; a rerun resumes",
            describe_duration(deadline_s),
            extra={"event": "deadline_reached"},
        )
        tg.cancel_scope.cancel()

    log.info(
        "deadline in %s: no execution is created that is not expected to end before it",
        describe_duration(deadline_s),
        extra={"event": "deadline_set", "deadline_s": deadline_s},
    )
    tg.start_soon(watch_deadline)


def _exit_code(status: RunStatus, received: list[signal.Signals], crashed: BaseException | None) -> int:
    """The code this run exits with (recorded in the manifest for ``mics-export status``)."""
    from orchestrator.errors import EXIT_USAGE

    if received:
        return EXIT_SIGNAL[received[0]]
    if _is_interrupt(crashed):
        return EXIT_INTERRUPTED
    if crashed is not None:  # the CLI's code for the error that stopped the run
        error = single_error(crashed) if isinstance(crashed, BaseExceptionGroup) else crashed
        return EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILED
    return EXIT_OK if status is RunStatus.SUCCEEDED else EXIT_FAILED


def _is_interrupt(exc: BaseException | None) -> bool:
    """A Ctrl-C that arrived outside the signal receiver (before or after the run proper), or
    the caller cancelling run_async (the CLI has no scope around the run to cancel it)."""
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_interrupt(e) for e in exc.exceptions)
    return isinstance(exc, KeyboardInterrupt | anyio.get_cancelled_exc_class())


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


async def _retain(plan: _Plan, sink: Sink, code: int) -> None:
    """run.keep_days: after a run that SUCCEEDED, delete older {date} folders or prefixes (still locked)."""
    keep_days = plan.job_file.run.keep_days
    if keep_days is None or code != EXIT_OK:  # a failed night keeps every earlier one
        return
    template = plan.job_file.output_template(plan.options.output_dir)
    if isinstance(sink, LocalSink):
        from orchestrator.retention import prune

        prune(template, keep_days, plan.today, sink.folder)
        return
    from orchestrator.bucket_sink import BucketSink
    from orchestrator.retention import prune_bucket

    if isinstance(sink, BucketSink):
        await prune_bucket(template, keep_days, plan.today, sink.location.prefix, sink.store)


__all__ = [
    "Console",
    "GuardResult",
    "JobResult",
    "RunOptions",
    "RunResult",
    "execute",
    "execute_async",
    "run",
    "run_async",
]
