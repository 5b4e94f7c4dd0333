"""The live progress display (rich) and the end-of-run summary.

The display reads the manifest's job records on each refresh (4 Hz): the scheduler only
updates its records, it never talks to the display. Rates are derived here from the
byte counts between two refreshes.
"""

from __future__ import annotations

import datetime as dt
import textwrap
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from orchestrator.logs import printable
from orchestrator.manifest import JobRecord, JobStatus, Manifest, parse_iso

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
        """Print the end-of-run summary (``where``: the manifest's path, shown under it)."""
        print_summary(self.manifest, self.names, self.console)
        if where:
            self.console.print(f"results and manifest: {where}", soft_wrap=True, markup=False, highlight=False)


# -- the summary ---------------------------------------------------------------------------
# Figures are never cut and no column is ever dropped: when a row does not fit the width,
# the notes go under it, then the name goes on a line of its own above its figures, and on
# the narrowest screens the figures wrap between (never inside) items.
FIGURES = ("status", "attempts", "bytes", "records", "invalid")
_RIGHT = frozenset({"attempts", "bytes", "records", "invalid"})
_STATUSES = {s.value: s for s in JobStatus}
_GAP = "  "
_INDENT = "  "


def job_notes(job: JobRecord) -> str:
    """What went wrong or is worth a look for one job (error, erroneous tasks), one line."""
    # The error text is the server's: escape what a terminal would act on (ESC, C1, bidi).
    notes = printable(" ".join((job.error or "").split()))
    if job.erroneous_tasks:
        notes = (notes.rstrip(".") + "; " if notes else "") + f"{job.erroneous_tasks} erroneous tasks"
    return notes


def job_figures(job: JobRecord) -> dict[str, str]:
    """A job's figures as the summary shows them (empty where there is nothing)."""
    return {
        "status": job.status.value,
        "attempts": str(job.attempts),
        "bytes": format_bytes(job.bytes),
        "records": "" if job.records is None else f"{job.records:,}",
        "invalid": str(job.invalid_lines or ""),
    }


def format_duration(seconds: float | None) -> str:
    """3725 → '1h 02m 05s'; 65 → '1m 05s'; 7.5 → '8s'."""
    if seconds is None:
        return ""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


