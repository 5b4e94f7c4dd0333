"""Adversarial review, fifth round: attacks on one signal watcher from the first step to the last
release (start-up cancelled through the watcher's task group, then supervise), start-up errors
that now leave through a task group, and the regular-file check on earlier manifests.

Signals that must land in one exact phase are sent by the test process to itself from inside a
wrapped step of an in-process run (``support.cli_in_process``); those that need a real process
(a store holding a request) use a subprocess and ``review_servers_3``'s proxy in front of moto.
A fault the review finds is kept as ``xfail(strict=True)`` with its cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from cloud import S3Bucket, moto_server_fixture, s3_fixture
from hostile import Reply, Request, Wire
from review_servers_3 import Gate, S3Proxy, S3ProxyThread, is_lock_put, is_manifest_put
from support import TOKEN, cli_env, cli_in_process, start_cli, stop_cli, wait_for, write_jobs

__all__ = ["moto_server_fixture", "s3_fixture"]

PREFIX = TOKEN[:8]


def _bucket_jobs(folder: Path, output: str) -> Path:
    return write_jobs(folder, [{"name": "a", "export_id": "1"}], output=output, concurrency=2)


def _clean(stderr: str) -> None:
    assert "Traceback" not in stderr and "unexpected" not in stderr and PREFIX not in stderr, stderr


# -- 1. the lock's PUT reaches the store, its answer is late: SIGTERM ------------------------------
class _AnswerLate(S3Proxy):
    """Forwards the lock's PUT to moto at once (the lock exists), then holds the answer until opened."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.arrived = threading.Event()
        self.release = threading.Event()

    async def _answer(self, req: Request, forward: Callable[[], Awaitable[Reply]]) -> Wire:
        if is_lock_put(req) and not self.release.is_set():
            reply = await forward()
            self.arrived.set()
            while not self.release.is_set():
                await asyncio.sleep(0.005)
            return reply.wire()
        return await super()._answer(req, forward)


def test_a_sigterm_while_the_lock_put_is_answered_late_leaves_no_lock(s3: S3Bucket, tmp_path: Path) -> None:
    """SIGTERM while the store has written the lock but not yet answered: 143, 'nothing started', and no lock left
    behind to refuse the next run (a clean stop never blocks the rerun it asks for)."""
    proxy_thread = S3ProxyThread(s3.server.endpoint)
    proxy_thread.server = late = _AnswerLate(s3.server.endpoint)
    with proxy_thread as proxy:
        path = _bucket_jobs(tmp_path, f"s3://{s3.bucket}/p")
        env = cli_env(None, AWS_ENDPOINT_URL=proxy.url)
        child = start_cli("run", "--simulate", "--workers", "0", str(path), env=env)
        try:
            assert late.arrived.wait(30), "the lock's PUT never came"
            child.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(10)
            returncode = child.poll()
        finally:
            late.release.set()
            stderr = stop_cli(child)
    assert returncode == 143, stderr
    _clean(stderr)
    keys = [o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket).get("Contents", [])]
    rerun = cli_in_process("run", "--simulate", "--workers", "0", str(path), env=cli_env(None))
    assert rerun.returncode == 0 and "p/.lock" not in keys, f"lock left behind: {keys}; rerun: {rerun.stderr[-600:]}"


