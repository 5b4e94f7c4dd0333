"""Where the API is and how this process authenticates: the base URL and the token.

The base URL comes from ``--api-url``, else ``MICS_API_URL``, else the job file's
``api.base_url`` (or the default API): :func:`api_url` is the one place that order is
written. Every URL is checked (:func:`check_base_url`) and no message ever echoes a
password; the token is read once (:func:`read_token`) and registered with the log
redactor before anything can print it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from orchestrator.errors import MissingTokenError, UsageError

API_URL_ENV = "MICS_API_URL"
"""The environment variable that overrides the API's base URL (job file and ``--api-url`` default)."""


DEFAULT_BASE_URL = "https://api.mediarithmics.com"
"""The production API: the one home of this URL (the job file's default and the ops commands')."""


def _show(value: str, limit: int = 40) -> str:
    """A user's value quoted for a one-line message: escaped, and cut when long."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


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


def safe_url(url: str) -> str:
    """``url`` for a message: any ``user:password@`` replaced, escaped, cut when long."""
    return _show(_USERINFO.sub("***@", url), 80)


def url_problem(url: str) -> str | None:
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


def api_url(
    option: str | None,
    default: str = DEFAULT_BASE_URL,
    source: str = "the API URL",
    environ: Mapping[str, str] = os.environ,
) -> str:
    """The API base URL, checked: ``option`` (``--api-url``), else ``MICS_API_URL``, else ``default``.

    The one place the override is read: a run takes ``default`` from its job file's
    ``api.base_url`` (``source`` names it in messages), an ops command from DEFAULT_BASE_URL.
    """
    if option:
        return check_base_url(option, "--api-url")
    if environ.get(API_URL_ENV):
        return check_base_url(environ[API_URL_ENV], API_URL_ENV)
    return check_base_url(default, source)


def check_base_url(url: str, source: str = "the API URL") -> str:
    """``url`` if it is an http(s) URL with a host; otherwise a one-line UsageError.

    Refused as well: credentials in the URL (the token is the only credential, and a
    password there would end up in logs), a bad port, a query or fragment (request paths
    are appended to the URL), and control characters or spaces. No message echoes a
    password.
    """
    problem = url_problem(url)
    if problem is not None:
        raise UsageError(f"{source} {safe_url(url)} {problem}")
    return url.rstrip("/")


__all__ = ["API_URL_ENV", "DEFAULT_BASE_URL", "api_url", "check_base_url", "read_token", "safe_url", "url_problem"]
