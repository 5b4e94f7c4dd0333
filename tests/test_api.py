"""Tests for ApiClient against the real simulator: endpoints, errors, retries, resumed downloads.

Every test here runs with all loggers (aiohttp's included) captured at DEBUG, and checks at
the end that the distinctive test token never reached a log line; every exception a test
provokes is checked the same way (message, repr, traceback, chained causes).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from conftest import (
    DATAMART,
    FAST_RETRY,
    ORG,
    TOKEN,
    assert_no_token,
    fast_spec,
    sim_config,
    wait_until,
)
from hostile import (
    Forward,
    Handler,
    HostileServer,
    Request,
    Wire,
    html_wire,
    is_create,
    is_error_file,
    is_executions_list,
    json_wire,
    passthrough,
)

from orchestrator.api import ApiClient
from orchestrator.errors import (
    ApiError,
    AuthError,
    IncompleteBodyError,
    MalformedResponseError,
    NotFoundError,
    PagingError,
    TransientApiError,
    TransportError,
)
from orchestrator.models import Execution, ExecutionStatus, Export, Page, QueryCheck
from orchestrator.retry import PollSchedule, RetryPolicy
from orchestrator.simulator import Faults, Simulator
from orchestrator.stream import ContentChangedError
from orchestrator.transport import Secret, Throttle, error_from

pytestmark = pytest.mark.anyio

LOGGERS = ("", "orchestrator", "aiohttp", "aiohttp.client", "aiohttp.server", "aiohttp.web", "asyncio")


@pytest.fixture(autouse=True)
def token_never_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Capture every logger at DEBUG; after the test, no record may contain the token."""
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name or None)
    yield
    records = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
    for record in records:
        assert TOKEN not in record.getMessage(), f"token in a log line of {record.name}"
        assert TOKEN not in repr(record.__dict__), f"token in a log record of {record.name}"
        if record.exc_info and record.exc_info[1] is not None:
            assert_no_token(record.exc_info[1])


def client(sim: Simulator, **kw: Any) -> ApiClient:
    kw.setdefault("retry", FAST_RETRY)
    return ApiClient(sim.url, TOKEN, **kw)


async def finished(api: ApiClient, export_id: str, execution_id: str) -> Execution:
    """Poll the list until the execution is final."""

    async def final() -> Execution | None:
        found = await api.find_execution(export_id, execution_id)
        return found if found is not None and found.is_final else None

    result: Execution = await wait_until(final, what=f"execution {execution_id} to finish")
    return result


async def succeeded(api: ApiClient, export_id: str) -> str:
    execution = await api.create_execution(export_id)
    done = await finished(api, export_id, execution.id)
    assert done.status is ExecutionStatus.SUCCEEDED
    return execution.id


async def collect(stream: Any) -> bytes:
    out = bytearray()
    async for chunk in stream:
        out += chunk
    return bytes(out)


# -- exports and queries -------------------------------------------------------------------------
async def test_list_exports_pages_through_everything() -> None:
    """list_exports returns every export of the organisation however many pages it takes."""
    specs = [fast_spec(str(300 + i), name=f"e{i}") for i in range(23)]
    async with Simulator(sim_config(*specs, fast_spec("999", organisation_id="7"))) as sim, client(sim) as api:
        exports = await api.list_exports(ORG, page_size=5)
        assert [e.id for e in exports] == [s.id for s in specs]
        assert all(isinstance(e, Export) and e.organisation_id == ORG for e in exports)
        assert exports[3].name == "e3" and exports[3].query_id == "65987" and exports[3].datamart_id == DATAMART
        assert sim.stats.requests["exports.list"] == 5  # 5 + 5 + 5 + 5 + 3: no extra empty page
        assert [e.id async for e in api.iter_exports("7", page_size=5)] == ["999"]


async def test_get_export_and_its_404s() -> None:
    """get_export returns the definition; an unknown id or another organisation is NotFoundError."""
    async with Simulator(sim_config(fast_spec("9879", name="fb", query_id="65987"))) as sim, client(sim) as api:
        export = await api.get_export("9879", ORG)
        assert export == Export("9879", "fb", ORG, "65987", DATAMART, "QUERY", "JSON")
        for export_id, org in (("1234", ORG), ("9879", "1")):
            with pytest.raises(NotFoundError) as caught:
                await api.get_export(export_id, org)
            assert caught.value.status == 404
            assert caught.value.error == "Resource Not Found"
            uuid.UUID(caught.value.error_id or "")
            assert caught.value.error_id is not None and caught.value.error_id in str(caught.value)
            assert_no_token(caught.value)
        assert sim.stats.requests["exports.get"] == 3  # a 404 is not retried


