# secrets-agent as a sidecar image.
#
#   docker build -t secrets-agent:0.1.0 .
#   docker run --read-only --tmpfs /run/secrets-agent:uid=10001,gid=10001,mode=0755 \
#     -v "$PWD/conf:/etc/secrets-agent:ro" secrets-agent:0.1.0
#
# The agent runs as uid 10001 on a read-only root. It reads
# /etc/secrets-agent/agent.yaml (mount it read-only), serves the socket and
# renders files under /run/secrets-agent (a tmpfs owned by uid 10001, as
# above), and writes its audit log to stdout (`audit.path: "-"`, what
# `secrets-agent init` writes). Nothing else is written. In Kubernetes that
# directory is an emptyDir (mode 0777) shared with the app: the config then
# puts the socket in a subdirectory the agent creates and sets
# `listen.shared_volume: true` (examples/kubernetes/deployment.yaml). /var/lib/secrets-agent (owned by the agent) is where a
# volume for a keyring or file store that the agent writes goes; a new named
# volume mounted there inherits that ownership. examples/kubernetes/ has
# complete manifests.
#
# Not run in CI (no Docker engine there): the build itself. The tests check
# that every path this file copies exists and that the image's command line
# works in a plain venv as uid 10001 with a read-only config directory
# (tests/test_container.py).

# Pinned: an exact Python patch release on an exact Debian release. Update
# both stages together, and constraints.txt with it.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY agent ./agent
RUN pip install --no-cache-dir --prefix=/install --constraint constraints.txt \
    '.[etcd,aws,pkcs11]'

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0.dev0
LABEL org.opencontainers.image.title="secrets-agent" \
      org.opencontainers.image.description="A secrets sidecar: envelope-encrypted secrets served on a Unix socket, rendered to tmpfs, refreshed on rotation." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/example/secrets-agent" \
      org.opencontainers.image.documentation="https://github.com/example/secrets-agent/blob/main/docs/getting-started.md" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.11-slim-bookworm"
RUN useradd --system --uid 10001 --user-group --home-dir /nonexistent \
        --shell /usr/sbin/nologin agent \
 && mkdir -p /run/secrets-agent /etc/secrets-agent /var/lib/secrets-agent \
 && chown agent:agent /run/secrets-agent /var/lib/secrets-agent \
 && chmod 0755 /run/secrets-agent && chmod 0700 /var/lib/secrets-agent
COPY --from=build /install /usr/local
USER 10001:10001
ENV SECRETS_AGENT_CONFIG=/etc/secrets-agent/agent.yaml \
    XDG_RUNTIME_DIR=/run \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
HEALTHCHECK --interval=10s --timeout=3s CMD ["secrets-agent", "health", "--ready"]
ENTRYPOINT ["secrets-agent"]
CMD ["run"]
