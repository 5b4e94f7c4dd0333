"""Adversarial review: attacks on "never a wrong file reported as success" not covered elsewhere.

Each test runs the real CLI (``support.cli_in_process``) or the real download path against a
loopback server (:class:`review_servers.FakeApi` behind :mod:`hostile`) and checks one of the
promises: a failed job with one clear line and exit 1, never a file under its final name that
differs from the server's bytes, never a SUCCEEDED entry with the wrong sha256 or records, no
traceback, no token. A fault the review finds is first kept here as ``xfail(strict=True)``
with its cause as the reason, until it is fixed (none is open).

Over ~350 lines on purpose: the review's attacks are kept in one file (numbered sections), so
that the faults it found are listed in one place; the fake API they share is review_servers.py.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hostile import HostileThread, Request, Wire, json_wire
from review_servers import DATA, ETAG, FakeApi, envelope_list, export_of, honest, range_start
from support import TOKEN, cli_env, cli_in_process, jobs_by_name, leftovers, read_manifest_if_any, write_jobs

N = len(DATA)
SHA = hashlib.sha256(DATA).hexdigest()
PREFIX = TOKEN[:8]


def run_fake(
    tmp_path: Path, fake: FakeApi, via: type[HostileThread] = HostileThread, **job: Any
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None, Path]:
    """``mics-export run`` of one job ``j`` on export 1 against ``fake`` (served through a ``via``
    thread); (process, j's entry, out)."""
    with via("http://127.0.0.1:9", fake) as proxy:
        jobs = write_jobs(tmp_path, [{"name": "j", "export_id": "1", **job}])
        proc = cli_in_process("run", str(jobs), env=cli_env(proxy.url))
    out = tmp_path / "out"
    doc = read_manifest_if_any(out)
    entry = jobs_by_name(doc)["j"] if doc else None
    return proc, entry, out


def assert_clean(proc: subprocess.CompletedProcess[str], out: Path) -> None:
    """No traceback, no "unexpected" error, no token (nor its start) in output or any file; no part file."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "unexpected" not in proc.stderr, proc.stderr
    for text in (proc.stderr, proc.stdout):
        assert PREFIX not in text, text
    if out.is_dir():
        for path in out.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert PREFIX.encode() not in path.read_bytes(), path.name
                assert PREFIX not in path.name, path.name
        assert leftovers(out) == []


def assert_exact_or_failed(
    proc: subprocess.CompletedProcess[str], entry: dict[str, Any] | None, out: Path, data: bytes = DATA
) -> str:
    """The headline promise: SUCCEEDED only with the server's exact bytes (``data``); otherwise FAILED,
    exit 1, one error line, no file under the final name. Returns the entry's status."""
    assert_clean(proc, out)
    assert entry is not None, proc.stderr
    final = out / "j.ndjson"
    if entry["status"] == "SUCCEEDED":
        assert proc.returncode == 0, proc.stderr
        assert final.read_bytes() == data
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
        assert entry["records"] == data.count(b"\n")
        return "SUCCEEDED"
    assert proc.returncode == 1, proc.stderr
    assert not final.exists(), f"a {final.stat().st_size}-byte file under the final name of a {entry['status']} job"
    assert entry["error"] and "\n" not in entry["error"]
    return str(entry["status"])


def first_then(bad: Wire, later: Any) -> Any:
    """A download answer: ``bad`` for the first request without Range, ``later(req)`` for the others."""
    calls = {"n": 0}

    async def answer(req: Request) -> Wire:
        calls["n"] += 1
        return bad if calls["n"] == 1 else later(req)

    return answer


# -- 1. lengths that contradict each other ----------------------------------------------------------
def test_a_416_claiming_the_file_ends_at_the_cut_is_not_believed(tmp_path: Path) -> None:
    """200 with Content-Length N cut at 10,000, then the resume answered 416 bytes */10000: never a 10 kB success."""
    fake = FakeApi()
    fake.download = first_then(  # type: ignore[method-assign]
        Wire(200, [("ETag", ETAG)], DATA, cut_at=10_000),
        lambda req: Wire(416, [("Content-Range", f"bytes */{range_start(req)}")]),
    )
    proc, entry, out = run_fake(tmp_path, fake)
    assert_exact_or_failed(proc, entry, out)


def test_a_416_at_the_cut_of_a_short_206_is_not_believed(tmp_path: Path) -> None:
    """A 206 stating total N but cut at 20,000, then 416 bytes */20000 to the next range: never a short success."""
    fake = FakeApi()
    fake.download = first_then(  # type: ignore[method-assign]
        Wire(200, [("ETag", ETAG)], DATA, framing="chunked", cut_at=10_000),
        lambda req: (
            Wire(206, [("ETag", ETAG), ("Content-Range", f"bytes 10000-{N - 1}/{N}")], DATA[10_000:], cut_at=10_000)
            if range_start(req) == 10_000
            else Wire(416, [("Content-Range", f"bytes */{range_start(req)}")])
        ),
    )
    proc, entry, out = run_fake(tmp_path, fake)
    assert_exact_or_failed(proc, entry, out)


def test_a_total_that_shrinks_to_the_bytes_had_is_not_an_end(tmp_path: Path) -> None:
    """A 200 with Content-Length N cut at 10,000; the resume is a 206 claiming bytes 10000-10099/10100: refused."""
    fake = FakeApi()
    fake.download = first_then(  # type: ignore[method-assign]
        Wire(200, [("ETag", ETAG)], DATA, cut_at=10_000),
        lambda req: Wire(206, [("ETag", ETAG), ("Content-Range", "bytes 10000-10099/10100")], DATA[10_000:10_100]),
    )
    proc, entry, out = run_fake(tmp_path, fake)
    assert_exact_or_failed(proc, entry, out)


def test_a_200_to_a_resume_with_another_file_of_the_same_length_restarts(tmp_path: Path) -> None:
    """A cut, then a 200 (Range ignored) with another ETag and other bytes of the same length: never spliced."""
    other = DATA.replace(b'"pad"', b'"PAD"')
    fake = FakeApi()
    state = {"n": 0}

    async def download(req: Request) -> Wire:
        state["n"] += 1
        if state["n"] == 1:
            return Wire(200, [("ETag", ETAG)], DATA, cut_at=10_000)
        return Wire(200, [("ETag", '"v2"')], other)

    fake.download = download  # type: ignore[method-assign]
    proc, entry, out = run_fake(tmp_path, fake)
    assert_clean(proc, out)
    assert entry is not None and entry["status"] == "SUCCEEDED", proc.stderr
    assert (out / "j.ndjson").read_bytes() == other
    assert entry["sha256"] == hashlib.sha256(other).hexdigest()


def test_the_same_bytes_sent_twice_on_a_resume_are_not_kept_twice(tmp_path: Path) -> None:
    """A resume answered with a 206 that starts 5,000 bytes before the asked offset (Content-Range says so): refused."""
    fake = FakeApi()
    fake.download = first_then(  # type: ignore[method-assign]
        Wire(200, [("ETag", ETAG)], DATA, cut_at=10_000),
        lambda req: Wire(206, [("ETag", ETAG), ("Content-Range", f"bytes 5000-{N - 1}/{N}")], DATA[5000:]),
    )
    proc, entry, out = run_fake(tmp_path, fake)
    assert_exact_or_failed(proc, entry, out)


# -- 2. ids the server chooses ----------------------------------------------------------------------
ODD_IDS = {
    "slash": "70/../../../../escape",
    "dot-dot": "..",
    "space": "70 71",
    "newline": "70\n71",
    "nul": "70\x0071",
    "question-mark": "70?first_result=0",
    "percent": "%2e%2e%2f",
    "very-long": "7" * 5000,
    "non-ascii": "\u0667\u0660",
    "the-token": TOKEN,
}


@pytest.mark.parametrize("case", ODD_IDS)
def test_an_execution_id_the_server_makes_odd_is_one_failed_job_or_exact(tmp_path: Path, case: str) -> None:
    """Execution ids with a slash, .., a newline, a NUL, 5,000 digits or the token: exact or one failed job, clean."""
    fake = FakeApi(next_id=lambda: ODD_IDS[case])
    proc, entry, out = run_fake(tmp_path, fake, retries=0)
    assert_exact_or_failed(proc, entry, out)
    assert not (tmp_path / "escape").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["jobs.yaml", "out"]


# -- 3. the executions list in the real API's looser dialect -----------------------------------------
def _listed_as(fake: FakeApi, **changes: Any) -> None:
    """Every listing shows the executions with ``changes`` applied (the create's answer is left alone)."""
    plain = fake.listing

    async def listing(req: Request) -> Wire:
        wire = await plain(req)
        doc = orjson.loads(wire.body)
        doc["data"] = [{**item, **changes} for item in doc["data"]]
        return json_wire(200, doc)

    fake.listing = listing  # type: ignore[method-assign]


@pytest.mark.parametrize("status", ["succeeded", "Succeeded", "SUCCEEDED ", "DONE"])
def test_a_status_that_is_not_the_enums_is_never_taken_for_success(tmp_path: Path, status: str) -> None:
    """A lower-case, padded or unknown status is in progress (NOTES.md): TIMED_OUT at timeout_s, no file, clean."""
    fake = FakeApi(status="PENDING")
    _listed_as(fake, status=status)
    proc, entry, out = run_fake(tmp_path, fake, timeout_s=0.3, retries=0)
    assert assert_exact_or_failed(proc, entry, out) == "TIMED_OUT"
    assert fake.seen["download"] == 0


def test_an_execution_that_disappears_from_the_list_fails_its_job(tmp_path: Path) -> None:
    """Created PENDING, then never listed again: FAILED saying so, one line, exit 1, nothing downloaded."""
    fake = FakeApi(status="PENDING")

    async def listing(req: Request) -> Wire:
        return json_wire(200, envelope_list([]))

    fake.listing = listing  # type: ignore[method-assign]
    proc, entry, out = run_fake(tmp_path, fake, retries=0)
    assert assert_exact_or_failed(proc, entry, out) == "FAILED"
    assert entry is not None and "no longer listed" in entry["error"]


def test_an_execution_deep_in_an_oldest_first_paginated_list_is_found(tmp_path: Path) -> None:
    """25 older executions listed before ours (oldest first, 10 a page): found on page 3, the file exact."""
    fake = FakeApi(status="PENDING")
    older = [{**fake.new_execution(), "status": "FAILED"} for _ in range(25)]
    plain_create = fake.create

    async def create(req: Request) -> Wire:
        wire = await plain_create(req)
        mine = fake.executions.pop(0)
        fake.executions[:] = [*older, {**mine, "status": "SUCCEEDED"}]  # oldest first: ours is last
        return wire

    fake.create = create  # type: ignore[method-assign]
    proc, entry, out = run_fake(tmp_path, fake)
    assert assert_exact_or_failed(proc, entry, out) == "SUCCEEDED"
    assert fake.seen["list"] >= 3


def test_an_execution_listed_twice_with_conflicting_statuses_is_exact_or_failed(tmp_path: Path) -> None:
    """The same id twice in one page, FAILED above SUCCEEDED: exact or failed, never a crash or a wrong file."""
    fake = FakeApi(status="PENDING")

    async def listing(req: Request) -> Wire:
        mine = fake.executions[0]
        items = [{**mine, "status": "FAILED"}, {**mine, "status": "SUCCEEDED"}]
        return json_wire(200, envelope_list(items))

    fake.listing = listing  # type: ignore[method-assign]
    proc, entry, out = run_fake(tmp_path, fake, retries=0)
    assert_exact_or_failed(proc, entry, out)


@pytest.mark.parametrize(
    "files", [["../../../v1/exports"], ["export/../x"], ["export?x"], [""], [None], "export", [{"name": "export"}]]
)
def test_odd_output_files_are_a_plain_name_or_a_failed_job(tmp_path: Path, files: Any) -> None:
    """result.output_files with a path, a query, an empty name, a string or an object: exact or FAILED, clean."""
    fake = FakeApi(result={"output_files": files})
    proc, entry, out = run_fake(tmp_path, fake, retries=0)
    assert_exact_or_failed(proc, entry, out)


def test_a_succeeded_execution_whose_file_is_missing_fails_once(tmp_path: Path) -> None:
    """SUCCEEDED, then 404 on its result file: FAILED naming the 404, one execution (not a new one per try)."""
    fake = FakeApi()

    async def download(req: Request) -> Wire:
        return json_wire(404, {"status": "error", "error": "Resource Not Found", "error_id": "e-404"})

    fake.download = download  # type: ignore[method-assign]
    proc, entry, out = run_fake(tmp_path, fake)
    assert assert_exact_or_failed(proc, entry, out) == "FAILED"
    assert entry is not None and "404" in entry["error"] and "e-404" in entry["error"]
    assert fake.seen["create"] == 1


# -- 4. redirects and the token ---------------------------------------------------------------------
def test_a_same_origin_redirect_with_credentials_in_its_location_is_one_failed_job(tmp_path: Path) -> None:
    """A 302 to http://user:pass@<same host>/file: aiohttp refuses to mix it with Authorization; one failed job."""
    fake = FakeApi()
    state: dict[str, int] = {}

    async def download(req: Request) -> Wire:
        if req.path.startswith("/stored/"):
            return fake.file(req)
        return Wire(302, [("Location", f"http://user:pass@127.0.0.1:{state['port']}/stored/export")])

    fake.download = download  # type: ignore[method-assign]
    with HostileThread("http://127.0.0.1:9", fake) as proxy:
        state["port"] = proxy.server.port
        jobs = write_jobs(tmp_path, [{"name": "j", "export_id": "1", "retries": 0}])
        proc = cli_in_process("run", str(jobs), env=cli_env(proxy.url))
        stored = [r for r in proxy.requests if r.path.startswith("/stored/")]
    out = tmp_path / "out"
    doc = read_manifest_if_any(out)
    assert_exact_or_failed(proc, jobs_by_name(doc)["j"] if doc else None, out)
    assert all(r.headers.get("authorization") in (None, TOKEN) for r in stored)


def test_a_redirect_to_another_port_of_the_same_host_drops_the_token(tmp_path: Path) -> None:
    """A 307 to 127.0.0.1 on another port (another origin): followed, exact, and that port never sees the token."""
    fake = FakeApi()
    storage = FakeApi()
    with HostileThread("http://127.0.0.1:9", storage) as store:
        target = f"http://127.0.0.1:{store.server.port}/v1/exports/1/executions/700/files/technical_name=export"

        async def download(req: Request) -> Wire:
            return Wire(307, [("Location", target)])

        fake.download = download  # type: ignore[method-assign]
        proc, entry, out = run_fake(tmp_path, fake)
        seen = list(store.requests)
    assert assert_exact_or_failed(proc, entry, out) == "SUCCEEDED"
    assert seen and all("authorization" not in r.headers for r in seen)


def test_a_token_in_a_redirect_location_never_reaches_an_error_or_log(tmp_path: Path) -> None:
    """A 302 whose Location carries the token (?sig=TOKEN) to a host that answers 500: FAILED, the token nowhere."""
    fake = FakeApi()

    async def always_500(req: Request, forward: Any) -> Wire:
        return json_wire(500, {"status": "error", "error": f"upstream {req.target} failed"})

    with HostileThread("http://127.0.0.1:9", always_500) as store:
        target = f"http://localhost:{store.server.port}/bucket/export?sig={TOKEN}"

        async def download(req: Request) -> Wire:
            return Wire(302, [("Location", target)])

        fake.download = download  # type: ignore[method-assign]
        with HostileThread("http://127.0.0.1:9", fake) as proxy:
            jobs = write_jobs(tmp_path, [{"name": "j", "export_id": "1", "retries": 0}])
            proc = cli_in_process("run", "-vv", str(jobs), env=cli_env(proxy.url))
    out = tmp_path / "out"
    doc = read_manifest_if_any(out)
    assert assert_exact_or_failed(proc, jobs_by_name(doc)["j"] if doc else None, out) == "FAILED"


@pytest.mark.parametrize("where", ["status", "error_code"])
def test_a_token_echoed_into_the_executions_list_never_shows(tmp_path: Path, where: str) -> None:
    """The list echoes the token as the status or in the error object: clean at -vv, no success."""
    fake = FakeApi(status="PENDING")
    if where == "status":
        _listed_as(fake, status=TOKEN)
    else:
        _listed_as(fake, status="FAILED", error={"message": "boom", "error_code": TOKEN, "id": TOKEN})
    with HostileThread("http://127.0.0.1:9", fake) as proxy:
        jobs = write_jobs(tmp_path, [{"name": "j", "export_id": "1", "retries": 0, "timeout_s": 0.3}])
        proc = cli_in_process("run", "-vv", str(jobs), env=cli_env(proxy.url))
    out = tmp_path / "out"
    doc = read_manifest_if_any(out)
    assert assert_exact_or_failed(proc, jobs_by_name(doc)["j"] if doc else None, out) != "SUCCEEDED"


def test_a_token_echoed_as_the_output_file_name_is_never_put_in_a_url(tmp_path: Path) -> None:
    """output_files: [TOKEN] (a server echoing the header): the token is never sent in a request URL."""
    fake = FakeApi(result={"output_files": [TOKEN]})
    with HostileThread("http://127.0.0.1:9", fake) as proxy:
        jobs = write_jobs(tmp_path, [{"name": "j", "export_id": "1", "retries": 0}])
        proc = cli_in_process("run", str(jobs), env=cli_env(proxy.url))
        targets = [r.target for r in proxy.requests]
    out = tmp_path / "out"
    doc = read_manifest_if_any(out)
    assert_exact_or_failed(proc, jobs_by_name(doc)["j"] if doc else None, out)
    assert not [t for t in targets if PREFIX in t], targets


# -- 5. what an earlier run (or someone) left in the output folder ------------------------------------
def _earlier_run(tmp_path: Path, **changes: Any) -> Path:
    """A first run whose job timed out (execution 700 PENDING), its manifest entry then edited with ``changes``."""
    proc, entry, out = run_fake(tmp_path, FakeApi(status="PENDING"), timeout_s=0.2, retries=0)
    assert entry is not None and entry["status"] == "TIMED_OUT", proc.stderr
    doc = orjson.loads((out / "manifest.json").read_bytes())
    doc["jobs"] = [{**j, **changes} if j["name"] == "j" else j for j in doc["jobs"]]
    (out / "manifest.json").write_bytes(orjson.dumps(doc))
    return out


@pytest.mark.parametrize(
    "planted",
    [
        pytest.param("70/../../../escape"),
        pytest.param("70\x0071"),
        "..",
        "*",
    ],
)
def test_a_planted_execution_id_in_the_manifest_is_one_failed_job_or_exact(tmp_path: Path, planted: str) -> None:
    """A manifest whose RUNNING job names execution '70/../../../escape' (or a NUL, .., *): the rerun is clean."""
    out = _earlier_run(tmp_path, execution_id=planted, status="RUNNING")
    (out / ".j.ndjson.700.part").write_bytes(b"keep me? no: a stale part file")
    proc, entry, out = run_fake(tmp_path, FakeApi())
    assert_exact_or_failed(proc, entry, out)
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize(
    "changes",
    [
        {"status": "SUCCEEDED", "path": "../jobs.yaml", "sha256": "0" * 64},
        {"status": "SUCCEEDED", "path": "/etc/hostname", "sha256": "0" * 64},
        {"status": "DOWNLOADING", "bytes": -5},
        {"status": "SUCCEEDED", "path": "j.ndjson", "sha256": SHA, "bytes": 1, "records": 1},
    ],
)
def test_a_manifest_entry_of_the_right_shape_but_lying_is_never_trusted_into_a_wrong_file(
    tmp_path: Path, changes: dict[str, Any]
) -> None:
    """A SUCCEEDED entry pointing outside the folder, negative bytes, or a sha256 with no file: the rerun is exact."""
    _earlier_run(tmp_path, **changes)
    proc, entry, out = run_fake(tmp_path, FakeApi())
    assert assert_exact_or_failed(proc, entry, out) == "SUCCEEDED"
    assert (tmp_path / "jobs.yaml").read_bytes().startswith(b"version")


# -- 6. a full disk ------------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 48 KiB tmpfs at tmp_path/fs (mount(2) as root; skipped where it is not permitted): smaller than DATA."""
    where = tmp_path / "fs"
    where.mkdir()
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(where)], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        pytest.skip("no mount command")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def _run_into(folder: Path, tmp_path: Path, fake: FakeApi, **job: Any) -> subprocess.CompletedProcess[str]:
    with HostileThread("http://127.0.0.1:9", fake) as proxy:
        jobs = write_jobs(tmp_path, [{"name": "j", "export_id": "1", "retries": 0, **job}])
        return cli_in_process("run", str(jobs), "--output-dir", str(folder), env=cli_env(proxy.url))


