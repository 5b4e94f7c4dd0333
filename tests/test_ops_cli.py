"""Tests for the ops commands, run as a user runs them: the real `mics-export` command.

Each test serves a SimulatorThread on loopback and points the command at it with
MICS_API_URL and MICS_API_TOKEN. Outputs are checked as a user or a script would read them.
Commands run in this process (:func:`support.cli_in_process`: the same exit code, stdout and
stderr, without a Python start-up each); the installed `mics-export` script runs as a
subprocess once (`exports list`), and `simulate` is a server process stopped by a signal.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
from conftest import ORG, TOKEN, fast_spec, sim_config
from support import cli_in_process, wait_for

from orchestrator.simulator import Faults, SimulatorThread

SCRIPT = shutil.which("mics-export", path=str(Path(sys.executable).parent))
COMMAND = [SCRIPT] if SCRIPT else [sys.executable, "-m", "orchestrator"]


def cli(
    sim: SimulatorThread | None, *args: str, token: str | None = TOKEN, process: bool = False, **env_extra: str
) -> subprocess.CompletedProcess[str]:
    """Run `mics-export ARGS` against the simulator (the script in a subprocess if ``process``);
    the token never shows in its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICS_")}
    if sim is not None:
        env["MICS_API_URL"] = sim.url
    if token is not None:
        env["MICS_API_TOKEN"] = token
    env.update(env_extra)
    if process:
        done = subprocess.run([*COMMAND, *args], env=env, capture_output=True, text=True, timeout=60, check=False)
    else:
        done = cli_in_process(*args, env=env)
    assert TOKEN not in done.stdout and TOKEN not in done.stderr
    return done


def api(sim: SimulatorThread, method: str, path: str, **kw: Any) -> Any:
    """A direct request to the simulator, to set up a scene."""
    resp = requests.request(method, sim.url + path, headers={"Authorization": sim.token}, timeout=10, **kw)
    assert resp.status_code == 200, resp.text
    return resp.json()


def new_execution(sim: SimulatorThread, export_id: str) -> str:
    execution_id: str = api(sim, "POST", f"/v1/exports/{export_id}/executions", json={})["data"]["id"]
    return execution_id


def wait_final(sim: SimulatorThread, export_id: str, execution_id: str) -> str:
    """Poll the executions list until this one is final (fail after 10 s); its status."""

    def final() -> str | None:
        items = api(sim, "GET", f"/v1/exports/{export_id}/executions", params={"max_results": 100})["data"]
        status: str = next(e["status"] for e in items if e["id"] == execution_id)
        return None if status in ("PENDING", "RUNNING") else status

    status: str = wait_for(final, timeout=10, what=f"execution {execution_id} to end")
    return status


def wait_succeeded(sim: SimulatorThread, export_id: str, execution_id: str) -> None:
    """Poll until this execution is final, and check that it SUCCEEDED."""
    assert wait_final(sim, export_id, execution_id) == "SUCCEEDED"


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    """57 exports in organisation 1426 (more than a 50-export page) and 2 elsewhere."""
    mine = [fast_spec(str(5000 + i), name=f"segment-{i}") for i in range(57)]
    theirs = [fast_spec("7001", organisation_id="99"), fast_spec("7002", organisation_id="99")]
    with SimulatorThread(sim_config(*mine, *theirs)) as thread:
        yield thread


# -- exports ------------------------------------------------------------------------------------
def test_exports_list_shows_every_export_across_pages(sim: SimulatorThread) -> None:
    """The installed script's `exports list` prints all 57 exports of the organisation (two pages), and only theirs."""
    done = cli(sim, "exports", "list", "--organisation-id", ORG, process=True)
    assert done.returncode == 0, done.stderr
    ids = re.findall(r"\b(\d{4})\b", done.stdout)
    shown = [i for i in ids if i.startswith(("50", "70"))]
    assert shown == [str(5000 + i) for i in range(57)]
    assert "57 export(s)" in done.stdout
    assert "segment-56" in done.stdout
    assert sim.stats.requests["exports.list"] == 2


