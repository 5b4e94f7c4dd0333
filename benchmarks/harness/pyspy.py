"""Recording a run under py-spy (every process and thread) and summarising the raw profile:
CPU share per process / thread role, the top leaf frames, and the orchestrator functions
inclusive of what they call."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from benchmarks.harness.base import PYTHON
from benchmarks.harness.report import table


def pyspy_record(cmd: list[str], env: dict[str, str], raw: Path, rate: int = 200) -> float:
    """Run ``cmd`` under ``py-spy record --format raw --threads --subprocesses``; returns wall s."""
    spy = shutil.which("py-spy", path=str(Path(PYTHON).parent)) or "py-spy"
    flags = ["--format", "raw", "--threads", "--subprocesses", "--rate", str(rate), "--nonblocking"]
    t0 = time.perf_counter()
    subprocess.run(
        [spy, "record", *flags, "-o", str(raw), "--", *cmd],
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
    if "orchestrator.validate_worker" in proc or any("(orchestrator/validate_worker.py" in f for f in frames):
        return "worker processes"
    thread = next((f for f in frames if f.startswith("thread (")), "")
    name = thread.partition("): ")[2]
    # A large file's writer thread, or a small file's one write in a worker thread (transfer._Writer).
    if name.startswith("writer:") or any("_FileWriter._run" in f or "_Writer._write_held" in f for f in frames):
        return "main: writer thread"
    if name == "MainThread":
        return "main: event loop"
    return "main: other threads" if name else "main: event loop"


def _short(frame: str) -> str:
    """``func (file)`` with the file relative to site-packages or the stdlib."""
    m = _FRAME.match(frame)
    if not m:
        return frame[:60]
    file = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m.group('func')} ({file})"


def _stacks(raw: Path) -> list[tuple[list[str], int]]:
    """(frames, samples) per line of a raw profile."""
    stacks: list[tuple[list[str], int]] = []
    # A command line with newlines would split a stack; only lines ending in a count are kept.
    for line in raw.read_text(errors="replace").splitlines():
        head, _, count = line.rpartition(" ")
        if count.isdigit() and head:
            stacks.append((head.split(";"), int(count)))
    return stacks


def pyspy_summary(raw: Path, rate: int, wall_s: float, top: int = 12) -> tuple[str, dict[str, Any]]:
    """Aggregate a raw py-spy profile: CPU-seconds per role, then the top leaf frames."""
    by_role: Counter[str] = Counter()
    leaves: defaultdict[str, Counter[str]] = defaultdict(Counter)
    inclusive: Counter[str] = Counter()  # orchestrator functions, including what they call
    total = 0
    for frames, n in _stacks(raw):
        py = [f for f in frames if not f.startswith(("process ", "thread ("))]
        if not py:
            continue
        role = _role(frames)
        by_role[role] += n
        leaves[role][_short(py[-1])] += n
        for name in {_short(f) for f in py if "orchestrator/" in f}:
            inclusive[name] += n
        total += n
    total = max(total, 1)  # an empty profile prints empty tables, not a division by zero
    all_leaves: Counter[tuple[str, str]] = Counter()
    for role, c in leaves.items():
        for leaf, n in c.items():
            all_leaves[(role, leaf)] += n
    text = (
        f"py-spy: {total} non-idle samples at {rate} Hz over {wall_s:.1f} s wall (a runnable thread that waits "
        "for a CPU counts as busy, so read shares, not seconds)\n\n"
        + table(("process / thread", "share of samples"), [(r, f"{n / total:.0%}") for r, n in by_role.most_common()])
        + "\n\n"
        + table(
            ("process / thread", "leaf frame", "samples"),
            [(role, leaf, f"{n / total:.1%}") for (role, leaf), n in all_leaves.most_common(top)],
        )
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
