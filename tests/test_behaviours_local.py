"""Behaviours that had no test (issue 11), on this machine's side: the download's writer
thread falling behind a full queue, a write error while the queue is full, a validation
worker killed while it holds a batch, and the live display of ``--progress on``.

In process through the public API (:func:`orchestrator.run_async`), except the live display,
which is the CLI's output on a terminal (a pseudo-terminal here). The writer is held back by
wrapping ``zlib.compressobj`` (its gzip compressor), and "the queue is full" is observed as a
thread waiting in ``queue.Queue.put``: both are the download's documented design (a bounded
queue feeding one writer thread that compresses), not private names of the package.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import pty
import resource
import select
import signal
import subprocess
import sys
import termios
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import pytest
from conftest import wait_until
from hostile import small_spec
from inprocess import TOKEN_ENV, clean_environment, job_file, simulator
from support import TOKEN, assert_exact, cli_env, jobs_by_name, leftovers, manifest

import orchestrator
from orchestrator import JobStatus
from orchestrator.validate_worker import REQUEST


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the job file says where the API is; the token is in the variable it names."""
    clean_environment(monkeypatch)


# -- the writer thread: a full queue, an error -------------------------------------------------------
class _HeldCompressor:
    """gzip compression whose first chunk waits for ``gate``: the writer thread falls behind."""

    def __init__(self, real: Any, gate: threading.Event) -> None:
        self._real, self._gate = real, gate

    def compress(self, data: bytes) -> bytes:
        if not self._gate.wait(60):
            raise TimeoutError("the test never released the writer")
        out: bytes = self._real.compress(data)
        return out

    def flush(self) -> bytes:
        out: bytes = self._real.flush()
        return out


@pytest.fixture
def held_writer(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Every gzip compressor made during the test holds its thread until the returned event is set."""
    gate = threading.Event()
    real = zlib.compressobj
    monkeypatch.setattr(zlib, "compressobj", lambda *a, **kw: _HeldCompressor(real(*a, **kw), gate))
    yield gate
    gate.set()  # never leave a writer thread waiting after the test


def _producer_blocked_on_a_full_queue() -> bool:
    """Some thread waits inside ``queue.Queue.put``: the download has filled its writer's queue."""
    for top in sys._current_frames().values():
        frame: FrameType | None = top
        while frame is not None:
            code = frame.f_code
            if code.co_name == "put" and code.co_filename.endswith(f"{os.sep}queue.py"):
                return top.f_code.co_name == "wait"  # blocked, not passing through
            frame = frame.f_back
    return False


async def _when_the_queue_is_full(then: Any = None) -> None:
    async def full() -> bool:
        return _producer_blocked_on_a_full_queue()

    await wait_until(full, timeout_s=30, what="the download to fill the writer's queue")
    if then is not None:
        then()


BIG = small_spec("20", size_bytes=16 << 20)
"""16 MiB: many more chunks than the writer's queue holds."""


@pytest.mark.anyio
async def test_a_writer_that_falls_behind_a_full_queue_still_writes_the_exact_file(
    tmp_path: Path, held_writer: threading.Event
) -> None:
    """The writer thread is held until the download has filled its queue and waits on it; once
    released, the .gz file is complete and byte-exact (back-pressure, no loss, no deadlock)."""
    with simulator(BIG) as sim:
        path = job_file(tmp_path, sim.url, [{"name": "j", "export_id": "20", "compression": "gzip"}])
        async with anyio.create_task_group() as tg:
            tg.start_soon(_when_the_queue_is_full, held_writer.set)
            with anyio.fail_after(60):
                result = await orchestrator.run_async(path, workers=0)
    assert result.ok and held_writer.is_set()
    assert_exact(tmp_path / "out", "j", BIG, ".ndjson.gz")


@pytest.mark.anyio
async def test_a_write_error_while_the_queue_is_full_fails_that_job_cleanly(
    tmp_path: Path, held_writer: threading.Event
) -> None:
    """The disk refuses the writer's writes (a file size limit: EFBIG) while the download waits on
    a full queue: the job FAILS with the OS error, leaves no file and no part file, and the run
    goes on to finish the other job exact (exit_code 1) instead of hanging."""
    small = small_spec("21")
    limit = 256 << 10  # above the manifest and the small file, far below the big file compressed
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def refuse_big_writes() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))  # Python ignores SIGXFSZ: writes get EFBIG
        held_writer.set()

    with simulator(BIG, small) as sim:
        jobs = [{"name": "j", "export_id": "20", "compression": "gzip"}, {"name": "other", "export_id": "21"}]
        path = job_file(tmp_path, sim.url, jobs)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_when_the_queue_is_full, refuse_big_writes)
                with anyio.fail_after(60):
                    result = await orchestrator.run_async(path, workers=0)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        created = dict(sim.stats.executions_created)
    job = result.job("j")
    assert job.status is JobStatus.FAILED and job.error == "OSError: [Errno 27] File too large"
    assert result.exit_code == 1 and created == {"20": 1, "21": 1}
    out = tmp_path / "out"
    assert not (out / "j.ndjson.gz").exists() and leftovers(out) == []
    assert_exact(out, "other", small)
    assert jobs_by_name(manifest(out))["j"]["status"] == "FAILED"


