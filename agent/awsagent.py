"""``run --aws-agent-config FILE``: the AWS Secrets Manager Agent's TOML config, mapped onto ours.

An AWS-agent user switches by changing one command. Each documented setting
of the AWS agent (its README, "Configure the Secrets Manager Agent", and the
defaults in its ``config.rs``) maps as follows:

================================  ==============================================
``http_port`` (2773)              ``listen.tcp.address`` ``127.0.0.1:<port>``
``http_address`` (127.0.0.1)      the same address if loopback; others reported
``ttl_seconds`` (300)             ``refresh.interval`` (values are never older)
``cache_size`` (1000)             reported: every selected secret is cached
``ssrf_headers``                  ``listen.tcp.token_headers`` (plus ours)
``ssrf_env_variables``            ``listen.tcp.tokens.aws-agent``: the first
                                  variable set, its value or ``file://`` path
``path_prefix`` (/v1/)            ``listen.tcp.aws_path_prefix``
``max_conn`` (800)                ``listen.tcp.max_connections``
``region``                        ``store.region`` (aws-secretsmanager store)
``log_level`` (info)              ``log.level`` (``none`` reported, ``error``)
``log_to_file`` (true)            reported when true: we log to stderr
``ignore_transient_errors``       true is our behaviour; false reported
``validate_credentials``          reported when true: the first read checks
================================  ==============================================

Without a YAML config the base is what the AWS agent is: AWS Secrets Manager
read as it stores secrets (``client_side_encryption: false``, no key
providers). With one (``-c``), the TOML settings are laid over it. The token
gets an access rule for every secret and stage, as the AWS agent lets any
holder of the SSRF token read whatever its credentials can.

Values may be TOML numbers or strings (the AWS agent takes both); ranges and
unknown keys are refused as the AWS agent refuses them.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, load_yaml, parse_config
from agent.errors import ConfigError

#: The token name the mapped access rule and listener use.
TOKEN_NAME = "aws-agent"  # noqa: S105 - a name, not a token
DEFAULT_SSRF_ENV = ("AWS_TOKEN", "AWS_SESSION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN")
_LOG_LEVELS = {"debug": "debug", "info": "info", "warn": "warning", "error": "error"}
_KNOWN = frozenset(
    {
        "log_level",
        "log_to_file",
        "http_address",
        "http_port",
        "ttl_seconds",
        "cache_size",
        "ssrf_headers",
        "ssrf_env_variables",
        "path_prefix",
        "max_conn",
        "region",
        "ignore_transient_errors",
        "validate_credentials",
    }
)


@dataclass
class Mapped:
    """Our config sections from an AWS-agent config, and what did not map."""

    listen_tcp: dict[str, Any] = field(default_factory=dict)
    refresh: dict[str, Any] = field(default_factory=dict)
    log: dict[str, Any] = field(default_factory=dict)
    region: str | None = None
    #: One line per setting that has no equivalent (or only an approximate one).
    notes: list[str] = field(default_factory=list)


def _int(doc: Mapping[str, Any], key: str, lo: int, hi: int, path: Path) -> int | None:
    if key not in doc:
        return None
    value = doc[key]
    try:
        if isinstance(value, bool):
            raise ValueError
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not lo <= number <= hi:
        raise ConfigError(
            f"{path}: {key}: expected a whole number from {lo} to {hi}, got {value!r}"
        )
    return number


def _list(doc: Mapping[str, Any], key: str, path: Path) -> list[str] | None:
    if key not in doc:
        return None
    value = doc[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: {key}: expected a non-empty list of strings")
    return list(value)


def _token_ref(names: list[str], environ: Mapping[str, str], path: Path) -> str:
    """Our token reference for the first SSRF variable set (the AWS agent's order)."""
    for var in names:
        value = environ.get(var)
        if value:
            return value if value.startswith("file://") else f"env:{var}"
    raise ConfigError(
        f"{path}: ssrf_env_variables: none of {', '.join(names)} is set; "
        "the token must be in one of them (its value or file:///path)"
    )


def _listener(doc: Mapping[str, Any], mapped: Mapped, path: Path) -> None:
    host = "127.0.0.1"
    address = doc.get("http_address")
    if address is not None:
        try:
            ip = ipaddress.IPv4Address(str(address))
        except ValueError:
            raise ConfigError(f"{path}: http_address: expected an IPv4 address") from None
        if ip.is_loopback:
            host = str(ip)
        else:
            mapped.notes.append(
                f"http_address {address}: no equivalent; the TCP listener stays on "
                "127.0.0.1 (secrets-agent serves loopback only)"
            )
    port = _int(doc, "http_port", 0, 65535, path)
    if port is not None and 1 <= port < 1024:
        raise ConfigError(f"{path}: http_port: expected 1024 to 65535 (or 0), got {port}")
    mapped.listen_tcp["address"] = f"{host}:{2773 if port is None else port}"
    max_conn = _int(doc, "max_conn", 1, 1000, path)
    if max_conn is not None:
        mapped.listen_tcp["max_connections"] = max_conn
    prefix = doc.get("path_prefix")
    if prefix is not None:
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise ConfigError(f"{path}: path_prefix: expected a path starting with '/'")
        mapped.listen_tcp["aws_path_prefix"] = prefix
    headers = _list(doc, "ssrf_headers", path)
    if headers is not None:
        ours = ["X-Secrets-Agent-Token"]
        mapped.listen_tcp["token_headers"] = ours + [h for h in headers if h not in ours]


def _caching(doc: Mapping[str, Any], mapped: Mapped, path: Path) -> None:
    ttl = _int(doc, "ttl_seconds", 0, 3600, path)
    if ttl == 0:
        mapped.refresh["interval"] = "1s"
        mapped.notes.append(
            "ttl_seconds 0 (no caching): no equivalent; values are served from the "
            "cache and checked every second (refresh.interval 1s)"
        )
    elif ttl is not None:
        mapped.refresh["interval"] = f"{ttl}s"
    if _int(doc, "cache_size", 1, 1000, path) is not None:
        mapped.notes.append(
            "cache_size: no equivalent; every secret that 'secrets' selects is cached"
        )
    if doc.get("ignore_transient_errors") is False:
        mapped.notes.append(
            "ignore_transient_errors false: no equivalent; cached values are served "
            "through transient errors for up to refresh.max_stale"
        )


def _logging(doc: Mapping[str, Any], mapped: Mapped, path: Path) -> None:
    level = doc.get("log_level")
    if level is not None:
        lowered = str(level).lower()
        if lowered == "none":
            mapped.log["level"] = "error"
            mapped.notes.append("log_level NONE: no equivalent; errors are still logged")
        elif lowered in _LOG_LEVELS:
            mapped.log["level"] = _LOG_LEVELS[lowered]
        else:
            raise ConfigError(
                f"{path}: log_level: expected DEBUG, INFO, WARN, ERROR or NONE, got {level!r}"
            )
    if doc.get("log_to_file") is True:
        mapped.notes.append(
            "log_to_file true: no equivalent; secrets-agent logs to stderr (collect it "
            "with the service manager)"
        )
    if doc.get("validate_credentials") is True:
        mapped.notes.append(
            "validate_credentials: no separate check; the first read of the store "
            "fails early with the credentials' error instead"
        )


def map_aws_agent_config(
    doc: Mapping[str, Any], *, path: Path, environ: Mapping[str, str] | None = None
) -> Mapped:
    """Map a parsed AWS-agent config onto our sections.

    Raises:
        ConfigError: an unknown key, a value out of the AWS agent's range, or
            no SSRF token variable set. Each names the file and the key.
    """
    environ = os.environ if environ is None else environ
    for key in doc:
        if key not in _KNOWN:
            raise ConfigError(f"{path}: {key}: unknown AWS agent setting")
    mapped = Mapped()
    _listener(doc, mapped, path)
    names = _list(doc, "ssrf_env_variables", path) or list(DEFAULT_SSRF_ENV)
    mapped.listen_tcp["tokens"] = {TOKEN_NAME: _token_ref(names, environ, path)}
    _caching(doc, mapped, path)
    _logging(doc, mapped, path)
    region = doc.get("region")
    if region is not None:
        if not isinstance(region, str) or not region:
            raise ConfigError(f"{path}: region: expected a region name like us-east-1")
        mapped.region = region
    return mapped


def read_aws_agent_config(path: Path) -> dict[str, Any]:
    """Parse the TOML file (errors name the file, and the line where tomllib gives one)."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read AWS agent config {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def overlay(base: dict[str, Any], mapped: Mapped) -> dict[str, Any]:
    """``base`` (a raw YAML config, or {} for the AWS agent's own setup) with ``mapped`` on top."""
    doc = dict(base)
    if "store" not in doc:
        doc["store"] = {"type": "aws-secretsmanager", "client_side_encryption": False}
        doc.setdefault("keys", {})
    store = dict(doc["store"]) if isinstance(doc["store"], dict) else doc["store"]
    if mapped.region is not None:
        if isinstance(store, dict) and store.get("type") == "aws-secretsmanager":
            store["region"] = mapped.region
        else:
            mapped.notes.append(
                f"region {mapped.region}: no equivalent; the configured store is not "
                "aws-secretsmanager"
            )
    doc["store"] = store
    listen = dict(doc.get("listen") or {})
    listen["tcp"] = {**(listen.get("tcp") or {}), **mapped.listen_tcp}
    doc["listen"] = listen
    for section, values in (("refresh", mapped.refresh), ("log", mapped.log)):
        if values:
            doc[section] = {**(doc.get(section) or {}), **values}
    rule = {"secrets": ["*"], "token": TOKEN_NAME, "stages": ["*"]}
    access = list(doc.get("access") or [{"secrets": ["*"], "uids": [os.getuid()]}])
    doc["access"] = [*access, rule]
    return doc


def load_with_aws_agent_config(
    yaml_path: Path | None,
    toml_path: Path,
    *,
    report: Callable[[str], None] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Our config from the AWS agent's TOML file, laid over ``yaml_path`` if given.

    ``report`` receives one line per AWS-agent setting that has no equivalent.
    """
    mapped = map_aws_agent_config(read_aws_agent_config(toml_path), path=toml_path, environ=environ)
    base: dict[str, Any] = {}
    base_dir = toml_path.parent
    lines: dict[str, int] = {}
    if yaml_path is not None:
        raw, lines = load_yaml(yaml_path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{yaml_path}: (top level): the config must be a YAML mapping")
        base, base_dir = raw, yaml_path.parent
    doc = overlay(base, mapped)
    for note in mapped.notes:
        if report is not None:
            report(f"{toml_path}: {note}")
    return parse_config(doc, base_dir=base_dir, source=yaml_path, lines=lines)
