"""The job file: YAML → frozen, validated :class:`JobFile` with defaults merged.

Validation is strict (unknown keys are errors) and every error is one line naming the
file, the job and the key, e.g.::

    jobs.yaml: job 'visitors': timeout_s: must be greater than 0

``{date}`` in ``output_dir`` is the run's UTC date (YYYY-MM-DD). Nothing here does I/O
beyond reading the file, and nothing talks to the API.

Reading the YAML safely is :mod:`orchestrator.config_yaml`'s; the API's URL and token are
:mod:`orchestrator.endpoint`'s (re-exported here). Over ~350 lines on purpose: this is the
job file's one schema, every key with its type, default, bounds and the one-line message
it fails with; split across modules, a reader would have to assemble the file format.
"""

from __future__ import annotations

import datetime as dt
import difflib
import importlib.util
import os
import re
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.config_yaml import MAX_JOB_FILE_BYTES, MAX_YAML_NODES, load_yaml
from orchestrator.config_yaml import brief as _brief
from orchestrator.durations import parse_duration
from orchestrator.endpoint import (
    API_URL_ENV,
    DEFAULT_BASE_URL,
    api_url,
    check_base_url,
    read_token,
    safe_url,
    url_problem,
)
from orchestrator.errors import ConfigError, UsageError
from orchestrator.location import parse_location
from orchestrator.retry import DEFAULTS as RETRY_DEFAULTS
from orchestrator.retry import RetryPolicy

NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
"""A job name, matched whole (fullmatch: ``$`` would let a trailing newline through)."""
NAME_MAX_BYTES = 200
"""The longest job name: the longest file named after it, ``.NAME.ndjson.zst.EXECUTIONID.part``,
must stay under the 255 bytes most file systems allow in a name."""
ID_RE = re.compile(r"[0-9]+")
"""The API's ids are strings of ASCII digits; anything else would end up in a URL path."""
MAX_SECONDS = 10 * 366 * 86_400.0
"""The longest duration (seconds) any setting takes: ten years. Beyond it a value is a typo,
and date arithmetic on it (``now - reuse_within``) would overflow."""
MAX_COUNT = 1_000_000
"""The largest count (concurrency, retries, requests in flight) a setting takes."""
MAX_RECORDS = 10**15
"""The largest record or line count a guard takes: exports hold billions of lines."""
QUERY_EXPORT_PREFIX = "mics-export:"
"""The default ``api.query_export_prefix``: exports created for query jobs are named PREFIX + job name."""


def _as_id(value: Any) -> Any:
    """IDs may be written as numbers or strings; they are kept as the strings the API shows.

    Only ASCII digits pass: an id is put into request paths (with the token in a header),
    so ``../../admin?x=1#`` must never get that far.
    """
    if isinstance(value, bool):
        raise ValueError("must be an id (a number or a string of digits), not a boolean")
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, str) and value.strip():
        text = value.strip()
        if not ID_RE.fullmatch(text):
            raise ValueError(f"must be an id made of digits only, e.g. 9872, not {_show(text)}")
        return text
    raise ValueError("must be a non-empty id")


def _show(value: str, limit: int = 40) -> str:
    """A user's value quoted for a one-line message: escaped, and cut when long."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _not_bool(value: Any) -> Any:
    """YAML's ``true`` is not the number 1: pydantic's lax mode would take it as one."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Id = Annotated[str, BeforeValidator(_as_id)]
Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False), BeforeValidator(_not_bool)]
PositiveFloat = Seconds  # every positive float of the job file is a number of seconds
PositiveInt = Annotated[int, Field(gt=0, le=MAX_COUNT), BeforeValidator(_not_bool)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT), BeforeValidator(_not_bool)]
RecordCount = Annotated[int, Field(ge=0, le=MAX_RECORDS), BeforeValidator(_not_bool)]
Bytes = Annotated[int, Field(gt=0, le=1 << 40), BeforeValidator(_not_bool)]


