"""Durations as people write them in a job file (``90m``, ``6h``, ``1d``, ``5h30m``) and as messages show them.

A foundation module (no other orchestrator import): the job file's validation
(:mod:`orchestrator.config`) parses with it, the guards and the deadline describe with it.
"""

from __future__ import annotations

import math
import re

_DURATION = re.compile(
    r"(?:(?P<d>[0-9]+(?:\.[0-9]+)?)d)?(?:(?P<h>[0-9]+(?:\.[0-9]+)?)h)?"
    r"(?:(?P<m>[0-9]+(?:\.[0-9]+)?)m)?(?:(?P<s>[0-9]+(?:\.[0-9]+)?)s)?"
)
_UNIT_S = {"d": 86_400.0, "h": 3_600.0, "m": 60.0, "s": 1.0}


def parse_duration(value: object) -> float:
    """Seconds from ``90``, ``"90"``, ``"90s"``, ``"90m"``, ``"6h"``, ``"1d"``, ``"5h30m"``.

    Raises ValueError with a one-line reason for anything else, zero, or a negative value.
    """
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 90m, 6h, 1d or a number of seconds, not a boolean")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond a double: far past any limit the caller sets
            seconds = math.inf
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            match = _DURATION.fullmatch(text)
            if not text or match is None:
                shown = repr(value if len(value) <= 40 else value[:40] + "...")
                raise ValueError(
                    f"must be a duration such as 90m, 6h, 1d, 5h30m or a number of seconds, not {shown}"
                ) from None
            try:
                seconds = sum(float(n) * _UNIT_S[unit] for unit, n in match.groupdict().items() if n is not None)
            except OverflowError:
                seconds = math.inf
    else:
        raise ValueError("must be a duration such as 90m, 6h, 1d or a number of seconds")
    if math.isnan(seconds) or seconds <= 0:
        raise ValueError("must be a duration greater than 0")
    if math.isinf(seconds):
        raise ValueError("must be a finite duration (at most ten years)")
    return seconds


def describe_duration(seconds: float) -> str:
    """``5h30m``, ``90s``, ``1d2h``: for messages (rounded to the second)."""
    if seconds < 59.5:
        return f"{max(seconds, 0):.2g}s" if seconds < 10 else f"{round(seconds)}s"
    left = round(seconds)
    parts = []
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        n, left = divmod(left, size)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts)


__all__ = ["describe_duration", "parse_duration"]
