"""End-to-end: jobs defined by their OTQL query (issue #7), `mics-export` run in-process against the simulator.

The command is the real CLI (:func:`support.cli_in_process`): exit codes, stdout and stderr as a
user sees them, without a Python start-up per run; nothing here is about the process itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support import (
    TOKEN,
    assert_exact,
    cli_env,
    cli_in_process,
    jobs_by_name,
    leftovers,
    manifest,
    write_jobs,
)

from orchestrator.simulator import ExportSpec, SimulatorConfig, SimulatorThread

ORG = "1426"
DATAMART = "1509"
PREFIX = "mics-export:"
ACTIVE = 'SELECT {emails {id}} FROM UserPoint WHERE segments {id="123"}'
VISITORS = 'SELECT {id} FROM UserPoint WHERE events {nature = "visit"}'
BAD = "SELEC {id} FROM UserPoint"


def _sim(*specs: ExportSpec) -> SimulatorThread:
    """The simulator; exports it creates get derived lifecycles (0.7-2.5 s), run at 0.05x (35-125 ms) for speed."""
    return SimulatorThread(SimulatorConfig(token=TOKEN, exports=specs, time_scale=0.05))


def _fast(export_id: str, **kw: Any) -> ExportSpec:
    """A pre-existing export whose executions last milliseconds."""
    values: dict[str, Any] = {"size_bytes": 30_000, "pending_s": 0.01, "running_s": 0.02}
    values.update(kw)
    return ExportSpec(export_id, **values)


def _qjob(name: str, text: str, datamart_id: str = DATAMART) -> dict[str, Any]:
    return {"name": name, "query": {"datamart_id": datamart_id, "text": text}}


def _api_message(text: str) -> str:
    """The verdict, message and position the simulator's query_check gives for BAD (no SELECT)."""
    assert not text.startswith("SELECT ")
    return "the API rejected the query: PARSING_ERROR: mismatched input: expected SELECT ... FROM ... (at row 1, col 1)"


def _named(sim: SimulatorThread, name: str) -> list[ExportSpec]:
    return [s for s in sim.state.exports.values() if s.name == name]


def _check_query_job(sim: SimulatorThread, out: Path, name: str, text: str, prefix: str = PREFIX) -> dict[str, Any]:
    """The query job's manifest entry names the platform's export and query, and its file is exact."""
    entry = jobs_by_name(manifest(out))[name]
    (spec,) = _named(sim, prefix + name)
    assert entry["export_id"] == spec.id
    assert entry["query_id"] == spec.query_id
    assert sim.state.queries[spec.query_id] == {"query_text": text, "datamart_id": DATAMART}
    assert spec.organisation_id == ORG and spec.datamart_id == DATAMART
    assert_exact(out, name, spec)
    return entry


# -- run -------------------------------------------------------------------------------------
def test_first_run_creates_one_checked_query_and_one_export_per_query_job(tmp_path: Path) -> None:
    """A first run checks, creates one query and one export named PREFIX+job per query job, and downloads it exactly."""
    with _sim() as sim:
        path = write_jobs(tmp_path, [_qjob("active-emails", ACTIVE), _qjob("visitors", VISITORS)])
        proc = cli_in_process("run", str(path), env=cli_env(sim.url))
        assert proc.returncode == 0, proc.stderr
        stats = sim.stats
        assert stats.queries_created == 2
        assert stats.exports_created == 2
        assert stats.exports_updated == 0
        assert stats.requests["queries.check"] == 2
        assert stats.requests["queries.run"] == 0  # a run checks its queries, never runs them
        out = tmp_path / "out"
        a = _check_query_job(sim, out, "active-emails", ACTIVE)
        v = _check_query_job(sim, out, "visitors", VISITORS)
    assert a["export_id"] != v["export_id"] and a["query_id"] != v["query_id"]
    assert a["attempts"] == 1 and isinstance(a["execution_id"], str)
    assert manifest(out)["status"] == "SUCCEEDED"
    assert leftovers(out) == []


