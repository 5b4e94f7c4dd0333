# mics-export container image: `docker build -t mics-export:0.1.0 .`
#
# Two stages. The builder installs the package and its dependencies into a virtualenv at
# /opt/venv; the final image is the same slim Python base plus that venv, and nothing else:
# no pip cache, no sources, no build backend, no compiler. Every dependency ships manylinux
# wheels for CPython 3.11, so neither stage needs gcc; if one ever needs compiling, add
# build-essential to the *builder* only.
#
# Both stages must use the same base: the venv's python is a symlink to the base's
# /usr/local/bin/python3.11. Pin a digest (python:3.11-slim@sha256:...) in production builds
# to make the image reproducible.

FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Dependencies first, read from pyproject.toml with the stdlib's tomllib: this layer is
# rebuilt only when pyproject.toml changes, not on every code change.
COPY pyproject.toml ./
# The image includes the `cloud` extra (obstore), so it can write straight to a bucket.
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; deps = p.get('dependencies', []) + p['optional-dependencies']['cloud']; open('/tmp/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
 && pip install -r /tmp/requirements.txt

# Then the package itself: a regular (non-editable) install, built as a wheel by pip.
# README.md is needed because pyproject.toml names it as the long description.
# compileall: the root filesystem is read-only in Kubernetes, so the byte-code must be
# written now, at build time. pip and setuptools are not needed to run: remove them.
COPY README.md ./
COPY orchestrator ./orchestrator
RUN pip install ".[cloud]" \
 && python -m compileall -q /opt/venv/lib \
 && pip uninstall -y pip setuptools


FROM python:3.11-slim

LABEL org.opencontainers.image.title="mics-export" \
      org.opencontainers.image.description="Bulk runner for mediarithmics Query Exports" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid: Kubernetes can only enforce runAsNonRoot when the image's USER is
# numeric, and the manifests (runAsUser/fsGroup 10001) must match it.
RUN groupadd --system --gid 10001 mics \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin mics \
 && mkdir /data \
 && chown 10001:10001 /data

COPY --from=builder /opt/venv /opt/venv

# MICS_LOG_FORMAT=json: logs are read by a collector, not a person (--log-format text
# overrides it). PYTHONUNBUFFERED: log lines reach `kubectl logs` as they are written.
# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only; the .pyc files are in the venv.
ENV PATH=/opt/venv/bin:$PATH \
    MICS_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001
WORKDIR /data

# Exec form: mics-export is PID 1 and receives SIGTERM itself. It handles SIGTERM (writes an
# INTERRUPTED manifest, exits 143 within 10 s), so no init process is needed.
ENTRYPOINT ["mics-export"]
CMD ["--help"]
