"""The one-core validation ceiling (the validator alone over in-memory chunks) and ``curl``:
the two yardsticks a run's throughput is read against."""

from __future__ import annotations

import os
import subprocess
import time

from benchmarks.harness.base import PYTHON, ROOT
from benchmarks.harness.sim import TOKEN


def ceiling_chunks(size: int, shape: str) -> list[bytes]:
    """The bytes of a simulator result file, in memory, as 1 MiB ``bytes`` chunks."""
    from orchestrator.simulator.data import ResultFile

    return [bytes(v) for v in ResultFile(size, shape).iter_chunks()]


def ceiling_mb_s(chunks: list[bytes]) -> float:
    """``LineChecker.feed`` alone over in-memory chunks, one core: MB/s of the feed loop."""
    from orchestrator.ndjson import LineChecker

    checker = LineChecker()
    feed = checker.feed
    t0 = time.perf_counter()
    for chunk in chunks:
        feed(chunk)
    checker.finish()
    dt = time.perf_counter() - t0
    return sum(map(len, chunks)) / dt / 1e6


def parallel_ceiling_mb_s(size: int, shape: str, processes: int = 2) -> float:
    """Aggregate MB/s of ``processes`` processes running the ceiling loop at the same moment.

    Each child builds its chunks, says ready, waits for "go" on stdin, times its own feed
    loop and prints its MB/s; the result is the sum. It shows what the cores can parse at
    once (shared caches, memory bandwidth, a noisy neighbour), which a one-core ceiling
    times N does not.
    """
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from benchmarks.harness.ceiling import ceiling_chunks, ceiling_mb_s\n"
        f"chunks = ceiling_chunks({size}, {shape!r})\n"
        "print('ready', flush=True); sys.stdin.readline()\n"
        "print(ceiling_mb_s(chunks), flush=True)\n"
    )
    procs = [
        subprocess.Popen([PYTHON, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    total = 0.0
    for p in procs:
        assert p.stdout is not None
        total += float(p.stdout.readline())
        p.wait()
    return total


def curl(url: str, dest: str, fsync: bool = False) -> float:
    """Seconds for ``curl -s -o DEST URL`` (plus an fsync of DEST, as the tool does, if asked)."""
    t0 = time.perf_counter()
    subprocess.run(["curl", "-s", "-f", "-H", f"Authorization: {TOKEN}", "-o", dest, url], check=True)
    if fsync and dest != "/dev/null":
        fd = os.open(dest, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0