def _percent(value: float) -> float:
    """A percentage: from 0 to 100 (checked after a string such as "150" became a number)."""
    if not 0 <= value <= 100:
        raise ValueError(f"must be a percentage from 0 to 100, not {value:g}")
    return value


Percent = Annotated[float, Field(allow_inf_nan=False), BeforeValidator(_not_bool), AfterValidator(_percent)]


def _duration(value: Any) -> float:
    """A duration (``90m``, ``6h``, ``1d``, ``5h30m`` or seconds) as seconds."""
    seconds = parse_duration(value)
    if seconds > MAX_SECONDS:
        raise ValueError("must be a duration of at most 10 years")
    return seconds


Duration = Annotated[float, BeforeValidator(_duration)]


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
    retries: Count = 2
    compression: Literal["none", "gzip", "zstd"] = "none"
    on_invalid: Literal["keep", "fail"] = "keep"
    stall_s: PositiveFloat | None = None
    """Warn when completed_tasks has not moved for this long (seconds)."""
    stall_action: Literal["warn", "timeout"] = "warn"
    max_line_bytes: Bytes = 256 << 20
    """A longer line fails the job (bytes): a bound on the memory one line may take."""
    on_unverified_length: Literal["fail", "keep"] = "fail"
    """When the server stated no length and the end could not be confirmed: fail the job
    (the default: never a possibly short file reported as success), or keep the file and
    say ``length_check: unverified`` in the manifest."""
    # Guards (orchestrator/guards.py): judged on the complete file, before it is visible.
    min_records: RecordCount | None = None
    """Fewer records than this fails the job (reason ``too_few_records``)."""
    max_drop_pct: Percent | None = None
    """A drop of more than this % of records against the job's last SUCCEEDED run fails it."""
    max_erroneous_tasks_pct: Percent | None = None
    """More than this % of the execution's tasks erroneous fails the job."""
    max_invalid_lines: RecordCount | None = None
    """More invalid lines than this fails the job (on_invalid: fail is the same with 0, earlier)."""
    on_guard_failure: Literal["reject", "keep"] = "reject"
    """reject: a file a guard failed is kept as NAME.ndjson.rejected; keep: under its final name."""
    reuse_within: Duration | None = None
    """Download a SUCCEEDED execution of the export created this recently instead of creating one."""


