"""``mics-export download``: one execution's result to a file, stdout or a bucket object.

The same checked, atomic download as a run's (:func:`orchestrator.download.download`): a
file appears under its name only when complete, an object only when its multipart upload
completes, and every line is checked on the way. ``--error-file`` fetches a FAILED
execution's error file instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click
import orjson

from orchestrator.api import ApiClient
from orchestrator.cli_common import api_url_option, execution_id_argument, export_id_argument, json_option, with_api
from orchestrator.config import is_url
from orchestrator.errors import EXIT_OK, MicsExportError, TransportError, UsageError

if TYPE_CHECKING:
    from orchestrator.bucket_sink import BucketSink
    from orchestrator.download import DownloadResult, Target


_COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd"}
_OTHER_COMPRESSIONS = {".bz2", ".xz", ".lz4", ".lzma", ".zip", ".tgz", ".7z", ".br", ".z", ".zstd", ".gzip"}


def _compression_of(name: str) -> str:
    """The compression an output's name asks for: ``.gz`` gzip, ``.zst`` zstd, else none.

    Anything else that looks like compression (``.bz2``, ``.xz``, ``.gz.zst``...) is refused
    rather than written uncompressed under a name that promises otherwise.
    """
    suffixes = [s.lower() for s in Path(name).suffixes]
    last = suffixes[-1] if suffixes else ""
    before = suffixes[-2] if len(suffixes) > 1 else ""
    stacked = last in _COMPRESSION_SUFFIXES and before in {*_COMPRESSION_SUFFIXES, *_OTHER_COMPRESSIONS}
    if last in _OTHER_COMPRESSIONS or stacked:
        raise UsageError(
            f"{name}: unsupported compression suffix {''.join(suffixes[-2:]) if before else last}: "
            "end the name with .gz (gzip), .zst (zstd) or neither (uncompressed)"
        )
    return _COMPRESSION_SUFFIXES.get(last, "none")


class _StdoutTarget:
    """``-o -``: the checked bytes go to stdout as they come (no temporary file, no rename)."""

    name = "-"
    can_rename = True

    @property
    def where(self) -> Path:
        return Path("-")

    async def open(self, resume: bool) -> int:
        return 0

    async def read_back(self, size: int, checker: Any, digest: Any) -> None:
        raise AssertionError("stdout is never resumed")

    def output(self) -> Any:
        out = sys.stdout.buffer

        class _Out:
            write = out.write

            @staticmethod
            def finish() -> None:
                out.flush()

            @staticmethod
            def close() -> None:
                pass

        return _Out()

    async def restart(self) -> None:
        # Bytes already on stdout cannot be taken back: the reader would get them twice.
        # Not a usage error (exit 2 says nothing was sent): the API's answer failed it, exit 1.
        raise TransportError("the result changed on the server while it was written to stdout: run the command again")

    async def prepare_commit(self) -> str | None:
        return None

    async def commit(self, name: str | None) -> tuple[str | None, int] | None:
        return None

    async def abort(self) -> None:
        pass

    def retarget(self, name: str) -> Any:
        raise NotImplementedError


@click.command()
@export_id_argument
@execution_id_argument
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    metavar="FILE|-|URL",
    help="A file (.gz / .zst: compressed so), - for stdout, or s3:// gs:// az:// abfs:// URL of the object.",
)
@click.option(
    "--error-file",
    is_flag=True,
    help="Download a FAILED execution's error file instead of its result (to FILE or -).",
)
@api_url_option
@json_option
def download(
    export_id: str, execution_id: str, output: str, error_file: bool, api_url: str | None, as_json: bool
) -> int:
    """Download one execution's result to FILE, stdout or a bucket (atomically; lines are checked).

    A file appears under its name only when complete (part file, rename); an object only
    when its multipart upload completes. With ``-o -`` the bytes go to stdout as they are
    checked and the summary to stderr (a failure midway leaves a partial stream: check the
    exit code). An execution that did not succeed has no result: the error says so, and
    ``--error-file`` fetches a FAILED execution's error file.
    """
    if error_file:
        return _download_error_file(export_id, execution_id, output, api_url)
    target, compression, bucket = _target_of(output, execution_id)

    async def body(api: ApiClient) -> DownloadResult:
        if bucket is not None:
            from orchestrator.objstore import check_access

            await check_access(bucket.store, bucket.location.prefix)  # one line for a missing bucket
        return await _fetch(api, export_id, execution_id, target, compression)

    result = with_api(api_url, body)
    _print_summary(output, result, as_json)
    return EXIT_OK


def _target_of(output: str, execution_id: str) -> tuple[Path | Target, str, BucketSink | None]:
    """Where ``-o`` writes (a file, stdout or a bucket object), its compression, and the bucket if any."""
    if output == "-":
        return cast("Target", _StdoutTarget()), "none", None
    if is_url(output):
        from orchestrator.bucket_sink import BucketSink
        from orchestrator.objstore import Location, parse_location

        location = parse_location(output)
        prefix, _, name = location.prefix.rpartition("/")
        if not name:
            raise UsageError(f"{output}: name the object (scheme://bucket/path/NAME.ndjson)")
        compression = _compression_of(name)
        bucket = BucketSink(Location(location.scheme, location.bucket, prefix, location.account))
        return bucket.target(name, execution_id), compression, bucket
    path = Path(output)
    if output.endswith("/") or path.is_dir():
        raise UsageError(f"{output}: is a folder: name the file to write (FOLDER/NAME.ndjson)")
    if not path.parent.is_dir():
        raise UsageError(f"{output}: folder {path.parent} does not exist")
    return path, _compression_of(path.name), None


async def _fetch(
    api: ApiClient, export_id: str, execution_id: str, target: Path | Target, compression: str
) -> DownloadResult:
    """The execution's result into ``target``; an execution without a result says why instead of a 404."""
    from orchestrator.download import download as fetch

    execution = await api.find_execution(export_id, execution_id)
    if execution is not None and not execution.is_success:
        if execution.is_final:
            why = f": {execution.error_message}" if execution.error_message else ""
            raise MicsExportError(
                f"execution {execution_id} of export {export_id} ended {execution.raw_status}{why}; "
                f"it has no result (its error file: mics-export download {export_id} {execution_id} "
                "--error-file -o FILE)"
            )
        raise MicsExportError(
            f"execution {execution_id} of export {export_id} is {execution.raw_status}: no result yet "
            f"(mics-export executions list {export_id} shows when it ends)"
        )
    name = execution.technical_name if execution else "export"
    budget = api.retry.budget(resumable=True)  # one budget for the whole download, restarts included
    return await fetch(
        lambda start: api.stream_result(export_id, execution_id, technical_name=name, start=start, budget=budget),
        target,
        tag=execution_id,
        compression=compression,
        # Nothing records what an earlier, killed `download` had (no manifest, so no validator
        # for If-Range): its part file is deleted, never continued. Cuts within one run resume.
        resume=False,
    )


