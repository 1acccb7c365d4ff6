# syntax=docker/dockerfile:1
# The edgefleet hub (ingest, fleet store, API, dashboard, signed commands) as a container image.
#
#   docker build -t edgefleet-hub .
#   docker run -d -p 8080:8080 -v hub-data:/var/lib/edgefleet-hub \
#     -v /etc/edgefleet/hub.yaml:/etc/edgefleet/hub.yaml:ro edgefleet-hub
#
# Multi-stage: the build stage installs the package with only the `hub` extra into a venv, the
# runtime stage copies that venv onto the same slim base (no compiler, no pip cache, no sources),
# and runs it as an unprivileged user. Configure with /etc/edgefleet/hub.yaml and/or
# EDGEFLEET_HUB_* variables (docs/hub.md). Not built in CI here: that machine has no container engine.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/edgefleet
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bundles ./bundles
COPY agent ./agent
COPY hub ./hub
# A regular (non-editable) install: the venv holds everything, /src is not needed afterwards.
# pip itself is not needed at run time (smaller image, one tool less in it).
RUN /opt/edgefleet/bin/pip install ".[hub]" \
 && /opt/edgefleet/bin/python -m pip uninstall --yes pip

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="edgefleet-hub" \
      org.opencontainers.image.description="edgefleet fleet hub: MQTT ingest, fleet store, API and dashboard" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 edgefleet \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/edgefleet-hub --shell /usr/sbin/nologin edgefleet \
 && install -d -o edgefleet -g edgefleet -m 0750 /var/lib/edgefleet-hub \
 && install -d -m 0755 /etc/edgefleet
COPY --from=build /opt/edgefleet /opt/edgefleet
ENV PATH=/opt/edgefleet/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EDGEFLEET_HUB_DATA_DIR=/var/lib/edgefleet-hub \
    EDGEFLEET_HUB_DB_URL=sqlite:////var/lib/edgefleet-hub/hub.db \
    EDGEFLEET_HUB_LOG_FORMAT=json \
    EDGEFLEET_HUB_API__HOST=0.0.0.0 \
    EDGEFLEET_HUB_API__PORT=8080
USER 10001:10001
WORKDIR /var/lib/edgefleet-hub
VOLUME ["/var/lib/edgefleet-hub"]
EXPOSE 8080
# /healthz answers 200 while the API serves; its body also says whether the broker link is up.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('EDGEFLEET_HUB_API__PORT', '8080'), timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["edgefleet-hub"]
CMD ["run"]
