"""Data-quality guards: the pure verdicts of orchestrator/guards.py, then whole runs of the CLI
against the simulator (each guard trips → FAILED, exit 1, ``.rejected`` file, no final name).

The runs call the CLI's ``main()`` in this process (:func:`support.cli_in_process`: the same
code, exit code and stderr); exit codes as a process sees them are tested in test_resilience."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import TOKEN, fast_spec, sim_config
from support import cli_env, cli_in_process, content_sha256, jobs_by_name, manifest, write_jobs

from orchestrator.durations import parse_duration
from orchestrator.guards import (
    Limits,
    Measured,
    Past,
    RunHistory,
    committed_name,
    earlier_run_folders,
    evaluate,
    expected_duration_s,
    previous_records,
)
from orchestrator.simulator import SimulatorThread


# -- pure: durations ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"),
    [(90, 90.0), ("90", 90.0), ("90s", 90.0), ("90m", 5400.0), ("6h", 21600.0), ("1d", 86400.0), ("5h30m", 19800.0)],
)
def test_durations_parse(text: object, seconds: float) -> None:
    """Every documented duration form gives its number of seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "6x", "h", "-5", "0", "1h-2m", True, None, "nan"])
def test_bad_durations_are_one_line_errors(text: object) -> None:
    """Anything but a positive duration is refused with a one-line reason."""
    with pytest.raises(ValueError, match="duration") as caught:
        parse_duration(text)
    assert "\n" not in str(caught.value)


# -- pure: verdicts ----------------------------------------------------------------------------
def test_min_records_trips_below_the_limit_only() -> None:
    """min_records: N passes at N records and trips at N-1, naming value and limit."""
    assert evaluate(Limits(min_records=10), Measured(records=10)).passed
    verdict = evaluate(Limits(min_records=10), Measured(records=9))
    assert verdict.trip is not None and verdict.trip.as_dict() == {
        "name": "min_records",
        "reason": "too_few_records",
        "value": 9,
        "limit": 10,
    }
    assert verdict.error is not None and verdict.error.startswith("too_few_records: ")


def test_max_drop_pct_compares_with_the_previous_run() -> None:
    """A drop of more than P% trips; exactly P% passes; a first run passes with a note."""
    limits = Limits(max_drop_pct=50)
    assert evaluate(limits, Measured(records=50, previous_records=100)).passed
    trip = evaluate(limits, Measured(records=49, previous_records=100)).trip
    assert trip is not None and (trip.name, trip.value, trip.limit) == ("max_drop_pct", 51.0, 50)
    first = evaluate(limits, Measured(records=0, previous_records=None))
    assert first.passed and "first run" in first.notes[0]
    assert evaluate(limits, Measured(records=0, previous_records=0)).passed  # nothing to drop from


def test_max_erroneous_tasks_pct_needs_both_counters() -> None:
    """erroneous/num above P% trips; unknown counters (None, 0 tasks) give no verdict, with a note."""
    limits = Limits(max_erroneous_tasks_pct=1)
    assert evaluate(limits, Measured(records=1, erroneous_tasks=10, num_tasks=1000)).passed
    trip = evaluate(limits, Measured(records=1, erroneous_tasks=11, num_tasks=1000)).trip
    assert trip is not None and (trip.reason, trip.value) == ("too_many_erroneous_tasks", 1.1)
    for erroneous, total in ((None, 1000), (5, None), (5, 0)):
        verdict = evaluate(limits, Measured(records=1, erroneous_tasks=erroneous, num_tasks=total))
        assert verdict.passed and "no verdict" in verdict.notes[0]


def test_max_invalid_lines_and_the_order_of_guards() -> None:
    """max_invalid_lines trips above N; when several trip, the first in the documented order wins."""
    assert evaluate(Limits(max_invalid_lines=2), Measured(records=5, invalid_lines=2)).passed
    both = evaluate(Limits(min_records=10, max_invalid_lines=0), Measured(records=5, invalid_lines=3))
    assert both.trip is not None and both.trip.name == "min_records"
    only = evaluate(Limits(max_invalid_lines=0), Measured(records=5, invalid_lines=3))
    assert only.trip is not None and only.trip.reason == "too_many_invalid_lines"


def test_committed_name_rejects_unless_keep() -> None:
    """reject commits NAME.ndjson[.gz].rejected; keep and a pass commit under the final name."""
    tripped = evaluate(Limits(min_records=1), Measured(records=0))
    assert committed_name("a.ndjson.gz", Limits(min_records=1), tripped) == "a.ndjson.gz.rejected"
    assert committed_name("a.ndjson", Limits(min_records=1, on_guard_failure="keep"), tripped) is None
    assert committed_name("a.ndjson", Limits(), evaluate(Limits(), Measured(records=0))) is None


