"""Lazy import of backends by name, so an unused SDK is never imported."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from agent.errors import ConfigError


def load_backend(registry: Mapping[str, str], kind: str, what: str) -> Any:
    """Import ``"module:attr"`` registered under ``kind``.

    Raises:
        ConfigError: unknown kind, or its optional dependency is not installed.
    """
    try:
        target = registry[kind]
    except KeyError:
        raise ConfigError(f"unknown {what} type {kind!r}") from None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"{what} type {kind!r} needs the Python package {exc.name!r}; "
            f"install secrets-agent with its extra (e.g. pip install 'secrets-agent[{kind}]')"
        ) from None
    return getattr(module, attr)
