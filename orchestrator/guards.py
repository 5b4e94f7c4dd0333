"""Data-quality guards, and what earlier runs tell this one (pure logic).

**Guards** (per job, or in ``defaults``) judge a complete file before it becomes visible:

- ``min_records: N`` — fewer records than N trips (reason ``too_few_records``);
- ``max_drop_pct: P`` — more than P% fewer records than the same job's last SUCCEEDED run
  trips (``records_dropped``); with no earlier run to compare with, the job passes with a note;
- ``max_erroneous_tasks_pct: P`` — ``erroneous_tasks / num_tasks`` of the execution above P%
  trips (``too_many_erroneous_tasks``); unknown counters (None, or 0 tasks) give no verdict;
- ``max_invalid_lines: N`` — more than N invalid lines trips (``too_many_invalid_lines``).

They are checked in that order; the first that trips is the verdict. A tripped guard makes
the job FAILED; ``on_guard_failure: reject`` (the default) commits the complete file as
``NAME.ndjson[.gz|.zst].rejected`` — never under its final name — and ``keep`` commits it
under the final name all the same.

**The last SUCCEEDED run of a job** (:class:`RunHistory`), for ``max_drop_pct``, for the
deadline's expected durations and for reusing a query job's execution, is found in:

1. this output folder's previous manifest (a rerun into the same folder; with an output
   folder without ``{date}``, this is yesterday's run), if it records the job SUCCEEDED;
2. otherwise the sibling run folders of the output template (``./exports/{date}`` →
   ``./exports/YYYY-MM-DD``, plus whatever follows ``{date}`` in the template, e.g. a shard
   folder), whose date is before this run's, newest first, at most
   :data:`HISTORY_FOLDERS` of them: the first whose ``manifest.json`` records the job
   SUCCEEDED (a run that failed it, or a folder with no manifest, is passed over).

Local folders only: an output root in a bucket finds no earlier run here (guards then pass
with the first-run note); :meth:`RunHistory.earlier` is the place to add a sink's lookup.

Nothing here talks to the API; the only I/O is reading earlier manifests.

A little over ~350 lines: the guards' settings, their verdicts and the history they are
judged against are one decision, read together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from orchestrator.record import parse_iso

log = logging.getLogger("orchestrator.guards")

REJECTED_SUFFIX = ".rejected"
"""Appended to the final name of a file a guard rejected (``visitors.ndjson.rejected``)."""
HISTORY_FOLDERS = 31
"""How many earlier run folders are searched for a job's last SUCCEEDED run, newest first."""


# -- the guards ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """A job's guard settings (None: that guard is off)."""

    min_records: int | None = None
    max_drop_pct: float | None = None
    max_erroneous_tasks_pct: float | None = None
    max_invalid_lines: int | None = None
    on_guard_failure: Literal["reject", "keep"] = "reject"

    @classmethod
    def of(cls, job: Any) -> Limits:
        """The limits of a job (a :class:`~orchestrator.config.Job`, or anything with the keys)."""
        return cls(
            job.min_records,
            job.max_drop_pct,
            job.max_erroneous_tasks_pct,
            job.max_invalid_lines,
            job.on_guard_failure,
        )


@dataclass(frozen=True)
class Measured:
    """What the guards look at: the file's counts and the execution's task counters."""

    records: int
    invalid_lines: int = 0
    erroneous_tasks: int | None = None
    num_tasks: int | None = None
    previous_records: int | None = None
    """The records of the job's last SUCCEEDED run (None: no earlier run found)."""


@dataclass(frozen=True)
class Trip:
    """A guard that tripped: its name, the value measured, the limit, and why in words."""

    name: str
    reason: str
    value: float | int
    limit: float | int
    message: str

    def as_dict(self) -> dict[str, Any]:
        """The manifest's ``guard`` entry."""
        return {"name": self.name, "reason": self.reason, "value": self.value, "limit": self.limit}


@dataclass(frozen=True)
class Verdict:
    """The outcome of the guards: a trip (or None), and notes worth a log line."""

    trip: Trip | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        """No guard tripped."""
        return self.trip is None

    @property
    def error(self) -> str | None:
        """The job's error for the manifest: the reason first, then the words."""
        return f"{self.trip.reason}: {self.trip.message}" if self.trip else None


def _pct(value: float) -> float:
    """A percentage rounded for the manifest and messages (2 decimals)."""
    return round(value, 2)


