"""Split one job file across N processes: ``--shard I/N`` or a Kubernetes Indexed Job.

A job belongs to shard ``shard_of(name, N)``: the first 8 bytes of the SHA-256 of its name,
read as a big-endian integer, modulo N. Three properties follow, and the tests pin them:

- every job runs in exactly one of the N shards (a partition, whatever the names);
- a job's shard depends only on its own name and N, so adding or removing *other* jobs
  never moves it. Its output (and the manifest a rerun resumes from) stays where it was;
- the value is the same in every process, on every machine, in every Python version.
  Python's ``hash()`` is salted per process (PYTHONHASHSEED), so N pods would each draw a
  different partition and some jobs would run twice and others never.

Changing N does move jobs between shards: a rerun after changing N may start jobs afresh.

Everything here is pure: the environment is passed in as a mapping, nothing is read or
written, so the CLI decides what to do with a ``ValueError`` (exit 2, one line).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence

__all__ = [
    "SHARD_COUNT_ENV",
    "SHARD_INDEX_ENV",
    "parse_shard",
    "resolve_shard",
    "select",
    "shard_folder",
    "shard_of",
]

#: Set by Kubernetes in every pod of a Job with ``completionMode: Indexed`` (0-based).
SHARD_INDEX_ENV = "JOB_COMPLETION_INDEX"
#: Set by the operator beside it: the Job's ``completions`` (Kubernetes does not expose it).
SHARD_COUNT_ENV = "MICS_SHARD_COUNT"

# ASCII digits only: str.isdigit() and int() also accept "٣" or "²", which nobody means.
_SHARD_RE = re.compile(r"([0-9]{1,9})/([0-9]{1,9})")
_INT_RE = re.compile(r"[0-9]{1,9}")
# At most 9 digits: no Job has a billion pods, and int() refuses 4,300 digits with a message
# that names neither the variable nor --shard.


def shard_of(name: str, count: int) -> int:
    """Return the shard (``0 <= shard < count``) that runs the job called ``name``.

    ``int.from_bytes(sha256(name.encode()).digest()[:8], "big") % count``: stable across
    processes and machines, unlike ``hash()``. 64 bits leave no visible modulo bias for any
    realistic shard count.
    """
    if count < 1:
        raise ValueError(f"shard count must be at least 1, got {count}")
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") % count


def _check_range(index: int, count: int, what: str) -> tuple[int, int]:
    """Validate ``0 <= index < count`` and ``count >= 1``; ``what`` names the source."""
    if count < 1:
        raise ValueError(f"{what}: the shard count must be at least 1, got {count}")
    if not 0 <= index < count:
        raise ValueError(
            f"{what}: shard index {index} is out of range for {count} shard(s) (expected 0 to {count - 1})"
        )
    return index, count


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"I/N"`` (0-based index I, count N, ``0 <= I < N``) into ``(I, N)``.

    Raises ``ValueError`` with a one-line message naming the problem.
    """
    match = _SHARD_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid --shard {_shown(text)!r}: expected I/N with 0 <= I < N, e.g. 0/4 (at most 9 digits each)"
        )
    return _check_range(int(match[1]), int(match[2]), f"invalid --shard {text!r}")


def _shown(value: str) -> str:
    return value if len(value) <= 40 else value[:40] + "..."


def _env_int(environ: Mapping[str, str], variable: str) -> int:
    """Read a non-negative integer from ``environ[variable]`` or raise naming the variable."""
    raw = environ[variable].strip()
    if _INT_RE.fullmatch(raw) is None:
        raise ValueError(
            f"invalid environment variable {variable}={_shown(environ[variable])!r}: expected a non-negative "
            "integer of at most 9 digits"
        )
    return int(raw)


def resolve_shard(cli_value: str | None, environ: Mapping[str, str]) -> tuple[int, int] | None:
    """Decide which shard this process runs, or ``None`` to run every job.

    1. ``--shard I/N`` (``cli_value``) wins; the environment is then not looked at.
    2. Else, when both ``JOB_COMPLETION_INDEX`` and ``MICS_SHARD_COUNT`` are set and
       non-empty (a Kubernetes Indexed Job), they give I and N.
    3. ``MICS_SHARD_COUNT`` set without ``JOB_COMPLETION_INDEX`` is an error, not "run
       everything": it means the Job lost ``completionMode: Indexed``, and N pods would each
       run every job into the same output directory. ``JOB_COMPLETION_INDEX`` alone is
       ignored: any Indexed Job sets it, sharded or not.

    Bad values raise ``ValueError`` with a one-line message naming the variable.
    """
    if cli_value is not None:
        return parse_shard(cli_value)
    # An empty value counts as unset, as a shell's `VAR= cmd` or a blank manifest entry mean.
    has_index = bool(environ.get(SHARD_INDEX_ENV, "").strip())
    has_count = bool(environ.get(SHARD_COUNT_ENV, "").strip())
    if not has_count:
        return None
    if not has_index:
        raise ValueError(
            f"{SHARD_COUNT_ENV} is set but {SHARD_INDEX_ENV} is not: run as a Kubernetes "
            f"Job with completionMode: Indexed, or pass --shard I/N"
        )
    index = _env_int(environ, SHARD_INDEX_ENV)
    count = _env_int(environ, SHARD_COUNT_ENV)
    if count < 1:
        raise ValueError(
            f"invalid environment variable {SHARD_COUNT_ENV}={environ[SHARD_COUNT_ENV]!r}: "
            "the shard count must be at least 1"
        )
    if index >= count:
        raise ValueError(
            f"invalid environment variable {SHARD_INDEX_ENV}={environ[SHARD_INDEX_ENV]!r}: "
            f"out of range for {SHARD_COUNT_ENV}={count} (expected 0 to {count - 1}); "
            "the Job's completions and MICS_SHARD_COUNT must be equal"
        )
    return index, count


def select(names: Sequence[str], index: int, count: int) -> list[str]:
    """Return the names that shard ``index`` of ``count`` runs, in their original order."""
    _check_range(index, count, "invalid shard")
    return [name for name in names if shard_of(name, count) == index]


def shard_folder(index: int, count: int) -> str:
    """The folder a shard writes into when ``--output-dir`` is not given: ``shard-I-of-N``.

    Under the job file's ``run.output_dir``, so shards started at once never share a folder
    (nor its lock and manifest). N is in the name: after a change of N, a shard does not
    resume another partition's manifest.
    """
    _check_range(index, count, "invalid shard")
    return f"shard-{index}-of-{count}"
