"""Helpers for in-process runs through the public API (:func:`orchestrator.run`): a simulator
on its own thread, a job file pointing at it, and the environment such a run reads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import TOKEN, write_jobs

from orchestrator import JobResult, RunResult
from orchestrator.simulator import ExportSpec, Faults, SimulatorConfig, SimulatorThread

TOKEN_ENV = "INPROCESS_TEST_TOKEN"
"""The variable the job files name in ``api.token_env``: no clash with a developer's own token."""

FIRST, SECOND = "879879001", "879879002"
"""The simulator's first execution ids, in creation order."""


def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the job file says where the API is; no shard or deadline from outside; the token set."""
    for name in ("MICS_API_URL", "MICS_DEADLINE_S", "MICS_SHARD_COUNT", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)


@contextlib.contextmanager
def simulator(*specs: ExportSpec) -> Iterator[SimulatorThread]:
    """The simulator serving ``specs`` on a thread, accepting the test token, no faults."""
    with SimulatorThread(SimulatorConfig(token=TOKEN, exports=specs, faults=Faults(retry_after_s=0.01))) as sim:
        yield sim


def job_file(tmp_path: Path, url: str, jobs: list[dict[str, Any]], **kw: Any) -> Path:
    """A job file (fast polls and retries) against ``url``, writing to tmp_path/out."""
    api = {"base_url": url, "token_env": TOKEN_ENV, **kw.pop("api", {})}
    return write_jobs(tmp_path, jobs, api=api, **kw)


def only_job(result: RunResult) -> JobResult:
    """The one job of a one-job run."""
    (job,) = result.jobs
    return job
