"""``mics-export`` with the bytes written to manifest files counted on the side.

Run as a script in place of ``python -m orchestrator`` (:func:`benchmarks.harness.runs.run_cmd`
does): it wraps ``write_atomic`` (each whole ``manifest.json``) and ``Journal.append`` (the
journal's lines, issue 14 part 2), runs the real CLI, and at exit prints
``MANIFEST_WRITES <manifest.json writes> <bytes to manifest.json + journal>`` on stderr.
Nothing else in the run changes.
"""

from __future__ import annotations

import atexit
import sys
from pathlib import Path
from typing import Any


def install() -> list[int]:
    """Wrap the two writers; returns the live counters [manifest.json writes, bytes]."""
    import orchestrator.manifest as m

    counts = [0, 0]
    write_atomic, append = m.write_atomic, m.Journal.append

    def counted_write(path: Path, data: bytes) -> None:
        if path.name == "manifest.json":
            counts[0] += 1
            counts[1] += len(data)
        write_atomic(path, data)

    def counted_append(self: m.Journal, *args: Any, **kwargs: Any) -> int:
        n = append(self, *args, **kwargs)
        counts[1] += n
        return n

    m.write_atomic = counted_write
    m.Journal.append = counted_append  # type: ignore[method-assign]
    return counts


def main() -> None:
    """Count, then hand over to the CLI with this script's arguments."""
    counts = install()
    atexit.register(lambda: sys.stderr.write(f"MANIFEST_WRITES {counts[0]} {counts[1]}\n"))
    sys.argv[0] = "mics-export"
    from orchestrator.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