def test_second_run_reuses_the_export_and_creates_nothing(tmp_path: Path) -> None:
    """A rerun into a fresh folder (so the job really runs) reuses the export and query: nothing created or updated."""
    with _sim() as sim:
        path = write_jobs(tmp_path, [_qjob("active-emails", ACTIVE)])
        assert cli_in_process("run", str(path), env=cli_env(sim.url)).returncode == 0
        first = jobs_by_name(manifest(tmp_path / "out"))["active-emails"]
        second_out = tmp_path / "second"
        proc = cli_in_process("run", str(path), "--output-dir", str(second_out), env=cli_env(sim.url))
        assert proc.returncode == 0, proc.stderr
        stats = sim.stats
        assert (stats.queries_created, stats.exports_created, stats.exports_updated) == (1, 1, 0)
        assert stats.executions_created[first["export_id"]] == 2  # it did run again, on the same export
        entry = _check_query_job(sim, second_out, "active-emails", ACTIVE)
    assert (entry["export_id"], entry["query_id"]) == (first["export_id"], first["query_id"])
    assert len(sim.state.exports) == 1


def test_rerun_into_the_same_folder_creates_nothing(tmp_path: Path) -> None:
    """A rerun into the same folder after success creates no query, export or execution."""
    with _sim() as sim:
        path = write_jobs(tmp_path, [_qjob("active-emails", ACTIVE)])
        assert cli_in_process("run", str(path), env=cli_env(sim.url)).returncode == 0
        proc = cli_in_process("run", str(path), env=cli_env(sim.url))
        assert proc.returncode == 0, proc.stderr
        stats = sim.stats
        assert (stats.queries_created, stats.exports_created, stats.exports_updated) == (1, 1, 0)
        assert sum(stats.executions_created.values()) == 1
        _check_query_job(sim, tmp_path / "out", "active-emails", ACTIVE)


def test_changed_text_creates_a_new_query_and_points_the_export_at_it(tmp_path: Path) -> None:
    """When the job's text changes, the text is checked, a new query is created and the same export is PUT onto it."""
    changed = 'SELECT {emails {id}} FROM UserPoint WHERE segments {id="456"}'
    with _sim() as sim:
        path = write_jobs(tmp_path, [_qjob("active-emails", ACTIVE)])
        assert cli_in_process("run", str(path), env=cli_env(sim.url)).returncode == 0
        first = jobs_by_name(manifest(tmp_path / "out"))["active-emails"]

        path = write_jobs(tmp_path, [_qjob("active-emails", changed)])
        out2 = tmp_path / "changed"
        proc = cli_in_process("run", str(path), "--output-dir", str(out2), env=cli_env(sim.url))
        assert proc.returncode == 0, proc.stderr
        stats = sim.stats
        assert (stats.queries_created, stats.exports_created, stats.exports_updated) == (2, 1, 1)
        assert stats.requests["queries.check"] == 2
        assert stats.requests["queries.run"] == 0
        entry = _check_query_job(sim, out2, "active-emails", changed)
        assert entry["export_id"] == first["export_id"]
        assert entry["query_id"] != first["query_id"]
        assert sim.state.exports[entry["export_id"]].query_id == entry["query_id"]
        # The old query is left alone (earlier executions refer to it).
        assert sim.state.queries[first["query_id"]]["query_text"] == ACTIVE

        # The same changed text again: reused as is, nothing new.
        out3 = tmp_path / "again"
        proc = cli_in_process("run", str(path), "--output-dir", str(out3), env=cli_env(sim.url))
        assert proc.returncode == 0, proc.stderr
        assert (stats.queries_created, stats.exports_created, stats.exports_updated) == (2, 1, 1)
        again = _check_query_job(sim, out3, "active-emails", changed)
    assert (again["export_id"], again["query_id"]) == (entry["export_id"], entry["query_id"])


def test_changed_text_that_the_api_rejects_fails_the_job_and_keeps_the_export(tmp_path: Path) -> None:
    """A changed text the API rejects fails the job with the API's message; the export keeps its old query."""
    with _sim() as sim:
        path = write_jobs(tmp_path, [_qjob("active-emails", ACTIVE)])
        assert cli_in_process("run", str(path), env=cli_env(sim.url)).returncode == 0
        first = jobs_by_name(manifest(tmp_path / "out"))["active-emails"]
        path = write_jobs(tmp_path, [_qjob("active-emails", BAD)])
        out2 = tmp_path / "bad"
        proc = cli_in_process("run", str(path), "--output-dir", str(out2), env=cli_env(sim.url))
        stats = sim.stats
        assert (stats.queries_created, stats.exports_created, stats.exports_updated) == (1, 1, 0)
        assert sim.state.exports[first["export_id"]].query_id == first["query_id"]
    assert proc.returncode == 1
    entry = jobs_by_name(manifest(out2))["active-emails"]
    assert entry["status"] == "FAILED"
    assert _api_message(BAD) in entry["error"]
    assert not (out2 / "active-emails.ndjson").exists()


