"""The live progress display (rich) and the end-of-run summary.

The display reads the manifest's job records on each refresh (4 Hz): the scheduler only
updates its records, it never talks to the display. Rates are derived here from the
byte counts between two refreshes.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from orchestrator.manifest import JobRecord, JobStatus, Manifest

_STYLE = {
    JobStatus.SUCCEEDED: "green",
    JobStatus.FAILED: "red",
    JobStatus.TIMED_OUT: "red",
    JobStatus.CANCELLED: "yellow",
    JobStatus.DOWNLOADING: "cyan",
    JobStatus.RUNNING: "blue",
    JobStatus.PENDING: "dim",
}


def format_bytes(n: float | None) -> str:
    """1536 → '1.5 KiB'."""
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_ms(epoch_ms: int | None) -> str:
    """Epoch milliseconds → '2026-11-28 02:00:00Z'."""
    if epoch_ms is None:
        return ""
    return dt.datetime.fromtimestamp(epoch_ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


class ProgressView:
    """One line per active job, an overall bar; a summary table at the end."""

    def __init__(self, manifest: Manifest, job_names: Iterable[str], console: Console | None = None) -> None:
        self.manifest = manifest
        self.names = list(job_names)
        self.console = console or Console(stderr=True)
        self._samples: dict[str, tuple[float, int]] = {}
        self._rates: dict[str, float] = {}
        self._live: Live | None = None

    def __enter__(self) -> ProgressView:
        self._live = Live(get_renderable=self.render, console=self.console, refresh_per_second=4, transient=True)
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def _rate(self, job: JobRecord) -> float:
        now = time.monotonic()
        last = self._samples.get(job.name)
        downloaded = self.manifest.live_of(job.name).downloaded
        self._samples[job.name] = (now, downloaded)
        if last and now - last[0] > 0.2:
            inst = (downloaded - last[1]) / (now - last[0])
            self._rates[job.name] = 0.7 * self._rates.get(job.name, inst) + 0.3 * inst
        return self._rates.get(job.name, 0.0)

    def render(self) -> RenderableType:
        """The current picture (called by rich on each refresh)."""
        jobs = [self.manifest.jobs[n] for n in self.names if n in self.manifest.jobs]
        active = [
            j
            for j in jobs
            if j.status in (JobStatus.RUNNING, JobStatus.DOWNLOADING)
            or (j.status is JobStatus.PENDING and j.execution_id)
        ]
        table = Table.grid(padding=(0, 2))
        for _ in range(4):
            table.add_column()
        for job in active[:30]:
            detail = ""
            if job.status is JobStatus.DOWNLOADING:
                rate = self._rate(job)
                detail = f"{format_bytes(self.manifest.live_of(job.name).downloaded)}  {format_bytes(rate)}/s"
            elif job.num_tasks:
                detail = f"tasks {self.manifest.live_of(job.name).completed_tasks or 0}/{job.num_tasks}"
            table.add_row(
                Text(job.name, style="bold"),
                Text(job.status.value, style=_STYLE[job.status]),
                Text(f"attempt {job.attempts}" if job.attempts > 1 else ""),
                Text(detail),
            )
        if len(active) > 30:
            table.add_row(Text(f"... and {len(active) - 30} more active"), Text(""), Text(""), Text(""))
        done = sum(1 for j in jobs if j.status.is_final)
        failed = sum(1 for j in jobs if j.status.is_final and j.status is not JobStatus.SUCCEEDED)
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=max(1, len(jobs)), completed=done, width=40),
            Text(f"{done}/{len(jobs)} jobs done" + (f", {failed} not succeeded" if failed else "")),
        )
        return Group(table, bar)

    def summary(self, where: str = "") -> None:
        """Print the end-of-run table (``where``: the manifest's path, shown under it)."""
        print_summary(self.manifest, self.names, self.console)
        if where:
            self.console.print(f"results and manifest: {where}")


def print_summary(manifest: Manifest, names: Iterable[str], console: Console) -> None:
    """A table of every selected job: status, attempts, size, records, problems."""
    names = list(names)
    table = Table(title=f"run {manifest.run_id}: {manifest.status.value}", title_justify="left")
    for col in ("job", "status", "attempts", "bytes", "records", "invalid", "notes"):
        table.add_column(
            col,
            justify="right" if col in ("attempts", "bytes", "records", "invalid") else "left",
            no_wrap=col != "notes",  # names and figures stay whole; notes wrap
            ratio=1 if col == "notes" else None,  # notes take what is left; the rest keep their width
        )
    for name in names:
        job = manifest.jobs.get(name)
        if job is None:
            continue
        notes = job.error or ""
        if job.erroneous_tasks:
            notes = (notes + "; " if notes else "") + f"{job.erroneous_tasks} erroneous tasks"
        table.add_row(
            job.name,
            Text(job.status.value, style=_STYLE[job.status]),
            str(job.attempts),
            format_bytes(job.bytes),
            "" if job.records is None else f"{job.records:,}",
            str(job.invalid_lines or ""),
            notes,
        )
    console.print(table)


__all__ = ["ProgressView", "format_bytes", "format_ms", "print_summary"]
