"""The configuration: YAML in, one frozen, validated tree out.

Load it once with :func:`load_config` (or :func:`parse_config` for a dict) and
pass it down; there are no module-level config globals. Unknown keys and bad
values raise :class:`~agent.errors.ConfigError` whose message names the YAML
path and the reason, e.g. ``templates[2].mode: expected an octal string like
"0400", got 420``. Relative paths are resolved against the config file's
directory. Every field has a default, listed in ``docs/configuration.md``.

The models are defined in :mod:`agent.config_scalars` (scalar types, the
model base), :mod:`agent.config_backends` (keys, data keys, stores) and
:mod:`agent.config_sections` (the other sections), the strict YAML reading in
:mod:`agent.config_yaml`; this module holds the root :class:`AgentConfig` and
the validation, and re-exports every name, so import from ``agent.config``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

# The sections live in three modules, the YAML reading in a fourth; everything
# is importable from here.
from agent.config_backends import (
    AwsSecretsManagerStoreConfig,
    ByteSize,
    DataKeysConfig,
    EtcdStoreConfig,
    FileStoreConfig,
    KeyProviderConfig,
    KmsKeysConfig,
    LocalKeysConfig,
    Pkcs11KeysConfig,
    S3StoreConfig,
    StoreConfig,
    TlsConfig,
    parse_size,
)
from agent.config_scalars import (
    ConfigPath,
    Duration,
    Mode,
    Period,
    PositiveInt,
    SecretRef,
    _check_secret_ref,
    _Model,
    _parse_mode,
    _resolve_path,
    default_socket_path,
    parse_duration,
    read_secret_ref,
    split_host_port,
)
from agent.config_sections import (
    AccessRule,
    AuditConfig,
    ConnectionsConfig,
    ListenConfig,
    LogConfig,
    MetricsConfig,
    OnChangeConfig,
    RefreshConfig,
    RenderConfig,
    RetentionConfig,
    RotationConfig,
    SecretSelector,
    TcpListenConfig,
    TemplateConfig,
    WaitConfig,
    _default_access,
)
from agent.config_yaml import load_yaml, parse_yaml_text, read_config_bytes
from agent.errors import ConfigError


def _default_keys() -> dict[str, KeyProviderConfig]:
    return {"local": LocalKeysConfig(type="local")}


__all__ = [
    "AccessRule",
    "AgentConfig",
    "AuditConfig",
    "AwsSecretsManagerStoreConfig",
    "ByteSize",
    "ConfigPath",
    "ConnectionsConfig",
    "DataKeysConfig",
    "Duration",
    "EtcdStoreConfig",
    "FileStoreConfig",
    "KeyProviderConfig",
    "KmsKeysConfig",
    "ListenConfig",
    "LocalKeysConfig",
    "LogConfig",
    "MetricsConfig",
    "Mode",
    "OnChangeConfig",
    "Period",
    "Pkcs11KeysConfig",
    "PositiveInt",
    "RefreshConfig",
    "RenderConfig",
    "RetentionConfig",
    "RotationConfig",
    "S3StoreConfig",
    "SecretRef",
    "SecretSelector",
    "StoreConfig",
    "TcpListenConfig",
    "TemplateConfig",
    "TlsConfig",
    "WaitConfig",
    "_Model",
    "_check_secret_ref",
    "_default_access",
    "_parse_mode",
    "_resolve_path",
    "default_config_path",
    "default_socket_path",
    "load_config",
    "load_yaml",
    "parse_config",
    "parse_config_text",
    "parse_duration",
    "parse_size",
    "parse_yaml_text",
    "read_secret_ref",
    "split_host_port",
]


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


def load_config(path: Path) -> AgentConfig:
    """Read and validate the YAML config at ``path``.

    Raises:
        ConfigError: unreadable or too large file, bad YAML, a duplicate key, or
            invalid content; each problem names the file, its line and YAML path.
    """
    return parse_config_text(read_config_bytes(path), path=path)


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
