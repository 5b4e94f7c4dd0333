"""How fast does `mics-export run` move one big export, against curl and the validation ceiling?

For each record shape (small ~57 B lines, big ~460 B lines), in alternation, ≥3 runs each:

- ceiling: `orchestrator.ndjson.LineChecker.feed` alone over the same bytes held in memory,
  one core, in this process (generated with `ResultFile(size, shape).iter_chunks()`): the
  block validator (`orchestrator.blockcheck.check_block`: two yyjson parses per 32 KiB
  part, or one yyjson document per line for long lines; exact fallback);
- perline: the previous hot loop, `orjson.loads` on each line of the same chunks (the old
  one-core ceiling); "validator ≥ 3× per-line orjson" compares the two in the same run;
- the same loop in 2 processes at once (summed): what both cores can parse together here;
- curl of the same file from the same simulator to /dev/null, to /dev/shm and to disk (+ fsync);
- `mics-export run` with `--workers 0`, `--workers 1` and the default (one per CPU), to disk,
  and `--workers 0` / default to /dev/shm (tmpfs: what writing to disk costs);
- 8 concurrent exports (8 × 128 MiB, concurrency 8), `--workers 0` and default.

The run's MB/s is its download phase (request → fsync + rename), from the log line
"SUCCEEDED: N records, B bytes in T s (X MB/s)"; wall is the whole process (start-up,
create, poll, download, manifest). The simulator is a separate process.

    python benchmarks/throughput.py             # 1 GiB, both shapes (~6 min on 2 cores with --profile)
    python benchmarks/throughput.py --quick     # 64 MiB smoke test
    python benchmarks/throughput.py --profile   # + py-spy summaries for the targets missed
"""

from __future__ import annotations

import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness.base import MiB, alternate, base_parser, fmt_size, parse_size, work_dir
from benchmarks.harness.ceiling import ceiling_chunks, ceiling_mb_s, curl, parallel_ceiling_mb_s
from benchmarks.harness.pyspy import pyspy_record, pyspy_summary
from benchmarks.harness.report import print_footer, print_header, ratio, save_json, summarize, table
from benchmarks.harness.runs import run_cmd, run_export, write_jobs
from benchmarks.harness.sim import SimProcess, create_execution, export_spec, file_url, wait_final

SINGLE = {
    "ceiling": "ceiling: LineChecker (block validator), 1 core, in memory",
    "perline": "per-line orjson loop (old ceiling), 1 core, in memory",
    "ceiling_2p": "2 processes × LineChecker at once (sum)",
    "curl_null": "curl → /dev/null",
    "curl_shm": "curl → /dev/shm",
    "curl_disk": "curl → disk (+ fsync)",
    "w0": "run --workers 0 → disk",
    "w1": "run --workers 1 → disk",
    "wd": "run default workers → disk",
    "w0_shm": "run --workers 0 → /dev/shm",
    "wd_shm": "run default workers → /dev/shm",
}
CONCURRENT = {
    "c_w0": "8 concurrent, --workers 0 → disk",
    "c_wd": "8 concurrent, default workers → disk",
}
RUNS: dict[str, tuple[int | None, str, str]] = {  # variant → (workers, where, job set)
    "w0": (0, "disk", "single"),
    "w1": (1, "disk", "single"),
    "wd": (None, "disk", "single"),
    "w0_shm": (0, "shm", "single"),
    "wd_shm": (None, "shm", "single"),
    "c_w0": (0, "disk", "concurrent"),
    "c_wd": (None, "disk", "concurrent"),
}
TARGETS = [  # (variant, compared with, minimum ratio, label)
    ("ceiling", "perline", 3.0, "validator ≥ 3× per-line orjson, one core"),
    ("wd", "curl_disk", 0.35, "default workers, one export ≥ 0.35× curl → disk"),
    ("w0", "ceiling", 0.9, "--workers 0 ≥ 0.9× one-core ceiling"),
    ("wd", "ceiling", 1.6, "default workers, one export ≥ 1.6× ceiling"),
    ("c_wd", "ceiling", 1.6, "default workers, 8 concurrent ≥ 1.6× ceiling"),
]


