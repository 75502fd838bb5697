"""The local key provider: wraps data keys under master keys from a keyring file.

The keyring file (format, sealing, locking) is :mod:`agent.keys.keyring`.

Wrapped data key (the ``wrapped`` field of an envelope recipient; an on-disk
contract)::

    0x01 || version (4 bytes, big-endian) || nonce (12) || AES-256-GCM(key version, DEK, AAD)

with AAD = ``canonical_json({"key": <key name>, "version": <n>, "context": <wrap
context>})``. The key version rides in the blob, so envelopes written before a
``keys rotate`` keep opening.
"""

from __future__ import annotations

import asyncio
import functools
import os
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.config import AgentConfig, LocalKeysConfig, read_secret_ref
from agent.crypto.envelope import WrappedKey, canonical_json
from agent.errors import (
    BackendUnavailable,
    ConfigError,
    DecryptionError,
    KeyRevoked,
    KeyUnavailable,
)
from agent.keys.base import KeyInfo
from agent.keys.keyring import KeyVersion, LocalKeyring, MasterKey, stat_signature
from agent.metrics import Metrics

__all__ = [
    "BLOB_FORMAT",
    "KeyVersion",
    "LocalKeyProvider",
    "LocalKeyring",
    "MasterKey",
    "Passphrase",
]

BLOB_FORMAT: Final = 1
_NONCE_SIZE: Final = 12
_TAG_SIZE: Final = 16
_HEADER: Final = struct.Struct(">BI")

Passphrase = bytes | Callable[[], bytes] | None


class LocalKeyProvider:
    """A :class:`~agent.keys.base.KeyProvider` and ``KeyManager`` over a keyring file.

    The keyring is loaded on first use and reloaded whenever the file changes,
    so a running agent sees a ``keys rotate`` done by the CLI. Keyring problems
    (missing, wrong mode, wrong passphrase) surface from ``wrap``/``unwrap`` as
    :class:`~agent.errors.KeyUnavailable` (the cache may serve the last good
    value while an operator fixes the file) and from the admin methods as
    :class:`~agent.errors.ConfigError`.
    """

    def __init__(
        self,
        name: str = "local",
        *,
        keyring: Path,
        passphrase: Passphrase = None,
        key_name: str = "master",
        metrics: Metrics | None = None,
    ) -> None:
        self.name = name
        self.path = Path(keyring)
        self.key_name = key_name
        self.metrics = metrics if metrics is not None else Metrics()
        self._passphrase = passphrase
        self._keyring: LocalKeyring | None = None
        self._reload_lock = asyncio.Lock()

    @classmethod
    def from_config(
        cls, name: str, cfg: LocalKeysConfig, *, config: AgentConfig, metrics: Metrics
    ) -> LocalKeyProvider:
        """Build from config; the passphrase reference is read at each (re)load."""
        passphrase: Passphrase = None
        if cfg.passphrase is not None:
            passphrase = functools.partial(
                read_secret_ref, cfg.passphrase, base_dir=config.base_dir
            )
        return cls(name, keyring=cfg.keyring, passphrase=passphrase, metrics=metrics)

    async def wrap(self, dek: bytes, *, context: Mapping[str, str]) -> WrappedKey:
        """Wrap ``dek`` under the primary version of the configured master key."""
        started = time.perf_counter()
        try:
            key = self._key(await self._current(), self.key_name)
            blob = _wrap_blob(key, dek, context)
        except BaseException as exc:
            self._record("wrap", _outcome(exc), started)
            raise
        self._record("wrap", "ok", started)
        return WrappedKey(provider=self.name, key=self.key_name, wrapped=blob)

    async def unwrap(self, wrapped: WrappedKey, *, context: Mapping[str, str]) -> bytearray:
        """Unwrap with the key version named in the blob.

        Raises:
            KeyUnavailable: the keyring cannot be loaded right now.
            KeyRevoked: the keyring has no key of that name.
            DecryptionError: unknown version, tampered blob or wrong context.
        """
        started = time.perf_counter()
        try:
            if wrapped.provider != self.name:
                raise DecryptionError(
                    f"key provider {self.name!r} cannot unwrap a data key "
                    f"wrapped by provider {wrapped.provider!r}"
                )
            key = self._key(await self._current(), wrapped.key)
            dek = _unwrap_blob(self.name, key, wrapped.wrapped, context)
        except BaseException as exc:
            self._record("unwrap", _outcome(exc), started)
            raise
        self._record("unwrap", "ok", started)
        return dek

    async def list_keys(self) -> list[KeyInfo]:
        """Every key version in the keyring (never the material)."""
        keyring = await asyncio.to_thread(self._load)
        return [
            self._info(key, v)
            for _, key in sorted(keyring.keys.items())
            for _, v in sorted(key.versions.items())
        ]

    async def create_key(self) -> KeyInfo:
        """Create the keyring or the configured key in it if missing (idempotent)."""

        def create() -> LocalKeyring:
            if not self.path.exists():
                return LocalKeyring.create(
                    self.path, passphrase=self._passphrase_bytes(), key_name=self.key_name
                )
            keyring = self._load()
            keyring.create_key(self.key_name)
            return keyring

        keyring = self._keyring = await asyncio.to_thread(create)
        key = keyring.keys[self.key_name]
        return self._info(key, key.current())

    async def rotate_key(self) -> KeyInfo:
        """Add a new primary version of the configured key; old versions keep unwrapping."""

        def rotate() -> tuple[LocalKeyring, KeyVersion]:
            keyring = self._load()
            return keyring, keyring.rotate(self.key_name)

        keyring, version = await asyncio.to_thread(rotate)
        self._keyring = keyring
        return self._info(keyring.keys[self.key_name], version)

    async def is_current(self, wrapped: WrappedKey) -> bool:
        """Whether ``wrapped`` was made by the primary version of the configured key."""
        if wrapped.provider != self.name or wrapped.key != self.key_name:
            return False
        keyring = await self._current()
        key = self._key(keyring, self.key_name)
        try:
            _, version = _HEADER.unpack(wrapped.wrapped[: _HEADER.size])
        except struct.error:
            return False
        return bool(version == key.primary)

    async def aclose(self) -> None:
        """Forget the loaded keyring."""
        self._keyring = None

    async def _current(self) -> LocalKeyring:
        keyring = self._keyring
        if keyring is not None and keyring.signature == stat_signature(self.path):
            return keyring
        async with self._reload_lock:
            keyring = self._keyring
            if keyring is None or keyring.signature != stat_signature(self.path):
                try:
                    keyring = await asyncio.to_thread(self._load)
                except ConfigError as exc:
                    raise KeyUnavailable(f"key provider {self.name!r}: {exc.message}") from None
                self._keyring = keyring
            return keyring

    def _load(self) -> LocalKeyring:
        return LocalKeyring.load(self.path, passphrase=self._passphrase_bytes())

    def _passphrase_bytes(self) -> bytes | None:
        source = self._passphrase
        return source() if callable(source) else source

    def _key(self, keyring: LocalKeyring, name: str) -> MasterKey:
        key = keyring.keys.get(name)
        if key is None:
            raise KeyRevoked(
                f"key provider {self.name!r}: keyring {self.path} has no key {name!r}",
                provider=self.name,
                key=name,
            )
        return key

    def _info(self, key: MasterKey, version: KeyVersion) -> KeyInfo:
        return KeyInfo(
            provider=self.name,
            key=key.name,
            version=str(version.version),
            primary=version.version == key.primary,
            created_at=version.created_at,
            detail=str(self.path),
        )

    def _record(self, operation: str, outcome: str, started: float) -> None:
        self.metrics.key_operations.labels(self.name, operation, outcome).inc()
        self.metrics.key_operation_seconds.labels(self.name, operation).observe(
            time.perf_counter() - started
        )


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, KeyRevoked):
        return "revoked"
    if isinstance(exc, DecryptionError):
        return "refused"
    if isinstance(exc, BackendUnavailable):
        return "unavailable"
    return "error" if isinstance(exc, Exception) else "cancelled"


