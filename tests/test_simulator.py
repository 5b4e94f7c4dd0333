"""Tests for the built-in simulator: every endpoint over real HTTP, faults, accounting, data files.

Requests are raw aiohttp calls (not the product's ApiClient) so that each test checks the
simulator's wire behaviour on its own: envelopes, status codes, headers, bytes.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import requests
from conftest import DATAMART, ORG, TOKEN, fast_spec, sim_config, wait_until

from orchestrator.simulator import ExportSpec, Faults, ResultFile, Simulator, SimulatorConfig, SimulatorThread
from orchestrator.simulator.data import BLOCK

pytestmark = pytest.mark.anyio


# -- helpers ----------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class Http:
    """Raw HTTP to a simulator, with the right token unless told otherwise."""

    def __init__(self, sim: Simulator, session: aiohttp.ClientSession) -> None:
        self.sim = sim
        self.session = session

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        data: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        auth: str | None = "default",
    ) -> Answer:
        hdrs: dict[str, str] = {}
        if auth == "default":
            hdrs["Authorization"] = self.sim.token
        elif auth is not None:
            hdrs["Authorization"] = auth
        hdrs.update(headers or {})
        async with self.session.request(
            method, self.sim.url + path, params=params, json=json, data=data, headers=hdrs
        ) as resp:
            return Answer(resp.status, resp.headers, await resp.read())

    async def get(self, path: str, **kw: Any) -> Answer:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, **kw: Any) -> Answer:
        return await self.request("POST", path, **kw)

    async def new_execution(self, export_id: str) -> dict[str, Any]:
        answer = await self.post(f"/v1/exports/{export_id}/executions", json={})
        assert answer.status == 200, answer.body
        data: dict[str, Any] = answer.json()["data"]
        return data

    async def executions(self, export_id: str, **params: Any) -> dict[str, Any]:
        answer = await self.get(f"/v1/exports/{export_id}/executions", params=params or None)
        assert answer.status == 200, answer.body
        env: dict[str, Any] = answer.json()
        return env

    async def execution(self, export_id: str, execution_id: str) -> dict[str, Any]:
        first = 0
        while True:
            env = await self.executions(export_id, first_result=first, max_results=100)
            for item in env["data"]:
                if item["id"] == execution_id:
                    return dict(item)
            if not env["data"]:
                raise AssertionError(f"execution {execution_id} not listed")
            first += len(env["data"])

    async def wait_final(self, export_id: str, execution_id: str) -> dict[str, Any]:
        async def final() -> dict[str, Any] | None:
            item = await self.execution(export_id, execution_id)
            return item if item["status"] in ("SUCCEEDED", "FAILED", "CANCELED") else None

        result: dict[str, Any] = await wait_until(final, what=f"execution {execution_id} to finish")
        return result


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


def file_path(export_id: str, execution_id: str, name: str = "export") -> str:
    return f"/v1/exports/{export_id}/executions/{execution_id}/files/technical_name={name}"


def data_file_params(org: str, execution_id: str, kind: str) -> dict[str, str]:
    return {"uri": f"mics://data_file/tenants/{org}/jobs/executions/{execution_id}/result/export.{kind}"}


def assert_error_envelope(answer: Answer, status: int) -> dict[str, Any]:
    assert answer.status == status, answer.body
    assert answer.headers["Content-Type"].startswith("application/json")
    env: dict[str, Any] = answer.json()
    assert env["status"] == "error"
    assert isinstance(env["error"], str) and env["error"]
    uuid.UUID(env["error_id"])  # a uuid-shaped id support can look up
    assert set(env) == {"status", "error", "error_id"}
    return env


def age(sim: Simulator, execution_id: str, seconds: float) -> None:
    """Move an execution's creation ``seconds`` into the past (the lifecycle runs on wall time)."""
    exe = sim.state.by_id[execution_id]
    exe.created_mono = time.monotonic() - seconds


# -- ResultFile -------------------------------------------------------------------------------
def recount(data: bytes) -> dict[str, Any]:
    """An independent count of a file's lines, records and invalid lines."""
    lines = data.split(b"\n")
    assert lines[-1] == b"", "every line ends with a newline"
    lines = lines[:-1]
    records = 0
    invalid: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError:
            invalid.append(number)
        else:
            records += 1
    return {"lines": len(lines), "records": records, "invalid": invalid}


RESULT_FILES = [
    ResultFile(0),
    ResultFile(1),
    ResultFile(300, "user", seed=3),
    ResultFile(BLOCK - 1, "small"),
    ResultFile(BLOCK, "small", seed=1),
    ResultFile(BLOCK + 1, "big", seed=2),
    ResultFile(3 * BLOCK + 12_345, "small", seed=1, invalid_every=997, blank_every=401),
    ResultFile(5 * BLOCK - 10, "user", seed=3, invalid_every=50),
    ResultFile(2 * BLOCK + 77, "big", seed=0, blank_every=7),
    ResultFile(BLOCK + 5_000, "small", invalid_every=3, blank_every=2),  # overlapping: blank wins
    ResultFile(40_000, "small", invalid_every=1),  # every line invalid but the padding
    ResultFile(-5),  # a negative target is an empty file
]


