"""The composition root: one run assembled from its parts, for the CLI and for Python callers.

::

    orchestrator.run() / run_async()        cli run  (+ logging, live display, signals, exit code)
                         \\                  /
                          execute_async(options, console, signals)
        plan.make_plan:  load and select the jobs, read the token, resolve the output (no resource yet)
        one AsyncExitStack, entered in this order and left in the reverse one:
                 the output's lock (flock; a bucket's lease is taken once the manifest exists)
                 the simulator (``simulate``) · the API client · the validator pool
        supervise.supervise:  the Runner under one task group with the signal, deadline and
                 lease watchers; the manifest's last write
        supervise.conclude:   the report, the metrics push, retention
        result:  results.RunResult — the manifest as typed values, and the exit code

The scheduler (:class:`~orchestrator.scheduler.Runner`) is the per-job lifecycle and knows
nothing of this module. Only the CLI configures logging (:class:`~orchestrator.plan.Console`):
the library adds no handler and changes no level, so a host (Airflow, Dagster, Prefect)
keeps its own. The names of :mod:`orchestrator.plan` and :mod:`orchestrator.results` that
callers use are re-exported here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from orchestrator.api import ApiClient
from orchestrator.config import JobFile
from orchestrator.errors import MicsExportError, UsageError, single_error
from orchestrator.manifest import MANIFEST_NAME, Manifest, RunStatus, load_previous, now_iso, remove_stale_temp_files
from orchestrator.plan import (
    Console,
    Endpoint,
    Plan,
    RunOptions,
    check_workers,
    job_names,
    make_plan,
    options_for,
    resolve_deadline,
)
from orchestrator.results import GuardResult, JobResult, RunResult
from orchestrator.scheduler import Runner
from orchestrator.sink import LocalSink, Sink
from orchestrator.supervise import EXIT_SIGNAL, SignalWatch, conclude, supervise
from orchestrator.workers import default_workers, validator_pool

if TYPE_CHECKING:
    from os import PathLike

log = logging.getLogger("orchestrator.app")

CLAIM_TRIES = 25
CLAIM_WAIT_S = 0.02


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


# -- the command -------------------------------------------------------------------------------
def execute(options: RunOptions, console: Console | None = None) -> int:
    """``mics-export run``: load, check, run, report, with the CLI's logging, display and signals.

    Returns the exit code; a usage error or a crash is raised for the CLI to report in one line.
    """
    result = anyio.run(functools.partial(execute_async, options, console or Console(), signals=True))
    return result.exit_code


async def execute_async(options: RunOptions, console: Console | None, *, signals: bool) -> RunResult:
    """The run, every resource in one AsyncExitStack; ``console`` and ``signals``: the CLI's."""
    plan = make_plan(options)
    live = console is not None and console.live()
    result: RunResult | None = None
    async with contextlib.AsyncExitStack() as stack:
        watch = await _watch_signals(stack) if signals else None  # a signal now stops start-up
        sink, manifest, runner = await _start(stack, plan, options, console, live)
        if watch is not None:
            watch.scope = None  # from here on supervise() stops the run, with the manifest's last word
        code = await supervise(plan, runner, live, watch)
        await conclude(plan, sink, manifest, code)
        result = RunResult(
            status=manifest.status,
            exit_code=code,
            run_id=manifest.run_id,
            output=sink.url,
            manifest_path=sink.label(MANIFEST_NAME),
            jobs=tuple(JobResult.of(manifest.jobs[j.name], sink) for j in plan.jobs),
            started_at=manifest.started_at,
            finished_at=manifest.finished_at,
        )
    if result is None:  # the watcher cancelled start-up (a store that does not answer...)
        assert watch is not None and watch.received
        log.warning("stopped before the run began: nothing was started", extra={"event": "interrupted"})
        return RunResult(
            status=RunStatus.INTERRUPTED,
            exit_code=EXIT_SIGNAL[watch.received[0]],
            run_id="",
            output=str(plan.output),
            manifest_path="",
            jobs=(),
            started_at=now_iso(),
            finished_at=now_iso(),
        )
    return result


async def _watch_signals(stack: contextlib.AsyncExitStack) -> SignalWatch:
    """SIGTERM and SIGINT handled from here to the stack's last release (a watcher task)."""
    watch = SignalWatch(stack.enter_context(anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT)))
    tg = await stack.enter_async_context(anyio.create_task_group())
    tg.start_soon(watch.run)
    stack.callback(tg.cancel_scope.cancel)  # the watcher stops first, then the receiver closes
    watch.scope = tg.cancel_scope  # cancels what follows on the stack: start-up
    return watch


async def _start(
    stack: contextlib.AsyncExitStack, plan: Plan, options: RunOptions, console: Console | None, live: bool
) -> tuple[Sink, Manifest, Runner]:
    """The run's resources (each released by ``stack``), its fresh manifest and its runner."""
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
        extra={"event": "run_started", "run_id": manifest.run_id, "workers": workers},
    )
    return sink, manifest, runner


async def _open_output(
    stack: contextlib.AsyncExitStack, plan: Plan, console: Console | None, live: bool
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


async def _connect(stack: contextlib.AsyncExitStack, plan: Plan) -> ApiClient:
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
            retry=settings.retries.policy(),
            max_requests_in_flight=settings.max_requests_in_flight,
            accept_gzip=settings.accept_gzip,
        )
    )


async def _shielded(step: Callable[[], Awaitable[None]]) -> None:
    """Run a clean-up step even while the run is being cancelled."""
    with anyio.CancelScope(shield=True):
        await step()


__all__ = [
    "Console",
    "GuardResult",
    "JobResult",
    "RunOptions",
    "RunResult",
    "check_workers",
    "execute",
    "execute_async",
    "job_names",
    "options_for",
    "resolve_deadline",
    "run",
    "run_async",
]