# -- 2. signals that land in one exact phase of an in-process run -----------------------------------
class _Phases:
    """Wraps app.supervise to keep the run's SignalWatch, and sends SIGTERM to this process from a step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from orchestrator import app

        self.watch: Any = None
        real = app.supervise  # type: ignore[attr-defined]  # patched where app looks it up

        async def supervise(plan: Any, runner: Any, live: bool, watch: Any) -> int:
            self.watch = watch
            return await real(plan, runner, live, watch)

        monkeypatch.setattr(app, "supervise", supervise)

    async def signal_and_wait(self, sig: signal.Signals = signal.SIGTERM, watch: Any = None) -> None:
        """Send ``sig`` to this process and wait until the watcher has read it."""
        watch = watch or self.watch
        before = len(watch.received) if watch is not None else 0
        os.kill(os.getpid(), sig)
        if watch is not None and watch._settled:
            before = -1  # the run has ended: the watcher only logs it (give it the turns below)
        with anyio.fail_after(5):
            while watch is None or len(watch.received) <= before:
                await anyio.sleep(0)
        # the watcher logs a second signal without appending it: give it a turn to
        for _ in range(20):
            await anyio.sleep(0)


def _local_run(tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    jobs = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}, {"name": "b", "export_id": "2"}])
    proc = cli_in_process("run", "--simulate", "--workers", "0", str(jobs), env=cli_env(None))
    path = tmp_path / "out" / "manifest.json"
    return proc, json.loads(path.read_text()) if path.exists() else None


def test_a_sigterm_between_start_up_and_supervise_interrupts_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM read after start-up (watch.scope None) but before supervise: exit 143, manifest INTERRUPTED 143."""
    from orchestrator import app

    real = app.supervise  # type: ignore[attr-defined]  # patched where app looks it up

    async def late(plan: Any, runner: Any, live: bool, watch: Any) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        with anyio.fail_after(5):
            while not watch.received:
                await anyio.sleep(0)
        return await real(plan, runner, live, watch)

    monkeypatch.setattr(app, "supervise", late)
    proc, doc = _local_run(tmp_path)
    assert proc.returncode == 143, proc.stderr
    assert doc is not None and doc["status"] == "INTERRUPTED" and doc["exit_code"] == 143, doc
    _clean(proc.stderr)


def test_a_sigterm_during_the_last_manifest_write_keeps_exit_code_and_manifest_agreeing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while the last manifest write is under way: the exit code is the one the manifest records
    (mics-export status and the scheduler must not disagree), SUCCEEDED/0 or INTERRUPTED/143."""
    from orchestrator.manifest import ManifestWriter

    phases = _Phases(monkeypatch)
    real = ManifestWriter.save_last

    async def save_last(self: ManifestWriter) -> None:
        await phases.signal_and_wait()
        await real(self)

    monkeypatch.setattr(ManifestWriter, "save_last", save_last)
    proc, doc = _local_run(tmp_path)
    assert doc is not None, proc.stderr
    assert proc.returncode == doc["exit_code"], f"exit {proc.returncode}, manifest {doc['status']}/{doc['exit_code']}"
    _clean(proc.stderr)


@pytest.mark.parametrize("step", ["report", "retention"])
def test_a_sigterm_during_conclude_keeps_exit_code_and_manifest_agreeing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """SIGTERM while conclude reports or applies retention: no traceback, and the exit code is the manifest's."""
    from orchestrator import supervise

    phases = _Phases(monkeypatch)
    if step == "report":
        real_report = supervise._report

        def report(manifest: Any, jobs: Any) -> None:
            os.kill(os.getpid(), signal.SIGTERM)  # read at conclude's next await
            real_report(manifest, jobs)

        monkeypatch.setattr(supervise, "_report", report)
    else:
        real_retain = supervise._retain

        async def retain(plan: Any, sink: Any, code: int) -> None:
            await phases.signal_and_wait()
            await real_retain(plan, sink, code)

        monkeypatch.setattr(supervise, "_retain", retain)
    proc, doc = _local_run(tmp_path)
    assert doc is not None, proc.stderr
    assert proc.returncode == doc["exit_code"], f"exit {proc.returncode}, manifest {doc['status']}/{doc['exit_code']}"
    _clean(proc.stderr)


def test_sigint_then_a_burst_of_sigterm_during_the_run_exit_130_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGINT then twenty SIGTERMs while the jobs run: one stop, exit 130 (the first reason), INTERRUPTED/130,
    every later signal only logged as 'already stopping'."""
    from orchestrator.scheduler import Runner

    phases = _Phases(monkeypatch)
    real = Runner.run

    async def run(self: Runner) -> Any:
        await phases.signal_and_wait(signal.SIGINT)
        for _ in range(20):
            os.kill(os.getpid(), signal.SIGTERM)
        await anyio.sleep(0)
        return await real(self)

    monkeypatch.setattr(Runner, "run", run)
    proc, doc = _local_run(tmp_path)
    assert proc.returncode == 130, proc.stderr
    assert doc is not None and doc["status"] == "INTERRUPTED" and doc["exit_code"] == 130, doc
    assert proc.stderr.count("received: stopping") == 1, proc.stderr
    _clean(proc.stderr)


def test_a_sigterm_while_the_validator_pool_starts_stops_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while the validator pool is being started: exit 143, one 'stopped before the run began' line,
    no manifest claimed, the folder's lock released (a rerun starts)."""
    from orchestrator import app

    real_pool = app.validator_pool  # type: ignore[attr-defined]  # patched where app looks it up

    @contextlib.asynccontextmanager
    async def pool(workers: int) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        await anyio.sleep_forever()  # the watcher's cancellation is what ends this
        async with real_pool(workers) as p:  # pragma: no cover
            yield p

    monkeypatch.setattr(app, "validator_pool", pool)
    jobs = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}])
    proc = cli_in_process("run", "--simulate", "--workers", "1", str(jobs), env=cli_env(None))
    assert proc.returncode == 143, proc.stderr
    assert "stopped before the run began" in proc.stderr, proc.stderr
    _clean(proc.stderr)
    monkeypatch.setattr(app, "validator_pool", real_pool)
    again = cli_in_process("run", "--simulate", "--workers", "0", str(jobs), env=cli_env(None))
    assert again.returncode == 0, again.stderr