@pytest.mark.parametrize("rf", RESULT_FILES, ids=repr)
def test_result_file_counts_match_an_independent_recount(rf: ResultFile) -> None:
    """A result file's announced size, lines, records, invalid lines and sha256 are what its bytes hold."""
    data = rf.read_all()
    counted: dict[str, Any] = recount(data) if data else {"lines": 0, "records": 0, "invalid": []}
    assert rf.size == len(data)
    assert rf.lines == counted["lines"]
    assert rf.records == counted["records"]
    assert rf.invalid_lines == len(counted["invalid"])
    assert rf.invalid_line_numbers() == counted["invalid"][:100]
    assert rf.invalid_line_numbers(limit=10**9) == counted["invalid"]
    assert rf.invalid_line_numbers(limit=3) == counted["invalid"][:3]
    assert rf.sha256() == hashlib.sha256(data).hexdigest()
    assert rf.sha256() == hashlib.sha256(data).hexdigest()  # the cached value too
    if rf.invalid_every == 0:
        assert rf.invalid_lines == 0
    else:
        assert rf.invalid_lines > 0 or rf.size == 0
    if rf.blank_every:
        assert counted["lines"] > counted["records"] + len(counted["invalid"])  # blank lines exist


@pytest.mark.parametrize("rf", RESULT_FILES, ids=repr)
def test_result_file_is_the_smallest_line_aligned_size_at_or_above_the_target(rf: ResultFile) -> None:
    """The file ends on a newline at or past size_bytes, and no earlier line end would do."""
    data = rf.read_all()
    if rf.size_bytes <= 0:
        assert data == b""
        return
    assert len(data) >= rf.size_bytes
    assert data.endswith(b"\n")
    previous_end = data.rfind(b"\n", 0, len(data) - 1) + 1
    assert previous_end < rf.size_bytes


@pytest.mark.parametrize(
    "rf",
    [ResultFile(3 * BLOCK + 12_345, "small", seed=1, invalid_every=997), ResultFile(50_000, "user")],
    ids=repr,
)
def test_result_file_iter_chunks_from_any_offset_is_the_tail(rf: ResultFile) -> None:
    """Serving from an offset (HTTP Range) yields exactly the file's bytes from that offset."""
    data = rf.read_all()
    size = len(data)
    for start in sorted({0, 1, 999, BLOCK - 1, BLOCK, BLOCK + 7, 2 * BLOCK + 3, size - 1, size, size + 5}):
        if start > size + 5:
            continue
        assert b"".join(rf.iter_chunks(start)) == data[start:], start
    views = list(rf.iter_chunks(12_345, chunk=4096))
    assert all(0 < len(v) <= 4096 for v in views)
    assert b"".join(views) == data[12_345:]


def test_result_file_is_deterministic_and_seed_dependent() -> None:
    """The same settings give the same bytes; another seed or shape gives other bytes."""
    a = ResultFile(200_000, "user", seed=5)
    assert a.read_all() == ResultFile(200_000, "user", seed=5).read_all()
    assert a.read_all() != ResultFile(200_000, "user", seed=6).read_all()
    assert a.read_all() != ResultFile(200_000, "small", seed=5).read_all()


@pytest.mark.parametrize(
    "kwargs",
    [{"shape": "bigg"}, {"invalid_every": -1}, {"blank_every": -2}],
    ids=str,
)
def test_result_file_rejects_invalid_settings(kwargs: dict[str, Any]) -> None:
    """A typo in a shape or a negative line period is refused instead of silently serving something else."""
    with pytest.raises(ValueError):
        ResultFile(1000, **kwargs)
    with pytest.raises(ValueError):
        ExportSpec(id="1", **kwargs)


# -- scenario files ----------------------------------------------------------------------------
SCENARIO = """
token: scenario-token
auto_create_exports: true
time_scale: 0.5
chunk_bytes: 65536
faults:
  seed: 7
  rate_429: 0.25
  retry_after_s: 0.5
  reset_after_bytes: 1000
  reset_first_k: 2
exports:
  - id: 42
    name: answers
    size_bytes: 1234
    shape: user
    fail_first: 1
  - id: "43"
    always_fail: true
"""


def test_scenario_file_loads(tmp_path: Path) -> None:
    """A YAML scenario gives the token, faults and exports it names; ids become strings."""
    path = tmp_path / "scenario.yaml"
    path.write_text(SCENARIO)
    config = SimulatorConfig.from_file(path)
    assert config.token == "scenario-token"
    assert config.auto_create_exports is True
    assert config.time_scale == 0.5
    assert config.chunk_bytes == 65536
    assert config.faults == Faults(seed=7, rate_429=0.25, retry_after_s=0.5, reset_after_bytes=1000, reset_first_k=2)
    assert [e.id for e in config.exports] == ["42", "43"]
    first, second = config.exports
    assert (first.name, first.size_bytes, first.shape, first.fail_first) == ("answers", 1234, "user", 1)
    assert second.always_fail and second.name == "export-43"


