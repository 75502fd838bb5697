"""Bounded parsing of outside data: one place for size and nesting caps.

Everything the agent reads from outside (stage maps, envelopes, store
listings, the keyring, the config) goes through here, so that

* an object larger than its cap is refused *before* it is read whole (from a
  file's ``fstat``, an HTTP ``Content-Length``, an etcd value's size);
* JSON nested deeper than its cap is refused (the standard parser would raise
  RecursionError, which is not a ValueError and used to escape every handler);
* *any* parse failure becomes the caller's domain error, with a message naming
  what was read and why it was refused, never its content.

Defaults (configurable per store as ``store.max_object_size`` and
``store.max_json_depth``): 1 MiB per store object, which is 15 times the
largest value AWS Secrets Manager accepts (64 KiB) after base64 and the
envelope's framing; 32 levels of JSON, where a genuine envelope has 3.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from agent.errors import AgentError

MAX_OBJECT_SIZE = 1 << 20
MAX_JSON_DEPTH = 32
#: The config file: templates may be inline, so more room than a store object.
MAX_CONFIG_SIZE = 4 << 20
MAX_CONFIG_DEPTH = 64


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps for objects read from a store."""

    max_object_size: int = MAX_OBJECT_SIZE
    max_json_depth: int = MAX_JSON_DEPTH


DEFAULT_LIMITS = Limits()
ErrorFactory = Callable[[str], AgentError]


class TooLarge(ValueError):
    """An object is over its size cap (raised before it is read whole)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes, over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


def check_size(size: int | None, limit: int) -> None:
    """Raise :class:`TooLarge` if a known ``size`` is over ``limit`` (None: unknown, ok)."""
    if size is not None and size > limit:
        raise TooLarge(size, limit)


def read_capped(path: Path, *, limit: int, flags: int = 0) -> bytes:
    """The bytes of the regular file ``path``, refused by size before they are read.

    Args:
        flags: extra ``os.open`` flags (e.g. ``O_NOFOLLOW``).

    Raises:
        TooLarge: the file is over ``limit`` (checked with fstat, and again while
            reading, as the file may grow).
        OSError: it cannot be opened or read, or is not a regular file (EINVAL).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(22, "not a regular file", str(path))
        return read_fd_capped(fd, st, limit=limit)
    finally:
        os.close(fd)


def read_fd_capped(fd: int, st: os.stat_result, *, limit: int) -> bytes:
    """Read an open regular file whose stat is ``st``, at most ``limit`` bytes."""
    check_size(st.st_size, limit)
    chunks: list[bytes] = []
    total = 0
    while chunk := os.read(fd, 1 << 16):
        total += len(chunk)
        check_size(total, limit)  # grown since the fstat
        chunks.append(chunk)
    return b"".join(chunks)


def _depth(doc: Any, limit: int) -> bool:
    """Whether ``doc`` nests at most ``limit`` levels (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if level > limit:
            return False
        stack.extend((c, level + 1) for c in children if isinstance(c, (dict, list)))
    return True


def loads_json(
    data: bytes | str,
    *,
    what: str,
    error: ErrorFactory,
    limits: Limits = DEFAULT_LIMITS,
    check_length: bool = True,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """Parse JSON from outside, with the size and nesting caps of ``limits``.

    Args:
        what: names the object in messages (``"stage map of secret 'db' (path)"``).
        error: builds the domain error from a message, e.g. ``DecryptionError``.
        check_length: False where the size was already checked against the
            store's own cap before the read (envelopes, in crypto).

    Raises:
        AgentError: whatever ``error`` builds, for any failure: too large, not
            UTF-8, not JSON, nested too deep, or rejected by ``object_pairs_hook``.
    """
    if check_length and len(data) > limits.max_object_size:
        _fail(error, what, f"{len(data)} bytes, over the limit of {limits.max_object_size}")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        _fail(error, what, "not UTF-8")
    try:
        doc = json.loads(text, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        _fail(error, what, f"JSON nested more than {limits.max_json_depth} levels deep")
    except (ValueError, TypeError, MemoryError, OverflowError) as exc:
        # JSONDecodeError carries only a position: safe to show; others by type.
        reason = str(exc) if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        _fail(error, what, f"not valid JSON ({reason})")
    # Nesting cannot exceed the count of openers (those inside strings only add
    # to it): the walk is needed only past that bound. Skipping it saves a
    # third of an envelope's parse on the read path.
    limit = limits.max_json_depth
    if text.count("{") + text.count("[") > limit and not _depth(doc, limit):
        _fail(error, what, f"JSON nested more than {limits.max_json_depth} levels deep")
    return doc


def _fail(error: ErrorFactory, what: str, reason: str) -> NoReturn:
    raise error(f"{what}: {reason}")


def yaml_depth_ok(text: str, limit: int) -> bool:
    """Whether the YAML ``text`` nests at most ``limit`` collections deep.

    Walks the parser's event stream, which is not recursive, so a document of
    100,000 nested brackets is refused early instead of overflowing the stack
    of the recursive composer. Syntax errors are raised as ``yaml.YAMLError``.
    """
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > limit:
                return False
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return True