def test_changed_datamart_with_the_same_text_gets_a_new_query_on_that_datamart(tmp_path: Path) -> None:
    """Moving a query job to another datamart (same text) makes a query there and points the export at it."""
    with _sim() as sim:
        path = write_jobs(tmp_path, [_qjob("active-emails", ACTIVE)])
        assert cli_in_process("run", str(path), env=cli_env(sim.url)).returncode == 0
        first = jobs_by_name(manifest(tmp_path / "out"))["active-emails"]
        path = write_jobs(tmp_path, [_qjob("active-emails", ACTIVE, datamart_id="2000")])
        out2 = tmp_path / "moved"
        proc = cli_in_process("run", str(path), "--output-dir", str(out2), env=cli_env(sim.url))
        assert proc.returncode == 0, proc.stderr
        stats = sim.stats
        assert (stats.queries_created, stats.exports_created, stats.exports_updated) == (2, 1, 1)
        entry = jobs_by_name(manifest(out2))["active-emails"]
        assert entry["export_id"] == first["export_id"] and entry["query_id"] != first["query_id"]
        assert sim.state.queries[entry["query_id"]] == {"query_text": ACTIVE, "datamart_id": "2000"}
        assert sim.state.exports[entry["export_id"]].query_id == entry["query_id"]
        assert_exact(out2, "active-emails", sim.state.exports[entry["export_id"]])


def test_export_whose_query_is_gone_gets_a_new_query(tmp_path: Path) -> None:
    """An existing export whose query no longer exists (404) is pointed at a newly created query instead of failing."""
    orphan = _fast("5555", name=PREFIX + "active-emails", query_id="99999")
    with _sim(orphan) as sim:
        del sim.state.queries["99999"]  # before any request: the platform lost that query
        path = write_jobs(tmp_path, [_qjob("active-emails", ACTIVE)])
        proc = cli_in_process("run", str(path), env=cli_env(sim.url))
        assert proc.returncode == 0, proc.stderr
        stats = sim.stats
        assert (stats.queries_created, stats.exports_created, stats.exports_updated) == (1, 0, 1)
        entry = _check_query_job(sim, tmp_path / "out", "active-emails", ACTIVE)
    assert entry["export_id"] == "5555" and entry["query_id"] != "99999"


def test_bad_query_fails_only_its_job_with_the_api_message(tmp_path: Path) -> None:
    """A query the API rejects fails only its job with the API's message; nothing is created for it; others succeed."""
    plain = _fast("9872")
    with _sim(plain) as sim:
        jobs = [_qjob("broken", BAD), _qjob("active-emails", ACTIVE), {"name": "visitors", "export_id": "9872"}]
        path = write_jobs(tmp_path, jobs)
        proc = cli_in_process("run", str(path), env=cli_env(sim.url))
        stats = sim.stats
        assert (stats.queries_created, stats.exports_created) == (1, 1)
        assert _named(sim, PREFIX + "broken") == []
        out = tmp_path / "out"
        _check_query_job(sim, out, "active-emails", ACTIVE)
    assert proc.returncode == 1
    entry = jobs_by_name(manifest(out))["broken"]
    assert entry["status"] == "FAILED"
    assert _api_message(BAD) in entry["error"]
    assert entry["export_id"] is None and entry["attempts"] == 0
    assert not (out / "broken.ndjson").exists()
    assert _api_message(BAD) in proc.stderr
    assert_exact(out, "visitors", plain)
    assert manifest(out)["status"] == "FAILED"


