"""Which job the running task works for, so that every log line can say so.

The scheduler's own lines carry ``job``, ``export_id`` and ``execution_id`` through its
JobLog adapter. Lines logged deeper down — a retried request in the API client, a resumed
download in the stream, an unknown status in the models — are logged by code that knows
nothing of jobs, and used to come out with ``job: null``. Each job runs in its own task
(and so its own copy of the context): the scheduler binds the job's fields here for the
task, and a filter on those loggers fills in whatever a record lacks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token

JOB_FIELDS = ("job", "export_id", "execution_id")
"""The fields a job's log lines carry (logs.py writes them first)."""

Fields = Callable[[], Mapping[str, object] | None]
"""Returns the job's current fields: read at each record, as the execution id changes."""

_current: ContextVar[Fields | None] = ContextVar("mics_export_job_fields", default=None)


def bind_job(fields: Fields) -> Token[Fields | None]:
    """Tag every record logged from this task (and tasks it starts) with ``fields()``."""
    return _current.set(fields)


def unbind_job(token: Token[Fields | None]) -> None:
    """Undo :func:`bind_job` (in the same task)."""
    _current.reset(token)


class JobContextFilter(logging.Filter):
    """Fills ``job``, ``export_id``, ``execution_id`` on a record that does not set them."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _current.get()
        values = fields() if fields is not None else None
        if values:
            for key in JOB_FIELDS:
                if getattr(record, key, None) is None and values.get(key) is not None:
                    setattr(record, key, values[key])
        return True


_FILTER = JobContextFilter()
TAGGED_LOGGERS = ("orchestrator.api", "orchestrator.stream", "orchestrator.models", "orchestrator.manifest")
"""Loggers of code that runs inside a job's task without knowing the job.

A logger's filters see only the records logged on that very logger (not its children's),
so each is named here; the handlers (logs.py) stay as they are.
"""


def install(names: tuple[str, ...] = TAGGED_LOGGERS) -> None:
    """Put the filter on the named loggers (once each; safe to call again)."""
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


install()

__all__ = ["JOB_FIELDS", "JobContextFilter", "bind_job", "install", "unbind_job"]
