"""The AWS Secrets Manager store: one AWS secret per name, our envelope as SecretBinary.

Mapping:

- A secret ``NAME`` is the AWS secret ``<name_prefix>NAME``.
- A version id is the AWS ``VersionId`` (set through ``ClientRequestToken``,
  which AWS wants 32-64 characters long: shorter ids are padded with ``~``,
  a character our ids never contain, and unpadded when read).
- Stages are AWS staging labels: CURRENT, PREVIOUS and PENDING map to
  AWSCURRENT, AWSPREVIOUS and AWSPENDING; custom labels keep their names.
- The cheap version check is DescribeSecret (``VersionIdsToStages``); the
  revision is a hash of the stage map it gives.

Two AWS behaviours are bridged so the store behaves like the others. AWS makes
the first version of a new secret AWSCURRENT by itself, and PutSecretValue
without labels moves AWSCURRENT: so a new secret is tagged
``secrets-agent:staged=false`` until its first stage move (its stage map reads
as empty meanwhile), and new versions are written carrying only a hidden label
(``SECRETS_AGENT_WRITTEN``). A stage move updates labels one by one with
``RemoveFromVersionId``, which AWS checks against where the label is: CURRENT
moves first, so of two writers racing to promote, one gets a conflict.
Versions are immutable in AWS: ``replace_envelope`` (re-encryption) is refused.

With ``client_side_encryption: false`` the store reads plain AWS secrets as AWS
stores them (``plaintext = True``): SecretString or SecretBinary is the value,
protected by AWS's own KMS encryption; writing is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from agent.aws import AwsClient, error_code, map_error
from agent.bounded import DEFAULT_LIMITS, Limits
from agent.config import AgentConfig, AwsSecretsManagerStoreConfig
from agent.errors import (
    AccessDenied,
    AgentError,
    BadRequest,
    Conflict,
    DecryptionError,
    NotFound,
    SecretNotFound,
    VersionNotFound,
)
from agent.metrics import Metrics
from agent.stores.aws_sm_mapping import (
    PROOF_TAG,
    STAGED_TAG,
    WRITTEN,
    aws_label,
    from_token,
    labels_of,
    stage_state,
    to_token,
    unstaged,
    utc,
)
from agent.stores.base import StageState, StoredVersion, check_stage_map, store_outcome
from agent.types import validate_name, validate_version_id

__all__ = [
    "PROOF_TAG",
    "STAGED_TAG",
    "WRITTEN",
    "SecretsManagerStore",
    "from_token",
    "to_token",
]


class SecretsManagerStore:
    """A WritableStore over AWS Secrets Manager (polling only)."""

    #: Contract behaviours this store cannot offer (see tests/stores/test_contract.py).
    #: ``stage_deletion``: AWSCURRENT must always label a version, so the stage map
    #: of a deleted secret (agent.deletion) cannot be written; AWS deletes natively.
    lacks = frozenset(
        {"mutable_envelopes", "fine_timestamps", "label_cas", "version_delete", "stage_deletion"}
    )

    def __init__(
        self,
        *,
        store_id: str = "default",
        region: str | None = None,
        endpoint_url: str | None = None,
        name_prefix: str = "",
        client_side_encryption: bool = True,
        timeout: float = 5.0,
        metrics: Metrics | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.store_id = store_id
        self.limits = limits
        self.name_prefix = name_prefix
        self.plaintext = not client_side_encryption
        #: Labels move one call at a time (see set_stages): maps between calls are expected.
        self.stage_moves_atomic = False
        self.metrics = metrics
        #: Real ARNs by name, as DescribeSecret and GetSecretValue give them.
        self._arns: dict[str, str] = {}
        self._aws = AwsClient(
            "secretsmanager", region=region, endpoint_url=endpoint_url, timeout=timeout
        )

    @classmethod
    def from_config(
        cls, cfg: AwsSecretsManagerStoreConfig, *, config: AgentConfig, metrics: Metrics
    ) -> SecretsManagerStore:
        return cls(
            store_id=cfg.id,
            region=cfg.region,
            endpoint_url=cfg.endpoint_url,
            name_prefix=cfg.name_prefix,
            client_side_encryption=cfg.client_side_encryption,
            timeout=cfg.timeout,
            metrics=metrics,
            limits=cfg.limits,
        )

    def _aws_name(self, name: str) -> str:
        return self.name_prefix + validate_name(name)

    def known_arn(self, name: str) -> str | None:
        """The real ARN of ``name`` once a read has seen it (for the AWS-compatible routes)."""
        return self._arns.get(name)

    def name_for(self, aws_name: str) -> str | None:
        """Our name for an AWS secret name, or None if it is outside ``name_prefix``."""
        if not aws_name.startswith(self.name_prefix) or aws_name == self.name_prefix:
            return None
        return aws_name[len(self.name_prefix) :]

    def _saw(self, name: str, doc: Mapping[str, Any]) -> None:
        arn = doc.get("ARN")
        if isinstance(arn, str):
            self._arns[name] = arn

    async def _call(self, operation: str, method: str, **kw: Any) -> Any:
        client = await self._aws.get()
        try:
            result = await getattr(client, method)(**kw)
        except Exception as exc:
            err = map_error(exc, what=f"secretsmanager {operation}")
            if isinstance(err, NotFound):
                err = SecretNotFound(f"secret {kw.get('SecretId', '')!r} does not exist")
            err.aws_code = error_code(exc)  # type: ignore[attr-defined]
            self._count(operation, err)
            raise err from None
        self._count(operation, None)
        return result

    def _count(self, operation: str, err: AgentError | None) -> None:
        if self.metrics is not None:
            outcome = "ok" if err is None else store_outcome(err)
            self.metrics.store_operations.labels(operation, outcome).inc()

    def _writable(self) -> None:
        if self.plaintext:
            raise AccessDenied(
                "client_side_encryption is false: this store is read-only for "
                "secrets-agent (manage these secrets with the AWS tools)"
            )

    # ------------------------------------------------------------------ reads

    async def list_names(self) -> list[str]:
        names: list[str] = []
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"MaxResults": 100}
            if token:
                kw["NextToken"] = token
            if self.name_prefix:
                kw["Filters"] = [{"Key": "name", "Values": [self.name_prefix]}]
            page = await self._call("list_names", "list_secrets", **kw)
            for item in page.get("SecretList", []):
                name = item["Name"]
                if name.startswith(self.name_prefix) and not item.get("DeletedDate"):
                    names.append(name[len(self.name_prefix) :])
            token = page.get("NextToken")
            if not token:
                return sorted(names)

    async def _describe(self, name: str) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = await self._call(
                "read_stages", "describe_secret", SecretId=self._aws_name(name)
            )
        except SecretNotFound:
            self._arns.pop(name, None)
            raise
        if doc.get("DeletedDate"):
            self._arns.pop(name, None)
            raise SecretNotFound(f"secret {name!r} does not exist")
        self._saw(name, doc)
        return doc

    async def read_stages(self, name: str) -> StageState:
        return stage_state(await self._describe(name), settle_pending=not self.plaintext)

    async def read_version(self, name: str, version_id: str) -> StoredVersion:
        kw: dict[str, Any] = {"SecretId": self._aws_name(name)}
        kw["VersionId"] = version_id if self.plaintext else to_token(version_id)
        try:
            doc = await self._call("read_version", "get_secret_value", **kw)
        except SecretNotFound:
            await self._describe(name)  # raises SecretNotFound if the secret is gone
            raise VersionNotFound(f"secret {name!r} has no version {version_id!r}") from None
        except BadRequest as exc:
            if getattr(exc, "aws_code", "") in (
                "InvalidRequestException",
                "InvalidParameterException",
            ):
                raise VersionNotFound(f"secret {name!r} has no version {version_id!r}") from None
            raise
        self._saw(name, doc)
        if "SecretBinary" in doc:
            value = bytes(doc["SecretBinary"])
            if self.plaintext:
                value = b"\x01" + value  # value-type marker: see resolver
        else:
            value = doc.get("SecretString", "").encode()
            if self.plaintext:
                value = b"\x00" + value
        if len(value) > self.limits.max_object_size:
            raise DecryptionError(
                f"version {version_id!r} of secret {name!r}: {len(value)} bytes, over "
                f"store.max_object_size ({self.limits.max_object_size}); refused"
            )
        return StoredVersion(name, version_id, value, utc(doc.get("CreatedDate")))

    async def list_versions(self, name: str) -> list[tuple[str, datetime]]:
        await self._describe(name)  # SecretNotFound for a missing or deleted secret
        out = []
        token: str | None = None
        while True:
            kw: dict[str, Any] = {
                "SecretId": self._aws_name(name),
                "IncludeDeprecated": True,
                "MaxResults": 100,
            }
            if token:
                kw["NextToken"] = token
            page = await self._call("list_versions", "list_secret_version_ids", **kw)
            for v in page.get("Versions", []):
                out.append((from_token(v["VersionId"]), utc(v.get("CreatedDate"))))
            token = page.get("NextToken")
            if not token:
                return sorted(out, key=lambda item: (item[1], item[0]))

    # ----------------------------------------------------------------- writes

    async def write_version(self, name: str, version_id: str, envelope: bytes) -> None:
        self._writable()
        token = to_token(version_id)
        aws_name = self._aws_name(name)
        try:
            await self._describe(name)
        except SecretNotFound:
            try:
                await self._call(
                    "write_version",
                    "create_secret",
                    Name=aws_name,
                    SecretBinary=envelope,
                    ClientRequestToken=token,
                    Tags=[{"Key": STAGED_TAG, "Value": "false"}],
                )
                return
            except AgentError as exc:
                if getattr(exc, "aws_code", "") != "ResourceExistsException":
                    raise
        if any(v == version_id for v, _ in await self.list_versions(name)):
            raise Conflict(f"secret {name!r} already has a version {version_id!r}")
        try:
            await self._call(
                "write_version",
                "put_secret_value",
                SecretId=aws_name,
                SecretBinary=envelope,
                ClientRequestToken=token,
                VersionStages=[WRITTEN],
            )
        except AgentError as exc:
            if getattr(exc, "aws_code", "") == "ResourceExistsException":
                raise Conflict(f"secret {name!r} already has a version {version_id!r}") from None
            raise

    async def replace_envelope(
        self, name: str, version_id: str, envelope: bytes, *, expected: bytes
    ) -> None:
        self._aws_name(name)
        validate_version_id(version_id)
        raise BadRequest(
            "versions are immutable in AWS Secrets Manager: re-encrypting in "
            "place is not possible on this store"
        )

    async def set_stages(
        self,
        name: str,
        stages: Mapping[str, str],
        *,
        expected_revision: str,
        proof: str | None = None,
    ) -> StageState:
        """Move the labels, then tag the secret with ``proof``.

        Labels move one call at a time, so a reader can see a map between two
        calls, or the new map before its proof: such maps carry no valid proof
        and are held back (``stage_moves_atomic = False``) until it lands.
        """
        self._writable()
        stages = check_stage_map(stages)
        current = await self.read_stages(name)
        if current.revision != expected_revision:
            raise Conflict(
                f"stage map of secret {name!r} changed concurrently (expected "
                f"revision {expected_revision or 'none'}, found "
                f"{current.revision or 'none'}); nothing was written"
            )
        versions = {v for v, _ in await self.list_versions(name)}
        for vid in stages.values():
            if vid not in versions:
                raise VersionNotFound(f"secret {name!r} has no version {vid!r}")
        doc = await self._describe(name)
        actual = labels_of(doc)
        order = sorted(set(stages) | set(current.stages), key=lambda s: s != "CURRENT")
        for stage in order:
            await self._move(name, stage, actual.get(aws_label(stage)), stages.get(stage))
        if proof is not None:
            await self._call(
                "set_stages",
                "tag_resource",
                SecretId=self._aws_name(name),
                Tags=[{"Key": PROOF_TAG, "Value": proof}],
            )
        if unstaged(doc):
            await self._call(
                "set_stages", "untag_resource", SecretId=self._aws_name(name), TagKeys=[STAGED_TAG]
            )
        return await self.read_stages(name)

    async def delete_version(self, name: str, version_id: str) -> None:
        """Deprecate one unstaged version: AWS removes versions that carry no label itself.

        Secrets Manager has no call that deletes one version; a version without
        staging labels is deprecated and deleted by AWS (it keeps about 100).
        So this takes our ``WRITTEN`` label off the version.
        """
        self._writable()
        validate_version_id(version_id)
        doc = await self._describe(name)
        token = to_token(version_id)
        labels = (doc.get("VersionIdsToStages") or {}).get(token)
        if labels is None:
            if version_id not in {v for v, _ in await self.list_versions(name)}:
                raise VersionNotFound(f"secret {name!r} has no version {version_id!r}")
            return  # already deprecated
        if version_id in (await self.read_stages(name)).stages.values():
            raise Conflict(f"version {version_id!r} of secret {name!r} is staged; not deleted")
        if WRITTEN in labels:
            await self._call(
                "delete_version",
                "update_secret_version_stage",
                SecretId=self._aws_name(name),
                VersionStage=WRITTEN,
                RemoveFromVersionId=token,
            )

    async def _move(
        self, name: str, stage: str, from_token_: str | None, to_version: str | None
    ) -> None:
        label = aws_label(stage)
        target = to_token(to_version) if to_version is not None else None
        if from_token_ == target:
            return
        if stage == "PREVIOUS" and target is not None and from_token_ == target:
            return
        kw: dict[str, Any] = {"SecretId": self._aws_name(name), "VersionStage": label}
        if from_token_ is not None:
            kw["RemoveFromVersionId"] = from_token_
        if target is not None:
            kw["MoveToVersionId"] = target
        try:
            await self._call("set_stages", "update_secret_version_stage", **kw)
        except BadRequest as exc:
            raise Conflict(
                f"stage {stage!r} of secret {name!r} moved concurrently "
                f"({exc.message}); the stage map may be partly applied"
            ) from None

    async def aclose(self) -> None:
        await self._aws.aclose()
