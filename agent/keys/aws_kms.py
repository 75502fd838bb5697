"""AWS KMS key provider: data keys wrapped by a KMS key that never leaves KMS.

Wrap is ``Encrypt`` and unwrap ``Decrypt``, always with the wrap context as the
KMS ``EncryptionContext``, so key policy can be scoped per store
(``kms:EncryptionContext:store``). The key ARN (resolved once from an alias or
id with ``DescribeKey``) is what envelopes record, never the alias.

Wrapped blob: ``0x01 || SHA-256(canonical wrap context)[:16] || KMS ciphertext``.
KMS itself binds the context; the digest lets us refuse a wrong context even
where the KMS endpoint does not check it (some emulators), before any call.

Errors: InvalidCiphertextException and IncorrectKeyException are permanent
(DecryptionError); DisabledException, KMSInvalidStateException,
AccessDeniedException and NotFoundException mean revocation (KeyRevoked: the
data-key cache drops what this key wrapped); throttling, 5xx and timeouts are
transient (KeyUnavailable).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from typing import Any

from agent.aws import AwsClient, error_code
from agent.config import AgentConfig, KmsKeysConfig
from agent.crypto.envelope import WrappedKey, canonical_json
from agent.errors import AgentError, BackendUnavailable, DecryptionError, KeyRevoked, KeyUnavailable
from agent.keys.base import KeyInfo
from agent.metrics import Metrics

_FORMAT = b"\x01"
_DIGEST = 16
_PERMANENT = frozenset(
    {"InvalidCiphertextException", "IncorrectKeyException", "InvalidKeyUsageException"}
)
_REVOKED = frozenset(
    {
        "DisabledException",
        "KMSInvalidStateException",
        "AccessDeniedException",
        "NotFoundException",
        "KeyUnavailableException",
    }
)


def _digest(context: Mapping[str, str]) -> bytes:
    return hashlib.sha256(canonical_json(dict(context))).digest()[:_DIGEST]


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
        self.metrics = metrics if metrics is not None else Metrics()
        self._aws = AwsClient("kms", region=region, endpoint_url=endpoint_url, timeout=timeout)
        self._arn: str | None = None
        self.last_error: str | None = None

    @classmethod
    def from_config(
        cls, name: str, cfg: KmsKeysConfig, *, config: AgentConfig, metrics: Metrics
    ) -> KmsKeyProvider:
        return cls(
            name,
            key_id=cfg.key_id,
            region=cfg.region,
            endpoint_url=cfg.endpoint_url,
            timeout=cfg.timeout,
            metrics=metrics,
        )

    async def _call(self, operation: str, method: str, **kw: Any) -> Any:
        client = await self._aws.get()
        started = time.perf_counter()
        try:
            result = await getattr(client, method)(**kw)
        except Exception as exc:
            err = self._map(exc, operation)
            outcome = (
                "revoked"
                if isinstance(err, KeyRevoked)
                else "unavailable"
                if isinstance(err, BackendUnavailable)
                else "refused"
            )
            self.metrics.key_operations.labels(self.name, operation, outcome).inc()
            self.last_error = err.message
            raise err from None
        finally:
            self.metrics.key_operation_seconds.labels(self.name, operation).observe(
                time.perf_counter() - started
            )
        self.metrics.key_operations.labels(self.name, operation, "ok").inc()
        return result

    def _map(self, exc: BaseException, operation: str) -> AgentError:
        code = error_code(exc)
        where = f"KMS key {self.key_id!r} (provider {self.name!r}) {operation}"
        if code in _PERMANENT:
            return DecryptionError(f"{where}: refused ({code})")
        if code in _REVOKED:
            return KeyRevoked(
                f"{where}: the key is disabled, deleted or denied ({code})",
                provider=self.name,
                key=self._arn or self.key_id,
            )
        return KeyUnavailable(f"{where}: unavailable ({code or type(exc).__name__})")

    async def arn(self) -> str:
        """The key's ARN (DescribeKey once: envelopes record the ARN, never an alias)."""
        if self._arn is None:
            doc = await self._call("describe", "describe_key", KeyId=self.key_id)
            self._arn = str(doc["KeyMetadata"]["Arn"])
        return self._arn

    async def wrap(self, dek: bytes, *, context: Mapping[str, str]) -> WrappedKey:
        arn = await self.arn()
        doc = await self._call(
            "wrap", "encrypt", KeyId=arn, Plaintext=bytes(dek), EncryptionContext=dict(context)
        )
        return WrappedKey(self.name, arn, _FORMAT + _digest(context) + doc["CiphertextBlob"])

    async def unwrap(self, wrapped: WrappedKey, *, context: Mapping[str, str]) -> bytearray:
        blob = wrapped.wrapped
        if blob[:1] != _FORMAT or len(blob) <= 1 + _DIGEST:
            raise DecryptionError(f"KMS provider {self.name!r}: malformed wrapped key")
        if blob[1 : 1 + _DIGEST] != _digest(context):
            raise DecryptionError(
                f"KMS provider {self.name!r}: wrapped key was made for another context (store)"
            )
        doc = await self._call(
            "unwrap",
            "decrypt",
            CiphertextBlob=blob[1 + _DIGEST :],
            KeyId=wrapped.key,
            EncryptionContext=dict(context),
        )
        return bytearray(doc["Plaintext"])

    async def list_keys(self) -> list[KeyInfo]:
        try:
            doc = await self._call("describe", "describe_key", KeyId=self.key_id)
        except KeyRevoked as exc:
            return [KeyInfo(self.name, self.key_id, state="unavailable", detail=exc.message)]
        meta = doc["KeyMetadata"]
        state = {"Enabled": "enabled", "Disabled": "disabled", "PendingDeletion": "deleted"}.get(
            meta.get("KeyState", ""), "unavailable"
        )
        return [
            KeyInfo(
                self.name,
                str(meta["Arn"]),
                state=state,
                primary=True,
                created_at=str(meta.get("CreationDate", "")),
                detail=str(meta.get("KeyState", "")),
            )
        ]

    async def create_key(self) -> KeyInfo:
        raise KeyUnavailable(
            "create KMS keys with your infrastructure tooling (IAM and key "
            "policy belong there); then set keys.<name>.key_id"
        )

    async def rotate_key(self) -> KeyInfo:
        await self._call("rotate", "enable_key_rotation", KeyId=await self.arn())
        infos = await self.list_keys()
        return KeyInfo(
            self.name,
            infos[0].key,
            state=infos[0].state,
            primary=True,
            detail="automatic yearly rotation enabled in KMS; old key material keeps decrypting",
        )

    def status(self) -> dict[str, object]:
        return {
            "provider": self.name,
            "type": "aws-kms",
            "key": self._arn or self.key_id,
            "last_error": self.last_error,
        }

    async def aclose(self) -> None:
        await self._aws.aclose()
