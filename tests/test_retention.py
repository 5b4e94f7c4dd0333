"""Retention (`run.keep_days`): old `{date}` run folders go after a run that SUCCEEDED, nothing else does."""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
from pathlib import Path

import pytest
import yaml
from support import TOKEN, cli_env, cli_in_process, write_jobs

from orchestrator.config import utc_today
from orchestrator.retention import dated_folders, prune
from orchestrator.simulator import ExportSpec, SimulatorConfig, SimulatorThread


def _day(days_ago: int) -> str:
    return (utc_today() - dt.timedelta(days=days_ago)).isoformat()


def _plant(folder: Path) -> Path:
    """A run folder with a file in it."""
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    return folder


def _jobs(tmp_path: Path, specs: list[dict[str, object]], keep_days: int) -> Path:
    """A job file writing into tmp_path/out/{date} and keeping ``keep_days`` days."""
    path = write_jobs(tmp_path, specs)
    doc = yaml.safe_load(path.read_text())
    doc["run"].update(output_dir=str(tmp_path / "out" / "{date}"), keep_days=keep_days)
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_successful_run_deletes_only_old_date_folders(tmp_path: Path) -> None:
    """Dated folders older than keep_days go (each logged); newer ones, other names, files and symlinks stay."""
    out = tmp_path / "out"
    old, older, kept, recent = (_plant(out / _day(n)) for n in (4, 30, 3, 1))
    other = _plant(out / "notes")
    bad_date = _plant(out / "2020-13-45")
    elsewhere = _plant(tmp_path / "elsewhere")
    (out / "2020-01-02").symlink_to(elsewhere, target_is_directory=True)  # an old date, but a link
    (out / "2020-01-03").write_text("a file, not a folder")
    with SimulatorThread(
        SimulatorConfig(token=TOKEN, exports=(ExportSpec("1", pending_s=0.01, running_s=0.01),))
    ) as sim:
        path = _jobs(tmp_path, [{"name": "a", "export_id": "1"}], keep_days=3)
        done = cli_in_process("run", str(path), env=cli_env(sim.url))
    assert done.returncode == 0, done.stderr
    assert not old.exists() and not older.exists()
    assert kept.is_dir() and recent.is_dir() and other.is_dir() and bad_date.is_dir()
    assert (out / _day(0) / "a.ndjson").is_file()  # this run's folder
    assert (out / "2020-01-02").is_symlink() and (elsewhere / "manifest.json").is_file()
    assert (out / "2020-01-03").is_file()
    assert done.stderr.count("deleted run folder") == 2
    assert f"deleted run folder {old}" in done.stderr


def test_a_failed_run_deletes_nothing(tmp_path: Path) -> None:
    """After a run that did not succeed every earlier night is kept."""
    old = _plant(tmp_path / "out" / _day(40))
    spec = ExportSpec("1", always_fail=True, pending_s=0.01, running_s=0.01)
    with SimulatorThread(SimulatorConfig(token=TOKEN, exports=(spec,))) as sim:
        path = _jobs(tmp_path, [{"name": "a", "export_id": "1", "retries": 0}], keep_days=1)
        done = cli_in_process("run", str(path), env=cli_env(sim.url))
    assert done.returncode == 1
    assert old.is_dir() and "deleted run folder" not in done.stderr


def test_dated_folders_come_from_the_template() -> None:
    """The output root is the parent of the component holding {date}; the name pattern is that component."""
    shards = dated_folders("/data/{date}/shard-$(I)")
    assert shards is not None and shards.root == Path("/data")
    assert shards.name.fullmatch("2026-11-28") and not shards.name.fullmatch("2026-11-28-x")
    prefixed = dated_folders("exports/run-{date}")
    assert prefixed is not None and prefixed.root == Path("exports")
    assert prefixed.name.fullmatch("run-2026-11-28") and not prefixed.name.fullmatch("2026-11-28")
    twice = dated_folders("out/{date}_{date}")
    assert twice is not None and twice.name.fullmatch("2026-11-28_2026-11-28")
    assert not twice.name.fullmatch("2026-11-28_2026-11-27")
    assert dated_folders("/data/nightly") is None


def test_without_date_in_the_template_nothing_is_deleted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A fixed output folder has no dated siblings to prune: a warning, and nothing deleted."""
    old = _plant(tmp_path / "2020-01-01")
    with caplog.at_level(logging.WARNING, logger="orchestrator.retention"):
        assert prune(str(tmp_path / "fixed"), 1, dt.date(2026, 11, 28), tmp_path / "fixed") == []
    assert old.is_dir() and "has no {date}" in caplog.text


def test_a_folder_in_use_by_another_run_is_kept(tmp_path: Path) -> None:
    """An old folder whose .lock another run holds (a rerun of that night) is not deleted."""
    busy, idle = _plant(tmp_path / "2020-01-01"), _plant(tmp_path / "2020-01-02")
    (idle / ".lock").touch()
    fd = os.open(busy / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        today = dt.date(2026, 11, 28)
        deleted = prune(str(tmp_path / "{date}"), 7, today, tmp_path / today.isoformat())
    finally:
        os.close(fd)
    assert deleted == [idle] and busy.is_dir() and not idle.exists()


def test_the_current_folder_is_never_deleted(tmp_path: Path) -> None:
    """Even when its date is old (a rerun of an old night), the current run's folder stays."""
    current = _plant(tmp_path / "2020-01-01" / "shard-0-of-2")
    deleted = prune(str(tmp_path / "{date}" / "shard-0-of-2"), 7, dt.date(2026, 11, 28), current)
    assert deleted == [] and current.is_dir()
