"""mics-export: an asyncio bulk orchestrator for mediarithmics Query Exports.

The modules are private by default; the names below are the public API.
"""

from orchestrator._version import __version__
from orchestrator.api import ApiClient, RetryPolicy, Throttle, Timeouts
from orchestrator.config import Job, JobFile, load_job_file, parse_job_file
from orchestrator.download import DownloadResult, download
from orchestrator.errors import (
    ApiError,
    AuthError,
    ConfigError,
    ConnectError,
    ExecutionFailedError,
    ExecutionTimeoutError,
    IncompleteBodyError,
    InvalidDataError,
    JobError,
    MicsExportError,
    MissingTokenError,
    NotFoundError,
    TransientApiError,
    TransportError,
    UsageError,
)
from orchestrator.manifest import JobRecord, JobStatus, Manifest, RunStatus
from orchestrator.models import Execution, ExecutionStatus, Export, Page
from orchestrator.ndjson import LineChecker, LineStats
from orchestrator.scheduler import Runner, RunOptions, execute

__all__ = [
    "ApiClient",
    "ApiError",
    "AuthError",
    "ConfigError",
    "ConnectError",
    "DownloadResult",
    "Execution",
    "ExecutionFailedError",
    "ExecutionStatus",
    "ExecutionTimeoutError",
    "Export",
    "IncompleteBodyError",
    "InvalidDataError",
    "Job",
    "JobError",
    "JobFile",
    "JobRecord",
    "JobStatus",
    "LineChecker",
    "LineStats",
    "Manifest",
    "MicsExportError",
    "MissingTokenError",
    "NotFoundError",
    "Page",
    "RetryPolicy",
    "RunOptions",
    "RunStatus",
    "Runner",
    "Throttle",
    "Timeouts",
    "TransientApiError",
    "TransportError",
    "UsageError",
    "__version__",
    "download",
    "execute",
    "load_job_file",
    "parse_job_file",
]
