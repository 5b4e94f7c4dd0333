"""Shared helpers for the end-to-end tests: job files, running the real CLI, waiting."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import yaml
import zstandard

from orchestrator.simulator import ExportSpec

TOKEN = "tok-SECRET-e2e-5f3a9c"

FAST = {
    "organisation_id": "1426",
    "poll": {"initial_s": 0.01, "max_s": 0.05},
    "timeout_s": 60,
    "retries": 2,
}
FAST_API = {"retries": {"max_tries": 6, "base_s": 0.005, "max_wait_s": 0.05, "max_time_s": 30}}


def write_jobs(
    folder: Path,
    jobs: list[dict[str, Any]],
    *,
    defaults: dict[str, Any] | None = None,
    api: dict[str, Any] | None = None,
    concurrency: int = 8,
    name: str = "jobs.yaml",
    output: str | None = None,
    run: dict[str, Any] | None = None,
) -> Path:
    """A job file in ``folder`` with fast polling and retries, writing to ``output`` (a bucket
    URL...; default folder/out), with ``run`` settings added."""
    doc = {
        "version": 1,
        "api": {**FAST_API, **(api or {})},
        "run": {"output_dir": output or str(folder / "out"), "concurrency": concurrency, **(run or {})},
        "defaults": {**FAST, **(defaults or {})},
        "jobs": jobs,
    }
    path = folder / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def cli_env(url: str | None = None, token: str | None = TOKEN, **extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: the simulator's URL and the token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICS_") and k != "JOB_COMPLETION_INDEX"}
    if url:
        env["MICS_API_URL"] = url
    if token:
        env["MICS_API_TOKEN"] = token
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``mics-export ARGS`` to completion; returns code, stdout, stderr."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def cli_in_process(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``mics-export ARGS`` through :func:`orchestrator.cli.main` in this process: the same code,
    exit code, stdout and stderr as :func:`run_cli`, without a Python start-up per case (~0.5-1 s).

    Use it where the behaviour is the command's; keep :func:`run_cli` for what only a process
    shows (signals, os._exit, a real stdin). The process-wide state a command changes is put
    back: ``os.environ`` (``env`` replaces it for the call), the secrets the redactor knows
    and the unknown statuses already warned about (both emptied first, as in a new process:
    a leak is not hidden by an earlier test's token, a warning not silenced by an earlier
    run's), the ``-v`` level and the log handlers and levels.
    """
    from orchestrator import cli, cli_common, logs, models

    raw = io.BytesIO()  # under a text stream, so a binary write to sys.stdout.buffer (`download -o -`) works
    stdout = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", write_through=True)
    stderr = io.StringIO()
    saved_env, saved_level = dict(os.environ), cli_common.Verbosity.level
    saved_sets = [(registry, set(registry)) for registry in (logs._SECRETS, models._warned_unknown)]
    root, ours = logging.getLogger(), logging.getLogger("orchestrator")
    saved_handlers, saved_levels = list(root.handlers), (root.level, ours.level)
    for registry, _ in saved_sets:
        registry.clear()
    os.environ.clear()
    os.environ.update(env)
    code: int | str | None = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            cli.main(list(args))
    except SystemExit as exc:  # main() always ends with sys.exit(code) when given its argv
        code = exc.code
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for registry, saved in saved_sets:
            registry.clear()
            registry.update(saved)
        cli_common.Verbosity.level = saved_level
        for handler in [h for h in root.handlers if h not in saved_handlers]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(saved_levels[0])
        ours.setLevel(saved_levels[1])
    assert isinstance(code, int), f"exit code {code!r}"
    stdout.flush()
    out = raw.getvalue().decode("utf-8", "replace")
    return subprocess.CompletedProcess(["mics-export", *args], code, out, stderr.getvalue())


def start_cli(*args: str, env: dict[str, str], stderr: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    """Start ``mics-export ARGS`` in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def _memory_cap() -> None:
    """In the child: 900 MiB of address space, as a container's memory limit would allow."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (900 << 20, 900 << 20))


def cli_with_memory_cap(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``mics-export ARGS`` as a child process capped at 900 MiB of memory (60 s at most)."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_memory_cap,
    )


def stop_cli(child: subprocess.Popen[str]) -> str:
    """Kill ``child`` (from :func:`start_cli`) if it still runs; its stderr."""
    if child.poll() is None:
        child.kill()
    child.wait(10)
    return child.stderr.read() if child.stderr else ""


def wait_for(condition: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    """Poll ``condition`` until it is truthy (returns its value) or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def manifest(out: Path) -> dict[str, Any]:
    """The manifest.json of an output folder."""
    data: dict[str, Any] = orjson.loads((out / "manifest.json").read_bytes())
    return data


def read_manifest_if_any(out: Path) -> dict[str, Any] | None:
    """The manifest if it exists and parses (it is replaced atomically, so it always should)."""
    try:
        return manifest(out)
    except FileNotFoundError:
        return None


def jobs_by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's jobs keyed by name."""
    return {j["name"]: j for j in doc["jobs"]}


def content_sha256(path: Path) -> str:
    """sha256 of a file's uncompressed content (.gz and .zst decompressed)."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    elif path.suffix == ".zst":
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return hashlib.sha256(data).hexdigest()


def assert_exact(out: Path, name: str, spec: ExportSpec, suffix: str = ".ndjson") -> dict[str, Any]:
    """The job's file and manifest entry match, byte for byte, what the simulator served."""
    result = spec.result()
    entry = jobs_by_name(manifest(out))[name]
    path = out / f"{name}{suffix}"
    assert entry["status"] == "SUCCEEDED", entry
    assert entry["path"] == path.name
    assert content_sha256(path) == result.sha256() == entry["sha256"]
    assert entry["bytes"] == result.size
    assert entry["records"] == result.records
    assert entry["invalid_lines"] == result.invalid_lines
    assert entry["invalid_line_numbers"] == result.invalid_line_numbers()
    return entry


def leftovers(out: Path) -> list[str]:
    """Temporary files left in an output folder (there should be none after a run)."""
    return sorted(p.name for p in out.glob(".*") if p.name.endswith((".part", ".tmp")))
