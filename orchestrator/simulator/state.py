"""The simulated platform's data: exports, queries, executions and their lifecycle, and the accounting.

An execution moves through PENDING, RUNNING and a final status over wall time (scaled by
``time_scale``); :meth:`SimState.status_of` computes what the API shows at any instant.
:class:`SimStats` keeps what the client did, for tests to check.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from orchestrator.simulator.config import ExportSpec, SimulatorConfig


@dataclass
class SimStats:
    """What the simulator saw. Counters are keyed by route name, export id or execution id."""

    requests: Counter[str] = field(default_factory=Counter)
    executions_created: Counter[str] = field(default_factory=Counter)
    list_requests: Counter[str] = field(default_factory=Counter)
    polls: Counter[str] = field(default_factory=Counter)
    downloads_started: Counter[str] = field(default_factory=Counter)
    downloads_completed: Counter[str] = field(default_factory=Counter)
    range_starts: list[tuple[str, int]] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    bytes_served: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    queries_created: int = 0
    exports_created: int = 0
    exports_updated: int = 0
    cancels: int = 0

    @property
    def total_requests(self) -> int:
        """All requests answered, faults included."""
        return sum(self.requests.values())


@dataclass
class SimExecution:
    """One execution and the facts that decide its lifecycle."""

    id: str
    export: ExportSpec
    attempt: int  # 1-based count of executions of this export
    created_mono: float
    creation_date: int
    fails: bool
    cancelled_at: float | None = None
    done: bool = False  # no longer "in flight" for the accounting


class SimState:
    """The platform's data: exports, queries, executions, and the accounting."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.exports: dict[str, ExportSpec] = {e.id: e for e in config.exports}
        self.queries: dict[str, dict[str, str]] = {}
        self.executions: dict[str, list[SimExecution]] = {}  # export id → oldest first
        self.by_id: dict[str, SimExecution] = {}
        self.downloads: Counter[str] = Counter()  # execution id → downloads begun
        self.stats = SimStats()
        self.rng = random.Random(config.faults.seed)
        self._next_exec = 879_879_000
        self._next_query = 50_000
        self._next_export = 20_000
        self._next_error = 0
        for e in config.exports:
            if e.query_id:
                self.queries.setdefault(
                    e.query_id,
                    {"query_text": "SELECT {id} FROM UserPoint", "datamart_id": e.datamart_id},
                )

    # -- ids and clocks ----------------------------------------------------------------
    def new_error_id(self) -> str:
        """A deterministic uuid-shaped error id."""
        self._next_error += 1
        return str(uuid.UUID(int=self._next_error))

    def export(self, export_id: str) -> ExportSpec | None:
        """The export with this id, derived on demand when auto_create_exports is on."""
        spec = self.exports.get(export_id)
        if spec is None and self.config.auto_create_exports and export_id.isdigit():
            spec = self.exports[export_id] = ExportSpec.derived(export_id)
        return spec

    def create_execution(self, spec: ExportSpec) -> SimExecution:
        """Start a new execution now."""
        runs = self.executions.setdefault(spec.id, [])
        attempt = len(runs) + 1
        self._next_exec += 1
        exe = SimExecution(
            id=str(self._next_exec),
            export=spec,
            attempt=attempt,
            created_mono=time.monotonic(),
            creation_date=int(time.time() * 1000),
            fails=spec.always_fail or attempt <= spec.fail_first,
        )
        runs.append(exe)
        self.by_id[exe.id] = exe
        self.stats.executions_created[spec.id] += 1
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        return exe

    def finish(self, exe: SimExecution) -> None:
        """The client is done with this execution: it leaves the in-flight count."""
        if not exe.done:
            exe.done = True
            self.stats.in_flight -= 1

    def status_of(self, exe: SimExecution) -> dict[str, Any]:
        """The execution as the API shows it at this instant."""
        spec = exe.export
        scale = self.config.time_scale
        elapsed = (exe.cancelled_at or time.monotonic()) - exe.created_mono
        pending, running = spec.pending_s * scale, spec.running_s * scale
        body = _pending_body(exe)
        if elapsed < pending and exe.cancelled_at is None:
            return body
        body["start_date"] = exe.creation_date + int(pending * 1000)
        finished = elapsed >= pending + running and not spec.stall
        if exe.cancelled_at is not None:
            body.update(status="CANCELED", cancel_status="CANCELED", num_tasks=spec.num_tasks)
            return body
        if not finished:
            frac = 0.3 if spec.stall else (elapsed - pending) / running if running else 1.0
            body.update(
                status=spec.running_status,
                num_tasks=spec.num_tasks,
                completed_tasks=int(spec.num_tasks * min(1.0, frac)),
                erroneous_tasks=0,
            )
            return body
        duration = int((pending + running) * 1000)
        body.update(num_tasks=spec.num_tasks, duration=duration, end_date=exe.creation_date + duration)
        if exe.fails:
            body.update(
                status="FAILED",
                completed_tasks=spec.num_tasks // 2,
                erroneous_tasks=spec.num_tasks - spec.num_tasks // 2,
                error={"message": f"simulated failure of attempt {exe.attempt}"},
            )
        else:
            body.update(
                status="SUCCEEDED",
                completed_tasks=spec.num_tasks - spec.erroneous_tasks,
                erroneous_tasks=spec.erroneous_tasks,
                result={"output_files": ["export"]},
            )
        return body


def _pending_body(exe: SimExecution) -> dict[str, Any]:
    """An execution as the API shows it before it starts: every key present, most of them null."""
    return {
        "parameters": {},
        "organisation_id": exe.export.organisation_id,
        "user_id": "2886",
        "result": None,
        "error": None,
        "id": exe.id,
        "status": "PENDING",
        "creation_date": exe.creation_date,
        "start_date": None,
        "duration": None,
        "cancel_status": None,
        "debug": None,
        "is_retryable": False,
        "permalink_uri": "MTowOjA65985NjYyOQ==",
        "num_tasks": None,
        "completed_tasks": None,
        "erroneous_tasks": None,
        "retry_count": 0,
        "job_type": "DATAMART_QUERY_EXPORT",
    }


__all__ = ["SimExecution", "SimState", "SimStats"]
