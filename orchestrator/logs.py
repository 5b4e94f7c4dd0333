"""Log formatting for people (text) and for collectors (one JSON object per line).

Every record may carry ``event``, ``job``, ``export_id``, ``execution_id`` and any other
fields passed as ``extra``; the JSON formatter writes them all. Both formatters pass the
final line through a redactor, so a secret that slipped into a message (an aiohttp debug
line, an exception text) is replaced by ``***`` — defence in depth behind the rule that
the token is never put in a message in the first place.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

import orjson

_SECRETS: set[str] = set()
"""Every secret this process has read (the API token): scrubbed from every log line and
from the CLI's last-resort error report, whichever formatter or handler prints it."""

_STANDARD = set(logging.LogRecord("x", 0, "x", 0, "x", None, None).__dict__) | {
    "message",
    "asctime",
}
_FIRST = ("job", "export_id", "execution_id")


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
"""Control characters (C0, DEL, C1), line and paragraph separators, and the invisible or
bidirectional formatting characters that can disguise what a terminal shows."""


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, keep: str = "") -> str:
    """``text`` with every control or invisible formatting character written escaped
    (``\\x1b``), except those in ``keep``: what a server or a file says cannot drive the
    terminal (colours, cursor moves, a fake log line after a newline)."""
    if keep:
        return re.sub(_UNSAFE, lambda m: m.group() if m.group() in keep else _escape(m), text)
    return _UNSAFE.sub(_escape, text)


def add_secret(secret: str) -> None:
    """Remember a secret so that :func:`redact` (and every log line) scrubs it from now on."""
    if secret:
        _SECRETS.add(secret)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every known secret (and ``secrets``) replaced by ``***``.

    The JSON-escaped form is scrubbed too: a secret holding a quote or a backslash is
    written escaped by the JSON formatter, and would otherwise slip through.
    """
    # Longest first: a secret that contains another must not be left half-scrubbed.
    for secret in sorted(_SECRETS.union(s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
        escaped = orjson.dumps(secret).decode()[1:-1]
        if escaped != secret:
            text = text.replace(escaped, "***")
    return text


class _Redacting(logging.Formatter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]
        for secret in self.secrets:
            add_secret(secret)

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)

    @staticmethod
    def fields(record: logging.LogRecord) -> dict[str, Any]:
        return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(_Redacting):
    """``{"ts", "level", "event", "job", "export_id", "execution_id", "message", ...}``."""

    def format(self, record: logging.LogRecord) -> str:
        fields = self.fields(record)
        out: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname.lower(),
            "event": fields.pop("event", None) or record.name.rsplit(".", 1)[-1],
        }
        for key in _FIRST:
            out[key] = fields.pop(key, None)
        out["message"] = record.getMessage()
        out.update(fields)
        if record.exc_info and record.exc_info[1] is not None:
            out["exception"] = self.formatException(record.exc_info)
        return self.redact(orjson.dumps(out, default=str).decode())


class TextFormatter(_Redacting):
    """``2026-11-28T02:00:00.000Z INFO  [job] message``.

    One record is one line: control characters in the message (a server's error text, a
    name from a file) are written escaped; only an exception's traceback adds lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        job = getattr(record, "job", None)
        prefix = f"{_iso(record.created)} {record.levelname:<7} "
        # Redacted before escaping, so that a secret holding a control character still matches.
        line = printable(self.redact(prefix + (f"[{job}] " if job else "") + record.getMessage()))
        if record.exc_info and record.exc_info[1] is not None:
            line += "\n" + printable(self.redact(self.formatException(record.exc_info)), keep="\n")
        return line


class _CurrentStderr:
    """Writes to whatever sys.stderr is at the time: rich's live display swaps it, and
    lines must go through its proxy to be printed above the display, not over it."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _OwnHandler(logging.StreamHandler[Any]):
    """The handler :func:`setup_logging` installs: its type marks it as ours, so that a second
    call replaces it and leaves every other handler (a host's, pytest's caplog) in place."""


def setup_logging(
    log_format: str = "text",
    verbosity: int = 0,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    quiet: bool = False,
) -> logging.Handler:
    """Send logs to stderr. ``verbosity`` 0: INFO, 1: DEBUG, 2+: DEBUG for libraries too.

    ``quiet`` (used while a live progress display owns the terminal) raises the level to
    WARNING unless ``-v`` was given. Only the handler an earlier call installed is replaced:
    handlers someone else put on the root logger keep receiving records.
    """
    handler = _OwnHandler(stream or _CurrentStderr())
    handler.setFormatter(JsonFormatter(secrets) if log_format == "json" else TextFormatter(secrets))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OwnHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    level = logging.DEBUG if verbosity >= 1 else logging.WARNING if quiet else logging.INFO
    logging.getLogger("orchestrator").setLevel(level)
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    return handler


__all__ = ["JsonFormatter", "TextFormatter", "add_secret", "printable", "redact", "setup_logging"]
