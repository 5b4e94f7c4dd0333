"""Tests for orchestrator.models: status semantics, parsing the reference's JSON, paging."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from orchestrator.errors import MalformedResponseError
from orchestrator.models import Execution, ExecutionStatus, Export, Page, QueryCheck

# NOTES.md: the platform's job enum, with success and final-failure sets.
SUCCESS = {"SUCCEEDED", "SUCCESS"}
FAILURE = {"FAILED", "CANCELED", "LOST", "EXECUTOR_NOT_RESPONDING"}
IN_PROGRESS = {"WAITING_DEPENDENT_JOB", "SCHEDULED", "PENDING", "RUNNING"}


@pytest.mark.parametrize("value", sorted(SUCCESS | FAILURE | IN_PROGRESS))
def test_every_documented_status_has_the_documented_meaning(value: str) -> None:
    """Each status of NOTES.md is a success, a final failure or still in progress, exactly as documented."""
    status = ExecutionStatus.parse(value)
    assert status.value == value
    assert status.is_success == (value in SUCCESS)
    assert status.is_final == (value in SUCCESS | FAILURE)


def test_every_member_is_documented_or_unknown() -> None:
    """The enum holds the documented values and UNKNOWN, nothing else."""
    assert {s.value for s in ExecutionStatus} == SUCCESS | FAILURE | IN_PROGRESS | {"UNKNOWN"}


@pytest.mark.parametrize("value", ["QUANTUM", "CANCELLED", "succeeded", "", None, 3, ["RUNNING"], {"s": 1}])
def test_unknown_status_is_in_progress(value: Any, caplog: pytest.LogCaptureFixture) -> None:
    """An unlisted status (a near miss like CANCELLED, lower case, not a string) is UNKNOWN: not final, no crash."""
    caplog.set_level(logging.WARNING, logger="orchestrator")
    status = ExecutionStatus.parse(value)
    assert status is ExecutionStatus.UNKNOWN
    assert not status.is_final and not status.is_success


def test_unknown_status_is_warned_about_once() -> None:
    """A new status value is logged once, not on every poll."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("orchestrator.models")
    handler, level = Keep(logging.WARNING), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        for _ in range(3):
            ExecutionStatus.parse("BRAND_NEW_STATUS_1")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [r.getMessage() for r in records] == [
        "unknown execution status 'BRAND_NEW_STATUS_1': treated as in progress"
    ]


# The first execution of the "Execution status" example in query-exports.md, verbatim.
REFERENCE_EXECUTION: dict[str, Any] = {
    "parameters": {},
    "organisation_id": "1426",
    "user_id": "8987",
    "result": {"output_files": ["export"]},
    "error": None,
    "id": "7897897",
    "status": "SUCCEEDED",
    "creation_date": 1562595783663,
    "start_date": 1562595789171,
    "duration": 292617,
    "cancel_status": None,
    "debug": None,
    "is_retryable": False,
    "permalink_uri": "",
    "num_tasks": 299808,
    "completed_tasks": 277105,
    "erroneous_tasks": 22703,
    "retry_count": 0,
    "job_type": "DATAMART_QUERY_EXPORT",
    "end_date": 1562596081788,
}

# The "Generate an execution" answer in query-exports.md, verbatim.
REFERENCE_NEW_EXECUTION: dict[str, Any] = {
    "parameters": {},
    "organisation_id": "1426",
    "user_id": "2886",
    "result": None,
    "error": None,
    "id": "879879879",
    "status": "PENDING",
    "creation_date": 1612789702668,
    "start_date": None,
    "duration": None,
    "cancel_status": None,
    "debug": None,
    "is_retryable": False,
    "permalink_uri": "MTowOjA65985NjYyOQ==",
    "num_tasks": None,
    "completed_tasks": None,
    "erroneous_tasks": None,
    "retry_count": 0,
    "job_type": "DATAMART_QUERY_EXPORT",
}


def test_execution_from_the_reference_example() -> None:
    """The reference's succeeded execution parses with its dates, task counts (erroneous included) and file."""
    e = Execution.from_api(REFERENCE_EXECUTION)
    assert e.id == "7897897"
    assert e.status is ExecutionStatus.SUCCEEDED and e.raw_status == "SUCCEEDED"
    assert e.is_success and e.is_final
    assert (e.creation_date, e.start_date, e.end_date) == (1562595783663, 1562595789171, 1562596081788)
    assert (e.num_tasks, e.completed_tasks, e.erroneous_tasks) == (299808, 277105, 22703)
    assert e.organisation_id == "1426"
    assert e.output_files == ("export",)
    assert e.technical_name == "export"
    assert e.error is None
    assert e.extra == REFERENCE_EXECUTION


def test_new_execution_from_the_reference_example() -> None:
    """The reference's freshly created execution is PENDING, with no counts, no files and the default file name."""
    e = Execution.from_api(REFERENCE_NEW_EXECUTION)
    assert (e.id, e.status, e.is_final) == ("879879879", ExecutionStatus.PENDING, False)
    assert (e.start_date, e.end_date, e.num_tasks, e.completed_tasks, e.erroneous_tasks) == (None,) * 5
    assert e.output_files == ()
    assert e.technical_name == "export"