def evaluate(limits: Limits, measured: Measured) -> Verdict:
    """Judge a complete file; the first guard that trips (in the module docstring's order) wins."""
    notes: list[str] = []
    trips: list[Trip] = []
    if limits.min_records is not None and measured.records < limits.min_records:
        trips.append(
            Trip(
                "min_records",
                "too_few_records",
                measured.records,
                limits.min_records,
                f"{measured.records} record(s), fewer than min_records={limits.min_records}",
            )
        )
    if limits.max_drop_pct is not None:
        before = measured.previous_records
        if before is None:
            notes.append("max_drop_pct: no earlier SUCCEEDED run of this job to compare with (first run): passed")
        elif before > 0:
            drop = (before - measured.records) * 100.0 / before
            if drop > limits.max_drop_pct:
                trips.append(
                    Trip(
                        "max_drop_pct",
                        "records_dropped",
                        _pct(drop),
                        limits.max_drop_pct,
                        f"{measured.records} record(s) against {before} in the last SUCCEEDED run: "
                        f"a drop of {_pct(drop):g}%, more than max_drop_pct={limits.max_drop_pct:g}",
                    )
                )
    if limits.max_erroneous_tasks_pct is not None:
        done_wrong, total = measured.erroneous_tasks, measured.num_tasks
        if done_wrong is None or not total:
            notes.append("max_erroneous_tasks_pct: the platform did not report its task counts: no verdict")
        else:
            share = done_wrong * 100.0 / total
            if share > limits.max_erroneous_tasks_pct:
                trips.append(
                    Trip(
                        "max_erroneous_tasks_pct",
                        "too_many_erroneous_tasks",
                        _pct(share),
                        limits.max_erroneous_tasks_pct,
                        f"{done_wrong} of {total} task(s) erroneous ({_pct(share):g}%), more than "
                        f"max_erroneous_tasks_pct={limits.max_erroneous_tasks_pct:g}",
                    )
                )
    if limits.max_invalid_lines is not None and measured.invalid_lines > limits.max_invalid_lines:
        trips.append(
            Trip(
                "max_invalid_lines",
                "too_many_invalid_lines",
                measured.invalid_lines,
                limits.max_invalid_lines,
                f"{measured.invalid_lines} invalid line(s), more than max_invalid_lines={limits.max_invalid_lines}",
            )
        )
    return Verdict(trips[0] if trips else None, tuple(notes))


def committed_name(final_name: str, limits: Limits, verdict: Verdict) -> str | None:
    """The name to commit the file under instead of ``final_name`` (None: the final name).

    A rejected file keeps its whole final name and gains ``.rejected``, so that nothing
    that globs ``*.ndjson`` or ``*.ndjson.gz`` downstream ever picks it up.
    """
    if verdict.passed or limits.on_guard_failure == "keep":
        return None
    return final_name + REJECTED_SUFFIX


# -- earlier runs ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Past:
    """What an earlier manifest says of one job (a snapshot: the live records change)."""

    status: str
    records: int | None
    started_at: str | None
    finished_at: str | None
    execution_id: str | None
    export_id: str | None
    query_id: str | None
    where: str
    """The folder of the manifest it comes from (for messages)."""

    @classmethod
    def of(cls, record: Any, where: str) -> Past:
        """From a :class:`~orchestrator.manifest.JobRecord`."""
        return cls(
            str(record.status),
            record.records,
            record.started_at,
            record.finished_at,
            record.execution_id,
            record.export_id,
            record.query_id,
            where,
        )

    @property
    def succeeded(self) -> bool:
        """The job SUCCEEDED in that run."""
        return self.status == "SUCCEEDED"

    @property
    def duration_s(self) -> float | None:
        """How long the job took in that run (finished_at - started_at), or None."""
        start, end = parse_iso(self.started_at), parse_iso(self.finished_at)
        if start is None or end is None or end < start:
            return None
        return (end - start).total_seconds()