def test_exports_list_json(sim: SimulatorThread) -> None:
    """`exports list --json` prints machine-readable JSON with every export's id, name and query id."""
    done = cli(sim, "exports", "list", "--organisation-id", ORG, "--json")
    assert done.returncode == 0, done.stderr
    items = orjson.loads(done.stdout)
    assert [e["id"] for e in items] == [str(5000 + i) for i in range(57)]
    assert items[7] == {"id": "5007", "name": "segment-7", "query_id": "65987", "datamart_id": "1509"}


def test_exports_show(sim: SimulatorThread) -> None:
    """`exports show ID` prints the export's definition, as a table or as JSON."""
    done = cli(sim, "exports", "show", "5003", "--organisation-id", ORG, "--json")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {
        "id": "5003",
        "name": "segment-3",
        "organisation_id": ORG,
        "query_id": "65987",
        "datamart_id": "1509",
        "type": "QUERY",
        "output_format": "JSON",
    }
    text = cli(sim, "exports", "show", "5003", "--organisation-id", ORG)
    assert text.returncode == 0, text.stderr
    assert "segment-3" in text.stdout and "65987" in text.stdout


def test_unknown_export_is_a_404_error(sim: SimulatorThread) -> None:
    """`exports show` of an unknown export exits 1 with the API's 404 message and error_id, no traceback."""
    done = cli(sim, "exports", "show", "424242", "--organisation-id", ORG)
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert "404" in line and "Resource Not Found" in line and "error_id" in line
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_exports_show_in_the_wrong_organisation_says_so(sim: SimulatorThread) -> None:
    """An export of another organisation: exit 1, one line naming export and organisation, pointing at the option."""
    done = cli(sim, "exports", "show", "7001", "--organisation-id", ORG)
    assert done.returncode == 1 and done.stdout == ""
    line = one_line(done.stderr)
    assert f"export 7001 not found in organisation {ORG} (check --organisation-id)" in line
    assert "another organisation" in line


# -- pipe-safe output -----------------------------------------------------------------------------
LONG = "nightly-" + "x" * 134 + "-visitors"  # 150 characters


@pytest.fixture
def long_names() -> Iterator[SimulatorThread]:
    """Three exports of organisation 1426, one with a 150-character name."""
    specs = [fast_spec("6000", name=LONG), fast_spec("6001", name="short"), fast_spec("6002", name="a b\tc")]
    with SimulatorThread(sim_config(*specs)) as thread:
        yield thread


def test_exports_list_in_a_pipe_is_one_whole_line_per_export(long_names: SimulatorThread) -> None:
    """Piped, the table keeps each export on one unwrapped line (grep finds whole rows), with no trailing blanks."""
    done = cli(long_names, "exports", "list", "--organisation-id", ORG)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"3 export(s) in organisation {ORG}"
    assert lines[1].split() == ["id", "name", "query_id", "datamart_id"]
    assert len(lines) == 5
    [row] = [line for line in lines if "6000" in line]
    assert row.split() == ["6000", LONG, "65987", "1509"]
    assert all(line == line.rstrip() for line in lines)
    assert "a b c" in done.stdout  # a tab in a name cannot break the columns


def test_exports_list_tsv_is_a_header_and_one_row_per_export(long_names: SimulatorThread) -> None:
    """--format tsv prints a header and tab-separated rows; a tab inside a value is escaped."""
    done = cli(long_names, "exports", "list", "--organisation-id", ORG, "--format", "tsv")
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert rows == [
        ["id", "name", "query_id", "datamart_id"],
        ["6000", LONG, "65987", "1509"],
        ["6001", "short", "65987", "1509"],
        ["6002", "a b\\tc", "65987", "1509"],
    ]


