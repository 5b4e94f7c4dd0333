"""Real object-storage servers on loopback for the tests: moto (S3) and azurite (Azure Blob).

Import the fixtures into a test module (``from cloud import s3_fixture, azure_fixture, ...``):
they register under the names ``s3``, ``azure``, ``moto_server`` and ``azurite``.

- ``moto_server`` (session): ``moto`` in server mode in a child process on 127.0.0.1 and a free
  port, with authentication ON: a wrong key or secret is refused (403) as by AWS. The first
  three requests (unauthenticated, as moto allows) create an IAM user with an allow-all policy
  and its access key; every request after that must be signed with it.
- ``s3`` (per test): a fresh bucket and the standard ``AWS_*`` environment pointing at moto,
  plus a boto3 client to look behind obstore's back (``list_multipart_uploads``).
- ``azurite`` (session): Microsoft's emulator (``azurite-blob``, in memory) on a free port.
  Looked up in ``$MICS_AZURITE_BLOB``, then ``.ci/azurite/node_modules/.bin/azurite-blob``
  (``.ci/run`` installs it there), then ``$PATH``. Skipped with the reason when node or
  azurite is absent.
- ``azure`` (per test): a fresh container and the emulator's standard environment
  (``AZURE_STORAGE_USE_EMULATOR``, ``AZURITE_BLOB_STORAGE_URL``), plus a raw REST helper
  (Shared Key signed) for what obstore does not expose (container creation, block lists).

Servers are started once per session (moto ~1 s, azurite ~1 s) and stopped at its end; they
die with their parent too (moto reads stdin until EOF, azurite is killed at teardown). Under
pytest-xdist each worker is a session with its own servers, on ports the OS picks (port 0),
and its own temporary folders: nothing is shared between workers but the machine.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 60.0

_MOTO_LAUNCHER = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the test session closes our stdin (or dies)
server.stop()
"""

AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
"""The emulator's well-known account and key (public, documented by Microsoft)."""

_STORAGE_ENV_PREFIXES = ("AWS_", "AZURE_", "AZURITE_", "GOOGLE_")