def test_a_result_larger_than_the_free_space_fails_its_job_cleanly(tmp_path: Path, small_fs: Path) -> None:
    """An 88 kB result into a 48 KiB file system: FAILED naming ENOSPC, exit 1, no final or part file left."""
    proc = _run_into(small_fs, tmp_path, FakeApi())
    entry = jobs_by_name(orjson.loads((small_fs / "manifest.json").read_bytes()))["j"]
    assert assert_exact_or_failed(proc, entry, small_fs) == "FAILED"
    assert "No space left" in entry["error"] and entry["sha256"] is None
    assert sorted(p.name for p in small_fs.iterdir()) == [".lock", "manifest.json"]


def test_an_error_file_larger_than_the_free_space_fails_only_its_job(tmp_path: Path, small_fs: Path) -> None:
    """A FAILED execution's 200 kB error file into a 48 KiB file system: FAILED, exit 1, no temp file, clean."""
    fake = FakeApi(status="FAILED", error_body=b"stack trace line\n" * 12_000)
    proc = _run_into(small_fs, tmp_path, fake)
    entry = jobs_by_name(orjson.loads((small_fs / "manifest.json").read_bytes()))["j"]
    assert assert_exact_or_failed(proc, entry, small_fs) == "FAILED"
    assert [p.name for p in small_fs.iterdir() if p.name.endswith(".tmp")] == []