class Job(Settings):
    """One export to run: the defaults merged with its own keys."""

    name: str
    export_id: Id | None = None
    query: Query | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.fullmatch(value) or value in (".", ".."):
            raise ValueError(f"must match [A-Za-z0-9._-]+ (it names the output file), not {_show(value)}")
        if value.startswith("."):
            raise ValueError("must not start with '.' (hidden files are the tool's temporary files)")
        if len(value.encode()) > NAME_MAX_BYTES:
            raise ValueError(
                f"is {len(value.encode())} bytes long; at most {NAME_MAX_BYTES} "
                "(it names the output file and its temporary files)"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Job:
        if (self.export_id is None) == (self.query is None):
            raise ValueError("needs exactly one of export_id or query")
        if self.query is not None and self.organisation_id is None:
            raise ValueError("a query job needs organisation_id (in defaults or in the job)")
        return self


class Retries(_Strict):
    """How transient API failures (429, 5xx, resets) are retried; seconds. The defaults and
    the formula are :class:`~orchestrator.retry.RetryPolicy`'s; :meth:`policy` builds one."""

    max_tries: PositiveInt = RETRY_DEFAULTS.max_tries
    base_s: PositiveFloat = RETRY_DEFAULTS.base_s
    max_wait_s: PositiveFloat = RETRY_DEFAULTS.max_wait_s
    max_time_s: PositiveFloat = RETRY_DEFAULTS.max_time_s

    def policy(self) -> RetryPolicy:
        """The client's retry policy with these settings (the one place they are copied)."""
        return RetryPolicy(**self.model_dump())


class Api(_Strict):
    """Where the API is, which variable holds the token, and how to talk to it."""

    base_url: str = DEFAULT_BASE_URL
    token_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "MICS_API_TOKEN"  # noqa: S105 - a variable name
    query_export_prefix: Annotated[str, Field(max_length=100)] = QUERY_EXPORT_PREFIX
    """Exports the tool creates for query jobs are named PREFIX + job name."""
    retries: Retries = Retries()
    max_requests_in_flight: PositiveInt = 64
    """Cap on concurrent HTTP requests; halves on each 429 and recovers (AIMD)."""
    accept_gzip: bool = False
    """Ask for gzip on the wire: worth it only on links slower than ~100 MB/s."""

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        # Checked even when MICS_API_URL overrides it: a password in a job file is a
        # mistake to report at once (validate included), not when the override goes away.
        problem = url_problem(value)
        if problem is not None:
            raise ValueError(f"{safe_url(value)} {problem}")
        return value

    @field_validator("query_export_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        # It names platform objects and is shown in logs and tables: printable text only.
        if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in value):
            raise ValueError("must not contain control or invisible formatting characters")
        return value


class RunSettings(_Strict):
    """Run-wide settings."""

    output_dir: str = "./exports/{date}"
    concurrency: PositiveInt = 8
    keep_days: PositiveInt | None = None
    """After a run that SUCCEEDED, delete the run folders whose ``{date}`` is more than this
    many days before the run's date (only with ``{date}`` in the output folder; see retention.py)."""
    deadline: Duration | None = None
    """Stop the run this long after it started (INTERRUPTED, exit 124); no execution is created
    for a job whose expected duration exceeds the time left. ``--deadline`` and
    ``MICS_DEADLINE_S`` override it."""

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, value: str) -> str:
        problem = output_dir_problem(value)
        if problem:
            raise ValueError(problem)
        return value


_PLACEHOLDER = re.compile(r"\{[^{}]*\}?|\}")
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(text: str) -> bool:
    """Whether ``text`` starts with ``scheme://``: a bucket URL (or a mistake), never a folder or file."""
    return _URL_SCHEME.match(text) is not None


def output_dir_problem(value: str) -> str | None:
    """What is wrong with an output folder as written (``{date}`` unresolved), or None.

    Only ``{date}`` may stand in braces: ``{dat}`` or ``{date`` is a typo that would
    otherwise become a literal folder name, and every night's run would share it.
    """
    if not value or "\0" in value:
        return "must be a folder path (not empty, no NUL character)"
    for match in _PLACEHOLDER.finditer(value):
        if match.group() != "{date}":
            return f"unknown placeholder {_show(match.group())}: only {{date}} is replaced (a typo?)"
    return None


