"""Adversarial review, third round: buckets killed or refused midway, signals during the stop,
odd job files, shards and `status` inputs, through the real CLI.

Bucket runs go through :class:`review_servers_3.S3Proxy` in front of moto, which holds or
refuses one request of obstore's conversation with the store; runs a signal or a kill stops
are subprocesses. A fault the review finds is kept as ``xfail(strict=True)`` with its cause.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import subprocess
from collections.abc import Generator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cloud import S3Bucket, moto_server_fixture, s3_fixture
from review_servers_3 import Gate, S3ProxyThread, is_abort, is_complete, is_manifest_put, s3_error
from support import FAST, FAST_API, TOKEN, cli_env, cli_in_process, start_cli, wait_for, write_jobs

from orchestrator.simulator import ExportSpec, Faults, SimulatorConfig, SimulatorThread

__all__ = ["moto_server_fixture", "s3_fixture"]

MIB = 1 << 20
PREFIX = TOKEN[:8]


def _sim(*specs: ExportSpec, **faults: Any) -> SimulatorThread:
    return SimulatorThread(SimulatorConfig(token=TOKEN, exports=specs, faults=Faults(**faults)))


def _jobs(folder: Path, output: str, jobs: list[dict[str, Any]], **run: Any) -> Path:
    return write_jobs(folder, jobs, output=output, concurrency=4, run=run)


def _entries(doc: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {j["name"]: j for j in (doc or {"jobs": []})["jobs"]}


def _via(proxy: S3ProxyThread, url: str, **extra: str) -> dict[str, str]:
    """The CLI's environment with S3 requests sent through ``proxy``."""
    return cli_env(url, AWS_ENDPOINT_URL=proxy.url, **extra)


def _clean(proc: subprocess.CompletedProcess[str] | None, stderr: str = "") -> None:
    text = (proc.stderr if proc else "") + stderr
    assert "Traceback" not in text and "unexpected" not in text, text
    assert PREFIX not in text, text


# -- 1. object storage: a run stopped or refused at the worst moment -----------------------------------
@pytest.mark.parametrize("lease", ["1e300", "NaN"])
@pytest.mark.parametrize("command", ["run", "status"])
def test_a_planted_lock_with_an_absurd_lease_is_one_line(
    s3: S3Bucket, tmp_path: Path, lease: str, command: str
) -> None:
    """A PREFIX/.lock whose lease_s is 1e300 or NaN (another tool, a hand): `run` and `status`
    answer in one line (held, or taken over), never an unexpected OverflowError / ValueError."""
    spec = ExportSpec("1", size_bytes=2_000, pending_s=0.01, running_s=0.02)
    body = '{"run_id": "planted", "lease_s": ' + lease + "}"
    with _sim(spec) as sim:
        path = _jobs(tmp_path, f"s3://{s3.bucket}/p", [{"name": "a", "export_id": "1"}])
        first = cli_in_process("run", str(path), env=cli_env(sim.url))
        assert first.returncode == 0, first.stderr
        s3.client.put_object(Bucket=s3.bucket, Key="p/.lock", Body=body.encode())
        args = ("run", str(path)) if command == "run" else ("status", f"s3://{s3.bucket}/p")
        proc = cli_in_process(*args, env=cli_env(sim.url))
    _clean(proc)
    assert proc.returncode in ((0, 2) if command == "run" else (0, 4)), proc.stderr


def _slow_upload(s3: S3Bucket, tmp_path: Path, gate: Gate, prefix: str = "k") -> Generator[Any, None, None]:
    """A run of job ``a`` (4 MiB served at 2 MiB/s) into s3://BUCKET/PREFIX through a proxy with ``gate``,
    its lock lease 2 s; yields (sim, proxy, child, job file, env) once its multipart upload is under way."""
    spec = ExportSpec("1", size_bytes=4 * MIB, pending_s=0.01, running_s=0.02)
    with _sim(spec, slow_body_bps=2 * MIB) as sim, S3ProxyThread(s3.server.endpoint, gate) as proxy:
        path = _jobs(tmp_path, f"s3://{s3.bucket}/{prefix}", [{"name": "a", "export_id": "1"}])
        env = _via(proxy, sim.url, MICS_BUCKET_LOCK_LEASE_S="2")
        child = start_cli("run", "--workers", "0", str(path), env=env)
        try:
            wait_for(s3.pending_uploads, what="a multipart upload in progress")
            yield sim, proxy, child, path, env
        finally:
            gate.open()
            if child.poll() is None:
                child.kill()
            child.wait(10)


