"""Without the ``cloud`` extra, a bucket output is one clear line before anything is sent."""

from __future__ import annotations

import sys

import pytest

from orchestrator.config import parse_job_file
from orchestrator.errors import UsageError


def test_a_bucket_output_without_obstore_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """s3:// output with obstore not installed: a UsageError naming `pip install 'mics-export[cloud]'`."""
    monkeypatch.setitem(sys.modules, "obstore", None)  # what an install without the extra looks like
    job_file = parse_job_file({"version": 1, "jobs": [{"name": "a", "export_id": "1"}]}, "jobs.yaml")
    with pytest.raises(UsageError, match=r"needs the cloud extra: pip install 'mics-export\[cloud\]'"):
        job_file.output_dir("s3://bucket/exports/{date}")


def test_a_bucket_output_with_obstore_is_kept_as_a_url() -> None:
    """With the extra installed, the same URL is returned as a string with its date resolved."""
    pytest.importorskip("obstore")  # the test extra installs it; a bare install skips
    job_file = parse_job_file({"version": 1, "jobs": [{"name": "a", "export_id": "1"}]}, "jobs.yaml")
    assert job_file.output_dir("s3://bucket/exports/x") == "s3://bucket/exports/x"