def test_execution_ids_and_numbers_of_other_json_types() -> None:
    """Numeric ids become strings and a named output file is used as the technical name."""
    data = {**REFERENCE_EXECUTION, "id": 7897897, "organisation_id": 1426, "result": {"output_files": ["part-1", "x"]}}
    e = Execution.from_api(data)
    assert (e.id, e.organisation_id, e.technical_name) == ("7897897", "1426", "part-1")


def test_execution_with_an_unknown_status_keeps_the_raw_value() -> None:
    """An unknown status parses to UNKNOWN with the raw value kept for display."""
    e = Execution.from_api({**REFERENCE_EXECUTION, "status": "QUANTUM"})
    assert (e.status, e.raw_status, e.is_final, e.is_success) == (ExecutionStatus.UNKNOWN, "QUANTUM", False, False)


def test_export_from_the_reference_example() -> None:
    """The reference's export parses with string ids, type and output format."""
    data = {
        "type": "QUERY",
        "id": "9879",
        "organisation_id": "1426",
        "name": "2018-08-29 - Export test segments for Facebook and Adwords",
        "query_id": "65987",
        "datamart_id": "1509",
        "output_format": "JSON",
    }
    e = Export.from_api(data)
    assert e == Export("9879", data["name"], "1426", "65987", "1509", "QUERY", "JSON")
    assert Export.from_api({"id": 5, "query_id": 7}) == Export("5", "", None, "7", None)


@pytest.mark.parametrize(
    ("items", "first", "size", "total", "more"),
    [
        (50, 0, 50, 163, True),
        (50, 100, 50, 163, True),
        (13, 150, 50, 163, False),
        (10, 0, 10, 10, False),  # a full page that is the last one: total says so
        (0, 0, 10, 0, False),
        (3, 0, 10, 3, False),
        (10, 0, 10, None, True),  # no total: a full page may be followed by another
        (9, 0, 10, None, False),  # no total: a short page is the last
        (0, 20, 10, None, False),
    ],
)
def test_page_has_more(items: int, first: int, size: int, total: int | None, more: bool) -> None:
    """A page says whether another follows, from total when the list has one, else from a full page."""
    page = Page(items=tuple(range(items)), first_result=first, max_results=size, total=total)
    assert page.has_more is more


# -- loose typing (NOTES.md) and malformed answers -----------------------------------------------
@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        *[(12, 12), ("12", 12), (" 12 ", 12), ("12.0", 12), (12.7, 12), (None, None), ("n/a", None), ("", None)],
        *[(True, None), ([1], None), ({"n": 1}, None), (float("nan"), None), ("inf", None)],
    ],
)
def test_counters_are_read_leniently(value: Any, parsed: int | None) -> None:
    """A task counter that is a number or a numeric string is read; anything else ("n/a", a list) is None, no crash."""
    e = Execution.from_api(
        {**REFERENCE_EXECUTION, "num_tasks": value, "completed_tasks": value, "erroneous_tasks": value}
    )
    assert (e.num_tasks, e.completed_tasks, e.erroneous_tasks) == (parsed, parsed, parsed)


def test_missing_counters_and_dates_are_none() -> None:
    """Counters and dates that are absent read as None."""
    e = Execution.from_api({"id": "1", "status": "RUNNING"})
    assert (e.num_tasks, e.completed_tasks, e.creation_date, e.end_date) == (None, None, None, None)


@pytest.mark.parametrize(
    ("data", "field", "problem"),
    [
        ({"status": "RUNNING"}, "id", "is missing"),
        ({"id": None}, "id", "is missing"),
        ({"id": ""}, "id", "is missing"),
        ({"id": {"v": 1}}, "id", "is an object, not an id"),
        ({"id": [1]}, "id", "is a list, not an id"),
        ({"id": True}, "id", "is a boolean, not an id"),
        (None, "data", "is null, not an object"),
        ([{"id": "1"}], "data", "is a list, not an object"),
    ],
)
def test_an_execution_without_a_usable_id_is_malformed(data: Any, field: str, problem: str) -> None:
    """An execution or export without an id (or not an object) is a MalformedResponseError naming the field."""
    for model in (Execution, Export):
        with pytest.raises(MalformedResponseError) as caught:
            model.from_api(data)
        assert (caught.value.field, caught.value.problem) == (field, problem)
        assert f"{field} {problem}" in str(caught.value)


def test_malformed_text_never_quotes_the_value() -> None:
    """The error names the field and the JSON type, never the server's value (it could echo anything)."""
    with pytest.raises(MalformedResponseError) as caught:
        Execution.from_api({"id": {"secret": "tok-SECRET-xyz"}})
    assert "tok-SECRET" not in str(caught.value)


def test_odd_result_shapes_are_read_leniently() -> None:
    """result and output_files of unexpected types mean "no file names", not a crash."""
    for result in ("export", ["export"], {"output_files": "export"}, {"output_files": [None, {"a": 1}, "x"]}):
        e = Execution.from_api({"id": "1", "status": "SUCCEEDED", "result": result})
        assert e.technical_name in ("export", "x")