# -- pure: earlier runs ------------------------------------------------------------------------
def _plant(folder: Path, jobs: list[dict[str, Any]]) -> None:
    folder.mkdir(parents=True)
    doc = {"version": 1, "run_id": "r", "started_at": "2026-01-01T00:00:00Z", "status": "FAILED", "jobs": jobs}
    (folder / "manifest.json").write_bytes(orjson.dumps(doc))


def test_earlier_run_folders_are_dated_siblings_newest_first(tmp_path: Path) -> None:
    """Only folders the template makes, dated before this run's, newest first, with the tail kept."""
    for name in ("2026-01-01", "2026-01-03", "2026-01-05", "2026-01-04-copy", "notes"):
        (tmp_path / name).mkdir()
    here = tmp_path / "2026-01-04" / "shard-0-of-2"
    found = earlier_run_folders(here, str(tmp_path / "{date}"))
    assert found == [tmp_path / "2026-01-03" / "shard-0-of-2", tmp_path / "2026-01-01" / "shard-0-of-2"]
    assert earlier_run_folders(tmp_path / "fixed", str(tmp_path / "fixed")) == []


def test_history_skips_runs_where_the_job_did_not_succeed(tmp_path: Path) -> None:
    """The last SUCCEEDED run is found past a newer run that failed the job; this folder's comes first."""
    ok = {"name": "a", "status": "SUCCEEDED", "records": 7, "started_at": "2026-01-01T00:00:00Z"}
    ok["finished_at"] = "2026-01-01T00:10:00Z"
    _plant(tmp_path / "2026-01-01", [ok])
    _plant(tmp_path / "2026-01-02", [{"name": "a", "status": "FAILED", "records": None}])
    history = RunHistory.local(tmp_path / "2026-01-03", str(tmp_path / "{date}"), {})
    assert previous_records(history, "a") == (7, str(tmp_path / "2026-01-01"))
    assert expected_duration_s(history, "a", 7200) == (600.0, "its last SUCCEEDED run")
    assert expected_duration_s(history, "b", 7200) == (7200, "its timeout_s")
    mine = Past("SUCCEEDED", 3, None, None, "1", "1", None, "this output folder")
    assert previous_records(RunHistory({"a": mine}, history.folders, history._load), "a") == (3, "this output folder")


# -- end to end --------------------------------------------------------------------------------
BIG, SMALL, BAD, ERRONEOUS = "801", "802", "803", "804"


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorThread]:
    """Four fast exports: a big one, a small one, one with invalid lines, one with erroneous tasks."""
    specs = (
        fast_spec(BIG, size_bytes=40_000),
        fast_spec(SMALL, size_bytes=4_000),
        fast_spec(BAD, invalid_every=10),
        fast_spec(ERRONEOUS, erroneous_tasks=50, num_tasks=1000),
    )
    with SimulatorThread(sim_config(*specs, token=TOKEN)) as thread:
        yield thread


def _sha256(path: Path) -> str:
    """The uncompressed content's sha256 of an output, rejected or not (.gz recognised inside the name)."""
    if path.name.endswith(".gz.rejected"):
        return hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()
    return content_sha256(path)


def _run(sim: SimulatorThread, jobs_file: Path, *args: str) -> tuple[int, str, dict[str, dict[str, Any]]]:
    proc = cli_in_process(
        "run", str(jobs_file), "--progress", "off", "--workers", "0", *args, env=cli_env(sim.url, TOKEN)
    )
    assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr
    out = jobs_file.parent / "out"
    if "--output-dir" in args:
        today = dt.datetime.now(dt.UTC).date().isoformat()
        out = Path(args[args.index("--output-dir") + 1].replace("{date}", today))
    return proc.returncode, proc.stderr, jobs_by_name(manifest(out))