def test_python_run_stopped_by_sigterm_during_start_up_returns_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """orchestrator.run() from the main thread, SIGTERM during start-up: a RunResult INTERRUPTED / 143, not an
    exception (README 'From Python': signals stop it as they stop the CLI)."""
    import orchestrator
    from orchestrator import app

    @contextlib.asynccontextmanager
    async def pool(workers: int) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        await anyio.sleep_forever()
        yield None  # pragma: no cover

    monkeypatch.setattr(app, "validator_pool", pool)
    jobs = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}])
    result = orchestrator.run(jobs, simulate=True, workers=1)
    assert result.exit_code == 143 and result.status.value == "INTERRUPTED", result


# -- 3. start-up errors leave through the watcher's task group -------------------------------------
@contextlib.contextmanager
def _held_folder(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def _start_up_case(case: str, tmp_path: Path, s3: S3Bucket | None) -> tuple[Path, dict[str, str], Any]:
    """A job file and an environment whose run fails at start-up in ``case``'s way; the lock to hold."""
    if case == "bad-bucket":
        assert s3 is not None
        return _bucket_jobs(tmp_path, "s3://no-such-bucket-r5/p"), cli_env("http://127.0.0.1:9"), None
    jobs = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}])
    if case == "missing-token":
        return jobs, cli_env("http://127.0.0.1:9", token=None), None
    return jobs, cli_env("http://127.0.0.1:9"), _held_folder(tmp_path / "out")


CASES = ["missing-token", "locked-folder", "bad-bucket"]


