"""The configuration: YAML in, one frozen, validated tree out.

Load it once with :func:`load_config` (or :func:`parse_config` for a dict) and
pass it down; there are no module-level config globals. Unknown keys and bad
values raise :class:`~agent.errors.ConfigError` whose message names the YAML
path and the reason, e.g. ``templates[2].mode: expected an octal string like
"0400", got 420``. Relative paths are resolved against the config file's
directory. Every field has a default, listed in ``docs/configuration.md``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent.bounded import (
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_SIZE,
    MAX_JSON_DEPTH,
    MAX_OBJECT_SIZE,
    Limits,
    TooLarge,
    read_capped,
    yaml_depth_ok,
)
from agent.errors import ConfigError

# --------------------------------------------------------------------------- scalar types

_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ns|us|µs|ms|s|m|h|d)")
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}


def parse_duration(value: object) -> float:
    """Seconds from a duration as Go, Vault and consul-template users write it.

    ``"500ms"``, ``"90s"``, ``"1.5h"``, ``"2d"``, and compounds like ``"1h30m"``
    or ``"1m30.5s"`` (parts add up, in any order); a bare number is seconds.
    Hand-rolled: Go's ``time.ParseDuration`` grammar plus ``d`` is one regex,
    and pydantic's duration type reads ISO 8601 (``PT1H30M``), not this.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)  # a bare number is seconds
    if isinstance(value, str) and value.strip():
        total, pos, text = 0.0, 0, value.strip()
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        else:
            if pos == len(text):
                return total
    raise ValueError(
        f'expected a duration like "500ms", "30s", "5m", "24h" or "30d", got {value!r}'
    )


def _parse_mode(value: object) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    hint = (
        " (quote it in YAML: an unquoted 0400 is read as a number)"
        if isinstance(value, int)
        else ""
    )
    raise ValueError(f'expected an octal string like "0400", got {value!r}{hint}')


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    value = value.expanduser()
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return Path(os.path.normpath(value))


def _check_secret_ref(value: str) -> str:
    if not (
        (value.startswith("env:") and len(value) > 4)
        or (value.startswith("file:") and len(value) > 5)
    ):
        # Never echo the value: a literal here is likely a secret pasted in.
        raise ValueError(
            "expected a reference like env:VAR or file:///path/to/file, not a literal value"
        )
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Mode = Annotated[int, BeforeValidator(_parse_mode)]
ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]
SecretRef = Annotated[str, AfterValidator(_check_secret_ref)]
PositiveInt = Annotated[int, Field(gt=0)]
#: A schedule period: any duration of one second or more.
Period = Annotated[float, BeforeValidator(parse_duration), Field(ge=1.0)]


def read_secret_ref(ref: str, *, base_dir: Path | None = None) -> bytes:
    """Read the material a ``env:VAR`` or ``file:PATH`` reference points at.

    Raises:
        ConfigError: the variable is unset or the file unreadable. The message
            names the reference, never its content.
    """
    if ref.startswith("env:"):
        var = ref[4:]
        if var not in os.environ:
            raise ConfigError(f"environment variable {var} (from {ref!r}) is not set")
        return os.environ[var].encode()
    path = Path(ref[7:] if ref.startswith("file://") else ref[5:])
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        return path.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise ConfigError(f"cannot read {ref!r}: {exc.strerror}") from None


def _default_runtime_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/secrets-agent")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "secrets-agent"
    return Path(f"/tmp/secrets-agent-{os.getuid()}")  # noqa: S108 - private dir, checked at bind


def default_socket_path() -> Path:
    """``/run/secrets-agent/agent.sock`` for root, else ``$XDG_RUNTIME_DIR/secrets-agent/``,
    else ``~/.cache/secrets-agent/`` (never a predictable path under /tmp that
    another user could create first; the agent checks the directory at bind)."""
    if os.geteuid() != 0 and not os.environ.get("XDG_RUNTIME_DIR"):
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(cache) / "secrets-agent" / "agent.sock"
    return _default_runtime_dir() / "agent.sock"


def default_render_dir() -> Path:
    """Where rendered files go by default: a tmpfs under the runtime directory."""
    if os.geteuid() == 0:
        return Path("/run/secrets-agent/secrets")
    return _default_runtime_dir()


# --------------------------------------------------------------------------- sections


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


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