# -- 7. validators on a resume, in this run and across a kill -------------------------------------------
OTHER = DATA.replace(b'"pad"', b'"PAD"')
"""Another file of exactly the same length and line count (the content changed on the server)."""


@pytest.mark.parametrize("tag", ['W/"v2"', None])
def test_a_206_with_a_weak_or_no_validator_after_a_strong_one_is_never_spliced(tmp_path: Path, tag: str | None) -> None:
    """A cut after ETag "v1", then a 206 of another file with a weak ETag W/"v2" (or none): never a SUCCEEDED mix."""
    fake = FakeApi()
    headers = [("ETag", tag)] if tag else []
    fake.download = first_then(  # type: ignore[method-assign]
        Wire(200, [("ETag", ETAG)], DATA, cut_at=10_000),
        lambda req: Wire(
            206,
            [*headers, ("Content-Range", f"bytes {range_start(req)}-{N - 1}/{N}")],
            OTHER[range_start(req) or 0 :],
        ),
    )
    proc, entry, out = run_fake(tmp_path, fake)
    assert_clean(proc, out)
    assert entry is not None
    if entry["status"] == "SUCCEEDED":
        assert (out / "j.ndjson").read_bytes() in (DATA, OTHER), "a mix of two files"


def _killed_while_downloading(tmp_path: Path, part: bytes, status: str = "DOWNLOADING", **changes: Any) -> FakeApi:
    """The folder a kill -9 leaves mid-download of execution 700 (its manifest entry and ``part``);
    returns a fake API on which execution 700 has SUCCEEDED."""
    out = _earlier_run(tmp_path, execution_id="700", status=status, **changes)
    (out / ".j.ndjson.700.part").write_bytes(part)
    fake = FakeApi(next_id=lambda: "800")
    fake.executions.append({**fake.new_execution(), "id": "700", "status": "SUCCEEDED"})
    return fake


