"""Proof that a stage map was written by a holder of a write key (pure, no I/O).

A store writer without master keys can neither forge an envelope (its AAD
binds it) nor, with this proof, move CURRENT or PREVIOUS to another genuine
version. Every stage map our writer stores carries::

    v2:<sequence>:<base>:<key version id>:<base64url HMAC-SHA256, 32 bytes>

* ``sequence`` grows by one with every stage move of the secret (the writer
  reads the map, adds one, and compare-and-swaps), so a replayed older map
  has a lower sequence than the one in service.
* ``base`` is the sequence of the proven map whose CURRENT this map keeps
  (a move that adds PENDING or a custom label), or 0 when the move set CURRENT
  itself (``put``, ``promote NAME CURRENT``, rotation's finish). A writer
  cannot tell a replayed old map from the newest one, so rotation's first
  step on top of a replayed map would sign its rolled-back CURRENT; its
  ``base`` is then lower than the sequence an agent has in service, and the
  agent refuses it. ``v1`` proofs (no base) still verify.
* ``key version id`` names a version of the same secret whose envelope
  holds the data key (DEK) the MAC key is derived from:
  ``HKDF-SHA256(DEK, salt=None, info="secrets-agent STAGEMAC v1")``. The DEK
  is wrapped under the master keys like any data key, so only a holder of a
  master key can compute or check the MAC; the label keeps the MAC key
  independent of the payload keys derived from the same DEK.
* The MAC covers the canonical JSON of ``{format, v, store, secret,
  sequence, key_version, stages}``: a map copied from another secret or
  store, or edited by hand, fails.

See docs/envelope-format.md ("Stage maps").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.crypto.envelope import canonical_json

__all__ = ["FORMAT", "PROOF_KEY", "StageProof", "StageProofError", "make", "parse", "verify"]

FORMAT = "secrets-agent/stages"
#: Where file, etcd and S3 stage maps keep the proof (not a valid stage label).
PROOF_KEY = "secrets-agent:proof"
_INFO = b"secrets-agent STAGEMAC v1"
_RE = re.compile(r"v1:(\d{1,18}):([A-Za-z0-9_.-]{1,256}):([A-Za-z0-9_-]{43})")
_RE2 = re.compile(r"v2:(\d{1,18}):(\d{1,18}):([A-Za-z0-9_.-]{1,256}):([A-Za-z0-9_-]{43})")


class StageProofError(ValueError):
    """A proof string is malformed (says why, never contains key material)."""


@dataclass(frozen=True, slots=True)
class StageProof:
    """A parsed proof: the sequence, the version holding the DEK, and the MAC.

    ``base``: the sequence of the map whose CURRENT this one keeps (0: CURRENT
    set by this move; None in a v1 proof).
    """

    sequence: int
    key_version: str
    mac: bytes
    base: int | None = None

    def encode(self) -> str:
        mac = base64.urlsafe_b64encode(self.mac).rstrip(b"=").decode()
        if self.base is None:
            return f"v1:{self.sequence}:{self.key_version}:{mac}"
        return f"v2:{self.sequence}:{self.base}:{self.key_version}:{mac}"


def parse(text: str) -> StageProof:
    """Parse a proof string. Raises StageProofError."""
    base: int | None = None
    m = _RE2.fullmatch(text)
    if m is not None:
        base = int(m.group(2))
        sequence, key_version, mac_text = m.group(1), m.group(3), m.group(4)
    elif (m := _RE.fullmatch(text)) is not None:
        sequence, key_version, mac_text = m.group(1), m.group(2), m.group(3)
    else:
        raise StageProofError("the stage map's proof is malformed")
    try:
        mac = base64.urlsafe_b64decode(mac_text + "=")
    except (binascii.Error, ValueError):
        raise StageProofError("the stage map's proof is malformed") from None
    return StageProof(int(sequence), key_version, mac, base)


def _message(
    *,
    store_id: str,
    secret: str,
    sequence: int,
    key_version: str,
    stages: Mapping[str, str],
    base: int | None,
) -> bytes:
    doc: dict[str, object] = {
        "format": FORMAT,
        "v": 1,
        "store": store_id,
        "secret": secret,
        "sequence": sequence,
        "key_version": key_version,
        "stages": dict(stages),
    }
    if base is not None:
        doc["v"] = 2
        doc["base"] = base
    return canonical_json(doc)


def _mac_key(dek: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(dek)


def make(
    dek: bytes,
    *,
    store_id: str,
    secret: str,
    sequence: int,
    key_version: str,
    stages: Mapping[str, str],
    base: int | None,
) -> StageProof:
    """The proof for ``stages`` of ``secret`` at ``sequence``, keyed by ``key_version``'s DEK.

    ``base``: the sequence of the proven map whose CURRENT this map keeps (0:
    CURRENT set by this move); None makes a v1 proof, which only tests and
    old writers produce.
    """
    msg = _message(
        store_id=store_id,
        secret=secret,
        sequence=sequence,
        key_version=key_version,
        stages=stages,
        base=base,
    )
    mac = hmac.new(_mac_key(dek), msg, hashlib.sha256).digest()
    return StageProof(sequence, key_version, mac, base)


def verify(
    dek: bytes, proof: StageProof, *, store_id: str, secret: str, stages: Mapping[str, str]
) -> bool:
    """Whether ``proof`` authenticates ``stages`` of ``secret`` in ``store_id`` (constant time)."""
    expected = make(
        dek,
        store_id=store_id,
        secret=secret,
        sequence=proof.sequence,
        key_version=proof.key_version,
        stages=stages,
        base=proof.base,
    )
    return hmac.compare_digest(expected.mac, proof.mac)
