"""The job file: YAML → frozen, validated :class:`JobFile` with defaults merged.

Validation is strict (unknown keys are errors) and every error is one line naming the
file, the job and the key, e.g.::

    jobs.yaml: job 'visitors': timeout_s: must be greater than 0

``{date}`` in ``output_dir`` is the run's UTC date (YYYY-MM-DD). Nothing here does I/O
beyond reading the file, and nothing talks to the API.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.errors import ConfigError, MissingTokenError, UsageError

NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def _as_id(value: Any) -> Any:
    """IDs may be written as numbers or strings; they are kept as the strings the API shows."""
    if isinstance(value, bool):
        raise ValueError("must be an id (a number or a string of digits), not a boolean")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError("must be a non-empty id")


Id = Annotated[str, BeforeValidator(_as_id)]
PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class Poll(_Strict):
    """Polling: exponential from initial_s, full jitter, capped at max_s (seconds)."""

    initial_s: PositiveFloat = 2.0
    max_s: PositiveFloat = 60.0

    @model_validator(mode="after")
    def _order(self) -> Poll:
        if self.max_s < self.initial_s:
            raise ValueError("max_s must be at least initial_s")
        return self


class Query(_Strict):
    """An export defined by its OTQL query."""

    datamart_id: Id
    text: Annotated[str, Field(min_length=1)]


class Settings(_Strict):
    """What every job inherits from ``defaults`` and may override."""

    organisation_id: Id | None = None
    poll: Poll = Poll()
    timeout_s: PositiveFloat = 7200.0
    retries: Annotated[int, Field(ge=0)] = 2
    compression: Literal["none", "gzip", "zstd"] = "none"
    on_invalid: Literal["keep", "fail"] = "keep"
    stall_s: PositiveFloat | None = None
    """Warn when completed_tasks has not moved for this long (seconds)."""
    stall_action: Literal["warn", "timeout"] = "warn"
    max_line_bytes: PositiveInt = 256 << 20
    """A longer line fails the job (bytes): a bound on the memory one line may take."""
    on_unverified_length: Literal["fail", "keep"] = "fail"
    """When the server stated no length and the end could not be confirmed: fail the job
    (the default: never a possibly short file reported as success), or keep the file and
    say ``length_check: unverified`` in the manifest."""


class Job(Settings):
    """One export to run: the defaults merged with its own keys."""

    name: str
    export_id: Id | None = None
    query: Query | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value) or value in (".", ".."):
            raise ValueError("must match [A-Za-z0-9._-]+ (it names the output file)")
        if value.startswith("."):
            raise ValueError("must not start with '.' (hidden files are the tool's temporary files)")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Job:
        if (self.export_id is None) == (self.query is None):
            raise ValueError("needs exactly one of export_id or query")
        if self.query is not None and self.organisation_id is None:
            raise ValueError("a query job needs organisation_id (in defaults or in the job)")
        return self


class Retries(_Strict):
    """How transient API failures (429, 5xx, resets) are retried; seconds."""

    max_tries: PositiveInt = 8
    base_s: PositiveFloat = 0.5
    max_wait_s: PositiveFloat = 30.0
    max_time_s: PositiveFloat = 600.0


class Api(_Strict):
    """Where the API is, which variable holds the token, and how to talk to it."""

    base_url: str = "https://api.mediarithmics.com"
    token_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "MICS_API_TOKEN"  # noqa: S105 - a variable name
    query_export_prefix: str = "mics-export:"
    """Exports the tool creates for query jobs are named PREFIX + job name."""
    retries: Retries = Retries()
    max_requests_in_flight: PositiveInt = 64
    """Cap on concurrent HTTP requests; halves on each 429 and recovers (AIMD)."""
    accept_gzip: bool = False
    """Ask for gzip on the wire: worth it only on links slower than ~100 MB/s."""


class RunSettings(_Strict):
    """Run-wide settings."""

    output_dir: str = "./exports/{date}"
    concurrency: PositiveInt = 8


class JobFile(_Strict):
    """The whole job file, version 1."""

    version: Literal[1]
    api: Api = Api()
    run: RunSettings = RunSettings()
    jobs: tuple[Job, ...]
    path: str = ""

    def output_dir(self, override: str | None = None, today: dt.date | None = None) -> Path:
        """The output folder with ``{date}`` resolved (UTC)."""
        template = override or self.run.output_dir
        date = (today or dt.datetime.now(dt.UTC).date()).isoformat()
        return Path(template.replace("{date}", date))

    def base_url(self) -> str:
        """The API URL of the run: ``MICS_API_URL`` if set, else ``api.base_url``; checked."""
        if os.environ.get("MICS_API_URL"):
            return check_base_url(os.environ["MICS_API_URL"], "MICS_API_URL")
        return check_base_url(self.api.base_url, f"{self.path}: api.base_url")

    def select(self, only: tuple[str, ...] = ()) -> tuple[Job, ...]:
        """The jobs named in ``only`` (all when empty); unknown names are an error."""
        if not only:
            return self.jobs
        known = {j.name for j in self.jobs}
        missing = [n for n in only if n not in known]
        if missing:
            raise ConfigError(f"{self.path}: --only names unknown job(s): {', '.join(missing)}")
        return tuple(j for j in self.jobs if j.name in only)


def _loc(file: str, raw_jobs: Any, loc: tuple[int | str, ...]) -> str:
    """'FILE: job NAME: key' from a pydantic error location."""
    parts = [str(p) for p in loc]
    if len(loc) >= 2 and loc[0] == "jobs" and isinstance(loc[1], int):
        index = loc[1]
        name = None
        if isinstance(raw_jobs, list) and index < len(raw_jobs) and isinstance(raw_jobs[index], dict):
            name = raw_jobs[index].get("name")
        who = f"job {name!r}" if name else f"job #{index + 1}"
        key = ".".join(parts[2:])
        return f"{file}: {who}" + (f": {key}" if key else "")
    return f"{file}: " + ".".join(parts) if parts else file


def _message(err: Any) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "is required"
    if kind == "greater_than":
        return f"must be greater than {err['ctx']['gt']}"
    if kind == "greater_than_equal":
        return f"must be at least {err['ctx']['ge']}"
    return str(msg).removeprefix("Value error, ")


def parse_job_file(data: Any, file: str = "<job file>") -> JobFile:
    """Validate a loaded job file and merge defaults into each job."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{file}: the job file must be a YAML mapping with version, defaults and jobs")
    data = dict(data)
    defaults = data.pop("defaults", None) or {}
    raw_jobs = data.get("jobs")
    if not isinstance(defaults, Mapping):
        raise ConfigError(f"{file}: defaults: must be a mapping")
    try:
        Settings.model_validate(defaults)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"{file}: defaults.{'.'.join(map(str, err['loc']))}: {_message(err)}") from None
    if "jobs" not in data:
        raise ConfigError(f"{file}: jobs: is required (a list of exports to run)")
    if not isinstance(raw_jobs, list) or not raw_jobs:
        raise ConfigError(f"{file}: jobs: must be a non-empty list")
    merged = []
    for job in raw_jobs:
        if not isinstance(job, Mapping):
            merged.append(job)
            continue
        merged.append({**defaults, **job})
    data["jobs"] = merged
    data["path"] = file
    try:
        job_file = JobFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"{_loc(file, raw_jobs, err['loc'])}: {_message(err)}") from None
    seen: set[str] = set()
    for job in job_file.jobs:
        if job.name in seen:
            raise ConfigError(f"{file}: job {job.name!r}: name: duplicate job name")
        seen.add(job.name)
    return job_file


def read_token(variable: str = "MICS_API_TOKEN") -> str:
    """The API token from the environment variable ``variable``; MissingTokenError if unset."""
    token = os.environ.get(variable, "").strip()
    if not token:
        raise MissingTokenError(variable)
    if any(c in token for c in "\r\n\0"):
        raise UsageError(f"the API token in {variable} contains a line break: check how it was set")
    return token


def check_base_url(url: str, source: str = "the API URL") -> str:
    """``url`` if it is an http(s) URL with a host; otherwise a one-line UsageError."""
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"{source} {url!r} is not an http(s) URL with a host, e.g. https://api.mediarithmics.com")
    return url.rstrip("/")


def load_job_file(path: str | os.PathLike[str]) -> JobFile:
    """Read and validate a job file. Raises ConfigError with one line on any problem."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{file}: invalid YAML{where}: {problem}") from None
    return parse_job_file(data, file)


__all__ = [
    "Api",
    "Job",
    "JobFile",
    "Poll",
    "Query",
    "Retries",
    "RunSettings",
    "Settings",
    "check_base_url",
    "load_job_file",
    "parse_job_file",
    "read_token",
]