def test_a_part_file_longer_than_the_file_is_not_a_dead_end(tmp_path: Path) -> None:
    """A kill -9 left a part file longer than the server's file: the rerun is exact or one failed job, clean."""
    fake = _killed_while_downloading(tmp_path, DATA + b'{"extra":1}\n')
    proc, entry, out = run_fake(tmp_path, fake)
    assert_exact_or_failed(proc, entry, out)


def _asked_ranges(fake: FakeApi) -> list[tuple[str | None, str | None]]:
    """The (Range, If-Range) of each download request ``fake`` answers from now on."""
    ranges: list[tuple[str | None, str | None]] = []
    answer = fake.download

    async def download(req: Request) -> Wire:
        ranges.append((req.headers.get("range"), req.headers.get("if-range")))
        return await answer(req)

    fake.download = download  # type: ignore[method-assign]
    return ranges


@pytest.mark.parametrize("recorded", [None, '"v0"'], ids=["no-validator-recorded", "old-validator-recorded"])
def test_a_resume_across_a_kill_after_the_file_changed_is_never_a_mix(tmp_path: Path, recorded: str | None) -> None:
    """kill -9 after 10,000 bytes of the old file (its ETag "v0" recorded, or none); the server now has
    another file (ETag "v1", If-Range ignored): the rerun downloads it whole, never a mix."""
    fake = _killed_while_downloading(tmp_path, OTHER[:10_000], file_validator=recorded, file_size=N)
    ranges = _asked_ranges(fake)
    proc, entry, out = run_fake(tmp_path, fake)
    assert_clean(proc, out)
    assert entry is not None and entry["status"] == "SUCCEEDED", proc.stderr
    assert (out / "j.ndjson").read_bytes() == DATA, "a mix of two files"
    assert (entry["file_validator"], entry["file_size"]) == (ETAG, N)
    # With "v0" recorded, the resume asks with If-Range "v0"; the 206 of "v1" restarts it from byte 0.
    assert ranges[0] == (("bytes=10000-", recorded) if recorded else (None, None))


