"""Plots for benchmarks/README.md, from the raw results the other scripts saved with --json.

- `plots/throughput_vs_size.png`: download MB/s against export size (memory.py's runs),
  default workers and `--workers 0`, with the one-core and two-process validation
  ceilings and curl → disk from throughput.py as reference lines;
- `plots/rss_vs_size.png`: peak RSS (and PSS) summed over the run's processes against
  export size (memory.py), with the 150 MiB target;
- `plots/throughput_variants.png`: every variant of throughput.py, per record shape.

    python benchmarks/memory.py --json && python benchmarks/throughput.py --json
    python benchmarks/plots.py            # reads benchmarks/results/*.json
    python benchmarks/plots.py --quick    # reads the *-quick.json files instead
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.harness.base import PLOTS, ROOT, MiB, fmt_size
from benchmarks.harness.report import load_json


def _med_err(values: list[float]) -> tuple[float, float, float]:
    m = statistics.median(values)
    return m, m - min(values), max(values) - m


Point = tuple[float, float, float]
"""median, distance down to the min, distance up to the max (an error bar)"""


def _size_series(mem: dict[str, Any], field: str, workers: str, scale: float = 1.0) -> tuple[list[int], list[Point]]:
    sizes = mem["sizes"]
    out = []
    for size in sizes:
        runs = mem["runs"].get(f"{size}/{workers}", [])
        out.append(_med_err([r[field] / scale for r in runs]))
    return sizes, out


def _size_axis(ax: Any, sizes: list[int]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([fmt_size(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("export size")
    ax.grid(True, alpha=0.3)


def throughput_vs_size(mem: dict[str, Any], thr: dict[str, Any] | None, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for workers, label in (("default", "mics-export run, default workers"), ("0", "mics-export run --workers 0")):
        sizes, pts = _size_series(mem, "mb_s", workers)
        nw = mem["runs"][f"{sizes[0]}/{workers}"][0]["workers"]
        ax.errorbar(
            sizes,
            [p[0] for p in pts],
            yerr=[[p[1] for p in pts], [p[2] for p in pts]],
            marker="o",
            capsize=4,
            label=label.replace("default workers", f"default workers ({nw})"),
        )
    shape = mem.get("shape", "small")
    if thr and shape in thr["shapes"]:
        ref = thr["shapes"][shape]["mb_s"]
        for key, style, label in (
            ("ceiling", "--", "validation ceiling, 1 core"),
            ("ceiling_2p", "-.", "2 processes validating at once"),
            ("curl_disk", ":", "curl → disk (+ fsync)"),
        ):
            if ref.get(key):
                ax.axhline(statistics.median(ref[key]), linestyle=style, color="grey", label=label)
    _size_axis(ax, sizes)
    ax.set_ylabel("download MB/s (median, min–max)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Download throughput vs export size ({shape} records, 2 CPUs)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.text(
        0.01,
        0.01,
        "runs sampled every 20 ms by memory.py; reference lines from throughput.py",
        fontsize=7,
        color="grey",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rss_vs_size(mem: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for workers, color in (("default", "C0"), ("0", "C1")):
        sizes, pts = _size_series(mem, "peak_rss", workers, MiB)
        nw = mem["runs"][f"{sizes[0]}/{workers}"][0]["workers"]
        name = f"default workers ({nw})" if workers == "default" else "--workers 0"
        ax.errorbar(
            sizes,
            [p[0] for p in pts],
            yerr=[[p[1] for p in pts], [p[2] for p in pts]],
            marker="o",
            capsize=4,
            color=color,
            label=f"{name}: RSS summed",
        )
        _, pss = _size_series(mem, "peak_pss", workers, MiB)
        ax.plot(
            sizes, [p[0] for p in pss], marker="s", linestyle="--", color=color, alpha=0.7, label=f"{name}: PSS summed"
        )
    ax.axhline(150, color="red", linestyle=":", label="target: 150 MiB")
    _size_axis(ax, sizes)
    ax.set_ylabel("peak memory over the run's processes, MiB")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Peak memory vs export size ({mem.get('shape', 'small')} records)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def throughput_variants(thr: dict[str, Any], path: Path) -> None:
    from benchmarks.throughput import CONCURRENT, SINGLE

    labels = {**SINGLE, **CONCURRENT}
    shapes = list(thr["shapes"])
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 5), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        data = thr["shapes"][shape]["mb_s"]
        keys = [k for k in labels if data.get(k)]
        pts = [_med_err(data[k]) for k in keys]
        y = range(len(keys))
        colors = ["grey" if k.startswith(("ceiling", "curl")) else "C0" for k in keys]
        ax.barh(list(y), [p[0] for p in pts], xerr=[[p[1] for p in pts], [p[2] for p in pts]], color=colors, capsize=3)
        ax.set_yticks(list(y))
        ax.set_yticklabels([labels[k] for k in keys], fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ticks = [t for t in (50, 100, 200, 500, 1000, 2000, 5000) if t <= 2 * max(p[0] + p[2] for p in pts)]
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("MB/s (median, min–max; log scale)")
        ax.set_title(
            f"{shape} records: one {fmt_size(thr['size'])} export / "
            f"{thr['concurrent']} × {fmt_size(thr['concurrent_size'])}",
            fontsize=10,
        )
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="plot the *-quick.json results")
    args = p.parse_args()
    suffix = "-quick" if args.quick else ""
    mem = load_json("memory" + suffix)
    thr = load_json("throughput" + suffix)
    PLOTS.mkdir(parents=True, exist_ok=True)
    made = []
    if mem:
        throughput_vs_size(mem, thr, PLOTS / "throughput_vs_size.png")
        rss_vs_size(mem, PLOTS / "rss_vs_size.png")
        made += ["throughput_vs_size.png", "rss_vs_size.png"]
    else:
        print(f"no memory{suffix}.json: run benchmarks/memory.py --json first", file=sys.stderr)
    if thr:
        throughput_variants(thr, PLOTS / "throughput_variants.png")
        made.append("throughput_variants.png")
    else:
        print(f"no throughput{suffix}.json: run benchmarks/throughput.py --json first", file=sys.stderr)
    for name in made:
        print((PLOTS / name).relative_to(ROOT))


if __name__ == "__main__":
    main()
