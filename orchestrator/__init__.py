"""mics-export: an asyncio bulk orchestrator for mediarithmics Query Exports.

The modules are private by default; the names in ``__all__`` are the public API. To run a
job file from Python (Airflow, Dagster, Prefect): ``orchestrator.run(path_or_job_file, ...)``
returns a :class:`RunResult`; ``run_async`` is the same for a caller already in an event loop.
"""

from __future__ import annotations

import importlib
from typing import Any

from orchestrator._version import __version__ as __version__

# Public names are loaded on first use (PEP 562), so that `python -m orchestrator.validate_worker`
# (the validation worker processes) imports orjson and nothing heavier.
_LAZY = {
    "ApiClient": "orchestrator.api",
    "ApiError": "orchestrator.errors",
    "AuthError": "orchestrator.errors",
    "ConfigError": "orchestrator.errors",
    "ConnectError": "orchestrator.errors",
    "DownloadResult": "orchestrator.download",
    "Execution": "orchestrator.models",
    "ExecutionFailedError": "orchestrator.errors",
    "ExecutionStatus": "orchestrator.models",
    "ExecutionTimeoutError": "orchestrator.errors",
    "Export": "orchestrator.models",
    "IncompleteBodyError": "orchestrator.errors",
    "InvalidDataError": "orchestrator.errors",
    "Job": "orchestrator.config",
    "JobError": "orchestrator.errors",
    "JobFile": "orchestrator.config",
    "JobRecord": "orchestrator.manifest",
    "JobResult": "orchestrator.results",
    "JobStatus": "orchestrator.manifest",
    "LineChecker": "orchestrator.ndjson",
    "LineStats": "orchestrator.ndjson",
    "MalformedResponseError": "orchestrator.errors",
    "Manifest": "orchestrator.manifest",
    "ManifestWriteError": "orchestrator.manifest",
    "MicsExportError": "orchestrator.errors",
    "MissingTokenError": "orchestrator.errors",
    "NotFoundError": "orchestrator.errors",
    "Page": "orchestrator.models",
    "PagingError": "orchestrator.errors",
    "RetryPolicy": "orchestrator.retry",
    "RunOptions": "orchestrator.plan",
    "RunResult": "orchestrator.results",
    "RunStatus": "orchestrator.manifest",
    "Runner": "orchestrator.scheduler",
    "Throttle": "orchestrator.transport",
    "Timeouts": "orchestrator.transport",
    "TransientApiError": "orchestrator.errors",
    "TransportError": "orchestrator.errors",
    "UsageError": "orchestrator.errors",
    "download": "orchestrator.download",
    "execute": "orchestrator.app",
    "load_job_file": "orchestrator.config",
    "parse_job_file": "orchestrator.config",
    "run": "orchestrator.app",
    "run_async": "orchestrator.app",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = sorted([*_LAZY, "__version__"])  # one list of names: derived, never hand-synced
