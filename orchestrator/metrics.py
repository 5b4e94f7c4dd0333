"""Push a run's outcome to a Prometheus Pushgateway once the run is over.

A nightly batch lives for minutes, so Prometheus cannot scrape it: the run pushes its final
manifest, turned into gauges, to a Pushgateway, and Prometheus scrapes that (with
``honor_labels: true``). :func:`metrics_from_manifest` builds the registry (pure, tested
without a network); :func:`push_run_metrics` sends it. The CLI reads the gateway's URL from
``--metrics-pushgateway`` or the environment variable :data:`PUSHGATEWAY_ENV`.

The metrics (all gauges; ``job_name`` is the job file's name, because the label ``job`` is
the Pushgateway's own grouping label):

================================================  =============================================
``mics_export_job_status{job_name,status}``       1 for the job's status, 0 for every other one
``mics_export_job_bytes{job_name}``               size of the job's output, in bytes
``mics_export_job_records{job_name}``             JSON records in the output
``mics_export_job_invalid_lines{job_name}``       lines that are not JSON (kept in the file)
``mics_export_job_erroneous_tasks{job_name}``     platform tasks that failed in the execution
``mics_export_job_attempts{job_name}``            executions the job used, across reruns
``mics_export_job_duration_seconds{job_name}``    from the job's start to its end
``mics_export_run_status{status}``                1 for the run's status, 0 for the others
``mics_export_run_duration_seconds``              from the run's start to its end
``mics_export_run_jobs``                          jobs this run (or shard) selected
``mics_export_run_jobs_succeeded``                ... of which SUCCEEDED
``mics_export_run_jobs_failed``                   ... of which FAILED, TIMED_OUT or CANCELLED
``mics_export_last_run_timestamp_seconds``        end of the last run, Unix time
``mics_export_last_success_timestamp_seconds``    end of the last SUCCEEDED run, Unix time
================================================  =============================================

Status is a 0/1 gauge per possible value (the kube-state-metrics encoding): every series is
present on every push, alerts read ``mics_export_job_status{status="FAILED"} == 1``, and a
series never just disappears when the status changes.

PUT or POST — why the method depends on the run's status
---------------------------------------------------------
The Pushgateway keeps metrics in groups (here ``job="mics-export"`` plus the shard, if any).
``PUT`` (``push_to_gateway``) replaces the whole group; ``POST`` (``pushadd_to_gateway``)
replaces only the metric *names* present in the body and keeps the others.

``mics_export_last_success_timestamp_seconds`` is only in the body of a SUCCEEDED run: a
failed run cannot claim a success. The alert "no success for 26 h" needs it to *survive*
failed runs. With PUT, a failed run would delete it: the alert's series would vanish
(``time() - x > 26*3600`` is then empty, not true) instead of firing. So:

- a SUCCEEDED run uses **PUT**: the body carries every metric, including the new last
  success, and replacing the whole group also drops series that no longer exist (a job
  removed from the job file, a metric renamed by an upgrade);
- any other run uses **POST**: every name in the body is replaced, the last success is
  left as it was.

POST leaves a name untouched when the body has *no sample* for it. So that a failed run does
not leave yesterday's numbers beside today's statuses, every per-job metric has a sample for
every job: an amount the manifest leaves null (a job that produced no file) is pushed as 0,
what this run delivered; a job that started but did not finish (an interrupted run) counts
its duration up to the run's end; a job that never started counts 0.

Pushing is blocking I/O (urllib, inside prometheus_client) and happens once, after the run:
call it after the event loop is done, or through ``anyio.to_thread.run_sync``.

A little over ~350 lines, most of it the series' documentation above: the names, their
labels and the code that fills them are kept side by side so they cannot drift apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.client import HTTPException
from typing import TYPE_CHECKING, Any
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlsplit, urlunsplit

from orchestrator.errors import MicsExportError
from orchestrator.manifest import JobStatus, RunStatus

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Gauge

__all__ = [
    "DEFAULT_PUSH_JOB",
    "JOB_STATUSES",
    "PUSHGATEWAY_ENV",
    "RUN_STATUSES",
    "MetricsPushError",
    "metrics_from_manifest",
    "push_method",
    "push_run_metrics",
    "shard_grouping_key",
]

#: Environment variable holding the Pushgateway URL (``--metrics-pushgateway`` wins over it).
PUSHGATEWAY_ENV = "MICS_METRICS_PUSHGATEWAY"
#: The Pushgateway ``job`` label (grouping key) the runs push under.
DEFAULT_PUSH_JOB = "mics-export"

#: Every job status of the manifest (:class:`~orchestrator.manifest.JobStatus`); each gets a
#: 0/1 series per job.
JOB_STATUSES: tuple[str, ...] = tuple(status.value for status in JobStatus)
#: Every run status of the manifest (:class:`~orchestrator.manifest.RunStatus`).
RUN_STATUSES: tuple[str, ...] = tuple(status.value for status in RunStatus)
# Final and not a success: what "failed" counts. PENDING/RUNNING/DOWNLOADING jobs of an
# interrupted run are neither succeeded nor failed.
_FAILED_JOB_STATUSES = frozenset(s.value for s in JobStatus if s.is_final and s is not JobStatus.SUCCEEDED)

_PREFIX = "mics_export_"
# Enough of an error body to carry the Pushgateway's reason, not enough to flood a log line.
_ERROR_BODY_LIMIT = 300


class MetricsPushError(MicsExportError):
    """The metrics could not be pushed (gateway unreachable, timed out, or said no).

    The run itself is unaffected: the CLI reports this as a warning, not a failure.
    """


def shard_grouping_key(shard: tuple[int, int] | None) -> dict[str, str]:
    """Grouping key for a run: ``{"shard": "I"}`` for shard I of N, ``{}`` when unsharded.

    Each shard pushes to its own group, so shards never overwrite each other's metrics and
    each has its own last success. N is left out on purpose: the group of shard 2 stays the
    same group if N changes. When N shrinks, delete the groups of the shards that are gone.
    """
    return {} if shard is None else {"shard": str(shard[0])}


def _timestamp_s(value: Any) -> float | None:
    """Unix time (seconds) of an ISO-8601 string such as ``2026-11-28T02:00:00Z``; None if null."""
    if value is None:
        return None
    parsed = datetime.fromisoformat(str(value))  # 3.11 reads the trailing "Z"
    if parsed.tzinfo is None:  # the manifest writes UTC; never read it as local time
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _amount(value: Any) -> float:
    """A count from the manifest; null (nothing produced) is 0 — see the module docstring."""
    return 0.0 if value is None else float(value)


def _set_enum(gauge: Gauge, labels: Mapping[str, str], statuses: Iterable[str], current: str) -> None:
    """Set one series per status: 1 for ``current``, 0 for the rest.

    A status outside the known list (a newer manifest) still gets its series, set to 1.
    """
    for status in dict.fromkeys([*statuses, current]):  # ordered, de-duplicated
        gauge.labels(**labels, status=status).set(1.0 if status == current else 0.0)


def metrics_from_manifest(manifest: Mapping[str, Any], *, now_s: float | None = None) -> CollectorRegistry:
    """Build a fresh registry holding the metrics of one run's manifest (SPEC's manifest.json).

    ``now_s`` (Unix seconds, default: the clock) stands in for the run's ``finished_at``
    when the manifest has none yet (status RUNNING). Raises ``ValueError`` on a timestamp
    that is not ISO-8601.
    """
    # prometheus_client is imported here, not at the top: the CLI reads PUSHGATEWAY_ENV on
    # every command, and only a run that pushes needs the library (~0.1 s to import).
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    finished = _timestamp_s(manifest.get("finished_at"))
    end = finished if finished is not None else (time.time() if now_s is None else now_s)
    jobs: list[Mapping[str, Any]] = list(manifest.get("jobs") or [])
    _job_metrics(registry, jobs, end)
    _run_metrics(registry, manifest, jobs, end)
    return registry


def _gauge(registry: CollectorRegistry, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
    from prometheus_client import Gauge

    return Gauge(_PREFIX + name, doc, labels, registry=registry)


def _job_metrics(registry: CollectorRegistry, jobs: list[Mapping[str, Any]], end: float) -> None:
    """The per-job series: one sample per job for every metric (see the module docstring)."""
    job_status = _gauge(
        registry, "job_status", "1 for the job's status in the last run, 0 for the others.", ("job_name", "status")
    )
    amounts = {
        key: _gauge(registry, name, doc, ("job_name",))
        for key, name, doc in (
            ("bytes", "job_bytes", "Size of the job's output file in bytes."),
            ("records", "job_records", "JSON records in the job's output."),
            ("invalid_lines", "job_invalid_lines", "Lines of the job's output that are not valid JSON."),
            ("erroneous_tasks", "job_erroneous_tasks", "Platform tasks that failed in the job's execution."),
            ("attempts", "job_attempts", "Executions the job used, across reruns."),
        )
    }
    job_duration = _gauge(
        registry, "job_duration_seconds", "Duration of the job in the last run, in seconds.", ("job_name",)
    )
    for job in jobs:
        labels = {"job_name": str(job["name"])}
        _set_enum(job_status, labels, JOB_STATUSES, str(job.get("status")))
        for key, gauge in amounts.items():
            gauge.labels(**labels).set(_amount(job.get(key)))
        job_started = _timestamp_s(job.get("started_at"))
        job_finished = _timestamp_s(job.get("finished_at"))
        if job_started is None:
            duration = 0.0  # never started (e.g. still PENDING when the run was stopped)
        else:
            # Unfinished (interrupted): the time it spent in this run, up to the run's end.
            duration = max(0.0, (job_finished if job_finished is not None else end) - job_started)
        job_duration.labels(**labels).set(duration)


def _run_metrics(
    registry: CollectorRegistry, manifest: Mapping[str, Any], jobs: list[Mapping[str, Any]], end: float
) -> None:
    """The run's series; the last success only in the body of a SUCCEEDED run."""
    status = str(manifest.get("status"))
    started = _timestamp_s(manifest.get("started_at"))
    run_status = _gauge(registry, "run_status", "1 for the last run's status, 0 for the others.", ("status",))
    _set_enum(run_status, {}, RUN_STATUSES, status)
    _gauge(registry, "run_duration_seconds", "Duration of the last run in seconds.").set(
        0.0 if started is None else max(0.0, end - started)
    )
    _gauge(registry, "run_jobs", "Jobs the last run selected.").set(len(jobs))
    _gauge(registry, "run_jobs_succeeded", "Jobs of the last run that succeeded.").set(
        sum(1 for job in jobs if job.get("status") == JobStatus.SUCCEEDED)
    )
    _gauge(registry, "run_jobs_failed", "Jobs of the last run that failed, timed out or were cancelled.").set(
        sum(1 for job in jobs if job.get("status") in _FAILED_JOB_STATUSES)
    )
    _gauge(registry, "last_run_timestamp_seconds", "Unix time at which the last run finished.").set(end)
    if status == RunStatus.SUCCEEDED:
        # Only a success may move it; push_method() keeps the previous value otherwise.
        _gauge(registry, "last_success_timestamp_seconds", "Unix time at which the last successful run finished.").set(
            end
        )


