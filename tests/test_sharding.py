"""Tests for orchestrator.sharding: the partition, its stability, parsing and the environment;
then end to end, the folder each shard writes into and a shard with nothing to do.

Two shards started at once are two real processes (that is the point); the other commands run
in this process (:func:`support.cli_in_process`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import TOKEN, cli_env, cli_in_process, jobs_by_name, manifest, start_cli, write_jobs

from orchestrator.config import parse_job_file
from orchestrator.errors import ConfigError
from orchestrator.sharding import (
    SHARD_COUNT_ENV,
    SHARD_INDEX_ENV,
    parse_shard,
    resolve_shard,
    select,
    shard_folder,
    shard_of,
)
from orchestrator.simulator import ExportSpec, SimulatorConfig, SimulatorThread

# Names shaped like real job names ([A-Za-z0-9._-]+), varied enough to hit every shard.
NAMES = [f"segment-{i:03d}.{'abcdefgh'[i % 8]}_export" for i in range(200)]


@pytest.mark.parametrize("count", range(1, 9))
def test_every_job_runs_in_exactly_one_shard(count: int) -> None:
    """For N = 1..8 the shards are disjoint and together hold every job exactly once."""
    shards = [select(NAMES, index, count) for index in range(count)]
    flat = [name for shard in shards for name in shard]
    assert sorted(flat) == sorted(NAMES)
    assert len(flat) == len(set(flat)) == len(NAMES)


@pytest.mark.parametrize("count", [2, 4, 8])
def test_no_shard_is_empty_for_200_names(count: int) -> None:
    """The hash spreads 200 names over every shard (a constant hash would fail this)."""
    sizes = [len(select(NAMES, index, count)) for index in range(count)]
    assert min(sizes) > 0
    # A fair split is 200 / N per shard; allow generous noise, catch gross skew.
    assert max(sizes) < 2.5 * len(NAMES) / count


def test_select_keeps_the_original_order() -> None:
    """select() returns a subsequence of its input, not a re-sorted list."""
    for index in range(3):
        chosen = select(NAMES, index, 3)
        positions = [NAMES.index(name) for name in chosen]
        assert positions == sorted(positions)


@pytest.mark.parametrize("count", range(1, 9))
def test_adding_jobs_does_not_move_existing_ones(count: int) -> None:
    """A job's shard depends on its own name only: new jobs never reshuffle the old ones."""
    before = {name: shard_of(name, count) for name in NAMES[:100]}
    grown = [*NAMES[:100], *(f"added-later-{i}" for i in range(50))]
    after = {name: index for index in range(count) for name in select(grown, index, count)}
    assert {name: after[name] for name in before} == before


def test_hash_is_pinned_to_the_documented_formula() -> None:
    """Known values of sha256(name)[:8] big-endian; a change of algorithm moves every job."""
    # 2**64 as the count exposes the raw 64-bit value; checked against `sha256sum`.
    assert shard_of("visitors", 2**64) == 0xFE9919DF44CBE9AF
    assert shard_of("active-emails", 2**64) == 0x6ABCD6BA587472FD
    assert shard_of("visitors", 4) == 3
    assert shard_of("fb-adwords-segments", 7) == 2
    assert shard_of("active-emails", 7) == 6


