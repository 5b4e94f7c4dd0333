"""What a run gives back: :class:`RunResult`, its :class:`JobResult` per job, and a failed guard.

Frozen, typed views of the manifest for Python callers (``orchestrator.run``): built once
the run is over, they hold no resource and never change.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import EXIT_OK
from orchestrator.manifest import JobRecord, JobStatus, RunStatus
from orchestrator.sink import Sink


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


__all__ = ["GuardResult", "JobResult", "RunResult"]
