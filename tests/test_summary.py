"""The end-of-run summary: every figure whole and every note shown at 80 and 60 columns, with totals.

In-process tests render into rich consoles of a fixed width; one test runs the real CLI
under `script` (a pseudo-terminal set to 80 columns) to see what an operator sees.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from support import TOKEN, cli_env, jobs_by_name, manifest, write_jobs

from orchestrator.manifest import JobRecord, JobStatus, Manifest, RunStatus
from orchestrator.progress import format_duration, print_summary, run_totals, summary_lines
from orchestrator.simulator import ExportSpec, SimulatorConfig, SimulatorThread

LONG_NAME = "visitors-daily-segment-export-for-the-nightly-warehouse-load"
ERROR = "execution 879879002 ended FAILED; 3 attempt(s) used, no retries left: the query timed out on the platform"


def sample() -> Manifest:
    """Three jobs: a long name with big figures and erroneous tasks, a failure with a long error, a timeout."""
    m = Manifest(status=RunStatus.FAILED, started_at="2026-11-28T02:00:00Z", finished_at="2026-11-28T02:41:13Z")
    m.jobs[LONG_NAME] = JobRecord(
        LONG_NAME,
        status=JobStatus.SUCCEEDED,
        attempts=1,
        bytes=1_234_567_890,
        records=123_456_789,
        invalid_lines=3,
        erroneous_tasks=12,
    )
    m.jobs["fb"] = JobRecord("fb", status=JobStatus.FAILED, attempts=3, error=ERROR)
    m.jobs["emails"] = JobRecord("emails", status=JobStatus.TIMED_OUT, attempts=1, bytes=2048, records=17)
    return m


def render(m: Manifest, width: int) -> str:
    """What print_summary writes to a terminal of ``width`` columns (colours off)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=True, color_system=None)
    print_summary(m, list(m.jobs), console)
    return buffer.getvalue()


def words(text: str) -> str:
    """The text with line breaks and indentation collapsed (to find a wrapped note)."""
    return " ".join(text.split())


@pytest.mark.parametrize("width", [80, 60])
def test_no_figure_or_note_is_lost_at_narrow_widths(width: int) -> None:
    """At 80 and 60 columns every line fits, and every name, figure and note is there whole."""
    text = render(sample(), width)
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), text
    for whole in (LONG_NAME, "123,456,789", "1.1 GiB", "TIMED_OUT", "2.0 KiB"):
        assert any(whole in line for line in lines), (whole, text)  # on one line: never cut
    assert "12 erroneous tasks" in words(text)
    assert ERROR in words(text)


def test_totals_give_jobs_records_bytes_and_duration() -> None:
    """The last lines total the jobs (per status), records, bytes and the run's duration."""
    text = words(render(sample(), 80))
    total = text[text.index("total:") :]
    assert "3 job(s), 1 SUCCEEDED, 1 FAILED, 1 TIMED_OUT" in total
    assert "123,456,806 records" in total and "1.1 GiB" in total and "took 41m 13s" in total
    totals = run_totals(sample())
    assert (totals.jobs, totals.records, totals.bytes, totals.duration_s) == (3, 123_456_806, 1_234_569_938, 2473.0)


def test_unbounded_width_gives_one_line_per_job() -> None:
    """Without a width (not a terminal) each job is one line, notes included, for grep."""
    lines = [line.plain for line in summary_lines(sample(), list(sample().jobs), None)]
    rows = [line for line in lines if line.startswith((LONG_NAME, "fb ", "emails "))]
    assert len(rows) == 3
    assert "12 erroneous tasks" in rows[0] and ERROR in rows[1]


def test_the_narrowest_screen_wraps_between_figures_never_inside() -> None:
    """At 40 columns figures wrap between items: each number is still whole on one line."""
    text = render(sample(), 40)
    assert all(len(line) <= 40 for line in text.splitlines()), text
    for whole in ("123,456,789 records", "1.1 GiB", "SUCCEEDED"):
        assert any(whole in line for line in text.splitlines()), (whole, text)


def test_duration_format() -> None:
    """Durations read as seconds, minutes or hours."""
    assert [format_duration(s) for s in (7.4, 65, 3725)] == ["7s", "1m 05s", "1h 02m 05s"]


def test_an_empty_run_says_no_job_was_selected() -> None:
    """A run with no job (an empty shard) says so instead of printing an empty table."""
    text = render(Manifest(status=RunStatus.SUCCEEDED), 80)
    assert "no job selected" in text and "total: 0 job(s)" in text


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


@pytest.mark.skipif(shutil.which("script") is None, reason="needs `script` (util-linux) for a pseudo-terminal")
def test_summary_in_a_real_80_column_terminal(tmp_path: Path) -> None:
    """`run --progress on` in an 80-column pty prints a summary whose lines fit and keep the notes."""
    specs = (
        ExportSpec("1", size_bytes=5_000, pending_s=0.01, running_s=0.03, erroneous_tasks=12),
        ExportSpec("2", always_fail=True, pending_s=0.01, running_s=0.02),
    )
    with SimulatorThread(SimulatorConfig(token=TOKEN, exports=specs)) as sim:
        path = write_jobs(
            tmp_path, [{"name": LONG_NAME, "export_id": "1"}, {"name": "broken", "export_id": "2", "retries": 0}]
        )
        env = cli_env(sim.url, TERM="xterm")
        for variable in ("COLUMNS", "LINES"):  # rich would take these over the terminal's size
            env.pop(variable, None)
        command = f"stty cols 80 rows 40; exec {sys.executable} -m orchestrator run {path} --progress on"
        done = subprocess.run(
            ["script", "-q", "-e", "-c", command, "/dev/null"],
            env=env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
    assert done.returncode == 1, done.stdout + done.stderr
    screen = _ANSI.sub("", done.stdout)
    summary = screen[
        screen.index("run " + manifest(tmp_path / "out")["run_id"]) : screen.index("results and manifest:")
    ]
    assert all(len(line) <= 80 for line in summary.splitlines()), summary
    assert "12 erroneous tasks" in words(summary)
    failed = jobs_by_name(manifest(tmp_path / "out"))["broken"]
    assert failed["error"].rstrip(".") in words(summary)  # the note ends "; 500 erroneous tasks"
    assert "total: 2 job(s), 1 SUCCEEDED, 1 FAILED" in words(summary)


def test_a_servers_error_text_cannot_drive_the_terminal() -> None:
    """An escape sequence in an API error is shown escaped in the summary's notes, never sent raw."""
    from orchestrator.manifest import JobRecord, JobStatus
    from orchestrator.progress import job_notes

    rec = JobRecord(name="a", status=JobStatus.FAILED, error="boom \x1b[2J\x1b]0;owned\x07 done")
    notes = job_notes(rec)
    assert "\x1b" not in notes and "\x07" not in notes
    assert "\\x1b[2J" in notes
