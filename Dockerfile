# syntax=docker/dockerfile:1
#
# hubproxy as a drop-in for CHP's image (quay.io/jupyterhub/configurable-http-proxy): the same
# commands on PATH, user, ports and entrypoint rules. docs/kubernetes.md says how to use it with
# zero-to-jupyterhub; .github/workflows/publish.yml builds, scans and publishes it.
#
#   docker build -t hubproxy .
#   docker run --rm -p 8000:8000 -p 8001:8001 -e CONFIGPROXY_AUTH_TOKEN=... hubproxy \
#       --default-target=http://hub:8081

ARG PYTHON_VERSION=3.11

# --- the wheel, built from the source tree (pure Python: the same wheel on every platform) ---
FROM docker.io/library/python:${PYTHON_VERSION}-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheel .

# --- the image ------------------------------------------------------------------------------
FROM docker.io/library/python:${PYTHON_VERSION}-slim-bookworm

LABEL org.opencontainers.image.title="hubproxy" \
      org.opencontainers.image.description="A pure-Python drop-in replacement for configurable-http-proxy (JupyterHub's proxy)" \
      org.opencontainers.image.licenses="BSD-3-Clause"

# curl for debugging from inside the pod (as CHP's image has it); the rest of the system
# brought up to date, so that the scan sees the distribution's fixes. Not pinned: a pinned
# Debian version disappears from the archive with the next security fix, breaking the build.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get upgrade -y \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/*

# hubproxy with the Redis store (routes that survive a pod restart; several replicas). Its
# dependencies come as binary wheels for amd64 and arm64 alike: no compiler in the image.
# Then pip, setuptools and wheel go (nothing needs them at run time, and a scanner flags
# them), and everything is byte-compiled once: with a read-only root file system nothing could
# be cached later, and "unchecked-hash" pycs are used without comparing source timestamps,
# which a layer rewrite may change.
RUN --mount=type=bind,from=wheel,source=/wheel,target=/wheel \
    pip install --no-cache-dir --no-compile "$(echo /wheel/hubproxy-*.whl)[redis]" \
 && pip uninstall -y --no-cache-dir setuptools wheel pip \
 && python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
        "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')" \
        "$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
 && hubproxy --version \
 && configurable-http-proxy --version

# never write bytecode (or anything) into the image at run time
ENV PYTHONDONTWRITEBYTECODE=1

# nobody, numerically: Kubernetes' runAsNonRoot can check a number, not a name
USER 65534

# the proxy (8000) and its REST API (8001), as CHP's image
EXPOSE 8000 8001

# CHP's entrypoint rules (an API on all interfaces unless --api-ip or --api-socket is given,
# CONFIGPROXY_AUTH_TOKEN_FILE), with hubproxy as PID 1. No CMD: `docker run IMAGE --opt ...`
# passes the options, as with CHP's image. -P keeps the working directory off sys.path.
ENTRYPOINT ["python", "-P", "-m", "hubproxy.container"]
