# secrets-agent as a sidecar image.
#
#   docker build -t secrets-agent .
#   docker run --read-only --tmpfs /run/secrets-agent:mode=0711 \
#     -v /etc/secrets-agent:/etc/secrets-agent:ro secrets-agent
#
# The agent runs as an unprivileged user, reads its config from
# /etc/secrets-agent/agent.yaml, serves /run/secrets-agent/agent.sock and renders
# to tmpfs. Share /run/secrets-agent (an emptyDir with medium: Memory in
# Kubernetes) with the app container.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
RUN pip install --no-cache-dir --prefix=/install '.[etcd,aws,pkcs11]'

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin agent \
 && mkdir -p /run/secrets-agent /etc/secrets-agent \
 && chown agent /run/secrets-agent && chmod 0711 /run/secrets-agent
COPY --from=build /install /usr/local
USER agent
ENV SECRETS_AGENT_CONFIG=/etc/secrets-agent/agent.yaml \
    PYTHONDONTWRITEBYTECODE=1
HEALTHCHECK --interval=10s --timeout=3s CMD ["secrets-agent", "health", "--ready"]
ENTRYPOINT ["secrets-agent"]
CMD ["run"]
