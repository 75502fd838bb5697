"""How the store's model maps onto AWS Secrets Manager: version tokens, labels, tags.

Pure functions over what Secrets Manager returns (see :mod:`agent.stores.aws_sm`
for the mapping as a whole): a version id is a ``ClientRequestToken`` padded
to 32 characters with ``~``; CURRENT, PREVIOUS and PENDING are the labels
AWSCURRENT, AWSPREVIOUS and AWSPENDING; the stage map is read from
``VersionIdsToStages`` and the proof from a tag.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from agent.errors import BadRequest
from agent.stores.base import StageState
from agent.types import AWS_STAGE_NAMES, STAGE_ALIASES, validate_version_id

#: The hidden label new versions carry, so PutSecretValue does not move AWSCURRENT.
WRITTEN = "SECRETS_AGENT_WRITTEN"
#: ``false`` on a new secret until its first stage move (its map reads as empty).
STAGED_TAG = "secrets-agent:staged"
#: The stage map's proof (agent.crypto.stageproof): AWS keeps tags per secret,
#: and the proof's alphabet (A-Za-z0-9 : _ . -) is one AWS tag values accept.
PROOF_TAG = "secrets-agent:stage-proof"
_PAD = "~"


def to_token(version_id: str) -> str:
    """Our version id as an AWS ClientRequestToken (32-64 characters)."""
    validate_version_id(version_id)
    if len(version_id) > 64:
        raise BadRequest("version ids on aws-secretsmanager are at most 64 characters")
    return version_id.ljust(32, _PAD)


def from_token(token: str) -> str:
    return token.rstrip(_PAD)


def aws_label(stage: str) -> str:
    """The AWS staging label of one of our stages."""
    return AWS_STAGE_NAMES.get(stage, stage)


def labels_of(doc: Mapping[str, Any]) -> dict[str, str]:
    """Each AWS label in a DescribeSecret answer and the token it is on."""
    out = {}
    for token, labels in (doc.get("VersionIdsToStages") or {}).items():
        for label in labels:
            out[label] = token
    return out


def unstaged(doc: Mapping[str, Any]) -> bool:
    """Whether the secret is new and has had no stage move yet (see :data:`STAGED_TAG`)."""
    return any(
        t.get("Key") == STAGED_TAG and t.get("Value") == "false" for t in doc.get("Tags", []) or []
    )


def stage_state(doc: Mapping[str, Any], *, settle_pending: bool = False) -> StageState:
    """The stage map of a DescribeSecret answer, its proof, and a hash of both as revision.

    With ``settle_pending`` (our envelopes, whose maps carry proofs), AWSPENDING
    on the version that holds AWSCURRENT is left out of the map: that is a
    finished rotation whose PENDING label stayed behind, as AWS's own rotation
    functions treat it. Labels move one call at a time here, so two agents
    finishing the same rotation can leave it so (one agent's late PENDING move
    landing after the other's finish); kept in the map, it would not match the
    finished map's proof and the rotation could not be completed. The label
    stays in AWS until the next rotation moves it.
    """
    if unstaged(doc):
        return StageState({}, "")
    stages: dict[str, str] = {}
    for token, labels in (doc.get("VersionIdsToStages") or {}).items():
        for label in labels:
            if label != WRITTEN:
                stages[STAGE_ALIASES.get(label, label)] = from_token(token)
    pending = stages.get("PENDING")
    if settle_pending and pending is not None and pending == stages.get("CURRENT"):
        del stages["PENDING"]
    proof = next(
        (t.get("Value") for t in doc.get("Tags", []) or [] if t.get("Key") == PROOF_TAG), None
    )
    blob = json.dumps([stages, proof], sort_keys=True).encode()
    revision = hashlib.sha256(blob).hexdigest()[:32] if stages else ""
    return StageState(stages, revision, proof if stages else None)


def utc(value: Any) -> datetime:
    """An AWS timestamp as an aware datetime (now, if AWS gave none)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.now(UTC)
