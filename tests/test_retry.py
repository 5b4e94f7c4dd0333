"""The one retry policy (orchestrator.retry): its formula, Retry-After, its deadline, one budget per download.

Every wait here runs on a fake clock with a recording sleep, so the tests see the exact
waits the policy chose and take milliseconds.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from email.utils import formatdate
from typing import Any

import anyio
import pytest
from conftest import FAST_RETRY, ORG, TOKEN, fast_spec, sim_config, wait_until
from hostile import Forward, Handler, HostileServer, Request, Wire, is_download, json_wire, passthrough

from orchestrator.api import ApiClient
from orchestrator.config import Retries
from orchestrator.errors import IncompleteBodyError, NotFoundError, TransientApiError
from orchestrator.models import Execution
from orchestrator.retry import PollSchedule, RetryPolicy
from orchestrator.simulator import Simulator
from orchestrator.transport import parse_retry_after


class FakeTime:
    """A clock that moves only when the policy sleeps; every sleep is recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


def policy(fake: FakeTime, seed: int = 7, **kw: Any) -> RetryPolicy:
    """A policy on ``fake`` time with a seeded rng."""
    return RetryPolicy(rng=random.Random(seed), clock=fake.clock, sleep=fake.sleep, **kw)


def transient(retry_after_s: float | None = None) -> TransientApiError:
    return TransientApiError(503, "busy", method="GET", path="/v1/x", retry_after_s=retry_after_s)


# -- the formula -------------------------------------------------------------------------------
def test_waits_are_full_jitter_on_a_capped_doubling() -> None:
    """With a seeded rng, wait n is exactly uniform(0, min(max_wait_s, base_s * 2**n)), drawn in order."""
    p = RetryPolicy(base_s=0.5, max_wait_s=4.0, rng=random.Random(3))
    waits = p.waits()
    got = [next(waits) for _ in range(8)]
    twin = random.Random(3)
    assert got == [twin.uniform(0, min(4.0, 0.5 * 2**n)) for n in range(8)]
    assert all(w <= cap for w, cap in zip(got, [0.5, 1, 2, 4, 4, 4, 4, 4], strict=True))


def test_retry_after_in_seconds_is_honoured_and_capped() -> None:
    """A Retry-After replaces the jitter, and one beyond max_retry_after_s is cut to it."""
    p = RetryPolicy(max_retry_after_s=60.0)
    assert p.wait(0, transient(7.0)) == 7.0
    assert p.wait(5, transient(7200.0)) == 60.0
    assert 0 <= p.wait(0, transient(None)) <= p.base_s  # no Retry-After: the jitter


def test_retry_after_as_an_http_date_is_read_against_the_wall_clock() -> None:
    """An HTTP-date Retry-After is the seconds from now to that date; a past date is 0, junk is None."""
    when = "Wed, 21 Oct 2015 07:28:00 GMT"
    stamp = 1445412480.0  # that date
    assert parse_retry_after(when, now=lambda: stamp - 30) == 30.0
    assert parse_retry_after(when, now=lambda: stamp + 5) == 0.0
    assert parse_retry_after("12.5") == 12.5
    assert parse_retry_after("soon") is None


def test_job_file_settings_build_the_policy_with_its_defaults() -> None:
    """api.retries defaults to the policy's own numbers, and policy() carries every setting over."""
    assert Retries().policy() == RetryPolicy()
    custom = Retries(max_tries=3, base_s=0.25, max_wait_s=2.0, max_time_s=9.0).policy()
    assert (custom.max_tries, custom.base_s, custom.max_wait_s, custom.max_time_s) == (3, 0.25, 2.0, 9.0)


# -- the retry loop ----------------------------------------------------------------------------
@pytest.mark.anyio
async def test_call_retries_with_the_formulas_waits_and_logs_each_retry(caplog: pytest.LogCaptureFixture) -> None:
    """Three transient failures, then success: three waits, exactly the seeded draws, each logged as a retry."""
    fake, failures = FakeTime(), [transient(), transient(), transient()]

    async def flaky() -> str:
        if failures:
            raise failures.pop()
        return "ok"

    caplog.set_level(logging.INFO, "orchestrator.retry")
    assert await policy(fake, base_s=1.0, max_wait_s=30.0).call(flaky) == "ok"
    twin = random.Random(7)
    assert fake.sleeps == [twin.uniform(0, 2**n) for n in range(3)]
    records = [r for r in caplog.records if getattr(r, "event", None) == "retry"]
    assert [getattr(r, "tries", None) for r in records] == [1, 2, 3]
    assert all(r.getMessage().startswith("retrying after GET /v1/x: HTTP 503 busy (try ") for r in records)


@pytest.mark.anyio
async def test_call_gives_up_after_max_tries_and_never_retries_the_rest() -> None:
    """max_tries tries in all, then the last error; a non-transient error is raised at once."""
    fake, tries = FakeTime(), []

    async def down() -> None:
        tries.append(fake.now)
        raise transient()

    with pytest.raises(TransientApiError):
        await policy(fake, max_tries=4).call(down)
    assert len(tries) == 4 and len(fake.sleeps) == 3

    async def missing() -> None:
        tries.append(fake.now)
        raise NotFoundError(404, method="GET", path="/v1/x")

    tries.clear()
    with pytest.raises(NotFoundError):
        await policy(fake).call(missing)
    assert len(tries) == 1


