"""How many requests does it take to follow one 5-minute execution?

The simulator's `time_scale: 0.01` makes a 5-minute execution last 3 s of real time; the
job's poll settings are scaled by the same factor (`initial_s: 2 → 0.02`,
`max_s: 60 → 0.6`), so every count and every delay below is what a real 5-minute
execution would see (delays are reported scaled back, in platform seconds).

Variants: pending 2 s + running 298 s, and pending 10 s + running 290 s. Each
`mics-export run` follows 10 such executions at once (10 exports, one job each;
polling is per job, so they do not interact), 3 runs per variant → 30 trials per
variant. Baseline, in the same session and alternating with the runs: a fixed 5-second
poller (the loop people write: poll, sleep 5 s) on the same executions, 10 at once
(threads).

Counted by the simulator (on a thread of this process; the run is a separate process):
list-executions requests per export (= polls), and all requests per export (create +
polls + download). Also: how late the finish was noticed (SUCCEEDED log line − the
execution's end), scaled back to platform seconds.

    python benchmarks/polling.py           # ~45 s
    python benchmarks/polling.py --quick   # 1 run per variant
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness.base import alternate, base_parser, work_dir
from benchmarks.harness.report import print_footer, print_header, save_json, summarize, table
from benchmarks.harness.runs import run_export, write_jobs
from benchmarks.harness.sim import TOKEN, api, cli_env

SCALE = 0.01
TOTAL_S = 300.0
POLL = {"initial_s": 2.0 * SCALE, "max_s": 60.0 * SCALE}
FIXED_S = 5.0


def fixed_poller(url: str, export_id: str) -> None:
    """Create an execution, then list executions every FIXED_S (scaled) until it is final."""
    _, body = api(url, "POST", f"/v1/exports/{export_id}/executions", {})
    exe = body["data"]["id"]
    t0 = time.monotonic()
    k = 0
    while True:
        _, body = api(url, "GET", f"/v1/exports/{export_id}/executions?first_result=0&max_results=10")
        if next(e["status"] for e in body["data"] if e["id"] == exe) in ("SUCCEEDED", "FAILED", "CANCELED"):
            return
        k += 1
        time.sleep(max(0.0, t0 + k * FIXED_S * SCALE - time.monotonic()))


def main() -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--per-run", type=int, default=10, help="executions followed by each run (default 10)")
    args = p.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    per = args.per_run
    meta = print_header("polling: requests to follow one 5-minute execution (time_scale 0.01)")
    print(
        f"job poll settings (scaled): {POLL}; fixed poller every {FIXED_S:g} s (scaled {FIXED_S * SCALE:g} s); "
        f"{per} executions per run, {repeats} runs per variant, alternating\n"
    )
    from orchestrator.simulator import ExportSpec, SimulatorConfig, SimulatorThread

    variants = ["tool_p2", "tool_p10", "fixed_p2", "fixed_p10"]
    trials: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with work_dir(args.out_dir) as d:
        jobs = write_jobs(
            d,
            [{"name": f"e{i}", "export_id": str(500 + i)} for i in range(per)],
            concurrency=per,
            poll=POLL,
            timeout_s=120,
        )
        for rep, v in alternate(variants, repeats):
            pending = 2.0 if v.endswith("p2") else 10.0
            exports = tuple(
                ExportSpec(
                    id=str(500 + i), name=f"e{i}", size_bytes=2000, pending_s=pending, running_s=TOTAL_S - pending
                )
                for i in range(per)
            )
            with SimulatorThread(SimulatorConfig(token=TOKEN, exports=exports, time_scale=SCALE)) as sim:
                ends: dict[str, float] = {}
                if v.startswith("tool"):
                    res = run_export(jobs, cli_env(sim.url), d / "out")
                    ends = {j.job: j.end_ts for j in res.jobs}
                else:
                    threads = [threading.Thread(target=fixed_poller, args=(sim.url, str(500 + i))) for i in range(per)]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                st = sim.stats
                for i in range(per):
                    eid = str(500 + i)
                    exe = sim.state.executions[eid][0]
                    finish = exe.creation_date / 1000 + TOTAL_S * SCALE
                    late = (ends[f"e{i}"] - finish) / SCALE if f"e{i}" in ends else None
                    trials[v].append(
                        {
                            "polls": st.list_requests[eid],
                            "late_s": late,
                            "requests": st.list_requests[eid]
                            + st.executions_created[eid]
                            + st.downloads_started[exe.id],
                        }
                    )
            got = [t["polls"] for t in trials[v][-per:]]
            print(f"  [rep {rep + 1}] {v:9s} polls per execution: {got}", file=sys.stderr, flush=True)
    rows = []
    labels = {
        "tool_p2": "mics-export, pending 2 s",
        "tool_p10": "mics-export, pending 10 s",
        "fixed_p2": "fixed 5 s poller, pending 2 s",
        "fixed_p10": "fixed 5 s poller, pending 10 s",
    }
    for v in variants:
        polls = [t["polls"] for t in trials[v]]
        lates = [t["late_s"] for t in trials[v] if t["late_s"] is not None]
        rows.append(
            (
                labels[v],
                len(polls),
                f"{statistics.mean(polls):.1f}",
                f"{statistics.median(polls):g}",
                f"{min(polls)}–{max(polls)}",
                f"{statistics.mean(t['requests'] for t in trials[v]):.1f}",
                summarize(lates).fmt(1) if lates else "",
            )
        )
    print(
        table(
            (
                "poller",
                "trials",
                "polls mean",
                "median",
                "min–max",
                "all requests / export (mean)",
                "finish noticed after, platform s: median (min–max)",
            ),
            rows,
        )
    )
    computed = 1 + int(-(-TOTAL_S // FIXED_S))
    print(f"\nfixed 5 s poller, computed: 1 + ceil({TOTAL_S:g} / {FIXED_S:g}) = {computed} polls")
    print()
    trows = []
    for v in ("tool_p2", "tool_p10"):
        polls = [t["polls"] for t in trials[v]]
        fixed = statistics.mean(t["polls"] for t in trials["fixed" + v[4:]])
        trows.append(
            (
                f"≤ 10 polls, {labels[v]}",
                f"mean {statistics.mean(polls):.1f}, max {max(polls)}",
                "met" if max(polls) <= 10 else ("met (mean)" if statistics.mean(polls) <= 10 else "MISSED"),
                f"{fixed / statistics.mean(polls):.1f}× fewer than the fixed poller",
            )
        )
    print(table(("target", "measured (same run)", "", "vs baseline"), trows))
    print_footer()
    if args.json:
        save_json(
            "polling" + ("-quick" if args.quick else ""),
            {"machine": meta, "scale": SCALE, "poll": POLL, "per_run": per, "repeats": repeats, "trials": trials},
        )


if __name__ == "__main__":
    main()