@pytest.mark.parametrize(
    ("error", "message"),
    [
        ("Query failed", "Query failed"),
        ({"message": "Query failed"}, "Query failed"),
        ({"message": "line one\n  line two"}, "line one line two"),
        ({"code": 3}, "{'code': 3}"),
        (None, None),
        ("", None),
        ({}, None),
        ("x" * 400, "x" * 299 + "…"),
    ],
)
def test_execution_error_is_one_line_from_a_string_or_a_message(error: Any, message: str | None) -> None:
    """The platform's error reads as one short line whether it is a string or {"message": ...}."""
    assert Execution.from_api({"id": "1", "status": "FAILED", "error": error}).error_message == message


def test_page_from_the_reference_list() -> None:
    """A list envelope becomes a page of built items with its paging keys."""
    env = {
        "status": "ok",
        "data": [{"id": "1"}, {"id": 2}],
        "count": 2,
        "total": 7,
        "first_result": 4,
        "max_results": 2,
    }
    page = Page.from_api(env, 4, 2, Execution.from_api)
    assert [e.id for e in page.items] == ["1", "2"]
    assert (page.first_result, page.max_results, page.total, page.has_more) == (4, 2, 7, True)


@pytest.mark.parametrize("total", ["lots", None, [3], -1, "1e999"])
def test_page_total_that_is_not_a_count_is_no_total(total: Any) -> None:
    """A total of "lots" (or a list, or negative) is treated as absent: a full page may be followed by another."""
    env = {"data": [1, 2], "total": total, "first_result": "zero", "max_results": None}
    page = Page.from_api(env, 10, 2)
    assert (page.total, page.first_result, page.max_results, page.has_more) == (None, 10, 2, True)


def test_page_whose_data_is_an_object_is_malformed() -> None:
    """data an object where a list belongs is a MalformedResponseError naming data; null data is an empty page."""
    with pytest.raises(MalformedResponseError) as caught:
        Page.from_api({"data": {"id": "1"}}, 0, 10)
    assert str(caught.value) == "malformed answer (HTTP 200): data is an object, not a list"
    assert Page.from_api({"data": None}, 0, 10).items == ()


def test_page_names_the_malformed_item() -> None:
    """An item without an id is named by its place in the list."""
    with pytest.raises(MalformedResponseError) as caught:
        Page.from_api({"data": [{"id": "1"}, {"status": "RUNNING"}]}, 0, 10, Execution.from_api)
    assert caught.value.field == "data[1].id"


@pytest.mark.parametrize(
    ("data", "kind", "message", "position"),
    [
        ({"type": "VALID"}, "VALID", None, None),
        (
            {"type": "PARSING_ERROR", "error": {"message": "bad", "position": {"row": 1, "col": 5}}},
            "PARSING_ERROR",
            "bad",
            "row 1, col 5",
        ),
        (
            {"type": "VALIDATION_ERROR", "message": "no such field", "position": {"line": 2}},
            "VALIDATION_ERROR",
            "no such field",
            "row 2",
        ),
        ({"type": "PARSING_ERROR", "error": "bad"}, "PARSING_ERROR", "bad", None),
        (
            {"type": "VALIDATION_ERROR", "errors": [{"message": "a", "row": 3, "col": 1}, "b"]},
            "VALIDATION_ERROR",
            "a; b",
            "row 3, col 1",
        ),
        ({"type": "parsing_error"}, "PARSING_ERROR", None, None),
        ({"error": "it broke"}, "INVALID", "it broke", None),
    ],
)
def test_query_check_is_read_from_any_documented_shape(
    data: Any, kind: str, message: str | None, position: str | None
) -> None:
    """The check's verdict, message and position are found wherever the answer puts them; no position is fine."""
    check = QueryCheck.from_api(data)
    assert (check.type, check.message, check.position) == (kind, message, position)
    assert check.is_valid == (kind == "VALID")


@pytest.mark.parametrize("data", [{}, {"type": 3}, None, "VALID"])
def test_query_check_without_a_verdict_is_malformed(data: Any) -> None:
    """A check answer with neither a type nor an error is malformed (it says nothing about the query)."""
    with pytest.raises(MalformedResponseError):
        QueryCheck.from_api(data)


@pytest.mark.parametrize("name", ["../../v1/exports", "a/b", "..", "x?y=1", "a b"])
def test_a_technical_name_that_is_not_a_plain_name_is_malformed(name: str) -> None:
    """A server-chosen output file name that could steer the download URL is refused, never followed."""
    execution = Execution.from_api({"id": "1", "status": "SUCCEEDED", "result": {"output_files": [name]}})
    with pytest.raises(MalformedResponseError, match=r"result\.output_files\[0\]"):
        _ = execution.technical_name


def test_a_plain_technical_name_is_used() -> None:
    """The usual names pass through unchanged, and none at all means ``export``."""
    assert (
        Execution.from_api({"id": "1", "status": "SUCCEEDED", "result": {"output_files": ["export"]}}).technical_name
        == "export"
    )
    assert Execution.from_api({"id": "1", "status": "SUCCEEDED", "result": None}).technical_name == "export"
