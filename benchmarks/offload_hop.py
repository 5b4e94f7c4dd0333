"""CPU per thread hop: ``orchestrator.offload.run_sync`` against anyio's and the standard library's.

Every export makes a few hops off the event loop (a small file's write, its commit, a share
of the manifest journal's fsyncs). This times ``--calls`` no-op hops through each way, 100
at a time, alternating ``--repeats`` times, and prints the CPU of all threads per call (the
process's CPU time: the loop's side and the worker thread's side together).

    python benchmarks/offload_hop.py            # ~30 s
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path

import anyio
import anyio.to_thread

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness.report import print_header
from orchestrator import offload

_EXECUTOR = concurrent.futures.ThreadPoolExecutor(offload.MAX_THREADS)


def _noop() -> int:
    return 1


async def _anyio() -> int:
    return await anyio.to_thread.run_sync(_noop)


async def _offload() -> int:
    return await offload.run_sync(_noop)


async def _executor() -> int:
    return await asyncio.get_running_loop().run_in_executor(_EXECUTOR, _noop)


WAYS: dict[str, Callable[[], Coroutine[object, object, int]]] = {
    "anyio.to_thread.run_sync": _anyio,
    "loop.run_in_executor (ThreadPoolExecutor)": _executor,
    "orchestrator.offload.run_sync": _offload,
}


async def _cpu_us_per_call(hop: Callable[[], Coroutine[object, object, int]], calls: int) -> float:
    started = time.process_time()
    async with anyio.create_task_group() as tg:
        for _ in range(calls // 100):
            for _ in range(100):
                tg.start_soon(hop)
            await anyio.sleep(0)
    return (time.process_time() - started) / calls * 1e6


async def _main(calls: int, repeats: int) -> None:
    results: dict[str, list[float]] = {name: [] for name in WAYS}
    for _ in range(repeats):
        for name, hop in WAYS.items():
            results[name].append(await _cpu_us_per_call(hop, calls))
    print(f"| way | CPU µs per hop, median of {repeats} (min–max) |")
    print("|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.0f} ({min(values):.0f}–{max(values):.0f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print_header(f"offload_hop: {args.calls} no-op hops per way, {args.repeats} alternating repeats")
    anyio.run(_main, args.calls, args.repeats)


if __name__ == "__main__":
    main()
