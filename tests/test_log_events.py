"""The structured fields of a run's JSON log events, which collectors and the benchmarks read
instead of parsing the human message.

In-process (``orchestrator.run`` against a simulator thread, records caught by caplog and
rendered by the JSON formatter the CLI uses for ``--log-format json``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import TOKEN, fast_spec, sim_config
from support import write_jobs

import orchestrator
from orchestrator.logs import JsonFormatter
from orchestrator.simulator import SimulatorThread

TOKEN_ENV = "LOG_EVENTS_TEST_TOKEN"
PENDING_S, RUNNING_S = 0.01, 0.02


def _json_events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The caught records as the JSON lines ``--log-format json`` writes."""
    formatter = JsonFormatter()
    events: list[dict[str, Any]] = [orjson.loads(formatter.format(r)) for r in caplog.records]
    return events


def test_job_succeeded_carries_numeric_elapsed_and_download_seconds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each job_succeeded JSON event has a numeric elapsed_s (execution creation to success),
    at least the execution's simulated lifetime, and a download_s no longer than it."""
    monkeypatch.delenv("MICS_API_URL", raising=False)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    specs = [fast_spec(e, pending_s=PENDING_S, running_s=RUNNING_S) for e in ("8101", "8102")]
    caplog.set_level(logging.INFO, logger="orchestrator")
    with SimulatorThread(sim_config(*specs)) as sim:
        jobs = [{"name": f"job-{e}", "export_id": e} for e in ("8101", "8102")]
        path = write_jobs(tmp_path, jobs, api={"base_url": sim.url, "token_env": TOKEN_ENV})
        result = orchestrator.run(path, workers=0)
    assert result.ok
    succeeded = {e["job"]: e for e in _json_events(caplog) if e["event"] == "job_succeeded"}
    assert sorted(succeeded) == ["job-8101", "job-8102"]
    for event in succeeded.values():
        elapsed, download = event["elapsed_s"], event["download_s"]
        assert isinstance(elapsed, float) and isinstance(download, float)
        # The simulator cannot report success before pending + running have passed.
        assert elapsed >= PENDING_S + RUNNING_S - 0.001
        # The download is part of that span (two clocks: 10 ms of slack).
        assert 0 < download <= elapsed + 0.01
        assert event["records"] > 0 and event["bytes"] > 0
