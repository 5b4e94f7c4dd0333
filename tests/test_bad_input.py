"""Bad input never reaches the API, and no error — not even a bug — reaches the user as a traceback.

Issue 10 items 16 and 10: a control character in the token, credentials in the API URL,
an id that is not digits, a name with a trailing newline or too long for a file name,
``version: true``, an absurd ``--workers`` — each is one line, exit 2, and not one request.
An unexpected exception (a bug, simulated in the subprocess by a test-only sitecustomize)
is one line and exit 1, with the token scrubbed even from the ``-vv`` traceback, and the
manifest says how the run ended.
"""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import TOKEN, cli_env, cli_in_process, jobs_by_name, manifest, run_cli, write_jobs

from orchestrator.config import NAME_MAX_BYTES, check_base_url, load_job_file, parse_job_file, read_token
from orchestrator.errors import ConfigError, UsageError
from orchestrator.simulator import ExportSpec, Faults, SimulatorConfig, SimulatorThread


def _file(jobs: list[dict[str, Any]] | None = None, **top: Any) -> dict[str, Any]:
    return {"version": 1, "jobs": jobs or [{"name": "a", "export_id": "1"}], **top}


# -- the job file, in process ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "named"),
    [
        (_file(version=True), "j.yaml: version: must be a number, not a boolean"),
        (_file([{"name": "a", "export_id": "1", "timeout_s": True}]), "job 'a': timeout_s: must be a number"),
        (_file([{"name": "a", "export_id": "1", "retries": True}]), "job 'a': retries: must be a number"),
        (_file([{"name": "a", "export_id": "1", "poll": {"initial_s": True}}]), "job 'a': poll.initial_s"),
        (_file(run={"concurrency": True}), "run.concurrency: must be a number"),
        (_file(api={"retries": {"max_tries": True}}), "api.retries.max_tries: must be a number"),
        (_file([{"name": "a", "export_id": "1", "timeout_s": float("inf")}]), "job 'a': timeout_s"),
    ],
)
def test_booleans_and_infinities_are_not_numbers(data: dict[str, Any], named: str) -> None:
    """YAML's true is not 1 and .inf is not a duration: each is an error naming the key."""
    with pytest.raises(ConfigError, match=re.escape(named)):
        parse_job_file(data, "j.yaml")


@pytest.mark.parametrize(
    ("job", "key"),
    [
        ({"name": "a", "export_id": "../../../admin?x=1#"}, "export_id"),
        ({"name": "a", "export_id": "12a"}, "export_id"),
        ({"name": "a", "export_id": "1 2"}, "export_id"),
        ({"name": "a", "export_id": "\u0661\u0662"}, "export_id"),  # Arabic-Indic digits: not ASCII
        ({"name": "a", "export_id": -5}, "export_id"),
        ({"name": "a", "export_id": "1", "organisation_id": "1426/../1"}, "organisation_id"),
        ({"name": "a", "query": {"datamart_id": "x", "text": "SELECT {id} FROM UserPoint"}}, "query.datamart_id"),
    ],
)
def test_ids_are_digits_only(job: dict[str, Any], key: str) -> None:
    """An id goes into request paths next to the token: anything but ASCII digits is refused, naming job and key."""
    data = {"version": 1, "defaults": {"organisation_id": "1426"}, "jobs": [job]}
    with pytest.raises(ConfigError, match="^" + re.escape(f"j.yaml: job 'a': {key}: must be an id")):
        parse_job_file(data, "j.yaml")


def test_ids_written_as_numbers_or_padded_strings_still_load() -> None:
    """The strictness costs nothing to valid files: numbers and digit strings (spaces trimmed) are kept as strings."""
    data = _file([{"name": "a", "export_id": 9872, "organisation_id": " 1426 "}])
    job = parse_job_file(data, "j.yaml").jobs[0]
    assert (job.export_id, job.organisation_id) == ("9872", "1426")