def test_empty_scenario_file_is_the_default_platform(tmp_path: Path) -> None:
    """An empty scenario file is allowed and configures nothing special."""
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert SimulatorConfig.from_file(path) == SimulatorConfig()


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("tokn: x\n", "tokn"),
        ("exports:\n  - id: 1\n    sise_bytes: 3\n", "sise_bytes"),
        ("faults:\n  rate_492: 0.5\n", "rate_492"),
        ("- just\n- a list\n", "mapping"),
        ("exports:\n  - id: 1\n    shape: bigg\n", "bigg"),
        ("exports:\n  - name: no-id\n", "id is required"),
        ("exports: [\n", "not valid YAML"),
    ],
)
def test_scenario_file_with_unknown_keys_is_refused(tmp_path: Path, text: str, word: str) -> None:
    """A typo or a missing id in a scenario file is a ValueError saying what is wrong, not a silent default."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=word):
        SimulatorConfig.from_file(path)


# -- authentication and errors ------------------------------------------------------------------
@pytest.mark.parametrize("auth", [None, "wrong-token", f"Bearer {TOKEN}", TOKEN.lower(), TOKEN[:-1], f"{TOKEN}0"])
async def test_only_the_exact_raw_token_is_accepted(session: aiohttp.ClientSession, auth: str | None) -> None:
    """A missing, wrong or Bearer-prefixed token gets a 401 error envelope; the raw token works."""
    async with Simulator(sim_config(fast_spec("9879"))) as sim:
        http = Http(sim, session)
        answer = await http.get("/v1/exports", params={"organisation_id": ORG}, auth=auth)
        env = assert_error_envelope(answer, 401)
        assert "token" in env["error"].lower()
        ok = await http.get("/v1/exports", params={"organisation_id": ORG})
        assert ok.status == 200


async def test_error_ids_are_unique(session: aiohttp.ClientSession) -> None:
    """Every error answer carries its own error_id."""
    async with Simulator(sim_config()) as sim:
        http = Http(sim, session)
        ids = {assert_error_envelope(await http.get("/v1/exports/1", params={"organisation_id": ORG}), 404)["error_id"]}
        ids.add(
            assert_error_envelope(await http.get("/v1/exports/2", params={"organisation_id": ORG}), 404)["error_id"]
        )
        assert len(ids) == 2


async def test_unknown_routes_and_ids_are_404_envelopes(session: aiohttp.ClientSession) -> None:
    """Unknown paths, exports, executions and file names answer the 404 JSON error envelope."""
    async with Simulator(sim_config(fast_spec("9879"))) as sim:
        http = Http(sim, session)
        exe = await http.new_execution("9879")
        await http.wait_final("9879", exe["id"])
        assert_error_envelope(await http.get("/v1/nothing-here"), 404)
        assert_error_envelope(await http.get("/v1/exports/777", params={"organisation_id": ORG}), 404)
        assert_error_envelope(await http.get("/v1/exports/777/executions"), 404)
        assert_error_envelope(await http.post("/v1/exports/777/executions", json={}), 404)
        assert_error_envelope(await http.get(file_path("9879", "123")), 404)
        assert_error_envelope(await http.get(file_path("777", exe["id"])), 404)
        assert_error_envelope(await http.get(file_path("9879", exe["id"], "other")), 404)
        assert_error_envelope(await http.get("/v1/data_file/data", params=data_file_params(ORG, "123", "data")), 404)


# -- exports ----------------------------------------------------------------------------------
async def test_exports_list_pages_through_every_export_of_the_organisation(session: aiohttp.ClientSession) -> None:
    """first_result/max_results page the organisation's exports; the envelope says where the page is."""
    mine = [fast_spec(str(100 + i)) for i in range(7)]
    theirs = [fast_spec(str(200 + i), organisation_id="999") for i in range(2)]
    async with Simulator(sim_config(*mine, *theirs)) as sim:
        http = Http(sim, session)
        seen: list[str] = []
        for first, count in ((0, 3), (3, 3), (6, 1), (9, 0)):
            answer = await http.get(
                "/v1/exports", params={"organisation_id": ORG, "first_result": first, "max_results": 3}
            )
            env = answer.json()
            assert env["status"] == "ok"
            assert (env["count"], env["total"], env["first_result"], env["max_results"]) == (count, 7, first, 3)
            assert len(env["data"]) == count
            seen += [e["id"] for e in env["data"]]
        assert seen == [s.id for s in mine]
        default = (await http.get("/v1/exports", params={"organisation_id": ORG})).json()
        assert (default["count"], default["first_result"], default["max_results"]) == (7, 0, 50)
        item = default["data"][0]
        assert item == {
            "type": "QUERY",
            "id": "100",
            "organisation_id": ORG,
            "name": "export-100",
            "query_id": "65987",
            "datamart_id": DATAMART,
            "output_format": "JSON",
        }
        other = (await http.get("/v1/exports", params={"organisation_id": "999"})).json()
        assert [e["id"] for e in other["data"]] == ["200", "201"]


async def test_exports_list_needs_an_organisation_and_integer_paging(session: aiohttp.ClientSession) -> None:
    """A list without organisation_id or with non-integer paging is a 400 error envelope."""
    async with Simulator(sim_config(fast_spec("1"))) as sim:
        http = Http(sim, session)
        assert_error_envelope(await http.get("/v1/exports"), 400)
        answer = await http.get("/v1/exports", params={"organisation_id": ORG, "max_results": "ten"})
        assert_error_envelope(answer, 400)


async def test_export_get_is_scoped_to_its_organisation(session: aiohttp.ClientSession) -> None:
    """An export is shown to its organisation; unknown ids and other organisations get 404."""
    async with Simulator(sim_config(fast_spec("9879", name="fb"))) as sim:
        http = Http(sim, session)
        env = (await http.get("/v1/exports/9879", params={"organisation_id": ORG})).json()
        assert env["status"] == "ok"
        assert env["data"]["id"] == "9879" and env["data"]["name"] == "fb"
        assert_error_envelope(await http.get("/v1/exports/9879", params={"organisation_id": "1"}), 404)
        assert_error_envelope(await http.get("/v1/exports/1234", params={"organisation_id": ORG}), 404)


async def test_auto_created_exports_appear_for_unknown_numeric_ids(session: aiohttp.ClientSession) -> None:
    """With auto_create_exports, any numeric id is a derived export; other ids stay 404."""
    async with Simulator(sim_config(auto_create_exports=True)) as sim:
        http = Http(sim, session)
        env = (await http.get("/v1/exports/31337", params={"organisation_id": ORG})).json()
        assert env["data"]["id"] == "31337" and env["data"]["name"] == "export-31337"
        assert_error_envelope(await http.get("/v1/exports/abc", params={"organisation_id": ORG}), 404)


