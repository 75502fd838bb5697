"""AWS KMS key provider: data keys wrapped by a KMS key that never leaves KMS.

Wrap is ``Encrypt`` and unwrap ``Decrypt`` (with ``KeyId``, so KMS refuses a
blob of another key), always with the wrap context as the KMS
``EncryptionContext``, so key policy can be scoped per store
(``kms:EncryptionContext:store``). The key ARN (resolved once from an alias or
id with ``DescribeKey``) is what envelopes record, never the alias.

Wrapped blob: ``0x01 || check (16) || KMS ciphertext`` with ``check =
SHA-256(canonical wrap context || KMS ciphertext)[:16]``. KMS binds the context
itself; the check refuses, before any (billed) call, a blob presented for
another context (a store id the endpoint may not check: some emulators do
not) or corrupted in the store, so corruption is never mistaken for a revoked
key. It is not a MAC: a deliberate forgery gets past it and is refused by KMS.

Errors: InvalidCiphertextException, IncorrectKeyException and other refusals of
the request are permanent (DecryptionError); DisabledException,
KMSInvalidStateException, AccessDeniedException and NotFoundException mean
revocation (KeyRevoked: the data-key cache drops what this key wrapped);
throttling, 5xx, timeouts and connection errors are transient (KeyUnavailable).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Any, Final

from agent.aws import AwsClient, error_code
from agent.config import AgentConfig, KmsKeysConfig
from agent.crypto.envelope import WrappedKey, canonical_json
from agent.errors import (
    AgentError,
    BadRequest,
    DecryptionError,
    KeyRevoked,
    KeyUnavailable,
)
from agent.keys.base import KeyInfo
from agent.metrics import Metrics

_FORMAT: Final = b"\x01"
_CHECK: Final = 16
_REFUSED: Final = frozenset(
    {
        "InvalidCiphertextException",
        "IncorrectKeyException",
        "InvalidKeyUsageException",
        "ValidationException",
        "InvalidGrantTokenException",
    }
)
_REVOKED: Final = frozenset(
    {
        "DisabledException",
        "KMSInvalidStateException",
        "AccessDeniedException",
        "NotFoundException",
    }
)
# KeyState (DescribeKey) -> KeyInfo.state
_STATES: Final = {
    "Enabled": "enabled",
    "Disabled": "disabled",
    "PendingDeletion": "deleted",
    "PendingReplicaDeletion": "deleted",
}


class _Revoked(KeyRevoked):
    """KeyRevoked that remembers the KMS error code (``keys list`` tells deleted apart)."""

    def __init__(self, message: str, *, aws_code: str, provider: str, key: str) -> None:
        super().__init__(message, provider=provider, key=key)
        self.aws_code = aws_code


def _outcome(err: AgentError) -> str:
    if isinstance(err, KeyRevoked):
        return "revoked"
    return "refused" if isinstance(err, DecryptionError) else "unavailable"


def _check(context: Mapping[str, str], ciphertext: bytes) -> bytes:
    return hashlib.sha256(canonical_json(dict(context)) + b"\0" + ciphertext).digest()[:_CHECK]


class KmsKeyProvider:
    """A KeyProvider and KeyManager on one KMS key."""

    def __init__(
        self,
        name: str,
        *,
        key_id: str,
        region: str | None = None,
        endpoint_url: str | None = None,
        timeout: float = 5.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.name = name
        self.key_id = key_id
        self.timeout = timeout
        self.metrics = metrics if metrics is not None else Metrics()
        self._aws = AwsClient("kms", region=region, endpoint_url=endpoint_url, timeout=timeout)
        self._arn: str | None = None
        self._arn_lock = asyncio.Lock()
        self.state = "unknown"
        self.last_error: str | None = None

    @classmethod
    def from_config(
        cls, name: str, cfg: KmsKeysConfig, *, config: AgentConfig, metrics: Metrics
    ) -> KmsKeyProvider:
        """Build from config (no call to KMS until first use)."""
        return cls(
            name,
            key_id=cfg.key_id,
            region=cfg.region,
            endpoint_url=cfg.endpoint_url,
            timeout=cfg.timeout,
            metrics=metrics,
        )

    # ------------------------------------------------------------------ calls

    async def _call(self, operation: str, method: str, *, key: str = "", **kw: Any) -> Any:
        """One KMS call about ``key`` (default: ours), bounded in time, counted, errors mapped."""
        started = time.perf_counter()
        outcome = "cancelled"
        try:
            client = await self._aws.get()
            # botocore bounds connect and read; this bounds the whole call with its retry.
            async with asyncio.timeout(self.timeout * 3):
                result = await getattr(client, method)(**kw)
            outcome = self.state = "ok"
            return result
        except Exception as exc:
            err = self._map(exc, operation, key or self._arn or self.key_id)
            outcome = _outcome(err)
            self.state = outcome if outcome != "refused" else self.state  # refusals: one blob
            self.last_error = err.message
            raise err from None
        finally:
            self.metrics.key_operations.labels(self.name, operation, outcome).inc()
            self.metrics.key_operation_seconds.labels(self.name, operation).observe(
                time.perf_counter() - started
            )

    def _map(self, exc: BaseException, operation: str, key: str) -> AgentError:
        code = error_code(exc)
        where = f"KMS key {key!r} (provider {self.name!r}) {operation}"
        if code in _REFUSED:
            return DecryptionError(f"{where}: refused ({code})")
        if code in _REVOKED:
            return _Revoked(
                f"{where}: the key is disabled, pending deletion, deleted or denied ({code})",
                aws_code=code,
                provider=self.name,
                key=key,
            )
        if isinstance(exc, TimeoutError):
            return KeyUnavailable(f"{where}: timed out after {self.timeout * 3:.0f}s")
        return KeyUnavailable(f"{where}: unavailable ({code or type(exc).__name__})")

    async def arn(self) -> str:
        """The key's ARN (DescribeKey once: envelopes record the ARN, never an alias)."""
        async with self._arn_lock:
            if self._arn is None:
                doc = await self._call("describe", "describe_key", KeyId=self.key_id)
                self._arn = str(doc["KeyMetadata"]["Arn"])
        return self._arn

    # -------------------------------------------------------------- wrap/unwrap

    async def wrap(self, dek: bytes, *, context: Mapping[str, str]) -> WrappedKey:
        """``Encrypt`` under the configured key with ``context`` as EncryptionContext."""
        arn = await self.arn()
        doc = await self._call(
            "wrap", "encrypt", KeyId=arn, Plaintext=bytes(dek), EncryptionContext=dict(context)
        )
        ciphertext = bytes(doc["CiphertextBlob"])
        return WrappedKey(self.name, arn, _FORMAT + _check(context, ciphertext) + ciphertext)

    async def unwrap(self, wrapped: WrappedKey, *, context: Mapping[str, str]) -> bytearray:
        """``Decrypt`` with the key ARN the envelope names and ``context``.

        Raises:
            KeyUnavailable: throttled, 5xx, timeout, no connection or credentials.
            KeyRevoked: the key is disabled, pending deletion, deleted or denied.
            DecryptionError: corrupt or forged blob, another context, another key.
        """
        blob = wrapped.wrapped
        if blob[:1] != _FORMAT or len(blob) <= 1 + _CHECK:
            raise DecryptionError(f"KMS provider {self.name!r}: malformed wrapped key")
        ciphertext = blob[1 + _CHECK :]
        if not hmac.compare_digest(blob[1 : 1 + _CHECK], _check(context, ciphertext)):
            raise DecryptionError(
                f"KMS provider {self.name!r}: wrapped key refused: made for another "
                "context (store) or corrupted"
            )
        doc = await self._call(
            "unwrap",
            "decrypt",
            key=wrapped.key,
            CiphertextBlob=ciphertext,
            KeyId=wrapped.key,
            EncryptionContext=dict(context),
        )
        return bytearray(doc["Plaintext"])

    async def is_current(self, wrapped: WrappedKey) -> bool:
        """Whether ``wrapped`` names the configured key (KMS rotates material under one ARN)."""
        return wrapped.provider == self.name and wrapped.key == await self.arn()

    # -------------------------------------------------------------- management

    async def list_keys(self) -> list[KeyInfo]:
        """The configured key and its KMS state (``DescribeKey``)."""
        try:
            doc = await self._call("describe", "describe_key", KeyId=self._arn or self.key_id)
        except AgentError as exc:
            gone = isinstance(exc, _Revoked) and exc.aws_code == "NotFoundException"
            state = "deleted" if gone else "unavailable"
            return [KeyInfo(self.name, self._arn or self.key_id, state=state, detail=exc.message)]
        meta = doc["KeyMetadata"]
        key_state = str(meta.get("KeyState", ""))
        state = _STATES.get(key_state, "unavailable")
        self._arn = self._arn or str(meta["Arn"])
        if state in ("disabled", "deleted"):
            self.state = "revoked"
        return [
            KeyInfo(
                self.name,
                str(meta["Arn"]),
                state=state,
                primary=True,
                created_at=str(meta.get("CreationDate", "")),
                detail=f"KMS KeyState {key_state} (configured as {self.key_id})",
            )
        ]

    async def create_key(self) -> KeyInfo:
        """Not done here: KMS keys and their policies belong to infrastructure code."""
        raise BadRequest(
            f"key provider {self.name!r}: create KMS keys with your infrastructure tooling "
            "(the key policy belongs there), then set keys.<name>.key_id to its ARN or alias"
        )

    async def rotate_key(self) -> KeyInfo:
        """Turn on KMS automatic rotation: new material under the same ARN, old keeps decrypting."""
        await self._call("rotate", "enable_key_rotation", KeyId=await self.arn())
        info = (await self.list_keys())[0]
        detail = "KMS automatic rotation enabled; old key material keeps decrypting"
        return KeyInfo(self.name, info.key, state=info.state, primary=True, detail=detail)

    async def schedule_rotation(self, every: float) -> None:
        """Turn on KMS automatic rotation every ``every`` seconds (whole days, 90-2560)."""
        await self._call(
            "rotate",
            "enable_key_rotation",
            KeyId=await self.arn(),
            RotationPeriodInDays=int(every // 86400),
        )

    def status(self) -> dict[str, object]:
        """For ``/v1/status``: the key, the last call's state and the last error."""
        return {
            "provider": self.name,
            "type": "aws-kms",
            "key": self._arn or self.key_id,
            "state": self.state,
            "last_error": self.last_error,
        }

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._aws.aclose()
