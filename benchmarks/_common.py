"""Shared helpers for the benchmarks: the simulator as a separate process, job files,
running ``mics-export run`` as a subprocess, alternating repeats, tables, JSON results,
RSS sampling over a process tree and py-spy summaries.

Every benchmark compares against a baseline measured in the same invocation, with the
variants run in alternation (the order rotates each repeat), and reports medians with
min–max ranges. The machine is shared and noisy: read ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
PLOTS = BENCH / "plots"
MiB = 1 << 20
GiB = 1 << 30
TOKEN = "bench-token-7c1d"
ORG = "1426"
PYTHON = sys.executable

# Fast retries (the simulator runs without faults here) — the same as tests/support.py.
FAST_API = {"retries": {"max_tries": 6, "base_s": 0.005, "max_wait_s": 0.05, "max_time_s": 30}}


# -- sizes and arguments -------------------------------------------------------------------
def parse_size(text: str) -> int:
    """``50M``, ``256MiB``, ``1G``, ``4GiB`` or a number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 1G)")
    unit = {"": 1, "K": 1 << 10, "M": MiB, "G": GiB}[m.group(2).upper()]
    return int(float(m.group(1)) * unit)


def fmt_size(n: int) -> str:
    """1073741824 → '1 GiB', 52428800 → '50 MiB'."""
    if n >= GiB and n % GiB == 0:
        return f"{n // GiB} GiB"
    if n >= MiB:
        return f"{n / MiB:g} MiB"
    return f"{n / 1024:g} KiB" if n >= 1024 else f"{n} B"


def base_parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and fewer repeats: a smoke test")
    p.add_argument("--repeats", type=int, default=None, help="runs per variant (alternating; default 3)")
    p.add_argument("--json", action="store_true", help=f"save raw results under {RESULTS.relative_to(ROOT)}/")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="folder for downloaded files on disk (default: a temp folder under /tmp, removed at the end)",
    )
    return p


# -- the machine ---------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) * 1024
    return {
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "mem_gib": round(mem / GiB, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": os.getloadavg(),
    }


def print_header(title: str) -> dict[str, Any]:
    m = machine()
    print(f"# {title}")
    print(
        f"machine: {m['affinity']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB RAM, Python {m['python']}; "
        f"load average at start {m['loadavg'][0]:.2f}"
    )
    print("noisy shared host: compare ratios within this run; differences under ~15% are noise\n", flush=True)
    return m


def print_footer() -> None:
    print(f"\nload average at end {os.getloadavg()[0]:.2f}", flush=True)


# -- statistics and tables -----------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    median: float
    lo: float
    hi: float
    n: int

    def fmt(self, digits: int = 1, unit: str = "") -> str:
        if self.n == 0:
            return "–"
        if self.n == 1 or self.lo == self.hi:
            return f"{self.median:.{digits}f}{unit}"
        return f"{self.median:.{digits}f}{unit} ({self.lo:.{digits}f}–{self.hi:.{digits}f})"


def summarize(values: Sequence[float]) -> Summary:
    vals = [v for v in values if v is not None]
    if not vals:
        return Summary(float("nan"), float("nan"), float("nan"), 0)
    return Summary(statistics.median(vals), min(vals), max(vals), len(vals))


def ratio(values: Sequence[float], baseline: Sequence[float]) -> Summary:
    """Median ratio, with the range spanned by the extremes (lo/hi of each side)."""
    a, b = summarize(values), summarize(baseline)
    if a.n == 0 or b.n == 0 or b.median == 0:
        return Summary(float("nan"), float("nan"), float("nan"), 0)
    return Summary(a.median / b.median, a.lo / b.hi, a.hi / b.lo, min(a.n, b.n))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pasteable into the README), columns padded for the terminal."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def alternate(variants: Sequence[str], repeats: int) -> Iterator[tuple[int, str]]:
    """(repeat, variant) in alternation; the order rotates each repeat (no position bias)."""
    for rep in range(repeats):
        k = rep % len(variants)
        for v in list(variants[k:]) + list(variants[:k]):
            yield rep, v


