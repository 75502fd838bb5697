"""Value types shared by every layer: names, stages, versions and secret values."""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NoReturn

from agent.errors import BadRequest, InvalidName, KeyNotFound

_NAME_RE = re.compile(r"[A-Za-z0-9/_+=.@-]{1,512}")

#: The well-known stages. Any other stage label is a custom one.
CURRENT = "CURRENT"
PREVIOUS = "PREVIOUS"
PENDING = "PENDING"

#: AWS Secrets Manager spellings, accepted everywhere a stage is read.
STAGE_ALIASES = {"AWSCURRENT": CURRENT, "AWSPREVIOUS": PREVIOUS, "AWSPENDING": PENDING}
AWS_STAGE_NAMES = {v: k for k, v in STAGE_ALIASES.items()}
_STAGE_RE = re.compile(r"[A-Za-z0-9_.-]{1,256}")

ValueType = Literal["string", "binary"]


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid secret name.

    Raises:
        InvalidName: 1-512 chars of ``A-Za-z0-9/_+=.@-``, no ``..`` segment,
            no leading ``/`` (and no empty segment, so the name maps to one path).
    """
    if not _NAME_RE.fullmatch(name):
        raise InvalidName("invalid secret name: expected 1-512 characters of A-Za-z0-9/_+=.@-")
    segments = name.split("/")
    if name.startswith("/"):
        raise InvalidName("invalid secret name: must not start with '/'")
    if any(seg in ("", ".", "..") for seg in segments):
        raise InvalidName("invalid secret name: empty, '.' or '..' path segment")
    return name


def normalize_stage(stage: str) -> str:
    """Map ``AWSCURRENT``-style aliases to our stage names and validate the label."""
    stage = STAGE_ALIASES.get(stage, stage)
    if not _STAGE_RE.fullmatch(stage):
        raise BadRequest("invalid stage label: expected 1-256 characters of A-Za-z0-9_.-")
    return stage


def validate_version_id(version_id: str) -> str:
    """Return ``version_id`` if it is usable as a version id (a UUID or client token)."""
    if not _STAGE_RE.fullmatch(version_id):
        raise BadRequest("invalid version id: expected 1-256 characters of A-Za-z0-9_.-")
    return version_id


class SecretValue:
    """A secret's plaintext. Its repr and str never show the value.

    Compare with ``==`` (constant time). Get the bytes with :meth:`reveal`.
    Pickling is refused so a value cannot leak through a serialiser.
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = bytes(value)

    def reveal(self) -> bytes:
        """Return the plaintext bytes."""
        return self._value

    def text(self) -> str:
        """Return the plaintext as UTF-8 text."""
        return self._value.decode("utf-8")

    def json_key(self, key: str) -> Any:
        """Return one top-level field of a JSON-object value.

        Raises:
            KeyNotFound: the value is not a JSON object or has no such key. The
                message names the key, never the value.
        """
        try:
            doc = json.loads(self._value)
        except (ValueError, UnicodeDecodeError):
            raise KeyNotFound(f"key {key!r} requested but the value is not JSON") from None
        if not isinstance(doc, dict):
            raise KeyNotFound(f"key {key!r} requested but the value is not a JSON object")
        if key not in doc:
            raise KeyNotFound(f"the secret has no key {key!r}")
        return doc[key]

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretValue):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(("SecretValue", len(self._value)))

    def __repr__(self) -> str:
        return "SecretValue(<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretValue cannot be pickled")


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """Metadata of one version: never its value."""

    version_id: str
    created_at: datetime
    stages: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Secret:
    """One decrypted version of a secret."""

    name: str
    version_id: str
    created_at: datetime
    value: SecretValue = field(repr=False)
    value_type: ValueType = "string"
    stages: tuple[str, ...] = ()
    #: (provider, key) of each envelope recipient: which master keys this value hangs on.
    recipients: tuple[tuple[str, str], ...] = ()
    #: Response bodies built from this version, by kind; filled on the first read.
    _bodies: dict[str, bytes] | None = field(default=None, repr=False, compare=False)

    def body(self, kind: str, build: Callable[[Secret], bytes]) -> bytes:
        """The response body ``build(self)``, serialised once per version and kind.

        A version's value never changes and a stage change makes a new
        :class:`Secret` (:meth:`with_stages`), so the body needs no invalidation.
        """
        bodies = self._bodies
        if bodies is None:
            bodies = {}
            object.__setattr__(self, "_bodies", bodies)
        body = bodies.get(kind)
        if body is None:
            body = bodies[kind] = build(self)
        return body

    def with_stages(self, stages: tuple[str, ...]) -> Secret:
        """Return a copy carrying ``stages``."""
        return Secret(
            self.name,
            self.version_id,
            self.created_at,
            self.value,
            self.value_type,
            stages,
            self.recipients,
        )


def stages_of(stage_map: Mapping[str, str], version_id: str) -> tuple[str, ...]:
    """The stage labels that ``stage_map`` attaches to ``version_id``, sorted."""
    return tuple(sorted(s for s, v in stage_map.items() if v == version_id))