def test_a_part_file_of_the_recorded_validator_is_resumed_with_if_range(tmp_path: Path) -> None:
    """kill -9 after 10,000 bytes with ETag "v1" recorded: the rerun asks only for the rest, with If-Range."""
    fake = _killed_while_downloading(tmp_path, DATA[:10_000], file_validator=ETAG, file_size=N)
    ranges = _asked_ranges(fake)
    proc, entry, out = run_fake(tmp_path, fake)
    assert_exact_or_failed(proc, entry, out)
    assert entry is not None and entry["status"] == "SUCCEEDED", proc.stderr
    assert ranges == [("bytes=10000-", ETAG)]


@pytest.mark.parametrize("etag", [f'"{TOKEN}"', '"' + "e" * 300 + '"'], ids=["echoes-token", "300-chars"])
def test_an_odd_file_validator_is_never_recorded(tmp_path: Path, etag: str) -> None:
    """An ETag that echoes the token, or of 300 characters: the file is had, the validator not kept."""
    fake = FakeApi()
    fake.download = lambda req: _answer(honest(DATA, req, etag=etag))  # type: ignore[method-assign]
    proc, entry, out = run_fake(tmp_path, fake)
    assert assert_exact_or_failed(proc, entry, out) == "SUCCEEDED"
    assert entry is not None and entry["file_validator"] is None


