"""Writing to a bucket: throughput to moto (S3) against a local folder, and peak RSS to a bucket.

One export of small records, downloaded from the simulator (its own process) by
``mics-export run`` (a subprocess, default workers), alternately into a local folder and
into ``s3://`` on a moto server (its own process, on loopback), ≥2 runs each. Reported per
target: the run's download MB/s (what the job_succeeded line says: stream, check, hash,
write or upload), wall time, and the peak RSS summed over the run's process tree (main +
validation workers; sampled every 20 ms; the simulator and moto are not counted).

moto is a Python server (werkzeug) that keeps every part in memory and assembles the
object at completion: its own speed bounds the S3 figure, which says nothing about AWS's.
What this measures is that the upload path keeps memory bounded (parts of 5 MiB, 2 in
flight, a 4-block queue) and how much the bucket path costs over the local one at most.

    python benchmarks/bucket.py                 # 1 GiB, 2 runs each (~2 min on 2 cores)
    python benchmarks/bucket.py --size 256MiB --repeats 1
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import events
from benchmarks.harness.base import GiB, MiB, base_parser, fmt_size, parse_size, work_dir
from benchmarks.harness.report import print_footer, print_header, save_json, summarize, table
from benchmarks.harness.runs import run_cmd, write_jobs
from benchmarks.harness.sampler import ProcSampler
from benchmarks.harness.sim import SimProcess, export_spec

_MOTO = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""


def start_moto() -> tuple[subprocess.Popen[str], dict[str, str]]:
    """moto on a free port; the standard AWS environment pointing at it."""
    proc = subprocess.Popen([sys.executable, "-c", _MOTO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ALLOW_HTTP": "true",
    }
    return proc, env


def one_run(jobs: Path, env: dict[str, str], output: str) -> dict[str, Any]:
    """One ``mics-export run`` into ``output``: MB/s, wall, peak RSS of its process tree."""
    cmd = run_cmd(jobs, Path("/nonexistent"))
    cmd[cmd.index("--output-dir") + 1] = output
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = ProcSampler(proc.pid, 0.02)
    sampler.sample()
    sampler.start()
    _, log = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"run into {output} failed (exit {proc.returncode}):\n{log[-3000:]}")
    return {"mb_s": events.succeeded(log)[0].mb_s, "wall_s": wall, "peak_rss": sampler.peak}


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--size", type=parse_size, default=GiB)
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 2)
    meta = print_header(f"bucket: {fmt_size(args.size)} to a local folder vs s3:// on moto")
    import boto3

    moto, aws = start_moto()
    try:
        with work_dir() as folder, SimProcess([export_spec("1", args.size)], folder) as sim:
            sim.warm("1")
            jobs = write_jobs(folder, [{"name": "big", "export_id": "1"}])
            env = {**sim.env(), **aws}
            s3 = boto3.client(
                "s3",
                endpoint_url=aws["AWS_ENDPOINT_URL"],
                region_name="us-east-1",
                aws_access_key_id="bench",
                aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"],
            )
            results: dict[str, list[dict[str, Any]]] = {"local": [], "s3": []}
            for i in range(args.repeats):
                for target in ("local", "s3"):
                    if target == "local":
                        output = str(folder / f"out-{i}")
                    else:
                        bucket = f"bench-{uuid.uuid4().hex[:12]}"
                        s3.create_bucket(Bucket=bucket)
                        output = f"s3://{bucket}/run"
                    results[target].append(one_run(jobs, env, output))
                    if target == "s3":  # free moto's memory before the next run
                        s3.delete_object(Bucket=bucket, Key="run/big.ndjson")
                    else:
                        os.system(f"rm -rf {output}")  # noqa: S605 - our own temp folder
        rows = []
        for target, runs in results.items():
            mb = summarize([r["mb_s"] for r in runs])
            rss = max(r["peak_rss"] for r in runs)
            rows.append([target, f"{mb.median:.0f}", f"{min(r['wall_s'] for r in runs):.1f}", f"{rss / MiB:.0f}"])
        print(table(["target", "download MB/s (median)", "best wall s", "peak RSS MiB (max)"], rows))
        ratio = (
            summarize([r["mb_s"] for r in results["s3"]]).median
            / summarize([r["mb_s"] for r in results["local"]]).median
        )
        print(f"\ns3 (moto) / local throughput: {ratio:.2f}x (moto bounds the s3 figure: see the docstring)")
        if args.json:
            save_json("bucket", {"machine": meta, "size": args.size, "results": results, "ratio": ratio})
        print(json.dumps({k: [round(r["mb_s"]) for r in v] for k, v in results.items()}))
    finally:
        if moto.stdin:
            moto.stdin.close()
        moto.terminate()
        moto.wait(10)
    print_footer()


if __name__ == "__main__":
    main()