async def test_export_create_and_update(session: aiohttp.ClientSession) -> None:
    """POST creates an export on an existing query; PUT renames it or moves it to another query."""
    async with Simulator(sim_config()) as sim:
        http = Http(sim, session)
        q1 = await http.post(f"/v1/datamarts/{DATAMART}/queries", json={"query_text": "SELECT {id} FROM UserPoint"})
        q2 = await http.post(f"/v1/datamarts/{DATAMART}/queries", json={"query_text": "SELECT {id} FROM UserPoint"})
        q1_id, q2_id = q1.json()["data"]["id"], q2.json()["data"]["id"]
        payload = {"name": "mine", "output_format": "JSON", "query_id": q1_id, "type": "QUERY"}
        created = await http.post("/v1/exports", params={"organisation_id": ORG}, json=payload)
        assert created.status == 200, created.body
        data = created.json()["data"]
        assert isinstance(data["id"], str)
        assert (data["name"], data["query_id"], data["datamart_id"], data["organisation_id"]) == (
            "mine",
            q1_id,
            DATAMART,
            ORG,
        )
        export_id = data["id"]
        listed = (await http.get("/v1/exports", params={"organisation_id": ORG})).json()
        assert [e["id"] for e in listed["data"]] == [export_id]

        updated = await http.request(
            "PUT", f"/v1/exports/{export_id}", params={"organisation_id": ORG}, json={**payload, "query_id": q2_id}
        )
        assert updated.status == 200 and updated.json()["data"]["query_id"] == q2_id
        renamed = await http.request("PUT", f"/v1/exports/{export_id}", json={"name": "renamed"})
        assert renamed.json()["data"]["name"] == "renamed"
        shown = (await http.get(f"/v1/exports/{export_id}", params={"organisation_id": ORG})).json()["data"]
        assert (shown["name"], shown["query_id"]) == ("renamed", q2_id)
        assert (sim.stats.exports_created, sim.stats.exports_updated) == (1, 2)

        bad = {**payload, "query_id": "999999"}
        assert_error_envelope(await http.post("/v1/exports", params={"organisation_id": ORG}, json=bad), 400)
        assert_error_envelope(await http.post("/v1/exports", params={"organisation_id": ORG}, json={"name": "x"}), 400)
        csv = {**payload, "output_format": "CSV"}
        assert_error_envelope(await http.post("/v1/exports", params={"organisation_id": ORG}, json=csv), 400)
        assert_error_envelope(await http.request("PUT", f"/v1/exports/{export_id}", json={"query_id": "999999"}), 400)
        assert_error_envelope(await http.request("PUT", "/v1/exports/424242", json={"name": "x"}), 404)
        assert sim.stats.exports_created == 1


# -- queries ----------------------------------------------------------------------------------
async def test_query_create_and_get(session: aiohttp.ClientSession) -> None:
    """A created OTQL query gets a string id and reads back in its datamart only."""
    async with Simulator(sim_config()) as sim:
        http = Http(sim, session)
        text = 'SELECT {emails {id}} FROM UserPoint WHERE segments {id="123"}'
        body = {"query_text": text, "datamart_id": DATAMART, "query_language": "OTQL"}
        created = await http.post(f"/v1/datamarts/{DATAMART}/queries", json=body)
        assert created.status == 200
        query_id = created.json()["data"]["id"]
        assert isinstance(query_id, str)
        got = (await http.get(f"/v1/datamarts/{DATAMART}/queries/{query_id}")).json()["data"]
        assert (got["id"], got["query_text"], got["datamart_id"], got["query_language"]) == (
            query_id,
            text,
            DATAMART,
            "OTQL",
        )
        assert_error_envelope(await http.get(f"/v1/datamarts/9/queries/{query_id}"), 404)
        assert_error_envelope(await http.get(f"/v1/datamarts/{DATAMART}/queries/1"), 404)
        sql = {**body, "query_language": "SQL"}
        assert_error_envelope(await http.post(f"/v1/datamarts/{DATAMART}/queries", json=sql), 400)
        assert_error_envelope(await http.post(f"/v1/datamarts/{DATAMART}/queries", json={}), 400)
        assert sim.stats.queries_created == 1


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("SELECT {id} FROM UserPoint", 200),
        ('SELECT {emails {id}} FROM UserPoint WHERE segments {id="123"}', 200),
        ("SELEC {id} FROM UserPoint", 400),
        ("SELECT {id FROM UserPoint", 400),
        ("", 400),
    ],
)
async def test_query_check(session: aiohttp.ClientSession, text: str, status: int) -> None:
    """A well-formed OTQL query checks out (200); a malformed one gets the 400 error envelope."""
    async with Simulator(sim_config()) as sim:
        http = Http(sim, session)
        answer = await http.post(
            f"/v1/datamarts/{DATAMART}/query_executions/otql",
            data=text.encode(),
            headers={"Content-Type": "text/plain; charset=utf-8"},
        )
        if status == 200:
            assert answer.status == 200
            assert answer.json()["status"] == "ok"
        else:
            env = assert_error_envelope(answer, 400)
            assert "OTQL" in env["error"]


# -- executions -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"a": 1}', "application/json"),
        (b"[]", "application/json"),
        (b"null", "application/json"),
        (b"", "application/json"),
        (b"{not json", "application/json"),
        (b"{}", "text/plain"),
    ],
)
async def test_execution_create_demands_exactly_an_empty_json_object(
    session: aiohttp.ClientSession, body: bytes, content_type: str
) -> None:
    """Creating an execution with anything but a JSON `{}` body is a 400 and creates nothing."""
    async with Simulator(sim_config(fast_spec("9879"))) as sim:
        http = Http(sim, session)
        answer = await http.post("/v1/exports/9879/executions", data=body, headers={"Content-Type": content_type})
        assert_error_envelope(answer, 400)
        assert sim.stats.executions_created["9879"] == 0
        assert (await http.executions("9879"))["data"] == []


