"""Config sections: listeners, metrics, refresh, access, templates, rotation, audit, logs
(see :mod:`agent.config`).
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from agent.config_backends import (
    ByteSize,
)
from agent.config_scalars import (
    ConfigPath,
    Duration,
    Mode,
    PositiveInt,
    SecretRef,
    _Model,
    default_socket_path,
    split_host_port,
)
from agent.errors import ConfigError


class TcpListenConfig(_Model):
    address: str = "127.0.0.1:2773"
    tokens: dict[str, SecretRef] = Field(default_factory=dict)
    max_connections: PositiveInt = 800
    aws_path_prefix: str = "/v1/"
    #: Request headers that may carry the token (the AWS agent's ``ssrf_headers``).
    token_headers: list[str] = Field(
        default_factory=lambda: [
            "X-Secrets-Agent-Token",
            "X-Aws-Parameters-Secrets-Token",
            "X-Vault-Token",
        ],
        min_length=1,
    )

    @field_validator("address")
    @classmethod
    def _loopback_only(cls, v: str) -> str:
        host, _port = split_host_port(v)
        if host != "localhost":
            try:
                if not ipaddress.ip_address(host).is_loopback:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"the TCP listener must be on loopback (127.0.0.1 or ::1), got {v!r}"
                ) from None
        return v


class ConnectionsConfig(_Model):
    """Per-listener connection bounds (Unix socket, TCP port, metrics port); issue 11."""

    max_open: PositiveInt = Field(
        default=512,
        description="Open connections per listener (Unix socket, TCP port, metrics port), idle "
        "ones included. A new connection at the cap closes the oldest idle one; if every one "
        "is busy, the new one gets a 503 and is closed. Lowered at start, with a warning, to "
        "fit `RLIMIT_NOFILE` (see `reserved_fds`).",
    )
    header_timeout: Duration = Field(
        default=10.0,
        description="A new connection must send a whole request head within this, or it is "
        "closed (slowloris).",
    )
    keepalive_timeout: Duration = Field(
        default=15.0, description="A connection idle between requests is closed after this."
    )
    reserved_fds: int = Field(
        default=128,
        ge=0,
        description="Descriptors kept out of the listeners' reach (store, audit log, watches, "
        "renders): caps + one listen backlog (128) per listener + descriptors open at start + "
        "this stay under the soft `RLIMIT_NOFILE`, which the agent first raises to the hard one.",
    )


class ListenConfig(_Model):
    socket: ConfigPath = Field(default_factory=default_socket_path)
    socket_mode: Mode = Field(default=0o660, validate_default=False)
    socket_group: str | int | None = None
    #: The socket directory's parent is a volume shared within one trust
    #: boundary (a pod's emptyDir, mode 0777): the agent creates and verifies
    #: the socket directory in it.
    shared_volume: bool = False
    max_connections: PositiveInt = 800
    connections: ConnectionsConfig = Field(
        default_factory=ConnectionsConfig,
        description="Connection bounds of every listener. See [security.md](security.md).",
    )
    tcp: TcpListenConfig | None = None


class MetricsConfig(_Model):
    listen: str | None = "127.0.0.1:9464"

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None:
            split_host_port(v)
        return v


class RefreshConfig(_Model):
    interval: Duration = 60.0
    watch_interval: Duration = 300.0
    jitter: float = Field(default=0.1, ge=0, le=1)
    watch: bool = True
    max_stale: Duration = 86400.0
    backoff_initial: Duration = 1.0
    backoff_max: Duration = 60.0
    request_min_interval: Duration = 1.0
    delete_grace: Duration = 300.0


class AccessRule(_Model):
    secrets: list[str] = Field(min_length=1)
    uids: list[int] = Field(default_factory=list)
    gids: list[int] = Field(default_factory=list)
    exe: list[str] = Field(default_factory=list)
    token: str | None = None
    stages: list[str] = Field(default_factory=lambda: ["CURRENT", "PREVIOUS"])

    @model_validator(mode="after")
    def _someone(self) -> AccessRule:
        if not (self.uids or self.gids or self.token):
            raise ValueError("a rule must name uids, gids or a token")
        return self


def _default_access() -> list[AccessRule]:
    return [AccessRule(secrets=["*"], uids=[os.getuid()])]


class SecretSelector(_Model):
    name: str
    stage: str | None = None
    version: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class OnChangeConfig(_Model):
    signal: str | None = None
    pid: int | None = None
    pid_file: ConfigPath | None = None
    command: list[str] | None = Field(default=None, min_length=1)
    timeout: Duration = 30.0

    @field_validator("signal")
    @classmethod
    def _signal(cls, v: str | None) -> str | None:
        import signal as _signal

        if v is not None:
            name = v if v.startswith("SIG") else f"SIG{v}"
            if not hasattr(_signal.Signals, name):
                raise ValueError(f"unknown signal {v!r}")
            return name
        return v


class WaitConfig(_Model):
    min: Duration = 0.0
    max: Duration = 5.0


class TemplateConfig(_Model):
    #: A short name: the ``template`` label of the render metrics and the name in
    #: ``status``; the template's index in the list when unset.
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    destination: ConfigPath
    secret: SecretSelector | None = None
    secrets: list[SecretSelector] | None = None
    key: str | None = None
    format: Literal["raw", "json", "dotenv", "shell", "yaml", "files", "template"] = "raw"
    template: str | None = None
    template_file: ConfigPath | None = None
    mode: Mode = Field(default=0o400, validate_default=False)
    owner: str | int | None = None
    group: str | int | None = None
    allow_disk: bool = False
    on_change: OnChangeConfig | None = None
    wait: WaitConfig = Field(default_factory=WaitConfig)

    @model_validator(mode="after")
    def _consistent(self) -> TemplateConfig:
        if (self.secret is None) == (self.secrets is None):
            raise ValueError("give exactly one of 'secret' or 'secrets'")
        if self.format == "template" and (self.template is None) == (self.template_file is None):
            raise ValueError("format 'template' needs exactly one of 'template' or 'template_file'")
        if self.format != "template" and (self.template or self.template_file):
            raise ValueError("'template' is only used with format 'template'")
        if self.secrets is not None and self.format != "template" and len(self.secrets) > 1:
            raise ValueError(f"format {self.format!r} takes one secret; use format 'template'")
        return self

    @property
    def selectors(self) -> list[SecretSelector]:
        """The secrets this template reads."""
        return [self.secret] if self.secret is not None else list(self.secrets or [])


class RenderConfig(_Model):
    allowed_dirs: list[ConfigPath] = Field(default_factory=list)
    #: Volumes shared within one trust boundary (a pod's emptyDir, mode 0777):
    #: a destination's directory directly inside one is created and verified
    #: by the agent, never written in directly.
    shared_volumes: list[ConfigPath] = Field(default_factory=list)
    cleanup_on_exit: bool = False


class RotationConfig(_Model):
    """One rotation rule: which secret, when, and with which rotator (docs/rotation.md)."""

    secret: str
    every: Duration | None = None
    cron: str | None = None
    window: Duration | None = None
    rotator: str
    params: dict[str, Any] = Field(default_factory=dict)
    #: Failed attempts in a row after which /v1/status flags the secret.
    flag_after_failures: PositiveInt = 3

    @field_validator("secret")
    @classmethod
    def _name(cls, v: str) -> str:
        from agent.errors import InvalidName
        from agent.types import validate_name

        try:
            return validate_name(v)
        except InvalidName as exc:
            raise ValueError(exc.message) from None

    @field_validator("every")
    @classmethod
    def _every(cls, v: float | None) -> float | None:
        if v is not None and v < 1:
            raise ValueError(f"the shortest rotation interval is 1s, got {v:g}s")
        return v

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        from agent.rotation.schedule import cron_is_valid

        if v is not None and not cron_is_valid(v):
            raise ValueError(
                f"expected a cron expression of 5 fields (or 6, seconds last), got {v!r}"
            )
        return v

    @field_validator("window")
    @classmethod
    def _window(cls, v: float | None) -> float | None:
        if v is not None and v < 1:
            raise ValueError(f"a rotation window is at least 1s, got {v:g}s")
        return v

    @field_validator("rotator")
    @classmethod
    def _known_rotator(cls, v: str) -> str:
        from agent.rotation.base import ROTATORS

        if v not in ROTATORS:
            raise ValueError(f"unknown rotator {v!r} (known: {', '.join(sorted(ROTATORS))})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RotationConfig:
        from agent.registry import load_backend
        from agent.rotation.base import ROTATORS

        if (self.every is None) == (self.cron is None):
            raise ValueError("give exactly one of 'every' (e.g. 30d) or 'cron'")
        # Build the rotator once so bad params are refused with the config, not
        # at the first rotation (a rotator's constructor does no I/O).
        try:
            load_backend(ROTATORS, self.rotator, "rotator")(self.params)
        except ConfigError as exc:
            raise ValueError(f"rotator {self.rotator!r}: {exc.message}") from None
        return self


class RetentionConfig(_Model):
    keep_unstaged: int | None = Field(default=100, ge=0)
    max_age: Duration | None = None


class AuditConfig(_Model):
    path: str | None = None
    aggregate_interval: Duration = Field(
        default=10.0,
        gt=0,
        description="Refused, denied, not-found and failed requests: the first of each (event, "
        "caller, secret, reason) is written at once, the repeats within the interval as one "
        "record with `count`.",
    )
    coalesce_reads: Duration = Field(
        default=0.0,
        description="When not `0`: identical allowed reads (same caller, secret, version, "
        "stage) within this window are one record, plus one with the `count` of the repeats.",
    )
    fsync_interval: Duration = Field(
        default=1.0,
        description="The log is fsynced at most this often (in a worker thread) and at "
        "shutdown; `0`: after every batch.",
    )
    max_size: ByteSize | None = Field(
        default=None,
        description="Rotate the file when it would pass this size (`100MiB`, `512KiB` or "
        "bytes): it is renamed `<name>.<first seq>` and the chain continues in a new file; "
        "`null`: never.",
    )


class LogConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
