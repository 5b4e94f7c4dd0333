"""Tests for the container image recipe and the Kubernetes manifests (deploy/k8s).

No cluster and no Docker engine here: the manifests are checked against the Kubernetes
OpenAPI schemas shipped with kubernetes-validate (strict: unknown fields fail), then for
the settings the design relies on, including that the files agree with each other (names,
uid, paths, deadlines). The Dockerfile is parsed and its facts asserted.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from orchestrator.config import parse_job_file

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"

# 1.33: the oldest release where everything the manifests use is GA (backoffLimitPerIndex
# went GA in 1.33, podFailurePolicy in 1.31, CronJob timeZone in 1.27). Plus the newest
# release the installed schemas know, to catch removals.
KUBE_VERSIONS = ("1.33.0", kubernetes_validate.latest_version())
MANIFESTS = (
    "cronjob.yaml",
    "cronjob-s3.yaml",
    "indexed-job.yaml",
    "pvc.yaml",
    "configmap.yaml",
    "secret.example.yaml",
)
CRONJOBS = ("cronjob.yaml", "indexed-job.yaml")
UID = 10001
GRACEFUL_STOP_S = 10  # SPEC: INTERRUPTED manifest and exit within 10 s of SIGTERM
JOB_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


def load(name: str) -> list[dict[str, Any]]:
    """Every YAML document of one manifest file."""
    with (K8S / name).open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def single(name: str) -> dict[str, Any]:
    """The one document of a manifest file."""
    [doc] = load(name)
    return doc


def job_spec(name: str) -> dict[str, Any]:
    """The Job spec inside a CronJob manifest."""
    spec: dict[str, Any] = single(name)["spec"]["jobTemplate"]["spec"]
    return spec


def pod_spec(name: str) -> dict[str, Any]:
    """The pod spec inside a CronJob manifest."""
    spec: dict[str, Any] = job_spec(name)["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    """The mics-export container of a CronJob manifest."""
    [only] = pod_spec(name)["containers"]
    assert only["name"] == "mics-export"
    return dict(only)


def env_of(name: str) -> dict[str, dict[str, Any]]:
    """The container's env entries by variable name."""
    return {entry["name"]: entry for entry in container(name)["env"]}


def job_file() -> dict[str, Any]:
    """The sample job file embedded in configmap.yaml."""
    data: dict[str, Any] = yaml.safe_load(single("configmap.yaml")["data"]["jobs.yaml"])
    return data


# --- schema validation -------------------------------------------------------------------


def test_the_expected_manifests_exist() -> None:
    """deploy/k8s holds exactly the documented manifests (a new one must be added here)."""
    assert sorted(path.name for path in K8S.glob("*.yaml")) == sorted(MANIFESTS)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_is_valid_kubernetes(name: str, version: str) -> None:
    """Every document validates against the Kubernetes schema, strictly (no unknown fields)."""
    docs = load(name)
    assert docs, f"{name} is empty"
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_catches_a_misspelt_field() -> None:
    """The validation above is not a rubber stamp: a typo'd field name is rejected."""
    doc = copy.deepcopy(single("cronjob.yaml"))
    spec = doc["spec"]["jobTemplate"]["spec"]
    spec["activeDeadlineSecond"] = spec.pop("activeDeadlineSeconds")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBE_VERSIONS[0], strict=True)


# --- the CronJobs ------------------------------------------------------------------------