def main() -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--size", type=parse_size, default=None, help="single export size (default 1G; quick 64M)")
    p.add_argument("--ceiling-size", type=parse_size, default=None, help="bytes held in memory (default 256M)")
    p.add_argument("--concurrent-size", type=parse_size, default=None, help="each of the 8 (default 128M)")
    p.add_argument("--concurrent", type=int, default=8, help="number of concurrent exports (default 8)")
    p.add_argument("--shapes", default="small,big")
    p.add_argument("--profile", action="store_true", help="py-spy the run variants that miss their target")
    args = p.parse_args()
    size = args.size or (64 * MiB if args.quick else 1 << 30)
    csize = args.ceiling_size or min(size, 64 * MiB if args.quick else 256 * MiB)
    each = args.concurrent_size or (16 * MiB if args.quick else 128 * MiB)
    repeats = args.repeats or (2 if args.quick else 3)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    meta = print_header(
        f"throughput: one {fmt_size(size)} export, and {args.concurrent} × {fmt_size(each)} "
        f"at concurrency {args.concurrent}"
    )
    print(f"repeats: {repeats} per variant, alternating; ceiling over {fmt_size(csize)} in memory\n")
    results: dict[str, Any] = {
        "machine": meta,
        "size": size,
        "ceiling_size": csize,
        "concurrent_size": each,
        "concurrent": args.concurrent,
        "repeats": repeats,
        "shapes": {},
    }
    missed: list[tuple[str, str]] = []
    with work_dir(args.out_dir) as disk, tempfile.TemporaryDirectory(prefix="mics-bench-", dir="/dev/shm") as shm:
        for shape in shapes:
            shape_res = bench_shape(shape, size, csize, each, args.concurrent, repeats, disk, Path(shm))
            results["shapes"][shape] = shape_res
            missed += [
                (shape, v)
                for v, base, _, _ in TARGETS
                if v in RUNS and not shape_res["targets"][f"{v}/{base}"]["met"] and (shape, v) not in missed
            ]
        if args.profile and missed:
            results["profiles"] = profile(missed, size, each, args.concurrent, disk)
    print_footer()
    if args.json:
        save_json("throughput" + ("-quick" if args.quick else ""), results)


def workload(shape: str, size: int, each: int, n_conc: int, disk: Path) -> tuple[list[Any], Path, Path]:
    """The exports of one shape, and the job files of the single and the concurrent variants."""
    exports = [export_spec("1", size, shape)] + [export_spec(f"{100 + i}", each, shape) for i in range(n_conc)]
    single_jobs = write_jobs(disk, [{"name": f"one-{shape}", "export_id": "1"}], name=f"single-{shape}.yaml")
    conc_jobs = write_jobs(
        disk,
        [{"name": f"c{i}", "export_id": f"{100 + i}"} for i in range(n_conc)],
        concurrency=n_conc,
        name=f"conc-{shape}.yaml",
    )
    return exports, single_jobs, conc_jobs


