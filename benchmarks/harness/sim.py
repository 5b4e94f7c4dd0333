"""The simulator as a separate process (its own GIL), and raw API calls to it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

import yaml

from benchmarks.harness.base import PYTHON, MiB

TOKEN = "bench-token-7c1d"
ORG = "1426"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def export_spec(
    export_id: str, size: int, shape: str = "small", pending_s: float = 0.0, running_s: float = 0.0, **extra: Any
) -> dict[str, Any]:
    """One export of a simulator scenario file."""
    return {
        "id": export_id,
        "size_bytes": size,
        "shape": shape,
        "pending_s": pending_s,
        "running_s": running_s,
        **extra,
    }


class SimProcess:
    """``mics-export simulate`` as a separate process (its own GIL) on 127.0.0.1."""

    def __init__(self, exports: list[dict[str, Any]], folder: Path, **scenario: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.folder = folder
        self.scenario = {"token": TOKEN, **scenario, "exports": exports}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> SimProcess:
        path = self.folder / f"scenario-{self.port}.yaml"
        path.write_text(yaml.safe_dump(self.scenario, sort_keys=False))
        log_path = self.folder / f"simulator-{self.port}.log"
        self._log = log_path.open("wb")
        cmd = [PYTHON, "-m", "orchestrator", "simulate", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*cmd, "--scenario", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"simulator exited: {log_path.read_text()}")
            with contextlib.suppress(OSError):
                status, _ = api(self.url, "GET", f"/v1/exports?organisation_id={ORG}")
                if status == 200:
                    return self
            time.sleep(0.05)  # waiting for a process to listen: nothing to wait on but the port
        raise RuntimeError("simulator did not answer within 30 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()

    @property
    def pid(self) -> int:
        """The simulator's process id (to sample its CPU)."""
        assert self.proc is not None
        return self.proc.pid

    def env(self) -> dict[str, str]:
        """The environment for a run against this simulator."""
        return cli_env(self.url)

    def warm(self, export_id: str) -> None:
        """Make the simulator build its block templates before anything is timed."""
        exe = create_execution(self.url, export_id)
        wait_final(self.url, export_id, exe)
        url = file_url(self.url, export_id, exe)
        req = urllib.request.Request(url, headers={"Authorization": TOKEN})  # noqa: S310 - http://127.0.0.1
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - 127.0.0.1 only
            while resp.read(4 * MiB):
                pass


def cli_env(url: str, token: str = TOKEN) -> dict[str, str]:
    """This environment without MICS_* settings, pointed at ``url`` with ``token``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICS_") and k != "JOB_COMPLETION_INDEX"}
    env["MICS_API_URL"] = url
    env["MICS_API_TOKEN"] = token
    return env


def api(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One API call: (HTTP status, decoded JSON body or None)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": TOKEN}
    if data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - 127.0.0.1 only
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def create_execution(url: str, export_id: str) -> str:
    """A new execution of ``export_id``; its id."""
    status, body = api(url, "POST", f"/v1/exports/{export_id}/executions", {})
    assert status == 200, status
    return str(body["data"]["id"])


def wait_final(url: str, export_id: str, exe: str, every_s: float = 0.05) -> str:
    """Poll until execution ``exe`` is final; its status."""
    while True:
        _, body = api(url, "GET", f"/v1/exports/{export_id}/executions?first_result=0&max_results=10")
        for item in body["data"]:
            if item["id"] == exe and item["status"] in ("SUCCEEDED", "FAILED", "CANCELED"):
                return str(item["status"])
        time.sleep(every_s)


def file_url(url: str, export_id: str, exe: str) -> str:
    """The URL of an execution's result file."""
    return f"{url}/v1/exports/{export_id}/executions/{exe}/files/technical_name=export"