async def test_execution_create_answers_a_pending_execution(session: aiohttp.ClientSession) -> None:
    """A new execution is PENDING with the reference's fields, string id and epoch-ms creation date."""
    async with Simulator(sim_config(fast_spec("9879", pending_s=60))) as sim:
        http = Http(sim, session)
        before = int(time.time() * 1000)
        exe = await http.new_execution("9879")
        assert exe["status"] == "PENDING"
        assert isinstance(exe["id"], str) and exe["id"].isdigit()
        assert before - 1000 <= exe["creation_date"] <= int(time.time() * 1000) + 1000
        assert exe["organisation_id"] == ORG
        assert exe["result"] is None and exe["num_tasks"] is None and exe["start_date"] is None
        reference_keys = {
            "parameters", "organisation_id", "user_id", "result", "error", "id", "status", "creation_date",
            "start_date", "duration", "cancel_status", "debug", "is_retryable", "permalink_uri", "num_tasks",
            "completed_tasks", "erroneous_tasks", "retry_count", "job_type",
        }  # fmt: skip
        assert set(exe) == reference_keys
        assert sim.stats.executions_created["9879"] == 1


async def test_executions_list_newest_first_ten_per_page(session: aiohttp.ClientSession) -> None:
    """The executions list shows the newest first, 10 per page by default, and pages on."""
    async with Simulator(sim_config(fast_spec("9879", pending_s=60))) as sim:
        http = Http(sim, session)
        created = [(await http.new_execution("9879"))["id"] for _ in range(12)]
        newest_first = list(reversed(created))
        first = await http.executions("9879")
        assert [e["id"] for e in first["data"]] == newest_first[:10]
        assert (first["count"], first["total"], first["first_result"], first["max_results"]) == (10, 12, 0, 10)
        second = await http.executions("9879", first_result=10)
        assert [e["id"] for e in second["data"]] == newest_first[10:]
        assert (second["count"], second["total"], second["first_result"]) == (2, 12, 10)
        small = await http.executions("9879", first_result=3, max_results=4)
        assert [e["id"] for e in small["data"]] == newest_first[3:7]
        assert sim.stats.executions_created["9879"] == 12
        assert sim.stats.max_in_flight == 12


async def test_lifecycle_pending_running_succeeded(session: aiohttp.ClientSession) -> None:
    """An execution goes PENDING → RUNNING with completed_tasks rising → SUCCEEDED with its output file."""
    spec = fast_spec("9879", pending_s=10, running_s=100, num_tasks=1000, erroneous_tasks=7)
    async with Simulator(sim_config(spec)) as sim:
        http = Http(sim, session)
        exe_id = (await http.new_execution("9879"))["id"]
        pending = await http.execution("9879", exe_id)
        assert pending["status"] == "PENDING" and pending["num_tasks"] is None and pending["start_date"] is None

        age(sim, exe_id, 10 + 25)
        early = await http.execution("9879", exe_id)
        age(sim, exe_id, 10 + 75)
        late = await http.execution("9879", exe_id)
        for running in (early, late):
            assert running["status"] == "RUNNING"
            assert running["num_tasks"] == 1000
            assert running["start_date"] == running["creation_date"] + 10_000
            assert running["result"] is None
        assert 240 <= early["completed_tasks"] <= 260
        assert 740 <= late["completed_tasks"] <= 760

        age(sim, exe_id, 10 + 100 + 1)
        done = await http.execution("9879", exe_id)
        assert done["status"] == "SUCCEEDED"
        assert done["result"] == {"output_files": ["export"]}
        assert (done["num_tasks"], done["completed_tasks"], done["erroneous_tasks"]) == (1000, 993, 7)
        assert done["duration"] == 110_000
        assert done["end_date"] == done["creation_date"] + 110_000
        assert done["error"] is None


async def test_lifecycle_runs_on_its_own_in_real_time(session: aiohttp.ClientSession) -> None:
    """Polling a fast execution sees its statuses in order and its progress never going back."""
    async with Simulator(sim_config(fast_spec("9879", pending_s=0.03, running_s=0.1))) as sim:
        http = Http(sim, session)
        exe_id = (await http.new_execution("9879"))["id"]
        statuses: list[str] = []
        progress: list[int] = []

        async def finished() -> bool:
            item = await http.execution("9879", exe_id)
            statuses.append(item["status"])
            if item["completed_tasks"] is not None:
                progress.append(item["completed_tasks"])
            return bool(item["status"] == "SUCCEEDED")

        await wait_until(finished, what="SUCCEEDED")
        order = {"PENDING": 0, "RUNNING": 1, "SUCCEEDED": 2}
        assert [order[s] for s in statuses] == sorted(order[s] for s in statuses)
        assert progress == sorted(progress)
        assert sim.stats.polls[exe_id] == len(statuses)


async def test_time_scale_shortens_lifecycles(session: aiohttp.ClientSession) -> None:
    """time_scale multiplies every duration: a 100-second execution ends in milliseconds at 0.0001."""
    spec = fast_spec("9879", pending_s=50, running_s=50)
    async with Simulator(sim_config(spec, time_scale=0.0001)) as sim:
        http = Http(sim, session)
        exe_id = (await http.new_execution("9879"))["id"]
        done = await http.wait_final("9879", exe_id)
        assert done["status"] == "SUCCEEDED"