def save_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=_jsonable))
    print(f"raw results: {path.relative_to(ROOT)}")
    return path


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def load_json(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


# -- temp folders --------------------------------------------------------------------------
@contextlib.contextmanager
def work_dir(base: Path | None = None, prefix: str = "mics-bench-") -> Iterator[Path]:
    """A fresh folder (under ``base`` or /tmp), removed at the end."""
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fresh(folder: Path) -> Path:
    """Empty ``folder`` (outputs of a previous run would make the next one skip its jobs)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


# -- the simulator in its own process ------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def export_spec(
    export_id: str, size: int, shape: str = "small", pending_s: float = 0.0, running_s: float = 0.0, **extra: Any
) -> dict[str, Any]:
    return {
        "id": export_id,
        "size_bytes": size,
        "shape": shape,
        "pending_s": pending_s,
        "running_s": running_s,
        **extra,
    }


class SimProcess:
    """``mics-export simulate`` as a separate process (its own GIL) on 127.0.0.1."""

    def __init__(self, exports: list[dict[str, Any]], folder: Path, **scenario: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.folder = folder
        self.scenario = {"token": TOKEN, **scenario, "exports": exports}
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SimProcess:
        path = self.folder / f"scenario-{self.port}.yaml"
        path.write_text(yaml.safe_dump(self.scenario, sort_keys=False))
        self._log = (self.folder / f"simulator-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "orchestrator",
                "simulate",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--scenario",
                str(path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"simulator exited: {(self.folder / f'simulator-{self.port}.log').read_text()}")
            with contextlib.suppress(OSError):
                status, _ = api(self.url, "GET", f"/v1/exports?organisation_id={ORG}")
                if status == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError("simulator did not answer within 30 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def env(self) -> dict[str, str]:
        return cli_env(self.url)

    def warm(self, export_id: str) -> None:
        """Make the simulator build its block templates before anything is timed."""
        exe = create_execution(self.url, export_id)
        wait_final(self.url, export_id, exe)
        url = file_url(self.url, export_id, exe)
        req = urllib.request.Request(url, headers={"Authorization": TOKEN})  # noqa: S310 - http://127.0.0.1
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - 127.0.0.1 only
            while resp.read(4 * MiB):
                pass


def cli_env(url: str, token: str = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICS_") and k != "JOB_COMPLETION_INDEX"}
    env["MICS_API_URL"] = url
    env["MICS_API_TOKEN"] = token
    return env


def api(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": TOKEN}
    if data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - 127.0.0.1 only
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def create_execution(url: str, export_id: str) -> str:
    status, body = api(url, "POST", f"/v1/exports/{export_id}/executions", {})
    assert status == 200, status
    return str(body["data"]["id"])


def wait_final(url: str, export_id: str, exe: str, every_s: float = 0.05) -> str:
    while True:
        _, body = api(url, "GET", f"/v1/exports/{export_id}/executions?first_result=0&max_results=10")
        for item in body["data"]:
            if item["id"] == exe and item["status"] in ("SUCCEEDED", "FAILED", "CANCELED"):
                return str(item["status"])
        time.sleep(every_s)


def file_url(url: str, export_id: str, exe: str) -> str:
    return f"{url}/v1/exports/{export_id}/executions/{exe}/files/technical_name=export"


# -- job files and runs --------------------------------------------------------------------
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


_SUCCEEDED = re.compile(r"SUCCEEDED: (\d+) records, (\d+) bytes in [\d.]+s \(([\d.]+) MB/s\)")


@dataclass
class JobLine:
    job: str
    records: int
    bytes: int
    mb_s: float
    end_ts: float  # epoch seconds of the SUCCEEDED log line

    @property
    def seconds(self) -> float:
        """Download phase (request to fsync+rename), from the logged MB/s (4 digits)."""
        return self.bytes / (self.mb_s * 1e6) if self.mb_s else float("nan")


@dataclass
class RunResult:
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
        return self.cpu_user_s + self.cpu_sys_s

    @property
    def download_s(self) -> float:
        """From the first download's start to the last one's end (all jobs' download phases)."""
        if not self.jobs:
            return float("nan")
        return max(j.end_ts for j in self.jobs) - min(j.end_ts - j.seconds for j in self.jobs)

    @property
    def bytes(self) -> int:
        return sum(j.bytes for j in self.jobs)

    @property
    def download_mb_s(self) -> float:
        return self.bytes / self.download_s / 1e6


def _ts(text: str) -> float:
    import calendar

    head, ms = text.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S")) + int(ms) / 1000


# Runs the real CLI, counting the manifest writes (write_atomic of manifest.json) on the side:
# the count is printed to stderr at exit. Used by scale.py; nothing else in the run changes.
COUNT_MANIFEST_WRITES = """
import atexit, sys
import orchestrator.manifest as _m
_n = [0, 0]
_w = _m.write_atomic
def _count(path, data):
    if path.name == "manifest.json":
        _n[0] += 1
        _n[1] += len(data)
    return _w(path, data)
_m.write_atomic = _count
atexit.register(lambda: sys.stderr.write(f"MANIFEST_WRITES {_n[0]} {_n[1]}\\n"))
sys.argv[0] = "mics-export"
from orchestrator.cli import main
main()
"""


def run_cmd(
    jobs_file: Path,
    out: Path,
    workers: int | None = None,
    concurrency: int | None = None,
    count_manifest_writes: bool = False,
) -> list[str]:
    head = [PYTHON, "-c", COUNT_MANIFEST_WRITES] if count_manifest_writes else [PYTHON, "-m", "orchestrator"]
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
    result = RunResult(proc.returncode, wall, usage.ru_utime, usage.ru_stime, None, log_tail=text[-3000:])
    for line in text.splitlines():
        if line.startswith("MANIFEST_WRITES "):
            result.manifest_writes, result.manifest_bytes = map(int, line.split()[1:3])
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "run_started":
            m = re.search(r"(\d+) validation worker", rec.get("message", ""))
            result.workers = int(m.group(1)) if m else None
        elif rec.get("event") == "job_succeeded":
            m = _SUCCEEDED.search(rec["message"])
            if m:
                result.jobs.append(
                    JobLine(rec["job"], int(m.group(1)), int(m.group(2)), float(m.group(3)), _ts(rec["ts"]))
                )
    if proc.returncode != 0:
        raise RuntimeError(f"run failed (exit {proc.returncode}):\n{text[-3000:]}")
    if sampler:
        result.peak_rss, result.peak_rss_by_role, result.processes = sampler.peak, sampler.by_role, sampler.max_procs
        result.peak_pss, result.samples = sampler.peak_pss, len(sampler.series)
        result.rss_parts = sampler.parts_at_peak
        if result.jobs:
            end = max(j.end_ts for j in result.jobs)
            result.download_cpu = sampler.cpu_between(end - result.download_s, end)
    if clean:
        shutil.rmtree(out, ignore_errors=True)
    return result


# -- RSS and CPU over a process tree ---------------------------------------------------------
def _rss_parts(pid: int) -> dict[str, int]:
    """RssAnon / RssFile / RssShmem of a process, in bytes (/proc/PID/status)."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


class ProcSampler(threading.Thread):
    """Every ``interval`` s: RSS summed over the process and all its descendants (max kept), and
    the cumulative CPU of the main process, of its descendants (validation workers) and of
    any ``others`` (the simulator), so that CPU over a time window can be read back.

    ``by_role``: the peak RSS seen for the main process and for the biggest worker.
    """

    def __init__(
        self, pid: int, interval: float = 0.02, others: dict[str, int] | None = None, pss: bool = False
    ) -> None:
        super().__init__(daemon=True)
        self.pss = pss
        self.peak_pss = 0
        self.parts_at_peak: dict[str, int] = {}
        import psutil

        self.root = psutil.Process(pid)
        self.others = {name: psutil.Process(p) for name, p in (others or {}).items()}
        self.interval = interval
        self.peak = 0
        self.max_procs = 0
        self.by_role: dict[str, int] = {"main": 0, "worker_max": 0}
        self.series: list[tuple[float, dict[str, float]]] = []
        self._child_cpu: dict[int, float] = {}
        self._main_cpu = 0.0
        self._halt = threading.Event()

    def sample(self) -> bool:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return False
        total = total_pss = 0
        parts: Counter[str] = Counter()
        for p in procs:
            try:
                with p.oneshot():
                    rss = p.memory_info().rss
                    t = p.cpu_times()
                parts.update(_rss_parts(p.pid))
                if self.pss and len(self.series) % 10 == 0:  # smaps_rollup is slow: every 10th sample
                    total_pss += p.memory_full_info().pss
            except psutil.Error:
                continue
            total += rss
            if p.pid == self.root.pid:
                self.by_role["main"] = max(self.by_role["main"], rss)
                self._main_cpu = t.user + t.system
            else:
                self.by_role["worker_max"] = max(self.by_role["worker_max"], rss)
                self._child_cpu[p.pid] = t.user + t.system
        cpu = {"main": self._main_cpu, "workers": sum(self._child_cpu.values())}
        for name, p in self.others.items():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                cpu[name] = t.user + t.system
        self.series.append((time.time(), cpu))
        if total > self.peak:
            self.parts_at_peak = dict(parts)
        self.peak = max(self.peak, total)
        self.peak_pss = max(self.peak_pss, total_pss)
        self.max_procs = max(self.max_procs, len(procs))
        return True

    def run(self) -> None:
        while not self._halt.is_set() and self.sample():
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def cpu_between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per role between two epoch times (linear interpolation of the samples)."""
        if len(self.series) < 2:
            return {}

        def at(t: float, role: str) -> float:
            pts = [(ts, c.get(role, 0.0)) for ts, c in self.series]
            if t <= pts[0][0]:
                return pts[0][1]
            for (ta, va), (tb, vb) in itertools.pairwise(pts):
                if ta <= t <= tb:
                    return va + (vb - va) * ((t - ta) / (tb - ta) if tb > ta else 0.0)
            return pts[-1][1]

        roles = set().union(*(c.keys() for _, c in self.series))
        return {r: max(0.0, at(t1, r) - at(t0, r)) for r in sorted(roles)}


# -- the one-core validation ceiling -------------------------------------------------------
def ceiling_chunks(size: int, shape: str) -> list[bytes]:
    """The bytes of a simulator result file, in memory, as 1 MiB ``bytes`` chunks."""
    from orchestrator.simulator.data import ResultFile

    return [bytes(v) for v in ResultFile(size, shape).iter_chunks()]


def ceiling_mb_s(chunks: list[bytes]) -> float:
    """``LineChecker.feed`` alone over in-memory chunks, one core: MB/s of the feed loop."""
    from orchestrator.ndjson import LineChecker

    checker = LineChecker()
    feed = checker.feed
    t0 = time.perf_counter()
    for chunk in chunks:
        feed(chunk)
    checker.finish()
    dt = time.perf_counter() - t0
    return sum(map(len, chunks)) / dt / 1e6


def parallel_ceiling_mb_s(size: int, shape: str, processes: int = 2) -> float:
    """Aggregate MB/s of ``processes`` processes running the ceiling loop at the same moment.

    Each child builds its chunks, says ready, waits for "go" on stdin, times its own feed
    loop and prints its MB/s; the result is the sum. It shows what the cores can parse at
    once (shared caches, memory bandwidth, a noisy neighbour), which a one-core ceiling
    times N does not.
    """
    code = (
        f"import sys; sys.path.insert(0, {str(BENCH)!r})\n"
        "from _common import ceiling_chunks, ceiling_mb_s\n"
        f"chunks = ceiling_chunks({size}, {shape!r})\n"
        "print('ready', flush=True); sys.stdin.readline()\n"
        "print(ceiling_mb_s(chunks), flush=True)\n"
    )
    procs = [
        subprocess.Popen([PYTHON, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    total = 0.0
    for p in procs:
        assert p.stdout is not None
        total += float(p.stdout.readline())
        p.wait()
    return total


# -- curl ------------------------------------------------------------------------------------
def curl(url: str, dest: str, fsync: bool = False) -> float:
    """Seconds for ``curl -s -o DEST URL`` (plus an fsync of DEST, as the tool does, if asked)."""
    t0 = time.perf_counter()
    subprocess.run(["curl", "-s", "-f", "-H", f"Authorization: {TOKEN}", "-o", dest, url], check=True)
    if fsync and dest != "/dev/null":
        fd = os.open(dest, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


# -- py-spy ----------------------------------------------------------------------------------
def pyspy_record(cmd: list[str], env: dict[str, str], raw: Path, rate: int = 200) -> float:
    """Run ``cmd`` under ``py-spy record --format raw --threads --subprocesses``; returns wall s."""
    spy = shutil.which("py-spy", path=str(Path(PYTHON).parent)) or "py-spy"
    t0 = time.perf_counter()
    subprocess.run(
        [
            spy,
            "record",
            "--format",
            "raw",
            "--threads",
            "--subprocesses",
            "--rate",
            str(rate),
            "--nonblocking",
            "-o",
            str(raw),
            "--",
            *cmd,
        ],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^():]+?)(?::\d+)?\)$")


def _role(frames: list[str]) -> str:
    """main process (by thread) or validation worker, from a stack's process and thread frames."""
    proc = next((f for f in frames if f.startswith("process ")), "")
    if "orchestrator.workers" in proc or any("_serve (orchestrator/workers.py" in f for f in frames):
        return "worker processes"
    thread = next((f for f in frames if f.startswith("thread (")), "")
    name = thread.partition("): ")[2]
    if name.startswith("writer:") or any("_FileWriter._run" in f for f in frames):
        return "main: writer thread"
    if name == "MainThread":
        return "main: event loop"
    return "main: other threads" if name else "main: event loop"


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame[:60]
    file = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m.group('func')} ({file})"


def pyspy_summary(raw: Path, rate: int, wall_s: float, top: int = 12) -> tuple[str, dict[str, Any]]:
    """Aggregate a raw py-spy profile: CPU-seconds per role, then the top leaf frames."""
    stacks: list[tuple[list[str], int]] = []
    lines = raw.read_text(errors="replace").splitlines()
    # A command line with newlines would split a stack; only lines ending in a count are kept.
    for line in lines:
        head, _, count = line.rpartition(" ")
        if not count.isdigit() or not head:
            continue
        stacks.append((head.split(";"), int(count)))
    by_role: Counter[str] = Counter()
    leaves: dict[str, Counter[str]] = defaultdict(Counter)
    inclusive: Counter[str] = Counter()  # orchestrator functions, including what they call
    total = 0
    for frames, n in stacks:
        py = [f for f in frames if not f.startswith(("process ", "thread ("))]
        if not py:
            continue
        role = _role(frames)
        by_role[role] += n
        leaves[role][_short(py[-1])] += n
        for name in {_short(f) for f in py if "orchestrator/" in f}:
            inclusive[name] += n
        total += n
    rows_role = [(role, f"{n / total:.0%}") for role, n in by_role.most_common()]
    all_leaves: Counter[tuple[str, str]] = Counter()
    for role, c in leaves.items():
        for leaf, n in c.items():
            all_leaves[(role, leaf)] += n
    rows_leaf = [(role, leaf, f"{n / total:.1%}") for (role, leaf), n in all_leaves.most_common(top)]
    text = (
        f"py-spy: {total} non-idle samples at {rate} Hz over {wall_s:.1f} s wall (a runnable thread that waits "
        "for a CPU counts as busy, so read shares, not seconds)\n\n"
        + table(("process / thread", "share of samples"), rows_role)
        + "\n\n"
        + table(("process / thread", "leaf frame", "samples"), rows_leaf)
        + "\n\n"
        + table(
            ("orchestrator function (inclusive of callees)", "samples"),
            [(k, f"{n / total:.1%}") for k, n in inclusive.most_common(top)],
        )
    )
    return text, {
        "by_role": dict(by_role),
        "leaves": [[*k, n] for k, n in all_leaves.most_common(40)],
        "inclusive": inclusive.most_common(40),
        "total": total,
        "rate": rate,
        "wall_s": wall_s,
    }


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
