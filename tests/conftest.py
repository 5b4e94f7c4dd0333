"""Shared fixtures and helpers: the anyio backend, fast exports, fast retries, token checks.

Every test talks to the real simulator over loopback HTTP; nothing it can do is mocked.
Lifecycles and retry waits are tiny so the suite stays fast, and waits poll a condition
with a deadline instead of sleeping a fixed time.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from orchestrator.retry import RetryPolicy
from orchestrator.simulator import ExportSpec, Faults, SimulatorConfig

TOKEN = "tok-SECRET-1234567890"
"""A distinctive token: any leak of it into logs, messages or reprs is easy to spot."""

ORG = "1426"
DATAMART = "1509"

FAST_RETRY = RetryPolicy(max_tries=8, max_time_s=30.0, base_s=0.001, max_wait_s=0.01)
"""Retries that wait milliseconds, not seconds."""

FAST_FAULTS = Faults(retry_after_s=0.01)
"""No faults, and a tiny Retry-After should a test turn 429s on."""


def pytest_configure(config: pytest.Config) -> None:
    """Tests marked ``xdist_group("cloud")`` share one xdist worker, so moto and azurite start
    once per run instead of once per worker (a few seconds each); without xdist the mark is inert."""
    config.addinivalue_line("markers", "xdist_group(name): run in one xdist worker (pytest-xdist's loadgroup)")
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` starts one and a half workers per CPU: about a third of the suite's time is
    spent waiting on servers and child processes (a per-test CPU-time/wall-time count put it at
    73 s of 208 s), and a third worker fills those waits on a 2-core machine."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(2, cpus * 3 // 2)


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio (the only backend the product uses)."""
    return "asyncio"


def fast_spec(export_id: str, **overrides: Any) -> ExportSpec:
    """An export whose executions last a few milliseconds and whose file is small."""
    values: dict[str, Any] = {
        "name": f"export-{export_id}",
        "query_id": "65987",
        "size_bytes": 20_000,
        "pending_s": 0.01,
        "running_s": 0.02,
    }
    values.update(overrides)
    return ExportSpec(id=export_id, **values)


def sim_config(*exports: ExportSpec, token: str = TOKEN, faults: Faults = FAST_FAULTS, **kw: Any) -> SimulatorConfig:
    """A simulator configuration with the test token and fast faults by default."""
    return SimulatorConfig(token=token, exports=exports, faults=faults, **kw)


async def wait_until(
    condition: Callable[[], Awaitable[Any]],
    *,
    timeout_s: float = 10.0,
    what: str = "condition",
) -> Any:
    """Poll ``condition`` every 10 ms until it returns a truthy value; fail after the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        await anyio.sleep(0.01)


def token_free(text: str, token: str = TOKEN) -> bool:
    """True when ``text`` does not contain the token."""
    return token not in text


def assert_no_token(exc: BaseException, token: str = TOKEN) -> None:
    """The exception's message, repr, traceback and chained causes never show the token."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        assert token not in str(current), f"token in str({type(current).__name__})"
        assert token not in repr(current), f"token in repr({type(current).__name__})"
        assert token not in repr(getattr(current, "args", ())), f"token in args of {type(current).__name__}"
        current = current.__cause__ or current.__context__
    formatted = "".join(traceback.format_exception(exc))
    assert token not in formatted, "token in a formatted traceback"
