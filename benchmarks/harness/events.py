"""The run's JSON log events (``--log-format json``): one object per line on stderr, with
``ts``, ``level``, ``event``, ``job`` and the event's own fields (README, "Commands").

The benchmarks read numbers from the fields, never from the human ``message``.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson


def events(text: str) -> Iterator[dict[str, Any]]:
    """The JSON objects among the lines of ``text`` (other lines, such as a counter's
    report or a stray warning, are skipped)."""
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            yield rec


def epoch(ts: str) -> float:
    """``2026-11-28T02:00:00.123Z`` → epoch seconds."""
    head, _, ms = ts.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S")) + int(ms or 0) / 1000


@dataclass
class JobLine:
    """One ``job_succeeded`` event."""

    job: str
    records: int
    bytes: int
    seconds: float  # download_s: the download phase (request to commit)
    elapsed_s: float | None  # from the execution's creation to the success
    end_ts: float  # epoch seconds of the event

    @property
    def mb_s(self) -> float:
        """The download phase's rate."""
        return self.bytes / self.seconds / 1e6 if self.seconds else float("nan")

    @classmethod
    def of(cls, rec: dict[str, Any]) -> JobLine:
        """The job line of a ``job_succeeded`` event."""
        return cls(
            job=str(rec["job"]),
            records=int(rec["records"]),
            bytes=int(rec["bytes"]),
            seconds=float(rec["download_s"]),
            elapsed_s=None if rec.get("elapsed_s") is None else float(rec["elapsed_s"]),
            end_ts=epoch(str(rec["ts"])),
        )


def succeeded(text: str) -> list[JobLine]:
    """Every ``job_succeeded`` event of a run's log."""
    return [JobLine.of(rec) for rec in events(text) if rec.get("event") == "job_succeeded"]


def workers(text: str) -> int | None:
    """The validation workers the run says it started (``run_started``'s ``workers`` field),
    or None when the event does not carry it."""
    for rec in events(text):
        if rec.get("event") == "run_started":
            value = rec.get("workers")
            return value if isinstance(value, int) else None
    return None