# -- the terminal ----------------------------------------------------------------------------------
def _run_on_a_terminal(args: list[str], env: dict[str, str], timeout_s: float = 60) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal; its exit code and everything it showed there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
    )
    os.close(slave)
    shown = b""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed its end
                    break
                if not data:
                    break
                shown += data
            elif proc.poll() is not None and not select.select([master], [], [], 0)[0]:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, shown.decode("utf-8", "replace")


def test_progress_on_draws_the_live_display_and_off_does_not(tmp_path: Path) -> None:
    """`run --progress on` on a terminal: the live display (cursor hidden, the job RUNNING with its
    tasks, the jobs bar to 1/1), then the summary and where the results are, with info lines kept
    quiet; `--progress off` on the same terminal draws none of it and logs the info lines."""
    spec = small_spec("22", running_s=0.8)  # a few refreshes (4 Hz) while it runs
    with simulator(spec) as sim:
        path = job_file(tmp_path, sim.url, [{"name": "visible-job", "export_id": "22"}])
        env = {**cli_env(sim.url, TERM="xterm-256color", COLUMNS="120", LINES="40"), TOKEN_ENV: TOKEN}
        code, shown = _run_on_a_terminal(["run", str(path), "--progress", "on", "--workers", "0"], env)
        (tmp_path / "out" / "visible-job.ndjson").unlink()  # so that the second run downloads again
        off_code, off_shown = _run_on_a_terminal(["run", str(path), "--progress", "off", "--workers", "0"], env)
    assert code == 0 and off_code == 0, shown + off_shown
    assert "\x1b[?25l" in shown and "\x1b[?25h" in shown  # rich's Live hides the cursor, then shows it
    assert "RUNNING" in shown and "tasks " in shown and "0/1 jobs done" in shown and "1/1 jobs done" in shown
    assert f"results and manifest: {tmp_path / 'out' / 'manifest.json'}" in shown
    assert "SUCCEEDED" in shown and "visible-job" in shown
    assert "created execution" not in shown  # the info log lines stay quiet under the display
    assert "\x1b[?25l" not in off_shown and "jobs done" not in off_shown
    assert "adopting execution" in off_shown  # the rerun logs its info lines instead
    assert_exact(tmp_path / "out", "visible-job", spec)


# -- a validation worker killed ------------------------------------------------------------------
def _worker_processes() -> list[int]:
    """This process's children that run an ``orchestrator`` module: the validation workers."""
    pids: list[int] = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                if b"-m" in argv and argv[argv.index(b"-m") + 1].startswith(b"orchestrator."):
                    pids.append(int(child))
    return pids


def _unread_bytes(pipe: str) -> int:
    """Bytes waiting in a pipe (FIONREAD on a second read end opened through /proc: nothing is consumed)."""
    fd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
    try:
        count = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, count, True)
        return count[0]
    finally:
        os.close(fd)


@pytest.mark.anyio
async def test_a_killed_validation_worker_fails_the_download_it_held(tmp_path: Path) -> None:
    """The only validation worker is stopped, holds a batch of the download, then is killed (an
    OOM kill): that job FAILS naming the worker, with no file and no part file; the run ends
    (exit_code 1) and the next download, checked without it, lands exact."""
    first, later = small_spec("23", size_bytes=2 << 20), small_spec("24", pending_s=0.5)
    out = tmp_path / "out"
    with simulator(first, later) as sim:
        jobs = [{"name": "held", "export_id": "23"}, {"name": "later", "export_id": "24"}]
        path = job_file(tmp_path, sim.url, jobs, concurrency=1)

        async def kill_the_worker_holding_a_batch() -> None:
            async def worker() -> list[int]:
                return _worker_processes()

            (pid,) = await wait_until(worker, what="the validation worker")
            os.kill(pid, signal.SIGSTOP)  # it takes the download's batches and never answers

            async def sent() -> bool:  # a request waits, unread, on the stopped worker's stdin
                return _unread_bytes(f"/proc/{pid}/fd/0") >= REQUEST.size

            await wait_until(sent, what="the download to send a batch")
            os.kill(pid, signal.SIGKILL)

        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_the_worker_holding_a_batch)
            with anyio.fail_after(60):
                result = await orchestrator.run_async(path, workers=1)
    held = result.job("held")
    assert held.status is JobStatus.FAILED and held.error is not None
    assert held.error.startswith("validation worker 0 exited unexpectedly ("), held.error
    assert result.exit_code == 1 and not (out / "held.ndjson").exists() and leftovers(out) == []
    assert_exact(out, "later", later)