async def test_create_query_export_and_update() -> None:
    """A query and an export on it can be created, read back and moved to another query."""
    async with Simulator(sim_config()) as sim, client(sim) as api:
        text = 'SELECT {emails {id}} FROM UserPoint WHERE segments {id="123"}'
        query_id = await api.create_query(DATAMART, text)
        query = await api.get_query(DATAMART, query_id)
        assert (query["id"], query["query_text"], query["datamart_id"]) == (query_id, text, DATAMART)
        export = await api.create_export(ORG, "active-emails", query_id)
        assert (export.name, export.query_id, export.datamart_id, export.organisation_id) == (
            "active-emails",
            query_id,
            DATAMART,
            ORG,
        )
        assert await api.get_export(export.id, ORG) == export
        other = await api.create_query(DATAMART, "SELECT {id} FROM UserPoint")
        moved = await api.update_export(export, query_id=other)
        assert (moved.id, moved.name, moved.query_id) == (export.id, "active-emails", other)
        assert (await api.get_export(export.id, ORG)).query_id == other
        renamed = await api.update_export(moved, name="renamed")
        assert (renamed.name, renamed.query_id) == ("renamed", other)
        assert (sim.stats.queries_created, sim.stats.exports_created, sim.stats.exports_updated) == (2, 1, 2)
        with pytest.raises(NotFoundError) as caught:
            await api.get_query(DATAMART, "1")
        assert_no_token(caught.value)


async def test_check_query_good_and_bad() -> None:
    """check_query uses query_check/otql (never runs the query): VALID, or the platform's message and position."""
    async with Simulator(sim_config()) as sim, client(sim) as api:
        good = await api.check_query(DATAMART, "SELECT {id} FROM UserPoint")
        assert good == QueryCheck("VALID") and good.is_valid
        bad = await api.check_query(DATAMART, "SELEC {id FROM UserPoint")
        assert not bad.is_valid and bad.type == "PARSING_ERROR"
        assert bad.message == "mismatched input: expected SELECT ... FROM ..."
        assert bad.position == "row 1, col 1"
        assert bad.describe() == "PARSING_ERROR: mismatched input: expected SELECT ... FROM ... (at row 1, col 1)"
        unbalanced = await api.check_query(DATAMART, "SELECT {id FROM UserPoint")
        assert (unbalanced.type, unbalanced.message, unbalanced.position) == (
            "PARSING_ERROR",
            "unbalanced braces",
            "row 1, col 8",
        )
        assert sim.stats.requests["queries.check"] == 3
        assert sim.stats.requests["queries.run"] == 0  # checking never runs the query


async def test_check_query_refused_by_the_api_keeps_status_code_and_id() -> None:
    """A 4xx answer to the check is an ApiError with the API's message, error_code and error_id, not retried."""
    async with Simulator(sim_config()) as sim, client(sim) as api:
        with pytest.raises(ApiError) as caught:
            await api.check_query(DATAMART, None)  # type: ignore[arg-type]
        exc = caught.value
        assert type(exc) is ApiError and exc.status == 400
        uuid.UUID(exc.error_id or "")
        assert exc.error is not None and exc.error in str(exc)
        assert exc.error_id is not None and exc.error_id in str(exc)
        assert_no_token(exc)
        assert sim.stats.requests["queries.check"] == 1  # a 400 is final: no retry


# -- executions ----------------------------------------------------------------------------------
async def test_create_execution_and_list_pages() -> None:
    """create_execution starts a PENDING execution; list_executions pages newest first as Execution."""
    async with Simulator(sim_config(fast_spec("1", pending_s=60))) as sim, client(sim) as api:
        created = [await api.create_execution("1") for _ in range(13)]
        assert all(e.status is ExecutionStatus.PENDING and not e.is_final for e in created)
        assert sim.stats.executions_created["1"] == 13
        newest_first = [e.id for e in reversed(created)]
        pages = [await api.list_executions("1", first, 5) for first in (0, 5, 10)]
        assert all(isinstance(p, Page) for p in pages)
        assert [e.id for p in pages for e in p.items] == newest_first
        assert all(isinstance(e, Execution) for p in pages for e in p.items)
        assert [p.has_more for p in pages] == [True, True, False]
        assert [p.total for p in pages] == [13, 13, 13]
        default = await api.list_executions("1")
        assert [e.id for e in default.items] == newest_first[:10]
        assert [e.id async for e in api.iter_executions("1", page_size=4)] == newest_first


async def test_find_execution_beyond_the_first_page() -> None:
    """find_execution pages on until it finds an older execution, and says None for an unknown id."""
    async with Simulator(sim_config(fast_spec("1", pending_s=60))) as sim, client(sim) as api:
        oldest = await api.create_execution("1")
        for _ in range(14):
            await api.create_execution("1")
        lists_before = sim.stats.requests["executions.list"]
        found = await api.find_execution("1", oldest.id)
        assert found is not None and found.id == oldest.id
        assert sim.stats.requests["executions.list"] - lists_before == 2
        assert await api.find_execution("1", "123") is None


async def test_cancel_execution() -> None:
    """cancel_execution makes a running execution CANCELED, a final status."""
    async with Simulator(sim_config(fast_spec("1", pending_s=60))) as sim, client(sim) as api:
        execution = await api.create_execution("1")
        await api.cancel_execution("1", execution.id)
        shown = await api.find_execution("1", execution.id)
        assert shown is not None and shown.status is ExecutionStatus.CANCELED and shown.is_final
        assert not shown.is_success
        assert sim.stats.cancels == 1