def test_mixed_export_id_and_query_jobs_in_one_file(tmp_path: Path) -> None:
    """export_id and query jobs run side by side; only query jobs get a query_id and a created export."""
    a, b = _fast("9879", query_id="65987"), _fast("9880", seed=3)
    with _sim(a, b) as sim:
        jobs = [
            {"name": "fb-adwords-segments", "export_id": "9879"},
            _qjob("active-emails", ACTIVE),
            {"name": "profiles", "export_id": 9880},
            _qjob("visitors", VISITORS),
        ]
        path = write_jobs(tmp_path, jobs, concurrency=2)
        proc = cli_in_process("run", str(path), env=cli_env(sim.url))
        assert proc.returncode == 0, proc.stderr
        stats = sim.stats
        assert (stats.queries_created, stats.exports_created, stats.exports_updated) == (2, 2, 0)
        out = tmp_path / "out"
        _check_query_job(sim, out, "active-emails", ACTIVE)
        _check_query_job(sim, out, "visitors", VISITORS)
        assert sim.state.exports["9879"] == a and sim.state.exports["9880"] == b  # untouched
    for name, spec in (("fb-adwords-segments", a), ("profiles", b)):
        entry = assert_exact(out, name, spec)
        assert entry["export_id"] == spec.id
        assert entry["query_id"] is None  # only query jobs have one


def test_custom_export_name_prefix_is_honoured(tmp_path: Path) -> None:
    """With api.query_export_prefix set, the export is named PREFIX+job; one under the default prefix is not taken."""
    decoy = _fast("777", name=PREFIX + "active-emails", query_id="65987")
    with _sim(decoy) as sim:
        path = write_jobs(tmp_path, [_qjob("active-emails", ACTIVE)], api={"query_export_prefix": "nightly/"})
        proc = cli_in_process("run", str(path), env=cli_env(sim.url))
        assert proc.returncode == 0, proc.stderr
        stats = sim.stats
        assert (stats.queries_created, stats.exports_created, stats.exports_updated) == (1, 1, 0)
        entry = _check_query_job(sim, tmp_path / "out", "active-emails", ACTIVE, prefix="nightly/")
        assert sim.state.exports["777"] == decoy
    assert entry["export_id"] != "777"


@pytest.mark.parametrize("position", [60, 124])
def test_existing_export_on_a_later_page_is_found(tmp_path: Path, position: int) -> None:
    """An existing export named PREFIX+job on page 2 or 3 of the exports list is found and reused, not duplicated."""
    filler = [_fast(str(1000 + i), name=f"other-{i}", query_id="65987") for i in range(125)]
    mine = _fast("5555", name=PREFIX + "deep", query_id="61234", size_bytes=70_000, seed=9)
    filler.insert(position, mine)
    with _sim(*filler) as sim:
        text = sim.state.queries["61234"]["query_text"]  # the text the platform holds for that query
        path = write_jobs(tmp_path, [_qjob("deep", text)])
        proc = cli_in_process("run", str(path), env=cli_env(sim.url))
        assert proc.returncode == 0, proc.stderr
        stats = sim.stats
        assert (stats.queries_created, stats.exports_created, stats.exports_updated) == (0, 0, 0)
        assert stats.requests["exports.list"] >= 2
        assert stats.executions_created["5555"] == 1
    entry = assert_exact(tmp_path / "out", "deep", mine)
    assert (entry["export_id"], entry["query_id"]) == ("5555", "61234")


def test_existing_export_on_a_later_page_with_other_text_is_updated(tmp_path: Path) -> None:
    """An existing export on a later page whose query text differs gets a new query (PUT), not a second export."""
    filler = [_fast(str(1000 + i), name=f"other-{i}", query_id="65987") for i in range(80)]
    mine = _fast("5555", name=PREFIX + "deep", query_id="61234")
    with _sim(*filler, mine) as sim:
        path = write_jobs(tmp_path, [_qjob("deep", ACTIVE)])
        proc = cli_in_process("run", str(path), env=cli_env(sim.url))
        assert proc.returncode == 0, proc.stderr
        stats = sim.stats
        assert (stats.queries_created, stats.exports_created, stats.exports_updated) == (1, 0, 1)
        entry = _check_query_job(sim, tmp_path / "out", "deep", ACTIVE)
    assert entry["export_id"] == "5555" and entry["query_id"] != "61234"


# -- validate --------------------------------------------------------------------------------
def test_check_queries_accepts_good_queries_and_creates_nothing(tmp_path: Path) -> None:
    """`validate --check-queries` exits 0 when the API accepts every query job's query, and creates nothing."""
    with _sim() as sim:
        jobs = [_qjob("active-emails", ACTIVE), _qjob("visitors", VISITORS), {"name": "plain", "export_id": "9872"}]
        path = write_jobs(tmp_path, jobs)
        proc = cli_in_process("validate", "--check-queries", str(path), env=cli_env(sim.url))
        stats = sim.stats
        assert proc.returncode == 0, proc.stderr
        assert stats.requests["queries.check"] == 2
        assert stats.requests["queries.run"] == 0  # checked, never run
        assert (stats.queries_created, stats.exports_created, stats.exports_updated) == (0, 0, 0)
        assert sum(stats.executions_created.values()) == 0
    assert "OK" in proc.stdout and "3 job(s)" in proc.stdout and "2 query(ies) checked" in proc.stdout