class JobFile(_Strict):
    """The whole job file, version 1."""

    version: Annotated[Literal[1], BeforeValidator(_not_bool)]
    api: Api = Api()
    run: RunSettings = RunSettings()
    jobs: tuple[Job, ...]
    path: str = ""

    def output_template(self, override: str | None = None) -> str:
        """The output folder as written (``--output-dir`` wins over ``run.output_dir``), ``{date}`` unresolved.

        An override is checked as the key is (an empty ``--output-dir "$DIR"`` is an error,
        not a silent fall-back to the job file's folder).
        """
        if override is None:
            return self.run.output_dir
        problem = output_dir_problem(override)
        if problem:
            raise UsageError(f"--output-dir: {problem}")
        return override

    def output_dir(self, override: str | None = None, today: dt.date | None = None) -> Path | str:
        """The output folder with ``{date}`` resolved (UTC): a Path, or a bucket URL as a str.

        A URL (``s3://``, ``gs://``, ``az://``, ``abfs://``) is checked here, so a bad one is
        one line (exit 2) before anything is sent; any other ``scheme://`` is refused rather
        than taken for a folder named ``s3a:``.
        """
        template = self.output_template(override)
        resolved = template.replace("{date}", (today or utc_today()).isoformat())
        if is_url(resolved):
            if importlib.util.find_spec("obstore") is None:
                raise UsageError(
                    f"{resolved}: writing to a bucket needs the cloud extra: pip install 'mics-export[cloud]'"
                )
            parse_location(resolved)
            return resolved
        return Path(resolved)

    def base_url(self) -> str:
        """The API URL of the run: ``MICS_API_URL`` if set, else ``api.base_url``; checked."""
        return api_url(None, self.api.base_url, f"{self.path}: api.base_url")

    def _valid(self, missing: list[str], limit: int = 20) -> str:
        """The valid names for a message: close matches first, at most ``limit`` in all."""
        names = [j.name for j in self.jobs]
        close = list(dict.fromkeys(m for n in missing for m in difflib.get_close_matches(n, names, n=3)))
        hint = f"did you mean {', '.join(close)}? " if close else ""
        shown = ", ".join(names[:limit]) + (f" ... and {len(names) - limit} more" if len(names) > limit else "")
        return f"{hint}valid names: {shown}"

    def select(self, only: tuple[str, ...] = ()) -> tuple[Job, ...]:
        """The jobs named in ``only`` (all when empty); unknown names are an error."""
        if not only:
            return self.jobs
        known = {j.name for j in self.jobs}
        missing = [n for n in only if n not in known]
        if missing:
            unknown = ", ".join(missing)
            raise ConfigError(f"{self.path}: --only names unknown job(s): {unknown}; {self._valid(missing)}")
        return tuple(j for j in self.jobs if j.name in only)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_]{1,60}")


def _key_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic location as ``a.b.0``; a key that is not a plain word (a user's unknown key
    may hold a newline or be huge) is quoted and escaped, so the message stays one line."""
    return ".".join(str(p) if isinstance(p, int) or _PLAIN_KEY.fullmatch(p) else _brief(p) for p in loc)


def _loc(file: str, raw_jobs: Any, loc: tuple[int | str, ...]) -> str:
    """'FILE: job NAME: key' from a pydantic error location."""
    if len(loc) >= 2 and loc[0] == "jobs" and isinstance(loc[1], int):
        index = loc[1]
        name = None
        if isinstance(raw_jobs, list) and index < len(raw_jobs) and isinstance(raw_jobs[index], dict):
            name = raw_jobs[index].get("name")
        who = f"job {_brief(name)}" if name else f"job #{index + 1}"
        key = _key_path(loc[2:])
        return f"{file}: {who}" + (f": {key}" if key else "")
    return f"{file}: " + _key_path(loc) if loc else file


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
        raise ConfigError(f"{file}: defaults.{_key_path(err['loc'])}: {_message(err)}") from None
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
    seen: dict[str, str] = {}
    for job in job_file.jobs:
        other = seen.get(job.name.lower())
        if other == job.name:
            raise ConfigError(f"{file}: job {job.name!r}: name: duplicate job name")
        if other is not None:
            # One file on a case-insensitive filesystem (macOS, Windows shares): one job's
            # output would overwrite the other's, both reported SUCCEEDED.
            raise ConfigError(f"{file}: job {job.name!r}: name: differs from job {other!r} only in case")
        seen[job.name.lower()] = job.name
    return job_file


def utc_today() -> dt.date:
    """Today's UTC date: what ``{date}`` in the output folder stands for."""
    return dt.datetime.now(dt.UTC).date()


def load_job_file(path: str | os.PathLike[str]) -> JobFile:
    """Read and validate a job file. Raises ConfigError with one line on any problem."""
    file = str(path)
    return parse_job_file(load_yaml(path, file), file)


__all__ = [
    "API_URL_ENV",
    "MAX_JOB_FILE_BYTES",
    "MAX_YAML_NODES",
    "QUERY_EXPORT_PREFIX",
    "Api",
    "Job",
    "JobFile",
    "Poll",
    "Query",
    "Retries",
    "RunSettings",
    "Settings",
    "api_url",
    "check_base_url",
    "is_url",
    "load_job_file",
    "output_dir_problem",
    "parse_job_file",
    "read_token",
    "utc_today",
]
