"""The stage-map proof itself: what its MAC binds, and the v1 form still read."""

from __future__ import annotations

import os

import pytest

from agent.crypto import stageproof

DEK = os.urandom(32)
STAGES = {"CURRENT": "v2", "PREVIOUS": "v1"}


def _make(**overrides: object) -> stageproof.StageProof:
    args: dict[str, object] = {
        "store_id": "main",
        "secret": "db",
        "sequence": 7,
        "key_version": "v2",
        "stages": STAGES,
        "base": 6,
    }
    args.update(overrides)
    return stageproof.make(DEK, **args)  # type: ignore[arg-type]


def test_a_proof_round_trips_and_verifies() -> None:
    proof = _make()
    parsed = stageproof.parse(proof.encode())
    assert parsed == proof and parsed.encode().startswith("v2:7:6:v2:")
    assert stageproof.verify(DEK, parsed, store_id="main", secret="db", stages=STAGES)


@pytest.mark.parametrize(
    ("store_id", "secret", "stages"),
    [
        ("other", "db", STAGES),  # a valid proof, but for another store id
        ("main", "db2", STAGES),  # replayed across secrets
        ("main", "db", {"CURRENT": "v1", "PREVIOUS": "v2"}),  # labels swapped
        ("main", "db", {"CURRENT": "v2"}),  # a label dropped
    ],
)
def test_the_mac_binds_store_secret_and_the_whole_map(
    store_id: str, secret: str, stages: dict[str, str]
) -> None:
    assert not stageproof.verify(DEK, _make(), store_id=store_id, secret=secret, stages=stages)


@pytest.mark.parametrize("field", ["sequence", "base"])
def test_the_mac_binds_sequence_and_base(field: str) -> None:
    proof = _make()
    forged = stageproof.StageProof(
        proof.sequence + (field == "sequence"),
        proof.key_version,
        proof.mac,
        (proof.base or 0) + (field == "base"),
    )
    assert not stageproof.verify(DEK, forged, store_id="main", secret="db", stages=STAGES)


def test_a_v1_proof_without_base_still_verifies_and_cannot_gain_one() -> None:
    v1 = _make(base=None)
    text = v1.encode()
    assert text.startswith("v1:7:v2:") and stageproof.parse(text).base is None
    parsed = stageproof.parse(text)
    assert stageproof.verify(DEK, parsed, store_id="main", secret="db", stages=STAGES)
    with_base = stageproof.StageProof(v1.sequence, v1.key_version, v1.mac, 0)
    assert not stageproof.verify(DEK, with_base, store_id="main", secret="db", stages=STAGES)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "v1:1:v",
        "v2:1:v:" + "A" * 43,
        "v3:1:0:v:" + "A" * 43,
        "v2:" + "9" * 19 + ":0:v:" + "A" * 43,
    ],
)
def test_malformed_proofs_are_refused(text: str) -> None:
    with pytest.raises(stageproof.StageProofError):
        stageproof.parse(text)