async def test_fail_first_and_always_fail(session: aiohttp.ClientSession) -> None:
    """fail_first k fails the first k executions then succeeds; always_fail fails every one."""
    async with Simulator(sim_config(fast_spec("1", fail_first=2), fast_spec("2", always_fail=True))) as sim:
        http = Http(sim, session)
        outcomes: dict[str, list[str]] = {"1": [], "2": []}
        for export_id in ("1", "2"):
            for _ in range(3):
                exe_id = (await http.new_execution(export_id))["id"]
                done = await http.wait_final(export_id, exe_id)
                outcomes[export_id].append(done["status"])
                if done["status"] == "FAILED":
                    assert done["result"] is None
                    assert "simulated failure" in done["error"]["message"]
                    assert done["erroneous_tasks"] > 0
                    assert done["completed_tasks"] + done["erroneous_tasks"] == done["num_tasks"]
        assert outcomes == {"1": ["FAILED", "FAILED", "SUCCEEDED"], "2": ["FAILED", "FAILED", "FAILED"]}


async def test_stall_and_custom_running_status(session: aiohttp.ClientSession) -> None:
    """A stalled execution stays RUNNING with frozen progress; running_status shows any status string."""
    specs = (fast_spec("1", stall=True), fast_spec("2", running_status="QUANTUM", pending_s=0, running_s=100))
    async with Simulator(sim_config(*specs)) as sim:
        http = Http(sim, session)
        stalled = (await http.new_execution("1"))["id"]
        age(sim, stalled, 1000)
        item = await http.execution("1", stalled)
        assert (item["status"], item["completed_tasks"]) == ("RUNNING", 300)
        age(sim, stalled, 5000)
        assert (await http.execution("1", stalled))["completed_tasks"] == 300
        odd = (await http.new_execution("2"))["id"]
        age(sim, odd, 1)
        assert (await http.execution("2", odd))["status"] == "QUANTUM"


async def test_cancel_execution(session: aiohttp.ClientSession) -> None:
    """POST .../action {"action": "CANCEL"} cancels a running execution; another body is a 400."""
    async with Simulator(sim_config(fast_spec("1", pending_s=60))) as sim:
        http = Http(sim, session)
        exe_id = (await http.new_execution("1"))["id"]
        path = f"/v1/exports/1/executions/{exe_id}/action"
        assert_error_envelope(await http.post(path, json={"action": "STOP"}), 400)
        answer = await http.post(path, json={"action": "CANCEL"})
        assert answer.status == 200
        assert answer.json()["data"]["status"] == "CANCELED"
        assert (await http.execution("1", exe_id))["status"] == "CANCELED"
        assert sim.stats.cancels == 1
        assert sim.stats.in_flight == 0
        assert_error_envelope(await http.post("/v1/exports/1/executions/5/action", json={"action": "CANCEL"}), 404)


# -- result files -----------------------------------------------------------------------------
async def succeeded(http: Http, export_id: str) -> str:
    exe_id: str = (await http.new_execution(export_id))["id"]
    done = await http.wait_final(export_id, exe_id)
    assert done["status"] == "SUCCEEDED"
    return exe_id


async def test_result_download_by_path_and_data_file_is_byte_exact(session: aiohttp.ClientSession) -> None:
    """The result file, by the path form and by data_file export.data, is exactly the spec's bytes."""
    spec = fast_spec("9879", size_bytes=BLOCK + 4321, shape="user", seed=2, invalid_every=300, blank_every=70)
    async with Simulator(sim_config(spec, chunk_bytes=100_000)) as sim:
        http = Http(sim, session)
        exe_id = await succeeded(http, "9879")
        expected = spec.result().read_all()
        by_path = await http.get(file_path("9879", exe_id))
        assert by_path.status == 200
        assert int(by_path.headers["Content-Length"]) == len(expected)
        assert by_path.headers["Accept-Ranges"] == "bytes"
        assert by_path.body == expected
        assert hashlib.sha256(by_path.body).hexdigest() == spec.result().sha256()
        by_uri = await http.get("/v1/data_file/data", params=data_file_params(ORG, exe_id, "data"))
        assert by_uri.status == 200
        assert by_uri.body == expected
        assert sim.stats.downloads_started[exe_id] == sim.stats.downloads_completed[exe_id] == 2
        assert sim.stats.bytes_served == 2 * len(expected)


async def test_empty_result_file_downloads_as_empty(session: aiohttp.ClientSession) -> None:
    """An export whose result is empty serves zero bytes with a 200."""
    async with Simulator(sim_config(fast_spec("1", size_bytes=0))) as sim:
        http = Http(sim, session)
        exe_id = await succeeded(http, "1")
        answer = await http.get(file_path("1", exe_id))
        assert (answer.status, answer.body) == (200, b"")


async def test_no_result_before_success_or_for_a_failed_execution(session: aiohttp.ClientSession) -> None:
    """The result file of a pending or failed execution is a 404 envelope, by both routes."""
    async with Simulator(sim_config(fast_spec("1", pending_s=60), fast_spec("2", always_fail=True))) as sim:
        http = Http(sim, session)
        pending = (await http.new_execution("1"))["id"]
        assert_error_envelope(await http.get(file_path("1", pending)), 404)
        failed = (await http.new_execution("2"))["id"]
        await http.wait_final("2", failed)
        assert_error_envelope(await http.get(file_path("2", failed)), 404)
        assert_error_envelope(await http.get("/v1/data_file/data", params=data_file_params(ORG, failed, "data")), 404)