def test_show_and_executions_take_every_format(long_names: SimulatorThread) -> None:
    """exports show and executions list print TSV and JSON too; --json contradicting --format is exit 2."""
    show = cli(long_names, "exports", "show", "6000", "--organisation-id", ORG, "--format", "tsv")
    assert show.returncode == 0, show.stderr
    assert f"name\t{LONG}" in show.stdout.splitlines()
    execution_id = new_execution(long_names, "6001")
    listing = cli(long_names, "executions", "list", "6001", "--format", "tsv")
    header, row = listing.stdout.splitlines()
    assert header.split("\t")[:2] == ["id", "status"] and row.split("\t")[0] == execution_id
    as_json = cli(long_names, "executions", "list", "6001", "--format", "json")
    assert [e["id"] for e in orjson.loads(as_json.stdout)] == [execution_id]
    both = cli(long_names, "executions", "list", "6001", "--json", "--format", "tsv")
    assert both.returncode == 2 and "contradict" in one_line(both.stderr)


# -- cancel -------------------------------------------------------------------------------------
def test_cancel_shows_what_the_platform_answered(tmp_path: Path) -> None:
    """cancel of a running execution exits 0 and says it is now CANCELED; of a finished one, that it had finished."""
    slow, quick = fast_spec("9000", running_s=30), fast_spec("9001")
    with SimulatorThread(sim_config(slow, quick)) as sim:
        running = new_execution(sim, "9000")
        done = cli(sim, "cancel", "9000", running)
        again = cli(sim, "cancel", "9000", running, "--json")
        finished = new_execution(sim, "9001")
        wait_succeeded(sim, "9001", finished)
        late = cli(sim, "cancel", "9001", finished)
        cancels = sim.stats.cancels
    assert done.returncode == 0, done.stderr
    assert one_line(done.stdout).endswith("accepted by the platform: it is now CANCELED")
    assert orjson.loads(again.stdout) == {
        "export_id": "9000",
        "execution_id": running,
        "accepted": True,
        "status": "CANCELED",
        "cancel_status": "CANCELED",
    }
    assert late.returncode == 0 and "already finished (SUCCEEDED)" in late.stdout
    assert cancels == 3


def test_cancel_of_an_unknown_execution_exits_1(sim: SimulatorThread) -> None:
    """cancel of an execution that does not exist exits 1 with the platform's 404, one line."""
    done = cli(sim, "cancel", "5000", "424242")
    assert done.returncode == 1 and "404" in one_line(done.stderr) and done.stdout == ""


# -- executions ---------------------------------------------------------------------------------
def test_executions_list_limit_newest_first(sim: SimulatorThread) -> None:
    """`executions list ID --limit N` prints exactly the N newest executions, newest first; 10 by default."""
    created = [new_execution(sim, "5000") for _ in range(13)]
    newest_first = list(reversed(created))
    done = cli(sim, "executions", "list", "5000", "--limit", "12", "--json")
    assert done.returncode == 0, done.stderr
    assert [e["id"] for e in orjson.loads(done.stdout)] == newest_first[:12]
    default = cli(sim, "executions", "list", "5000", "--json")
    assert [e["id"] for e in orjson.loads(default.stdout)] == newest_first[:10]
    text = cli(sim, "executions", "list", "5000", "--limit", "3")
    assert text.returncode == 0, text.stderr
    assert [i for i in re.findall(r"\b(8798\d+)\b", text.stdout)] == newest_first[:3]
    assert "newest 3 execution(s)" in text.stdout


def test_executions_list_pages_when_the_limit_needs_it(sim: SimulatorThread) -> None:
    """A limit beyond one API page (100) is met by paging, still newest first and exactly N."""
    with requests.Session() as http:
        http.headers["Authorization"] = sim.token
        created = [
            http.post(f"{sim.url}/v1/exports/5001/executions", json={}, timeout=10).json()["data"]["id"]
            for _ in range(105)
        ]
    done = cli(sim, "executions", "list", "5001", "--limit", "103", "--json")
    assert done.returncode == 0, done.stderr
    assert [e["id"] for e in orjson.loads(done.stdout)] == list(reversed(created))[:103]
    assert sim.stats.list_requests["5001"] == 2


