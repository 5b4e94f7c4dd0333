"""Hostile input, fuzzed and hand-made: every mistake a user can make is one line and exit 2.

The promises under test: bad input (a job file, an argument, a manifest, a planted file)
gets one line naming the problem and exit 2, never a traceback, and nothing is sent to the
API before validation passes; no secret (the API token, cloud credentials, a SAS signature)
reaches stderr, the manifest or the output folder at any verbosity; nothing outside the
output folder is written through a planted symlink; a planted FIFO never blocks a run.

Most cases run in process (``parse_job_file`` / ``load_job_file``: milliseconds); the command
line's cases run the CLI's ``main()`` in process too (``support.cli_in_process``), against a
simulator that counts the requests it saw; the two whole runs at -vv are real subprocesses.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from cloud import S3Bucket, moto_server_fixture, s3_fixture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import TOKEN, cli_env, cli_in_process, manifest, run_cli, write_jobs

from orchestrator import config as config_module
from orchestrator import config_yaml
from orchestrator.config import JobFile, load_job_file, parse_job_file
from orchestrator.errors import ConfigError, UsageError
from orchestrator.logs import TextFormatter, printable
from orchestrator.objstore import parse_location
from orchestrator.simulator import ExportSpec, Faults, SimulatorConfig, SimulatorThread
from orchestrator.status import read_report

__all__ = ["moto_server_fixture", "s3_fixture"]

GOOD_JOB = {"name": "a", "export_id": "1"}


def _one_line(exc: BaseException) -> str:
    """The error's text, asserted to be one line without a traceback's marks."""
    text = str(exc)
    assert "\n" not in text and "\r" not in text and "Traceback" not in text, text
    assert len(text) < 1000, text
    return text


# -- fuzzed job files, in process -------------------------------------------------------------
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([10**4000, -(10**4000), 0, 1, -1, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["", " ", "\x00", "a\nb", "é", "\u202e", "{date}", "../x", "9" * 300, "1e400"]),
)
_TREES = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
_KEYS = {
    "top": ["version", "api", "run", "defaults", "jobs", "extra"],
    "api": ["base_url", "token_env", "query_export_prefix", "retries", "max_requests_in_flight", "accept_gzip"],
    "run": ["output_dir", "concurrency", "deadline", "keep_days"],
    "job": [
        "name",
        "export_id",
        "query",
        "organisation_id",
        "poll",
        "timeout_s",
        "retries",
        "compression",
        "on_invalid",
        "stall_s",
        "max_line_bytes",
        "min_records",
        "max_drop_pct",
        "reuse_within",
        "on_guard_failure",
    ],
}


@st.composite
def _job_files(draw: st.DrawFn) -> Any:
    """A job file that is valid but for a few keys holding random trees (or a random tree whole)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(_TREES)
    doc: dict[str, Any] = {"version": 1, "defaults": {"organisation_id": "1426"}, "jobs": [dict(GOOD_JOB)]}
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "api", "run", "job", "defaults"]))
        key = draw(st.sampled_from(_KEYS["job" if where == "defaults" else where]))
        value = draw(_TREES)
        if where == "top":
            doc[key] = value
        elif where == "job":
            jobs = doc["jobs"]
            if isinstance(jobs, list) and jobs and isinstance(jobs[0], dict):
                jobs[0][key] = value
        else:
            section = doc.setdefault(where, {})
            if isinstance(section, dict):
                section[key] = value
    return doc


def _check_loaded(job_file: JobFile) -> None:
    """What validation let through is sane: finite, positive, bounded numbers and safe names."""
    assert job_file.jobs and job_file.run.concurrency >= 1
    for job in job_file.jobs:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", job.name) and not job.name.startswith(".")
        assert math.isfinite(job.timeout_s) and 0 < job.timeout_s <= config_module.MAX_SECONDS
        assert job.export_id is None or job.export_id.isdigit()
        assert job.reuse_within is None or 0 < job.reuse_within <= config_module.MAX_SECONDS


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_job_files())
def test_fuzzed_job_files_load_or_fail_in_one_line(data: Any) -> None:
    """Random values at any key (wrong types, huge or non-finite numbers, NUL, nulls): a JobFile or one error line."""
    try:
        job_file = parse_job_file(data, "j.yaml")
    except ConfigError as exc:
        assert _one_line(exc).startswith("j.yaml")
    else:
        _check_loaded(job_file)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_fuzzed_text_is_a_job_file_or_one_line(tmp_path: Path, text: str) -> None:
    """Arbitrary text as a job file, through the real reader and YAML parser: a JobFile or one ConfigError line."""
    path = tmp_path / "j.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        _check_loaded(load_job_file(path))
    except ConfigError as exc:
        _one_line(exc)


