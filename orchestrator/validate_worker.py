"""The validation worker process, and its wire format with the pool (:mod:`orchestrator.workers`).

Two entry points, both ``python -m orchestrator.validate_worker``:

- ``FD SIZE``: serve the pool. The shared-memory ring (``SIZE`` bytes, inherited as file
  descriptor ``FD``) holds line-aligned batches; each request on stdin (:data:`REQUEST`:
  slot offset, length, token) is answered on stdout with the batch's counts and its
  invalid line numbers, relative to the batch (:data:`RESPONSE`, then that many ``uint32``).
  The batch is checked in place in the ring (:func:`~orchestrator.blockcheck.check_block`
  slices it part by part), nothing is pickled. The loop ends when stdin closes.
- ``--line``: read one line (no newline) on stdin, answer ``r``, ``b`` or ``i``
  (record, blank, invalid) on stdout: a line too long to parse in the main process
  (:func:`orchestrator.workers.check_long_line`).

A worker imports only this module and :mod:`orchestrator.blockcheck` (orjson, yyjson), so
it starts fast; nothing here may import anyio or the rest of the package.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from array import array
from typing import BinaryIO

from orchestrator.blockcheck import MAX_INVALID_LINE_NUMBERS, LineStats, Verdict, check_block, classify

MODULE = "orchestrator.validate_worker"
"""What the pool runs with ``python -m``."""
REQUEST = struct.Struct("<IIQ")  # slot offset, length, token
RESPONSE = struct.Struct("<QIIIIH")  # token, slot, lines, blank, invalid, n numbers
VERDICTS: dict[bytes, Verdict] = {b"r": "record", b"b": "blank", b"i": "invalid"}
"""The one-byte answers of ``--line``."""


def serve(ring: mmap.mmap, requests: BinaryIO, answers: BinaryIO) -> None:
    """Check the batches of ``ring`` as requested until ``requests`` ends."""
    while True:
        header = requests.read(REQUEST.size)
        if len(header) < REQUEST.size:
            return
        offset, length, token = REQUEST.unpack(header)
        stats = LineStats()
        check_block(ring, stats, offset, offset + length)
        numbers = stats.invalid_line_numbers[:MAX_INVALID_LINE_NUMBERS]
        answers.write(
            RESPONSE.pack(token, offset, stats.lines, stats.blank_lines, stats.invalid_lines, len(numbers))
            + array("I", numbers).tobytes()
        )
        answers.flush()


def check_one_line(line: BinaryIO, answer: BinaryIO) -> None:
    """``--line``: the verdict on everything ``line`` holds, as one byte."""
    answer.write(classify(line.read())[0].encode())
    answer.flush()


def main(argv: list[str]) -> None:
    """``--line``, or ``FD SIZE`` (see the module docstring)."""
    if argv == ["--line"]:
        check_one_line(sys.stdin.buffer, sys.stdout.buffer)
        return
    fd, size = int(argv[0]), int(argv[1])
    ring = mmap.mmap(fd, size)
    os.close(fd)
    serve(ring, sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main(sys.argv[1:])


__all__ = ["MODULE", "REQUEST", "RESPONSE", "VERDICTS", "check_one_line", "main", "serve"]