def push_method(manifest: Mapping[str, Any]) -> str:
    """``"PUT"`` for a SUCCEEDED run, ``"POST"`` otherwise (why: the module docstring)."""
    return "PUT" if manifest.get("status") == RunStatus.SUCCEEDED else "POST"


@dataclass(frozen=True)
class _Gateway:
    """A Pushgateway URL split into what urllib can use and the Basic-auth credentials."""

    url: str  # scheme://host[:port][/prefix], without credentials: safe to print
    username: str | None
    password: str | None


def _parse_gateway(gateway_url: str) -> _Gateway:
    """Split ``gateway_url``; ``host:port`` means ``http://host:port``, as in prometheus_client.

    Credentials in the URL (``http://user:password@host:9091``) become a Basic-auth header:
    urllib itself cannot use them, and the URL printed in errors must not carry them.
    Raises ``ValueError`` (without the password) when there is no usable host or port.
    """
    text = gateway_url.strip()
    scheme = urlsplit(text).scheme
    if "://" in text and scheme not in ("http", "https"):
        raise ValueError(f"unsupported scheme {scheme!r}, expected http(s)://host:port")
    if scheme not in ("http", "https"):  # "host:port" parses as scheme "host"
        text = f"http://{text}"
    parts = urlsplit(text)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        port, host = None, ""
    if not host:
        raise ValueError("expected http(s)://host:port")
    if ":" in host:  # IPv6 literal: hostname dropped its brackets
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return _Gateway(
        url=urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", "")),
        username=None if parts.username is None else unquote(parts.username),
        password=None if parts.password is None else unquote(parts.password),
    )