async def test_unknown_status_is_kept_and_not_final() -> None:
    """An execution in a status the tool does not know is UNKNOWN, still in progress, with its raw value kept."""
    spec = fast_spec("1", running_status="QUANTUM", pending_s=0, running_s=100)
    async with Simulator(sim_config(spec)) as sim, client(sim) as api:
        execution = await api.create_execution("1")
        shown = await api.find_execution("1", execution.id)
        for e in (execution, shown):
            assert e is not None
            assert e.status is ExecutionStatus.UNKNOWN
            assert e.raw_status == "QUANTUM"
            assert not e.is_final and not e.is_success
            assert e.num_tasks == 1000


async def test_failed_execution_fields() -> None:
    """A FAILED execution is final, not a success, and carries the platform's error and task counts."""
    async with Simulator(sim_config(fast_spec("1", always_fail=True))) as sim, client(sim) as api:
        execution = await api.create_execution("1")
        done = await finished(api, "1", execution.id)
        assert done.status is ExecutionStatus.FAILED and done.is_final and not done.is_success
        assert done.erroneous_tasks and done.erroneous_tasks > 0
        assert done.output_files == ()
        assert "simulated failure" in done.error["message"]


# -- files ---------------------------------------------------------------------------------------
async def test_stream_result_is_byte_exact() -> None:
    """stream_result yields exactly the result file, in chunks no larger than asked."""
    spec = fast_spec("1", size_bytes=1_500_000, shape="user", invalid_every=100, blank_every=30)
    async with Simulator(sim_config(spec)) as sim, client(sim) as api:
        exe_id = await succeeded(api, "1")
        chunks = [c async for c in api.stream_result("1", exe_id, chunk_bytes=65536)]
        assert all(0 < len(c) <= 65536 for c in chunks)
        data = b"".join(chunks)
        assert data == spec.result().read_all()
        assert hashlib.sha256(data).hexdigest() == spec.result().sha256()
        assert sim.stats.range_starts == []


@pytest.mark.parametrize("start", [1, 12_345, 1 << 20])
async def test_stream_result_from_an_offset(start: int) -> None:
    """stream_result(start=N) asks for a Range and yields exactly the bytes from N."""
    spec = fast_spec("1", size_bytes=1_200_000)
    async with Simulator(sim_config(spec)) as sim, client(sim) as api:
        exe_id = await succeeded(api, "1")
        data = await collect(api.stream_result("1", exe_id, start=start))
        assert data == spec.result().read_all()[start:]
        assert sim.stats.range_starts == [(exe_id, start)]


async def test_stream_result_from_the_end_is_empty_and_past_the_end_is_an_error() -> None:
    """Resuming a complete file yields nothing; resuming past its end says the file is not the one the
    bytes had came from (ContentChangedError, naming both sizes: the download restarts), never a short file."""
    spec = fast_spec("1", size_bytes=10_000)
    async with Simulator(sim_config(spec)) as sim, client(sim) as api:
        exe_id = await succeeded(api, "1")
        size = spec.result().size
        assert await collect(api.stream_result("1", exe_id, start=size)) == b""
        with pytest.raises(ContentChangedError) as caught:
            await collect(api.stream_result("1", exe_id, start=size + 10))
        assert f"has {size} bytes, {size + 10} were had" in str(caught.value)
        assert_no_token(caught.value)


async def test_stream_result_of_unknown_or_unfinished_execution_is_not_found() -> None:
    """Downloading an unknown or still-pending execution's result is NotFoundError, not an empty file."""
    async with Simulator(sim_config(fast_spec("1", pending_s=60))) as sim, client(sim) as api:
        pending = await api.create_execution("1")
        for exe_id in ("424242", pending.id):
            with pytest.raises(NotFoundError) as caught:
                await collect(api.stream_result("1", exe_id))
            assert caught.value.status == 404 and caught.value.error_id
            assert_no_token(caught.value)


async def test_stream_data_file_is_byte_exact() -> None:
    """The data_file API serves the same bytes as the exports API, from any offset."""
    spec = fast_spec("1", size_bytes=300_000, shape="big")
    async with Simulator(sim_config(spec)) as sim, client(sim) as api:
        exe_id = await succeeded(api, "1")
        expected = spec.result().read_all()
        assert await collect(api.stream_data_file(ORG, exe_id)) == expected
        assert await collect(api.stream_data_file(ORG, exe_id, start=777)) == expected[777:]


async def test_fetch_error_file() -> None:
    """fetch_error_file returns a FAILED execution's error text, and None when there is none."""
    async with Simulator(sim_config(fast_spec("1", fail_first=1))) as sim, client(sim) as api:
        failed = await api.create_execution("1")
        assert (await finished(api, "1", failed.id)).status is ExecutionStatus.FAILED
        text = await api.fetch_error_file(ORG, failed.id)
        assert text is not None and f"Execution {failed.id} of export 1 failed".encode() in text
        assert await api.fetch_error_file(ORG, failed.id, limit_bytes=10) == text[:10]
        ok = await succeeded(api, "1")
        assert await api.fetch_error_file(ORG, ok) is None
        assert await api.fetch_error_file(ORG, "424242") is None