def test_each_guard_trips_and_rejects_the_file(sim: SimulatorThread, tmp_path: Path) -> None:
    """Every guard fails its job (exit 1): the file is NAME.ndjson[.gz].rejected, its final name is
    absent, and the manifest names guard, value and limit; keep commits the final name, still FAILED."""
    jobs = [
        {"name": "few", "export_id": BIG, "min_records": 10**9},
        {"name": "few-gz", "export_id": BIG, "min_records": 10**9, "compression": "gzip"},
        {"name": "kept", "export_id": BIG, "min_records": 10**9, "on_guard_failure": "keep"},
        {"name": "invalid", "export_id": BAD, "max_invalid_lines": 0},
        {"name": "erroneous", "export_id": ERRONEOUS, "max_erroneous_tasks_pct": 1},
        {"name": "fine", "export_id": BIG, "min_records": 1, "max_invalid_lines": 0, "max_erroneous_tasks_pct": 0},
    ]
    code, stderr, entries = _run(sim, write_jobs(tmp_path, jobs))
    out = tmp_path / "out"
    assert code == 1, stderr
    expected = {
        "few": ("min_records", "too_few_records", "few.ndjson.rejected"),
        "few-gz": ("min_records", "too_few_records", "few-gz.ndjson.gz.rejected"),
        "invalid": ("max_invalid_lines", "too_many_invalid_lines", "invalid.ndjson.rejected"),
        "erroneous": ("max_erroneous_tasks_pct", "too_many_erroneous_tasks", "erroneous.ndjson.rejected"),
        "kept": ("min_records", "too_few_records", "kept.ndjson"),
    }
    for name, (guard, reason, path) in expected.items():
        entry = entries[name]
        assert entry["status"] == "FAILED", entry
        assert entry["guard"]["name"] == guard and entry["guard"]["reason"] == reason, entry
        assert entry["error"].startswith(reason + ": "), entry
        assert entry["path"] == path and (out / path).is_file()
        assert _sha256(out / path) == entry["sha256"]  # the whole file, whatever its name
        if path.endswith(".rejected"):
            assert not (out / path.removesuffix(".rejected")).exists(), f"{name}: the final name must stay absent"
    assert entries["erroneous"]["guard"]["value"] == 5.0 and entries["erroneous"]["guard"]["limit"] == 1
    assert entries["invalid"]["guard"]["value"] == entries["invalid"]["invalid_lines"] > 0
    assert entries["few"]["guard"]["value"] == entries["few"]["records"]
    assert entries["fine"]["status"] == "SUCCEEDED" and entries["fine"]["guard"] is None
    assert "FAILED by a guard: too_few_records" in stderr


def test_rejected_job_is_rerun_with_a_new_execution(sim: SimulatorThread, tmp_path: Path) -> None:
    """A rerun after a rejection creates a new execution (fresh data), and a pass then commits the final name."""
    jobs_file = write_jobs(tmp_path, [{"name": "few", "export_id": SMALL, "min_records": 10**9}])
    before = sim.stats.executions_created[SMALL]
    assert _run(sim, jobs_file)[0] == 1
    jobs_file = write_jobs(tmp_path, [{"name": "few", "export_id": SMALL, "min_records": 1}])
    code, stderr, entries = _run(sim, jobs_file)
    assert code == 0, stderr
    assert sim.stats.executions_created[SMALL] == before + 2
    assert entries["few"]["guard"] is None and (tmp_path / "out" / "few.ndjson").is_file()


def test_max_drop_pct_against_the_previous_days_folder(sim: SimulatorThread, tmp_path: Path) -> None:
    """The first run passes with a note; the next day's run of the same job compares with it: a big
    drop fails (previous_records recorded), a tolerated one passes."""
    runs = tmp_path / "runs"
    yesterday = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()
    jobs_file = write_jobs(tmp_path, [{"name": "j", "export_id": BIG, "max_drop_pct": 50}])
    code, stderr, first = _run(sim, jobs_file, "--output-dir", str(runs / yesterday))
    assert code == 0, stderr
    assert first["j"]["previous_records"] is None and "first run" in first["j"]["note"]
    big = first["j"]["records"]

    jobs_file = write_jobs(tmp_path, [{"name": "j", "export_id": SMALL, "max_drop_pct": 50}])
    code, stderr, today = _run(sim, jobs_file, "--output-dir", str(runs / "{date}"))
    out = runs / dt.datetime.now(dt.UTC).date().isoformat()
    assert code == 1, stderr
    entry = today["j"]
    assert entry["status"] == "FAILED" and entry["previous_records"] == big
    assert entry["guard"]["name"] == "max_drop_pct" and entry["guard"]["limit"] == 50
    assert entry["guard"]["value"] == round((big - entry["records"]) * 100 / big, 2) > 50
    assert (out / "j.ndjson.rejected").is_file() and not (out / "j.ndjson").exists()

    jobs_file = write_jobs(tmp_path, [{"name": "j", "export_id": SMALL, "max_drop_pct": 99}])
    code, stderr, again = _run(sim, jobs_file, "--output-dir", str(runs / "{date}"))
    assert code == 0, stderr
    assert again["j"]["previous_records"] == big and again["j"]["guard"] is None
    assert (out / "j.ndjson").is_file()


def test_a_rejected_file_never_leaves_an_earlier_one_under_the_final_name(sim: SimulatorThread, tmp_path: Path) -> None:
    """The job points at another export and its new file is rejected: the earlier file under the final name goes too."""
    jobs_file = write_jobs(tmp_path, [{"name": "j", "export_id": BIG}])
    code, stderr, _ = _run(sim, jobs_file)
    assert code == 0, stderr
    out = tmp_path / "out"
    assert (out / "j.ndjson").is_file()
    jobs_file = write_jobs(tmp_path, [{"name": "j", "export_id": SMALL, "min_records": 10**9}])
    code, stderr, entries = _run(sim, jobs_file)
    assert code == 1 and entries["j"]["status"] == "FAILED" and entries["j"]["guard"]["name"] == "min_records"
    assert (out / "j.ndjson.rejected").is_file()
    assert not (out / "j.ndjson").exists()
    assert "removed the earlier j.ndjson" in stderr