# -- hostile job files, in process -------------------------------------------------------------
def _bomb(levels: int = 9) -> str:
    """A "billion laughs": 9 aliases per level, 9**levels values once expanded, a few hundred bytes on disk."""
    lines = ['  l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    return "anchors:\n" + "\n".join(lines) + "\n"


HOSTILE_FILES: dict[str, tuple[str | bytes, str]] = {
    "alias bomb as a name": (_bomb() + "version: 1\njobs: [{name: *l8, export_id: 1}]\n", "aliases are expanded"),
    "alias bomb as jobs": (_bomb() + "version: 1\njobs: *l8\n", "aliases are expanded"),
    "python object tag": (
        "version: 1\njobs: !!python/object/apply:os.system ['true']\n",
        "could not determine a constructor",
    ),
    "duplicate top key": (
        "version: 1\njobs: [{name: a, export_id: 1}]\njobs: [{name: b, export_id: 2}]\n",
        "duplicate key 'jobs'",
    ),
    "duplicate job key": ("version: 1\njobs: [{name: a, export_id: 1, export_id: 2}]\n", "duplicate key 'export_id'"),
    "latin-1": ("version: 1\njobs: [{name: \xe9, export_id: 1}]\n".encode("latin-1"), "not UTF-8 text (byte 0xe9"),
    "a 5000-digit number": ("version: 1\njobs: [{name: " + "9" * 5000 + ", export_id: 1}]\n", "more than 4,300 digits"),
    "a 20000-bit hex number": (
        "version: 1\njobs: [{name: 0x" + "f" * 5000 + ", export_id: 1}]\n",
        "name: is 5002 bytes long",  # YAML 1.1's hex is not read as a number: the text written
    ),
    # PyYAML recurses at least 2 frames a level: 600 levels pass the default limit of 1000 from
    # any depth, at a fraction of the cost of more (its scanner is quadratic in the nesting).
    "nested too deeply": ("version: 1\njobs: " + "[" * 600 + "]" * 600, "nested too deeply"),
    "placeholder typo": ("version: 1\nrun: {output_dir: 'out/{dat}'}\njobs: [{name: a, export_id: 1}]\n", "'{dat}'"),
    "unclosed placeholder": (
        "version: 1\nrun: {output_dir: 'out/{date'}\njobs: [{name: a, export_id: 1}]\n",
        "'{date'",
    ),
    "ten thousand years": ("version: 1\njobs: [{name: a, export_id: 1, reuse_within: 3650000d}]\n", "at most 10 years"),
    "a huge timeout": ("version: 1\njobs: [{name: a, export_id: 1, timeout_s: 1e300}]\n", "timeout_s"),
    "a huge concurrency": (
        "version: 1\nrun: {concurrency: 99999999999999999999}\njobs: [{name: a, export_id: 1}]\n",
        "concurrency",
    ),
    "an escape in the export prefix": (
        'version: 1\napi: {query_export_prefix: "x\\e[2J"}\njobs: [{name: a, export_id: 1}]\n',
        "control",
    ),
    "null everywhere": ("version: ~\napi: ~\nrun: ~\ndefaults: ~\njobs: [~]\n", "j.yaml"),
    "empty": ("", "must be a YAML mapping"),
}


def _smaller_alias_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same walk over a 9**9 alias bomb, stopped at 10,000 values instead of 1,000,000 (~2 s loaded):
    "alias bomb as a name" below proves the real budget, the other cases what follows from the refusal."""
    monkeypatch.setattr(config_yaml, "MAX_YAML_NODES", 10_000)


@pytest.mark.parametrize("case", list(HOSTILE_FILES))
def test_hostile_job_files_are_one_line(tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Alias bombs, python tags, duplicate keys, bad encodings, giant numbers, typos: one error line naming it."""
    if case == "alias bomb as jobs":
        _smaller_alias_budget(monkeypatch)
    content, says = HOSTILE_FILES[case]
    path = tmp_path / "j.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as caught:
        load_job_file(path)
    text = _one_line(caught.value)
    assert says in text and text.startswith(str(path)), text


def test_a_bom_is_accepted(tmp_path: Path) -> None:
    """A UTF-8 byte order mark (as some Windows editors write) is not an error."""
    path = tmp_path / "j.yaml"
    path.write_bytes("\ufeffversion: 1\njobs: [{name: a, export_id: 1}]\n".encode())
    assert load_job_file(path).jobs[0].name == "a"


def test_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    """`<<: *base` then an overriding key is the usual way to share settings, not a duplicate key."""
    path = tmp_path / "j.yaml"
    path.write_text(
        "version: 1\njobs:\n  - &base {name: a, export_id: 1, timeout_s: 5}\n  - {<<: *base, name: b, timeout_s: 6}\n"
    )
    jobs = load_job_file(path).jobs
    assert [(j.name, j.timeout_s) for j in jobs] == [("a", 5), ("b", 6)]


@pytest.mark.parametrize("kind", ["folder", "fifo", "huge", "missing"])
def test_job_files_that_are_not_small_regular_files(tmp_path: Path, kind: str) -> None:
    """A folder, a FIFO with no writer (not waited on), a 100 MB file (not read whole), a missing file: one line."""
    path = tmp_path / "j.yaml"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "huge":
        with path.open("wb") as handle:
            handle.truncate(100 << 20)  # sparse: 100 MB without writing them
    says = {
        "folder": "not a regular file (a folder)",
        "fifo": "not a regular file (a pipe)",
        "huge": "too large",
        "missing": "no such file",
    }
    with pytest.raises(ConfigError, match=re.escape(says[kind])) as caught:
        load_job_file(path)
    _one_line(caught.value)


@pytest.mark.parametrize(
    ("override", "says"),
    [("", "must be a folder path"), ("out/{dat}", "'{dat}'"), ("a\0b", "NUL"), ("out/}", "'}'")],
)
def test_a_bad_output_dir_override_is_a_usage_error(override: str, says: str) -> None:
    """--output-dir is checked as run.output_dir is: an empty one no longer falls back to the job file's folder."""
    job_file = parse_job_file({"version": 1, "jobs": [GOOD_JOB]}, "j.yaml")
    with pytest.raises(UsageError, match=re.escape(says)):
        job_file.output_template(override)
    assert job_file.output_template("out/{date}") == "out/{date}"


# -- bucket URLs never echo credentials -------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "s3://AKIAXXX:hunter2secret@bucket/x",
        "s3://bucket/x?X-Amz-Signature=hunter2secret",
        "az://container/x?sv=2022&sig=hunter2secret",
        "gcs://bucket/x?sig=hunter2secret",
        "s3://bucket/x#hunter2secret",
    ],
)
def test_bucket_urls_with_credentials_are_refused_unshown(url: str) -> None:
    """A password or a signature in a bucket URL is refused in one line that does not show it."""
    with pytest.raises(UsageError) as caught:
        parse_location(url)
    assert "hunter2secret" not in _one_line(caught.value)


