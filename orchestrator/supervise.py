"""A run under supervision: the jobs beside their watchers, and the manifest's last word.

:func:`supervise` runs the :class:`~orchestrator.scheduler.Runner` in one task group with
the signal watcher (SIGINT / SIGTERM, CLI and main-thread callers only), the deadline
watcher and a bucket lease's keep-alive. Whatever ends the run (all jobs done, a signal,
the deadline, a crash), the run's status and exit code are settled and the manifest is
written a last time, shielded. :func:`conclude` then logs the outcome, pushes the metrics
and applies retention. The exit codes are :mod:`orchestrator.errors`' constants.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator

import anyio
import anyio.abc

from orchestrator.config import Job
from orchestrator.durations import describe_duration
from orchestrator.errors import (
    EXIT_DEADLINE,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    UsageError,
    single_error,
)
from orchestrator.guards import RunHistory
from orchestrator.manifest import MANIFEST_NAME, Manifest, ManifestWriteError, RunStatus, now_iso
from orchestrator.plan import Plan
from orchestrator.scheduler import Runner
from orchestrator.sink import LocalSink, Sink

log = logging.getLogger("orchestrator.app")

DEADLINE_SIGNAL = signal.SIGALRM
"""Stands for the deadline in the list of stop reasons: the run's own alarm clock, never sent."""
EXIT_SIGNAL = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM, DEADLINE_SIGNAL: EXIT_DEADLINE}
"""The exit code of a run stopped by each reason."""
EXIT_INTERRUPTED = EXIT_SIGINT
"""A run stopped by Ctrl-C outside the signal watcher, or by its caller's cancellation."""


class SignalWatch:
    """SIGTERM / SIGINT from the command's first step to its last release: the first cancels
    :attr:`scope` (start-up's, then the run's), later ones are only logged, so that a signal
    during the stop itself never kills the process half-way through it."""

    def __init__(self, signals: AsyncIterator[int]) -> None:
        self.signals = signals
        self.received: list[signal.Signals] = []
        """Why the run stopped early, first reason first (the deadline counts as one)."""
        self.scope: anyio.CancelScope | None = None
        self._settled = False

    def settle(self) -> None:
        """The run has ended (its status is being written): later signals are only logged."""
        self._settled, self.scope = True, None

    async def run(self) -> None:
        async for signum in self.signals:
            sig = signal.Signals(signum)
            if self._settled:
                log.warning("%s received: the run has ended, finishing up", sig.name, extra={"event": "interrupted"})
                continue
            if self.received:
                log.warning("%s received: already stopping", sig.name, extra={"event": "interrupted"})
                continue
            self.received.append(sig)
            log.warning("%s received: stopping", sig.name, extra={"event": "interrupted"})
            if self.scope is not None:
                self.scope.cancel()


async def supervise(plan: Plan, runner: Runner, live: bool, watch: SignalWatch | None) -> int:
    """Run the jobs beside their watchers; whatever ends it, the manifest has the last word.

    ``watch``: the command's signals (None: the caller's business, as for the Python API)."""
    manifest, sink = runner.manifest, runner.sink
    received: list[signal.Signals] = watch.received if watch is not None else []
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
            if watch is not None:
                watch.scope = tg.cancel_scope
                if watch.received:  # a signal came between start-up and here
                    tg.cancel_scope.cancel()
            tg.start_soon(work)
            keep_alive = getattr(sink, "keep_alive", None)
            if keep_alive is not None:
                tg.start_soon(keep_alive)  # LockLostError stops the run: another may write here
    except BaseException as exc:
        crashed = exc  # reported by the caller (one line from the CLI); here only the manifest's last word
        raise
    finally:
        if watch is not None:
            watch.settle()  # a signal from now on changes nothing: the run's status is being written
        received = list(received)  # the reasons as settled: the exit code agrees with the manifest
        written = await _finish(runner, received, crashed)
        if view is not None:
            view.__exit__(None, None, None)
            view.summary(sink.label(MANIFEST_NAME))
    if not written and manifest.status is RunStatus.SUCCEEDED:
        manifest.status = RunStatus.FAILED  # what the report and the metrics say
    if received:
        return EXIT_SIGNAL[received[0]]
    return EXIT_OK if manifest.status is RunStatus.SUCCEEDED and written else EXIT_FAILED


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


def _arm(plan: Plan, runner: Runner, tg: anyio.abc.TaskGroup, received: list[signal.Signals]) -> None:
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


async def conclude(plan: Plan, sink: Sink, manifest: Manifest, code: int) -> None:
    """After the run proper: the last log line, the metrics push, then retention (only on success)."""
    _report(manifest, plan.jobs)
    await _push_metrics(plan.options.metrics_pushgateway, manifest, plan.shard)
    await _retain(plan, sink, code)


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


async def _retain(plan: Plan, sink: Sink, code: int) -> None:
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


__all__ = ["DEADLINE_SIGNAL", "EXIT_INTERRUPTED", "EXIT_SIGNAL", "conclude", "supervise"]