# -- errors and retries --------------------------------------------------------------------------
async def test_wrong_token_is_an_auth_error_without_retry() -> None:
    """A refused token raises AuthError (401, with error_id) after a single request."""
    async with Simulator(sim_config(fast_spec("1"), token="the-right-one")) as sim, client(sim) as api:
        with pytest.raises(AuthError) as caught:
            await api.list_exports(ORG)
        exc = caught.value
        assert exc.status == 401
        uuid.UUID(exc.error_id or "")
        assert "token" in str(exc)
        assert_no_token(exc)
        assert sim.stats.total_requests == 1
        with pytest.raises(AuthError) as caught:
            await collect(api.stream_result("1", "1"))
        assert_no_token(caught.value)
        with pytest.raises(AuthError) as caught:
            await api.create_execution("1")
        assert_no_token(caught.value)
        assert sim.stats.total_requests == 3
        assert sim.stats.executions_created["1"] == 0


async def test_429_with_retry_after_is_retried_until_success(caplog: pytest.LogCaptureFixture) -> None:
    """Calls answered 429 are retried and succeed; the retries are logged (without the token)."""
    faults = Faults(rate_429=0.5, retry_after_s=0.01, seed=1)
    async with (
        Simulator(sim_config(fast_spec("1"), faults=faults)) as sim,
        client(sim, retry=RetryPolicy(max_tries=30, base_s=0.001, max_wait_s=0.01)) as api,
    ):
        for _ in range(10):
            assert (await api.get_export("1", ORG)).id == "1"
        assert sim.stats.faults["429"] > 0
        assert sim.stats.requests["exports.get"] == 10 + sim.stats.faults["429"]
        assert api.throttle.throttled == sim.stats.faults["429"]
    assert any("retrying" in r.getMessage() for r in caplog.records)  # the capture sees the client's logs


async def test_retry_after_is_honoured() -> None:
    """After a 429 with Retry-After, the next try waits at least that long."""
    faults = Faults(rate_429=1.0, retry_after_s=0.2)
    async with (
        Simulator(sim_config(fast_spec("1"), faults=faults)) as sim,
        client(sim, retry=RetryPolicy(max_tries=2, base_s=0.001, max_wait_s=0.01)) as api,
    ):
        started = time.monotonic()
        with pytest.raises(TransientApiError) as caught:
            await api.get_export("1", ORG)
        assert time.monotonic() - started >= 0.19
        assert caught.value.status == 429
        assert caught.value.retry_after_s == 0.2
        assert_no_token(caught.value)
        assert sim.stats.requests["exports.get"] == 2


async def test_5xx_is_retried_until_success() -> None:
    """Reads answered 500/502/503 are retried until they succeed."""
    faults = Faults(rate_5xx=0.5, seed=1)
    async with (
        Simulator(sim_config(fast_spec("1", pending_s=60), faults=faults)) as sim,
        client(sim, retry=RetryPolicy(max_tries=30, base_s=0.001, max_wait_s=0.01)) as api,
    ):
        for _ in range(5):
            assert len(await api.list_exports(ORG)) == 1
        assert await api.get_export("1", ORG) == Export("1", "export-1", ORG, "65987", DATAMART)
        assert sim.stats.faults["5xx"] > 0


async def test_create_is_retried_only_when_nothing_can_have_been_created() -> None:
    """create_execution retries a 429 but raises a 5xx at once: after a 5xx the execution may exist."""
    async with (
        Simulator(sim_config(fast_spec("1", pending_s=60), faults=Faults(rate_5xx=1.0))) as sim,
        client(sim) as api,
    ):
        with pytest.raises(TransientApiError) as caught:
            await api.create_execution("1")
        assert caught.value.status in (500, 502, 503)
        assert_no_token(caught.value)
        assert sim.stats.requests["executions.create"] == 1  # not retried blindly
    faults = Faults(rate_429=1.0, retry_after_s=0.001)
    async with Simulator(sim_config(fast_spec("1"), faults=faults)) as sim, client(sim) as api:
        with pytest.raises(TransientApiError) as caught:
            await api.create_execution("1")
        assert caught.value.status == 429
        assert sim.stats.requests["executions.create"] == FAST_RETRY.max_tries  # refused: safe to retry


@pytest.mark.parametrize(
    ("faults", "status"), [(Faults(rate_5xx=1.0), 500), (Faults(rate_429=1.0, retry_after_s=0.001), 429)]
)
async def test_retries_are_bounded_by_max_tries(faults: Faults, status: int) -> None:
    """When the API keeps failing, the call gives up with TransientApiError after exactly max_tries requests."""
    async with (
        Simulator(sim_config(fast_spec("1"), faults=faults)) as sim,
        client(sim, retry=RetryPolicy(max_tries=4, base_s=0.001, max_wait_s=0.01)) as api,
    ):
        with pytest.raises(TransientApiError) as caught:
            await api.get_export("1", ORG)
        assert caught.value.status == status or (status == 500 and caught.value.status in (500, 502, 503))
        assert_no_token(caught.value)
        assert sim.stats.requests["exports.get"] == 4
        with pytest.raises(TransientApiError) as caught:
            await collect(api.stream_result("1", "1"))
        assert_no_token(caught.value)
        assert sim.stats.requests["executions.file"] == 4