# -- logs and status never drive the terminal ----------------------------------------------------
def test_text_logs_escape_control_characters_and_stay_one_line() -> None:
    """A server's text with ESC sequences and a newline (a fake log line) is logged escaped, on one line, redacted."""
    record = logging.LogRecord(
        "orchestrator.x", logging.WARNING, "x", 1, "said: %s", ("\x1b[2J\nFAKE ERROR " + TOKEN,), None
    )
    line = TextFormatter([TOKEN]).format(record)
    assert "\x1b" not in line and "\n" not in line and TOKEN not in line
    assert "\\x1b[2J\\x0aFAKE ERROR ***" in line
    assert printable("tab\there\u202e") == "tab\\x09here\\u202e"


def _write_manifest(folder: Path, **overrides: Any) -> Path:
    doc = {
        "version": 1,
        "run_id": "r1",
        "started_at": "2026-01-01T00:00:00Z",
        "finished_at": "2026-01-01T00:01:00Z",
        "status": "FAILED",
        "exit_code": 1,
        "jobs": [{"name": "a", "export_id": "1", "status": "FAILED", "attempts": 1, "error": "boom"}],
        **overrides,
    }
    folder.mkdir(exist_ok=True)
    path = folder / "manifest.json"
    path.write_bytes(orjson.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("status", "code", "expected"), [("FAILED", 256, 1), ("FAILED", 0, 1), ("FAILED", -1, 1), ("SUCCEEDED", 512, 0)]
)
def test_status_never_trusts_an_impossible_exit_code(tmp_path: Path, status: str, code: int, expected: int) -> None:
    """A recorded code outside 0-255 (256 reaches a shell as 0) or 0 beside FAILED: derived from the status."""
    _write_manifest(tmp_path, status=status, exit_code=code)
    assert read_report(str(tmp_path)).exit_code == expected