@pytest.mark.parametrize("name", CRONJOBS)
def test_schedule_settings(name: str) -> None:
    """Forbid overlapping runs; both deadlines set; the whole window inside one UTC day."""
    spec = single(name)["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["timeZone"] in {"Etc/UTC", "UTC"}
    starting = spec["startingDeadlineSeconds"]
    active = spec["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    assert starting > 0
    assert active > 0
    # Output goes to /data/{date} with the run's UTC date: a retried pod started as late as
    # the deadlines allow must still see the same date, or it would not resume.
    minute, hour, *_ = spec["schedule"].split()
    start_s = int(hour) * 3600 + int(minute) * 60
    assert start_s + starting + active < 24 * 3600


def test_single_cronjob_retries() -> None:
    """cronjob.yaml: a small backoffLimit, and the tool's own exit codes are final."""
    spec = job_spec("cronjob.yaml")
    assert 0 <= spec["backoffLimit"] <= 3
    fail_job = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    [rule] = fail_job
    assert set(rule["onExitCodes"]["values"]) == {1, 2}
    assert rule["onExitCodes"]["containerName"] == "mics-export"


@pytest.mark.parametrize("name", CRONJOBS)
def test_disruptions_do_not_count_as_failures(name: str) -> None:
    """Evictions and preemptions (DisruptionTarget) are ignored: the replacement resumes."""
    first = job_spec(name)["podFailurePolicy"]["rules"][0]
    assert first["action"] == "Ignore"
    assert first["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]


@pytest.mark.parametrize("name", CRONJOBS)
def test_pod_lifecycle(name: str) -> None:
    """restartPolicy Never (podFailurePolicy needs it); grace period beyond the 10 s stop."""
    pod = pod_spec(name)
    assert pod["restartPolicy"] == "Never"
    assert GRACEFUL_STOP_S < pod["terminationGracePeriodSeconds"] <= 120
    assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("name", CRONJOBS)
def test_security_context(name: str) -> None:
    """Non-root with the image's uid, read-only root, no privilege escalation, no caps."""
    pod = pod_spec(name)["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == UID
    assert pod["fsGroup"] == UID  # so uid 10001 can write to the PVC
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = container(name)["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == UID
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}


@pytest.mark.parametrize("name", CRONJOBS)
def test_resources(name: str) -> None:
    """Requests and limits as sized for a < 150 MiB peak RSS."""
    assert container(name)["resources"] == {
        "requests": {"cpu": "500m", "memory": "256Mi"},
        "limits": {"cpu": "2", "memory": "512Mi"},
    }


@pytest.mark.parametrize("name", CRONJOBS)
def test_token_comes_from_the_secret(name: str) -> None:
    """MICS_API_TOKEN (the job file's token_env) comes from secret mics-export, key api-token."""
    secret = single("secret.example.yaml")
    token_env = job_file()["api"]["token_env"]
    ref = env_of(name)[token_env]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "api-token"}
    assert "api-token" in secret["stringData"]
    assert "value" not in env_of(name)[token_env]  # never inline


@pytest.mark.parametrize("name", CRONJOBS)
def test_metrics_gateway_is_optional(name: str) -> None:
    """MICS_METRICS_PUSHGATEWAY comes from an optional ConfigMap key: absent means no push."""
    ref = env_of(name)["MICS_METRICS_PUSHGATEWAY"]["valueFrom"]["configMapKeyRef"]
    assert ref["optional"] is True
    assert ref["name"] == single("configmap.yaml")["metadata"]["name"]


@pytest.mark.parametrize("name", CRONJOBS)
def test_volumes_and_args(name: str) -> None:
    """Job file from the ConfigMap, outputs on the PVC at /data, /tmp writable, args agree."""
    pod = pod_spec(name)
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container(name)["volumeMounts"]}
    assert {mount["name"] for mount in mounts.values()} <= set(volumes)

    jobs = volumes[mounts["/etc/mics-export"]["name"]]["configMap"]
    assert jobs["name"] == single("configmap.yaml")["metadata"]["name"]
    assert {"key": "jobs.yaml", "path": "jobs.yaml"} in jobs["items"]
    assert mounts["/etc/mics-export"]["readOnly"] is True

    data = volumes[mounts["/data"]["name"]]["persistentVolumeClaim"]
    assert data["claimName"] == single("pvc.yaml")["metadata"]["name"]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]

    args = container(name)["args"]
    assert args[:2] == ["run", "/etc/mics-export/jobs.yaml"]
    assert args[args.index("--progress") + 1] == "off"
    output_dir = args[args.index("--output-dir") + 1]
    assert output_dir.startswith("/data/{date}")


def test_both_cronjobs_share_a_name() -> None:
    """Applying one variant replaces the other, so they can never both run."""
    assert single("cronjob.yaml")["metadata"]["name"] == single("indexed-job.yaml")["metadata"]["name"]


def test_deadline_covers_every_attempt() -> None:
    """activeDeadlineSeconds leaves room for (retries + 1) attempts of the longest job."""
    config = job_file()
    defaults = config["defaults"]
    longest = max(job.get("timeout_s", defaults["timeout_s"]) for job in config["jobs"])
    attempts = defaults["retries"] + 1
    for name in CRONJOBS:
        assert attempts * longest <= job_spec(name)["activeDeadlineSeconds"]


# --- the sharded variant -----------------------------------------------------------------


def test_indexed_job_shards() -> None:
    """Indexed; completions == parallelism == MICS_SHARD_COUNT; retries per shard."""
    spec = job_spec("indexed-job.yaml")
    env = env_of("indexed-job.yaml")
    assert spec["completionMode"] == "Indexed"
    count = int(env["MICS_SHARD_COUNT"]["value"])
    assert count >= 2
    assert spec["completions"] == spec["parallelism"] == count
    assert spec["backoffLimitPerIndex"] >= 1
    assert "maxFailedIndexes" not in spec  # one failed shard must not stop the others
    actions = {
        rule["action"]: set(rule["onExitCodes"]["values"])
        for rule in spec["podFailurePolicy"]["rules"]
        if "onExitCodes" in rule
    }
    assert actions == {"FailJob": {2}, "FailIndex": {1}}


def test_each_shard_writes_its_own_directory() -> None:
    """Shards must not share manifest.json: the output dir carries the completion index."""
    args = container("indexed-job.yaml")["args"]
    output_dir = args[args.index("--output-dir") + 1]
    assert output_dir == "/data/{date}/shard-$(JOB_COMPLETION_INDEX)"
    # $(VAR) in args expands only from the container's variables: make sure it is one.
    ref = env_of("indexed-job.yaml")["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]
    assert ref["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def test_shards_stay_with_a_read_write_once_volume() -> None:
    """With pvc.yaml's ReadWriteOnce claim, the shard pods are kept on one node."""
    assert single("pvc.yaml")["spec"]["accessModes"] == ["ReadWriteOnce"]
    [term] = pod_spec("indexed-job.yaml")["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    pod_labels = job_spec("indexed-job.yaml")["template"]["metadata"]["labels"]
    assert term["labelSelector"]["matchLabels"].items() <= pod_labels.items()


# --- the other manifests -----------------------------------------------------------------


def test_configmap_holds_a_version_1_job_file() -> None:
    """The embedded job file has version 1, SPEC's sections only, and well-formed jobs."""
    config = job_file()
    assert config["version"] == 1
    assert set(config) <= {"version", "api", "run", "defaults", "jobs"}
    jobs = config["jobs"]
    assert isinstance(jobs, list)
    assert jobs
    names = [job["name"] for job in jobs]
    assert len(names) == len(set(names))
    for job in jobs:
        assert JOB_NAME_RE.fullmatch(job["name"])
        assert ("export_id" in job) != ("query" in job), job["name"]


def test_configmap_job_file_passes_the_tools_own_validation() -> None:
    """The sample job file loads with the same parser `mics-export validate` uses."""
    parsed = parse_job_file(job_file(), "deploy/k8s/configmap.yaml")
    assert [job.name for job in parsed.jobs] == [job["name"] for job in job_file()["jobs"]]


def test_secret_is_a_placeholder() -> None:
    """secret.example.yaml carries a placeholder and a loud warning, never a token."""
    text = (K8S / "secret.example.yaml").read_text()
    assert "NEVER COMMIT A REAL TOKEN" in text
    assert single("secret.example.yaml")["stringData"]["api-token"].startswith("REPLACE-ME")


def test_pvc_requests_storage() -> None:
    """The claim has a size and the name the CronJobs mount."""
    pvc = single("pvc.yaml")
    assert pvc["metadata"]["name"] == "mics-export-data"
    assert pvc["spec"]["resources"]["requests"]["storage"]


# --- the Dockerfile ----------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continuation
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, split into build stages at each FROM."""
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, rest))
    return result


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the image that is shipped."""
    return stages()[-1]


def test_dockerfile_is_multi_stage_on_python_slim() -> None:
    """Two stages, both FROM python:3.11-slim (the venv's python links to the base's)."""
    froms = [rest.split()[0] for stage in stages() for keyword, rest in stage if keyword == "FROM"]
    assert froms == ["python:3.11-slim", "python:3.11-slim"]
    assert stages()[0][0][1].split()[-2:] == ["AS", "builder"]


def test_final_stage_only_copies_the_venv() -> None:
    """The shipped image gets the venv from the builder and nothing from the build context."""
    copies = [rest for keyword, rest in final_stage() if keyword in {"COPY", "ADD"}]
    assert copies == ["--from=builder /opt/venv /opt/venv"]


def test_final_stage_has_no_compiler() -> None:
    """No gcc, build-essential or package installs in the shipped image."""
    runs = " ".join(rest for keyword, rest in final_stage() if keyword == "RUN")
    for forbidden in ("gcc", "build-essential", "apt-get install", "pip install"):
        assert forbidden not in runs


def test_final_stage_runtime_settings() -> None:
    """Numeric non-root USER, WORKDIR /data, JSON logs, unbuffered, exec-form entrypoint."""
    final = final_stage()
    [user] = [rest for keyword, rest in final if keyword == "USER"]
    assert user == f"{UID}:{UID}"  # a numeric user and group: runAsNonRoot can check it
    assert [rest for keyword, rest in final if keyword == "WORKDIR"] == ["/data"]
    env: dict[str, str] = {}
    for keyword, rest in final:
        if keyword == "ENV":
            for item in shlex.split(rest):
                key, _, val = item.partition("=")
                env[key] = val
    assert env["MICS_LOG_FORMAT"] == "json"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    [entrypoint] = [rest for keyword, rest in final if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["mics-export"]
    [cmd] = [rest for keyword, rest in final if keyword == "CMD"]
    assert json.loads(cmd) == ["--help"]


def test_entrypoint_is_the_console_script() -> None:
    """The Dockerfile's ENTRYPOINT is exactly a console script pyproject.toml installs, and that
    script is the CLI's main function (a renamed script or entry point breaks the image)."""
    import importlib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [entrypoint] = [rest for keyword, rest in final_stage() if keyword == "ENTRYPOINT"]
    [script] = json.loads(entrypoint)
    assert script in project["scripts"], f"ENTRYPOINT {script!r} is not a script of pyproject.toml"
    module, _, function = project["scripts"][script].partition(":")
    assert module == "orchestrator.cli" and callable(getattr(importlib.import_module(module), function))


def test_builder_copies_what_the_build_needs() -> None:
    """pyproject.toml, its readme and the package reach the builder; .dockerignore keeps them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    sources = {source for keyword, rest in stages()[0] if keyword == "COPY" for source in rest.split()[:-1]}
    needed = {"pyproject.toml", project["readme"], "orchestrator"}
    assert needed <= sources
    for path in needed:
        assert not dockerignored(path), f".dockerignore excludes {path}"


def dockerignore_patterns() -> list[str]:
    """The .dockerignore patterns, comments and blanks dropped."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def dockerignored(path: str) -> bool:
    """Whether .dockerignore excludes ``path`` or one of its parent folders (no ! rules)."""
    patterns = dockerignore_patterns()
    assert not any(p.startswith("!") for p in patterns), "update dockerignored() for ! rules"
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
        for pattern in patterns
        for prefix in prefixes
    )


@pytest.mark.parametrize(
    "path",
    [
        ".git",
        ".venv",
        "venv",
        "exports/2026-11-28/visitors.ndjson",
        "benchmarks/results",
        "tests",
        ".mypy_cache",
        "orchestrator/__pycache__",
        ".env",
        "dist",
    ],
)
def test_dockerignore_excludes_local_clutter(path: str) -> None:
    """Git history, venvs, caches, exports, test and benchmark output stay out of the context."""
    assert dockerignored(path)
