"""PKCS#11 key provider: the master key lives in an HSM and never leaves it.

The master key is an AES-256 secret key object in the token, generated there,
``SENSITIVE`` and not ``EXTRACTABLE``. Each key version is a separate object
with the configured label and ``CKA_ID`` = the version number (4 bytes, big
endian); the highest is primary.

Wrapped blob: ``0x01 || version (4) || IV (12) || AES-GCM(DEK) || tag``, with the
canonical wrap context as the GCM AAD (CKM_AES_GCM inside the token), so the
version rides in the blob and old envelopes keep opening after a rotation.

One logged-in session is reused; PKCS#11 sessions are not thread-safe, so every
call holds a lock, and calls run in a worker thread (``asyncio.to_thread``) to
keep the event loop free.
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from agent.config import AgentConfig, Pkcs11KeysConfig, read_secret_ref
from agent.crypto.envelope import WrappedKey, canonical_json
from agent.errors import AgentError, ConfigError, DecryptionError, KeyRevoked, KeyUnavailable
from agent.keys.base import KeyInfo
from agent.metrics import Metrics

T = TypeVar("T")
_FORMAT = b"\x01"
_VERSION = struct.Struct(">I")
_IV = 12


class Pkcs11KeyProvider:
    """A KeyProvider and KeyManager on an AES key in a PKCS#11 token."""

    def __init__(
        self,
        name: str,
        *,
        module: Path,
        token: str,
        pin: bytes | Callable[[], bytes],
        key: str = "secrets-agent-master",
        mechanism: str = "aes-gcm",
        metrics: Metrics | None = None,
    ) -> None:
        if mechanism != "aes-gcm":
            raise ConfigError(
                f"PKCS#11 mechanism {mechanism!r} is not supported yet; use aes-gcm",
                path=f"keys.{name}.mechanism",
            )
        self.name = name
        self.module = Path(module)
        self.token_label = token
        self._pin = pin
        self.key_label = key
        self.metrics = metrics if metrics is not None else Metrics()
        self._lock = threading.Lock()
        self._session: Any = None
        self._keys: dict[int, Any] = {}
        self.last_error: str | None = None

    @classmethod
    def from_config(
        cls, name: str, cfg: Pkcs11KeysConfig, *, config: AgentConfig, metrics: Metrics
    ) -> Pkcs11KeyProvider:
        def pin() -> bytes:
            return read_secret_ref(cfg.pin, base_dir=config.base_dir)

        return cls(
            name,
            module=cfg.module,
            token=cfg.token,
            pin=pin,
            key=cfg.key,
            mechanism=cfg.mechanism,
            metrics=metrics,
        )

    # ----------------------------------------------------------------- session

    def _open(self) -> Any:
        import pkcs11

        if self._session is None:
            pin = self._pin() if callable(self._pin) else self._pin
            try:
                lib = pkcs11.lib(str(self.module))
                token = lib.get_token(token_label=self.token_label)
                try:
                    self._session = token.open(user_pin=pin.decode(), rw=True)
                except pkcs11.exceptions.UserAlreadyLoggedIn:
                    # Login is per application: another session of ours logged in.
                    self._session = token.open(rw=True)
            except (pkcs11.exceptions.PKCS11Error, RuntimeError, OSError) as exc:
                raise KeyUnavailable(
                    f"HSM provider {self.name!r}: cannot open token "
                    f"{self.token_label!r}: {type(exc).__name__}"
                ) from None
        return self._session

    def _versions(self, session: Any) -> dict[int, Any]:
        from pkcs11 import Attribute, ObjectClass

        found = {}
        for obj in session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: self.key_label}
        ):
            key_id = bytes(obj[Attribute.ID] or b"")
            if len(key_id) == _VERSION.size:
                found[_VERSION.unpack(key_id)[0]] = obj
        return found

    async def _run(self, operation: str, fn: Callable[[Any], T]) -> T:
        def call() -> T:
            with self._lock:
                return fn(self._open())

        started = time.perf_counter()
        try:
            result = await asyncio.to_thread(call)
        except AgentError as exc:
            outcome = (
                "revoked"
                if isinstance(exc, KeyRevoked)
                else "unavailable"
                if isinstance(exc, KeyUnavailable)
                else "refused"
            )
            self.metrics.key_operations.labels(self.name, operation, outcome).inc()
            self.last_error = exc.message
            raise
        finally:
            self.metrics.key_operation_seconds.labels(self.name, operation).observe(
                time.perf_counter() - started
            )
        self.metrics.key_operations.labels(self.name, operation, "ok").inc()
        return result

    def _key(self, session: Any, version: int | None) -> tuple[int, Any]:
        if version is None or version not in self._keys:
            self._keys = self._versions(session)
        if not self._keys:
            raise KeyRevoked(
                f"HSM provider {self.name!r}: no key labelled {self.key_label!r} "
                "in the token (deleted?)",
                provider=self.name,
                key=self.key_label,
            )
        if version is None:
            version = max(self._keys)
        if version not in self._keys:
            raise KeyRevoked(
                f"HSM provider {self.name!r}: key {self.key_label!r} version {version} is gone",
                provider=self.name,
                key=self.key_label,
            )
        return version, self._keys[version]

    # -------------------------------------------------------------- wrap/unwrap

    async def wrap(self, dek: bytes, *, context: Mapping[str, str]) -> WrappedKey:
        from pkcs11 import Mechanism
        from pkcs11.mechanisms import GCMParams

        aad = canonical_json(dict(context))

        def go(session: Any) -> bytes:
            version, key = self._key(session, None)
            iv = os.urandom(_IV)
            sealed = key.encrypt(
                bytes(dek), mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad, 128)
            )
            return _FORMAT + _VERSION.pack(version) + iv + bytes(sealed)

        return WrappedKey(self.name, self.key_label, await self._run("wrap", go))

    async def unwrap(self, wrapped: WrappedKey, *, context: Mapping[str, str]) -> bytearray:
        import pkcs11
        from pkcs11 import Mechanism
        from pkcs11.mechanisms import GCMParams

        blob = wrapped.wrapped
        head = 1 + _VERSION.size + _IV
        if blob[:1] != _FORMAT or len(blob) < head + 16 or wrapped.key != self.key_label:
            raise DecryptionError(
                f"HSM provider {self.name!r}: malformed wrapped key or another key label"
            )
        version = _VERSION.unpack(blob[1 : 1 + _VERSION.size])[0]
        iv = blob[1 + _VERSION.size : head]
        aad = canonical_json(dict(context))

        def decrypt(key: Any) -> bytearray:
            try:
                return bytearray(
                    key.decrypt(
                        blob[head:],
                        mechanism=Mechanism.AES_GCM,
                        mechanism_param=GCMParams(iv, aad, 128),
                    )
                )
            except (
                pkcs11.exceptions.EncryptedDataInvalid,
                pkcs11.exceptions.DataInvalid,
                pkcs11.exceptions.EncryptedDataLenRange,
                pkcs11.exceptions.FunctionFailed,
                pkcs11.exceptions.GeneralError,
            ):
                # SoftHSM reports a failed GCM tag check as a general error.
                raise DecryptionError(
                    f"HSM provider {self.name!r}: wrapped key refused "
                    f"(tampered or another context), version {version}"
                ) from None

        def go(session: Any) -> bytearray:
            _, key = self._key(session, version)
            try:
                return decrypt(key)
            except (pkcs11.exceptions.ObjectHandleInvalid, pkcs11.exceptions.KeyHandleInvalid):
                self._keys = {}  # the key object went away: look it up again (or revoked)
                _, key = self._key(session, version)
                return decrypt(key)

        return await self._run("unwrap", go)

    # -------------------------------------------------------------- management

    def _generate(self, session: Any, version: int) -> None:
        from pkcs11 import Attribute, KeyType

        session.generate_key(
            KeyType.AES,
            256,
            label=self.key_label,
            id=_VERSION.pack(version),
            store=True,
            template={
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.ENCRYPT: True,
                Attribute.DECRYPT: True,
                Attribute.TOKEN: True,
            },
        )
        self._keys = {}

    async def list_keys(self) -> list[KeyInfo]:
        def go(session: Any) -> list[KeyInfo]:
            versions = self._versions(session)
            if not versions:
                return [
                    KeyInfo(
                        self.name,
                        self.key_label,
                        state="missing",
                        detail="run: secrets-agent keys create --provider " + self.name,
                    )
                ]
            top = max(versions)
            return [
                KeyInfo(
                    self.name,
                    self.key_label,
                    version=str(v),
                    primary=v == top,
                    detail="in token " + self.token_label,
                )
                for v in sorted(versions)
            ]

        try:
            return await self._run("list", go)
        except KeyUnavailable as exc:
            return [KeyInfo(self.name, self.key_label, state="unavailable", detail=exc.message)]

    async def create_key(self) -> KeyInfo:
        def go(session: Any) -> KeyInfo:
            versions = self._versions(session)
            if not versions:
                self._generate(session, 1)
            return KeyInfo(
                self.name,
                self.key_label,
                version=str(max(versions or {1: None})),
                primary=True,
                detail="generated in the token (non-extractable)",
            )

        return await self._run("create", go)

    async def rotate_key(self) -> KeyInfo:
        def go(session: Any) -> KeyInfo:
            new = max(self._versions(session) or {0: None}) + 1
            self._generate(session, new)
            return KeyInfo(self.name, self.key_label, version=str(new), primary=True)

        return await self._run("rotate", go)

    def status(self) -> dict[str, object]:
        return {
            "provider": self.name,
            "type": "pkcs11",
            "key": self.key_label,
            "last_error": self.last_error,
        }

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock:
                if self._session is not None:
                    self._session.close()
                    self._session = None

        await asyncio.to_thread(close)