def test_status_refuses_pipes_and_oversized_manifests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FIFO named manifest.json is refused at once (no hang); a manifest over the size cap is not read."""
    fifo = tmp_path / "f" / "manifest.json"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match=r"no manifest\.json|not a regular file|neither"):
        read_report(str(fifo.parent))
    with pytest.raises(UsageError, match="neither a folder nor a manifest file"):
        read_report(str(fifo))
    import orchestrator.status as status_module

    monkeypatch.setattr(status_module, "MAX_MANIFEST_BYTES", 100)
    big = _write_manifest(tmp_path / "big", run_id="r" * 200)
    with pytest.raises(UsageError, match="larger than"):
        read_report(str(big))


@pytest.mark.parametrize("fmt", ["table", "tsv"])
def test_status_of_a_hostile_manifest_prints_no_escape_sequence(tmp_path: Path, fmt: str) -> None:
    """Names, errors and run id holding ESC/OSC/bidi sequences are shown escaped: nothing reaches the terminal raw."""
    evil = "x\x1b]0;pwned\x07\x1b[31m\x1b[2J\u202e\x9b"
    _write_manifest(
        tmp_path,
        run_id="r" + evil,
        jobs=[{"name": "n" + evil, "export_id": "1", "status": "FAILED", "attempts": 1, "error": "e" + evil}],
    )
    proc = cli_in_process("status", str(tmp_path), "--format", fmt, env=cli_env(token=None))
    assert proc.returncode == 1, proc.stderr
    for char in ("\x1b", "\x07", "\u202e", "\x9b"):
        assert char not in proc.stdout, (char, proc.stdout)
    assert "\\x1b]0;pwned" in proc.stdout


def test_status_on_a_file_that_is_not_a_manifest(tmp_path: Path) -> None:
    """`status` given a job file or random bytes: exit 2, one line saying it is not a manifest."""
    path = tmp_path / "jobs.yaml"
    path.write_text("version: 1\n")
    proc = cli_in_process("status", str(path), env=cli_env(token=None))
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "not a valid manifest" in proc.stderr


# -- the command line: exit 2, one line, not one request ------------------------------------------
@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    """A simulator serving export 1 quickly; tests count the requests it saw."""
    spec = ExportSpec("1", size_bytes=1000, pending_s=0.01, running_s=0.01)
    with SimulatorThread(SimulatorConfig(token=TOKEN, exports=(spec,), faults=Faults())) as thread:
        yield thread


def _refused(proc: subprocess.CompletedProcess[str], sim: SimulatorThread, says: str) -> None:
    """Exit 2, exactly one stderr line containing ``says``, no traceback, no token, zero requests."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("mics-export: error: ") and says in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr + proc.stdout
    assert sim.stats.total_requests == 0


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["run", "{jobs}", "--concurrency", "-1"], "'--concurrency': -1 is not in the range"),
        (["run", "{jobs}", "--concurrency", "99999999999999999999"], "'--concurrency'"),
        (["run", "{jobs}", "--workers", "-1"], "'--workers'"),
        (["run", "{jobs}", "--log-format", "xml"], "'--log-format'"),
        (["run", "{jobs}", "--shard", "3/2"], "shard index 3 is out of range"),
        (["run", "{jobs}", "--shard", "a/b"], "invalid --shard 'a/b'"),
        (["run", "{jobs}", "--shard", "0/0"], "at least 1"),
        (["run", "{jobs}", "--only", ","], "names no job"),
        (["run", "{jobs}", "--only", ""], "names no job"),
        (["run", "{jobs}", "--output-dir", ""], "--output-dir: must be a folder path"),
        (["run", "{jobs}", "--output-dir", "{tmp}/{dat}"], "unknown placeholder '{dat}'"),
        (["run", "{jobs}", "--output-dir", "s3://AKIA:hunter2secret@bucket/x"], "no user:password@"),
        (["run", "{jobs}", "--output-dir", "s3://bucket/x?sig=hunter2secret"], "no query"),
        (["run", "{jobs}", "--output-dir", "s3://"], "bucket (container) name is missing"),
        (["run", "{jobs}", "--output-dir", "{tmp}/a-file"], "cannot use output folder"),
        (["run", "{jobs}", "--output-dir", "{tmp}/" + "x" * 300], "cannot use output folder"),
        (["run", "{tmp}"], "'JOBS.yaml'"),
        (["run"], "Missing argument"),
        (["frobnicate"], "No such command"),
        (["executions", "list", "1", "--limit", "0"], "'--limit': 0 is not in the range"),
        (["exports", "show", "../x", "--organisation-id", "1"], "digits only"),
        (["download", "1", "2", "-o", "{tmp}"], "is a folder"),
        (["download", "1", "2", "-o", "{tmp}/missing/x.ndjson"], "does not exist"),
        (["download", "1", "2", "-o", "{tmp}/x.ndjson.bz2"], "unsupported compression suffix"),
    ],
)
def test_bad_arguments_are_one_line_and_send_nothing(
    tmp_path: Path, sim: SimulatorThread, args: list[str], says: str
) -> None:
    """Every command with a bad value: one `mics-export: error:` line naming it, exit 2, no request (click's too)."""
    jobs = write_jobs(tmp_path, [GOOD_JOB])
    (tmp_path / "a-file").write_text("in the way\n")
    argv = [a.replace("{jobs}", str(jobs)).replace("{tmp}", str(tmp_path)) for a in args]
    proc = cli_in_process(*argv, env=cli_env(sim.url))
    _refused(proc, sim, says)
    assert "hunter2secret" not in proc.stderr