@pytest.mark.parametrize("name", ["a\n", "a\nb", "a ", "é", "a" * (NAME_MAX_BYTES + 1)])
def test_bad_names_are_refused_whole(name: str) -> None:
    """A name is matched whole (a trailing newline does not slip past $) and capped in length."""
    with pytest.raises(ConfigError, match=r": name: (must match|is \d+ bytes long)") as caught:
        parse_job_file(_file([{"name": name, "export_id": "1"}]), "j.yaml")
    assert "\n" not in str(caught.value)


def test_the_longest_name_still_fits_every_file_it_names() -> None:
    """A name of the maximum length is accepted, and its longest temporary file stays under 255 bytes."""
    name = "n" * NAME_MAX_BYTES
    parse_job_file(_file([{"name": name, "export_id": "1"}]), "j.yaml")
    longest = f".{name}.ndjson.zst.{'9' * 20}.part"
    assert len(longest.encode()) <= 255


def test_an_output_dir_with_a_nul_is_a_config_error() -> None:
    """A NUL in run.output_dir (YAML can hold one) is named at parse time, not an unexpected ValueError later."""
    with pytest.raises(ConfigError, match=r"^j\.yaml: run\.output_dir: must be a folder path"):
        parse_job_file(_file(run={"output_dir": "/tmp/a\0b"}), "j.yaml")


def test_yaml_nested_too_deeply_is_a_config_error(tmp_path: Path) -> None:
    """A pathological job file (deep nesting overflows PyYAML's recursion) is one config error, not a crash."""
    path = tmp_path / "j.yaml"
    # PyYAML recurses at least 2 frames a level: 600 levels pass the default recursion limit of
    # 1000 from any depth (more only costs time: its scanner is quadratic in the nesting).
    path.write_text("[" * 600 + "]" * 600)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_job_file(path)


# -- the token and the URL, in process ---------------------------------------------------------
@pytest.mark.parametrize("bad", ["\x01", "\t", "\x1b[2J", "\x7f", "\x00", "\u00e9", "\u2028"])
def test_a_token_with_a_control_or_non_ascii_character_is_refused(bad: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any control (not only CR, LF, NUL) or non-ASCII character in the token: a usage error not showing it."""
    token = f"tok{bad}SECRET"
    if "\x00" in token:  # an environment cannot hold NUL: read_token is given it through os.environ's mapping
        monkeypatch.setattr(os, "environ", {"T": token})
    else:
        monkeypatch.setenv("T", token)
    with pytest.raises(UsageError, match="the API token in T contains") as caught:
        read_token("T")
    assert "SECRET" not in str(caught.value)


def test_surrounding_whitespace_of_a_token_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token pasted with its trailing newline still works: only characters inside it are refused."""
    monkeypatch.setenv("T", "  tok-ok\n")
    assert read_token("T") == "tok-ok"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://user:hunter2pw@api.example.com", "user name or password"),
        ("https://hunter2pw@api.example.com", "user name or password"),
        ("ftp://user:hunter2pw@api.example.com", "not an http(s) URL"),
        ("https://api.example.com:99999", "not a valid URL"),
        ("https://api.example.com:0", "port 0"),
        ("https://api.example.com/?a=1", "query"),
        ("https://api.example.com/#x", "fragment"),
        ("https://api.example.com/a b", "spaces or control characters"),
        ("https://user:hunter2pw@api.example.com/\n", "spaces or control characters"),
        ("http://[::1", "not a valid URL"),
    ],
)
def test_bad_api_urls_are_refused_without_echoing_a_password(url: str, says: str) -> None:
    """Credentials, a bad port, a query, a fragment or a space in the API URL: a usage error, no password shown."""
    with pytest.raises(UsageError, match=r"^MICS_API_URL '") as caught:
        check_base_url(url, "MICS_API_URL")
    message = str(caught.value)
    assert says in message and "hunter2pw" not in message and "\n" not in message


def test_a_password_in_the_job_files_api_url_is_a_config_error() -> None:
    """user:password@ in api.base_url fails at parse time, whatever MICS_API_URL says; the password unshown."""
    data = _file(api={"base_url": "https://user:hunter2pw@api.example.com"})
    with pytest.raises(ConfigError, match=r"^j\.yaml: api\.base_url: 'https://\*\*\*@api") as caught:
        parse_job_file(data, "j.yaml")
    assert "hunter2pw" not in str(caught.value)


