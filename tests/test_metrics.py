"""Tests for orchestrator.metrics: the registry built from a manifest and real HTTP pushes.

The pushes go to a small Pushgateway stand-in on 127.0.0.1 (http.server in a thread). It
records every request and keeps groups the way the real Pushgateway documents it: PUT
replaces the whole group, POST replaces the metric names present in the body. That lets a
test check the point of the PUT/POST choice: the last success survives a failed run.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import TOKEN, cli_env, cli_in_process, write_jobs

from orchestrator.metrics import (
    JOB_STATUSES,
    PUSHGATEWAY_ENV,
    RUN_STATUSES,
    MetricsPushError,
    metrics_from_manifest,
    push_method,
    push_run_metrics,
    shard_grouping_key,
)
from orchestrator.simulator import ExportSpec, SimulatorConfig, SimulatorThread

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

STARTED = "2026-11-28T02:00:00Z"
FINISHED = "2026-11-28T02:41:10Z"
STARTED_S = 1_795_831_200.0  # 2026-11-28T02:00:00Z as Unix time
FINISHED_S = STARTED_S + 41 * 60 + 10


def job_entry(name: str, status: str = "SUCCEEDED", **overrides: Any) -> dict[str, Any]:
    """One job of a manifest, shaped as in SPEC.md, finished 10 minutes after the run began."""
    entry: dict[str, Any] = {
        "name": name,
        "export_id": "9872",
        "execution_id": "879879879",
        "status": status,
        "attempts": 1,
        "path": f"{name}.ndjson",
        "bytes": 123_456_789,
        "records": 1_000_000,
        "invalid_lines": 0,
        "invalid_line_numbers": [],
        "sha256": "ab" * 32,
        "erroneous_tasks": 0,
        "num_tasks": 299_808,
        "error": None,
        "error_file": None,
        "started_at": STARTED,
        "finished_at": "2026-11-28T02:10:00Z",
    }
    entry.update(overrides)
    return entry


def manifest(status: str, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """A whole manifest.json as SPEC.md shows it."""
    return {
        "version": 1,
        "run_id": "run-1",
        "started_at": STARTED,
        "finished_at": FINISHED,
        "status": status,
        "jobs": jobs,
    }


def succeeded_run() -> dict[str, Any]:
    """Two jobs, both SUCCEEDED; one had invalid lines and a retry."""
    return manifest(
        "SUCCEEDED",
        [
            job_entry("visitors"),
            job_entry("fb-adwords-segments", "SUCCEEDED", invalid_lines=3, attempts=2),
        ],
    )


def failed_run() -> dict[str, Any]:
    """visitors SUCCEEDED; fb-adwords-segments FAILED with nulls where nothing was produced."""
    return manifest(
        "FAILED",
        [
            job_entry("visitors", "SUCCEEDED", records=7, bytes=70),
            job_entry(
                "fb-adwords-segments",
                "FAILED",
                attempts=3,
                bytes=None,
                records=None,
                invalid_lines=None,
                sha256=None,
                path=None,
                erroneous_tasks=12,
                error="execution FAILED",
            ),
        ],
    )


def samples_of(text: str) -> Samples:
    """Every sample of an exposition text, keyed by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The value of one sample; KeyError (a failed test) when it is missing."""
    return samples[(name, tuple(sorted(labels.items())))]


def names_of(samples: Samples) -> set[str]:
    """The metric names present."""
    return {name for name, _ in samples}


# --- the Pushgateway stand-in ------------------------------------------------------------


@dataclass
class Received:
    """One request as the stand-in saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: str


