"""Tests for orchestrator.logs.setup_logging: it installs one handler of its own and leaves others alone."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from orchestrator.logs import setup_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Put the root logger's handlers and the levels back as they were before the test."""
    root, ours = logging.getLogger(), logging.getLogger("orchestrator")
    handlers, root_level, our_level = list(root.handlers), root.level, ours.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(root_level)
    ours.setLevel(our_level)


class _Collect(logging.Handler):
    """A host's handler: keeps every record it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_handler_someone_else_installed_stays_and_keeps_receiving() -> None:
    """setup_logging leaves a host's root handler in place, and it still gets the tool's records."""
    host = _Collect()
    logging.getLogger().addHandler(host)
    stream = io.StringIO()
    setup_logging("text", 0, stream=stream)
    logging.getLogger("orchestrator.test").info("hello")
    assert host in logging.getLogger().handlers
    assert host.messages == ["hello"]
    assert "hello" in stream.getvalue()


def test_a_second_call_replaces_only_its_own_handler() -> None:
    """Calling setup_logging twice leaves one handler of its own (the newest), not two."""
    first, second = io.StringIO(), io.StringIO()
    installed = setup_logging("text", 0, stream=first)
    latest = setup_logging("json", 0, stream=second)
    root = logging.getLogger().handlers
    assert installed not in root and latest in root
    logging.getLogger("orchestrator.test").info("once")
    assert first.getvalue() == ""
    assert second.getvalue().count('"message":"once"') == 1


def test_caplog_still_captures_after_setup(caplog: pytest.LogCaptureFixture) -> None:
    """pytest's caplog handler survives setup_logging (it used to be removed with every other one)."""
    setup_logging("text", 0, stream=io.StringIO())
    logging.getLogger("orchestrator.test").warning("seen by caplog")
    assert "seen by caplog" in caplog.messages
