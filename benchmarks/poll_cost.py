"""CPU per poll, batched: the product's poll against the bare aiohttp request under it.

A poll is one GET of an export's executions list. This follows ``--pollers`` executions
(one per export, RUNNING for an hour on a simulator in its own process), each polled
``--rounds`` times back to back by its own task, all at once, and prints the process's CPU
per poll for three ways, alternating ``--repeats`` times:

- ``bare``: the session's GET of the list and ``orjson.loads`` of its body (aiohttp alone);
- ``find``: ``ApiClient.find_execution`` (the product's request path and model parsing);
- ``poll``: ``Poller._once`` (the above, plus recording what was seen in the manifest).

Polls here are batched (a hundred in flight share each loop turn); in a run they are spread
out in time and each wakes the process, which costs more (benchmarks/README.md, scale).

    python benchmarks/poll_cost.py            # ~30 s
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness.report import print_header, table
from benchmarks.harness.sim import TOKEN, SimProcess, create_execution, export_spec
from orchestrator.api import ApiClient
from orchestrator.config import Job
from orchestrator.manifest import ManifestWriter
from orchestrator.polling import Poller, StallWatch
from orchestrator.record import JobRecord, Manifest


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(url: str, executions: list[str], folder: Path, rounds: int, repeats: int) -> dict[str, list[float]]:
    n = len(executions)
    async with ApiClient(url, TOKEN) as api:
        manifest = Manifest()
        for i in range(n):
            manifest.jobs[f"j{i}"] = JobRecord(name=f"j{i}", export_id=str(i + 1), execution_id=executions[i])
        writer = ManifestWriter(manifest, folder / "manifest.json")
        await writer.save()
        poller = Poller(api, writer, manifest)
        job = Job(name="j", export_id="1")
        jl = logging.LoggerAdapter(logging.getLogger("poll_cost"), {})
        session = api.transport.session

        async def bare(i: int) -> None:
            for _ in range(rounds):
                async with session.get(
                    f"{url}/v1/exports/{i + 1}/executions", params={"first_result": 0, "max_results": 10}
                ) as resp:
                    orjson.loads(await resp.read())

        async def find(i: int) -> None:
            for _ in range(rounds):
                await api.find_execution(str(i + 1), executions[i])

        async def poll(i: int) -> None:
            rec, stall = manifest.jobs[f"j{i}"], StallWatch(None)
            for _ in range(rounds):
                await poller._once(job, rec, jl, str(i + 1), executions[i], stall)

        ways: dict[str, Callable[[int], Coroutine[Any, Any, None]]] = {"bare": bare, "find": find, "poll": poll}
        results: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(repeats):
            for name, way in ways.items():
                before = _cpu()
                async with anyio.create_task_group() as tg:
                    for i in range(n):
                        tg.start_soon(way, i)
                results[name].append(1e6 * (_cpu() - before) / (n * rounds))
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pollers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print_header(f"poll cost: {args.pollers} pollers × {args.rounds} polls, {args.repeats} alternating repeats")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        specs = [export_spec(str(i + 1), 2000, pending_s=0.0, running_s=3600) for i in range(args.pollers)]
        with SimProcess(specs, folder) as sim:
            executions = [create_execution(sim.url, str(i + 1)) for i in range(args.pollers)]
            results = anyio.run(_measure, sim.url, executions, folder, args.rounds, args.repeats)
    base = statistics.median(results["bare"])
    rows = [
        [name, f"{statistics.median(v):.0f} ({min(v):.0f}–{max(v):.0f})", f"{statistics.median(v) / base:.2f}×"]
        for name, v in results.items()
    ]
    print(table(("way", "CPU µs per poll, median (min–max)", "× bare aiohttp"), rows))


if __name__ == "__main__":
    main()