def test_hash_is_stable_across_processes() -> None:
    """Another interpreter with a different PYTHONHASHSEED assigns the same shards."""
    code = "from orchestrator.sharding import shard_of;print([shard_of(f'segment-{i}', 5) for i in range(40)])"
    outputs = set()
    for seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PYTHONPATH": ":".join(sys.path)},
        )
        outputs.add(result.stdout)
    assert outputs == {f"{[shard_of(f'segment-{i}', 5) for i in range(40)]}\n"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0/1", (0, 1)), ("0/4", (0, 4)), ("3/4", (3, 4)), (" 2/8 ", (2, 8)), ("10/12", (10, 12))],
)
def test_parse_shard_accepts_valid_values(text: str, expected: tuple[int, int]) -> None:
    """I/N with 0 <= I < N parses to (I, N)."""
    assert parse_shard(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("4/4", "out of range"),
        ("5/4", "out of range"),
        ("0/0", "at least 1"),
        ("-1/4", "expected I/N"),
        ("1", "expected I/N"),
        ("1/", "expected I/N"),
        ("a/b", "expected I/N"),
        ("1/2/3", "expected I/N"),
        ("1.0/2", "expected I/N"),
        ("", "expected I/N"),
        ("٣/٤", "expected I/N"),  # Arabic-Indic digits: int() takes them, we don't
    ],
)
def test_parse_shard_rejects_bad_values(text: str, message: str) -> None:
    """Bad shard strings raise ValueError with a one-line message quoting the input."""
    with pytest.raises(ValueError, match=message) as info:
        parse_shard(text)
    assert "\n" not in str(info.value)
    assert repr(text) in str(info.value)


def test_cli_value_wins_over_the_environment() -> None:
    """--shard is used even when the Indexed Job variables are set (and even if bad)."""
    environ = {SHARD_INDEX_ENV: "1", SHARD_COUNT_ENV: "nonsense"}
    assert resolve_shard("2/3", environ) == (2, 3)


def test_cli_value_errors_propagate() -> None:
    """A bad --shard is an error, not a fallback to the environment."""
    with pytest.raises(ValueError, match="out of range"):
        resolve_shard("3/3", {SHARD_INDEX_ENV: "0", SHARD_COUNT_ENV: "3"})


def test_indexed_job_environment_gives_the_shard() -> None:
    """JOB_COMPLETION_INDEX and MICS_SHARD_COUNT give (I, N) when --shard is absent."""
    assert resolve_shard(None, {SHARD_INDEX_ENV: "2", SHARD_COUNT_ENV: "4"}) == (2, 4)
    assert resolve_shard(None, {SHARD_INDEX_ENV: "0", SHARD_COUNT_ENV: "1"}) == (0, 1)


def test_no_sharding_without_the_environment() -> None:
    """No --shard and no MICS_SHARD_COUNT means run every job (None)."""
    assert resolve_shard(None, {}) is None
    assert resolve_shard(None, {SHARD_COUNT_ENV: ""}) is None


def test_completion_index_alone_is_ignored() -> None:
    """An Indexed Job that is not sharded (no MICS_SHARD_COUNT) runs every job."""
    assert resolve_shard(None, {SHARD_INDEX_ENV: "3"}) is None


def test_shard_count_without_index_is_an_error() -> None:
    """MICS_SHARD_COUNT without JOB_COMPLETION_INDEX would run every job N times: refuse."""
    with pytest.raises(ValueError, match=f"{SHARD_COUNT_ENV} is set but {SHARD_INDEX_ENV}"):
        resolve_shard(None, {SHARD_COUNT_ENV: "4"})


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({SHARD_INDEX_ENV: "x", SHARD_COUNT_ENV: "4"}, SHARD_INDEX_ENV),
        ({SHARD_INDEX_ENV: "-1", SHARD_COUNT_ENV: "4"}, SHARD_INDEX_ENV),
        ({SHARD_INDEX_ENV: "4", SHARD_COUNT_ENV: "4"}, SHARD_INDEX_ENV),
        ({SHARD_INDEX_ENV: "0", SHARD_COUNT_ENV: "four"}, SHARD_COUNT_ENV),
        ({SHARD_INDEX_ENV: "0", SHARD_COUNT_ENV: "0"}, SHARD_COUNT_ENV),
        ({SHARD_INDEX_ENV: "0", SHARD_COUNT_ENV: "2.5"}, SHARD_COUNT_ENV),
    ],
)
def test_bad_environment_names_the_variable(environ: dict[str, str], variable: str) -> None:
    """Bad environment values raise a one-line ValueError that names the culprit variable."""
    with pytest.raises(ValueError, match=f"invalid environment variable {variable}=") as info:
        resolve_shard(None, environ)
    assert "\n" not in str(info.value)


