"""Envelope format v1: fixed test vectors, strict parsing, and tamper resistance."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.crypto.envelope import (
    EnvelopeContext,
    WrappedKey,
    canonical_json,
    dumps,
    open_envelope,
    parse,
    seal,
)
from agent.errors import DecryptionError, UnsupportedEnvelope

VECTORS = json.loads((Path(__file__).parent / "vectors.json").read_text())


def hkdf_sha512(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 HKDF written out with hmac, independent of the code under test."""
    prk = hmac.new(salt, ikm, hashlib.sha512).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha512).digest()
        okm += block
        counter += 1
    return okm[:length]


def _raw(vector: dict[str, Any]) -> bytes:
    return json.dumps(vector["envelope"]).encode()


@pytest.mark.parametrize("vector", VECTORS, ids=[v["description"] for v in VECTORS])
def test_vector_opens_to_its_plaintext(vector: dict[str, Any]) -> None:
    env = parse(_raw(vector))
    ctx = EnvelopeContext(**vector["envelope"]["context"])
    plaintext = open_envelope(env, dek=bytes.fromhex(vector["dek"]), expected=ctx)
    assert plaintext == bytes.fromhex(vector["plaintext"])


@pytest.mark.parametrize("vector", VECTORS, ids=[v["description"] for v in VECTORS])
def test_vector_matches_an_independent_computation(vector: dict[str, Any]) -> None:
    """Commitment, payload key and AAD follow the spec, recomputed without our code."""
    doc = vector["envelope"]
    dek = bytes.fromhex(vector["dek"])
    message_id = base64.b64decode(doc["message_id"])
    commitment = hkdf_sha512(dek, message_id, b"COMMITKEY")
    assert base64.b64encode(commitment).decode() == doc["commitment"]
    key = hkdf_sha512(dek, message_id, b"DERIVEKEY")
    aad = json.dumps(
        {
            k: doc[k]
            for k in ("format", "v", "alg", "context", "value_type", "message_id", "commitment")
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    plaintext = AESGCM(key).decrypt(
        base64.b64decode(doc["nonce"]), base64.b64decode(doc["ciphertext"]), aad
    )
    assert plaintext == bytes.fromhex(vector["plaintext"])


@pytest.mark.parametrize("vector", VECTORS, ids=[v["description"] for v in VECTORS])
def test_sealing_with_fixed_randomness_reproduces_the_vector(vector: dict[str, Any]) -> None:
    doc = vector["envelope"]
    env = seal(
        bytes.fromhex(vector["plaintext"]),
        dek=bytes.fromhex(vector["dek"]),
        keys=[
            WrappedKey(k["provider"], k["key"], base64.b64decode(k["wrapped"])) for k in doc["keys"]
        ],
        context=EnvelopeContext(**doc["context"]),
        value_type=doc["value_type"],
        message_id=base64.b64decode(doc["message_id"]),
        nonce=base64.b64decode(doc["nonce"]),
    )
    assert json.loads(dumps(env)) == doc


def test_canonical_json_sorts_keys_without_spaces() -> None:
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()


def test_unknown_version_is_a_clear_error() -> None:
    doc = dict(VECTORS[0]["envelope"], v=2)
    with pytest.raises(UnsupportedEnvelope, match="format version 2"):
        parse(json.dumps(doc).encode())


def test_unknown_algorithm_is_a_clear_error() -> None:
    doc = dict(VECTORS[0]["envelope"], alg="AES-128-CBC")
    with pytest.raises(UnsupportedEnvelope, match="algorithm 'AES-128-CBC'"):
        parse(json.dumps(doc).encode())


def test_extra_or_missing_fields_are_refused() -> None:
    extra = dict(VECTORS[0]["envelope"], note="x")
    with pytest.raises(DecryptionError, match="unexpected fields"):
        parse(json.dumps(extra).encode())
    missing = dict(VECTORS[0]["envelope"])
    del missing["nonce"]
    with pytest.raises(DecryptionError):
        parse(json.dumps(missing).encode())


def test_duplicate_fields_are_refused() -> None:
    text = _raw(VECTORS[0]).decode()
    text = text.replace('"v": 1,', '"v": 1, "v": 1,')
    with pytest.raises(DecryptionError, match="duplicate"):
        parse(text.encode())


def test_envelope_moved_to_another_secret_or_version_is_refused() -> None:
    vector = VECTORS[0]
    env = parse(_raw(vector))
    dek = bytes.fromhex(vector["dek"])
    for other in (
        EnvelopeContext("prod/other", "v1", "default"),
        EnvelopeContext("prod/db", "v2", "default"),
        EnvelopeContext("prod/db", "v1", "other-store"),
    ):
        with pytest.raises(DecryptionError, match="written for secret 'prod/db'") as info:
            open_envelope(env, dek=dek, expected=other)
        assert "hunter2" not in str(info.value)


def test_wrong_data_key_fails_the_commitment() -> None:
    env = parse(_raw(VECTORS[0]))
    with pytest.raises(DecryptionError, match="commitment"):
        open_envelope(env, dek=bytes(32))


def _open_raw(raw: bytes, vector: dict[str, Any]) -> bytes:
    """Parse and open as the agent would; a changed recipient list means no DEK."""
    env = parse(raw)
    original = parse(_raw(vector))
    if env.keys != original.keys:
        raise DecryptionError("recipient changed: the key provider would refuse the wrap")
    return open_envelope(
        env,
        dek=bytes.fromhex(vector["dek"]),
        expected=EnvelopeContext(**vector["envelope"]["context"]),
    )


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(vector=st.sampled_from(VECTORS), data=st.data())
def test_any_single_flipped_bit_is_refused(vector: dict[str, Any], data: st.DataObject) -> None:
    raw = dumps(parse(_raw(vector)))
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    flipped = bytearray(raw)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(DecryptionError):
        _open_raw(bytes(flipped), vector)


_FIELDS = [
    "format",
    "v",
    "alg",
    "context.secret",
    "context.version",
    "context.store",
    "message_id",
    "commitment",
    "nonce",
    "ciphertext",
    "value_type",
]


@settings(max_examples=300, deadline=None)
@given(
    vector=st.sampled_from(VECTORS),
    field=st.sampled_from(_FIELDS),
    replacement=st.one_of(st.text(max_size=20), st.integers(), st.binary(max_size=40)),
)
def test_any_changed_field_is_refused(
    vector: dict[str, Any], field: str, replacement: object
) -> None:
    doc = json.loads(json.dumps(vector["envelope"]))
    target, key = (doc["context"], field.split(".")[1]) if "." in field else (doc, field)
    if isinstance(replacement, bytes):
        replacement = base64.b64encode(replacement).decode()
    if replacement == target[key]:
        return
    target[key] = replacement
    with pytest.raises(DecryptionError):
        _open_raw(json.dumps(doc).encode(), vector)


def test_an_untouched_envelope_still_opens_after_a_round_trip() -> None:
    """Control for the property tests: they refuse changes, not everything."""
    for vector in VECTORS:
        assert _open_raw(dumps(parse(_raw(vector))), vector) == bytes.fromhex(vector["plaintext"])