def push_run_metrics(
    manifest: Mapping[str, Any],
    gateway_url: str,
    *,
    job: str = DEFAULT_PUSH_JOB,
    grouping_key: Mapping[str, str] | None = None,
    timeout_s: float = 10.0,
) -> None:
    """Push the metrics of ``manifest`` to the Pushgateway at ``gateway_url``.

    ``gateway_url`` is ``http(s)://[user:password@]host:port[/path-prefix]``; ``host:port``
    means http. ``job`` and ``grouping_key`` (see :func:`shard_grouping_key`) name the
    group. ``timeout_s`` bounds the connection and each read, in seconds. PUT or POST as
    :func:`push_method` says. Blocking.

    Raises :class:`MetricsPushError` (one line, never the password) when the URL is unusable,
    the gateway is unreachable or too slow, or it answers with an error status.
    """
    try:
        gateway = _parse_gateway(gateway_url)
    except ValueError as exc:
        # `from None` and no URL in the message: the traceback must not carry a password.
        raise MetricsPushError(f"invalid Pushgateway URL ({exc})") from None
    try:
        registry = metrics_from_manifest(manifest)
    except (KeyError, TypeError, ValueError) as exc:
        # A manifest we cannot read is our bug, but it must not turn a finished run into a
        # crash: the CLI warns about it like about an unreachable gateway.
        raise MetricsPushError(f"could not build metrics from the manifest: {exc!r}") from exc
    method = push_method(manifest)
    from prometheus_client.exposition import push_to_gateway, pushadd_to_gateway

    push = push_to_gateway if method == "PUT" else pushadd_to_gateway
    try:
        push(
            gateway.url,
            job=job,
            registry=registry,
            grouping_key=dict(grouping_key or {}),
            timeout=timeout_s,
            handler=_auth_handler(gateway),  # without credentials it does exactly what the default does
        )
    # OSError covers URLError, HTTPError, timeouts and the "error talking to pushgateway"
    # that prometheus_client raises itself; HTTPException a reply that is not HTTP at all
    # and a URL http.client refuses; ValueError the rest of urllib's URL checks.
    except (OSError, HTTPException, ValueError) as exc:
        reason = _describe(exc)
        if gateway.password:  # belt and braces: no library message may echo it
            reason = reason.replace(gateway.password, "***")
        raise MetricsPushError(
            f"could not push metrics to the Pushgateway at {gateway.url} ({method}): {reason}"
        ) from exc


