# syntax=docker/dockerfile:1
# senderd container image: `docker build -t ghcr.io/senderd/senderd:0.1.0 .`
# Run: docker run -v ./senderd.toml:/etc/senderd/senderd.toml:ro -v ./key:/etc/senderd/key:ro \
#        -p 9464:9464 ghcr.io/senderd/senderd:0.1.0
# (in the config, [server] listen = "0.0.0.0:9464" so the port is reachable from outside the container)

# The base image by digest, so that a rebuild starts from the same bytes. Renew the digest with
# `docker buildx imagetools inspect python:3.11-slim`; CI passes a stand-in built from Debian packages
# (`--build-arg PYTHON_IMAGE=...`, see tests/container.py) as no image registry is reachable there.
ARG PYTHON_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

# --- builder: only builds the senderd wheel (pure Python; its dependencies come as wheels from PyPI)
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
COPY . .
COPY requirements.lock /dist/
RUN pip wheel --no-cache-dir --no-deps -w /dist .

# --- final: the wheel and its dependencies (pinned by requirements.lock, from scripts/lock), no build tools,
# no sources, a non-root user
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="senderd" \
      org.opencontainers.image.description="Send to SAP Cloud Integration iFlows: mTLS OAuth tokens kept fresh, schedules, retries, metrics." \
      org.opencontainers.image.source="https://github.com/senderd/senderd" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN groupadd --system --gid 10001 senderd \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/senderd --no-create-home \
       --shell /usr/sbin/nologin senderd \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/senderd /var/lib/senderd/spool \
    && install -d -m 0755 /etc/senderd
# The wheel and psycopg (the `postgresql` extra: gateway mode's shared store), versions from the lock.
# Copied, not bind-mounted: a RUN's cache key does not cover a bind mount's content, so podman reused the
# layer of an older wheel; the copied wheel's checksum invalidates it (the wheel and lock are ~200 KB).
COPY --from=builder /dist /tmp/dist
RUN pip install --no-cache-dir -c /tmp/dist/requirements.lock 'psycopg[binary,pool]' /tmp/dist/*.whl
WORKDIR /var/lib/senderd
# 9464: /metrics, /healthz, /readyz, /probe; 8787: the relay (sidecar ingest API)
EXPOSE 9464 8787
USER 10001
ENTRYPOINT ["senderd"]
CMD ["run", "-c", "/etc/senderd/senderd.toml"]
