"""The API token, held so that nothing shows it, and the scrubbing of text that may echo it.

Text the server sends back (error bodies, error files, execution errors) may echo the
``Authorization`` header: :class:`Secret` removes the token *before* any truncation, and a
cut that ends in the token's first characters loses them too.
"""

from __future__ import annotations


class Secret:
    """Holds the token so that no repr, log or traceback local shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def scrub(self, text: object) -> str | None:
        """``text`` as a string with the secret replaced by ``***`` (None stays None)."""
        return None if text is None else str(text).replace(self._value, "***") if self._value else str(text)

    def echoed_in(self, text: str) -> bool:
        """True when ``text`` (a server's id or name) holds the secret: never write it anywhere."""
        return bool(self._value) and self._value in text

    def scrub_bytes(self, data: bytes) -> bytes:
        """``data`` with the secret (UTF-8) replaced by ``***``."""
        return data.replace(self._value.encode(), b"***") if self._value else data

    def cut(self, text: str, limit: int) -> str:
        """``text`` scrubbed, then cut to ``limit`` characters; a cut that ends in the first
        characters of the secret (text that was itself cut short) loses them too."""
        text = self.scrub(text) or ""
        if len(text) > limit:
            text = text[:limit].rstrip() + "…"
        return self.scrub_tail(text)

    def scrub_tail(self, text: str) -> str:
        """``text`` without a trailing beginning of the secret (4+ characters)."""
        for n in range(min(len(self._value) - 1, len(text)), 3, -1):
            if text.endswith(self._value[:n]):
                return text[:-n] + "***"
        return text

    def cut_bytes(self, data: bytes, limit: int) -> bytes:
        """:meth:`cut` for bytes: scrubbed whole, cut to ``limit``, no trailing start of the secret."""
        data = self.scrub_bytes(data)[:limit]
        secret = self._value.encode()
        for n in range(min(len(secret) - 1, len(data)), 3, -1):
            if data.endswith(secret[:n]):
                return data[:-n] + b"***"
        return data

    def __repr__(self) -> str:
        return "<token redacted>"

    __str__ = __repr__


__all__ = ["Secret"]
