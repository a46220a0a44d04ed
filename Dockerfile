# syntax=docker/dockerfile:1
#
# tiw-facade container image.
#
#   docker build -t tiw-facade:0.1.0 .
#
# Two stages: the first turns the project and all its dependencies into wheels, the second installs
# those wheels into a clean copy of the same base image. Build tools, pip's cache, the sources and the
# tests never reach the final image. Every dependency ships binary wheels for this platform
# (--only-binary), so neither stage needs a compiler.
#
# The base image is the Python the project is developed, tested and benchmarked on (3.11, see
# bench/RESULTS.md); the patch release is pinned so rebuilds are repeatable.
# To pin the digest as well: --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# .dockerignore is an allow-list: only pyproject.toml, README.md and service/ arrive here.
COPY . .

# The pip cache lives in a BuildKit cache mount, not in a layer.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --wheel-dir /wheels --only-binary=:all: .

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

# Re-declared so the label below names the base actually used.
ARG PYTHON_IMAGE
# The project's version (tests/test_deploy.py keeps it equal to tiw_facade.__version__) and the
# commit, which CI passes with --build-arg REVISION=$(git rev-parse HEAD).
ARG VERSION=0.1.0
ARG REVISION=unknown

LABEL org.opencontainers.image.title="tiw-facade" \
      org.opencontainers.image.description="A typed, rate-limited, monitored gRPC facade for Tencent Cloud's Interactive Whiteboard (TIW) server API" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="LicenseRef-Proprietary" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in Kubernetes; the wheels' modules are
#   byte-compiled at install time below, so nothing needs writing at run time.
# PYTHONUNBUFFERED: log lines reach `kubectl logs` at once, not when a buffer fills.
# PYTHONFAULTHANDLER: a crash dumps every thread's traceback to stderr.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1

# The wheels are bind-mounted from the build stage, so they are never part of a layer. --no-index:
# only those wheels are installed, the exact set the build stage resolved. pip byte-compiles them.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --disable-pip-version-check /wheels/*.whl \
 && groupadd --system --gid 10001 tiw \
 && useradd --system --no-log-init --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin tiw

# Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001

# gRPC (TiwService, grpc.health.v1.Health, reflection) and HTTP (/metrics, /healthz):
# TIW_GRPC_PORT and TIW_HTTP_PORT; change both the variables and the manifests together.
EXPOSE 50051 8080

# For plain `docker run`; Kubernetes ignores this and uses the native gRPC probes instead.
# -I (isolated): no current directory or PYTHON* variables on the import path.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-I", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TIW_HTTP_PORT', '8080'), timeout=2)"]

# Exec form: the server is PID 1 and receives SIGTERM itself (no shell in between to swallow it).
# It installs its own SIGTERM/SIGINT handlers (health NOT_SERVING, drain, exit 0), which is all an
# init would add here: it starts no child processes, so there are no zombies to reap.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tiw-facade", "serve"]