# -- the command line: exit 2, one line, not one request ----------------------------------------
# The CLI's main() in process (support.cli_in_process: the same code, exit code and stderr); the
# credentials case and the unexpected errors below run it as a real subprocess.
@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    """A simulator that would serve export 1 (and any request: the tests count them)."""
    config = SimulatorConfig(token=TOKEN, exports=(ExportSpec("1", size_bytes=1000),), faults=Faults())
    with SimulatorThread(config) as thread:
        yield thread


def _refused(proc: subprocess.CompletedProcess[str], sim: SimulatorThread, *names: str) -> str:
    """Exit 2, one line naming ``names``, no traceback, no token, and nothing reached the API."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr + proc.stdout
    for name in names:
        assert name in lines[0], lines[0]
    assert sim.stats.total_requests == 0
    return lines[0]


def _raw_jobs(tmp_path: Path, job: dict[str, Any], **top: Any) -> Path:
    doc = {"version": 1, "run": {"output_dir": str(tmp_path / "out")}, "jobs": [job], **top}
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("job", "top", "names"),
    [
        ({"name": "a", "export_id": "../../../admin?x=1#"}, {}, ["job 'a'", "export_id"]),
        ({"name": "a\n", "export_id": "1"}, {}, ["job 'a\\n'", "name"]),
        ({"name": "n" * 250, "export_id": "1"}, {}, ["name", "250 bytes"]),
        ({"name": "a", "export_id": "1"}, {"version": True}, ["version"]),
        ({"name": "a", "export_id": "1"}, {"api": {"base_url": "https://u:hunter2pw@api.example.com"}}, ["base_url"]),
    ],
)
def test_bad_job_files_send_nothing(
    tmp_path: Path, sim: SimulatorThread, job: dict[str, Any], top: dict[str, Any], names: list[str]
) -> None:
    """Each bad job file: exit 2, one line naming the file, job and key, not one request (the token is never sent)."""
    path = _raw_jobs(tmp_path, job, **top)
    env = cli_env(sim.url) if "api" not in top else cli_env()
    line = _refused(cli_in_process("run", str(path), env=env), sim, str(path), *names)
    assert "hunter2pw" not in line
    assert not (tmp_path / "out").exists()  # not even the output folder


def test_validate_refuses_the_same_files(tmp_path: Path, sim: SimulatorThread) -> None:
    """`validate` catches a non-digit id too: names are checked before any execution could be created."""
    path = _raw_jobs(tmp_path, {"name": "a", "export_id": "1/../2"})
    _refused(cli_in_process("validate", str(path), env=cli_env(sim.url)), sim, "export_id")


@pytest.mark.parametrize("bad", ["\x1b", "\x7f", "\t", "\x01"])
def test_a_token_with_control_characters_sends_nothing(tmp_path: Path, sim: SimulatorThread, bad: str) -> None:
    """A token holding a control character: exit 2, one line naming the variable, the token not shown, nothing sent."""
    path = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}])
    proc = cli_in_process("run", str(path), env=cli_env(sim.url, token=f"tok{bad}SECRET"))
    line = _refused(proc, sim, "MICS_API_TOKEN")
    assert "SECRET" not in line


def test_credentials_in_the_api_url_send_nothing(tmp_path: Path, sim: SimulatorThread) -> None:
    """user:password@ in MICS_API_URL or --api-url: exit 2, the password never echoed, nothing sent."""
    with_password = sim.url.replace("http://", "http://user:hunter2pw@")
    path = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}])
    for proc, source in [
        (run_cli("run", str(path), env=cli_env(with_password)), "MICS_API_URL"),
        (
            run_cli("exports", "list", "--organisation-id", "1426", "--api-url", with_password, env=cli_env()),
            "--api-url",
        ),
        (run_cli("exports", "list", "--organisation-id", "1426", env=cli_env(with_password)), "MICS_API_URL"),
    ]:
        assert "hunter2pw" not in _refused(proc, sim, source, "user name or password")


@pytest.mark.parametrize(
    "args",
    [
        ["exports", "show", "../../admin", "--organisation-id", "1426"],
        ["exports", "list", "--organisation-id", "1426?x=1"],
        ["executions", "list", "1#"],
        ["download", "1", "../2", "-o", "x.ndjson"],
    ],
)
def test_ops_commands_refuse_ids_that_are_not_digits(sim: SimulatorThread, args: list[str]) -> None:
    """An ops command's id argument that is not digits: exit 2, one line, nothing sent."""
    _refused(cli_in_process(*args, env=cli_env(sim.url)), sim, "digits only")


