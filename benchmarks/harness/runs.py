"""Job files, and ``mics-export run`` as a subprocess measured from outside: wall time,
rusage (validation workers included), the JSON log's events, manifest bytes written, and
optionally RSS and CPU sampled over its process tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.harness import events
from benchmarks.harness.base import BENCH, PYTHON, fresh
from benchmarks.harness.events import JobLine
from benchmarks.harness.sampler import ProcSampler
from benchmarks.harness.sim import ORG

# Fast retries (the simulator runs without faults here) — the same as tests/support.py.
FAST_API = {"retries": {"max_tries": 6, "base_s": 0.005, "max_wait_s": 0.05, "max_time_s": 30}}
COUNTING_CLI = BENCH / "harness" / "count_manifest_writes.py"


def write_jobs(
    folder: Path,
    jobs: list[dict[str, Any]],
    *,
    concurrency: int = 8,
    poll: dict[str, float] | None = None,
    timeout_s: float = 3600,
    name: str = "jobs.yaml",
) -> Path:
    """A job file; the output folder is given per run with ``--output-dir``."""
    doc = {
        "version": 1,
        "api": FAST_API,
        "run": {"output_dir": str(folder / "out"), "concurrency": concurrency},
        "defaults": {
            "organisation_id": ORG,
            "poll": poll or {"initial_s": 0.01, "max_s": 0.05},
            "timeout_s": timeout_s,
            "retries": 0,
        },
        "jobs": jobs,
    }
    path = folder / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@dataclass
class RunResult:
    """What one measured run gave."""

    rc: int
    wall_s: float
    cpu_user_s: float
    cpu_sys_s: float
    workers: int | None
    jobs: list[JobLine] = field(default_factory=list)
    peak_rss: int = 0
    peak_pss: int = 0
    rss_parts: dict[str, int] = field(default_factory=dict)
    manifest_writes: int = 0
    manifest_bytes: int = 0
    samples: int = 0
    peak_rss_by_role: dict[str, int] = field(default_factory=dict)
    processes: int = 0
    download_cpu: dict[str, float] = field(default_factory=dict)
    log_tail: str = ""

    @property
    def cpu_s(self) -> float:
        """User + system CPU of the run and its children."""
        return self.cpu_user_s + self.cpu_sys_s

    @property
    def download_s(self) -> float:
        """From the first download's start to the last one's end (all jobs' download phases)."""
        if not self.jobs:
            return float("nan")
        return max(j.end_ts for j in self.jobs) - min(j.end_ts - j.seconds for j in self.jobs)

    @property
    def bytes(self) -> int:
        """Bytes of every job's file."""
        return sum(j.bytes for j in self.jobs)

    @property
    def download_mb_s(self) -> float:
        """Bytes over the span of the download phases."""
        return self.bytes / self.download_s / 1e6


def run_cmd(
    jobs_file: Path,
    out: Path,
    workers: int | None = None,
    concurrency: int | None = None,
    count_manifest_writes: bool = False,
) -> list[str]:
    """The ``mics-export run`` command line (JSON logs, no live display)."""
    head = [PYTHON, str(COUNTING_CLI)] if count_manifest_writes else [PYTHON, "-m", "orchestrator"]
    cmd = [*head, "run", str(jobs_file), "--progress", "off", "--log-format", "json", "--output-dir", str(out)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    if concurrency is not None:
        cmd += ["--concurrency", str(concurrency)]
    return cmd


def run_export(
    jobs_file: Path,
    env: dict[str, str],
    out: Path,
    *,
    workers: int | None = None,
    concurrency: int | None = None,
    sample_interval: float | None = None,
    others: dict[str, int] | None = None,
    pss: bool = False,
    count_manifest_writes: bool = False,
    clean: bool = True,
) -> RunResult:
    """``mics-export run`` as a subprocess into a fresh ``out``; rusage from wait4 (workers included).

    With ``sample_interval``, a :class:`ProcSampler` records peak RSS of the run's process tree
    and CPU per role (main, workers, and ``others`` such as the simulator) during the download.
    """
    fresh(out)
    log_path = out.parent / f".{out.name}.log"
    sampler: ProcSampler | None = None
    with log_path.open("wb") as log:
        t0 = time.perf_counter()
        cmd = run_cmd(jobs_file, out, workers, concurrency, count_manifest_writes)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)
        if sample_interval:
            sampler = ProcSampler(proc.pid, sample_interval, others, pss)
            sampler.sample()
            sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if sampler:
            sampler.stop()
    text = log_path.read_text(errors="replace")
    log_path.unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"run failed (exit {proc.returncode}):\n{text[-3000:]}")
    result = RunResult(proc.returncode, wall, usage.ru_utime, usage.ru_stime, None, log_tail=text[-3000:])
    _read_log(result, text, workers)
    if sampler:
        _read_sampler(result, sampler)
    if clean:
        shutil.rmtree(out, ignore_errors=True)
    return result


def _read_log(result: RunResult, text: str, workers: int | None) -> None:
    """Fill ``result`` from the run's stderr: its JSON events and the counter's last line."""
    for line in text.splitlines():
        if line.startswith("MANIFEST_WRITES "):
            result.manifest_writes, result.manifest_bytes = map(int, line.split()[1:3])
    result.jobs = events.succeeded(text)
    # The workers the run started: its own word when run_started says it; else what it was
    # told, or the default it computes from the CPUs this process (its parent) may use too.
    result.workers = events.workers(text)
    if result.workers is None:
        from orchestrator.workers import default_workers

        result.workers = default_workers() if workers is None else workers


def _read_sampler(result: RunResult, sampler: ProcSampler) -> None:
    """Peak RSS, and the CPU per role over the download phases."""
    result.peak_rss, result.peak_rss_by_role, result.processes = sampler.peak, sampler.by_role, sampler.max_procs
    result.peak_pss, result.samples = sampler.peak_pss, len(sampler.series)
    result.rss_parts = sampler.parts_at_peak
    if result.jobs:
        end = max(j.end_ts for j in result.jobs)
        result.download_cpu = sampler.cpu_between(end - result.download_s, end)