def test_check_queries_names_the_bad_job_and_quotes_the_api(tmp_path: Path) -> None:
    """`validate --check-queries` exits 1, naming each rejected job with the API's message, and creates nothing."""
    with _sim() as sim:
        jobs = [_qjob("active-emails", ACTIVE), _qjob("broken", BAD)]
        path = write_jobs(tmp_path, jobs)
        proc = cli_in_process("validate", "--check-queries", str(path), env=cli_env(sim.url))
        stats = sim.stats
        assert proc.returncode == 1, proc.stderr
        assert stats.requests["queries.check"] == 2
        assert stats.requests["queries.run"] == 0  # checked, never run
        assert (stats.queries_created, stats.exports_created, stats.exports_updated) == (0, 0, 0)
    problems = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(problems) == 1, proc.stderr
    assert "'broken'" in problems[0] and str(path) in problems[0]
    assert _api_message(BAD) in problems[0]
    assert "active-emails" not in proc.stderr
    assert TOKEN not in proc.stderr + proc.stdout


def test_check_queries_without_a_token_exits_2_and_sends_nothing(tmp_path: Path) -> None:
    """`validate --check-queries` with no token exits 2 naming the variable, and sends no request."""
    with _sim() as sim:
        path = write_jobs(tmp_path, [_qjob("active-emails", ACTIVE)])
        proc = cli_in_process("validate", "--check-queries", str(path), env=cli_env(sim.url, token=None))
        assert proc.returncode == 2, proc.stderr
        assert sim.stats.total_requests == 0
    assert "MICS_API_TOKEN" in proc.stderr


def test_plain_validate_sends_nothing_for_query_jobs(tmp_path: Path) -> None:
    """Plain `validate` (no --check-queries) accepts query jobs without a token or any request."""
    with _sim() as sim:
        path = write_jobs(tmp_path, [_qjob("active-emails", BAD), {"name": "plain", "export_id": "1"}])
        proc = cli_in_process("validate", str(path), env=cli_env(sim.url, token=None))
        assert proc.returncode == 0, proc.stderr
        assert sim.stats.total_requests == 0


@pytest.mark.parametrize(
    "job",
    [
        {"name": "both", "export_id": "9872", "query": {"datamart_id": DATAMART, "text": ACTIVE}},
        {"name": "neither"},
    ],
    ids=["both", "neither"],
)
def test_a_job_needs_exactly_one_of_export_id_or_query(tmp_path: Path, job: dict[str, Any]) -> None:
    """A job with both export_id and query, or neither, is a one-line job-file error naming the job (exit 2)."""
    path = write_jobs(tmp_path, [job])
    for args in (("validate", str(path)), ("run", str(path))):
        proc = cli_in_process(*args, env=cli_env("http://127.0.0.1:9"))
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, proc.stderr
        assert repr(job["name"]) in lines[0] or job["name"] in lines[0]
        assert "export_id" in lines[0] and "query" in lines[0]
        assert str(path.name) in lines[0]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_changed_query_in_the_same_folder_is_run_again(tmp_path: Path) -> None:
    """Rerunning today's batch after fixing a query reruns that job on the new query, not the old file."""
    with _sim() as sim:
        first = write_jobs(tmp_path, [_qjob("q", ACTIVE)])
        assert cli_in_process("run", str(first), env=cli_env(sim.url)).returncode == 0
        old = jobs_by_name(manifest(tmp_path / "out"))["q"]
        second = write_jobs(tmp_path, [_qjob("q", VISITORS)])
        proc = cli_in_process("run", str(second), env=cli_env(sim.url))
        created = sim.stats.queries_created
    assert proc.returncode == 0, proc.stderr
    new = jobs_by_name(manifest(tmp_path / "out"))["q"]
    assert new["export_id"] == old["export_id"]
    assert new["query_id"] != old["query_id"] and created == 2
    assert new["execution_id"] != old["execution_id"]  # not the old query's result adopted again
