"""PKCS#11 key provider: the master key lives in an HSM and never leaves it.

The master key is an AES-256 secret key object generated in the token,
``SENSITIVE``, not ``EXTRACTABLE``, not ``MODIFIABLE``, allowed one mechanism
only. Each key version is a separate object with the configured label and
``CKA_ID`` = the version number (4 bytes, big endian); the highest is primary.

Wrapped blobs (``format || version (4, big endian) || body``); the version rides
in the blob, so envelopes keep opening after ``keys rotate``:

* ``aes-gcm`` (format 1): ``IV (12) || CKM_AES_GCM(DEK) || tag (16)``, with the
  canonical wrap context as the GCM AAD, computed inside the token.
* ``aes-key-wrap-pad`` (format 2): ``CKM_AES_KEY_WRAP_PAD`` (RFC 5649) of the
  48-byte secret ``DEK || SHA-256(canonical wrap context)[:16]``. Key wrap has
  no AAD, so the context digest travels inside the wrapped (authenticated)
  secret and is compared after unwrapping; a blob moved to another store fails.
  The unwrapped secret is a non-sensitive session object that is read once and
  destroyed at once.

One logged-in session is reused. PKCS#11 sessions are not thread-safe, so each
call holds a lock, and calls run in a worker thread (``asyncio.to_thread``) to
keep the event loop free. Login state belongs to the process: another session
of this process closing logs ours out too, so a key that seems missing is looked
up again after a fresh login before it is called revoked. A refused PIN is
never tried again (HSMs lock the user after a few failures) until the PIN read
from its reference changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import struct
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

from agent.config import AgentConfig, Pkcs11KeysConfig, read_secret_ref
from agent.crypto.envelope import WrappedKey
from agent.errors import (
    AgentError,
    ConfigError,
    DecryptionError,
    KeyRevoked,
    KeyUnavailable,
)
from agent.keys.base import KeyInfo
from agent.keys.pkcs11_mech import Mechanisms, named
from agent.metrics import Metrics

T = TypeVar("T")
_FORMATS: Final = {"aes-gcm": 1, "aes-key-wrap-pad": 2}
_HEADER: Final = struct.Struct(">BI")
#: The session or its object handles went stale: log in again, retry once.
_STALE: Final = (
    "SessionHandleInvalid SessionClosed UserNotLoggedIn ObjectHandleInvalid KeyHandleInvalid "
    "WrappingKeyHandleInvalid UnwrappingKeyHandleInvalid"
)
#: Login refused: never retried with the same PIN.
_PIN_ERRORS: Final = (
    "PinIncorrect PinInvalid PinLenRange PinLocked PinExpired UserPinNotInitialized"
)


class _Misconfigured(Exception):
    """Module, token or PIN problem: ConfigError for admin commands, else KeyUnavailable."""


class Pkcs11KeyProvider(Mechanisms):
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
        if mechanism not in _FORMATS:
            raise ConfigError(
                f"unknown PKCS#11 mechanism {mechanism!r}; use one of {sorted(_FORMATS)}",
                path=f"keys.{name}.mechanism",
            )
        self.name = name
        self.module = Path(module)
        self.token_label = token
        self.key_label = key
        self.mechanism = mechanism
        self.metrics = metrics if metrics is not None else Metrics()
        self._pin = pin
        self._pin_salt = os.urandom(16)
        self._refused_pin: bytes | None = None
        self._lock = threading.Lock()
        self._session: Any = None
        self._keys: dict[int, Any] = {}
        self.state = "unknown"
        self.last_error: str | None = None

    @classmethod
    def from_config(
        cls, name: str, cfg: Pkcs11KeysConfig, *, config: AgentConfig, metrics: Metrics
    ) -> Pkcs11KeyProvider:
        """Build from config; the PIN reference is read at each login."""

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

    def _library(self) -> Any:
        import pkcs11

        path = str(self.module)
        if not self.module.is_file():
            raise _Misconfigured(f"PKCS#11 module {path} does not exist")
        # python-pkcs11 caches libraries by path string; loading the same file under
        # another name would initialise it twice in this process.
        real = os.path.realpath(path)
        for so, lib in dict(getattr(pkcs11, "_loaded", {})).items():
            if so != path and os.path.realpath(so) == real:
                return lib
        try:
            return pkcs11.lib(path)
        except pkcs11.PKCS11Error as exc:
            raise _Misconfigured(f"cannot load PKCS#11 module {path}: {exc}") from None

    def _login(self) -> Any:
        import pkcs11

        try:
            pin = self._pin() if callable(self._pin) else self._pin
        except ConfigError as exc:
            raise _Misconfigured(f"PIN: {exc.message}") from None
        fingerprint = hmac.new(self._pin_salt, pin, hashlib.sha256).digest()
        if fingerprint == self._refused_pin:
            raise _Misconfigured("the token refused this PIN before; not trying it again")
        try:
            token = self._library().get_token(token_label=self.token_label)
        except pkcs11.NoSuchToken:
            raise _Misconfigured(f"no token labelled {self.token_label!r}") from None
        try:
            return token.open(user_pin=pin.decode(), rw=True)
        except pkcs11.UserAlreadyLoggedIn:
            return token.open(rw=True)  # login is per process: another session of ours did it
        except pkcs11.PKCS11Error as exc:
            if not named(exc, _PIN_ERRORS):
                raise
            self._refused_pin = fingerprint
            raise _Misconfigured(f"login refused ({type(exc).__name__})") from None

    def _open(self) -> Any:
        if self._session is None:
            self._session = self._login()
        return self._session

    def _reset(self) -> None:
        """Forget the session and key handles (closing a dead session may fail)."""
        session, self._session, self._keys = self._session, None, {}
        if session is not None:
            with contextlib.suppress(Exception):  # a dead session fails to close
                session.close()

    def _versions(self) -> dict[int, Any]:
        from pkcs11 import Attribute, ObjectClass

        found = {}
        for obj in self._open().get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: self.key_label}
        ):
            key_id = bytes(obj[Attribute.ID] or b"")
            if len(key_id) == 4:
                found[int.from_bytes(key_id, "big")] = obj
        return found

    def _key(self, version: int | None) -> tuple[int, Any]:
        """The primary key (``version`` None) or that version.

        Raises:
            KeyRevoked: no version of the key is in the token (after a fresh login).
            DecryptionError: that version is not, but others are.
        """
        if version is None or version not in self._keys:
            self._keys = self._versions()
            if not self._keys:  # logged out by another session of this process? look again
                self._reset()
                self._keys = self._versions()
        where = f"HSM provider {self.name!r}: key {self.key_label!r}"
        if not self._keys:
            raise KeyRevoked(
                f"{where} is not in token {self.token_label!r} (deleted?)",
                provider=self.name,
                key=self.key_label,
            )
        version = max(self._keys) if version is None else version
        if version not in self._keys:  # like a corrupt blob: the other versions still work
            raise DecryptionError(f"{where} has no version {version} (destroyed, or corrupt blob)")
        return version, self._keys[version]

    async def _run(self, operation: str, fn: Callable[[], T], *, admin: bool = False) -> T:
        """Run ``fn`` under the session lock in a worker thread; map and count errors."""
        import pkcs11

        def call() -> T:
            with self._lock:
                try:
                    try:
                        return fn()
                    except pkcs11.PKCS11Error as exc:
                        if not named(exc, _STALE):
                            raise
                        self._reset()
                        return fn()
                except pkcs11.PKCS11Error:
                    self._reset()
                    raise

        started = time.perf_counter()
        try:
            result = await asyncio.to_thread(call)
        except BaseException as exc:
            err = self._error(exc, operation, admin=admin)
            self._record(operation, err, started)
            if err is exc:
                raise
            raise err from None
        self._record(operation, None, started)
        return result

    def _error(self, exc: BaseException, operation: str, *, admin: bool) -> BaseException:
        where = f"HSM provider {self.name!r} ({operation})"
        if isinstance(exc, _Misconfigured):
            if admin:
                return ConfigError(f"{where}: {exc}", path=f"keys.{self.name}")
            return KeyUnavailable(f"{where}: {exc}", retry_after=30.0)
        if isinstance(exc, AgentError) or not isinstance(exc, Exception):
            return exc
        return KeyUnavailable(f"{where}: token error {type(exc).__name__}")

    def _record(self, operation: str, err: BaseException | None, started: float) -> None:
        if err is None:
            outcome = self.state = "ok"
        elif isinstance(err, KeyRevoked):
            outcome = self.state = "revoked"
        elif isinstance(err, DecryptionError):
            outcome = "refused"  # about one blob, not the provider
        elif isinstance(err, AgentError):
            outcome = self.state = "unavailable"
        else:
            outcome = "cancelled" if not isinstance(err, Exception) else "error"
        if isinstance(err, AgentError):
            self.last_error = err.message
        self.metrics.key_operations.labels(self.name, operation, outcome).inc()
        self.metrics.key_operation_seconds.labels(self.name, operation).observe(
            time.perf_counter() - started
        )

    # -------------------------------------------------------------- wrap/unwrap

    async def wrap(self, dek: bytes, *, context: Mapping[str, str]) -> WrappedKey:
        """Wrap ``dek`` under the primary key version with the configured mechanism."""
        fmt = _FORMATS[self.mechanism]
        seal = self._seal_gcm if fmt == 1 else self._seal_kwp

        def go() -> bytes:
            version, key = self._key(None)
            return _HEADER.pack(fmt, version) + seal(key, bytes(dek), context)

        return WrappedKey(self.name, self.key_label, await self._run("wrap", go))

    async def unwrap(self, wrapped: WrappedKey, *, context: Mapping[str, str]) -> bytearray:
        """Unwrap with the key version and mechanism named in the blob.

        Raises:
            KeyUnavailable: the module, token or session failed, or login was refused.
            KeyRevoked: no version of the key is in the token.
            DecryptionError: tampered or malformed blob, another context, or a
                key version no longer in the token.
        """
        blob = wrapped.wrapped
        if wrapped.key != self.key_label or len(blob) < _HEADER.size + 1:
            raise DecryptionError(
                f"HSM provider {self.name!r}: not a blob of key {self.key_label!r}"
            )
        fmt, version = _HEADER.unpack_from(blob)
        if fmt not in _FORMATS.values():
            raise DecryptionError(f"HSM provider {self.name!r}: unknown wrapped-key format {fmt}")
        open_ = self._open_gcm if fmt == 1 else self._open_kwp
        body = blob[_HEADER.size :]
        return await self._run("unwrap", lambda: open_(self._key(version), body, context))

    async def is_current(self, wrapped: WrappedKey) -> bool:
        """Whether ``wrapped`` was made by the primary version with the configured mechanism."""
        if wrapped.provider != self.name or wrapped.key != self.key_label:
            return False
        if len(wrapped.wrapped) < _HEADER.size:
            return False
        fmt, version = _HEADER.unpack_from(wrapped.wrapped)
        if not self._keys:
            await self._run("list", lambda: self._key(None))
        return bool(fmt == _FORMATS[self.mechanism] and version == max(self._keys, default=0))

    # -------------------------------------------------------------- management

    def _generate(self, version: int) -> None:
        from pkcs11 import Attribute, KeyType, MechanismFlag

        allowed = (
            MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT
            if self.mechanism == "aes-gcm"
            else MechanismFlag.WRAP | MechanismFlag.UNWRAP
        )
        self._open().generate_key(
            KeyType.AES,
            256,
            label=self.key_label,
            id=version.to_bytes(4, "big"),
            store=True,
            capabilities=allowed,
            template={
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.MODIFIABLE: False,
            },
        )
        self._keys = {}

    def _info(self, version: int, primary: int) -> KeyInfo:
        return KeyInfo(
            self.name,
            self.key_label,
            version=str(version),
            primary=version == primary,
            detail=f"in token {self.token_label}",
        )

    async def list_keys(self) -> list[KeyInfo]:
        """Each key version in the token; ``missing`` if none, ``unavailable`` if unreachable."""

        def go() -> list[KeyInfo]:
            try:
                self._key(None)
            except KeyRevoked:
                hint = f"run: secrets-agent keys create --provider {self.name}"
                return [KeyInfo(self.name, self.key_label, state="missing", detail=hint)]
            top = max(self._keys)
            return [self._info(v, top) for v in sorted(self._keys)]

        try:
            infos = await self._run("list", go)
        except KeyUnavailable as exc:
            return [KeyInfo(self.name, self.key_label, state="unavailable", detail=exc.message)]
        if infos[0].state == "missing":
            self.state = "revoked"
        return infos

    async def create_key(self) -> KeyInfo:
        """Generate version 1 in the token unless a version exists (idempotent)."""

        def go() -> KeyInfo:
            versions = self._versions()
            if not versions:
                self._generate(1)
            top = max(versions, default=1)
            return KeyInfo(
                self.name,
                self.key_label,
                version=str(top),
                primary=True,
                detail=f"generated in token {self.token_label} (non-extractable, {self.mechanism})",
            )

        return await self._run("create", go, admin=True)

    async def rotate_key(self) -> KeyInfo:
        """Generate the next version and make it primary; old versions keep unwrapping."""

        def go() -> KeyInfo:
            new = max(self._versions(), default=0) + 1
            self._generate(new)
            return self._info(new, new)

        return await self._run("rotate", go, admin=True)

    def status(self) -> dict[str, object]:
        """For ``/v1/status``: the key, the last call's state and the last error."""
        return {
            "provider": self.name,
            "type": "pkcs11",
            "key": self.key_label,
            "token": self.token_label,
            "mechanism": self.mechanism,
            "state": self.state,
            "last_error": self.last_error,
        }

    async def aclose(self) -> None:
        """Close the session (which logs this process out of the token)."""

        def close() -> None:
            with self._lock:
                self._reset()

        await asyncio.to_thread(close)
