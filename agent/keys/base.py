"""The key-provider protocols."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from agent.crypto.envelope import WrappedKey


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What ``keys list`` shows about a master key (never key material)."""

    provider: str
    key: str
    version: str = ""
    state: str = "enabled"  # enabled | disabled | deleted | unavailable | missing
    primary: bool = False
    created_at: str = ""
    detail: str = ""


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps and unwraps data keys with a master key that stays in the provider.

    ``name`` is the provider's name in the config (``keys: {<name>: ...}``); it
    is what envelopes record as ``keys[].provider``.

    Errors, and what they mean:

    * :class:`~agent.errors.KeyUnavailable` - transient (unreachable, timeout,
      throttled): retry later; stale-if-error applies.
    * :class:`~agent.errors.KeyRevoked` - the key is disabled, deleted or access
      was revoked: drop every cached data key of this provider/key.
    * :class:`~agent.errors.DecryptionError` - permanent for this blob: tampered
      wrapped key, wrong context, wrong key.
    """

    name: str

    async def wrap(self, dek: bytes, *, context: Mapping[str, str]) -> WrappedKey:
        """Wrap ``dek`` under the current master key, binding ``context``."""
        ...

    async def unwrap(self, wrapped: WrappedKey, *, context: Mapping[str, str]) -> bytearray:
        """Unwrap a data key; the caller owns (and wipes) the returned buffer."""
        ...

    async def aclose(self) -> None:
        """Release sessions and clients."""
        ...


@runtime_checkable
class KeyManager(Protocol):
    """Administration of a provider's master keys (``keys list|create|rotate``)."""

    async def list_keys(self) -> list[KeyInfo]:
        """Every master key (and version) the provider knows, with its state."""
        ...

    async def create_key(self) -> KeyInfo:
        """Create the master key if it does not exist yet."""
        ...

    async def rotate_key(self) -> KeyInfo:
        """Make a new key version primary; old versions keep unwrapping."""
        ...
