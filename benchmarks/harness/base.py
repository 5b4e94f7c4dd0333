"""Paths, sizes, the flags every benchmark takes, alternation and temp folders."""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
PLOTS = BENCH / "plots"
MiB = 1 << 20
GiB = 1 << 30
PYTHON = sys.executable


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


def alternate(variants: Sequence[str], repeats: int) -> Iterator[tuple[int, str]]:
    """(repeat, variant) in alternation; the order rotates each repeat (no position bias)."""
    for rep in range(repeats):
        k = rep % len(variants)
        for v in list(variants[k:]) + list(variants[:k]):
            yield rep, v


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


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of ``fn()``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
