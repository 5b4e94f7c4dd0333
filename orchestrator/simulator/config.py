"""The simulator's settings: which exports exist, how they behave, which faults to inject.

Everything is plain data so it can come from Python (tests, benchmarks), from a YAML
scenario file (``mics-export simulate --scenario FILE``) or from command-line flags.
Durations are float seconds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from orchestrator.simulator.data import SHAPES, ResultFile, check_shape

DEFAULT_TOKEN = "sim-token"  # noqa: S105 - the simulator's well-known fake token
DEFAULT_ORGANISATION = "1426"
DEFAULT_DATAMART = "1509"


@dataclass(frozen=True)
class ExportSpec:
    """One export and how its executions behave.

    ``fail_first``: the first k executions end FAILED, later ones succeed.
    ``always_fail``: every execution ends FAILED. ``stall``: executions stay RUNNING
    with ``completed_tasks`` frozen. ``running_status``: the status string shown while
    running (e.g. an unlisted value, to test unknown statuses).
    """

    id: str
    name: str = ""
    organisation_id: str = DEFAULT_ORGANISATION
    datamart_id: str = DEFAULT_DATAMART
    query_id: str = ""
    size_bytes: int = 20_000
    shape: str = "small"
    seed: int = 0
    invalid_every: int = 0
    blank_every: int = 0
    pending_s: float = 0.2
    running_s: float = 0.5
    num_tasks: int = 1000
    erroneous_tasks: int = 0
    fail_first: int = 0
    always_fail: bool = False
    stall: bool = False
    running_status: str = "RUNNING"

    def __post_init__(self) -> None:
        check_shape(self.shape, self.invalid_every, self.blank_every)

    def result(self) -> ResultFile:
        """The result file every successful execution of this export serves."""
        return ResultFile(self.size_bytes, self.shape, self.seed, self.invalid_every, self.blank_every)

    @classmethod
    def derived(cls, export_id: str, **overrides: Any) -> ExportSpec:
        """A plausible export for an id nobody configured: sizes and timings from its hash."""
        h = int.from_bytes(hashlib.sha256(export_id.encode()).digest()[:8], "big")
        base = cls(
            id=export_id,
            name=f"export-{export_id}",
            query_id=str(40000 + h % 10000),
            size_bytes=20_000 + h % 3_000_000,
            shape=SHAPES[h % len(SHAPES)],
            seed=h % 97,
            pending_s=0.2 + (h >> 8) % 5 / 10,
            running_s=0.5 + (h >> 16) % 15 / 10,
        )
        return replace(base, **overrides)


@dataclass(frozen=True)
class Faults:
    """Seeded fault injection. Rates are fractions of API requests (0..1).

    ``reset_after_bytes`` with ``reset_first_k``: the first k downloads of each file are
    cut at that byte offset of the file (``reset_mode`` "reset" aborts the TCP connection, "close"
    closes it cleanly: a body shorter than its Content-Length). ``slow_body_bps`` caps
    download speed. ``ignore_range`` answers Range requests with the whole file (200).
    ``lose_create_first_k``: the first k create-execution requests of each export create
    the execution, then drop the connection before answering (a lost response).
    """

    seed: int = 0
    rate_429: float = 0.0
    retry_after_s: float | None = 1.0
    rate_5xx: float = 0.0
    reset_after_bytes: int | None = None
    reset_first_k: int = 0
    reset_mode: str = "reset"
    slow_body_bps: int | None = None
    ignore_range: bool = False
    lose_create_first_k: int = 0


@dataclass(frozen=True)
class SimulatorConfig:
    """The whole simulated platform."""

    token: str = DEFAULT_TOKEN
    exports: tuple[ExportSpec, ...] = ()
    faults: Faults = field(default_factory=Faults)
    auto_create_exports: bool = False
    """Unknown export ids get a derived export instead of a 404 (used by ``run --simulate``)."""
    time_scale: float = 1.0
    """Multiplies every lifecycle duration (0.01 makes a 5-minute execution last 3 s)."""
    chunk_bytes: int = 1 << 20
    """Bytes per write when serving a result."""

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> SimulatorConfig:
        """Build from a scenario mapping (YAML); unknown keys are an error."""
        _check_keys("scenario", data, {f.name for f in fields(cls)})
        exports = []
        for item in data.get("exports") or ():
            _check_keys("scenario export", item, {f.name for f in fields(ExportSpec)})
            if item.get("id") is None:
                raise ValueError("scenario export: id is required")
            item = {**item, "id": str(item["id"])}
            exports.append(ExportSpec.derived(item["id"], **item))
        faults = data.get("faults") or {}
        _check_keys("scenario faults", faults, {f.name for f in fields(Faults)})
        rest = {k: v for k, v in data.items() if k not in ("exports", "faults")}
        return cls(exports=tuple(exports), faults=Faults(**faults), **rest)

    @classmethod
    def from_file(cls, path: Path) -> SimulatorConfig:
        """Load a YAML scenario file."""
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a scenario must be a mapping")
        return cls.from_mapping(data)


def _check_keys(what: str, data: Any, allowed: set[str]) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {', '.join(unknown)}")


def demo_config(**overrides: Any) -> SimulatorConfig:
    """The platform `mics-export simulate` and `run --simulate` show by default.

    It holds the exports of the API reference (9879, 9872) and of jobs.yaml.example,
    and derives any other id on demand.
    """
    exports = (
        ExportSpec.derived(
            "9879",
            name="2018-08-29 - Export test segments for Facebook and Adwords",
            query_id="65987",
            size_bytes=4_000_000,
            shape="small",
            erroneous_tasks=12,
        ),
        ExportSpec.derived("9872", name="export-visiteurs", query_id="45987", size_bytes=2_500_000, shape="user"),
        ExportSpec.derived("9880", name="daily-profiles", size_bytes=12_000_000, shape="big"),
        ExportSpec.derived("9881", name="flaky-export", fail_first=1, size_bytes=300_000),
        ExportSpec.derived(
            "9882",
            name="dirty-lines",
            size_bytes=800_000,
            shape="small",
            invalid_every=5000,
            blank_every=2000,
        ),
    )
    return replace(SimulatorConfig(exports=exports, auto_create_exports=True), **overrides)