def split_host_port(value: str) -> tuple[str, int]:
    """``"127.0.0.1:2773"`` / ``"[::1]:2773"`` to ``(host, port)``."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", value or "")
    if not m:
        raise ValueError(f'expected "host:port" like "127.0.0.1:2773", got {value!r}')
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host, port


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


class LocalKeysConfig(_Model):
    type: Literal["local"]
    keyring: ConfigPath = Path("keyring.json")
    passphrase: SecretRef | None = None
    rotate_every: Period | None = None


class Pkcs11KeysConfig(_Model):
    type: Literal["pkcs11"]
    module: ConfigPath
    token: str
    pin: SecretRef
    key: str = "secrets-agent-master"
    mechanism: Literal["aes-gcm", "aes-key-wrap-pad"] = "aes-gcm"
    rotate_every: Period | None = None


class KmsKeysConfig(_Model):
    type: Literal["aws-kms"]
    key_id: str
    region: str | None = None
    endpoint_url: str | None = None
    timeout: Duration = 5.0
    rotate_every: Period | None = None

    @field_validator("rotate_every")
    @classmethod
    def _kms_period(cls, v: float | None) -> float | None:
        if v is not None and not (v % 86400 == 0 and 90 <= v / 86400 <= 2560):
            raise ValueError(
                f"KMS rotates on a period of whole days from 90d to 2560d; got {v:g} seconds"
            )
        return v


KeyProviderConfig = Annotated[
    LocalKeysConfig | Pkcs11KeysConfig | KmsKeysConfig, Field(discriminator="type")
]


class DataKeysConfig(_Model):
    cache_capacity: PositiveInt = 1024
    max_age: Duration = 300.0
    max_uses: PositiveInt = 100_000
    max_messages: PositiveInt = 1000


_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_size(value: object) -> int:
    """Bytes from ``1048576``, ``"64KiB"``, ``"1MiB"`` or ``"1GiB"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and int(m.group(1)) > 0:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError(f'expected a size like "64KiB" or "1MiB", got {value!r}')


ByteSize = Annotated[int, BeforeValidator(parse_size)]


class _StoreBase(_Model):
    id: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    #: Envelopes and stage maps larger than this are refused before being read whole.
    max_object_size: ByteSize = MAX_OBJECT_SIZE
    #: JSON in store objects nested deeper than this is refused.
    max_json_depth: Annotated[int, Field(ge=4, le=512)] = MAX_JSON_DEPTH

    @property
    def limits(self) -> Limits:
        """The parsing caps of this store."""
        return Limits(self.max_object_size, self.max_json_depth)

    #: Serve stage maps that carry no proof (written before 0.x, or by another
    #: tool). For the upgrade only: it lets a store writer without keys move
    #: stages freely until the maps are signed (see CHANGELOG).
    accept_unproven_stages: bool = False


class FileStoreConfig(_StoreBase):
    type: Literal["file"]
    path: ConfigPath = Path("store")


class TlsConfig(_Model):
    ca: ConfigPath | None = None
    cert: ConfigPath | None = None
    key: ConfigPath | None = None


class EtcdStoreConfig(_StoreBase):
    type: Literal["etcd"]
    endpoints: list[str] = Field(default_factory=lambda: ["127.0.0.1:2379"], min_length=1)
    prefix: str = "/secrets-agent"
    username: str | None = None
    password: SecretRef | None = None
    tls: TlsConfig | None = None
    timeout: Duration = 5.0


class AwsSecretsManagerStoreConfig(_StoreBase):
    type: Literal["aws-secretsmanager"]
    region: str | None = None
    endpoint_url: str | None = None
    client_side_encryption: bool = True
    name_prefix: str = ""
    timeout: Duration = 5.0


class S3StoreConfig(_StoreBase):
    type: Literal["s3"]
    bucket: str
    prefix: str = "secrets-agent"
    region: str | None = None
    endpoint_url: str | None = None
    timeout: Duration = 5.0


StoreConfig = Annotated[
    FileStoreConfig | EtcdStoreConfig | AwsSecretsManagerStoreConfig | S3StoreConfig,
    Field(discriminator="type"),
]


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


def _default_keys() -> dict[str, KeyProviderConfig]:
    return {"local": LocalKeysConfig(type="local")}


