"""The job file: YAML → frozen, validated :class:`JobFile` with defaults merged.

Validation is strict (unknown keys are errors) and every error is one line naming the
file, the job and the key, e.g.::

    jobs.yaml: job 'visitors': timeout_s: must be greater than 0

``{date}`` in ``output_dir`` is the run's UTC date (YYYY-MM-DD). Nothing here does I/O
beyond reading the file, and nothing talks to the API.
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
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

from orchestrator.errors import ConfigError, MissingTokenError, UsageError

NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
"""A job name, matched whole (fullmatch: ``$`` would let a trailing newline through)."""
NAME_MAX_BYTES = 200
"""The longest job name: the longest file named after it, ``.NAME.ndjson.zst.EXECUTIONID.part``,
must stay under the 255 bytes most file systems allow in a name."""
ID_RE = re.compile(r"[0-9]+")
"""The API's ids are strings of ASCII digits; anything else would end up in a URL path."""


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
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False), BeforeValidator(_not_bool)]
PositiveInt = Annotated[int, Field(gt=0), BeforeValidator(_not_bool)]
Count = Annotated[int, Field(ge=0), BeforeValidator(_not_bool)]


def _percent(value: float) -> float:
    """A percentage: from 0 to 100 (checked after a string such as "150" became a number)."""
    if not 0 <= value <= 100:
        raise ValueError(f"must be a percentage from 0 to 100, not {value:g}")
    return value


Percent = Annotated[
    float, Field(allow_inf_nan=False), BeforeValidator(_not_bool), AfterValidator(_percent)
]


def _duration(value: Any) -> float:
    """A duration (``90m``, ``6h``, ``1d``, ``5h30m`` or seconds) as seconds."""
    from orchestrator.guards import parse_duration

    return parse_duration(value)


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
    max_line_bytes: PositiveInt = 256 << 20
    """A longer line fails the job (bytes): a bound on the memory one line may take."""
    on_unverified_length: Literal["fail", "keep"] = "fail"
    """When the server stated no length and the end could not be confirmed: fail the job
    (the default: never a possibly short file reported as success), or keep the file and
    say ``length_check: unverified`` in the manifest."""
    # Guards (orchestrator/guards.py): judged on the complete file, before it is visible.
    min_records: Count | None = None
    """Fewer records than this fails the job (reason ``too_few_records``)."""
    max_drop_pct: Percent | None = None
    """A drop of more than this % of records against the job's last SUCCEEDED run fails it."""
    max_erroneous_tasks_pct: Percent | None = None
    """More than this % of the execution's tasks erroneous fails the job."""
    max_invalid_lines: Count | None = None
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

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        # Checked even when MICS_API_URL overrides it: a password in a job file is a
        # mistake to report at once (validate included), not when the override goes away.
        problem = _url_problem(value)
        if problem is not None:
            raise ValueError(f"{_safe_url(value)} {problem}")
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
        if not value or "\0" in value:
            raise ValueError("must be a folder path (not empty, no NUL character)")
        return value


class JobFile(_Strict):
    """The whole job file, version 1."""

    version: Annotated[Literal[1], BeforeValidator(_not_bool)]
    api: Api = Api()
    run: RunSettings = RunSettings()
    jobs: tuple[Job, ...]
    path: str = ""

    def output_template(self, override: str | None = None) -> str:
        """The output folder as written (``--output-dir`` wins over ``run.output_dir``), ``{date}`` unresolved."""
        return override or self.run.output_dir

    def output_dir(self, override: str | None = None, today: dt.date | None = None) -> Path | str:
        """The output folder with ``{date}`` resolved (UTC): a Path, or a bucket URL as a str.

        A URL (``s3://``, ``gs://``, ``az://``, ``abfs://``) is checked here, so a bad one is
        one line (exit 2) before anything is sent; any other ``scheme://`` is refused rather
        than taken for a folder named ``s3a:``.
        """
        template = self.output_template(override)
        resolved = template.replace("{date}", (today or utc_today()).isoformat())
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", resolved):
            try:
                from orchestrator.objstore import parse_location
            except ImportError:
                raise UsageError(
                    f"{resolved}: writing to a bucket needs the cloud extra: pip install 'mics-export[cloud]'"
                ) from None
            parse_location(resolved)
            return resolved
        return Path(resolved)

    def base_url(self) -> str:
        """The API URL of the run: ``MICS_API_URL`` if set, else ``api.base_url``; checked."""
        if os.environ.get("MICS_API_URL"):
            return check_base_url(os.environ["MICS_API_URL"], "MICS_API_URL")
        return check_base_url(self.api.base_url, f"{self.path}: api.base_url")

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