# --------------------------------------------------------------------------- wrapped blobs


def _blob_aad(key: str, version: int, context: Mapping[str, str]) -> bytes:
    return canonical_json({"key": key, "version": version, "context": dict(context)})


def _wrap_blob(key: MasterKey, dek: bytes | bytearray, context: Mapping[str, str]) -> bytes:
    current = key.current()
    nonce = os.urandom(_NONCE_SIZE)
    sealed = AESGCM(current.material).encrypt(
        nonce, bytes(dek), _blob_aad(key.name, current.version, context)
    )
    return _HEADER.pack(BLOB_FORMAT, current.version) + nonce + sealed


def _unwrap_blob(
    provider: str, key: MasterKey, blob: bytes, context: Mapping[str, str]
) -> bytearray:
    where = f"key provider {provider!r}, key {key.name!r}"
    if len(blob) < _HEADER.size + _NONCE_SIZE + _TAG_SIZE or blob[0] != BLOB_FORMAT:
        raise DecryptionError(f"{where}: wrapped data key is truncated or of an unknown format")
    _, version = _HEADER.unpack_from(blob)
    entry = key.versions.get(version)
    if entry is None:
        raise DecryptionError(f"{where}: no version {version} in the keyring")
    nonce = blob[_HEADER.size : _HEADER.size + _NONCE_SIZE]
    try:
        dek = AESGCM(entry.material).decrypt(
            nonce, blob[_HEADER.size + _NONCE_SIZE :], _blob_aad(key.name, version, context)
        )
    except InvalidTag:
        raise DecryptionError(
            f"{where}, version {version}: wrapped data key failed "
            "authentication (tampered, or wrapped for another context)"
        ) from None
    return bytearray(dek)
