"""Does memory stay flat whatever the export's size?

Peak RSS summed over every process of the run (the main process and its validation
workers), sampled with psutil every 20 ms over the process tree: each sample sums RSS
over the tree, the peak is the largest sum. The simulator is a separate process and not
counted. Also shown: the summed PSS peak (every 10th sample; shared pages such as the workers' shared-memory
ring and common libraries split between the processes that map them, instead of counted
once per process), the peaks of the main process and of the biggest worker, and the run's
download MB/s (kept for plots.py).

Sizes 50 MiB, 256 MiB, 1 GiB and 4 GiB of small records, each with default workers and
`--workers 0`, all in alternation, ≥3 runs each. The baseline is the 50 MiB run.

    python benchmarks/memory.py              # ~4.5 min on 2 cores
    python benchmarks/memory.py --no-4g      # skip 4 GiB
    python benchmarks/memory.py --quick      # 50 MiB and 256 MiB, 2 runs each
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness.base import GiB, MiB, alternate, base_parser, fmt_size, parse_size, work_dir
from benchmarks.harness.report import print_footer, print_header, save_json, summarize, table
from benchmarks.harness.runs import run_export, write_jobs
from benchmarks.harness.sim import SimProcess, export_spec


def main() -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--sizes", default=None, help="comma-separated sizes (default 50M,256M,1G,4G)")
    p.add_argument("--no-4g", action="store_true", help="skip the 4 GiB export")
    p.add_argument("--shape", default="small")
    p.add_argument("--interval", type=float, default=0.02, help="sampling interval, s (default 0.02)")
    args = p.parse_args()
    if args.sizes:
        sizes = [parse_size(s) for s in args.sizes.split(",")]
    elif args.quick:
        sizes = [50 * MiB, 256 * MiB]
    else:
        sizes = [50 * MiB, 256 * MiB, GiB, 4 * GiB]
    if args.no_4g:
        sizes = [s for s in sizes if s < 4 * GiB]
    repeats = args.repeats or (2 if args.quick else 3)
    meta = print_header(f"memory: peak RSS summed over the run's processes, {args.shape} records")
    print(f"repeats: {repeats} per variant, alternating; sampled every {args.interval * 1000:.0f} ms\n")
    # Job files accept digit-only export ids: 1000 + the size's index.
    ids = {size: str(1000 + i) for i, size in enumerate(sizes)}
    exports = [export_spec(ids[size], size, args.shape) for size in sizes]
    variants = [(size, w) for size in sizes for w in ("default", "0")]
    runs: dict[str, list[dict[str, Any]]] = {f"{s}/{w}": [] for s, w in variants}
    with work_dir(args.out_dir) as d, SimProcess(exports, d) as sim:
        sim.warm(ids[sizes[0]])
        env = sim.env()
        jobs = {
            size: write_jobs(d, [{"name": f"x{size}", "export_id": ids[size]}], name=f"{size}.yaml") for size in sizes
        }
        for rep, key in alternate(list(runs), repeats):
            size_s, w = key.split("/")
            size = int(size_s)
            res = run_export(
                jobs[size],
                env,
                d / "out",
                workers=None if w == "default" else 0,
                sample_interval=args.interval,
                pss=True,
            )
            runs[key].append(
                {
                    "peak_rss": res.peak_rss,
                    "peak_pss": res.peak_pss,
                    "main": res.peak_rss_by_role["main"],
                    "worker_max": res.peak_rss_by_role["worker_max"],
                    "processes": res.processes,
                    "workers": res.workers,
                    "mb_s": res.download_mb_s,
                    "wall_s": res.wall_s,
                    "samples": res.samples,
                    "bytes": res.bytes,
                    "anon": res.rss_parts.get("RssAnon", 0),
                    "file": res.rss_parts.get("RssFile", 0),
                    "shmem": res.rss_parts.get("RssShmem", 0),
                }
            )
            print(
                f"  [rep {rep + 1}] {fmt_size(size):>8} workers={w:7s} peak RSS sum "
                f"{res.peak_rss / MiB:6.1f} MiB ({res.processes} processes, {res.samples} samples), "
                f"{res.download_mb_s:.0f} MB/s",
                file=sys.stderr,
                flush=True,
            )

    def col(key: str, field: str, scale: float = MiB) -> list[float]:
        return [r[field] / scale for r in runs[key]]

    rows = []
    for size, w in variants:
        key = f"{size}/{w}"
        base = f"{sizes[0]}/{w}"
        nw = runs[key][0]["workers"]
        rows.append(
            (
                fmt_size(size),
                f"{nw} (default)" if w == "default" else "0",
                summarize(col(key, "peak_rss")).fmt(1),
                f"{summarize(col(key, 'peak_rss')).median - summarize(col(base, 'peak_rss')).median:+.1f}",
                summarize(col(key, "peak_pss")).fmt(1),
                "/".join(f"{summarize(col(key, f)).median:.0f}" for f in ("anon", "file", "shmem")),
                summarize(col(key, "main")).fmt(1),
                summarize(col(key, "worker_max")).fmt(1) if w == "default" else "–",
                summarize(col(key, "mb_s", 1)).fmt(0),
            )
        )
    print(
        table(
            (
                "export",
                "workers",
                "peak RSS sum, MiB",
                f"vs {fmt_size(sizes[0])}",
                "peak PSS sum, MiB",
                "at the peak: anon/file/shmem",
                "main process RSS",
                "biggest worker RSS",
                "download MB/s",
            ),
            rows,
        )
    )
    print()
    biggest = sizes[-1]
    trows = []
    for w in ("default", "0"):
        top = summarize(col(f"{biggest}/{w}", "peak_rss"))
        smallest = summarize(col(f"{sizes[0]}/{w}", "peak_rss"))
        label = "default workers" if w == "default" else "--workers 0"
        if biggest >= 4 * GiB:
            trows.append(
                (
                    f"{label}: peak RSS sum for {fmt_size(biggest)} ≤ 150 MiB",
                    top.fmt(1, " MiB"),
                    "met" if top.hi <= 150 else "MISSED",
                )
            )
        growth = top.median - smallest.median
        trows.append(
            (
                f"{label}: {fmt_size(sizes[0])} vs {fmt_size(biggest)} within 20 MiB",
                f"{growth:+.1f} MiB",
                "met" if abs(growth) <= 20 else "MISSED",
            )
        )
    print(table(("target", "measured (same run)", ""), trows))
    print_footer()
    if args.json:
        save_json(
            "memory" + ("-quick" if args.quick else ""),
            {
                "machine": meta,
                "shape": args.shape,
                "sizes": sizes,
                "repeats": repeats,
                "runs": runs,
                "interval_s": args.interval,
            },
        )


if __name__ == "__main__":
    main()
