"""The job file: defaults merged, ids normalised, dates resolved, errors located."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import load_job_file, parse_job_file
from orchestrator.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "jobs.yaml.example"


def test_example_file_loads_with_defaults_merged() -> None:
    """The shipped example validates; every job inherits defaults and may override them."""
    job_file = load_job_file(EXAMPLE)
    jobs = {j.name: j for j in job_file.jobs}
    assert jobs["visitors"].timeout_s == 600
    assert jobs["fb-adwords-segments"].timeout_s == 7200
    assert jobs["visitors"].export_id == "9872"  # written as a number, kept as the API's string
    assert jobs["daily-profiles"].compression == "zstd"
    assert jobs["active-emails"].query is not None and jobs["active-emails"].export_id is None
    assert all(j.organisation_id == "1426" for j in job_file.jobs)


def test_output_dir_resolves_the_utc_date() -> None:
    """{date} in output_dir (or --output-dir) is the run's UTC date."""
    job_file = parse_job_file({"version": 1, "jobs": [{"name": "a", "export_id": 1}]}, "f.yaml")
    assert job_file.output_dir(today=dt.date(2026, 11, 28)) == Path("exports/2026-11-28")
    assert job_file.output_dir("/data/{date}/x", today=dt.date(2026, 1, 2)) == Path("/data/2026-01-02/x")


def test_error_names_file_job_and_key() -> None:
    """A bad value in a job says which file, which job and which key."""
    data = {"version": 1, "jobs": [{"name": "ok", "export_id": "1"}, {"name": "bad", "export_id": "2", "retries": -1}]}
    with pytest.raises(ConfigError, match=r"^jobs\.yaml: job 'bad': retries: must be at least 0$"):
        parse_job_file(data, "jobs.yaml")


def test_defaults_errors_are_located_in_defaults() -> None:
    """A bad default is reported under defaults, not under every job."""
    data = {"version": 1, "defaults": {"timeout_s": 0}, "jobs": [{"name": "a", "export_id": "1"}]}
    with pytest.raises(ConfigError, match=r"defaults\.timeout_s: must be greater than 0"):
        parse_job_file(data, "j.yaml")


def test_query_job_needs_an_organisation() -> None:
    """A query job cannot find or create its export without an organisation id."""
    data = {"version": 1, "jobs": [{"name": "q", "query": {"datamart_id": 1509, "text": "SELECT {id} FROM UserPoint"}}]}
    with pytest.raises(ConfigError, match="organisation_id"):
        parse_job_file(data, "j.yaml")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A job file that does not exist is a one-line usage error."""
    with pytest.raises(ConfigError, match="no such file"):
        load_job_file(tmp_path / "nope.yaml")


def test_select_only_keeps_file_order() -> None:
    """--only keeps the job file's order and rejects unknown names."""
    data = {"version": 1, "jobs": [{"name": n, "export_id": "1"} for n in ("a", "b", "c")]}
    job_file = parse_job_file(data, "j.yaml")
    assert [j.name for j in job_file.select(("c", "a"))] == ["a", "c"]
    with pytest.raises(ConfigError, match="zz"):
        job_file.select(("zz",))


@pytest.mark.parametrize("section", ["defaults", "api", "run"])
def test_an_unknown_key_with_a_newline_is_named_on_one_line(section: str) -> None:
    """An unknown key holding a newline (found by hypothesis) is quoted and escaped: the error stays one line."""
    data: dict[str, Any] = {"version": 1, "jobs": [{"name": "a", "export_id": "1"}], section: {"x\ny": 1}}
    with pytest.raises(ConfigError) as caught:
        parse_job_file(data, "j.yaml")
    assert str(caught.value) == f"j.yaml: {section}.'x\\ny': unknown key"
