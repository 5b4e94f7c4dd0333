"""Does the orchestration overhead stay small with many small exports?

1,000 exports with ~2 KB results and 1–2 s lifecycles (30% pending, 70% running; drawn
uniformly with a fixed seed), run at concurrency 100 with poll `initial_s: 0.25,
max_s: 2` (realistic for executions this short). Reported:

- wall time against the ideal: the makespan of a zero-overhead client that starts each
  export the instant a slot frees, in job-file order (list scheduling of the lifecycles
  on 100 slots; also shown: the bound max(sum / 100, longest));
- HTTP requests per export and polls per execution, from the simulator's own
  accounting (the simulator runs on a thread of this process so its counters can be
  read; the run is a separate process; the simulator's CPU use is small at 2 KB per file);
- CPU milliseconds per export: the run process's user+sys CPU (validation workers
  included, from wait4) divided by 1,000, with and without the start-up cost (measured
  by a 1-export run in the same session).

Variants, in alternation, ≥3 runs each: default workers; `--workers 0`; the same 1,000
exports with zero-length lifecycles (pure per-export overhead); one export (start-up).

    python benchmarks/scale.py             # ~3 min on 2 cores
    python benchmarks/scale.py --quick     # 200 exports at concurrency 20
"""

from __future__ import annotations

import heapq
import random
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
from _common import (
    TOKEN,
    alternate,
    base_parser,
    cli_env,
    print_footer,
    print_header,
    pyspy_record,
    pyspy_summary,
    ratio,
    run_cmd,
    run_export,
    save_json,
    summarize,
    table,
    work_dir,
    write_jobs,
)

POLL = {"initial_s": 0.25, "max_s": 2.0}

# The journal's appends are manifest bytes too (issue 14, part 2): count them with the
# manifest.json writes that _common's wrapper counts.
_common.COUNT_MANIFEST_WRITES = _common.COUNT_MANIFEST_WRITES.replace(
    "_m.write_atomic = _count\n",
    "_m.write_atomic = _count\n"
    "_a = _m.Journal.append\n"
    "def _append(self, data, restart_for=None):\n"
    "    n = _a(self, data, restart_for)\n"
    "    _n[1] += n\n"
    "    return n\n"
    "_m.Journal.append = _append\n",
)
assert "_m.Journal.append = _append" in _common.COUNT_MANIFEST_WRITES


def list_schedule(durations: list[float], slots: int) -> float:
    """Makespan when each job starts, in order, on the first slot to free up."""
    free = [0.0] * slots
    end = 0.0
    for d in durations:
        start = heapq.heappop(free)
        end = max(end, start + d)
        heapq.heappush(free, start + d)
    return end


def poll_model(lifecycles: list[float], slots: int, seed: int = 0, trials: int = 5) -> dict[str, float]:
    """The product's own poll schedule (`scheduler.poll_waits`) on each lifecycle, with zero
    request latency and zero CPU: when would a perfect client notice each finish?

    Returns the mean polls per execution, the mean delay between finish and the poll
    that sees it, and the makespan of the lifecycles plus those delays on ``slots`` slots
    (median over ``trials`` seeds): the best wall time these poll settings allow.
    """
    import types

    import orchestrator.scheduler as sched

    clock = types.SimpleNamespace(t=0.0)
    fake_time = types.SimpleNamespace(monotonic=lambda: clock.t)
    real_time = sched.time
    polls, delays, spans = [], [], []
    try:
        sched.time = fake_time  # type: ignore[assignment]
        for k in range(trials):
            random.seed(seed + k)  # poll_waits draws its jitter from the random module
            busy = []
            for life in lifecycles:
                pending, running = 0.3 * life, 0.7 * life
                gen = sched.poll_waits(POLL["initial_s"], POLL["max_s"])
                gen.send(None)
                clock.t, n = 0.0, 0
                while True:
                    n += 1
                    if clock.t >= life:
                        break
                    done = None if clock.t < pending else int(1000 * (clock.t - pending) / running)
                    execution = types.SimpleNamespace(completed_tasks=done, num_tasks=None if done is None else 1000)
                    clock.t += gen.send(execution)
                polls.append(n)
                delays.append(clock.t - life)
                busy.append(clock.t)
            spans.append(list_schedule(busy, slots))
    finally:
        sched.time = real_time
    return {"polls": statistics.mean(polls), "delay_s": statistics.mean(delays), "makespan_s": statistics.median(spans)}