def _read_line(stream: Any, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
    """The first line of a child's output matching ``pattern``, read in a thread with a deadline."""
    found: queue.Queue[re.Match[str] | None] = queue.Queue()

    def reader() -> None:
        for line in stream:
            match = pattern.search(line)
            if match:
                found.put(match)
                break
        else:
            found.put(None)
        for _line in stream:  # keep draining so the child never blocks on a full pipe
            pass

    threading.Thread(target=reader, daemon=True).start()
    try:
        match = found.get(timeout=timeout)
    except queue.Empty:
        match = None
    if match is None:
        raise RuntimeError(f"the server did not report {pattern.pattern!r} within {timeout:.0f} s")
    return match


def _stop(process: subprocess.Popen[str]) -> None:
    """Stop a server we started (by its handle), killing it if it lingers."""
    if process.stdin:
        process.stdin.close()
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def clean_storage_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every cloud credential / endpoint variable so only what a test sets applies."""
    for name in list(os.environ):
        if name.startswith(_STORAGE_ENV_PREFIXES):
            monkeypatch.delenv(name)


# --------------------------------------------------------------------------- S3 (moto)


@dataclass(frozen=True)
class MotoServer:
    endpoint: str
    access_key: str
    secret_key: str


@pytest.fixture(scope="session", name="moto_server")
def moto_server_fixture() -> Iterator[MotoServer]:
    """moto's S3 (and IAM) on 127.0.0.1, authentication enforced after the IAM setup."""
    import boto3

    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    process = subprocess.Popen(
        [sys.executable, "-c", _MOTO_LAUNCHER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        port = int(_read_line(process.stdout, re.compile(r"^(\d+)$"), STARTUP_TIMEOUT_S).group(1))
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client(
            "iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
        )
        iam.create_user(UserName="tests")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="tests", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="tests")["AccessKey"]
        yield MotoServer(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        _stop(process)


@dataclass(frozen=True)
class S3Bucket:
    server: MotoServer
    bucket: str
    client: Any
    """A boto3 S3 client with the same credentials, for checks obstore cannot make."""

    def get(self, key: str) -> bytes | None:
        """The object's bytes (None: no such key)."""
        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None
        return body

    def manifest(self, prefix: str) -> dict[str, Any] | None:
        """The manifest a run wrote under ``prefix``, parsed (None: none)."""
        data = self.get(f"{prefix}/manifest.json")
        return None if data is None else dict(json.loads(data))

    def pending_uploads(self) -> list[str]:
        """Keys with a multipart upload started and neither completed nor aborted."""
        answer = self.client.list_multipart_uploads(Bucket=self.bucket)
        return [upload["Key"] for upload in answer.get("Uploads", [])]


@pytest.fixture(name="s3")
def s3_fixture(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A new bucket in moto, and the standard AWS environment pointing at it."""
    import boto3

    clean_storage_env(monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_server.secret_key)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    client = boto3.client(
        "s3",
        endpoint_url=moto_server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=moto_server.access_key,
        aws_secret_access_key=moto_server.secret_key,
    )
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    return S3Bucket(moto_server, bucket, client)


# --------------------------------------------------------------------------- Azure (azurite)


def azurite_command() -> str | None:
    """The azurite-blob executable, or None."""
    candidates = [
        os.environ.get("MICS_AZURITE_BLOB", ""),
        str(REPO / ".ci" / "azurite" / "node_modules" / ".bin" / "azurite-blob"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("azurite-blob")


@pytest.fixture(scope="session", name="azurite")
def azurite_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """azurite's Blob service on 127.0.0.1 (in memory); its base URL."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the Azure tests need azurite (npm package) to run")
    command = azurite_command()
    if command is None:
        pytest.skip("azurite is not installed: npm install --prefix .ci/azurite azurite (or set MICS_AZURITE_BLOB)")
    workdir = tmp_path_factory.mktemp("azurite")
    process = subprocess.Popen(
        [
            command,
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            "0",
            "--inMemoryPersistence",
            "--disableTelemetry",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=workdir,
    )
    try:
        match = _read_line(process.stdout, re.compile(r"listens on (http://\S+)"), STARTUP_TIMEOUT_S)
        yield match.group(1).rstrip("/")
    finally:
        _stop(process)


def azure_request(
    base: str,
    method: str,
    path: str,
    query: dict[str, str] | None = None,
    body: bytes = b"",
) -> tuple[int, bytes]:
    """A Shared Key signed request to azurite (``path`` starts with ``/CONTAINER``)."""
    query = query or {}
    headers = {"x-ms-date": email.utils.formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
    canonical_headers = "".join(f"{name}:{value}\n" for name, value in sorted(headers.items()))
    # Path-style URLs (http://host/ACCOUNT/...) sign the account twice, as azurite expects.
    resource = f"/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}{path}" + "".join(
        f"\n{name.lower()}:{value}" for name, value in sorted(query.items())
    )
    length = str(len(body)) if body else ""
    string_to_sign = f"{method}\n\n\n{length}\n\n\n\n\n\n\n\n\n{canonical_headers}{resource}"
    digest = hmac.new(base64.b64decode(AZURITE_KEY), string_to_sign.encode(), hashlib.sha256).digest()
    headers["Authorization"] = f"SharedKey {AZURITE_ACCOUNT}:{base64.b64encode(digest).decode()}"
    if method in ("PUT", "POST") and not body:
        headers["Content-Length"] = "0"
    url = f"{base}/{AZURITE_ACCOUNT}{urllib.parse.quote(path)}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    # Only ever http://127.0.0.1:PORT, built just above from azurite's own announcement.
    request = urllib.request.Request(url, data=body or None, method=method, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@dataclass(frozen=True)
class AzureContainer:
    base: str
    container: str

    def blocks(self, blob: str) -> tuple[list[str], list[str]]:
        """(committed, uncommitted) block ids of ``blob``; both empty when it has none."""
        status, body = azure_request(
            self.base, "GET", f"/{self.container}/{blob}", {"comp": "blocklist", "blocklisttype": "all"}
        )
        if status == 404:
            return [], []
        assert status == 200, (status, body[:300])
        text = body.decode()
        committed = re.search(r"<CommittedBlocks>(.*?)</CommittedBlocks>", text, re.DOTALL)
        uncommitted = re.search(r"<UncommittedBlocks>(.*?)</UncommittedBlocks>", text, re.DOTALL)

        def names(section: re.Match[str] | None) -> list[str]:
            return re.findall(r"<Name>(.*?)</Name>", section.group(1)) if section else []

        return names(committed), names(uncommitted)


@pytest.fixture(name="azure")
def azure_fixture(azurite: str, monkeypatch: pytest.MonkeyPatch) -> AzureContainer:
    """A new container in azurite, and the emulator's standard environment pointing at it."""
    clean_storage_env(monkeypatch)
    monkeypatch.setenv("AZURE_STORAGE_USE_EMULATOR", "true")
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", azurite)
    container = f"test-{uuid.uuid4().hex[:16]}"
    status, body = azure_request(azurite, "PUT", f"/{container}", {"restype": "container"})
    assert status == 201, (status, body[:300])
    return AzureContainer(azurite, container)