@dataclass(frozen=True)
class Totals:
    """The run's totals over its selected jobs."""

    jobs: int
    counts: dict[str, int]
    """Jobs per status, in the order statuses are listed in JobStatus."""
    records: int
    bytes: int
    invalid_lines: int
    erroneous_tasks: int
    duration_s: float | None
    """From the run's start to its end (None while it has not ended)."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "jobs": self.jobs,
            "counts": self.counts,
            "records": self.records,
            "bytes": self.bytes,
            "invalid_lines": self.invalid_lines,
            "erroneous_tasks": self.erroneous_tasks,
            "duration_s": self.duration_s,
        }


def run_totals(manifest: Manifest, names: Iterable[str] | None = None) -> Totals:
    """Totals over the jobs ``names`` (default: every job of the manifest)."""
    jobs = [manifest.jobs[n] for n in (manifest.jobs if names is None else names) if n in manifest.jobs]
    counts = {s.value: n for s in JobStatus if (n := sum(1 for j in jobs if j.status is s))}
    start, end = parse_iso(manifest.started_at), parse_iso(manifest.finished_at)
    return Totals(
        jobs=len(jobs),
        counts=counts,
        records=sum(j.records or 0 for j in jobs),
        bytes=sum(j.bytes or 0 for j in jobs),
        invalid_lines=sum(j.invalid_lines for j in jobs),
        erroneous_tasks=sum(j.erroneous_tasks or 0 for j in jobs),
        duration_s=(end - start).total_seconds() if start and end else None,
    )


def _figure_cell(column: str, value: str, width: int) -> Text:
    text = value.rjust(width) if column in _RIGHT else value.ljust(width)
    status = _STATUSES.get(value) if column == "status" else None
    return Text(text, style=_STYLE[status] if status else "")


def _pack(items: list[Text], width: int | None, indent: str = _INDENT, sep: str = ", ") -> list[Text]:
    """``items`` joined by ``sep`` on as few lines of ``width`` as fit, broken only between items."""
    lines: list[Text] = []
    line = Text()
    for item in items:
        piece = Text(sep) + item if line.plain.strip() else item
        # Room for the separator, the item, and the separator's end should the next one break.
        if width is not None and line.plain.strip() and line.cell_len + len(sep) + item.cell_len + 1 > width:
            lines.append(line + Text(sep.rstrip()))
            line = Text(indent) + item
        else:
            line = line + piece
    lines.append(line)
    return lines


def _chunks(text: str, width: int) -> list[str]:
    """``text`` cut into pieces of ``width`` characters (a name longer than the screen)."""
    return [text[i : i + width] for i in range(0, len(text), width)] or [""]


def _wrap(prefix: str, text: str, width: int | None, indent: str) -> list[Text]:
    """``prefix + text`` wrapped at spaces to ``width`` (unbounded: one line)."""
    if width is None:
        return [Text(prefix + text)]
    lines = textwrap.wrap(
        text, width=max(1, width), initial_indent=prefix, subsequent_indent=indent, break_on_hyphens=False
    )
    return [Text(line) for line in lines]


def summary_lines(manifest: Manifest, names: Iterable[str], width: int | None) -> list[Text]:
    """The summary as lines of at most ``width`` cells (``None``: no limit, one line per job).

    Every figure of every job is always there, whole: a narrow screen gets more lines, not
    fewer columns.
    """
    names = [n for n in names if n in manifest.jobs]
    jobs = [manifest.jobs[n] for n in names]
    lines = _pack([Text(f"run {manifest.run_id}:"), Text(manifest.status.value, style="bold")], width, sep=" ")
    figures = [job_figures(j) for j in jobs]
    notes = [job_notes(j) for j in jobs]
    widths = {c: max([len(c), *(len(f[c]) for f in figures)]) for c in FIGURES}
    figures_w = sum(widths.values()) + len(_GAP) * (len(FIGURES) - 1)
    name_w = max([len("job"), *(len(j.name) for j in jobs)])
    notes_w = max([len("notes"), *(len(n) for n in notes)])
    one_line = width is None or name_w + len(_GAP) + figures_w + len(_GAP) + notes_w <= width
    name_beside = width is None or name_w + len(_GAP) + figures_w <= width
    aligned = width is None or len(_INDENT) + figures_w <= width

    def figures_of(values: dict[str, str]) -> Text:
        return Text(_GAP).join(_figure_cell(c, values[c], widths[c]) for c in FIGURES)

    header = figures_of({c: c for c in FIGURES})
    header.stylize("bold")
    if not jobs:
        lines.append(Text("no job selected (an empty shard): nothing was run"))
    elif one_line:
        lines.append(Text("job".ljust(name_w) + _GAP, style="bold") + header + Text(_GAP + "notes", style="bold"))
    elif name_beside:
        lines.append(Text("job".ljust(name_w) + _GAP, style="bold") + header)
    elif aligned:
        lines += [Text("job", style="bold"), Text(_INDENT) + header]
    for job, values, note in zip(jobs, figures, notes, strict=True):
        if one_line:
            row = Text(job.name.ljust(name_w) + _GAP) + figures_of(values)
            lines.append((row + Text(_GAP + note)) if note else row)
            continue
        if name_beside:
            lines.append(Text(job.name.ljust(name_w) + _GAP) + figures_of(values))
        else:
            assert width is not None
            lines += [Text(chunk, style="bold") for chunk in _chunks(job.name, width)]
            if aligned:
                lines.append(Text(_INDENT) + figures_of(values))
            else:
                items = [_figure_cell("status", values["status"], 0), Text(f"{job.attempts} attempt(s)")]
                items += [Text(f"{values['bytes']}")] if values["bytes"] else []
                items += [Text(f"{values['records']} records")] if values["records"] else []
                items += [Text(f"{job.invalid_lines} invalid")] if job.invalid_lines else []
                lines += [Text(_INDENT) + line for line in _pack(items, max(1, width - len(_INDENT)))]
        if note:
            lines += _wrap(_INDENT + "note: ", note, width, _INDENT * 4)
    lines += _total_lines(manifest, names, width)
    for line in lines:
        line.rstrip()  # empty figures at the end of a row leave no trailing blanks
    return lines


def _total_lines(manifest: Manifest, names: list[str], width: int | None) -> list[Text]:
    """The summary's last line(s): the run's totals, packed into ``width`` cells."""
    totals = run_totals(manifest, names)
    items = [Text(f"total: {totals.jobs} job(s)")]
    items += [Text(f"{n} {s}", style=_STYLE[JobStatus(s)]) for s, n in totals.counts.items()]
    items += [Text(f"{totals.records:,} records"), Text(format_bytes(totals.bytes))]
    items += [Text(f"{totals.invalid_lines} invalid lines")] if totals.invalid_lines else []
    items += [Text(f"{totals.erroneous_tasks} erroneous tasks")] if totals.erroneous_tasks else []
    items += [Text(f"took {format_duration(totals.duration_s)}")] if totals.duration_s is not None else []
    return _pack(items, width)


def print_summary(manifest: Manifest, names: Iterable[str], console: Console) -> None:
    """Print the summary of the jobs ``names``: at the terminal's width, or unbounded elsewhere."""
    width = console.width if console.is_terminal else None
    for line in summary_lines(manifest, names, width):
        console.print(line, soft_wrap=True, highlight=False)


__all__ = [
    "FIGURES",
    "ProgressView",
    "Totals",
    "format_bytes",
    "format_duration",
    "format_ms",
    "job_figures",
    "job_notes",
    "print_summary",
    "run_totals",
    "summary_lines",
]