def earlier_run_folders(output_dir: Path, template: str, limit: int = HISTORY_FOLDERS) -> list[Path]:
    """The run folders of ``template`` dated before ``output_dir``'s, newest first (at most ``limit``).

    ``output_dir`` is the template resolved (plus any folder appended after it, e.g. a shard's):
    the same tail is appended to each sibling. Without ``{date}`` in the template: none.
    """
    from orchestrator.retention import dated_folders

    found = dated_folders(template)
    if found is None:
        return []
    depth = len(found.root.parts)
    if len(output_dir.parts) <= depth:
        return []
    match = found.name.fullmatch(output_dir.parts[depth])
    if match is None:
        return []
    tail = output_dir.parts[depth + 1 :]
    here = match["date"]
    base = Path(*output_dir.parts[:depth]) if depth else Path(".")
    try:
        names = [p.name for p in base.iterdir()]
    except OSError:
        return []
    dated: list[tuple[str, str]] = []
    for name in names:
        m = found.name.fullmatch(name)
        if m is not None and m["date"] < here:
            dated.append((m["date"], name))
    dated.sort(reverse=True)
    return [base.joinpath(name, *tail) for _, name in dated[:limit]]


class RunHistory:
    """The earlier runs a job is compared with (see the module docstring for the order).

    ``here`` is a snapshot of this folder's previous manifest, taken before the run changes
    its records; the sibling folders' manifests are read lazily, once each.
    """

    def __init__(
        self,
        here: dict[str, Past] | None = None,
        folders: Sequence[Path] = (),
        load: Callable[[Path], Any] | None = None,
    ) -> None:
        self.here = here or {}
        self.folders = list(folders)
        self._load = load
        self._loaded: dict[Path, dict[str, Past]] = {}

    @classmethod
    def local(cls, output_dir: Path | None, template: str, records: Mapping[str, Any]) -> RunHistory:
        """The history of a local output folder; ``records`` are its previous manifest's job
        records (snapshotted now). A bucket (``output_dir`` None) has no sibling lookup yet."""
        from orchestrator.journal import MANIFEST_NAME, load_manifest

        here = {n: Past.of(r, "this output folder") for n, r in records.items()}
        folders = earlier_run_folders(output_dir, template) if output_dir is not None else []
        return cls(here, folders, lambda folder: load_manifest(folder / MANIFEST_NAME))

    def _jobs_in(self, folder: Path) -> dict[str, Past]:
        if folder not in self._loaded:
            manifest = self._load(folder) if self._load is not None else None
            self._loaded[folder] = (
                {n: Past.of(r, str(folder)) for n, r in manifest.jobs.items()} if manifest is not None else {}
            )
        return self._loaded[folder]

    def earlier(self, name: str) -> Past | None:
        """The job's newest SUCCEEDED entry in an earlier run folder (not this one), or None."""
        for folder in self.folders:
            past = self._jobs_in(folder).get(name)
            if past is not None and past.succeeded:
                return past
        return None

    def last_succeeded(self, name: str) -> Past | None:
        """The job's last SUCCEEDED run: this folder's previous manifest first, then earlier folders."""
        past = self.here.get(name)
        if past is not None and past.succeeded:
            return past
        return self.earlier(name)

    def executions_on_query(self, name: str, query_id: str) -> set[str]:
        """Executions an earlier run recorded for this job on this very query (for reuse)."""
        found = set()
        for past in (self.here.get(name), self.earlier(name)):
            if past is not None and past.query_id == query_id and past.execution_id:
                found.add(past.execution_id)
        return found


def previous_records(history: RunHistory | None, name: str) -> tuple[int | None, str | None]:
    """The records of the job's last SUCCEEDED run and the folder it was found in (None, None if none)."""
    past = history.last_succeeded(name) if history is not None else None
    if past is None or past.records is None:
        return None, None
    return past.records, past.where


def expected_duration_s(history: RunHistory | None, name: str, timeout_s: float) -> tuple[float, str]:
    """How long the job is expected to take, and where that figure comes from.

    Its last SUCCEEDED run's ``finished_at - started_at`` (at most ``timeout_s``: a resumed
    job's times include the pause between runs), else ``timeout_s``.
    """
    past = history.last_succeeded(name) if history is not None else None
    took = past.duration_s if past is not None else None
    if took is None:
        return timeout_s, "its timeout_s"
    return min(took, timeout_s), "its last SUCCEEDED run"


__all__ = [
    "HISTORY_FOLDERS",
    "REJECTED_SUFFIX",
    "Limits",
    "Measured",
    "Past",
    "RunHistory",
    "Trip",
    "Verdict",
    "committed_name",
    "earlier_run_folders",
    "evaluate",
    "expected_duration_s",
    "previous_records",
]
