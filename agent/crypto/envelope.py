"""Envelope format v1: the stored form of one secret version.

Pure functions, no I/O. See ``docs/envelope-format.md`` for the specification.

A data key (DEK) never encrypts a payload directly. Each envelope derives its
payload key and a key commitment from the DEK and a random 32-byte message id
(HKDF-SHA512, as the AWS Encryption SDK's committing suites do), so one DEK can
be reused across many envelopes, and no writer can wrap different DEKs for
different recipients that open to different plaintexts.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.bounded import loads_json
from agent.errors import DecryptionError, UnsupportedEnvelope
from agent.types import ValueType

FORMAT: Final = "secrets-agent/envelope"
VERSION: Final = 1
ALG: Final = "AES-256-GCM"
DEK_SIZE: Final = 32
NONCE_SIZE: Final = 12
MESSAGE_ID_SIZE: Final = 32
TAG_SIZE: Final = 16

_FIELDS: Final = frozenset(
    {
        "format",
        "v",
        "alg",
        "context",
        "keys",
        "message_id",
        "commitment",
        "nonce",
        "ciphertext",
        "value_type",
    }
)
_CONTEXT_FIELDS: Final = frozenset({"secret", "version", "store"})
_KEY_FIELDS: Final = frozenset({"provider", "key", "wrapped"})
_VALUE_TYPES: Final = frozenset({"string", "binary"})


@dataclass(frozen=True, slots=True)
class EnvelopeContext:
    """Where an envelope belongs: bound into the payload's AAD."""

    secret: str
    version: str
    store: str

    def as_dict(self) -> dict[str, str]:
        return {"secret": self.secret, "version": self.version, "store": self.store}

    def describe(self) -> str:
        return f"secret {self.secret!r} version {self.version!r} (store {self.store!r})"


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """One recipient: a DEK wrapped by master key ``key`` of provider ``provider``."""

    provider: str
    key: str
    wrapped: bytes = b""

    def __repr__(self) -> str:
        size = len(self.wrapped)
        return f"WrappedKey(provider={self.provider!r}, key={self.key!r}, wrapped=<{size} bytes>)"


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed envelope. ``message_id``/``commitment`` keep their base64 text for the AAD."""

    context: EnvelopeContext
    keys: tuple[WrappedKey, ...]
    message_id: bytes
    commitment: bytes
    nonce: bytes
    ciphertext: bytes
    value_type: ValueType

    def with_keys(self, keys: Sequence[WrappedKey]) -> Envelope:
        """A copy with another recipient list (the payload is untouched)."""
        return Envelope(
            self.context,
            tuple(keys),
            self.message_id,
            self.commitment,
            self.nonce,
            self.ciphertext,
            self.value_type,
        )


def wrap_context(store_id: str) -> dict[str, str]:
    """The context every recipient binds when wrapping a DEK for ``store_id``."""
    return {"purpose": "secrets-agent", "store": store_id}


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8: the one byte form used for AADs."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _derive(dek: bytes, message_id: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA512(), length=32, salt=message_id, info=info).derive(dek)


def _aad(context: EnvelopeContext, value_type: str, message_id: bytes, commitment: bytes) -> bytes:
    return canonical_json(
        {
            "format": FORMAT,
            "v": VERSION,
            "alg": ALG,
            "context": context.as_dict(),
            "value_type": value_type,
            "message_id": _b64(message_id),
            "commitment": _b64(commitment),
        }
    )


def seal(
    plaintext: bytes,
    *,
    dek: bytes | bytearray,
    keys: Sequence[WrappedKey],
    context: EnvelopeContext,
    value_type: ValueType = "string",
    message_id: bytes | None = None,
    nonce: bytes | None = None,
) -> Envelope:
    """Encrypt ``plaintext`` under a key derived from ``dek`` for ``context``.

    ``message_id`` and ``nonce`` are random unless given (test vectors only).
    """
    if len(dek) != DEK_SIZE:
        raise ValueError("a data key is 32 bytes")
    if not keys:
        raise ValueError("an envelope needs at least one recipient")
    message_id = os.urandom(MESSAGE_ID_SIZE) if message_id is None else message_id
    nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
    dek_bytes = bytes(dek)
    commitment = _derive(dek_bytes, message_id, b"COMMITKEY")
    payload_key = _derive(dek_bytes, message_id, b"DERIVEKEY")
    aad = _aad(context, value_type, message_id, commitment)
    ciphertext = AESGCM(payload_key).encrypt(nonce, plaintext, aad)
    return Envelope(context, tuple(keys), message_id, commitment, nonce, ciphertext, value_type)


def open_envelope(
    envelope: Envelope, *, dek: bytes | bytearray, expected: EnvelopeContext | None = None
) -> bytes:
    """Check commitment and context, then decrypt.

    Raises:
        DecryptionError: the envelope belongs elsewhere, the DEK does not
            commit to it, or the ciphertext or its bound fields were altered.
    """
    where = envelope.context.describe()
    if expected is not None and envelope.context != expected:
        raise DecryptionError(
            f"envelope refused: it was written for {where} but found at {expected.describe()}"
        )
    if len(dek) != DEK_SIZE:
        raise DecryptionError(f"envelope refused for {where}: data key has the wrong size")
    dek_bytes = bytes(dek)
    commitment = _derive(dek_bytes, envelope.message_id, b"COMMITKEY")
    if not hmac.compare_digest(commitment, envelope.commitment):
        raise DecryptionError(f"envelope refused for {where}: key commitment does not match")
    payload_key = _derive(dek_bytes, envelope.message_id, b"DERIVEKEY")
    aad = _aad(envelope.context, envelope.value_type, envelope.message_id, envelope.commitment)
    try:
        return AESGCM(payload_key).decrypt(envelope.nonce, envelope.ciphertext, aad)
    except InvalidTag:
        raise DecryptionError(
            f"envelope refused for {where}: authentication failed (tampered or corrupt)"
        ) from None


def dumps(envelope: Envelope) -> bytes:
    """Serialise an envelope (stable field order, one JSON object, trailing newline)."""
    doc = {
        "format": FORMAT,
        "v": VERSION,
        "alg": ALG,
        "context": envelope.context.as_dict(),
        "keys": [
            {"provider": k.provider, "key": k.key, "wrapped": _b64(k.wrapped)}
            for k in envelope.keys
        ],
        "message_id": _b64(envelope.message_id),
        "commitment": _b64(envelope.commitment),
        "nonce": _b64(envelope.nonce),
        "ciphertext": _b64(envelope.ciphertext),
        "value_type": envelope.value_type,
    }
    return json.dumps(doc, indent=1).encode() + b"\n"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise DecryptionError("malformed envelope: duplicate field")
    return doc


def _field(doc: Mapping[str, Any], name: str, kind: type, where: str) -> Any:
    value = doc[name]
    if type(value) is not kind:
        raise DecryptionError(f"malformed envelope{where}: field {name!r} has the wrong type")
    return value


def _unb64(text: str, name: str, where: str, size: int | None = None) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise DecryptionError(f"malformed envelope{where}: field {name!r} is not base64") from None
    # Refuse non-canonical base64 (stray padding bits) so every byte of the text counts.
    if _b64(raw) != text:
        raise DecryptionError(f"malformed envelope{where}: field {name!r} is not canonical base64")
    if size is not None and len(raw) != size:
        raise DecryptionError(f"malformed envelope{where}: field {name!r} must be {size} bytes")
    return raw


def _check_fields(doc: Any, expected: frozenset[str], what: str, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise DecryptionError(f"malformed envelope{where}: {what} is not a JSON object")
    if set(doc) != expected:
        extra = sorted(set(doc) - expected)
        missing = sorted(expected - set(doc))
        raise DecryptionError(
            f"malformed envelope{where}: {what} has unexpected fields {extra} "
            f"or lacks fields {missing}"
        )
    return cast(dict[str, Any], doc)


def parse(data: bytes, *, where: str = "") -> Envelope:
    """Parse and strictly validate an envelope.

    Args:
        where: text naming the envelope's location, for error messages.

    Raises:
        UnsupportedEnvelope: unknown ``format``, ``v`` or ``alg``.
        DecryptionError: anything else malformed.
    """
    return _parse_recent(bytes(data), where)


# A batched refresh parses each envelope twice within a few microseconds (the
# stage guard for its proof's key, then the resolver to decrypt): the second
# is served from here. Envelopes are immutable and hold no plaintext; errors
# are never cached. Profiled at 10,000 secrets: parse was 35% of load_all.
@functools.lru_cache(maxsize=256)
def _parse_recent(data: bytes, where: str) -> Envelope:
    return _parse(data, where)


def _parse(data: bytes, where: str) -> Envelope:
    where = f" at {where}" if where else ""
    # Size is the store's cap, checked before the read; nesting is checked here.
    doc = loads_json(
        data,
        what=f"malformed envelope{where}",
        error=DecryptionError,
        check_length=False,
        object_pairs_hook=_no_duplicates,
    )
    if isinstance(doc, dict):
        if doc.get("format") != FORMAT:
            raise UnsupportedEnvelope(f"unsupported envelope{where}: format is not {FORMAT!r}")
        v = doc.get("v")
        if type(v) is not int or v != VERSION:
            raise UnsupportedEnvelope(
                f"unsupported envelope{where}: format version {v!r} (this agent reads v1)"
            )
        if doc.get("alg") != ALG:
            raise UnsupportedEnvelope(
                f"unsupported envelope{where}: algorithm {doc.get('alg')!r} (expected {ALG})"
            )
    doc = _check_fields(doc, _FIELDS, "the envelope", where)
    ctx = _check_fields(doc["context"], _CONTEXT_FIELDS, "context", where)
    if not all(type(ctx[k]) is str for k in _CONTEXT_FIELDS):
        raise DecryptionError(f"malformed envelope{where}: context values must be strings")
    context = EnvelopeContext(ctx["secret"], ctx["version"], ctx["store"])
    keys_doc = _field(doc, "keys", list, where)
    if not keys_doc:
        raise DecryptionError(f"malformed envelope{where}: no recipients")
    keys = []
    for item in keys_doc:
        k = _check_fields(item, _KEY_FIELDS, "a recipient", where)
        if not (type(k["provider"]) is str and type(k["key"]) is str and type(k["wrapped"]) is str):
            raise DecryptionError(f"malformed envelope{where}: recipient fields must be strings")
        keys.append(WrappedKey(k["provider"], k["key"], _unb64(k["wrapped"], "wrapped", where)))
    value_type = _field(doc, "value_type", str, where)
    if value_type not in _VALUE_TYPES:
        raise DecryptionError(f"malformed envelope{where}: unknown value_type")
    ciphertext = _unb64(_field(doc, "ciphertext", str, where), "ciphertext", where)
    if len(ciphertext) < TAG_SIZE:
        raise DecryptionError(f"malformed envelope{where}: ciphertext too short")
    return Envelope(
        context=context,
        keys=tuple(keys),
        message_id=_unb64(
            _field(doc, "message_id", str, where), "message_id", where, MESSAGE_ID_SIZE
        ),
        commitment=_unb64(_field(doc, "commitment", str, where), "commitment", where, 32),
        nonce=_unb64(_field(doc, "nonce", str, where), "nonce", where, NONCE_SIZE),
        ciphertext=ciphertext,
        value_type=cast(ValueType, value_type),
    )
