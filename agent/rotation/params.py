"""Parsing of rotator parameters, which come from YAML (typed) or ``--param k=v`` (text)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.config import parse_duration
from agent.errors import ConfigError


def check_known(params: Mapping[str, Any], known: set[str], rotator: str) -> None:
    """Refuse parameters the rotator does not know (a typo must not pass silently)."""
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(
            f"params.{unknown[0]}: unknown parameter of rotator {rotator!r} "
            f"(known: {', '.join(sorted(known))})"
        )


def as_bool(params: Mapping[str, Any], key: str, default: bool) -> bool:
    value = params.get(key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ConfigError(f"params.{key}: expected true or false, got {value!r}")


def as_int(params: Mapping[str, Any], key: str, default: int, *, lo: int, hi: int) -> int:
    value = params.get(key, default)
    try:
        number = int(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not lo <= number <= hi:
        raise ConfigError(f"params.{key}: expected a whole number from {lo} to {hi}, got {value!r}")
    return number


def as_str(params: Mapping[str, Any], key: str, default: str | None) -> str | None:
    value = params.get(key, default)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"params.{key}: expected text, got {value!r}")
    return value


def as_duration(params: Mapping[str, Any], key: str, default: float) -> float:
    try:
        return parse_duration(params.get(key, default))
    except ValueError as exc:
        raise ConfigError(f"params.{key}: {exc}") from None