def _loc(file: str, raw_jobs: Any, loc: tuple[int | str, ...]) -> str:
    """'FILE: job NAME: key' from a pydantic error location."""
    parts = [str(p) for p in loc]
    if len(loc) >= 2 and loc[0] == "jobs" and isinstance(loc[1], int):
        index = loc[1]
        name = None
        if isinstance(raw_jobs, list) and index < len(raw_jobs) and isinstance(raw_jobs[index], dict):
            name = raw_jobs[index].get("name")
        who = f"job {_show(name, 60) if isinstance(name, str) else repr(name)}" if name else f"job #{index + 1}"
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


def utc_today() -> dt.date:
    """Today's UTC date: what ``{date}`` in the output folder stands for."""
    return dt.datetime.now(dt.UTC).date()


def read_token(variable: str = "MICS_API_TOKEN") -> str:
    """The API token from the environment variable ``variable``; MissingTokenError if unset.

    Leading and trailing whitespace is dropped (a token pasted from a file keeps its
    newline); any other control character, or a character outside ASCII, is a usage error
    that never shows the token: it would otherwise go into a header as is.
    """
    token = os.environ.get(variable, "").strip()
    if not token:
        raise MissingTokenError(variable)
    from orchestrator.logs import add_secret

    add_secret(token)  # from now on, scrubbed from every line this process prints
    for position, char in enumerate(token, 1):
        if ord(char) < 0x20 or ord(char) == 0x7F:
            raise UsageError(
                f"the API token in {variable} contains a control character (U+{ord(char):04X} at "
                f"position {position}): check how it was set"
            )
        if ord(char) > 0x7E:
            raise UsageError(
                f"the API token in {variable} contains a non-ASCII character (at position {position}): "
                "check how it was set"
            )
    return token


_USERINFO = re.compile(r"(?<=//)[^/?#]*@")


def _safe_url(url: str) -> str:
    """``url`` for a message: any ``user:password@`` replaced, escaped, cut when long."""
    return _show(_USERINFO.sub("***@", url), 80)


def _url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as the API's base URL (never echoing it), or None."""
    example = "e.g. https://api.mediarithmics.com"
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        return "contains spaces or control characters"
    try:
        parsed = urlsplit(url)
        port = parsed.port  # raises ValueError when out of range or not a number
    except ValueError as exc:
        return f"is not a valid URL ({_USERINFO.sub('***@', str(exc))})"
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return f"is not an http(s) URL with a host, {example}"
    if "@" in parsed.netloc:
        return "must not contain a user name or password (user:password@): the API token is the only credential"
    if port == 0:
        return "has port 0, which cannot be connected to"
    if parsed.query or parsed.fragment or url.endswith(("?", "#")):
        return f"must not have a query (?...) or fragment (#...), {example}"
    return None


def check_base_url(url: str, source: str = "the API URL") -> str:
    """``url`` if it is an http(s) URL with a host; otherwise a one-line UsageError.

    Refused as well: credentials in the URL (the token is the only credential, and a
    password there would end up in logs), a bad port, a query or fragment (request paths
    are appended to the URL), and control characters or spaces. No message echoes a
    password.
    """
    problem = _url_problem(url)
    if problem is not None:
        raise UsageError(f"{source} {_safe_url(url)} {problem}")
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
    except RecursionError:  # PyYAML builds nested collections recursively
        raise ConfigError(f"{file}: invalid YAML: nested too deeply") from None
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
    "utc_today",
]