def _auth_handler(
    gateway: _Gateway,
) -> Callable[[str, str, float | None, list[tuple[str, str]], bytes], Callable[[], None]]:
    """A prometheus_client push handler sending the gateway's basic-auth credentials (if any)."""
    from prometheus_client.exposition import basic_auth_handler

    def handler(
        url: str, method: str, timeout: float | None, headers: list[tuple[str, str]], data: bytes
    ) -> Callable[[], None]:
        return basic_auth_handler(url, method, timeout, headers, data, gateway.username, gateway.password)

    return handler


def _describe(exc: BaseException) -> str:
    """One line saying why a push failed, with the gateway's own explanation when it gave one."""
    if isinstance(exc, HTTPError):
        # The Pushgateway says why it refused (e.g. metrics inconsistent with another
        # group) in the body; the status line alone would leave the operator guessing.
        try:
            body = exc.read(_ERROR_BODY_LIMIT).decode("utf-8", "replace")
        except OSError:
            body = ""
        text = f"HTTP {exc.code} {exc.reason}" + (f": {body}" if body.strip() else "")
    elif isinstance(exc, URLError):
        text = str(exc.reason)  # "[Errno 111] Connection refused", not "<urlopen error ...>"
    else:
        text = str(exc)
    return " ".join(text.split()) or type(exc).__name__