@dataclass
class FakeGateway:
    """A minimal Pushgateway: records requests and applies PUT/POST group semantics."""

    url: str
    requests: list[Received] = field(default_factory=list)
    groups: dict[str, dict[str, Samples]] = field(default_factory=dict)
    reply_status: int = 200
    reply_body: bytes = b""

    def apply(self, method: str, path: str, body: str) -> None:
        """Store the pushed families: PUT replaces the group, POST replaces names."""
        families: dict[str, Samples] = {}
        for family in text_string_to_metric_families(body):
            families[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        if method == "PUT":
            self.groups[path] = families
        else:
            self.groups.setdefault(path, {}).update(families)

    def group(self, path: str) -> Samples:
        """Every sample stored in one group."""
        return {k: v for family in self.groups[path].values() for k, v in family.items()}


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours *_proxy variables; loopback pushes must not go through a proxy."""
    for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def gateway() -> Iterator[FakeGateway]:
    """A FakeGateway listening on a free loopback port for the duration of one test."""
    state = FakeGateway(url="")

    class Handler(BaseHTTPRequestHandler):
        def _receive(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length).decode()
            state.requests.append(Received(self.command, self.path, dict(self.headers.items()), body))
            if state.reply_status < 400:
                state.apply(self.command, self.path, body)
            self.send_response(state.reply_status)
            self.send_header("Content-Length", str(len(state.reply_body)))
            self.end_headers()
            self.wfile.write(state.reply_body)

        do_PUT = _receive
        do_POST = _receive

        def log_message(self, format: str, *args: Any) -> None:
            """Keep the test output clean."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    # A short poll interval only makes shutdown() return fast; requests are served at once.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- pushes over HTTP --------------------------------------------------------------------


def test_succeeded_run_is_put_to_the_shard_group(gateway: FakeGateway) -> None:
    """A SUCCEEDED run PUTs text-format metrics to /metrics/job/<job>/shard/<I>."""
    push_run_metrics(succeeded_run(), gateway.url, grouping_key=shard_grouping_key((2, 4)))

    [request] = gateway.requests
    assert request.method == "PUT"
    assert request.path == "/metrics/job/mics-export/shard/2"
    assert request.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = samples_of(request.body)
    assert value(samples, "mics_export_run_status", status="SUCCEEDED") == 1
    assert value(samples, "mics_export_run_status", status="FAILED") == 0
    assert value(samples, "mics_export_last_success_timestamp_seconds") == FINISHED_S
    assert value(samples, "mics_export_last_run_timestamp_seconds") == FINISHED_S
    assert value(samples, "mics_export_run_duration_seconds") == 41 * 60 + 10
    assert value(samples, "mics_export_run_jobs") == 2
    assert value(samples, "mics_export_run_jobs_succeeded") == 2
    assert value(samples, "mics_export_run_jobs_failed") == 0
    fb = {"job_name": "fb-adwords-segments"}
    assert value(samples, "mics_export_job_invalid_lines", **fb) == 3
    assert value(samples, "mics_export_job_attempts", **fb) == 2
    assert value(samples, "mics_export_job_bytes", job_name="visitors") == 123_456_789
    assert value(samples, "mics_export_job_records", job_name="visitors") == 1_000_000
    assert value(samples, "mics_export_job_duration_seconds", job_name="visitors") == 600


def test_failed_run_is_posted_without_a_last_success(gateway: FakeGateway) -> None:
    """A FAILED run POSTs (keeps the old last success) and does not claim a new one."""
    push_run_metrics(failed_run(), gateway.url, job="nightly")

    [request] = gateway.requests
    assert request.method == "POST"
    assert request.path == "/metrics/job/nightly"
    samples = samples_of(request.body)
    assert "mics_export_last_success_timestamp_seconds" not in names_of(samples)
    assert value(samples, "mics_export_last_run_timestamp_seconds") == FINISHED_S
    assert value(samples, "mics_export_run_status", status="FAILED") == 1
    assert value(samples, "mics_export_run_jobs_failed") == 1
    assert value(samples, "mics_export_run_jobs_succeeded") == 1
    fb = {"job_name": "fb-adwords-segments"}
    assert value(samples, "mics_export_job_status", **fb, status="FAILED") == 1
    assert value(samples, "mics_export_job_status", **fb, status="SUCCEEDED") == 0
    assert value(samples, "mics_export_job_erroneous_tasks", **fb) == 12
    assert value(samples, "mics_export_job_attempts", **fb) == 3
    # Nothing produced: pushed as 0 so POST overwrites yesterday's numbers (see metrics.py).
    assert value(samples, "mics_export_job_bytes", **fb) == 0
    assert value(samples, "mics_export_job_records", **fb) == 0


def test_last_success_survives_a_failed_run(gateway: FakeGateway) -> None:
    """Success, then failure: the gateway keeps the first run's last success, rest is new."""
    first = succeeded_run()
    push_run_metrics(first, gateway.url)
    second = failed_run()
    second["started_at"], second["finished_at"] = "2026-11-29T02:00:00Z", "2026-11-29T03:00:00Z"
    push_run_metrics(second, gateway.url)

    stored = gateway.group("/metrics/job/mics-export")
    assert value(stored, "mics_export_last_success_timestamp_seconds") == FINISHED_S
    assert value(stored, "mics_export_last_run_timestamp_seconds") == STARTED_S + 86_400 + 3600
    assert value(stored, "mics_export_run_status", status="FAILED") == 1
    # Every per-job name was in the failed run's body, so none of them is stale.
    fb = {"job_name": "fb-adwords-segments"}
    assert value(stored, "mics_export_job_records", **fb) == 0
    assert value(stored, "mics_export_job_invalid_lines", **fb) == 0
    assert value(stored, "mics_export_job_records", job_name="visitors") == 7


def test_a_success_replaces_series_of_removed_jobs(gateway: FakeGateway) -> None:
    """PUT on success drops the series of a job no longer in the job file."""
    push_run_metrics(succeeded_run(), gateway.url)
    smaller = manifest("SUCCEEDED", [job_entry("visitors")])
    push_run_metrics(smaller, gateway.url)

    stored = gateway.group("/metrics/job/mics-export")
    job_names = {dict(labels).get("job_name") for _, labels in stored} - {None}
    assert job_names == {"visitors"}


def test_shards_push_to_separate_groups(gateway: FakeGateway) -> None:
    """Two shards do not overwrite each other: each has its own group and last success."""
    push_run_metrics(succeeded_run(), gateway.url, grouping_key=shard_grouping_key((0, 2)))
    push_run_metrics(failed_run(), gateway.url, grouping_key=shard_grouping_key((1, 2)))

    assert set(gateway.groups) == {
        "/metrics/job/mics-export/shard/0",
        "/metrics/job/mics-export/shard/1",
    }
    shard0 = gateway.group("/metrics/job/mics-export/shard/0")
    shard1 = gateway.group("/metrics/job/mics-export/shard/1")
    assert value(shard0, "mics_export_run_status", status="SUCCEEDED") == 1
    assert "mics_export_last_success_timestamp_seconds" in names_of(shard0)
    assert "mics_export_last_success_timestamp_seconds" not in names_of(shard1)


def test_credentials_in_the_url_become_basic_auth(gateway: FakeGateway) -> None:
    """user:password@ in the URL is sent as a Basic Authorization header, not in the URL."""
    url = gateway.url.replace("http://", "http://pusher:p%40ss@")
    push_run_metrics(succeeded_run(), url)

    [request] = gateway.requests
    assert request.path == "/metrics/job/mics-export"
    expected = base64.b64encode(b"pusher:p@ss").decode()
    assert request.headers["Authorization"] == f"Basic {expected}"


def test_gateway_error_status_raises_with_its_reason(gateway: FakeGateway) -> None:
    """A 4xx from the gateway raises MetricsPushError quoting the status and its body."""
    gateway.reply_status = 400
    gateway.reply_body = b"pushed metrics are invalid or inconsistent with existing metrics"
    with pytest.raises(MetricsPushError) as info:
        push_run_metrics(succeeded_run(), gateway.url)
    message = str(info.value)
    assert "HTTP 400" in message
    assert "inconsistent with existing metrics" in message
    assert gateway.url in message
    assert "\n" not in message


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_unreachable_gateway_raises_quickly() -> None:
    """Connection refused becomes MetricsPushError at once, not after the timeout."""
    url = f"http://127.0.0.1:{closed_port()}"
    began = time.monotonic()
    with pytest.raises(MetricsPushError, match="Connection refused"):
        push_run_metrics(succeeded_run(), url, timeout_s=30.0)
    assert time.monotonic() - began < 5.0


def test_silent_gateway_times_out() -> None:
    """A gateway that accepts the connection but never answers is cut off by timeout_s."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes the handshake; nobody ever reads or replies
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        began = time.monotonic()
        with pytest.raises(MetricsPushError, match="timed out"):
            push_run_metrics(succeeded_run(), url, timeout_s=0.2)
        assert time.monotonic() - began < 5.0


def test_password_never_appears_in_errors() -> None:
    """Neither the message nor the printed URL of a failed push carries the password."""
    url = f"http://pusher:hunter2@127.0.0.1:{closed_port()}"
    with pytest.raises(MetricsPushError) as info:
        push_run_metrics(succeeded_run(), url)
    assert "hunter2" not in str(info.value)
    assert f"http://127.0.0.1:{url.rsplit(':', 1)[1]}" in str(info.value)
    with pytest.raises(MetricsPushError, match="invalid Pushgateway URL") as bad:
        push_run_metrics(succeeded_run(), "http://pusher:hunter2@127.0.0.1:notaport")
    assert "hunter2" not in str(bad.value)
    assert bad.value.__cause__ is None


@pytest.mark.parametrize("url", ["http://", "ftp://gateway:9091", "http://gateway:99999"])
def test_unusable_url_is_a_push_error(url: str) -> None:
    """A URL with no host, a foreign scheme or a bad port fails before any connection."""
    with pytest.raises(MetricsPushError, match="invalid Pushgateway URL"):
        push_run_metrics(succeeded_run(), url)


def test_host_and_port_without_scheme_means_http(gateway: FakeGateway) -> None:
    """'127.0.0.1:PORT' (the Pushgateway's usual spelling) works like http://127.0.0.1:PORT."""
    push_run_metrics(failed_run(), gateway.url.removeprefix("http://"))
    assert [r.method for r in gateway.requests] == ["POST"]


def test_unreadable_manifest_is_a_push_error() -> None:
    """A manifest the metrics cannot be built from raises MetricsPushError, not a crash."""
    broken = succeeded_run()
    broken["finished_at"] = "yesterday"
    with pytest.raises(MetricsPushError, match="could not build metrics"):
        push_run_metrics(broken, f"http://127.0.0.1:{closed_port()}")


# --- the registry, without a network -----------------------------------------------------


def registry_samples(data: dict[str, Any], now_s: float | None = None) -> Samples:
    """The samples metrics_from_manifest() builds, through the exposition text."""
    return samples_of(generate_latest(metrics_from_manifest(data, now_s=now_s)).decode())


def test_each_job_has_exactly_one_status_set() -> None:
    """Every known status has a series per job and exactly one of them is 1."""
    samples = registry_samples(failed_run())
    for name in ("visitors", "fb-adwords-segments"):
        statuses = {
            dict(labels)["status"]: v
            for (metric, labels), v in samples.items()
            if metric == "mics_export_job_status" and dict(labels)["job_name"] == name
        }
        assert set(statuses) == set(JOB_STATUSES)
        assert sum(statuses.values()) == 1


def test_unknown_status_still_gets_a_series() -> None:
    """A status this version does not know (a newer manifest) is exported, not dropped."""
    samples = registry_samples(manifest("SUCCEEDED", [job_entry("a", "SKIPPED")]))
    assert value(samples, "mics_export_job_status", job_name="a", status="SKIPPED") == 1
    assert value(samples, "mics_export_job_status", job_name="a", status="SUCCEEDED") == 0


def test_interrupted_run_durations_end_with_the_run() -> None:
    """An unfinished job counts up to the run's end; a never-started one counts 0."""
    data = manifest(
        "INTERRUPTED",
        [
            job_entry("downloading", "DOWNLOADING", finished_at=None),
            job_entry("pending", "PENDING", started_at=None, finished_at=None, attempts=None),
        ],
    )
    samples = registry_samples(data)
    assert value(samples, "mics_export_job_duration_seconds", job_name="downloading") == FINISHED_S - STARTED_S
    assert value(samples, "mics_export_job_duration_seconds", job_name="pending") == 0
    assert value(samples, "mics_export_job_attempts", job_name="pending") == 0
    assert value(samples, "mics_export_run_status", status="INTERRUPTED") == 1
    assert value(samples, "mics_export_run_jobs_failed") == 0  # unfinished is not failed
    assert push_method(data) == "POST"


def test_running_manifest_uses_now_for_the_end() -> None:
    """With no finished_at yet, now_s stands in for the run's end."""
    data = deepcopy(succeeded_run())
    data["status"], data["finished_at"] = "RUNNING", None
    samples = registry_samples(data, now_s=STARTED_S + 90)
    assert value(samples, "mics_export_run_duration_seconds") == 90
    assert value(samples, "mics_export_last_run_timestamp_seconds") == STARTED_S + 90
    assert "mics_export_last_success_timestamp_seconds" not in names_of(samples)


def test_offset_and_naive_timestamps_are_read_as_utc() -> None:
    """'+00:00' and a naive timestamp give the same Unix time as 'Z'."""
    for finished in ("2026-11-28T02:41:10+00:00", "2026-11-28T02:41:10", FINISHED):
        data = manifest("SUCCEEDED", [])
        data["finished_at"] = finished
        assert value(registry_samples(data), "mics_export_last_run_timestamp_seconds") == FINISHED_S


def test_empty_run_has_run_metrics_only() -> None:
    """A shard with no jobs still reports its run (0 jobs, a success) and nothing per job."""
    samples = registry_samples(manifest("SUCCEEDED", []))
    assert value(samples, "mics_export_run_jobs") == 0
    assert value(samples, "mics_export_last_success_timestamp_seconds") == FINISHED_S
    assert not any(name.startswith("mics_export_job_") for name in names_of(samples))


def test_push_method_and_grouping_key() -> None:
    """PUT only for SUCCEEDED; the shard index (not N) keys the group."""
    assert push_method(succeeded_run()) == "PUT"
    assert push_method(failed_run()) == "POST"
    assert shard_grouping_key(None) == {}
    assert shard_grouping_key((3, 8)) == {"shard": "3"}


def test_run_reads_the_gateway_from_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run --metrics-pushgateway` defaults to $PUSHGATEWAY_ENV, the name the Kubernetes manifests set."""
    from orchestrator.cli_run import run

    monkeypatch.setenv(PUSHGATEWAY_ENV, "gateway.example:9091")
    ctx = run.make_context("run", ["jobs.yaml"])
    assert ctx.params["metrics_pushgateway"] == "gateway.example:9091"


def test_every_manifest_status_gets_a_series() -> None:
    """A job and the run have one 0/1 series for every status the manifest model defines."""
    from orchestrator.manifest import JobStatus, RunStatus

    samples = registry_samples(failed_run())
    job = {dict(labels)["status"] for (m, labels), _ in samples.items() if m == "mics_export_job_status"}
    run = {dict(labels)["status"] for (m, labels), _ in samples.items() if m == "mics_export_run_status"}
    assert job == {s.value for s in JobStatus} and set(JOB_STATUSES) == job
    assert run == {s.value for s in RunStatus} and set(RUN_STATUSES) == run


# --- the whole run ---------------------------------------------------------------------------


def test_run_pushes_its_metrics_at_the_end(gateway: FakeGateway, tmp_path: Path) -> None:
    """`mics-export run` in an Indexed Job pod pushes the run's real figures to its shard's group."""
    specs = [ExportSpec(str(i), size_bytes=5000 * i, pending_s=0.01, running_s=0.02) for i in (1, 2, 3)]
    with SimulatorThread(SimulatorConfig(token=TOKEN, exports=tuple(specs))) as sim:
        path = write_jobs(tmp_path, [{"name": f"j{s.id}", "export_id": s.id} for s in specs])
        env = cli_env(sim.url, JOB_COMPLETION_INDEX="0", MICS_SHARD_COUNT="1", MICS_METRICS_PUSHGATEWAY=gateway.url)
        proc = cli_in_process("run", str(path), env=env)
    assert proc.returncode == 0, proc.stderr
    [request] = gateway.requests
    assert (request.method, request.path) == ("PUT", "/metrics/job/mics-export/shard/0")
    samples = samples_of(request.body)
    assert value(samples, "mics_export_run_status", status="SUCCEEDED") == 1
    for spec in specs:
        assert value(samples, "mics_export_job_bytes", job_name=f"j{spec.id}") == spec.result().size
        assert value(samples, "mics_export_job_records", job_name=f"j{spec.id}") == spec.result().records
