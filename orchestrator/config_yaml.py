"""Reading a job file's YAML safely: bounded size and expansion, no duplicate keys, one-line errors.

A job file is refused unread above MAX_JOB_FILE_BYTES, refused when its aliases expand to
more than MAX_YAML_NODES values ("billion laughs"), and a key given twice in one mapping is
an error rather than PyYAML's silent last-wins. Validation of what it says is
:func:`orchestrator.config.parse_job_file`'s.

Speed without a second dialect: libyaml (``yaml.CSafeLoader``) reads a 1,000-job file ~8×
faster than the pure-Python ``SafeLoader`` (37 ms against 304 ms), but it accepts some text
PyYAML refuses (tabs in plain scalars, ``|#``, ``?`` in flow mappings, a BOM after line 1...)
and words its errors differently. So libyaml is used only where the two are known to agree —
text without the characters and patterns of :data:`_C_UNSURE` (differential fuzzing:
tests/test_cheap_paths.py), a document that loads, nests at most :data:`_C_MAX_DEPTH` deep
and stays within the size budget — and everything else (every bad file included) is read
again by the pure-Python loader, whose verdict, message and line number are the ones users
have always had.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

import yaml

from orchestrator.errors import ConfigError

MAX_JOB_FILE_BYTES = 16 << 20
"""A job file larger than this is refused unread: a real one is kilobytes, and PyYAML parses
at a few MB/s, so a runaway file (a log written over it) must not stall the run for minutes."""
MAX_YAML_NODES = 1_000_000
"""The most values a job file may hold once its aliases are expanded: PyYAML shares an
aliased value rather than copying it, so a "billion laughs" file is small in memory, but
anything that walks it (validation, an error message) would visit every expansion."""


def brief(value: Any, limit: int = 60) -> str:
    """Any YAML value for a message, in bounded time and length.

    ``repr`` will not do: an aliased tree would be expanded whole, and an int of more
    than 4,300 digits refuses to become a string.
    """
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[:limit] + "...")
    if isinstance(value, bool | float) or value is None:
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() < 128 else f"a {value.bit_length()}-bit number"
    return f"a {type(value).__name__}"


def _construct_mapping(loader: yaml.constructor.SafeConstructor, node: yaml.MappingNode, deep: bool) -> dict[Any, Any]:
    """SafeConstructor's mapping, refusing a key given twice (shared by both loaders).

    PyYAML keeps the last value silently: ``jobs:`` written twice would drop the first
    list of jobs without a word. SafeConstructor is named, not reached through ``super()``:
    the libyaml loader's class is partly C, where ``super()`` finds the wrong method.
    """
    seen: set[Any] = set()
    for key_node, _value in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *defaults` merges; its keys may be overridden on purpose
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            continue  # an unhashable key: the base class reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {brief(key)}", key_node.start_mark)
    return yaml.constructor.SafeConstructor.construct_mapping(loader, node, deep=deep)


_PLAIN_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_PLAIN_FLOAT = re.compile(r"[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?")


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    """A plain decimal integer; any other YAML 1.1 integer (``0123`` octal, ``0x1F``, ``12:30``
    base 60, ``1_000``) stays the text written: an id written ``0123`` must never become 83,
    and a setting that is no number is then refused by name."""
    text = str(loader.construct_scalar(node))
    return yaml.constructor.SafeConstructor.construct_yaml_int(loader, node) if _PLAIN_INT.fullmatch(text) else text


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    """A plain decimal number (``.inf`` / ``.nan`` too, which the settings refuse by name);
    YAML 1.1's ``1:30.5`` (base 60) or ``1_000.5`` stays the text written."""
    text = str(loader.construct_scalar(node))
    if _PLAIN_FLOAT.fullmatch(text) or text.lower().lstrip("+-") in (".inf", ".nan"):
        return yaml.constructor.SafeConstructor.construct_yaml_float(loader, node)
    return text


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: the reference reader."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        return _construct_mapping(self, node, deep)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


_CSafeLoader: type[yaml.SafeLoader] | None = getattr(yaml, "CSafeLoader", None)  # None: PyYAML without libyaml

if _CSafeLoader is not None:

    class _CLoader(_CSafeLoader):  # type: ignore[valid-type,misc]
        """``yaml.CSafeLoader`` (libyaml) that refuses a key given twice in one mapping."""

        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            return _construct_mapping(self, node, deep)

    _CLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
    _CLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