@pytest.fixture(name="maybe_s3")
def _maybe_s3(request: pytest.FixtureRequest) -> S3Bucket | None:
    return request.getfixturevalue("s3") if request.node.callspec.params.get("case") == "bad-bucket" else None


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("signals", [True, False], ids=["cli", "no-signal-watch"])
def test_a_start_up_error_is_one_line_and_exit_2_through_the_cli(
    tmp_path: Path, maybe_s3: S3Bucket | None, case: str, signals: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing token, a folder another run holds, a missing bucket: one 'mics-export: error:' line, exit 2,
    no 'unexpected', no traceback, whether or not the signal watcher's task group wraps start-up."""
    from orchestrator import app

    if not signals:
        real = app.execute_async

        async def no_watch(options: Any, console: Any, *, signals: bool) -> Any:
            return await real(options, console, signals=False)

        monkeypatch.setattr(app, "execute_async", no_watch)
    jobs, env, held = _start_up_case(case, tmp_path, maybe_s3)
    with held or contextlib.nullcontext():
        proc = cli_in_process("run", "--workers", "0", str(jobs), env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mics-export: error:")]
    assert len(lines) == 1, proc.stderr
    _clean(proc.stderr)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("flavour", ["run", "run_async"])
def test_a_start_up_error_is_raised_as_a_usage_error_through_the_python_api(
    tmp_path: Path, maybe_s3: S3Bucket | None, case: str, flavour: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """orchestrator.run (signals watched: main thread) and run_async: a start-up error is a UsageError itself
    (`except UsageError` works), never an ExceptionGroup, and its text never holds the token."""
    import orchestrator
    from orchestrator.errors import UsageError

    jobs, env, held = _start_up_case(case, tmp_path, maybe_s3)
    for key in [k for k in os.environ if k.startswith("MICS_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(("MICS_", "AWS_")):
            monkeypatch.setenv(key, value)
    with held or contextlib.nullcontext(), pytest.raises(UsageError) as info:
        if flavour == "run":
            orchestrator.run(jobs, workers=0)
        else:
            anyio.run(lambda: orchestrator.run_async(jobs, workers=0))
    assert not isinstance(info.value, BaseExceptionGroup)
    assert TOKEN not in str(info.value)


# -- 4. the regular-file check on an earlier run folder's manifest ---------------------------------
@pytest.mark.parametrize("kind", ["directory", "socket", "dangling", "loop", "unreadable"])
def test_an_odd_earlier_run_folders_manifest_is_passed_over(tmp_path: Path, kind: str) -> None:
    """max_drop_pct looks in ./exports/2020-01-01, whose manifest.json is a directory, a socket, a dangling
    symlink, a symlink loop or unreadable: the folder is passed over, the job SUCCEEDS, no unexpected error."""
    from hostile import HostileThread
    from review_servers import FakeApi
    from support import jobs_by_name, read_manifest_if_any

    earlier = tmp_path / "exports" / "2020-01-01"
    earlier.mkdir(parents=True)
    target = earlier / "manifest.json"
    sock = None
    if kind == "directory":
        target.mkdir()
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(target))
    elif kind == "dangling":
        target.symlink_to(earlier / "nowhere")
    elif kind == "loop":
        target.symlink_to(target)
    else:
        target.write_text("{}")
        target.chmod(0)
    try:
        with HostileThread("http://127.0.0.1:9", FakeApi()) as proxy:
            jobs = write_jobs(tmp_path, [{"name": "j", "export_id": "1", "max_drop_pct": 10}])
            doc = yaml.safe_load(jobs.read_text())
            doc["run"]["output_dir"] = str(tmp_path / "exports" / "{date}")
            jobs.write_text(yaml.safe_dump(doc))
            proc = cli_in_process("run", "--workers", "0", str(jobs), env=cli_env(proxy.url))
    finally:
        if sock is not None:
            sock.close()
    _clean(proc.stderr)
    assert proc.returncode == 0, proc.stderr
    outs = [p for p in (tmp_path / "exports").iterdir() if p.name != "2020-01-01"]
    assert jobs_by_name(read_manifest_if_any(outs[0]) or {"jobs": []})["j"]["status"] == "SUCCEEDED"


# -- 5. the last manifest PUT held in a bucket, then SIGTERM (the real process) --------------------
def _is_last_manifest_put(req: Request) -> bool:
    if not is_manifest_put(req):
        return False
    with contextlib.suppress(ValueError):
        return json.loads(req.body).get("finished_at") is not None
    return False


def test_a_sigterm_while_the_bucket_holds_the_last_manifest_put_agrees_with_the_manifest(
    s3: S3Bucket, tmp_path: Path
) -> None:
    """SIGTERM while the store holds the run's last manifest PUT: the process exits with the code the manifest
    records (143 with INTERRUPTED, or 0 with SUCCEEDED), never 143 over a SUCCEEDED manifest."""
    gate = Gate(_is_last_manifest_put)
    with S3ProxyThread(s3.server.endpoint, gate) as proxy:
        path = _bucket_jobs(tmp_path, f"s3://{s3.bucket}/p")
        env = cli_env(None, AWS_ENDPOINT_URL=proxy.url)
        log = tmp_path / "stderr.txt"
        with log.open("w") as sink:
            child = start_cli("run", "--simulate", "--workers", "0", str(path), env=env, stderr=sink)
        try:
            assert gate.arrived.wait(30), "the last manifest PUT never came"
            child.send_signal(signal.SIGTERM)
            wait_for(lambda: child.poll() is not None or "SIGTERM received" in log.read_text(), what="SIGTERM read")
            gate.open()
            child.wait(30)
            returncode = child.poll()
        finally:
            gate.open()
            stop_cli(child)
        stderr = log.read_text()
    body = s3.client.get_object(Bucket=s3.bucket, Key="p/manifest.json")["Body"].read()
    doc = json.loads(body)
    assert returncode == doc["exit_code"], f"exit {returncode}, manifest {doc['status']}/{doc['exit_code']}"
    _clean(stderr)
