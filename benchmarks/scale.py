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
  by a 1-export run in the same session);
- peak RSS summed over the run's processes (sampled every 0.2 s), and the bytes written
  to manifest files (manifest.json rewrites + journal appends) against the final manifest.

Variants, in alternation, ≥3 runs each: default workers; `--workers 0`; the same 1,000
exports with zero-length lifecycles (pure per-export overhead); one export (start-up).

    python benchmarks/scale.py             # ~3 min on 2 cores
    python benchmarks/scale.py --quick     # 200 exports at concurrency 20
    python benchmarks/scale.py --repeats 1 --profile --profile-out profile.txt
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness.base import MiB, alternate, base_parser, work_dir
from benchmarks.harness.pyspy import pyspy_record, pyspy_summary
from benchmarks.harness.report import Summary, print_footer, print_header, ratio, save_json, summarize, table
from benchmarks.harness.runs import run_cmd, run_export, write_jobs
from benchmarks.harness.sim import TOKEN, cli_env

POLL = {"initial_s": 0.25, "max_s": 2.0}
VARIANTS = {
    "default": "1–2 s lifecycles, default workers",
    "w0": "1–2 s lifecycles, --workers 0",
    "zero": "zero-length lifecycles, default workers",
    "one": "1 export, no lifecycle (start-up)",
}
Runs = dict[str, list[dict[str, Any]]]


def list_schedule(durations: list[float], slots: int) -> float:
    """Makespan when each job starts, in order, on the first slot to free up."""
    free = [0.0] * slots
    end = 0.0
    for d in durations:
        start = heapq.heappop(free)
        end = max(end, start + d)
        heapq.heappush(free, start + d)
    return end


class _Clock:
    """A fake monotonic clock that the model moves by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def poll_model(lifecycles: list[float], slots: int, seed: int = 0, trials: int = 5) -> dict[str, float]:
    """The product's own poll schedule (`orchestrator.retry.PollSchedule`) on each lifecycle,
    with zero request latency and zero CPU: when would a perfect client notice each finish?
    As in `orchestrator.polling.Poller.poll`, the create's answer (pending, at t = 0) is
    the first thing seen, and the first poll waits the schedule's first wait after it.

    Returns the mean polls per execution, the mean delay between finish and the poll
    that sees it, and the makespan of the lifecycles plus those delays on ``slots`` slots
    (median over ``trials`` seeds): the best wall time these poll settings allow.
    """
    from orchestrator.retry import PollSchedule

    polls, delays, spans = [], [], []
    for k in range(trials):
        rng = random.Random(seed + k)  # a seeded rng and a fake clock: exact, instant waits
        busy = []
        for life in lifecycles:
            pending, running = 0.3 * life, 0.7 * life
            clock = _Clock()
            schedule = PollSchedule(POLL["initial_s"], POLL["max_s"], rng=rng, clock=clock)
            clock.t += schedule.next_wait(types.SimpleNamespace(completed_tasks=None, num_tasks=None))
            n = 0
            while True:
                n += 1
                if clock.t >= life:
                    break
                done = None if clock.t < pending else int(1000 * (clock.t - pending) / running)
                seen = types.SimpleNamespace(completed_tasks=done, num_tasks=None if done is None else 1000)
                clock.t += schedule.next_wait(seen)
            polls.append(n)
            delays.append(clock.t - life)
            busy.append(clock.t)
        spans.append(list_schedule(busy, slots))
    return {"polls": statistics.mean(polls), "delay_s": statistics.mean(delays), "makespan_s": statistics.median(spans)}


def manifest_to_bytes_ms(n: int) -> float:
    """What one whole manifest.json write serializes: all n jobs, finished-looking records."""
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


def _args() -> argparse.Namespace:
    p = base_parser(__doc__ or "")
    p.add_argument("--exports", type=int, default=None, help="number of exports (default 1000; quick 200)")
    p.add_argument("--concurrency", type=int, default=None, help="default 100; quick 20")
    p.add_argument("--size", type=int, default=2000, help="bytes per result (default 2000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="one more default-workers run under py-spy")
    p.add_argument("--profile-out", type=Path, default=None, help="also write the profile summary to this file")
    p.add_argument("--model-only", action="store_true", help="print the ideal and the poll model, run nothing")
    args = p.parse_args()
    args.n = args.exports or (200 if args.quick else 1000)
    args.conc = args.concurrency or (20 if args.quick else 100)
    args.repeats = args.repeats or (2 if args.quick else 3)
    return args


def _sim_config(args: argparse.Namespace, lifecycles: list[float], zero: bool, count: int) -> Any:
    """The simulator's exports: the drawn lifecycles, or none (``zero``)."""
    from orchestrator.simulator import ExportSpec, SimulatorConfig

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