def _print_summary(output: str, result: DownloadResult, as_json: bool) -> None:
    """One line (or JSON) saying what was written; on stderr when stdout holds the data (``-o -``)."""
    if as_json:
        summary = {
            "path": output,
            "bytes": result.bytes,
            "records": result.records,
            "invalid_lines": result.stats.invalid_lines,
            "sha256": result.sha256,
        }
        text = orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode() + "\n"
    else:
        text = (
            f"{output}: {result.bytes} bytes, {result.records} records, "
            f"{result.stats.invalid_lines} invalid lines, sha256 {result.sha256}\n"
        )
    (sys.stderr if output == "-" else sys.stdout).write(text)


def _download_error_file(export_id: str, execution_id: str, output: str, api_url: str | None) -> int:
    """``download --error-file``: a FAILED execution's error file (scrubbed) to FILE or stdout."""
    if is_url(output):
        raise UsageError(f"{output}: --error-file writes to a local file or - (stdout)")
    path = None if output == "-" else Path(output)
    if path is not None and (output.endswith("/") or path.is_dir() or not path.parent.is_dir()):
        raise UsageError(f"{output}: name a file in an existing folder")

    from orchestrator.models import ExecutionStatus

    async def body(api: ApiClient) -> bytes:
        execution = await api.find_execution(export_id, execution_id)
        if execution is None:
            raise MicsExportError(f"export {export_id} has no execution {execution_id}")
        if execution.status is not ExecutionStatus.FAILED or not execution.organisation_id:
            raise MicsExportError(
                f"execution {execution_id} of export {export_id} is {execution.raw_status}: "
                "only a FAILED execution has an error file"
            )
        text = await api.fetch_error_file(execution.organisation_id, execution_id)
        if text is None:
            raise MicsExportError(f"execution {execution_id} of export {export_id} FAILED without an error file")
        return text

    text = with_api(api_url, body)
    if path is None:
        sys.stdout.buffer.write(text)
        sys.stdout.flush()
    else:
        from orchestrator.manifest import write_atomic

        write_atomic(path, text)
        click.echo(f"{output}: the error file of execution {execution_id}, {len(text)} bytes")
    return EXIT_OK


__all__ = ["download"]
