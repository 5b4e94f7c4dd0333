"""The one retry policy: every wait, retry and poll of the tool is decided here.

The formula. The n-th retry (n = 0, 1, ...) of an operation waits, in seconds::

    wait_n = min(Retry-After, max_retry_after_s)                if the server sent one
           = uniform(0, min(max_wait_s, base_s * 2 ** min(n, 32)))  otherwise ("full jitter")

The Retry-After comes through the policy's ``retry_after`` hook (by default the
``retry_after_s`` a 429 or 503 error carries). The exponent is capped so that a huge
``max_tries`` never overflows a float. An operation
stops retrying after ``max_tries`` tries, or once ``max_time_s`` have passed since it began
(a wait never runs past that deadline). Non-transient errors (:func:`errors.is_transient`
says which are not) fail at once.

One budget per operation. A :class:`Budget` is one operation's tries and deadline; every
retry loop inside the operation draws from it, so loops never nest and multiply. A
resumable download is one operation: a failed open and a body cut count alike, and a
failure after new bytes arrived starts a fresh count and deadline (the download is
moving), up to ``MAX_FAILURES_FACTOR * max_tries`` failures in all.

Polling (:class:`PollSchedule`) follows the same jitter from ``initial_s`` to ``max_s``,
and aims at the execution's estimated end once it reports progress.

The randomness (a ``random.Random``), the clock and the sleep are fields of the policy, so a
test or a benchmark passes a seeded rng and a fake clock and gets exact, instant waits.

Why not the ``backoff`` library any more: its decorators give each call its own budget,
so a retried request inside a retried download multiplied the tries (up to 640 opens); it
measures ``max_time`` on the wall clock (``datetime.now()``, which an NTP step moves); its
jitter draws from the global ``random``; and its wait generators must be primed with a
``send(None)``. What is left of it here is thirty lines, with none of those problems.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import anyio

from orchestrator.errors import is_transient

T = TypeVar("T")
log = logging.getLogger("orchestrator.retry")

MAX_EXPONENT = 32
"""Exponential waits stop doubling here: 2**32 times any base is past every cap (2.0**1024 overflows)."""
MAX_FAILURES_FACTOR = 10
"""A resumable operation fails after this many times ``max_tries`` failures in all, progress or not."""


def retry_after_of(exc: BaseException) -> float | None:
    """The default Retry-After hook: the ``retry_after_s`` an error carries (a 429 or 503), if any."""
    value = getattr(exc, "retry_after_s", None)
    return None if value is None else float(value)


def full_jitter(rng: random.Random, n: int, base_s: float, max_s: float) -> float:
    """``uniform(0, min(max_s, base_s * 2 ** min(n, 32)))``: the n-th wait (n = 0, 1, ...)."""
    return rng.uniform(0, min(max_s, base_s * 2 ** min(n, MAX_EXPONENT)))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How transient failures are retried (the module docstring has the formula)."""

    max_tries: int = 8
    max_time_s: float = 600.0
    base_s: float = 0.5
    max_wait_s: float = 30.0
    max_retry_after_s: float = 300.0
    """A larger Retry-After is capped here: a nightly batch does not sleep for hours."""
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)
    """Seconds on a clock that never jumps: the deadlines and the throttle's pause use it."""
    sleep: Callable[[float], Awaitable[None]] = field(default=anyio.sleep, compare=False, repr=False)
    retry_after: Callable[[BaseException], float | None] = field(default=retry_after_of, compare=False, repr=False)
    """The hook that reads the server's Retry-After (seconds) from an error."""

    def waits(self) -> Iterator[float]:
        """The jittered waits before retry 0, 1, 2, ... (without Retry-After): endless."""
        n = 0
        while True:
            yield full_jitter(self.rng, n, self.base_s, self.max_wait_s)
            n += 1

    def wait(self, n: int, exc: BaseException | None = None) -> float:
        """Seconds before the n-th retry after ``exc``: its capped Retry-After, else the n-th jitter."""
        retry_after = None if exc is None else self.retry_after(exc)
        if retry_after is not None:
            return min(max(0.0, retry_after), self.max_retry_after_s)
        return full_jitter(self.rng, n, self.base_s, self.max_wait_s)

    def budget(self, *, min_tries: int = 1, resumable: bool = False, since: float | None = None) -> Budget:
        """A fresh budget for one operation (at least ``min_tries`` tries; ``resumable``: see
        :meth:`Budget.next_wait`; ``since``: when the operation began, default now)."""
        tries = max(min_tries, self.max_tries)
        return Budget(self, tries, MAX_FAILURES_FACTOR * tries if resumable else tries, since=since)

    def poll_schedule(self, initial_s: float, max_s: float) -> PollSchedule:
        """A :class:`PollSchedule` drawing on this policy's rng and clock."""
        return PollSchedule(initial_s, max_s, rng=self.rng, clock=self.clock)

    async def call(
        self,
        func: Callable[[], Awaitable[T]],
        *,
        budget: Budget | None = None,
        retry_if: Callable[[BaseException], bool] = is_transient,
        logger: logging.Logger = log,
    ) -> T:
        """``await func()``, retried while ``retry_if`` says an error is worth another try and
        ``budget`` (a fresh one if None: the operation is this call) is not spent.

        Each retry is logged on ``logger`` (the caller's, so that the record carries the job)
        as ``retrying after ERROR (try N, waiting Xs)``, event ``retry``.
        """
        # Most calls succeed at once: their fresh budget is made at the first failure, with
        # its deadline counted from now all the same.
        since = self.clock() if budget is None else 0.0
        while True:
            try:
                return await func()
            except Exception as exc:
                if not retry_if(exc):
                    raise
                if budget is None:
                    budget = self.budget(since=since)
                wait = budget.next_wait(exc)
                if wait is None:
                    raise
                logger.info(
                    "retrying after %s (try %d, waiting %.2fs)",
                    exc,
                    budget.failures,
                    wait,
                    extra={"event": "retry", "error": str(exc), "tries": budget.failures},
                )
            await self.sleep(wait)