@pytest.mark.parametrize("start", [1, 1000, BLOCK - 1, BLOCK, BLOCK + 4000])
async def test_range_request_answers_206_from_the_offset(session: aiohttp.ClientSession, start: int) -> None:
    """`Range: bytes=N-` answers 206 with the right Content-Range and exactly the bytes from N."""
    spec = fast_spec("1", size_bytes=BLOCK + 5000)
    async with Simulator(sim_config(spec)) as sim:
        http = Http(sim, session)
        exe_id = await succeeded(http, "1")
        expected = spec.result().read_all()
        size = len(expected)
        answer = await http.get(file_path("1", exe_id), headers={"Range": f"bytes={start}-"})
        assert answer.status == 206
        assert answer.headers["Content-Range"] == f"bytes {start}-{size - 1}/{size}"
        assert int(answer.headers["Content-Length"]) == size - start
        assert answer.body == expected[start:]
        assert sim.stats.range_starts == [(exe_id, start)]
        by_uri = await http.get(
            "/v1/data_file/data", params=data_file_params(ORG, exe_id, "data"), headers={"Range": f"bytes={start}-"}
        )
        assert (by_uri.status, by_uri.body) == (206, expected[start:])


@pytest.mark.parametrize("past_end", [0, 1, 1000])
async def test_range_at_or_past_the_end_is_unsatisfiable(session: aiohttp.ClientSession, past_end: int) -> None:
    """A Range starting at or past the end answers 416 with `Content-Range: bytes */SIZE`."""
    spec = fast_spec("1", size_bytes=5000)
    async with Simulator(sim_config(spec)) as sim:
        http = Http(sim, session)
        exe_id = await succeeded(http, "1")
        size = spec.result().size
        answer = await http.get(file_path("1", exe_id), headers={"Range": f"bytes={size + past_end}-"})
        assert_error_envelope(answer, 416)
        assert answer.headers["Content-Range"] == f"bytes */{size}"


async def test_ignore_range_answers_the_whole_file(session: aiohttp.ClientSession) -> None:
    """With ignore_range the server answers a Range request with 200 and the whole file."""
    spec = fast_spec("1", size_bytes=30_000)
    async with Simulator(sim_config(spec, faults=Faults(ignore_range=True))) as sim:
        http = Http(sim, session)
        exe_id = await succeeded(http, "1")
        answer = await http.get(file_path("1", exe_id), headers={"Range": "bytes=100-"})
        assert answer.status == 200
        assert "Content-Range" not in answer.headers
        assert answer.body == spec.result().read_all()
        assert sim.stats.range_starts == []


async def test_error_file_of_a_failed_execution(session: aiohttp.ClientSession) -> None:
    """A FAILED execution has a text error file via data_file export.error; a succeeded one has none."""
    async with Simulator(sim_config(fast_spec("1", fail_first=1))) as sim:
        http = Http(sim, session)
        failed = (await http.new_execution("1"))["id"]
        assert (await http.wait_final("1", failed))["status"] == "FAILED"
        answer = await http.get("/v1/data_file/data", params=data_file_params(ORG, failed, "error"))
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        assert f"Execution {failed} of export 1 failed".encode() in answer.body
        ok = await succeeded(http, "1")
        assert_error_envelope(await http.get("/v1/data_file/data", params=data_file_params(ORG, ok, "error")), 404)
        other_org = data_file_params("999", failed, "error")
        assert_error_envelope(await http.get("/v1/data_file/data", params=other_org), 404)
        bad_uri = {"uri": f"mics://data_file/tenants/{ORG}/jobs/executions/{failed}/result/export.csv"}
        assert_error_envelope(await http.get("/v1/data_file/data", params=bad_uri), 400)
        assert_error_envelope(await http.get("/v1/data_file/data"), 400)


# -- faults -------------------------------------------------------------------------------------
async def test_fault_429_with_and_without_retry_after(session: aiohttp.ClientSession) -> None:
    """rate_429 answers 429 envelopes with a Retry-After header, or none when retry_after_s is None."""
    for retry_after, header in ((0.01, "0.01"), (2.0, "2"), (None, None)):
        faults = Faults(rate_429=1.0, retry_after_s=retry_after)
        async with Simulator(sim_config(fast_spec("1"), faults=faults)) as sim:
            http = Http(sim, session)
            answer = await http.get("/v1/exports", params={"organisation_id": ORG})
            assert_error_envelope(answer, 429)
            assert answer.headers.get("Retry-After") == header
            assert sim.stats.faults["429"] == 1
            assert sim.stats.requests["exports.list"] == 1


async def test_fault_5xx_comes_before_authentication(session: aiohttp.ClientSession) -> None:
    """rate_5xx answers 500/502/503 error envelopes, even to a request with a bad token."""
    async with Simulator(sim_config(fast_spec("1"), faults=Faults(rate_5xx=1.0, seed=3))) as sim:
        http = Http(sim, session)
        codes = set()
        for _ in range(20):
            answer = await http.get("/v1/exports", params={"organisation_id": ORG}, auth="nope")
            assert answer.status in (500, 502, 503)
            assert_error_envelope(answer, answer.status)
            codes.add(answer.status)
        assert len(codes) > 1
        assert sim.stats.faults["5xx"] == 20