async def test_not_found_is_not_retried() -> None:
    """404 raises NotFoundError at once, on every kind of call."""
    async with Simulator(sim_config()) as sim, client(sim) as api:
        with pytest.raises(NotFoundError) as caught:
            await api.create_execution("5")
        assert_no_token(caught.value)
        with pytest.raises(NotFoundError) as caught:
            await api.list_executions("5")
        assert_no_token(caught.value)
        with pytest.raises(NotFoundError) as caught:
            await api.cancel_execution("5", "6")
        assert_no_token(caught.value)
        assert sim.stats.total_requests == 3


# -- resumed downloads ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["reset", "close"])
async def test_cut_download_resumes_at_the_right_offset(mode: str) -> None:
    """A body cut mid-way is resumed with a Range from the byte where it stopped; the result is byte-exact."""
    spec = fast_spec("1", size_bytes=400_000, seed=3)
    faults = Faults(reset_after_bytes=50_000, reset_first_k=1, reset_mode=mode)
    async with Simulator(sim_config(spec, faults=faults, chunk_bytes=16_384)) as sim, client(sim) as api:
        exe_id = await succeeded(api, "1")
        data = await collect(api.stream_result("1", exe_id))
        assert data == spec.result().read_all()
        assert sim.stats.faults["reset"] == 1
        # A clean close delivers every byte before the cut; a TCP reset may discard some of
        # them in flight, so the resume starts where the bytes that arrived end.
        [(resumed_id, resumed_at)] = sim.stats.range_starts
        assert resumed_id == exe_id
        assert resumed_at == 50_000 if mode == "close" else 0 < resumed_at <= 50_000
        assert sim.stats.downloads_started[exe_id] == 2
        assert sim.stats.downloads_completed[exe_id] == 1


async def test_download_cut_at_the_same_byte_again_and_again_gets_through() -> None:
    """A server that dies at the same byte for several downloads is retried from that byte until it serves the rest."""
    spec = fast_spec("1", size_bytes=200_000)
    faults = Faults(reset_after_bytes=30_000, reset_first_k=3, reset_mode="close")
    async with Simulator(sim_config(spec, faults=faults, chunk_bytes=10_000)) as sim, client(sim) as api:
        exe_id = await succeeded(api, "1")
        data = await collect(api.stream_data_file(ORG, exe_id))
        assert data == spec.result().read_all()
        assert sim.stats.range_starts == [(exe_id, 30_000)] * 3
        assert sim.stats.downloads_started[exe_id] == 4
        assert sim.stats.bytes_served == len(data)  # nothing was served twice


async def test_cut_download_with_server_ignoring_range_is_still_exact() -> None:
    """When the server answers a resume with the whole file (200), the bytes already had are skipped."""
    spec = fast_spec("1", size_bytes=300_000, shape="user")
    faults = Faults(reset_after_bytes=70_000, reset_first_k=1, ignore_range=True)
    async with Simulator(sim_config(spec, faults=faults, chunk_bytes=16_384)) as sim, client(sim) as api:
        exe_id = await succeeded(api, "1")
        data = await collect(api.stream_result("1", exe_id, chunk_bytes=8192))
        assert data == spec.result().read_all()
        assert sim.stats.downloads_started[exe_id] == 2
        assert sim.stats.range_starts == []  # the server ignored the Range it was sent
        assert sim.stats.bytes_served == 70_000 + len(data)
        tail = await collect(api.stream_result("1", exe_id, start=12_345))  # a fresh download from an offset
        assert tail == data[12_345:]


async def test_empty_result_streams_as_empty() -> None:
    """An export with an empty result streams zero bytes, successfully."""
    spec = fast_spec("1", size_bytes=0)
    async with Simulator(sim_config(spec)) as sim, client(sim) as api:
        exe_id = await succeeded(api, "1")
        assert await collect(api.stream_result("1", exe_id)) == b""
        assert sim.stats.downloads_completed[exe_id] == 1


async def test_download_that_never_progresses_fails_loudly() -> None:
    """A download cut before its first byte, again and again, fails after max_tries: never a silent short file."""
    spec = fast_spec("1", size_bytes=50_000)
    faults = Faults(reset_after_bytes=0, reset_first_k=100, reset_mode="close")
    retry = RetryPolicy(max_tries=3, base_s=0.001, max_wait_s=0.01)
    async with Simulator(sim_config(spec, faults=faults)) as sim, client(sim, retry=retry) as api:
        exe_id = await succeeded(api, "1")
        with pytest.raises(TransportError) as caught:
            await collect(api.stream_result("1", exe_id))
        assert isinstance(caught.value, IncompleteBodyError)
        assert "byte 0" in str(caught.value)
        assert_no_token(caught.value)
        assert sim.stats.downloads_started[exe_id] == 3


# -- throttle ------------------------------------------------------------------------------------
async def test_throttle_backs_off_on_429_and_recovers() -> None:
    """After 429s the client halves its requests-in-flight cap, then climbs back to the maximum with successes."""
    spec = fast_spec("1")
    limited_faults = Faults(rate_429=1.0, retry_after_s=0.01)
    async with Simulator(sim_config(spec, faults=limited_faults)) as limited, Simulator(sim_config(spec)) as healthy:
        retry = RetryPolicy(max_tries=3, base_s=0.001, max_wait_s=0.01)
        async with ApiClient(limited.url, TOKEN, retry=retry, max_requests_in_flight=8) as api:
            with pytest.raises(TransientApiError):
                await api.get_export("1", ORG)
            assert api.throttle.throttled == 3
            assert api.throttle.limit < api.throttle.max_in_flight
            assert api.throttle.limit == 1.0  # 8 → 4 → 2 → 1
            api.base_url = healthy.url  # the API is healthy again
            limits = []
            for _ in range(40):
                await api.get_export("1", ORG)
                limits.append(api.throttle.limit)
            assert limits == sorted(limits)
            assert limits[0] > 1.0
            assert api.throttle.limit == api.throttle.max_in_flight == 8
            assert api.throttle.throttled == 3
            assert api.throttle.in_flight == 0


