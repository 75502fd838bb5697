"""Reading a config file's YAML strictly: size cap, UTF-8, depth, duplicate keys, lines.

:mod:`agent.config` validates what this returns; the line of each YAML path
lets its errors point into the file (``agent.yaml:12: templates[0].mode: ...``).
Import from ``agent.config``, which re-exports these names.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from agent.bounded import (
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_SIZE,
    TooLarge,
    read_capped,
    yaml_depth_ok,
)
from agent.errors import ConfigError
from agent.fsowner import denied_suffix


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


def read_config_bytes(path: Path) -> bytes:
    """The bytes of a config file, up to the size cap (ConfigError naming the file if not)."""
    try:
        return read_capped(path, limit=MAX_CONFIG_SIZE)
    except TooLarge as exc:
        raise ConfigError(f"config {str(path)!r} is too large: {exc}") from None
    except OSError as exc:
        reason = (exc.strerror or str(exc)) + denied_suffix(exc, path)
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
    loader: yaml.SafeLoader | None = None
    try:
        # Inside the try: the loader's reader refuses some characters (NUL) at once.
        loader = yaml.SafeLoader(text)
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
        if loader is not None:
            loader.dispose()
    return data, lines


def load_yaml(path: Path) -> tuple[object, dict[str, int]]:
    """Read a config file's YAML strictly (see :func:`parse_yaml_text`), without validating it."""
    return parse_yaml_text(read_config_bytes(path), path=path)