class AgentConfig(_Model):
    """The whole configuration tree."""

    listen: ListenConfig = Field(default_factory=ListenConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    keys: dict[str, KeyProviderConfig] = Field(default_factory=_default_keys)
    write_keys: list[str] = Field(default_factory=lambda: ["local"], min_length=1)
    datakeys: DataKeysConfig = Field(default_factory=DataKeysConfig)
    store: StoreConfig = Field(default_factory=lambda: FileStoreConfig(type="file"))
    secrets: list[str] = Field(default_factory=lambda: ["*"])
    refresh: RefreshConfig = Field(default_factory=RefreshConfig)
    access: list[AccessRule] = Field(default_factory=_default_access)
    templates: list[TemplateConfig] = Field(default_factory=list)
    render: RenderConfig = Field(default_factory=RenderConfig)
    rotation: list[RotationConfig] = Field(default_factory=list)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    #: Directory of the config file; relative references resolve against it.
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)
    #: The file this config was loaded from, if any.
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("keys")
    @classmethod
    def _some_keys(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # A plaintext store (aws-secretsmanager, client_side_encryption: false) uses none.
        if not v and not (info.context or {}).get("plaintext_store"):
            raise ValueError(
                "at least one key provider is needed (none only with a store that "
                "has client_side_encryption: false)"
            )
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
                raise ValueError(f"key provider name {name!r}: use 1-64 of A-Za-z0-9_.-")
        return v

    @field_validator("write_keys")
    @classmethod
    def _write_keys_defined(cls, v: list[str], info: ValidationInfo) -> list[str]:
        keys = info.data.get("keys") or {}
        for name in v:
            if keys and name not in keys:
                raise ValueError(f"names {name!r}, which is not a provider under 'keys'")
        return v

    @field_validator("rotation")
    @classmethod
    def _one_rule_per_secret(cls, v: list[RotationConfig]) -> list[RotationConfig]:
        seen: dict[str, int] = {}
        for i, rule in enumerate(v):
            if rule.secret in seen:
                raise ValueError(
                    f"rules {seen[rule.secret]} and {i} both rotate {rule.secret!r}; keep one"
                )
            seen[rule.secret] = i
        return v

    @field_validator("access")
    @classmethod
    def _tokens_defined(cls, v: list[AccessRule], info: ValidationInfo) -> list[AccessRule]:
        listen = info.data.get("listen")
        tokens = listen.tcp.tokens if listen is not None and listen.tcp else {}
        for i, rule in enumerate(v):
            if rule.token is not None and rule.token not in tokens:
                raise ValueError(
                    f"rule {i} names token {rule.token!r}, not defined in listen.tcp.tokens"
                )
        return v


# --------------------------------------------------------------------------- loading

_UNION_PARENTS = {"store"}
_TAGS = {"file", "etcd", "aws-secretsmanager", "s3", "local", "pkcs11", "aws-kms"}
_SENSITIVE = {"pin", "passphrase", "password", "tokens"}
_MESSAGES = {
    "extra_forbidden": "unknown field",
    "missing": "required field is missing",
}


def _yaml_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        parent = loc[i - 1] if i else None
        grandparent = loc[i - 2] if i > 1 else None
        if part in _TAGS and (parent in _UNION_PARENTS or grandparent == "keys"):
            continue  # pydantic's discriminated-union tag, not a YAML key
        if part.startswith("function-") or part in ("str", "int"):
            continue
        out += f".{part}" if out else part
    return out or "(top level)"


def _describe(err: Mapping[str, Any]) -> tuple[str, str]:
    """The YAML path of one validation error, and its message."""
    path = _yaml_path(tuple(err["loc"]))
    kind = err["type"]
    if kind in _MESSAGES:
        return path, _MESSAGES[kind]
    msg = str(err["msg"]).removeprefix("Value error, ")
    shows_input = kind.endswith("_type") or kind in ("literal_error", "union_tag_invalid")
    if shows_input and not (_SENSITIVE & {str(p) for p in err["loc"]}):
        value = err.get("input")
        if isinstance(value, (str, int, float, bool)) or value is None:
            msg += f", got {value!r}"
    return path, msg


def _plaintext_store(store: object) -> bool:
    """Whether the raw ``store`` section is one that holds plaintext (needs no keys)."""
    return (
        isinstance(store, dict)
        and store.get("type") == "aws-secretsmanager"
        and store.get("client_side_encryption") is False
    )


def _where(path: str, source: Path | None, lines: Mapping[str, int]) -> str:
    """``FILE:LINE: `` for a YAML path (its nearest ancestor's line if it is not in the file)."""
    if source is None:
        return ""
    probe = path
    while probe and probe not in lines:
        cut = max(probe.rfind("."), probe.rfind("["))
        probe = probe[:cut] if cut > 0 else ""
    return f"{source}:{lines[probe]}: " if probe else f"{source}: "


def parse_config(
    data: object,
    *,
    base_dir: Path | None = None,
    source: Path | None = None,
    lines: Mapping[str, int] | None = None,
) -> AgentConfig:
    """Validate a config mapping.

    Raises:
        ConfigError: every problem, one per line, each naming its YAML path
            (and, with ``source``, the file and the line from ``lines``).
    """
    lines = lines or {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = _where("", source, lines)
        raise ConfigError(f"{where}(top level): the config must be a YAML mapping")
    base = (base_dir or Path.cwd()).resolve()
    doc = dict(data)
    for reserved in ("base_dir", "source"):
        if reserved in doc:
            raise ConfigError(f"{_where(reserved, source, lines)}{reserved}: unknown field")
    doc["base_dir"] = base
    # Sections whose defaults hold relative paths are filled in here, so they
    # are validated (and resolved against the config directory) like any input.
    doc.setdefault("keys", {"local": {"type": "local"}})
    doc.setdefault("store", {"type": "file"})
    doc["source"] = source
    try:
        context = {"base_dir": base, "plaintext_store": _plaintext_store(doc.get("store"))}
        return AgentConfig.model_validate(doc, context=context)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            yaml_path, message = _describe(e)
            problems.append(f"{_where(yaml_path, source, lines)}{yaml_path}: {message}")
        raise ConfigError("\n".join(problems)) from None


def _node_lines(node: yaml.Node | None, path: Path) -> dict[str, int]:
    """The line of every YAML path under ``node``; a duplicate mapping key is an error.

    PyYAML's safe loader lets the last of two equal keys win silently; a config
    with two ``metrics:`` blocks is almost always a paste error, so it is refused.
    """
    lines: dict[str, int] = {}
    stack: list[tuple[yaml.Node, str]] = [(node, "")] if node is not None else []
    while stack:
        current, where = stack.pop()
        if isinstance(current, yaml.MappingNode):
            seen: dict[object, int] = {}
            for key_node, value_node in current.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                line = key_node.start_mark.line + 1
                sub = f"{where}.{key}" if where else str(key)
                if key is not None and key != "<<" and key in seen:
                    raise ConfigError(
                        f"{path}:{line}: {sub}: duplicate key {key!r} "
                        f"(first at line {seen[key]}); remove one"
                    )
                seen[key] = line
                lines.setdefault(sub, line)
                stack.append((value_node, sub))
        elif isinstance(current, yaml.SequenceNode):
            for i, item in enumerate(current.value):
                sub = f"{where}[{i}]"
                lines.setdefault(sub, item.start_mark.line + 1)
                stack.append((item, sub))
    return lines


def _read_config_bytes(path: Path) -> bytes:
    try:
        return read_capped(path, limit=MAX_CONFIG_SIZE)
    except TooLarge as exc:
        raise ConfigError(f"config {str(path)!r} is too large: {exc}") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot read config {str(path)!r}: {reason}") from None


def parse_yaml_text(raw: bytes, *, path: Path) -> tuple[object, dict[str, int]]:
    """Decode and parse a config file's bytes strictly: the data, and each YAML path's line.

    Raises:
        ConfigError: naming ``path`` and the reason: not UTF-8 (with the line),
            invalid or too deeply nested YAML, or a duplicate key (with its line).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}); "
            "save the file as UTF-8"
        ) from None
    loader = yaml.SafeLoader(text)
    try:
        if not yaml_depth_ok(text, MAX_CONFIG_DEPTH):
            raise ConfigError(
                f"{path}: YAML nested more than {MAX_CONFIG_DEPTH} levels deep; refused"
            )
        node = loader.get_single_node()
        lines = _node_lines(node, path)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    except (RecursionError, MemoryError, ValueError, TypeError, OverflowError) as exc:
        # The YAML library's own limits (e.g. a huge number, deep aliases).
        raise ConfigError(f"{path}: YAML could not be read ({type(exc).__name__})") from None
    finally:
        loader.dispose()
    return data, lines


def load_yaml(path: Path) -> tuple[object, dict[str, int]]:
    """Read a config file's YAML strictly (see :func:`parse_yaml_text`), without validating it."""
    return parse_yaml_text(_read_config_bytes(path), path=path)


def load_config(path: Path) -> AgentConfig:
    """Read and validate the YAML config at ``path``.

    Raises:
        ConfigError: unreadable or too large file, bad YAML, a duplicate key, or
            invalid content; each problem names the file, its line and YAML path.
    """
    return parse_config_text(_read_config_bytes(path), path=path)


def parse_config_text(raw: bytes, *, path: Path) -> AgentConfig:
    """Decode, parse and validate the bytes of a config file (any failure: ConfigError).

    Raises:
        ConfigError: naming ``path`` and the reason (see :func:`parse_yaml_text`),
            or invalid content (with the file, line and YAML path).
    """
    data, lines = parse_yaml_text(raw, path=path)
    try:
        return parse_config(data, base_dir=path.parent, source=path, lines=lines)
    except ConfigError:
        raise
    except (RecursionError, MemoryError, ValueError, TypeError, OverflowError) as exc:
        raise ConfigError(f"{path}: invalid config ({type(exc).__name__})") from None


def default_config_path() -> Path:
    """The config used when neither ``-c`` nor ``$SECRETS_AGENT_CONFIG`` is given."""
    if os.geteuid() == 0:
        return Path("/etc/secrets-agent/agent.yaml")
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "secrets-agent" / "agent.yaml"