@pytest.mark.parametrize("case", ["alias bomb as a name", "duplicate top key", "python object tag", "fifo"])
def test_hostile_job_files_through_the_cli_send_nothing(
    tmp_path: Path, sim: SimulatorThread, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worst job files through `run` and `validate`: exit 2, one line, zero requests, no output folder."""
    _smaller_alias_budget(monkeypatch)
    path = tmp_path / "jobs.yaml"
    if case == "fifo":
        os.mkfifo(path)
    else:
        content = HOSTILE_FILES[case][0]
        path.write_text(content if isinstance(content, str) else content.decode("latin-1"))
    for command in ("run", "validate"):
        _refused(cli_in_process(command, str(path), env=cli_env(sim.url)), sim, str(path))


# -- secrets at -vv ---------------------------------------------------------------------------------
def test_no_secret_anywhere_at_vv_with_a_refused_bucket(
    tmp_path: Path, sim: SimulatorThread, s3: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """-vv, a bucket refusing the credential: exit 2, and no token, secret key or session token anywhere."""
    secret, session = "wrongSECRETkey0123456789abcdef", "sessionTOKEN0123456789abcdef"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", session)
    jobs = write_jobs(tmp_path, [GOOD_JOB])
    proc = cli_in_process("run", str(jobs), "-vv", "--output-dir", f"s3://{s3.bucket}/p", env=cli_env(sim.url))
    assert proc.returncode == 2, proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error" in line.lower()][-1].startswith("mics-export: error:")
    for value in (TOKEN, secret, session, s3.server.secret_key):
        assert value not in proc.stderr + proc.stdout
    assert sum(sim.stats.executions_created.values()) == 0


@pytest.mark.xdist_group("cloud")
def test_no_secret_anywhere_at_vv_in_a_bucket_run(tmp_path: Path, sim: SimulatorThread, s3: S3Bucket) -> None:
    """A whole run at -vv (library debug on) into a bucket: no token or secret key in stderr, objects or manifest."""
    jobs = write_jobs(tmp_path, [GOOD_JOB])
    proc = run_cli("run", str(jobs), "-vv", "--output-dir", f"s3://{s3.bucket}/p", env=cli_env(sim.url))
    assert proc.returncode == 0, proc.stderr
    assert "DEBUG" in proc.stderr  # the library debug lines were on
    blobs = [proc.stderr, proc.stdout]
    for item in s3.client.list_objects_v2(Bucket=s3.bucket).get("Contents", []):
        blobs.append(s3.client.get_object(Bucket=s3.bucket, Key=item["Key"])["Body"].read().decode("latin-1"))
    assert len(blobs) >= 4  # the result and the manifest are there
    for value in (TOKEN, s3.server.secret_key):
        assert not any(value in blob for blob in blobs)
    assert not re.search(r"(?i)authorization['\"]?\s*[:=]\s*['\"]?(?!\*)\S", proc.stderr)


def test_no_token_anywhere_at_vv_in_a_local_run(tmp_path: Path, sim: SimulatorThread) -> None:
    """A local run at -vv: the token is in no byte of stderr, stdout, the manifest or any file of the folder."""
    jobs = write_jobs(tmp_path, [GOOD_JOB])
    proc = run_cli("run", str(jobs), "-vv", env=cli_env(sim.url))
    assert proc.returncode == 0, proc.stderr
    assert TOKEN not in proc.stderr + proc.stdout
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


# -- planted files in the output folder --------------------------------------------------------------
def test_a_manifest_symlink_is_never_written_through(tmp_path: Path, sim: SimulatorThread) -> None:
    """manifest.json planted as a symlink to a file outside: exit 2, one line, that file untouched, nothing sent."""
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "passwd"
    victim.write_text("root:x:0:0\n")
    (out / "manifest.json").symlink_to(victim)
    _refused(
        cli_in_process("run", str(write_jobs(tmp_path, [GOOD_JOB])), env=cli_env(sim.url)), sim, "not a regular file"
    )
    assert victim.read_text() == "root:x:0:0\n" and (out / "manifest.json").is_symlink()


def test_a_fifo_at_the_output_name_does_not_block(tmp_path: Path, sim: SimulatorThread) -> None:
    """A FIFO planted at NAME.ndjson: the run ends (no open waits for a writer), the FIFO replaced with a warning."""
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "a.ndjson")
    proc = cli_in_process("run", str(write_jobs(tmp_path, [GOOD_JOB])), env=cli_env(sim.url))
    assert proc.returncode == 0, proc.stderr
    assert (out / "a.ndjson").is_file() and "replaced a special file" in proc.stderr
    assert manifest(out)["jobs"][0]["status"] == "SUCCEEDED"


def test_an_output_dir_that_is_a_symlink_is_followed(tmp_path: Path, sim: SimulatorThread) -> None:
    """An output folder that is a symlink (a mount point, a volume) is allowed: the files land in its target."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "out").symlink_to(real)
    proc = cli_in_process("run", str(write_jobs(tmp_path, [GOOD_JOB])), env=cli_env(sim.url))
    assert proc.returncode == 0, proc.stderr
    assert (real / "a.ndjson").is_file() and (real / "manifest.json").is_file()


def test_a_dangling_lock_symlink_creates_nothing_outside(tmp_path: Path, sim: SimulatorThread) -> None:
    """.lock planted as a symlink to a missing file outside the folder: exit 2, that file is never created."""
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "elsewhere" / "created-by-the-run"
    outside.parent.mkdir()
    (out / ".lock").symlink_to(outside)
    done = cli_in_process("run", str(write_jobs(tmp_path, [GOOD_JOB])), env=cli_env(sim.url))
    assert not outside.exists()
    assert done.returncode == 2 and ".lock" in done.stderr and "Traceback" not in done.stderr


def test_an_unwritable_output_folder_is_one_line(tmp_path: Path, sim: SimulatorThread) -> None:
    """An output folder the process cannot write: exit 2, one line naming it, nothing sent."""
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders: the case cannot be made here")
    out = tmp_path / "out"
    out.mkdir(mode=0o500)
    try:
        _refused(cli_in_process("run", str(write_jobs(tmp_path, [GOOD_JOB])), env=cli_env(sim.url)), sim, "out")
    finally:
        out.chmod(0o700)


def test_yaml_dump_of_a_loaded_file_round_trips(tmp_path: Path) -> None:
    """The stricter loader still reads what yaml.safe_dump writes (the test helpers' own files)."""
    path = write_jobs(tmp_path, [GOOD_JOB, {"name": "b", "export_id": 2}])
    assert [j.name for j in load_job_file(path).jobs] == ["a", "b"]
    assert yaml.safe_load(path.read_text())["version"] == 1