def test_select_rejects_an_impossible_shard() -> None:
    """select() refuses an index outside 0..N-1 instead of silently returning nothing."""
    with pytest.raises(ValueError, match="out of range"):
        select(NAMES, 4, 4)
    with pytest.raises(ValueError, match="at least 1"):
        select(NAMES, 0, 0)


# -- end to end: shard folders -----------------------------------------------------------------
def _sim(*specs: ExportSpec) -> SimulatorThread:
    return SimulatorThread(SimulatorConfig(token=TOKEN, exports=specs))


def test_two_shards_started_at_once_write_their_own_folders(tmp_path: Path) -> None:
    """--shard 0/2 and 1/2 started together both succeed, each into OUTPUT_DIR/shard-I-of-2/ with its own manifest."""
    names = [f"job-{i}" for i in range(6)]
    specs = [ExportSpec(str(i), size_bytes=2_000, pending_s=0.01, running_s=0.3) for i in range(6)]
    with _sim(*specs) as sim:
        path = write_jobs(tmp_path, [{"name": n, "export_id": str(i)} for i, n in enumerate(names)])
        procs = [start_cli("run", str(path), "--shard", f"{i}/2", env=cli_env(sim.url)) for i in range(2)]
        results = [(p.wait(timeout=60), p.communicate()[1]) for p in procs]
    assert [code for code, _ in results] == [0, 0], results
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [shard_folder(0, 2), shard_folder(1, 2)]
    ran = [set(jobs_by_name(manifest(out / shard_folder(i, 2)))) for i in range(2)]
    assert ran == [set(select(names, i, 2)) for i in range(2)]
    assert ran[0] | ran[1] == set(names)


def test_an_empty_shard_warns_and_succeeds_into_the_given_folder(tmp_path: Path) -> None:
    """A shard that selects no job exits 0, warns, says so in the summary, and sends nothing; --output-dir is kept."""
    empty = 1 - shard_of("only", 2)
    with _sim(ExportSpec("1")) as sim:
        path = write_jobs(tmp_path, [{"name": "only", "export_id": "1"}])
        given = tmp_path / "given"
        done = cli_in_process(
            "run", str(path), "--shard", f"{empty}/2", "--output-dir", str(given), env=cli_env(sim.url)
        )
        requests = sim.stats.total_requests
    assert done.returncode == 0, done.stderr
    assert f"shard {empty}/2 selects none of the 1 job(s)" in done.stderr
    assert "no job selected" in done.stderr
    assert manifest(given)["jobs"] == [] and manifest(given)["status"] == "SUCCEEDED"
    assert requests == 0


def test_run_help_names_the_indexed_job_variables() -> None:
    """`run --help` tells where a shard comes from without --shard, and where it writes."""
    # 80 columns, as in a pipe: the help is wrapped the same whatever terminal runs the tests.
    done = cli_in_process("run", "--help", env=cli_env(None, token=None, COLUMNS="80"))
    text = " ".join(done.stdout.split())
    assert SHARD_INDEX_ENV in text and SHARD_COUNT_ENV in text and "shard-I-of-N" in text


def test_an_unknown_only_name_lists_the_valid_ones() -> None:
    """--only with an unknown name says which names are valid, the closest first."""
    job_file = parse_job_file(
        {"version": 1, "jobs": [{"name": n, "export_id": "1"} for n in ("visitors", "emails", "segments")]}, "j.yaml"
    )
    with pytest.raises(ConfigError) as info:
        job_file.select(("visitor",))
    message = str(info.value)
    assert "unknown job(s): visitor" in message
    assert "did you mean visitors?" in message and "valid names: visitors, emails, segments" in message
    many = parse_job_file({"version": 1, "jobs": [{"name": f"j{i}", "export_id": "1"} for i in range(50)]}, "j.yaml")
    with pytest.raises(ConfigError, match=r"valid names: j0, j1, .* j19 \.\.\. and 30 more"):
        many.select(("nope",))