def test_an_absurd_workers_count_is_refused(tmp_path: Path, sim: SimulatorThread) -> None:
    """--workers beyond 4x the CPUs is refused with one line saying the limit, before anything starts."""
    path = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}])
    proc = cli_in_process("run", str(path), "--workers", "100000", env=cli_env(sim.url))
    line = _refused(proc, sim, "--workers 100000")
    assert "at most" in line


# -- an unexpected error (a bug) ---------------------------------------------------------------
BUG = textwrap.dedent(
    """
    # Test-only: simulates a bug by making one function raise an exception that carries the
    # API token in its message, the worst case for a traceback.
    import os

    import anyio

    where = os.environ.pop("BUG_AT", None)  # popped: worker processes must not import it again
    secret = os.environ.get("MICS_API_TOKEN", "")

    if where == "mid-run":
        import orchestrator.scheduler as scheduler

        original = scheduler.Runner.run

        async def run(self):
            async with anyio.create_task_group() as tg:
                tg.start_soon(original, self)
                while not any(r.execution_id for r in self.manifest.jobs.values()):
                    await anyio.sleep(0.005)
                raise RuntimeError(f"simulated bug\\nholding {secret}")

        scheduler.Runner.run = run
    elif where == "ops":
        import orchestrator.api as api

        async def list_exports(self, *args, **kwargs):
            raise KeyError(f"simulated bug holding {secret}")

        api.ApiClient.list_exports = list_exports
    """
)


def _with_bug(tmp_path: Path, where: str, env: dict[str, str]) -> dict[str, str]:
    folder = tmp_path / "bug"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(BUG)
    return {**env, "PYTHONPATH": str(folder), "BUG_AT": where}


@pytest.mark.parametrize("verbose", [[], ["-vv"]])
def test_an_unexpected_error_mid_run_is_one_line_and_a_final_manifest(tmp_path: Path, verbose: list[str]) -> None:
    """A bug mid-run: exit 1, one error line, traceback only at -vv, no token anywhere, the manifest FAILED."""
    spec = ExportSpec("1", size_bytes=1000, pending_s=0.01, running_s=30)
    config = SimulatorConfig(token=TOKEN, exports=(spec,), faults=Faults())
    with SimulatorThread(config) as sim:
        path = write_jobs(tmp_path, [{"name": "a", "export_id": "1"}])
        proc = run_cli("run", str(path), *verbose, env=_with_bug(tmp_path, "mid-run", cli_env(sim.url)))
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mics-export: error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0])
    assert errors[0].startswith("mics-export: error: unexpected RuntimeError: simulated bug holding ***")
    assert TOKEN not in proc.stderr + proc.stdout
    if verbose:
        assert "Traceback (most recent call last)" in proc.stderr and "traceback above" in errors[0]
    else:
        assert "Traceback" not in proc.stderr and "run with -vv for the traceback" in errors[0]
    doc = manifest(tmp_path / "out")
    assert doc["status"] == "FAILED" and doc["finished_at"]
    assert jobs_by_name(doc)["a"]["execution_id"]  # what a rerun adopts
    assert TOKEN.encode() not in (tmp_path / "out" / "manifest.json").read_bytes()


def test_an_unexpected_error_in_an_ops_command_is_one_line(tmp_path: Path, sim: SimulatorThread) -> None:
    """A bug in an ops command: exit 1, one line with the exception's type, no traceback, no token."""
    env = _with_bug(tmp_path, "ops", cli_env(sim.url))
    proc = run_cli("exports", "list", "--organisation-id", "1426", env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mics-export: error: unexpected KeyError:"), proc.stderr
    assert TOKEN not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