@pytest.mark.anyio
async def test_the_overall_deadline_stops_retries_and_bounds_the_last_wait() -> None:
    """Tries that take 100 s each stop at the first failure past max_time_s; no wait runs past it."""
    fake, tries = FakeTime(), []

    async def slow_failure() -> None:
        tries.append(fake.now)
        fake.now += 100.0
        raise transient()

    with pytest.raises(TransientApiError):
        await policy(fake, max_tries=100, max_time_s=250.0, base_s=0.001).call(slow_failure)
    assert len(tries) == 3  # failed at 100 and 200 (retried), at 300 (past 250: raised)

    fake, tries = FakeTime(), []

    async def throttled() -> None:
        tries.append(fake.now)
        raise transient(retry_after_s=1000.0)

    with pytest.raises(TransientApiError):
        await policy(fake, max_tries=100, max_time_s=250.0, max_retry_after_s=300.0).call(throttled)
    assert fake.sleeps == [250.0]  # Retry-After 1000, capped at 300, cut to the 250 s left


def test_a_poll_schedule_draws_from_its_rng_and_aims_at_the_estimated_end() -> None:
    """Before progress a poll waits the seeded jitter; after it, about the time left at the rate seen."""
    clock = FakeTime()
    schedule = PollSchedule(1.0, 60.0, rng=random.Random(5), clock=clock.clock)
    twin = random.Random(5)
    first = schedule.next_wait(None)
    assert first == twin.uniform(0, 1.0)
    progress = type("Seen", (), {"completed_tasks": 0, "num_tasks": 100})()
    schedule.next_wait(progress)
    twin.uniform(0, 2.0)
    clock.now += 10.0
    progress.completed_tasks = 90  # 90 tasks in 10 s: 10 left, about 1.1 s
    wait = schedule.next_wait(progress)
    twin.uniform(0, 4.0)
    hint, floor = (100 - 90) * 10.0 / 90 * twin.uniform(1.0, 1.1), twin.uniform(0.5, 1.0)
    assert wait == min(60.0, max(hint, floor))


# -- through the client ------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def scene(handler: Handler) -> AsyncIterator[tuple[Simulator, HostileServer]]:
    """The simulator with export 1, behind a hostile proxy running ``handler``."""
    async with Simulator(sim_config(fast_spec("1"))) as sim:
        server = HostileServer(sim.url, handler)
        await server.start()
        try:
            yield sim, server
        finally:
            await server.stop()
        assert not server.errors, server.errors


def throttled_once(retry_after: str) -> Handler:
    """The first GET of export 1 answers 429 with ``retry_after``; the rest pass through."""
    seen: list[Request] = []

    async def handler(req: Request, forward: Forward) -> Wire:
        if req.method == "GET" and req.path == "/v1/exports/1" and not seen:
            seen.append(req)
            return json_wire(429, {"status": "error", "error": "slow down"}).with_header("Retry-After", retry_after)
        return await passthrough(req, forward)

    return handler


@pytest.mark.anyio
@pytest.mark.parametrize(("ahead_s", "cap_s", "low", "high"), [(30, 300.0, 28.0, 30.0), (3600, 60.0, 60.0, 60.0)])
async def test_a_429_with_an_http_date_waits_until_then_capped(
    ahead_s: int, cap_s: float, low: float, high: float
) -> None:
    """A 429's Retry-After date is waited for (at most max_retry_after_s), once: the throttle's pause overlaps it."""
    fake = FakeTime()
    date = formatdate(time.time() + ahead_s, usegmt=True)
    async with (
        scene(throttled_once(date)) as (_sim, server),
        ApiClient(server.url, TOKEN, retry=policy(fake, max_retry_after_s=cap_s)) as api,
    ):
        export = await api.get_export("1", ORG)
    assert export.id == "1"
    assert low <= fake.sleeps[0] <= high
    assert sum(fake.sleeps) <= high + 0.01  # the client-wide pause ends with the retry's wait


async def a_finished_execution(sim: Simulator) -> str:
    """An execution of export 1 that SUCCEEDED, made straight on the simulator."""
    async with ApiClient(sim.url, TOKEN, retry=FAST_RETRY) as api:
        execution = await api.create_execution("1")

        async def final() -> Execution | None:
            found = await api.find_execution("1", execution.id)
            return found if found is not None and found.is_success else None

        await wait_until(final, what="the execution to succeed")
        return execution.id


def flaky_download(cut_at: int) -> tuple[Handler, list[int]]:
    """Downloads alternate: a 503, then the file cut after ``cut_at`` bytes. Counts the opens."""
    opens = [0]

    async def handler(req: Request, forward: Forward) -> Wire:
        if not is_download(req):
            return await passthrough(req, forward)
        opens[0] += 1
        if opens[0] % 2:
            return json_wire(503, {"status": "error", "error": "busy"})
        return (await forward()).wire(cut_at=cut_at)

    return handler, opens


@pytest.mark.anyio
@pytest.mark.parametrize(("cut_at", "expected_opens"), [(0, 3), (1, 30)])
async def test_a_download_has_one_budget_for_its_opens_and_its_cuts(cut_at: int, expected_opens: int) -> None:
    """A failed open and a cut draw from one budget: max_tries opens with no progress, 10 * max_tries with a
    byte each time — never the product of the open's and the resume's budgets (6 and 60 before)."""
    handler, opens = flaky_download(cut_at)
    fake = FakeTime()
    async with scene(handler) as (sim, server):
        execution_id = await a_finished_execution(sim)
        async with ApiClient(server.url, TOKEN, retry=policy(fake, max_tries=3, base_s=0.001)) as api:
            with pytest.raises((IncompleteBodyError, TransientApiError)):
                async for _ in api.stream_result("1", execution_id):
                    pass
    assert opens[0] == expected_opens
    assert len(fake.sleeps) == expected_opens - 1