def manifest_to_bytes_ms(n: int) -> float:
    """What one manifest write serializes: all n jobs, finished-looking records."""
    import time

    from orchestrator.manifest import JobRecord, JobStatus, Manifest

    m = Manifest()
    for i in range(n):
        m.jobs[f"e{i}"] = JobRecord(
            name=f"e{i}",
            export_id=str(10_000 + i),
            execution_id=str(879_879_000 + i),
            status=JobStatus.SUCCEEDED,
            attempts=1,
            path=f"e{i}.ndjson",
            bytes=2000,
            records=35,
            sha256="0" * 64,
            num_tasks=1000,
            erroneous_tasks=0,
            started_at="2026-11-28T12:00:00Z",
            finished_at="2026-11-28T12:00:02Z",
        )
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        m.to_bytes()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--exports", type=int, default=None, help="number of exports (default 1000; quick 200)")
    p.add_argument("--concurrency", type=int, default=None, help="default 100; quick 20")
    p.add_argument("--size", type=int, default=2000, help="bytes per result (default 2000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="one more default-workers run under py-spy")
    p.add_argument("--model-only", action="store_true", help="print the ideal and the poll model, run nothing")
    args = p.parse_args()
    n = args.exports or (200 if args.quick else 1000)
    conc = args.concurrency or (20 if args.quick else 100)
    repeats = args.repeats or (2 if args.quick else 3)
    meta = print_header(f"scale: {n} exports of ~{args.size} B, 1–2 s lifecycles, concurrency {conc}")
    rng = random.Random(args.seed)
    lifecycles = [rng.uniform(1.0, 2.0) for _ in range(n)]
    ideal = list_schedule(lifecycles, conc)
    bound = max(sum(lifecycles) / conc, max(lifecycles))
    print(f"poll settings: {POLL}; repeats: {repeats} per variant, alternating")
    print(
        f"ideal wall (list schedule of the lifecycles on {conc} slots): {ideal:.2f} s; "
        f"bound max(sum/{conc}, longest) = {bound:.2f} s"
    )
    model = poll_model(lifecycles, conc, args.seed)
    print(
        f"poll model (scheduler.poll_waits with these settings, zero latency and CPU): "
        f"{model['polls']:.2f} polls/execution, finish noticed {model['delay_s']:.2f} s late on average, "
        f"best wall with this poll schedule {model['makespan_s']:.2f} s = {model['makespan_s'] / ideal:.2f}× ideal\n"
    )
    if args.model_only:
        return
    from orchestrator.simulator import ExportSpec, SimulatorConfig, SimulatorThread

    def config(zero: bool, count: int) -> SimulatorConfig:
        exports = tuple(
            ExportSpec(
                id=str(10_000 + i),
                name=f"e{i}",
                size_bytes=args.size,
                shape="small",
                seed=i % 97,
                pending_s=0.0 if zero else 0.3 * life,
                running_s=0.0 if zero else 0.7 * life,
            )
            for i, life in enumerate(lifecycles[:count])
        )
        return SimulatorConfig(token=TOKEN, exports=exports)

    variants = ["default", "w0", "zero", "one"]
    labels = {
        "default": "1–2 s lifecycles, default workers",
        "w0": "1–2 s lifecycles, --workers 0",
        "zero": "zero-length lifecycles, default workers",
        "one": "1 export, no lifecycle (start-up)",
    }
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with work_dir(args.out_dir) as d:
        jobs_all = write_jobs(
            d,
            [{"name": f"e{i}", "export_id": str(10_000 + i)} for i in range(n)],
            concurrency=conc,
            poll=POLL,
            timeout_s=300,
            name="all.yaml",
        )
        jobs_one = write_jobs(d, [{"name": "e0", "export_id": "10000"}], concurrency=conc, poll=POLL, name="one.yaml")
        for rep, v in alternate(variants, repeats):
            count = 1 if v == "one" else n
            with SimulatorThread(config(v in ("zero", "one"), count)) as sim:
                res = run_export(
                    jobs_one if v == "one" else jobs_all,
                    cli_env(sim.url),
                    d / "out",
                    workers=0 if v == "w0" else None,
                    count_manifest_writes=True,
                    clean=False,  # the final manifest's size is read below; the next run empties it
                )
                st = sim.stats
                polls = list(st.polls.values()) or [0]
                runs[v].append(
                    {
                        "wall_s": res.wall_s,
                        "cpu_s": res.cpu_s,
                        "workers": res.workers,
                        "jobs": len(res.jobs),
                        "requests": st.total_requests,
                        "requests_by_route": dict(st.requests),
                        "executions_created": sum(st.executions_created.values()),
                        "polls_mean": sum(polls) / count,
                        "polls_median": statistics.median(polls),
                        "polls_max": max(polls),
                        "max_in_flight": st.max_in_flight,
                        "manifest_writes": res.manifest_writes,
                        "manifest_bytes": res.manifest_bytes,
                        "manifest_final": (d / "out" / "manifest.json").stat().st_size,
                    }
                )
            assert len(res.jobs) == count, f"{len(res.jobs)} of {count} jobs succeeded"
            r = runs[v][-1]
            print(
                f"  [rep {rep + 1}] {v:8s} wall {r['wall_s']:6.2f} s  CPU {r['cpu_s']:5.2f} s  "
                f"{r['requests'] / count:.2f} requests/export  max in flight {r['max_in_flight']}",
                file=sys.stderr,
                flush=True,
            )

    def col(v: str, key: str, scale: float = 1.0) -> list[float]:
        return [r[key] * scale for r in runs[v]]

    startup = summarize(col("one", "cpu_s")).median
    rows = []
    for v in variants:
        count = 1 if v == "one" else n
        rows.append(
            (
                labels[v],
                summarize(col(v, "wall_s")).fmt(2),
                ratio(col(v, "wall_s"), [ideal]).fmt(2, "×") if v in ("default", "w0") else "",
                summarize(col(v, "requests", 1 / count)).fmt(2),
                summarize(col(v, "polls_mean")).fmt(2),
                summarize(col(v, "polls_max")).fmt(0),
                summarize(col(v, "cpu_s", 1000 / count)).fmt(2),
                summarize([(c - startup) * 1000 / count for c in col(v, "cpu_s")]).fmt(2) if v != "one" else "",
                summarize(col(v, "max_in_flight")).fmt(0),
                summarize(col(v, "manifest_writes", 1 / count)).fmt(2),
            )
        )
    print(
        table(
            (
                "variant",
                "wall s",
                "× ideal",
                "requests / export",
                "polls / execution (mean)",
                "max polls",
                "CPU ms / export",
                "CPU ms / export minus start-up",
                "max in flight",
                "manifest writes / export",
            ),
            rows,
        )
    )
    for v in ("default", "zero"):
        written, final = col(v, "manifest_bytes"), col(v, "manifest_final")
        times = summarize([w / f for w, f in zip(written, final, strict=True)]).fmt(2, "×")
        print(
            f"manifest bytes written ({labels[v]}): {summarize(written).median / 1e6:.2f} MB "
            f"(manifest.json + journal) = {times} "
            f"the final manifest ({summarize(final).median / 1e6:.2f} MB); target ≤ 3×"
        )
    ms = manifest_to_bytes_ms(n)
    writes = summarize(col("default", "manifest_writes")).median
    print(
        f"\nManifest.to_bytes() of a {n}-job manifest: {ms:.2f} ms on the event loop per manifest write "
        f"(median of 20, in this process); × {writes:.0f} writes = {ms * writes / 1000:.1f} s CPU, "
        f"{ms * writes / n:.1f} ms per export"
    )
    print()
    by_route = runs["default"][0]["requests_by_route"]
    print(
        "requests by route (first default-workers run): "
        + ", ".join(f"{k} {v / n:.2f}/export" for k, v in sorted(by_route.items()))
    )
    print()
    wall = ratio(col("default", "wall_s"), [ideal])
    cpu = summarize(col("default", "cpu_s", 1000 / n))
    trows = [
        ("wall ≤ 1.5× ideal (default workers)", wall.fmt(2, "×"), "met" if wall.median <= 1.5 else "MISSED"),
        (
            "CPU ≤ 5 ms per export (default workers, start-up included)",
            cpu.fmt(2, " ms"),
            "met" if cpu.median <= 5 else "MISSED",
        ),
    ]
    print(table(("target", "measured (same run)", ""), trows))
    profile = None
    if args.profile:
        with work_dir(args.out_dir) as d, SimulatorThread(config(False, n)) as sim:
            jobs_all = write_jobs(
                d,
                [{"name": f"e{i}", "export_id": str(10_000 + i)} for i in range(n)],
                concurrency=conc,
                poll=POLL,
                timeout_s=300,
                name="all.yaml",
            )
            (d / "out").mkdir()
            raw = d / "pyspy.txt"
            wall = pyspy_record(run_cmd(jobs_all, d / "out"), cli_env(sim.url), raw, 100)
            text, profile = pyspy_summary(raw, 100, wall, top=15)
            print(f"\n## py-spy profile: {n} exports, 1–2 s lifecycles, default workers\n")
            print(text)
    print_footer()
    if args.json:
        save_json(
            "scale" + ("-quick" if args.quick else ""),
            {
                "machine": meta,
                "exports": n,
                "concurrency": conc,
                "poll": POLL,
                "ideal_s": ideal,
                "bound_s": bound,
                "poll_model": model,
                "repeats": repeats,
                "runs": runs,
                "profile": profile,
            },
        )


if __name__ == "__main__":
    main()