# -- secrecy -------------------------------------------------------------------------------------
async def test_token_not_in_client_repr() -> None:
    """Neither the client's repr nor its attributes' reprs show the token."""
    async with Simulator(sim_config()) as sim, client(sim) as api:
        assert TOKEN not in repr(api)
        assert TOKEN not in str(api)
        assert TOKEN not in repr(api.__dict__)
        assert sim.url in repr(api)


# -- a hostile server in front of the simulator (issue 10) ---------------------------------------
@contextlib.asynccontextmanager
async def hostile(sim: Simulator, handler: Handler) -> AsyncIterator[HostileServer]:
    """The hostile proxy in front of ``sim`` on this test's event loop; a broken handler fails the test."""
    server = HostileServer(sim.url, handler)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
    assert not server.errors, f"the hostile handler failed: {server.errors[0]!r}"


def hostile_client(server: HostileServer, **kw: Any) -> ApiClient:
    kw.setdefault("retry", FAST_RETRY)
    return ApiClient(server.url, TOKEN, **kw)


def same_page(kind: str) -> Handler:
    """A list that ignores first_result: always the same five items, with a total far beyond."""

    async def handler(req: Request, forward: Forward) -> Wire:
        if req.method == "GET" and req.path.endswith(kind):
            items = [{"id": str(i), "name": f"e{i}", "status": "RUNNING"} for i in range(5)]
            return json_wire(200, {"status": "ok", "data": items, "count": 5, "total": 100_000, "first_result": 0})
        return await passthrough(req, forward)

    return handler


def endless(kind: str) -> Handler:
    """A list that honours first_result but never ends: new ids on every page, and "total": "lots"."""

    async def handler(req: Request, forward: Forward) -> Wire:
        if req.method == "GET" and req.path.endswith(kind):
            first, size = int(req.query["first_result"]), int(req.query["max_results"])
            items = [{"id": str(first + i), "name": "x", "status": "RUNNING"} for i in range(size)]
            return json_wire(200, {"status": "ok", "data": items, "total": "lots", "first_result": first})
        return await passthrough(req, forward)

    return handler


async def test_a_list_that_repeats_its_page_stops_at_the_second_page() -> None:
    """Exports and executions lists that ignore first_result stop after 2 pages with an error that says so."""
    for kind in ("/exports", "/executions"):
        async with (
            Simulator(sim_config(fast_spec("1"))) as sim,
            hostile(sim, same_page(kind)) as server,
            hostile_client(server) as api,
        ):
            with pytest.raises(PagingError) as caught:
                if kind == "/exports":
                    await api.list_exports(ORG, page_size=5)
                else:
                    await api.find_execution("1", "424242", page_size=5)
            assert "the API kept returning the same page" in str(caught.value)
            assert "stopped after 2 pages" in str(caught.value)
            assert isinstance(caught.value, ApiError)  # a job's error: the run handles it
            assert server.count(lambda r, kind=kind: r.path.endswith(kind)) == 2  # type: ignore[misc]


async def test_a_list_that_never_ends_stops_at_the_page_cap() -> None:
    """A list with ever new ids and "total": "lots" is read up to the cap (100 pages for find_execution), then stops."""
    async with (
        Simulator(sim_config(fast_spec("1"))) as sim,
        hostile(sim, endless("/executions")) as server,
        hostile_client(server) as api,
    ):
        with pytest.raises(PagingError) as caught:
            await api.find_execution("1", "not-there")
        assert "did not end after 100 pages" in str(caught.value)
        assert server.count(is_executions_list) == 100
    async with (
        Simulator(sim_config(fast_spec("1"))) as sim,
        hostile(sim, endless("/exports")) as server,
        hostile_client(server) as api,
    ):
        with pytest.raises(PagingError):
            _ = [e async for e in api.iter_exports(ORG, max_pages=7)]
        assert server.count(lambda r: r.path == "/v1/exports") == 7


async def test_total_that_is_not_a_number_pages_on_full_pages() -> None:
    """ "total": "lots" is read as no total: the list is still read whole, with no crash and no extra page."""

    async def lots(req: Request, forward: Forward) -> Wire:
        reply = await forward()
        if req.path == "/v1/exports":
            return reply.with_json({**reply.json(), "total": "lots", "count": None})
        return reply.wire()

    specs = [fast_spec(str(300 + i), name=f"e{i}") for i in range(23)]
    async with Simulator(sim_config(*specs)) as sim, hostile(sim, lots) as server, hostile_client(server) as api:
        assert [e.id for e in await api.list_exports(ORG, page_size=5)] == [s.id for s in specs]
        assert server.count(lambda r: r.path == "/v1/exports") == 5