def test_executions_list_of_an_export_without_executions(sim: SimulatorThread) -> None:
    """An export never run lists no executions, successfully."""
    done = cli(sim, "executions", "list", "5002", "--json")
    assert (done.returncode, orjson.loads(done.stdout)) == (0, [])


# -- download -----------------------------------------------------------------------------------
def test_download_writes_a_byte_exact_file_and_no_temp_file(tmp_path: Path) -> None:
    """`download EXPORT EXEC -o FILE` writes exactly the result, reports its sha256, and leaves no temporary file."""
    spec = fast_spec("9879", size_bytes=2_500_000, shape="user", invalid_every=1000)
    with SimulatorThread(sim_config(spec)) as sim:
        execution_id = new_execution(sim, "9879")
        wait_succeeded(sim, "9879", execution_id)
        out = tmp_path / "result.ndjson"
        done = cli(sim, "download", "9879", execution_id, "-o", str(out))
    assert done.returncode == 0, done.stderr
    expected = spec.result()
    assert out.read_bytes() == expected.read_all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.ndjson"]
    assert expected.sha256() in done.stdout
    assert f"{expected.size} bytes" in done.stdout
    assert f"{expected.invalid_lines} invalid lines" in done.stdout


def test_download_survives_cut_connections(tmp_path: Path) -> None:
    """A download whose connection is cut resumes and still writes a byte-exact file (JSON summary)."""
    spec = fast_spec("9879", size_bytes=600_000)
    faults = Faults(reset_after_bytes=100_000, reset_first_k=1, retry_after_s=0.01)
    with SimulatorThread(sim_config(spec, faults=faults, chunk_bytes=32_768)) as sim:
        execution_id = new_execution(sim, "9879")
        wait_succeeded(sim, "9879", execution_id)
        out = tmp_path / "cut.ndjson"
        done = cli(sim, "download", "9879", execution_id, "-o", str(out), "--json")
        assert sim.stats.faults["reset"] == 1
        # One resume, from what had arrived: a TCP reset may discard bytes the server had
        # already written (up to the cut at 100,000), never more.
        [(resumed_id, resumed_at)] = sim.stats.range_starts
        assert resumed_id == execution_id and 0 < resumed_at <= 100_000
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == spec.result().read_all()
    summary = orjson.loads(done.stdout)
    assert summary["sha256"] == spec.result().sha256()
    assert summary["bytes"] == spec.result().size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.ndjson"]


def test_download_of_unknown_execution_fails_and_writes_nothing(sim: SimulatorThread, tmp_path: Path) -> None:
    """Downloading an execution that does not exist exits 1 with the 404 and leaves no file behind."""
    out = tmp_path / "nothing.ndjson"
    done = cli(sim, "download", "5000", "424242", "-o", str(out))
    assert done.returncode == 1
    assert "404" in one_line(done.stderr)
    assert not out.exists()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == []


# -- tokens and URLs ----------------------------------------------------------------------------
@pytest.mark.parametrize("token", [None, "", "   "])
def test_missing_token_exits_2_without_any_request(sim: SimulatorThread, token: str | None) -> None:
    """Without MICS_API_TOKEN an ops command exits 2 with one line naming the variable, and sends nothing."""
    for args in (("exports", "list", "--organisation-id", ORG), ("executions", "list", "5000")):
        done = cli(sim, *args, token=token)
        assert done.returncode == 2
        assert "MICS_API_TOKEN" in one_line(done.stderr)
        assert "--simulate" not in done.stderr and "mics-export simulate" in done.stderr  # they have no --simulate
        assert done.stdout == ""
    assert sim.stats.total_requests == 0


def test_wrong_token_exits_1_with_a_clear_message(sim: SimulatorThread) -> None:
    """A refused token exits 1 with one line that says HTTP 401 and blames the token; no traceback."""
    done = cli(sim, "exports", "list", "--organisation-id", ORG, token="not-the-token")
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert "401" in line and "token" in line.lower()
    assert "Traceback" not in done.stderr
    assert "not-the-token" not in done.stderr
    assert sim.stats.total_requests == 1