async def _answer(wire: Wire) -> Wire:
    return wire


def test_a_complete_part_file_that_no_longer_hashes_as_recorded_is_not_renamed(tmp_path: Path) -> None:
    """Killed between the SUCCEEDED record (sha256 of DATA) and the rename; the part file now holds other bytes
    of the same size (a bad disk, a hand): never renamed into place as SUCCEEDED."""
    fake = _killed_while_downloading(tmp_path, OTHER, status="SUCCEEDED", path="j.ndjson", sha256=SHA, bytes=N)
    proc, entry, out = run_fake(tmp_path, fake)
    assert_exact_or_failed(proc, entry, out)


# -- 8. query jobs: the export's id is the server's ----------------------------------------------------


@pytest.mark.parametrize(
    "export_id",
    [
        pytest.param("\u00b2", id="superscript-two"),
        pytest.param("1" * 5000, id="5000-digits"),
        pytest.param("12", id="plain"),
    ],
)
def test_an_odd_export_id_in_the_exports_list_is_one_failed_job_or_exact(tmp_path: Path, export_id: str) -> None:
    """The query job's export listed with id "²" or 5,000 digits (int() refuses both): exact or one failed job."""
    text = 'SELECT {id} FROM UserPoint WHERE segments {id="1"}'
    fake = FakeApi()

    async def other(req: Request) -> Wire:
        if req.method == "GET" and req.path == "/v1/exports":
            item = {"id": export_id, "name": "mics-export:j", "query_id": "5", "datamart_id": "1509"}
            return json_wire(200, envelope_list([item]))
        if req.method == "GET" and req.path == "/v1/datamarts/1509/queries/5":
            return json_wire(200, {"status": "ok", "data": {"id": "5", "datamart_id": "1509", "query_text": text}})
        return json_wire(404, {"status": "error", "error": "Resource Not Found", "error_id": "e-3"})

    fake.other = other  # type: ignore[method-assign]
    with HostileThread("http://127.0.0.1:9", fake) as proxy:
        jobs = write_jobs(tmp_path, [{"name": "j", "query": {"datamart_id": "1509", "text": text}, "retries": 0}])
        proc = cli_in_process("run", str(jobs), env=cli_env(proxy.url))
    out = tmp_path / "out"
    doc = read_manifest_if_any(out)
    assert_exact_or_failed(proc, jobs_by_name(doc)["j"] if doc else None, out)