def rewrite_data(path_end: str, change: Any, *, method: str = "GET", times: int = 1_000_000) -> Handler:
    """Forward, then replace the answer's ``data`` with ``change(data)`` (the first ``times`` answers)."""
    seen = 0

    async def handler(req: Request, forward: Forward) -> Wire:
        nonlocal seen
        reply = await forward()
        if reply.status == 200 and req.method == method and req.path.endswith(path_end) and seen < times:
            seen += 1
            doc = reply.json()
            return reply.with_json({**doc, "data": change(doc["data"])})
        return reply.wire()

    return handler


async def test_malformed_answers_are_retried_then_name_the_field() -> None:
    """data a list where an object belongs is retried max_tries times, then a MalformedResponseError naming data."""
    async with (
        Simulator(sim_config(fast_spec("1"))) as sim,
        hostile(sim, rewrite_data("/exports/1", lambda d: [d])) as server,
        hostile_client(server) as api,
    ):
        with pytest.raises(MalformedResponseError) as caught:
            await api.get_export("1", ORG)
        assert str(caught.value) == "GET /v1/exports/1: malformed answer (HTTP 200): data is a list, not an object"
        assert sim.stats.requests["exports.get"] == FAST_RETRY.max_tries


async def test_a_malformed_answer_once_is_retried_and_succeeds() -> None:
    """One unreadable answer (an item without id) is retried like a 5xx, and the next good one is used."""

    def drop_id(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in item.items() if k != "id"} for item in items]

    async with (
        Simulator(sim_config(fast_spec("1", pending_s=60))) as sim,
        hostile(sim, rewrite_data("/executions", drop_id, times=1)) as server,
        hostile_client(server) as api,
    ):
        created = await api.create_execution("1")
        found = await api.find_execution("1", created.id)
        assert found is not None and found.id == created.id
        assert server.count(is_executions_list) == 2


async def test_an_item_without_id_names_its_place_in_the_list() -> None:
    """A list whose item lacks an id fails, after retries, naming data[i].id and the request."""

    def drop_id(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in item.items() if k != "id"} for item in items]

    async with (
        Simulator(sim_config(fast_spec("1", pending_s=60))) as sim,
        hostile(sim, rewrite_data("/executions", drop_id)) as server,
        hostile_client(server) as api,
    ):
        created = await api.create_execution("1")
        with pytest.raises(MalformedResponseError) as caught:
            await api.find_execution("1", created.id)
        assert caught.value.field == "data[0].id"
        assert "GET /v1/exports/1/executions" in str(caught.value) and "data[0].id is missing" in str(caught.value)


async def test_loose_counters_and_errors_are_accepted() -> None:
    """Counters as strings ("12", "n/a", null) and error as an object are read without any error."""

    def loosen(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {**i, "num_tasks": "12", "completed_tasks": "n/a", "erroneous_tasks": None, "error": {"message": "m"}}
            for i in items
        ]

    async with (
        Simulator(sim_config(fast_spec("1", pending_s=60))) as sim,
        hostile(sim, rewrite_data("/executions", loosen)) as server,
        hostile_client(server) as api,
    ):
        created = await api.create_execution("1")
        found = await api.find_execution("1", created.id)
        assert found is not None
        assert (found.num_tasks, found.completed_tasks, found.erroneous_tasks, found.error_message) == (
            12,
            None,
            None,
            "m",
        )


async def test_a_create_answered_with_null_data_is_not_retried() -> None:
    """A create whose 200 answer has data: null raises at once (the execution exists): never a second POST."""
    async with (
        Simulator(sim_config(fast_spec("1", pending_s=60))) as sim,
        hostile(sim, rewrite_data("/executions", lambda d: None, method="POST")) as server,
        hostile_client(server) as api,
    ):
        with pytest.raises(MalformedResponseError) as caught:
            await api.create_execution("1")
        assert "data is null, not an object" in str(caught.value)
        assert server.count(is_create) == 1 and sim.stats.executions_created["1"] == 1


async def test_a_200_that_is_not_json_is_malformed_and_retried() -> None:
    """An HTML page with status 200 on an API call is retried, then fails naming the body, without a crash."""

    async def html(req: Request, forward: Forward) -> Wire:
        return html_wire(200) if req.path == "/v1/exports" else await passthrough(req, forward)

    async with Simulator(sim_config()) as sim, hostile(sim, html) as server, hostile_client(server) as api:
        with pytest.raises(MalformedResponseError) as caught:
            await api.list_exports(ORG)
        assert "the body is not JSON" in str(caught.value)
        assert server.count(lambda r: r.path == "/v1/exports") == FAST_RETRY.max_tries


def echo_token(status: int, padding: int, *, kind: str = "html") -> Handler:
    """An error page for the exports list that echoes the Authorization header after ``padding`` characters."""

    async def handler(req: Request, forward: Forward) -> Wire:
        if req.path != "/v1/exports":
            return await passthrough(req, forward)
        echoed = "x" * padding + f" Authorization: {req.headers['authorization']} trailing text"
        if kind == "json":
            doc = {"status": "error", "error": echoed, "error_code": "BAD_REQUEST", "error_id": "e-1"}
            return json_wire(status, doc)
        return html_wire(status, f"<html><body>{echoed}</body></html>")

    return handler