def bench_shape(
    shape: str, size: int, csize: int, each: int, n_conc: int, repeats: int, disk: Path, shm: Path
) -> dict[str, Any]:
    exports, single_jobs, conc_jobs = workload(shape, size, each, n_conc, disk)
    samples: dict[str, list[float]] = {v: [] for v in [*SINGLE, *CONCURRENT]}
    walls: dict[str, list[float]] = {v: [] for v in RUNS}
    cpus: dict[str, list[float]] = {v: [] for v in RUNS}
    phase: dict[str, list[dict[str, float]]] = {v: [] for v in RUNS}  # CPU-s per GB during the download
    workers_seen: dict[str, int | None] = {}
    with SimProcess(exports, disk) as sim:
        sim.warm("1")
        exe = create_execution(sim.url, "1")
        wait_final(sim.url, "1", exe)
        url = file_url(sim.url, "1", exe)
        env = sim.env()
        from orchestrator.simulator.data import ResultFile

        nbytes = ResultFile(size, shape).size
        for rep, v in alternate(list(samples), repeats):
            if v == "ceiling":
                chunks = ceiling_chunks(csize, shape)
                gc.collect()
                samples[v].append(ceiling_mb_s(chunks))
                del chunks
            elif v == "perline":
                chunks = ceiling_chunks(csize, shape)
                gc.collect()
                samples[v].append(perline_mb_s(chunks))
                del chunks
            elif v == "ceiling_2p":
                samples[v].append(parallel_ceiling_mb_s(csize, shape, 2))
            elif v.startswith("curl"):
                dest = {
                    "curl_null": "/dev/null",
                    "curl_shm": str(shm / "curl.ndjson"),
                    "curl_disk": str(disk / "curl.ndjson"),
                }[v]
                samples[v].append(nbytes / curl(url, dest, fsync=v == "curl_disk") / 1e6)
                if dest != "/dev/null":
                    Path(dest).unlink(missing_ok=True)
            else:
                workers, where, jobs = RUNS[v]
                out = (shm if where == "shm" else disk) / "out"
                res = run_export(
                    single_jobs if jobs == "single" else conc_jobs,
                    env,
                    out,
                    workers=workers,
                    concurrency=n_conc if jobs == "concurrent" else None,
                    sample_interval=0.1,
                    others={"server": sim.pid},
                )
                samples[v].append(res.download_mb_s)
                walls[v].append(res.wall_s)
                cpus[v].append(res.cpu_s)
                gb = res.bytes / 1e9
                phase[v].append(
                    {
                        **{k: c / gb for k, c in res.download_cpu.items()},
                        "cores": sum(res.download_cpu.values()) / res.download_s,
                    }
                )
                workers_seen[v] = res.workers
            print(f"  [{shape} rep {rep + 1}] {v:10s} {samples[v][-1]:8.1f} MB/s", file=sys.stderr, flush=True)
    ceiling = samples["ceiling"]
    curl_disk = samples["curl_disk"]
    rows = []
    for v, label in {**SINGLE, **CONCURRENT}.items():
        if v in RUNS and workers_seen.get(v) is not None:
            label = label.replace("default workers", f"default workers ({workers_seen[v]})")
        rows.append(
            (
                label,
                summarize(samples[v]).fmt(0),
                ratio(samples[v], ceiling).fmt(2, "×"),
                ratio(samples[v], curl_disk).fmt(2, "×"),
                summarize(walls[v]).fmt(1) if v in RUNS else "",
                summarize(cpus[v]).fmt(1) if v in RUNS else "",
            )
        )
    print(f"## shape {shape}: one {fmt_size(size)} export ({nbytes} bytes); concurrent: {n_conc} × {fmt_size(each)}\n")
    print(table(("variant", "MB/s median (min–max)", "× ceiling", "× curl → disk", "run wall s", "run CPU s"), rows))
    crows = []
    for v in RUNS:

        def med(key: str, v: str = v) -> list[float]:
            return [d.get(key, 0.0) for d in phase[v]]

        client = [m + w for m, w in zip(med("main"), med("workers"), strict=True)]
        crows.append(
            (
                {**SINGLE, **CONCURRENT}[v].replace("default workers", f"default workers ({workers_seen.get(v)})"),
                summarize(med("main")).fmt(2),
                summarize(med("workers")).fmt(2),
                summarize(med("server")).fmt(2),
                summarize(med("cores")).fmt(2),
                summarize([2 / c * 1e3 for c in client if c]).fmt(0),
            )
        )
    print()
    print("CPU during the download phase (psutil, sampled every 0.1 s), CPU-seconds per GB moved:\n")
    print(
        table(
            (
                "variant",
                "main process",
                "validation workers",
                "simulator",
                "cores busy (of 2)",
                "MB/s if the client had 2 cores to itself",
            ),
            crows,
        )
    )
    targets = {}
    trows = []
    for v, base, minimum, label in TARGETS:
        r = ratio(samples[v], samples[base])
        met = r.median >= minimum
        targets[f"{v}/{base}"] = {"ratio": r.median, "lo": r.lo, "hi": r.hi, "min": minimum, "met": met}
        r2 = ratio(samples[v], samples["ceiling_2p"])
        trows.append((label, r.fmt(2, "×"), "met" if met else "MISSED", r2.fmt(2, "×")))
    print()
    print(table(("target", "measured (same run)", "", "for scale: × 2-process parse ceiling"), trows))
    print(flush=True)
    return {
        "mb_s": samples,
        "wall_s": walls,
        "cpu_s": cpus,
        "cpu_per_gb": phase,
        "workers": workers_seen,
        "bytes": nbytes,
        "targets": targets,
    }


def perline_mb_s(chunks: list[bytes]) -> float:
    """The old hot loop over in-memory chunks, one core: split, then ``orjson.loads`` per line."""
    import orjson

    loads, error = orjson.loads, orjson.JSONDecodeError
    t0 = time.perf_counter()
    tail = b""
    for chunk in chunks:
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        for line in lines:
            try:  # noqa: SIM105 - a with block per line would slow the loop it measures
                loads(line)
            except error:
                pass
    dt = time.perf_counter() - t0
    return sum(map(len, chunks)) / dt / 1e6


def profile(missed: list[tuple[str, str]], size: int, each: int, n_conc: int, disk: Path) -> dict[str, Any]:
    """One extra run of each variant that missed its target, under py-spy."""
    out: dict[str, Any] = {}
    for shape in sorted({s for s, _ in missed}):
        exports, single_jobs, conc_jobs = workload(shape, size, each, n_conc, disk)
        with SimProcess(exports, disk) as sim:
            sim.warm("1")
            for s, v in missed:
                if s != shape:
                    continue
                workers, _, jobs = RUNS[v]
                o = disk / "out"
                o.mkdir(exist_ok=True)
                cmd = run_cmd(
                    single_jobs if jobs == "single" else conc_jobs, o, workers, n_conc if jobs == "concurrent" else None
                )
                raw = disk / f"pyspy-{shape}-{v}.txt"
                rate = 200
                wall = pyspy_record(cmd, sim.env(), raw, rate)
                text, data = pyspy_summary(raw, rate, wall)
                label = {**SINGLE, **CONCURRENT}[v]
                print(f"## py-spy profile: shape {shape}, {label}\n")
                print(text + "\n", flush=True)
                out[f"{shape}/{v}"] = data
                shutil.rmtree(o, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
