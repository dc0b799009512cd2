# syntax=docker/dockerfile:1
# stepup-authz container image: multi-stage, slim, non-root, runtime dependencies only.
#   docker build -t ghcr.io/stepup-authz/stepup-authz:0.1.0 .
# The Helm chart (k8s/stepup-authz) runs it with a read-only root filesystem, a writable
# /tmp emptyDir, and the settings mounted at /etc/stepup-authz/config.yaml.
# Pin the base images by digest in your build pipeline (python:3.11-slim-bookworm@sha256:...).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: install the package and its runtime dependencies into a self-contained venv ------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/stepup-authz
ENV PATH=/opt/stepup-authz/bin:$PATH
WORKDIR /src
# Dependencies first (better layer caching), then the source. No [dev] extra: no Envoy,
# pytest, ruff or mypy in the image.
COPY pyproject.toml README.md ./
COPY authz ./authz
RUN pip install --upgrade pip setuptools wheel \
 && pip install . \
 && python -m compileall -q /opt/stepup-authz

# -- runtime -----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="stepup-authz" \
      org.opencontainers.image.description="Envoy ext_authz service enforcing step-up authentication" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/stepup-authz/stepup-authz"
# A fixed, non-root uid/gid (the chart's runAsUser/runAsGroup); no login shell, no home files.
RUN groupadd --system --gid 10001 stepup \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin stepup
COPY --from=build /opt/stepup-authz /opt/stepup-authz
ENV PATH=/opt/stepup-authz/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /tmp
# 9191: gRPC ext_authz + grpc.health.v1; 9192: /_stepup/*, /healthz, /readyz, /metrics
EXPOSE 9191 9192
ENTRYPOINT ["stepup-authz"]
CMD ["serve", "--config", "/etc/stepup-authz/config.yaml"]