_C_UNSURE = re.compile(r"[\t\x85\u2028\u2029!`@%?]|[|>]\S|(?<=.)\ufeff", re.DOTALL)
"""Text where libyaml and PyYAML may disagree (found by differential fuzzing): tabs, the
Unicode line breaks, tags, directives, reserved indicators, ``?`` (flow mappings), a block
scalar header followed by more than whitespace, a BOM after the start. Such text is read
by the pure-Python loader only."""
_C_MAX_DEPTH = 64
"""libyaml nests ~1,000 deep where the pure-Python loader runs out of recursion at a few
hundred levels ("nested too deeply"): a deeper document is read again by the latter. A job
file nests about 4 deep."""


class _Unsure(Exception):
    """The libyaml reading cannot be vouched for: read the text with the pure-Python loader."""


def _check_size(data: Any, file: str, max_depth: int | None = None) -> None:
    """Refuse a document that expands (through aliases) to more than MAX_YAML_NODES values.

    The walk stops at the budget, so it costs at most that many steps however large the
    expansion would be. With ``max_depth``, a collection deeper than that raises _Unsure.
    """
    budget = MAX_YAML_NODES
    stack: list[tuple[Any, int]] = [(data, 1)] if isinstance(data, dict | list | tuple | set) else []
    while stack:
        item, depth = stack.pop()
        if max_depth is not None and depth > max_depth:
            raise _Unsure
        children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
        budget -= len(children)
        if budget < 0:
            raise ConfigError(
                f"{file}: invalid YAML: more than {MAX_YAML_NODES:,} values once its aliases are expanded"
            )
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list | tuple | set))


def _read(path: str | os.PathLike[str], file: str) -> str:
    """The job file's text: a regular file, at most MAX_JOB_FILE_BYTES, UTF-8; one line otherwise.

    Opened without blocking, so that a FIFO with no writer is refused rather than waited on.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kinds = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a pipe", stat.S_IFSOCK: "a socket"}
        kind = kinds.get(stat.S_IFMT(info.st_mode), "a device")
        raise ConfigError(f"{file}: cannot read: not a regular file ({kind})")
    with os.fdopen(fd, "rb") as handle:
        try:
            raw = handle.read(MAX_JOB_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_JOB_FILE_BYTES:
        raise ConfigError(f"{file}: too large for a job file (more than {MAX_JOB_FILE_BYTES >> 20} MiB)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{file}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}): save it as UTF-8"
        ) from None


def load_yaml(path: str | os.PathLike[str], file: str) -> Any:
    """The job file at ``path`` as loaded YAML (``file`` names it in messages); ConfigError otherwise."""
    text = _read(path, file)
    data = _load_libyaml(text, file)
    return _load_pure(text, file) if data is _UNREAD else data


_UNREAD = object()


def _load_libyaml(text: str, file: str) -> Any:
    """``text`` loaded by libyaml, or _UNREAD where its reading cannot be vouched for: text
    in :data:`_C_UNSURE`, any error (bad files are worded by the reference reader), a document
    too big or nested deeper than :data:`_C_MAX_DEPTH`."""
    if _CSafeLoader is None or _C_UNSURE.search(text):
        return _UNREAD
    try:
        data = yaml.load(text, Loader=_CLoader)  # noqa: S506 - _CLoader is a CSafeLoader
        _check_size(data, file, _C_MAX_DEPTH)
    except Exception:  # any doubt: the reference reader decides, and words the error
        return _UNREAD
    return data


def _load_pure(text: str, file: str) -> Any:
    """``text`` loaded by the pure-Python loader: the reference verdicts, messages and lines."""
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{file}: invalid YAML{where}: {' '.join(str(problem).split())}") from None
    except RecursionError:  # PyYAML builds nested collections recursively
        raise ConfigError(f"{file}: invalid YAML: nested too deeply") from None
    except ValueError:  # PyYAML's int() of a number of more than 4,300 digits
        raise ConfigError(f"{file}: invalid YAML: a number with more than 4,300 digits") from None
    _check_size(data, file)
    return data


__all__ = ["MAX_JOB_FILE_BYTES", "MAX_YAML_NODES", "brief", "load_yaml"]
