"""How much faster is `mics-export run` than the script a user would otherwise write?

The naive client (`naive_client` below, run as its own process): `requests`, one export
after another — create an execution, poll every 0.1 s (a user would poll every 5 s; the
benchmark keeps the waiting short), then `iter_lines()` with its defaults, `json.loads`
on every line, each line written to a file. No hash, no atomic rename, no fsync.

Workloads, each run in alternation with `mics-export run` (default workers and
`--workers 0`), ≥3 times:

- one 256 MiB export of small (~57 B) records, and one of big (~460 B) records:
  download-phase MB/s (request → file closed / fsync'd);
- 4 × 64 MiB small exports with 2 s lifecycles (0.5 s pending + 1.5 s running): wall time
  of the whole batch (the naive script runs them one after another; the tool runs them at
  concurrency 8).

    python benchmarks/naive_baseline.py            # ~3 min on 2 cores
    python benchmarks/naive_baseline.py --quick    # 32 MiB / 4 × 8 MiB smoke test
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness.base import PYTHON, MiB, alternate, base_parser, fmt_size, parse_size, work_dir
from benchmarks.harness.report import print_footer, print_header, ratio, save_json, summarize, table
from benchmarks.harness.runs import run_export, write_jobs
from benchmarks.harness.sim import TOKEN, SimProcess, export_spec


# -- the naive client (what people write) ------------------------------------------------
def naive_client(url: str, token: str, export_ids: list[str], out: Path, poll_s: float = 0.1) -> list[dict[str, Any]]:
    import requests

    session = requests.Session()
    session.headers["Authorization"] = token
    done = []
    for export_id in export_ids:
        r = session.post(f"{url}/v1/exports/{export_id}/executions", json={})
        r.raise_for_status()
        execution_id = r.json()["data"]["id"]
        while True:
            r = session.get(f"{url}/v1/exports/{export_id}/executions", params={"first_result": 0, "max_results": 10})
            r.raise_for_status()
            status = next(e["status"] for e in r.json()["data"] if e["id"] == execution_id)
            if status in ("SUCCEEDED", "FAILED", "CANCELED"):
                break
            time.sleep(poll_s)
        t0 = time.perf_counter()
        records = size = 0
        file_url = f"{url}/v1/exports/{export_id}/executions/{execution_id}/files/technical_name=export"
        with session.get(file_url, stream=True) as r, (out / f"{export_id}.ndjson").open("wb") as f:
            r.raise_for_status()
            for line in r.iter_lines():
                if line:
                    json.loads(line)
                    records += 1
                f.write(line + b"\n")
                size += len(line) + 1
        done.append({"export_id": export_id, "records": records, "bytes": size, "download_s": time.perf_counter() - t0})
    return done


def run_naive(url: str, export_ids: list[str], out: Path) -> tuple[float, list[dict[str, Any]]]:
    """The naive client in its own process; returns (wall s, per-export results)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [PYTHON, __file__, "--client", url, str(out), *export_ids], capture_output=True, text=True, check=True
    )
    wall = time.perf_counter() - t0
    for p in out.glob("*.ndjson"):
        p.unlink()
    return wall, json.loads(proc.stdout)


