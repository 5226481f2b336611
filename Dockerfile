# User-code image: serves the `mlplatform` Dagster definitions over gRPC (port 4000) and is the
# image the DockerRunLauncher starts run containers from. The Ray head of the compose stack runs
# it too, so Serve replicas import exactly the package the runs were built with.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLPLATFORM_HOME=/var/lib/mlplatform

# LightGBM's Linux wheels link against the OpenMP runtime, which the slim image does not ship
# (the Debian release is fixed by the base image tag, so its package version is left to it).
# The runtime user has a fixed UID/GID, shared with deploy/Dockerfile.dagster, so every container
# writing to the shared MLPLATFORM_HOME volume agrees on who owns it; Docker seeds an empty named
# volume with the ownership of the directory it is mounted on, hence the chown.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 mlplatform \
    && useradd --system --uid 10001 --gid mlplatform --create-home --shell /usr/sbin/nologin mlplatform \
    && mkdir -p /var/lib/mlplatform \
    && chown mlplatform:mlplatform /var/lib/mlplatform

WORKDIR /opt/mlplatform

# The exact versions of uv.lock, the file `make install` and CI install from, into a virtual
# environment on the PATH; uv is pinned to the Makefile's UV_VERSION. Dependencies first, so a
# change of the code alone reuses that layer.
ENV UV_PROJECT_ENVIRONMENT=/opt/mlplatform/.venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    PATH=/opt/mlplatform/.venv/bin:$PATH
RUN pip install --no-cache-dir uv==0.13.9
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-cache --no-editable --no-install-project
COPY mlplatform ./mlplatform
RUN uv sync --locked --no-cache --no-editable

USER mlplatform

EXPOSE 4000

CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "mlplatform.definitions"]