@pytest.mark.parametrize("padding", [0, 150, 170, 185, 250])
@pytest.mark.parametrize(("status", "kind"), [(400, "html"), (502, "html"), (400, "json")])
async def test_an_error_echoing_the_token_is_scrubbed_before_it_is_cut(padding: int, status: int, kind: str) -> None:
    """An error body echoing the token (anywhere, even across the 200-character cut) never shows any of it."""
    async with (
        Simulator(sim_config()) as sim,
        hostile(sim, echo_token(status, padding, kind=kind)) as server,
        hostile_client(server, retry=RetryPolicy(max_tries=2, base_s=0.001, max_wait_s=0.001)) as api,
    ):
        with pytest.raises(ApiError) as caught:
            await api.list_exports(ORG)
        exc = caught.value
        assert_no_token(exc)
        assert TOKEN[:6] not in str(exc), str(exc)  # not even the start of it, cut at the edge
        assert len(exc.error or "") <= 201
        if kind == "json":
            assert exc.error_code == "BAD_REQUEST" and exc.error_id == "e-1"
            assert "(error_code BAD_REQUEST, error_id e-1)" in str(exc)


def test_a_cut_that_ends_in_the_start_of_the_token_loses_it() -> None:
    """A text read in part (an error body, an error file) that ends in the start of the token drops it."""
    exc = error_from(502, b"<html>" + b"y" * 50 + TOKEN[:9].encode(), "GET", "/v1/x", None, Secret(TOKEN))
    assert TOKEN[:6] not in str(exc) and "***" in str(exc)
    secret = Secret(TOKEN)
    assert secret.cut_bytes(b"abc" + TOKEN[:5].encode(), 100) == b"abc***"
    assert secret.cut_bytes(b"abc" + TOKEN.encode() + b"xyz", 8) == b"abc***xy"
    assert secret.cut_bytes(b"abc tok", 100) == b"abc tok"  # 3 characters prove nothing: kept


async def test_error_envelope_fields_of_odd_types() -> None:
    """An error that is an object ({"message": ...}) shows its message; odd error_code/error_id types do not crash."""

    async def odd(req: Request, forward: Forward) -> Wire:
        doc = {"status": "error", "error": {"message": "no such thing"}, "error_code": ["X"], "error_id": 42}
        return json_wire(400, doc)

    async with Simulator(sim_config()) as sim, hostile(sim, odd) as server, hostile_client(server) as api:
        with pytest.raises(ApiError) as caught:
            await api.get_export("1", ORG)
        assert (caught.value.error, caught.value.error_code, caught.value.error_id) == ("no such thing", None, "42")


async def test_error_file_echoing_the_token_is_scrubbed_even_at_the_cut() -> None:
    """fetch_error_file never returns the token, even when its size limit cuts the token in two."""
    limit = 1000

    async def echo(req: Request, forward: Forward) -> Wire:
        if is_error_file(req):
            body = b"e" * (limit - 8) + req.headers["authorization"].encode() + b"\nmore\n"
            return Wire(200, [("Content-Type", "text/plain")], body)
        return await passthrough(req, forward)

    async with Simulator(sim_config()) as sim, hostile(sim, echo) as server, hostile_client(server) as api:
        data = await api.fetch_error_file(ORG, "1", limit_bytes=limit)
        assert data is not None and TOKEN[:6].encode() not in data and len(data) == limit
        whole = await api.fetch_error_file(ORG, "1", limit_bytes=10_000)
        assert whole is not None and TOKEN.encode() not in whole and b"***\nmore" in whole


async def test_query_check_message_echoing_the_token_is_scrubbed() -> None:
    """The platform's message for a bad query is the server's text: a token in it is scrubbed."""

    async def echo(req: Request, forward: Forward) -> Wire:
        if "/query_check/" in req.path:
            message = f"unexpected token near {req.headers['authorization']}"
            return json_wire(200, {"status": "ok", "data": {"type": "PARSING_ERROR", "errors": [{"message": message}]}})
        return await passthrough(req, forward)

    async with Simulator(sim_config()) as sim, hostile(sim, echo) as server, hostile_client(server) as api:
        check = await api.check_query(DATAMART, "SELECT {id} FROM UserPoint")
        assert not check.is_valid and check.message == "unexpected token near ***" and check.position is None


# -- waits that never overflow -------------------------------------------------------------------
def test_poll_waits_never_overflow() -> None:
    """A poll schedule can be driven 5,000 times (hours of polling) without OverflowError, each wait within max_s."""
    schedule = PollSchedule(1.0, 5.0)
    for _ in range(5_000):
        wait = schedule.next_wait(None)
        assert 0.0 <= wait <= 5.0


def test_retry_and_throttle_waits_never_overflow() -> None:
    """The retry wait for a huge try number and the pause after 5,000 429s in a row stay within their caps."""
    policy = RetryPolicy(max_wait_s=30.0)
    assert all(0 <= policy.wait(n) <= 30.0 for n in (0, 10, 1_100, 10**6))
    throttle = Throttle(max_pause_s=2.0)
    for _ in range(5_000):
        throttle.on_throttled(None)
    assert throttle.pause_until - time.monotonic() <= 2.0