# -- 9. digits that str.isdigit() accepts and int() does not ------------------------------------------


@pytest.mark.parametrize("where", ["416-total", "206-start", "206-total", "206-5000-digits"])
def test_non_ascii_digits_in_range_headers_are_one_failed_job(tmp_path: Path, where: str) -> None:
    """Content-Range 'bytes */²', 'bytes ²-…' or a 5,000-digit end: one failed job, never an unexpected error."""
    fake = FakeApi()
    odd = "\u00b2"

    def later(req: Request) -> Wire:
        start = range_start(req) or 0
        value = {
            "416-total": f"bytes */{odd}",
            "206-start": f"bytes {odd}-{N - 1}/{N}",
            "206-total": f"bytes {start}-{N - 1}/1{odd}",
            "206-5000-digits": f"bytes {start}-{'9' * 5000}/{N}",
        }[where]
        status = 416 if where == "416-total" else 206
        body = b"" if status == 416 else DATA[start:]
        head = f"HTTP/1.1 {status} X\r\nContent-Range: {value}\r\nContent-Length: {len(body)}\r\n\r\n"
        return Wire(status, [], raw=head.encode("utf-8") + body)

    first = (
        Wire(200, [("ETag", ETAG)], DATA, framing="close")
        if where == "416-total"
        else Wire(200, [("ETag", ETAG)], DATA, cut_at=10_000)
    )
    fake.download = first_then(first, later)  # type: ignore[method-assign]
    proc, entry, out = run_fake(tmp_path, fake, retries=0)
    assert assert_exact_or_failed(proc, entry, out) == "FAILED"


# -- 10. a refusal from the storage host a download was redirected to --------------------------------
def test_a_403_from_the_storage_host_of_a_redirect_fails_that_job_not_the_run(tmp_path: Path) -> None:
    """Job a's file is redirected to another host that answers 403 (an expired signed URL); job b is fine:
    a FAILED, b SUCCEEDED exact (the API token was not refused, so the run is not stopped)."""
    fake = FakeApi(status="PENDING")

    async def refuse(req: Request, forward: Any) -> Wire:
        return Wire(403, [("Content-Type", "application/xml")], b"<Error><Code>AccessDenied</Code></Error>")

    with HostileThread("http://127.0.0.1:9", refuse) as store:
        plain = fake.download

        async def download(req: Request) -> Wire:
            if req.path.startswith("/v1/exports/1/"):
                return Wire(302, [("Location", f"http://localhost:{store.server.port}/bucket/a?X-Amz-Signature=1")])
            return await plain(req)

        async def listing(req: Request) -> Wire:
            # a's execution succeeds at once; b's only once a's download was tried: b is still running then.
            mine = [e for e in fake.executions if e["export"] == export_of(req)]
            go = export_of(req) == "1" or fake.seen["download"] > 0
            return json_wire(200, envelope_list([{**e, "status": "SUCCEEDED" if go else "PENDING"} for e in mine]))

        fake.download = download  # type: ignore[method-assign]
        fake.listing = listing  # type: ignore[method-assign]
        with HostileThread("http://127.0.0.1:9", fake) as proxy:
            jobs = write_jobs(
                tmp_path,
                [{"name": "a", "export_id": "1", "retries": 0}, {"name": "b", "export_id": "2", "retries": 0}],
                concurrency=2,
            )
            proc = cli_in_process("run", str(jobs), env=cli_env(proxy.url))
    out = tmp_path / "out"
    assert_clean(proc, out)
    entries = jobs_by_name(orjson.loads((out / "manifest.json").read_bytes()))
    assert entries["b"]["status"] == "SUCCEEDED", entries["b"]["error"]
    assert entries["a"]["status"] == "FAILED" and "403" in entries["a"]["error"]
    assert "refused the token" not in entries["a"]["error"], entries["a"]["error"]
    assert (out / "b.ndjson").read_bytes() == DATA


