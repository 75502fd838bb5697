"""The ``random`` rotator: a new random password or token, or one key of a JSON secret.

Parameters (all optional):

* ``length`` (32): characters in the new value, 8 to 4096.
* ``lowercase``, ``uppercase``, ``digits`` (true), ``punctuation`` (false):
  the character classes to draw from.
* ``exclude_characters`` (""): characters never used (e.g. quotes for a
  connection string).
* ``require_each_class`` (true): at least one character of each class.
* ``key`` (none): the secret is a JSON object and only this key is replaced;
  every other key keeps its CURRENT value.

There is no target system: ``set`` does nothing, ``test`` checks the value's
shape. Values come from :mod:`secrets` (the OS CSPRNG).
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Mapping
from typing import Any

from agent.errors import ConfigError
from agent.rotation.base import RotationContext, RotationFailed
from agent.rotation.params import as_bool, as_int, as_str, check_known

_CLASSES = {
    "lowercase": (string.ascii_lowercase, True),
    "uppercase": (string.ascii_uppercase, True),
    "digits": (string.digits, True),
    "punctuation": (string.punctuation, False),
}
_KNOWN = {*_CLASSES, "length", "exclude_characters", "require_each_class", "key"}


class RandomRotator:
    """New random values from the configured character classes."""

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        params = dict(params or {})
        check_known(params, _KNOWN, "random")
        self.length = as_int(params, "length", 32, lo=8, hi=4096)
        exclude = set(as_str(params, "exclude_characters", "") or "")
        self.classes = [
            "".join(c for c in chars if c not in exclude)
            for key, (chars, default) in _CLASSES.items()
            if as_bool(params, key, default)
        ]
        self.classes = [c for c in self.classes if c]
        if not self.classes:
            raise ConfigError("params: no characters left to draw from (classes off or excluded)")
        self.require_each = as_bool(params, "require_each_class", True)
        if self.require_each and len(self.classes) > self.length:
            raise ConfigError("params.length: shorter than the number of required classes")
        self.key = as_str(params, "key", None)
        self.alphabet = "".join(self.classes)

    def generate(self) -> str:
        """A new value: uniform over the alphabet, each class present if required."""
        while True:
            value = "".join(secrets.choice(self.alphabet) for _ in range(self.length))
            if not self.require_each or all(any(c in cls for c in value) for cls in self.classes):
                return value

    async def create(self, ctx: RotationContext) -> bytes:
        if self.key is None:
            return self.generate().encode()
        doc: dict[str, Any] = {}
        if ctx.current is not None:
            try:
                loaded = json.loads(ctx.current.reveal())
            except (ValueError, UnicodeDecodeError):
                raise RotationFailed(
                    f"params.key is {self.key!r} but the CURRENT value is not JSON"
                ) from None
            if not isinstance(loaded, dict):
                raise RotationFailed(
                    f"params.key is {self.key!r} but the CURRENT value is not a JSON object"
                )
            doc = loaded
        doc[self.key] = self.generate()
        return json.dumps(doc).encode()

    async def set(self, ctx: RotationContext) -> None:
        """No target system to update."""

    async def test(self, ctx: RotationContext) -> None:
        """Check that the pending value has the shape this rotator makes."""
        if ctx.pending is None:
            raise RotationFailed("no pending value to test")
        if self.key is not None:
            try:
                doc = json.loads(ctx.pending.reveal())
            except (ValueError, UnicodeDecodeError):
                raise RotationFailed("the pending value is not JSON") from None
            if not isinstance(doc, dict) or not isinstance(doc.get(self.key), str):
                raise RotationFailed(f"the pending value has no text key {self.key!r}")

    async def aclose(self) -> None:
        return None
