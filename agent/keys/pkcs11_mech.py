"""The two PKCS#11 wrapping mechanisms, run inside the token (see :mod:`agent.keys.pkcs11`).

* ``aes-gcm``: ``IV (12) || CKM_AES_GCM(DEK) || tag (16)``, the canonical wrap
  context as the GCM AAD.
* ``aes-key-wrap-pad``: ``CKM_AES_KEY_WRAP_PAD`` (RFC 5649) of
  ``DEK || SHA-256(canonical wrap context)[:16]``, the digest compared after
  unwrapping (key wrap has no AAD).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from typing import Any, Final

from agent.crypto.envelope import DEK_SIZE, canonical_json
from agent.errors import DecryptionError

_IV: Final = 12
_TAG: Final = 16
_DIGEST: Final = 16
# PKCS#11 error names (pkcs11.exceptions), grouped by what they mean here.
#: "This blob does not open" (SoftHSM reports a failed GCM tag or key-wrap check as
#: CKR_GENERAL_ERROR).
_REFUSALS: Final = (
    "EncryptedDataInvalid EncryptedDataLenRange DataInvalid DataLenRange WrappedKeyInvalid "
    "WrappedKeyLenRange MechanismParamInvalid GeneralError FunctionFailed"
)


def _context_digest(context: Mapping[str, str]) -> bytes:
    return hashlib.sha256(canonical_json(dict(context))).digest()[:_DIGEST]


def named(exc: BaseException, names: str) -> bool:
    return type(exc).__name__ in names.split()


class Mechanisms:
    """Seal and open a DEK with a key object; mixed into the provider, which owns the session."""

    name: str
    key_label: str

    def _open(self) -> Any:
        """The logged-in session (the provider's)."""
        raise NotImplementedError

    def _seal_gcm(self, key: Any, dek: bytes, context: Mapping[str, str]) -> bytes:
        from pkcs11 import Mechanism
        from pkcs11.mechanisms import GCMParams

        iv = os.urandom(_IV)
        param = GCMParams(iv, canonical_json(dict(context)), _TAG * 8)
        return iv + bytes(key.encrypt(dek, mechanism=Mechanism.AES_GCM, mechanism_param=param))

    def _seal_kwp(self, key: Any, dek: bytes, context: Mapping[str, str]) -> bytes:
        from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

        secret = self._open().create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                Attribute.VALUE: dek + _context_digest(context),
                Attribute.TOKEN: False,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: False,
                Attribute.EXTRACTABLE: True,
            }
        )
        try:
            return bytes(key.wrap_key(secret, mechanism=Mechanism.AES_KEY_WRAP_PAD))
        finally:
            secret.destroy()

    def _refused(self, version: int, why: str) -> DecryptionError:
        return DecryptionError(
            f"HSM provider {self.name!r}: wrapped key refused by key {self.key_label!r} "
            f"version {version} ({why})"
        )

    def _open_gcm(
        self, found: tuple[int, Any], body: bytes, context: Mapping[str, str]
    ) -> bytearray:
        import pkcs11
        from pkcs11 import Mechanism
        from pkcs11.mechanisms import GCMParams

        version, key = found
        if not hasattr(key, "decrypt"):
            raise self._refused(version, "this key version does not allow aes-gcm")
        if len(body) < _IV + _TAG:
            raise self._refused(version, "truncated")
        param = GCMParams(body[:_IV], canonical_json(dict(context)), _TAG * 8)
        try:
            dek = key.decrypt(body[_IV:], mechanism=Mechanism.AES_GCM, mechanism_param=param)
        except pkcs11.PKCS11Error as exc:
            if named(exc, _REFUSALS):
                raise self._refused(version, "tampered, or wrapped for another context") from None
            raise
        return bytearray(dek)

    def _open_kwp(
        self, found: tuple[int, Any], body: bytes, context: Mapping[str, str]
    ) -> bytearray:
        import pkcs11
        from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

        version, key = found
        if not hasattr(key, "unwrap_key"):
            raise self._refused(version, "this key version does not allow aes-key-wrap-pad")
        try:
            secret = key.unwrap_key(
                ObjectClass.SECRET_KEY,
                KeyType.GENERIC_SECRET,
                body,
                mechanism=Mechanism.AES_KEY_WRAP_PAD,
                template={
                    Attribute.TOKEN: False,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: False,
                    Attribute.EXTRACTABLE: True,
                },
            )
        except pkcs11.PKCS11Error as exc:
            if named(exc, _REFUSALS):
                raise self._refused(version, "tampered or corrupt") from None
            raise
        try:
            value = bytearray(secret[Attribute.VALUE])
        finally:
            secret.destroy()
        tail, expected = bytes(value[DEK_SIZE:]), _context_digest(context)
        if len(value) != DEK_SIZE + _DIGEST or not hmac.compare_digest(tail, expected):
            value[:] = bytes(len(value))
            raise self._refused(version, "wrapped for another context")
        dek = value[:DEK_SIZE]
        value[:] = bytes(len(value))
        return dek
