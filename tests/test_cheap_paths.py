"""The cheap paths of issue 14 behave as the paths they replace.

The job file is read by libyaml where it agrees with the pure-Python loader, and by the latter
everywhere else (same data, same error, same line); a small download is written by one
worker-thread hop instead of a thread of its own, a large one still by its writer thread,
byte for byte either way; a commit's folder fsync happens off the event loop.
"""

from __future__ import annotations

import gzip
import hashlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import config_yaml, part_file
from orchestrator.config_yaml import load_yaml
from orchestrator.download import download
from orchestrator.errors import ConfigError
from orchestrator.transfer import SMALL_FILE_BYTES

pytestmark = pytest.mark.skipif(not hasattr(yaml, "CSafeLoader"), reason="PyYAML without libyaml")


def _outcome(load: Any, path: Path) -> tuple[str, Any]:
    """("ok", data) or ("error", the message): what a reader makes of the file."""
    try:
        return "ok", load(path)
    except ConfigError as exc:
        return "error", str(exc)


def _reference(path: Path) -> Any:
    """The pure-Python reader alone: the verdicts users have always had."""
    return config_yaml._load_pure(path.read_bytes().decode("utf-8"), str(path))


def test_a_plain_job_file_is_read_by_libyaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ordinary job file takes the libyaml path (the pure-Python loader is never called) and reads the same."""
    path = tmp_path / "j.yaml"
    jobs = "".join(f"  - {{name: job{i}, export_id: {i}, timeout_s: 30}}\n" for i in range(50))
    path.write_text(f"version: 1\n# compression: none | gzip\nrun: {{concurrency: 4}}\njobs:\n{jobs}")
    expected = _reference(path)

    def refused(text: str, file: str) -> Any:
        raise AssertionError("read by the pure-Python loader")

    monkeypatch.setattr(config_yaml, "_load_pure", refused)
    assert load_yaml(path, str(path)) == expected


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("version: 1\njobs: [{name: a, export_id: 1}]\njobs: [{name: b, export_id: 2}]\n", 3),
        ("version: 1\njobs:\n  - name: a\n    export_id: 1\n    export_id: 2\n", 5),
    ],
)
def test_a_duplicate_key_is_refused_with_its_line(tmp_path: Path, text: str, line: int) -> None:
    """A key given twice fails, naming the key and its line, though libyaml alone would keep the last value."""
    path = tmp_path / "j.yaml"
    path.write_text(text)
    assert yaml.load(text, Loader=yaml.CSafeLoader)
    with pytest.raises(ConfigError, match=rf"invalid YAML at line {line}, column \d+: duplicate key"):
        load_yaml(path, str(path))


# Texts libyaml reads where PyYAML refuses them, or reads differently (found by differential fuzzing).
DISAGREEMENTS = {
    "tab in a plain scalar": ":#\tc:",
    "comment right after a block scalar header": "'a''b':  |#",
    "question mark in a flow mapping": "  \n {1? }\n",
    "BOM after the start": "\n\ufeff1",
    "bare tag": "!",
    "nested 600 deep": "version: 1\njobs: " + "[" * 600 + "]" * 600,
}


@pytest.mark.parametrize("case", list(DISAGREEMENTS))
def test_where_libyaml_disagrees_the_reference_decides(tmp_path: Path, case: str) -> None:
    """Text libyaml reads otherwise than PyYAML gets PyYAML's verdict, data or error line."""
    text = DISAGREEMENTS[case]
    path = tmp_path / "j.yaml"
    path.write_text(text, encoding="utf-8")
    reference = _outcome(_reference, path)
    try:
        libyaml: tuple[str, Any] = ("ok", yaml.load(text, Loader=yaml.CSafeLoader))
    except yaml.YAMLError:
        libyaml = ("error", None)
    assert libyaml != reference  # the case is a real disagreement
    assert _outcome(lambda p: load_yaml(p, str(p)), path) == reference


_TOKENS = [
    *"abc: -[]{},'\"#&*!|>%@`?\\0x1.e\t",
    *["\n", "\r\n", "  ", "- ", ": ", "---", "...", "<<: *a", "&a ", "*a", "? ", "|", "|-", ">+", " #c"],
    *["\x85", "\u2028", "\ufeff", "\xa0", "é", "~", "null", "yes", "1_0", "0o7", "!!str", "{a: 1}", "[1, 2]"],
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(_TOKENS), max_size=30).map("".join))
def test_fuzzed_yaml_reads_as_the_reference(tmp_path: Path, text: str) -> None:
    """Any YAML-ish text: the same data or the same error message as the pure-Python reader."""
    path = tmp_path / "j.yaml"
    path.write_bytes(text.encode("utf-8"))
    assert _outcome(lambda p: load_yaml(p, str(p)), path) == _outcome(_reference, path)


def _chunks(data: bytes, size: int) -> Any:
    """An open_stream that serves ``data`` in chunks of ``size`` bytes."""

    async def open_stream(start: int) -> AsyncIterator[bytes]:
        for at in range(start, len(data), size):
            yield data[at : at + size]

    return open_stream


@pytest.mark.anyio
@pytest.mark.parametrize("compression", ["none", "gzip"])
@pytest.mark.parametrize(
    ("size", "chunk"),
    [(0, 1), (1, 1), (SMALL_FILE_BYTES, 1 << 16), (SMALL_FILE_BYTES + 1, 1 << 16), (3 * SMALL_FILE_BYTES + 7, 100_003)],
)
async def test_small_and_large_files_are_written_byte_exact(
    tmp_path: Path, compression: str, size: int, chunk: int
) -> None:
    """On both sides of the small-file size (held then written at once, or handed to the writer thread in
    order), the file on disk, its hash and its line count are the content served."""
    line = b'{"k": 1}\n'
    data = (line * (size // len(line) + 1))[:size]
    dest = tmp_path / ("out.ndjson" + (".gz" if compression == "gzip" else ""))
    result = await download(_chunks(data, chunk), dest, compression=compression, on_unverified_length="keep")
    stored = dest.read_bytes()
    assert (gzip.decompress(stored) if compression == "gzip" else stored) == data
    assert (result.bytes, result.sha256) == (size, hashlib.sha256(data).hexdigest())
    assert result.stats.records == data.count(b"\n")
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]  # no part file left


@pytest.mark.anyio
async def test_the_folder_fsync_of_a_commit_leaves_the_event_loop_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a commit's folder fsync waits on the disk, other tasks run (it would deadlock on the loop)."""
    started, released = threading.Event(), threading.Event()
    real = part_file.fsync_dir

    def slow_fsync_dir(folder: Path) -> None:
        started.set()
        assert released.wait(10), "the event loop was blocked during the folder fsync"
        real(folder)

    monkeypatch.setattr(part_file, "fsync_dir", slow_fsync_dir)

    async def release_once_fsync_started() -> None:
        assert await anyio.to_thread.run_sync(started.wait, 10)
        released.set()

    dest = tmp_path / "out.ndjson"
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(release_once_fsync_started)
            await download(_chunks(b"{}\n", 3), dest, on_unverified_length="keep")
    assert dest.read_bytes() == b"{}\n"