def _jobs(d: Path, n: int, conc: int, name: str) -> Path:
    jobs = [{"name": f"e{i}", "export_id": str(10_000 + i)} for i in range(n)]
    return write_jobs(d, jobs, concurrency=conc, poll=POLL, timeout_s=300, name=name)


def _measure(args: argparse.Namespace, lifecycles: list[float], variant: str, d: Path) -> dict[str, Any]:
    """One run of ``variant`` against a fresh simulator thread."""
    from orchestrator.simulator import SimulatorThread

    count = 1 if variant == "one" else args.n
    jobs = _jobs(d, count, args.conc, f"{variant}.yaml")
    with SimulatorThread(_sim_config(args, lifecycles, variant in ("zero", "one"), count)) as sim:
        res = run_export(
            jobs,
            cli_env(sim.url),
            d / "out",
            workers=0 if variant == "w0" else None,
            sample_interval=0.2,  # peak RSS; CPU comes from wait4, so sampling costs it nothing
            count_manifest_writes=True,
            clean=False,  # the final manifest's size is read below; the next run empties it
        )
        st = sim.stats
    polls = list(st.polls.values()) or [0]
    assert len(res.jobs) == count, f"{len(res.jobs)} of {count} jobs succeeded"
    return {
        "wall_s": res.wall_s,
        "cpu_s": res.cpu_s,
        "workers": res.workers,
        "jobs": len(res.jobs),
        "peak_rss": res.peak_rss,
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


def _run_variants(args: argparse.Namespace, lifecycles: list[float]) -> Runs:
    runs: Runs = {v: [] for v in VARIANTS}
    with work_dir(args.out_dir) as d:
        for rep, v in alternate(list(VARIANTS), args.repeats):
            r = _measure(args, lifecycles, v, d)
            runs[v].append(r)
            count = 1 if v == "one" else args.n
            print(
                f"  [rep {rep + 1}] {v:8s} wall {r['wall_s']:6.2f} s  CPU {r['cpu_s']:5.2f} s  "
                f"{r['requests'] / count:.2f} requests/export  max in flight {r['max_in_flight']}  "
                f"peak RSS {r['peak_rss'] / MiB:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
    return runs


def _col(runs: Runs, v: str, key: str, scale: float = 1.0) -> list[float]:
    return [r[key] * scale for r in runs[v]]


def _print_table(runs: Runs, n: int, ideal: float) -> None:
    startup = summarize(_col(runs, "one", "cpu_s")).median
    rows = []
    for v, label in VARIANTS.items():
        count = 1 if v == "one" else n
        minus = [(c - startup) * 1000 / count for c in _col(runs, v, "cpu_s")]
        rows.append(
            (
                label,
                summarize(_col(runs, v, "wall_s")).fmt(2),
                ratio(_col(runs, v, "wall_s"), [ideal]).fmt(2, "×") if v in ("default", "w0") else "",
                summarize(_col(runs, v, "requests", 1 / count)).fmt(2),
                summarize(_col(runs, v, "polls_mean")).fmt(2),
                summarize(_col(runs, v, "polls_max")).fmt(0),
                summarize(_col(runs, v, "cpu_s", 1000 / count)).fmt(2),
                summarize(minus).fmt(2) if v != "one" else "",
                summarize(_col(runs, v, "peak_rss", 1 / MiB)).fmt(0),
                summarize(_col(runs, v, "max_in_flight")).fmt(0),
                summarize(_col(runs, v, "manifest_writes", 1 / count)).fmt(2),
            )
        )
    headers = ["variant", "wall s", "× ideal", "requests / export", "polls / execution (mean)", "max polls"]
    headers += ["CPU ms / export", "CPU ms / export minus start-up", "peak RSS MiB", "max in flight"]
    print(table([*headers, "manifest.json writes / export"], rows))


def _print_manifest(runs: Runs, n: int) -> None:
    for v in ("default", "zero"):
        written, final = _col(runs, v, "manifest_bytes"), _col(runs, v, "manifest_final")
        times = summarize([w / f for w, f in zip(written, final, strict=True)]).fmt(2, "×")
        print(
            f"manifest bytes written ({VARIANTS[v]}): {summarize(written).median / 1e6:.2f} MB "
            f"(manifest.json + journal) = {times} "
            f"the final manifest ({summarize(final).median / 1e6:.2f} MB); target ≤ 3×"
        )
    ms = manifest_to_bytes_ms(n)
    writes = summarize(_col(runs, "default", "manifest_writes")).median
    print(
        f"\nManifest.to_bytes() of a {n}-job manifest: {ms:.2f} ms per whole manifest.json write "
        f"(median of 20, in this process); × {writes:.0f} writes = {ms * writes / 1000:.1f} s CPU, "
        f"{ms * writes / n:.1f} ms per export\n"
    )
    by_route = runs["default"][0]["requests_by_route"]
    print(
        "requests by route (first default-workers run): "
        + ", ".join(f"{k} {v / n:.2f}/export" for k, v in sorted(by_route.items()))
        + "\n"
    )


def _print_targets(runs: Runs, n: int, ideal: float) -> None:
    wall = ratio(_col(runs, "default", "wall_s"), [ideal])
    cpu = summarize(_col(runs, "default", "cpu_s", 1000 / n))

    def verdict(s: Summary, limit: float) -> str:
        return "met" if s.median <= limit else "MISSED"

    trows = [
        ("wall ≤ 1.5× ideal (default workers)", wall.fmt(2, "×"), verdict(wall, 1.5)),
        ("CPU ≤ 5 ms per export (default workers, start-up included)", cpu.fmt(2, " ms"), verdict(cpu, 5)),
    ]
    print(table(("target", "measured (same run)", ""), trows))


def _profile(args: argparse.Namespace, lifecycles: list[float]) -> dict[str, Any]:
    """One more default-workers run under py-spy; prints (and saves) its summary."""
    from orchestrator.simulator import SimulatorThread

    with work_dir(args.out_dir) as d, SimulatorThread(_sim_config(args, lifecycles, False, args.n)) as sim:
        jobs = _jobs(d, args.n, args.conc, "all.yaml")
        (d / "out").mkdir()
        raw = d / "pyspy.txt"
        wall_s = pyspy_record(run_cmd(jobs, d / "out"), cli_env(sim.url), raw, 100)
        text, profile = pyspy_summary(raw, 100, wall_s, top=15)
    title = f"## py-spy profile: {args.n} exports, 1–2 s lifecycles, concurrency {args.conc}, default workers"
    print(f"\n{title}\n\n{text}")
    if args.profile_out:
        args.profile_out.write_text(f"{title}\n\n{text}\n")
    return profile


def main() -> None:
    args = _args()
    n, conc = args.n, args.conc
    meta = print_header(f"scale: {n} exports of ~{args.size} B, 1–2 s lifecycles, concurrency {conc}")
    rng = random.Random(args.seed)
    lifecycles = [rng.uniform(1.0, 2.0) for _ in range(n)]
    ideal = list_schedule(lifecycles, conc)
    bound = max(sum(lifecycles) / conc, max(lifecycles))
    print(f"poll settings: {POLL}; repeats: {args.repeats} per variant, alternating")
    print(f"ideal wall (list schedule of the lifecycles on {conc} slots): {ideal:.2f} s; bound {bound:.2f} s")
    model = poll_model(lifecycles, conc, args.seed)
    print(
        f"poll model (retry.PollSchedule with these settings, zero latency and CPU): "
        f"{model['polls']:.2f} polls/execution, finish noticed {model['delay_s']:.2f} s late on average, "
        f"best wall with this poll schedule {model['makespan_s']:.2f} s = {model['makespan_s'] / ideal:.2f}× ideal\n"
    )
    if args.model_only:
        return
    runs = _run_variants(args, lifecycles)
    _print_table(runs, n, ideal)
    _print_manifest(runs, n)
    _print_targets(runs, n, ideal)
    profile = _profile(args, lifecycles) if args.profile else None
    print_footer()
    if args.json:
        payload = {"machine": meta, "exports": n, "concurrency": conc, "poll": POLL, "ideal_s": ideal}
        payload |= {"bound_s": bound, "poll_model": model, "repeats": args.repeats, "runs": runs, "profile": profile}
        save_json("scale" + ("-quick" if args.quick else ""), payload)


if __name__ == "__main__":
    main()
