"""What the numbers were measured on, their statistics, Markdown tables and JSON results."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness.base import RESULTS, ROOT, GiB


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
    """Print the title, the machine and the load; returns the machine for the JSON results."""
    m = machine()
    print(f"# {title}")
    print(
        f"machine: {m['affinity']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB RAM, Python {m['python']}; "
        f"load average at start {m['loadavg'][0]:.2f}"
    )
    print("noisy shared host: compare ratios within this run; differences under ~15% are noise\n", flush=True)
    return m


def print_footer() -> None:
    """The load at the end: a run whose load rose mid-way is to be read with care."""
    print(f"\nload average at end {os.getloadavg()[0]:.2f}", flush=True)


@dataclass(frozen=True)
class Summary:
    """Median and range of a few runs."""

    median: float
    lo: float
    hi: float
    n: int

    def fmt(self, digits: int = 1, unit: str = "") -> str:
        """``12.3 (11.0–14.5)``; one value alone when there is no range."""
        if self.n == 0:
            return "–"
        if self.n == 1 or self.lo == self.hi:
            return f"{self.median:.{digits}f}{unit}"
        return f"{self.median:.{digits}f}{unit} ({self.lo:.{digits}f}–{self.hi:.{digits}f})"


_EMPTY = Summary(float("nan"), float("nan"), float("nan"), 0)


def summarize(values: Sequence[float | None]) -> Summary:
    """Median, min and max of the values that are not None."""
    vals = [v for v in values if v is not None]
    if not vals:
        return _EMPTY
    return Summary(statistics.median(vals), min(vals), max(vals), len(vals))


def ratio(values: Sequence[float], baseline: Sequence[float]) -> Summary:
    """Median ratio, with the range spanned by the extremes (lo/hi of each side)."""
    a, b = summarize(values), summarize(baseline)
    if a.n == 0 or b.n == 0 or b.median == 0:
        return _EMPTY
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


def save_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to results/NAME.json (dataclasses and paths made JSON)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=_jsonable))
    print(f"raw results: {path.relative_to(ROOT)}")
    return path


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    return str(obj)


def load_json(name: str) -> dict[str, Any] | None:
    """results/NAME.json, or None when that benchmark was not saved."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data