def _rerun_exact(s3: S3Bucket, sim: SimulatorThread, path: Path, env: dict[str, str], prefix: str = "k") -> None:
    """After the killed or stopped run's lease: the rerun adopts its execution and writes the exact object."""
    spec = ExportSpec("1", size_bytes=4 * MIB, pending_s=0.01, running_s=0.02)

    def lease_over() -> bool:
        try:
            head = s3.client.head_object(Bucket=s3.bucket, Key=f"{prefix}/.lock")
        except s3.client.exceptions.ClientError:
            return True  # released
        return bool((datetime.now(UTC) - head["LastModified"]).total_seconds() > 3)

    wait_for(lease_over, timeout=15, what="the stopped run's lease to run out")
    again = cli_in_process("run", str(path), env=env)
    assert again.returncode == 0, again.stderr
    _clean(again)
    entry = _entries(s3.manifest(prefix))["a"]
    data = s3.get(f"{prefix}/a.ndjson") or b""
    assert hashlib.sha256(data).hexdigest() == spec.result().sha256() == entry["sha256"]
    assert entry["etag"] and entry["object_size"] == len(data)
    assert sim.stats.executions_created["1"] == 1


@pytest.mark.parametrize(("first", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_second_sigterm_while_a_bucket_upload_aborts_still_stops_cleanly(
    s3: S3Bucket, tmp_path: Path, first: signal.Signals, code: int
) -> None:
    """SIGTERM (or SIGINT), then SIGTERM while the upload's abort is still on its way to the store: exit
    143 / 130 (the first signal's), manifest INTERRUPTED, no pending upload, lock released; the rerun exact."""
    gate = Gate(is_abort)
    scene = _slow_upload(s3, tmp_path, gate)
    sim, _proxy, child, path, env = next(scene)
    child.send_signal(first)
    assert gate.arrived.wait(20), "the abort never came"
    child.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(1)  # killed by it at once, or (as it should) still waiting on the held abort
    gate.open()
    returncode = child.wait(20)
    doc = s3.manifest("k")
    try:
        assert returncode == code, child.stderr.read() if child.stderr else ""
        assert doc is not None and doc["status"] == "INTERRUPTED" and doc["exit_code"] == code
        assert s3.pending_uploads() == [] and s3.get("k/.lock") is None
        _rerun_exact(s3, sim, path, env)
    finally:
        scene.close()


@pytest.mark.parametrize("completion", ["lost", "reaches-the-store"])
def test_kill_9_between_the_succeeded_record_and_the_upload_completion_reruns_exact(
    s3: S3Bucket, tmp_path: Path, completion: str
) -> None:
    """kill -9 while the multipart completion is on its way (the manifest already says SUCCEEDED, no ETag):
    whether the completion is lost or still lands, the rerun writes the exact object and records its ETag."""
    gate = Gate(is_complete)
    scene = _slow_upload(s3, tmp_path, gate)
    sim, _proxy, child, path, env = next(scene)
    try:
        assert gate.arrived.wait(30), "the completion never came"
        recorded = _entries(s3.manifest("k"))["a"]
        assert recorded["status"] == "SUCCEEDED" and recorded["etag"] is None, recorded
        child.kill()
        child.wait(10)
        gate.open(drop=completion == "lost")
        if completion != "lost":
            wait_for(lambda: s3.get("k/a.ndjson"), what="the completion the dead run sent to land")
        _rerun_exact(s3, sim, path, env)
    finally:
        scene.close()


def test_kill_9_during_the_manifest_put_of_the_success_reruns_exact(s3: S3Bucket, tmp_path: Path) -> None:
    """kill -9 while the PUT of the manifest saying SUCCEEDED is held (then lost): the bucket keeps the
    earlier manifest, no object appears, and the rerun adopts the execution and writes the exact object."""
    gate = Gate(lambda req: is_manifest_put(req) and b'"SUCCEEDED"' in req.body)
    scene = _slow_upload(s3, tmp_path, gate)
    sim, _proxy, child, path, env = next(scene)
    try:
        assert gate.arrived.wait(30), "the manifest's PUT never came"
        child.kill()
        child.wait(10)
        gate.open(drop=True)
        assert s3.get("k/a.ndjson") is None
        assert _entries(s3.manifest("k"))["a"]["status"] == "DOWNLOADING"
        _rerun_exact(s3, sim, path, env)
    finally:
        scene.close()


def test_a_bucket_that_refuses_every_write_midway_fails_the_run_with_exit_1(s3: S3Bucket, tmp_path: Path) -> None:
    """Once the upload is under way the bucket answers 403 AccessDenied to every PUT and POST (a policy
    changed, a role expired): exit 1 in one line (exit 2 means nothing was sent to the API), no object."""
    spec = ExportSpec("1", size_bytes=12 * MIB, pending_s=0.01, running_s=0.02)
    state = {"refusing": False}

    async def rule(req: Any) -> Any:
        if req.method == "PUT" and "partNumber=" in req.target:
            state["refusing"] = True
        if state["refusing"] and req.method in ("PUT", "POST"):
            return s3_error(403, "AccessDenied")
        return None

    with _sim(spec) as sim, S3ProxyThread(s3.server.endpoint, rule) as proxy:
        path = _jobs(tmp_path, f"s3://{s3.bucket}/w", [{"name": "a", "export_id": "1"}])
        proc = cli_in_process("run", "--workers", "0", str(path), env=_via(proxy, sim.url))
    _clean(proc)
    assert proc.returncode == 1, proc.stderr
    assert s3.get("w/a.ndjson") is None and s3.pending_uploads() == []
    assert len([line for line in proc.stderr.splitlines() if "error" in line.lower()]) >= 1


# -- 3. the job file: YAML 1.1 numbers that are not the digits written --------------------------------
@pytest.mark.parametrize(("written", "read_as"), [("0123", "83"), ("0x1F", "31"), ("12:30", "750")])
def test_an_unquoted_id_is_the_id_written_or_refused(tmp_path: Path, written: str, read_as: str) -> None:
    """`export_id: 0123` (a padded id, unquoted) is export 0123 or a one-line error (exit 2), never export 83."""
    from hostile import HostileThread
    from review_servers import FakeApi

    text = (
        "version: 1\n"
        f"api: {json.dumps(FAST_API)}\n"
        f"run: {{output_dir: {json.dumps(str(tmp_path / 'out'))}}}\n"
        f"defaults: {json.dumps(FAST)}\n"
        f"jobs:\n  - name: j\n    export_id: {written}\n"
    )
    path = tmp_path / "jobs.yaml"
    path.write_text(text)
    with HostileThread("http://127.0.0.1:9", FakeApi()) as proxy:
        proc = cli_in_process("run", str(path), env=cli_env(proxy.url))
        asked = [r.path for r in proxy.requests]
    _clean(proc)
    assert not [p for p in asked if f"/exports/{read_as}/" in p], asked
    assert proc.returncode in (0, 2), proc.stderr


# -- 5. shards: Indexed Job variables past Python's int conversion limit -------------------------------
@pytest.mark.parametrize("where", ["JOB_COMPLETION_INDEX", "MICS_SHARD_COUNT", "--shard"])
def test_a_shard_value_of_5000_digits_is_named_in_its_error(tmp_path: Path, where: str) -> None:
    """A shard index or count of 5,001 digits: exit 2, one line naming the variable (or --shard), nothing sent."""
    from support import write_jobs

    big = "1" + "0" * 5000
    jobs = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}])
    env = {"JOB_COMPLETION_INDEX": "0", "MICS_SHARD_COUNT": "2"}
    args: tuple[str, ...] = ()
    if where == "--shard":
        args = ("--shard", f"0/{big}")
    else:
        env[where] = big
    proc = cli_in_process("run", *args, str(jobs), env=cli_env("http://127.0.0.1:9", **env))
    assert proc.returncode == 2, proc.stderr
    assert where in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