# -- 12. the API's error envelope served with 200 where the file was asked for --------------------------
ENVELOPE = b'{"status":"error","error":"Internal server error","error_id":"e-77"}'
JSON = [("Content-Type", "application/json")]


def test_an_error_envelope_served_as_the_file_is_retried_never_saved(tmp_path: Path) -> None:
    """200 application/json with the API's error envelope, then the file: exact, the envelope never saved."""
    fake = FakeApi()
    fake.download = first_then(Wire(200, JSON, ENVELOPE), lambda req: honest(DATA, req))  # type: ignore[method-assign]
    proc, entry, out = run_fake(tmp_path, fake)
    assert assert_exact_or_failed(proc, entry, out) == "SUCCEEDED"
    assert fake.seen["download"] >= 2


def test_an_error_envelope_every_time_fails_the_job_saying_so(tmp_path: Path) -> None:
    """The envelope at every try: the job FAILS naming the API's message and error_id; no file."""
    fake = FakeApi()
    fake.download = lambda req: _answer(Wire(200, JSON, ENVELOPE))  # type: ignore[method-assign]
    proc, entry, out = run_fake(tmp_path, fake, retries=0)
    assert assert_exact_or_failed(proc, entry, out) == "FAILED"
    assert entry is not None
    assert "Internal server error" in entry["error"] and "e-77" in entry["error"], entry["error"]


@pytest.mark.parametrize(
    "data",
    [b'{"status":"error","code":1}\n', b'{"status":"ok","error":"none"}\n', DATA],
    ids=["no-error-key", "status-ok", "80-kB"],
)
def test_a_json_result_that_is_no_error_envelope_is_the_file(tmp_path: Path, data: bytes) -> None:
    """A result served as application/json that is not the envelope (or is 80 kB) is saved byte for byte."""
    fake = FakeApi(data=data)
    fake.download = lambda req: _answer(Wire(200, JSON, data))  # type: ignore[method-assign]
    proc, entry, out = run_fake(tmp_path, fake)
    assert assert_exact_or_failed(proc, entry, out, data) == "SUCCEEDED"


def test_a_json_file_cut_within_its_first_bytes_is_resumed(tmp_path: Path) -> None:
    """200 application/json (read whole to tell an envelope) cut at byte 100, then the rest: exact."""
    fake = FakeApi()
    fake.download = first_then(  # type: ignore[method-assign]
        Wire(200, [*JSON, ("ETag", ETAG)], DATA, cut_at=100), lambda req: honest(DATA, req)
    )
    proc, entry, out = run_fake(tmp_path, fake)
    assert assert_exact_or_failed(proc, entry, out) == "SUCCEEDED"


# -- 11. the same attacks through `mics-export download` -----------------------------------------------
def _download_cmd(tmp_path: Path, fake: FakeApi, *out: str) -> subprocess.CompletedProcess[str]:
    fake.executions.append({**fake.new_execution(), "id": "700", "export": "1"})
    with HostileThread("http://127.0.0.1:9", fake) as proxy:
        return cli_in_process("download", "1", "700", *out, env=cli_env(proxy.url))


def test_download_command_never_writes_a_file_cut_short_by_a_416(tmp_path: Path) -> None:
    """`download 1 700 -o FILE`: a cut, then 416 bytes */10000 to the resume: exit 1 and no FILE, never 10 kB."""
    fake = FakeApi()
    fake.download = first_then(  # type: ignore[method-assign]
        Wire(200, [("ETag", ETAG)], DATA, cut_at=10_000),
        lambda req: Wire(416, [("Content-Range", f"bytes */{range_start(req)}")]),
    )
    target = tmp_path / "f.ndjson"
    proc = _download_cmd(tmp_path, fake, "-o", str(target))
    assert_clean(proc, tmp_path)
    if proc.returncode == 0:
        assert target.read_bytes() == DATA
    else:
        assert not target.exists()


def test_download_to_stdout_that_cannot_finish_exits_1(tmp_path: Path) -> None:
    """`download 1 700 -o -` whose body is cut every time (no Range support): exit 1, one error line, no traceback."""
    fake = FakeApi()

    async def download(req: Request) -> Wire:
        return Wire(200, [], DATA, cut_at=10_000)

    fake.download = download  # type: ignore[method-assign]
    proc = _download_cmd(tmp_path, fake, "-o", "-")
    assert_clean(proc, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "error" in line]) == 1, proc.stderr


def test_download_command_never_continues_a_part_file_left_by_a_killed_download(tmp_path: Path) -> None:
    """A part file of another content at `download`'s part name (a killed earlier `download`): the file is
    downloaded whole, never continued (nothing recorded the validator of those bytes)."""
    (tmp_path / ".f.ndjson.700.part").write_bytes(OTHER[:10_000])
    target = tmp_path / "f.ndjson"
    proc = _download_cmd(tmp_path, FakeApi(), "-o", str(target))
    assert_clean(proc, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert target.read_bytes() == DATA