DEFAULTS = RetryPolicy()
"""The default settings: the one home of their numbers (the job file's ``api.retries`` defaults to them)."""


class Budget:
    """One operation's tries and deadline, shared by every retry loop inside it."""

    def __init__(self, policy: RetryPolicy, max_tries: int, max_failures: int, *, since: float | None = None) -> None:
        self.policy = policy
        self.max_tries = max_tries
        self.max_failures = max_failures
        self.failures = 0
        """Failed tries since the operation began (or last made progress)."""
        self.total_failures = 0
        self._since = policy.clock() if since is None else since
        """When the operation began (``since``, on the policy's clock; default now)."""

    def progressed(self) -> None:
        """The operation moved forward (a download got new bytes): the try count and the
        deadline start again from now (``max_failures`` still counts every failure)."""
        self.failures, self._since = 0, self.policy.clock()

    def next_wait(self, exc: BaseException) -> float | None:
        """Count the failure ``exc``: the seconds to wait before the next try, or None when the
        budget is spent (``max_tries`` tries, the deadline, or ``max_failures`` in all)."""
        now = self.policy.clock()
        self.failures += 1
        self.total_failures += 1
        deadline = self._since + self.policy.max_time_s
        if self.failures >= self.max_tries or self.total_failures >= self.max_failures or now >= deadline:
            return None
        return min(self.policy.wait(self.failures - 1, exc), deadline - now)


class Progress(Protocol):
    """What a poll sees of an execution's progress (an :class:`~orchestrator.models.Execution`)."""

    @property
    def completed_tasks(self) -> int | None: ...
    @property
    def num_tasks(self) -> int | None: ...


class PollSchedule:
    """Seconds to wait before each poll of an execution.

    The n-th wait is ``uniform(0, min(max_s, initial_s * 2 ** min(n, 32)))`` (full jitter). Once
    the execution reports progress, the wait is its estimated time to finish instead (times
    ``uniform(1, 1.1)``, to land just after it, and no less than about ``initial_s``) or, when
    that is beyond ``max_s``, ``max_s`` times ``uniform(0.9, 1)``: a 5-minute execution then
    costs ~9 polls, not ~15, and its end is noticed promptly. The estimate comes from how fast
    ``completed_tasks`` moved between two polls, on ``clock`` (this machine's monotonic clock),
    so the platform's clock does not matter.
    """

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.rng = rng or random.Random()
        self.clock = clock
        self._n = 0
        self._last: tuple[float, int] | None = None

    def next_wait(self, seen: Progress | None) -> float:
        """The wait before the next poll, given what this poll saw (None: nothing yet)."""
        initial_s, max_s, rng = self.initial_s, self.max_s, self.rng
        wait = full_jitter(rng, self._n, initial_s, max_s)
        self._n = min(self._n + 1, MAX_EXPONENT)  # past the cap the draw is bounded by max_s anyway
        # Not started yet counts as 0 done: the first progress seen then gives a rate that
        # is too low (it started later), so a long first step — which is the right step.
        done = (seen.completed_tasks if seen is not None else None) or 0
        total = seen.num_tasks if seen is not None else None
        now = self.clock()
        last = self._last
        if total and last is not None and done > last[1]:
            eta = (total - done) * (now - last[0]) / (done - last[1])
            # Far from the end: a full max_s step. Near it: land just after the finish.
            hint = max_s * rng.uniform(0.9, 1.0) if eta > max_s else eta * rng.uniform(1.0, 1.1)
            # The estimate replaces the random draw: a draw up to max_s near the end
            # would notice the finish up to max_s late.
            wait = min(max_s, max(hint, initial_s * rng.uniform(0.5, 1.0)))
        self._last = (now, done)
        return wait


__all__ = ["DEFAULTS", "MAX_EXPONENT", "Budget", "PollSchedule", "RetryPolicy", "full_jitter", "retry_after_of"]