def test_api_url_option_overrides_the_environment(sim: SimulatorThread) -> None:
    """--api-url wins over MICS_API_URL."""
    done = cli(
        None,
        "exports",
        "show",
        "5000",
        "--organisation-id",
        ORG,
        "--api-url",
        sim.url,
        MICS_API_URL="http://127.0.0.1:9",
    )
    assert done.returncode == 0, done.stderr
    assert sim.stats.requests["exports.get"] == 1


# -- simulate -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_simulate_serves_the_demo_platform() -> None:
    """`mics-export simulate --port P` serves the API on that port with the demo exports until stopped."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICS_")}
    proc = subprocess.Popen(
        [*COMMAND, "simulate", "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/exports"
        deadline = time.monotonic() + 30
        while True:
            try:
                resp = requests.get(
                    url, params={"organisation_id": ORG}, headers={"Authorization": "sim-token"}, timeout=5
                )
                break
            except requests.ConnectionError:
                assert proc.poll() is None, proc.communicate()[1]
                if time.monotonic() > deadline:
                    pytest.fail("the simulator did not start listening within 30 s")
                time.sleep(0.05)
        assert resp.status_code == 200
        body = resp.json()
        assert body["status"] == "ok"
        assert {"9879", "9872"} <= {e["id"] for e in body["data"]}
        assert requests.get(url, params={"organisation_id": ORG}, timeout=5).status_code == 401
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert f"simulator listening on http://127.0.0.1:{port}" in stderr


def test_validate_check_queries_without_token_does_not_offer_simulate(tmp_path: Path) -> None:
    """validate --check-queries without a token exits 2 pointing at `mics-export simulate`, not at --simulate."""
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        "version: 1\njobs:\n  - name: q\n    organisation_id: 1426\n"
        "    query: {datamart_id: 1509, text: 'SELECT {id} FROM UserPoint'}\n"
    )
    done = cli(None, "validate", str(jobs), "--check-queries", token=None)
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert "MICS_API_TOKEN" in line and "--simulate" not in line and "mics-export simulate" in line


def test_downloading_a_failed_execution_says_so_and_offers_its_error_file(tmp_path: Path) -> None:
    """A FAILED execution's download is one line naming FAILED and --error-file; --error-file fetches it."""
    spec = fast_spec("9879", always_fail=True)
    with SimulatorThread(sim_config(spec)) as sim:
        execution_id = new_execution(sim, "9879")
        assert wait_final(sim, "9879", execution_id) == "FAILED"
        out = tmp_path / "result.ndjson"
        refused = cli(sim, "download", "9879", execution_id, "-o", str(out))
        fetched = cli(sim, "download", "9879", execution_id, "--error-file", "-o", str(tmp_path / "err.txt"))
        to_stdout = cli(sim, "download", "9879", execution_id, "--error-file", "-o", "-")
    assert refused.returncode == 1 and not out.exists()
    assert "ended FAILED" in refused.stderr and "--error-file" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert fetched.returncode == 0, fetched.stderr
    assert f"Execution {execution_id}" in (tmp_path / "err.txt").read_text()
    assert to_stdout.returncode == 0 and f"Execution {execution_id}" in to_stdout.stdout


def test_error_file_of_a_succeeded_execution_is_refused(tmp_path: Path) -> None:
    """--error-file on an execution that did not fail says only a FAILED one has an error file."""
    with SimulatorThread(sim_config(fast_spec("9879"))) as sim:
        execution_id = new_execution(sim, "9879")
        wait_succeeded(sim, "9879", execution_id)
        done = cli(sim, "download", "9879", execution_id, "--error-file", "-o", str(tmp_path / "err.txt"))
    assert done.returncode == 1 and "only a FAILED execution has an error file" in done.stderr
    assert not (tmp_path / "err.txt").exists()
