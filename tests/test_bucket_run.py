"""Runs into a bucket (issue 12): the CLI against the simulator, writing to moto (S3) and azurite (Azure).

Every test runs ``mics-export`` with the standard cloud environment the fixtures set, and
looks at the bucket behind obstore's back (boto3, azurite's REST API). The runs that a signal
or kill -9 stops, and ``download -o -`` writing to a real stdout, are subprocesses; the rest
call the CLI's ``main()`` in this process (:func:`support.cli_in_process`: the same code, exit
code and stderr).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import signal
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from cloud import (
    AzureContainer,
    S3Bucket,
    azure_fixture,
    azure_request,
    azurite_fixture,
    moto_server_fixture,
    s3_fixture,
)
from support import TOKEN, cli_env, cli_in_process, start_cli, wait_for, write_jobs

from orchestrator.config import load_job_file
from orchestrator.simulator import ExportSpec, Faults, SimulatorConfig, SimulatorThread

__all__ = ["azure_fixture", "azurite_fixture", "moto_server_fixture", "s3_fixture"]

MIB = 1 << 20

pytestmark = pytest.mark.xdist_group("cloud")  # one moto/azurite per run, shared with test_objstore


def _sim(*specs: ExportSpec, **faults: Any) -> SimulatorThread:
    return SimulatorThread(SimulatorConfig(token=TOKEN, exports=specs, faults=Faults(**faults)))


def _jobs(folder: Path, output: str, jobs: list[dict[str, Any]], name: str = "jobs.yaml") -> Path:
    return write_jobs(folder, jobs, output=output, concurrency=4, name=name)


def _keys(s3: S3Bucket) -> list[str]:
    answer = s3.client.list_objects_v2(Bucket=s3.bucket)
    return sorted(o["Key"] for o in answer.get("Contents", []))


def _entries(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {j["name"]: j for j in doc["jobs"]}


def _assert_exact(data: bytes | None, entry: dict[str, Any], spec: ExportSpec, gz: bool = False) -> None:
    """The object holds exactly what the simulator served, as the manifest says."""
    assert data is not None
    content = gzip.decompress(data) if gz else data
    result = spec.result()
    assert hashlib.sha256(content).hexdigest() == result.sha256() == entry["sha256"]
    assert entry["bytes"] == result.size == len(content)
    assert entry["records"] == result.records
    assert entry["status"] == "SUCCEEDED"
    assert entry["object_size"] == len(data) and entry["etag"]


def _stop(proc: subprocess.Popen[str], sig: signal.Signals) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=30)


def test_run_to_s3_is_byte_exact_and_a_rerun_skips_without_downloading(s3: S3Bucket, tmp_path: Path) -> None:
    """Outputs land byte-exact in S3 with the manifest beside them; a rerun HEADs them and downloads nothing."""
    plain = ExportSpec("1", size_bytes=3 * MIB + 123, pending_s=0.01, running_s=0.02)
    packed = ExportSpec("2", size_bytes=300_000, pending_s=0.01, running_s=0.02, seed=2, invalid_every=500)
    jobs = [{"name": "plain", "export_id": "1"}, {"name": "packed", "export_id": "2", "compression": "gzip"}]
    with _sim(plain, packed) as sim:
        path = _jobs(tmp_path, f"s3://{s3.bucket}/nightly/{{date}}", jobs)
        proc = cli_in_process("run", str(path), env=cli_env(sim.url))
        assert proc.returncode == 0, proc.stderr
        prefix = f"nightly/{datetime.now(UTC).date().isoformat()}"
        doc = s3.manifest(prefix)
        assert doc is not None and doc["status"] == "SUCCEEDED"
        entries = _entries(doc)
        _assert_exact(s3.get(f"{prefix}/plain.ndjson"), entries["plain"], plain)
        _assert_exact(s3.get(f"{prefix}/packed.ndjson.gz"), entries["packed"], packed, gz=True)
        assert entries["packed"]["invalid_lines"] == packed.result().invalid_lines > 0
        assert _keys(s3) == sorted(f"{prefix}/{n}" for n in ("manifest.json", "plain.ndjson", "packed.ndjson.gz"))
        assert s3.pending_uploads() == []
        downloads = sum(sim.stats.downloads_started.values())
        created = sum(sim.stats.executions_created.values())

        again = cli_in_process("run", str(path), env=cli_env(sim.url))
        assert again.returncode == 0, again.stderr
        assert sum(sim.stats.downloads_started.values()) == downloads == 2
        assert sum(sim.stats.executions_created.values()) == created == 2
        assert "skipped" in again.stderr

        # An object replaced behind the run's back (new ETag) is fetched again, from the same execution.
        s3.client.put_object(Bucket=s3.bucket, Key=f"{prefix}/plain.ndjson", Body=b"{}\n")
        third = cli_in_process("run", str(path), env=cli_env(sim.url))
        assert third.returncode == 0, third.stderr
        assert sum(sim.stats.downloads_started.values()) == downloads + 1
        assert sum(sim.stats.executions_created.values()) == created
    _assert_exact(s3.get(f"{prefix}/plain.ndjson"), _entries(s3.manifest(prefix) or {})["plain"], plain)


def test_run_to_azure_is_byte_exact(azure: AzureContainer, tmp_path: Path) -> None:
    """The same run into azurite: the blob and the manifest are there, exact, and a rerun skips."""
    spec = ExportSpec("1", size_bytes=2 * MIB + 7, pending_s=0.01, running_s=0.02)
    with _sim(spec) as sim:
        path = _jobs(tmp_path, f"az://{azure.container}/out", [{"name": "a", "export_id": "1", "compression": "zstd"}])
        proc = cli_in_process("run", str(path), env=cli_env(sim.url))
        assert proc.returncode == 0, proc.stderr
        status, body = azure_request(azure.base, "GET", f"/{azure.container}/out/manifest.json")
        assert status == 200
        entry = _entries(json.loads(body))["a"]
        status, data = azure_request(azure.base, "GET", f"/{azure.container}/out/a.ndjson.zst")
        assert status == 200
        import zstandard

        content = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        assert hashlib.sha256(content).hexdigest() == spec.result().sha256() == entry["sha256"]
        assert entry["object_size"] == len(data)
        assert azure_request(azure.base, "GET", f"/{azure.container}/out/.lock")[0] == 404  # released
        again = cli_in_process("run", str(path), env=cli_env(sim.url))
        assert again.returncode == 0, again.stderr
        assert sum(sim.stats.downloads_started.values()) == 1


def test_slow_upload_is_invisible_contended_and_aborted_by_sigterm(s3: S3Bucket, tmp_path: Path) -> None:
    """No final key while an upload runs; a second run is refused (exit 2); SIGTERM leaves no object or upload."""
    spec = ExportSpec("1", size_bytes=12 * MIB, pending_s=0.01, running_s=0.02)
    with _sim(spec, slow_body_bps=4 * MIB) as sim:
        path = _jobs(tmp_path, f"s3://{s3.bucket}/p", [{"name": "a", "export_id": "1"}])
        proc = start_cli("run", str(path), env=cli_env(sim.url))
        try:
            wait_for(s3.pending_uploads, timeout=30, what="a multipart upload in progress")
            assert s3.get("p/a.ndjson") is None  # not visible while it is written
            second = cli_in_process("run", str(path), env=cli_env(sim.url))
            assert second.returncode == 2
            line = second.stderr.strip()
            assert "\n" not in line and "p/.lock is held by run" in line and "delete" in line, line
            code = _stop(proc, signal.SIGTERM)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert sum(sim.stats.executions_created.values()) == 1  # the refused run created nothing
    assert code == 143, proc.stderr.read() if proc.stderr else ""
    assert s3.get("p/a.ndjson") is None
    assert s3.pending_uploads() == []
    assert s3.get("p/.lock") is None  # released on SIGTERM
    doc = s3.manifest("p")
    assert doc is not None and doc["status"] == "INTERRUPTED" and doc["exit_code"] == 143


def test_kill_9_then_rerun_adopts_the_execution_and_restarts_the_upload(s3: S3Bucket, tmp_path: Path) -> None:
    """After kill -9 mid-upload the rerun takes the stale lock over, adopts the execution, writes the exact object."""
    spec = ExportSpec("1", size_bytes=12 * MIB, pending_s=0.01, running_s=0.02)
    with _sim(spec, slow_body_bps=6 * MIB) as sim:
        path = _jobs(tmp_path, f"s3://{s3.bucket}/k", [{"name": "a", "export_id": "1"}])
        env = cli_env(sim.url, MICS_BUCKET_LOCK_LEASE_S="2")
        proc = start_cli("run", str(path), env=env)
        try:
            wait_for(s3.pending_uploads, timeout=30, what="a multipart upload in progress")
        finally:
            proc.kill()
            proc.wait(timeout=10)
        assert s3.get("k/a.ndjson") is None

        def lease_over() -> bool:
            head = s3.client.head_object(Bucket=s3.bucket, Key="k/.lock")
            return bool((datetime.now(UTC) - head["LastModified"]).total_seconds() > 2.5)

        wait_for(lease_over, timeout=10, what="the dead run's lease to run out")
        again = cli_in_process("run", str(path), env=env)
        assert again.returncode == 0, again.stderr
        assert "took over the stale lock" in again.stderr
        assert sim.stats.executions_created["1"] == 1
    doc = s3.manifest("k")
    assert doc is not None
    _assert_exact(s3.get("k/a.ndjson"), _entries(doc)["a"], spec)
    # The killed run's upload stays pending: the bucket lifecycle rule cleans it (README).
    assert s3.pending_uploads() == ["k/a.ndjson"]


def test_a_stale_lock_is_taken_over(s3: S3Bucket, tmp_path: Path) -> None:
    """A lock whose lease ran out (a dead run's) is taken over, and the run says so."""
    s3.client.put_object(
        Bucket=s3.bucket, Key="s/.lock", Body=json.dumps({"run_id": "dead-run", "lease_s": 0.001}).encode()
    )
    spec = ExportSpec("1", size_bytes=1000, pending_s=0.01, running_s=0.02)
    with _sim(spec) as sim:
        path = _jobs(tmp_path, f"s3://{s3.bucket}/s", [{"name": "a", "export_id": "1"}])
        proc = cli_in_process("run", str(path), env=cli_env(sim.url))
    assert proc.returncode == 0, proc.stderr
    assert "took over the stale lock" in proc.stderr and "dead-run" in proc.stderr
    assert s3.get("s/.lock") is None


@pytest.mark.parametrize("case", ["missing-bucket", "access-denied", "no-credentials"])
def test_an_unusable_bucket_fails_before_any_execution(
    case: str, s3: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing bucket, a refused or absent credential: exit 2, one line, and no execution created."""
    bucket = s3.bucket
    if case == "missing-bucket":
        bucket = "no-such-bucket-here"
    elif case == "access-denied":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    else:
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    spec = ExportSpec("1", size_bytes=1000, pending_s=0.01, running_s=0.02)
    with _sim(spec) as sim:
        path = _jobs(tmp_path, f"s3://{bucket}/x", [{"name": "a", "export_id": "1"}])
        proc = cli_in_process("run", str(path), env=cli_env(sim.url))
        created = sum(sim.stats.executions_created.values())
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, proc.stderr
    expected = {
        "missing-bucket": "the bucket does not exist",
        "access-denied": "access denied",
        "no-credentials": "no credentials found",
    }[case]
    assert expected in lines[0] and "Traceback" not in proc.stderr
    assert "wrong-secret" not in proc.stderr
    assert created == 0


def test_download_command_to_stdout_gzip_file_and_bucket(s3: S3Bucket, tmp_path: Path) -> None:
    """`download -o -` streams the exact bytes to stdout (summary on stderr); `-o x.gz` gzips; `-o s3://` uploads."""
    spec = ExportSpec("1", size_bytes=500_000, pending_s=0.0, running_s=0.0)
    result = spec.result()
    with _sim(spec) as sim:
        path = _jobs(tmp_path, str(tmp_path / "out"), [{"name": "a", "export_id": "1"}])
        assert cli_in_process("run", str(path), env=cli_env(sim.url)).returncode == 0
        execution = json.loads((tmp_path / "out" / "manifest.json").read_bytes())["jobs"][0]["execution_id"]
        env = cli_env(sim.url)
        to_stdout = subprocess.run(
            [*_cli(), "download", "1", execution, "-o", "-"], env=env, capture_output=True, timeout=60
        )
        assert to_stdout.returncode == 0, to_stdout.stderr
        assert hashlib.sha256(to_stdout.stdout).hexdigest() == result.sha256()
        assert result.sha256() in to_stdout.stderr.decode()

        gz = cli_in_process("download", "1", execution, "-o", str(tmp_path / "x.ndjson.gz"), env=env)
        assert gz.returncode == 0, gz.stderr
        assert hashlib.sha256(gzip.decompress((tmp_path / "x.ndjson.gz").read_bytes())).hexdigest() == result.sha256()

        refused = cli_in_process("download", "1", execution, "-o", str(tmp_path / "x.ndjson.gz.zst"), env=env)
        assert refused.returncode == 2 and "unsupported compression suffix" in refused.stderr

        up = cli_in_process("download", "1", execution, "-o", f"s3://{s3.bucket}/ops/a.ndjson", env=env)
        assert up.returncode == 0, up.stderr
    assert hashlib.sha256(s3.get("ops/a.ndjson") or b"").hexdigest() == result.sha256()
    assert s3.pending_uploads() == []


def test_status_reads_the_manifest_from_the_bucket(s3: S3Bucket, tmp_path: Path) -> None:
    """`status s3://...` reads the manifest from the bucket; a --shard run writes PREFIX/shard-I-of-N/."""
    spec = ExportSpec("1", size_bytes=1000, pending_s=0.01, running_s=0.02)
    with _sim(spec) as sim:
        path = _jobs(tmp_path, f"s3://{s3.bucket}/st", [{"name": "a", "export_id": "1"}])
        assert cli_in_process("run", str(path), env=cli_env(sim.url)).returncode == 0
        # A shard writes its own prefix, as it writes its own folder locally.
        sharded = cli_in_process("run", str(path), "--shard", "0/1", env=cli_env(sim.url))
        assert sharded.returncode == 0, sharded.stderr
    assert s3.manifest("st/shard-0-of-1") is not None
    proc = cli_in_process("status", f"s3://{s3.bucket}/st", "--json", env=cli_env())
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["status"] == "SUCCEEDED" and doc["manifest"] == f"s3://{s3.bucket}/st/manifest.json"
    missing = cli_in_process("status", f"s3://{s3.bucket}/nothing-here", env=cli_env())
    assert missing.returncode == 2 and "no manifest.json" in missing.stderr


def test_bucket_urls_are_parsed_from_the_job_file(tmp_path: Path) -> None:
    """s3://, gs://, az:// and abfs:// output_dir values resolve {date} and stay URLs (GCS: parsing only)."""
    import datetime as dt

    from orchestrator.errors import UsageError
    from orchestrator.objstore import parse_location

    path = _jobs(tmp_path, "gs://my-bucket/exports/{date}", [{"name": "a", "export_id": "1"}])
    job_file = load_job_file(path)
    assert job_file.output_dir(today=dt.date(2026, 1, 2)) == "gs://my-bucket/exports/2026-01-02"
    assert job_file.output_dir("abfs://exports@acct.dfs.core.windows.net/x", dt.date(2026, 1, 2)) == (
        "abfs://exports@acct.dfs.core.windows.net/x"
    )
    loc = parse_location("gs://my-bucket/exports/2026-01-02")
    assert (loc.scheme, loc.bucket, loc.key("manifest.json")) == ("gs", "my-bucket", "exports/2026-01-02/manifest.json")
    with pytest.raises(UsageError, match="unsupported storage URL scheme"):
        job_file.output_dir("s3a://b/x")


def _cli() -> list[str]:
    import sys

    return [sys.executable, "-m", "orchestrator"]


def test_keep_days_deletes_only_old_dated_prefixes_in_the_bucket(s3: S3Bucket, tmp_path: Path) -> None:
    """run.keep_days in a bucket: old {date} prefixes go after a successful run; newer, other and locked
    ones (a shard's lock too) stay."""
    import datetime as dt

    today = dt.datetime.now(dt.UTC).date()
    old = (today - dt.timedelta(days=30)).isoformat()
    recent = (today - dt.timedelta(days=2)).isoformat()
    planted = {
        f"exports/{old}/a.ndjson": b"{}\n",
        f"exports/{old}/manifest.json": b"{}",
        f"exports/{recent}/a.ndjson": b"{}\n",
        "exports/not-a-date/a.ndjson": b"{}\n",
        "exports/2026-13-45/a.ndjson": b"{}\n",
        f"other/{old}/a.ndjson": b"{}\n",
    }
    locked_old = (today - dt.timedelta(days=40)).isoformat()
    lease = json.dumps({"run_id": "x", "lease_s": 3600}).encode()
    planted[f"exports/{locked_old}/.lock"] = lease
    shard_locked_old = (today - dt.timedelta(days=50)).isoformat()
    planted[f"exports/{shard_locked_old}/shard-0-of-2/.lock"] = lease
    for key, body in planted.items():
        s3.client.put_object(Bucket=s3.bucket, Key=key, Body=body)
    spec = ExportSpec("1", size_bytes=2_000, pending_s=0.01, running_s=0.02)
    with _sim(spec) as sim:
        path = _jobs(tmp_path, f"s3://{s3.bucket}/exports/{{date}}", [{"name": "a", "export_id": "1"}])
        doc = yaml.safe_load(path.read_text())
        doc["run"]["keep_days"] = 7
        path.write_text(yaml.safe_dump(doc))
        done = cli_in_process("run", str(path), env=cli_env(sim.url))
    assert done.returncode == 0, done.stderr
    keys = _keys(s3)
    assert not [k for k in keys if k.startswith(f"exports/{old}/")]
    for kept in (
        f"exports/{recent}/a.ndjson",
        "exports/not-a-date/a.ndjson",
        "exports/2026-13-45/a.ndjson",
        f"other/{old}/a.ndjson",
        f"exports/{locked_old}/.lock",
        f"exports/{shard_locked_old}/shard-0-of-2/.lock",
        f"exports/{today.isoformat()}/a.ndjson",
    ):
        assert kept in keys, kept
    assert "deleted run prefix" in done.stderr and "in use by another mics-export run" in done.stderr


def test_a_planted_oversized_manifest_object_is_refused_unread(
    s3: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest object over the limit (256 MiB, lowered here to 100 bytes): `status` and a rerun say so in one
    line with exit 2, before reading it whole."""
    import orchestrator.bucket_sink as bucket_sink_module
    import orchestrator.status as status_module

    monkeypatch.setattr(status_module, "MAX_MANIFEST_BYTES", 100)
    monkeypatch.setattr(bucket_sink_module, "MAX_MANIFEST_BYTES", 100)
    s3.client.put_object(Bucket=s3.bucket, Key="big/manifest.json", Body=b"{" + b" " * 200 + b"}")
    proc = cli_in_process("status", f"s3://{s3.bucket}/big", env=cli_env())
    assert proc.returncode == 2 and "is larger than" in proc.stderr, proc.stderr
    path = _jobs(tmp_path, f"s3://{s3.bucket}/big", [{"name": "a", "export_id": "1"}])
    rerun = cli_in_process("run", str(path), env=cli_env("http://127.0.0.1:9"))
    assert rerun.returncode == 2 and "is larger than" in rerun.stderr, rerun.stderr
    assert len(rerun.stderr.strip().splitlines()) <= 2, rerun.stderr