async def test_fault_rates_are_fractions_and_seeded(session: aiohttp.ClientSession) -> None:
    """With rates 0.3 and 0.2 about half the requests fail, and the same seed fails the same ones."""
    runs = []
    for _ in range(2):
        faults = Faults(rate_429=0.3, rate_5xx=0.2, seed=11, retry_after_s=0.01)
        async with Simulator(sim_config(fast_spec("1"), faults=faults)) as sim:
            http = Http(sim, session)
            runs.append([(await http.get("/v1/exports", params={"organisation_id": ORG})).status for _ in range(200)])
            assert sim.stats.faults["429"] == runs[-1].count(429)
            assert sim.stats.faults["5xx"] == sum(1 for s in runs[-1] if s >= 500)
    assert runs[0] == runs[1]
    assert 30 <= runs[0].count(429) <= 90
    assert 15 <= sum(1 for s in runs[0] if s >= 500) <= 70
    assert 60 <= runs[0].count(200) <= 140


@pytest.mark.parametrize("mode", ["reset", "close"])
async def test_fault_cuts_the_first_k_downloads(session: aiohttp.ClientSession, mode: str) -> None:
    """reset_after_bytes cuts the first k downloads after N bytes (short of Content-Length); later ones are whole."""
    spec = fast_spec("1", size_bytes=200_000)
    faults = Faults(reset_after_bytes=30_000, reset_first_k=2, reset_mode=mode)
    async with Simulator(sim_config(spec, faults=faults, chunk_bytes=8192)) as sim:
        http = Http(sim, session)
        exe_id = await succeeded(http, "1")
        expected = spec.result().read_all()
        for _ in range(2):
            received = bytearray()
            with pytest.raises(aiohttp.ClientPayloadError):
                async with session.get(sim.url + file_path("1", exe_id), headers={"Authorization": TOKEN}) as resp:
                    assert int(resp.headers["Content-Length"]) == len(expected)
                    async for chunk in resp.content.iter_chunked(65536):
                        received += chunk
            assert 0 < len(received) <= 30_000
            assert bytes(received) == expected[: len(received)]
        whole = await http.get(file_path("1", exe_id))
        assert whole.body == expected
        assert sim.stats.faults["reset"] == 2
        assert sim.stats.downloads_started[exe_id] == 3
        assert sim.stats.downloads_completed[exe_id] == 1


async def test_fault_slow_body_caps_the_download_rate(session: aiohttp.ClientSession) -> None:
    """slow_body_bps makes a download take at least size / rate seconds."""
    spec, rate, chunk = fast_spec("1", size_bytes=40_000), 400_000, 4096
    async with Simulator(sim_config(spec, faults=Faults(slow_body_bps=rate), chunk_bytes=chunk)) as sim:
        http = Http(sim, session)
        exe_id = await succeeded(http, "1")
        started = time.monotonic()
        answer = await http.get(file_path("1", exe_id))
        assert answer.body == spec.result().read_all()
        # The pause follows each write, so the last chunk arrives before its own pause.
        assert time.monotonic() - started >= (len(answer.body) - chunk) / rate * 0.95


# -- accounting -------------------------------------------------------------------------------
async def test_accounting_counts_what_the_client_did(session: aiohttp.ClientSession) -> None:
    """The stats count executions created, polls, requests per route and the most executions in flight."""
    async with Simulator(sim_config(fast_spec("1"), fast_spec("2"))) as sim:
        http = Http(sim, session)
        a = (await http.new_execution("1"))["id"]
        b = (await http.new_execution("1"))["id"]
        c = (await http.new_execution("2"))["id"]
        assert (sim.stats.in_flight, sim.stats.max_in_flight) == (3, 3)
        for exe_id, export_id in ((a, "1"), (b, "1"), (c, "2")):
            await http.wait_final(export_id, exe_id)
            answer = await http.get(file_path(export_id, exe_id))
            assert answer.status == 200
        assert sim.stats.in_flight == 0  # downloaded executions leave the in-flight count
        d = (await http.new_execution("2"))["id"]
        assert (sim.stats.in_flight, sim.stats.max_in_flight) == (1, 3)
        assert dict(sim.stats.executions_created) == {"1": 2, "2": 2}
        polls_before = sim.stats.polls[d]
        await http.executions("2")
        assert sim.stats.polls[d] == polls_before + 1
        assert sim.stats.polls[c] > 0
        await http.get("/v1/exports", params={"organisation_id": ORG})
        await http.get("/v1/exports/1", params={"organisation_id": ORG})
        requests_seen = sim.stats.requests
        assert requests_seen["executions.create"] == 4
        assert requests_seen["executions.file"] == 3
        assert requests_seen["exports.list"] == 1
        assert requests_seen["exports.get"] == 1
        assert requests_seen["executions.list"] == sum(sim.stats.list_requests.values())
        assert sim.stats.total_requests == sum(requests_seen.values())


async def test_requests_with_a_bad_token_are_counted_but_change_nothing(session: aiohttp.ClientSession) -> None:
    """A refused request is counted per route and creates no execution."""
    async with Simulator(sim_config(fast_spec("1"))) as sim:
        http = Http(sim, session)
        answer = await http.post("/v1/exports/1/executions", json={}, auth="bad")
        assert_error_envelope(answer, 401)
        assert sim.stats.requests["executions.create"] == 1
        assert sim.stats.executions_created["1"] == 0


def test_simulator_thread_serves_synchronous_clients() -> None:
    """SimulatorThread serves plain blocking HTTP from its own thread and shuts down cleanly."""
    with SimulatorThread(sim_config(fast_spec("9879"))) as sim:
        answer = requests.get(
            f"{sim.url}/v1/exports", params={"organisation_id": ORG}, headers={"Authorization": sim.token}, timeout=10
        )
        assert answer.status_code == 200
        assert [e["id"] for e in answer.json()["data"]] == ["9879"]
        assert sim.stats.requests["exports.list"] == 1
        url = sim.url
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/v1/exports", timeout=2)
