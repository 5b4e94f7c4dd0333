"""RSS and CPU over a process tree, sampled on a thread while a run goes on."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any


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
        # Imported here: psutil is in the bench extra, and only the sampling scripts need it.
        import psutil

        self._psutil: Any = psutil
        self.pss = pss
        self.peak_pss = 0
        self.parts_at_peak: dict[str, int] = {}
        self.root: Any = psutil.Process(pid)
        self.others: dict[str, Any] = {name: psutil.Process(p) for name, p in (others or {}).items()}
        self.interval = interval
        self.peak = 0
        self.max_procs = 0
        self.by_role: dict[str, int] = {"main": 0, "worker_max": 0}
        self.series: list[tuple[float, dict[str, float]]] = []
        self._child_cpu: dict[int, float] = {}
        self._main_cpu = 0.0
        self._halt = threading.Event()

    def sample(self) -> bool:
        """One sample; False once the process is gone."""
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except self._psutil.Error:
            return False
        total = total_pss = 0
        parts: Counter[str] = Counter()
        for p in procs:
            try:
                with p.oneshot():
                    rss: int = p.memory_info().rss
                    t = p.cpu_times()
                parts.update(_rss_parts(p.pid))
                if self.pss and len(self.series) % 10 == 0:  # smaps_rollup is slow: every 10th sample
                    total_pss += p.memory_full_info().pss
            except self._psutil.Error:
                continue
            total += rss
            self._account(p.pid, rss, t.user + t.system)
        cpu = {"main": self._main_cpu, "workers": sum(self._child_cpu.values())}
        for name, p in self.others.items():
            with contextlib.suppress(self._psutil.Error):
                t = p.cpu_times()
                cpu[name] = t.user + t.system
        self.series.append((time.time(), cpu))
        if total > self.peak:
            self.parts_at_peak = dict(parts)
        self.peak = max(self.peak, total)
        self.peak_pss = max(self.peak_pss, total_pss)
        self.max_procs = max(self.max_procs, len(procs))
        return True

    def _account(self, pid: int, rss: int, cpu: float) -> None:
        if pid == self.root.pid:
            self.by_role["main"] = max(self.by_role["main"], rss)
            self._main_cpu = cpu
        else:
            self.by_role["worker_max"] = max(self.by_role["worker_max"], rss)
            self._child_cpu[pid] = cpu

    def run(self) -> None:
        """Sample until stopped or until the process is gone."""
        while not self._halt.is_set() and self.sample():
            self._halt.wait(self.interval)

    def stop(self) -> None:
        """Stop sampling (and wait for the thread)."""
        self._halt.set()
        self.join()

    def cpu_between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per role between two epoch times (linear interpolation of the samples)."""
        if len(self.series) < 2:
            return {}
        roles = set().union(*(c.keys() for _, c in self.series))
        return {r: max(0.0, self._cpu_at(t1, r) - self._cpu_at(t0, r)) for r in sorted(roles)}

    def _cpu_at(self, t: float, role: str) -> float:
        pts = [(ts, c.get(role, 0.0)) for ts, c in self.series]
        if t <= pts[0][0]:
            return pts[0][1]
        for (ta, va), (tb, vb) in itertools.pairwise(pts):
            if ta <= t <= tb:
                return va + (vb - va) * ((t - ta) / (tb - ta) if tb > ta else 0.0)
        return pts[-1][1]