# -- the benchmark -------------------------------------------------------------------------
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        url, out, *ids = sys.argv[2:]
        print(json.dumps(naive_client(url, TOKEN, ids, Path(out))))
        return
    p = base_parser(__doc__ or "")
    p.add_argument("--size", type=parse_size, default=None, help="single-export size (default 256M; quick 32M)")
    p.add_argument("--multi-size", type=parse_size, default=None, help="each of the 4 (default 64M; quick 8M)")
    args = p.parse_args()
    size = args.size or (32 * MiB if args.quick else 256 * MiB)
    msize = args.multi_size or (8 * MiB if args.quick else 64 * MiB)
    repeats = args.repeats or (2 if args.quick else 3)
    meta = print_header(f"naive baseline: requests + iter_lines + json.loads vs mics-export run ({fmt_size(size)})")
    print(f"repeats: {repeats} per variant, alternating\n")
    # Job files accept digit-only export ids: 1 small, 2 big, 11-14 the concurrent ones.
    exports = [export_spec("1", size, "small"), export_spec("2", size, "big")]
    exports += [export_spec(f"1{i + 1}", msize, "small", pending_s=0.5, running_s=1.5) for i in range(4)]
    workloads = {
        "small": (["1"], f"one {fmt_size(size)} export, small records"),
        "big": (["2"], f"one {fmt_size(size)} export, big records"),
        "multi": ([f"1{i + 1}" for i in range(4)], f"4 × {fmt_size(msize)} small, 2 s lifecycles"),
    }
    variants = ["naive", "run_default", "run_w0"]
    results: dict[str, Any] = {"machine": meta, "size": size, "multi_size": msize, "repeats": repeats, "workloads": {}}
    with work_dir(args.out_dir) as d, SimProcess(exports, d) as sim:
        sim.warm("1")
        sim.warm("2")
        env = sim.env()
        for name, (ids, label) in workloads.items():
            jobs = write_jobs(
                d,
                [{"name": f"{name}-{i}", "export_id": e} for i, e in enumerate(ids)],
                poll={"initial_s": 0.1, "max_s": 0.5},
                name=f"{name}.yaml",
            )
            mb_s: dict[str, list[float]] = {v: [] for v in variants}
            wall: dict[str, list[float]] = {v: [] for v in variants}
            for rep, v in alternate(variants, repeats):
                if v == "naive":
                    w, done = run_naive(sim.url, ids, d / "naive")
                    mb_s[v].append(sum(x["bytes"] for x in done) / sum(x["download_s"] for x in done) / 1e6)
                    wall[v].append(w)
                else:
                    res = run_export(jobs, env, d / "out", workers=0 if v == "run_w0" else None)
                    mb_s[v].append(res.download_mb_s)
                    wall[v].append(res.wall_s)
                print(
                    f"  [{name} rep {rep + 1}] {v:12s} {mb_s[v][-1]:7.1f} MB/s  wall {wall[v][-1]:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
            labels = {
                "naive": "naive: requests iter_lines + json.loads, sequential",
                "run_default": "mics-export run, default workers",
                "run_w0": "mics-export run --workers 0",
            }
            rows = [
                (
                    labels[v],
                    summarize(mb_s[v]).fmt(1),
                    ratio(mb_s[v], mb_s["naive"]).fmt(1, "×"),
                    summarize(wall[v]).fmt(1),
                    ratio(wall["naive"], wall[v]).fmt(1, "×"),
                )
                for v in variants
            ]
            print(f"## {label}\n")
            print(table(("client", "download MB/s", "MB/s × naive", "wall s", "naive wall ÷ this wall"), rows))
            print(flush=True)
            results["workloads"][name] = {
                "label": label,
                "mb_s": mb_s,
                "wall_s": wall,
                "speedup": ratio(mb_s["run_default"], mb_s["naive"]).median,
            }
    trows = []
    for name in ("small", "big"):
        r = ratio(results["workloads"][name]["mb_s"]["run_default"], results["workloads"][name]["mb_s"]["naive"])
        trows.append(
            (
                f"default workers ≥ 5× naive, {name} records (download MB/s)",
                r.fmt(1, "×"),
                "met" if r.median >= 5 else "MISSED",
            )
        )
    m = results["workloads"]["multi"]["wall_s"]
    r = ratio(m["naive"], m["run_default"])
    trows.append(("4 exports with lifecycles: naive wall ÷ tool wall (for context)", r.fmt(1, "×"), ""))
    print(table(("target", "measured (same run)", ""), trows))
    print_footer()
    if args.json:
        save_json("naive_baseline" + ("-quick" if args.quick else ""), results)


if __name__ == "__main__":
    main()
