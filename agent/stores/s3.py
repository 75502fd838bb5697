"""The S3 store: envelopes as objects, stage moves as conditional writes.

Layout (``store.prefix``, default ``secrets-agent``)::

    <prefix>/<name>/versions/<id>.json   an envelope
    <prefix>/<name>/stages.json          {"CURRENT": "<id>", "PREVIOUS": "<id>"}

The stage map's ETag is the revision. A stage move is a PutObject with
``If-Match: <etag>`` (or ``If-None-Match: *`` for the first map), so two writers
racing to promote cannot both win; a version is created with
``If-None-Match: *``, so ids are never overwritten. The cheap version check is a
conditional GET (``If-None-Match``), answered 304 with no body while nothing
changed. S3 cannot push: the agent polls.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from agent.aws import AwsClient, error_code, map_error
from agent.bounded import DEFAULT_LIMITS, Limits, TooLarge, check_size, loads_json
from agent.config import AgentConfig, S3StoreConfig
from agent.crypto.stageproof import PROOF_KEY
from agent.errors import (
    AgentError,
    Conflict,
    DecryptionError,
    MalformedStoreData,
    NotFound,
    SecretNotFound,
    VersionNotFound,
)
from agent.metrics import Metrics
from agent.stores.base import (
    StageState,
    StoredVersion,
    check_stage_map,
    name_checker,
    store_outcome,
)
from agent.types import utcnow, validate_version_id

check_name = name_checker("s3", frozenset({"versions", "stages.json"}))


class S3Store:
    """A WritableStore on one S3 bucket (polling only)."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "secrets-agent",
        store_id: str = "default",
        region: str | None = None,
        endpoint_url: str | None = None,
        timeout: float = 5.0,
        metrics: Metrics | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.bucket = bucket
        self.limits = limits
        self.prefix = prefix.strip("/")
        self.store_id = store_id
        self.metrics = metrics
        self._aws = AwsClient("s3", region=region, endpoint_url=endpoint_url, timeout=timeout)
        self._stages_cache: dict[str, tuple[str, dict[str, str], str | None]] = {}

    @classmethod
    def from_config(cls, cfg: S3StoreConfig, *, config: AgentConfig, metrics: Metrics) -> S3Store:
        return cls(
            cfg.bucket,
            prefix=cfg.prefix,
            store_id=cfg.id,
            region=cfg.region,
            endpoint_url=cfg.endpoint_url,
            timeout=cfg.timeout,
            metrics=metrics,
            limits=cfg.limits,
        )

    def _key(self, name: str, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, name, *parts) if p)

    async def _call(self, operation: str, method: str, **kw: Any) -> Any:
        client = await self._aws.get()
        try:
            result = await getattr(client, method)(**kw)
        except Exception as exc:
            if error_code(exc) in ("304", "PreconditionFailed"):
                self._count(operation, "ok" if error_code(exc) == "304" else "conflict")
                raise
            err = map_error(exc, what=f"s3 {operation}")
            self._count(operation, store_outcome(err))
            raise err from None
        self._count(operation, "ok")
        return result

    def _count(self, operation: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.store_operations.labels(operation, outcome).inc()

    async def _keys(self, prefix: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            page = await self._call("list", "list_objects_v2", **kw)
            out.extend(page.get("Contents", []))
            if not page.get("IsTruncated"):
                return out
            token = page.get("NextContinuationToken")

    # ------------------------------------------------------------------ reads

    async def list_names(self) -> list[str]:
        names = set()
        base = f"{self.prefix}/" if self.prefix else ""
        for obj in await self._keys(base):
            rest = obj["Key"][len(base) :]
            if rest.endswith("/stages.json"):
                names.add(rest[: -len("/stages.json")])
            elif "/versions/" in rest:
                names.add(rest.rsplit("/versions/", 1)[0])
        return sorted(names)

    async def read_stages(self, name: str) -> StageState:
        check_name(name)
        cached = self._stages_cache.get(name)
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(name, "stages.json")}
        if cached is not None:
            kw["IfNoneMatch"] = cached[0]
        try:
            obj = await self._call("read_stages", "get_object", **kw)
        except NotFound:
            self._stages_cache.pop(name, None)
            if not await self._keys(self._key(name, "versions") + "/"):
                raise SecretNotFound(f"secret {name!r} does not exist") from None
            return StageState({}, "")
        except Exception as exc:
            if error_code(exc) == "304" and cached is not None:
                return StageState(dict(cached[1]), cached[0], cached[2])  # unchanged: no body
            raise
        what = f"stage map of secret {name!r} in S3"
        data = await _read_body(obj, self.limits, what, MalformedStoreData)
        stages = _parse_stages(data, what, self.limits)
        proof = stages.pop(PROOF_KEY, None)
        self._stages_cache[name] = (obj["ETag"], stages, proof)
        return StageState(dict(stages), obj["ETag"], proof)

    async def read_version(self, name: str, version_id: str) -> StoredVersion:
        check_name(name)
        validate_version_id(version_id)
        try:
            obj = await self._call(
                "read_version",
                "get_object",
                Bucket=self.bucket,
                Key=self._key(name, "versions", f"{version_id}.json"),
            )
        except NotFound:
            if not await self._keys(self._key(name) + "/"):
                raise SecretNotFound(f"secret {name!r} does not exist") from None
            raise VersionNotFound(f"secret {name!r} has no version {version_id!r}") from None
        what = f"version {version_id!r} of secret {name!r} in S3"
        data = await _read_body(obj, self.limits, what, DecryptionError)
        return StoredVersion(name, version_id, data, _created(obj))

    async def list_versions(self, name: str) -> list[tuple[str, datetime]]:
        check_name(name)
        objs = await self._keys(self._key(name, "versions") + "/")
        if not objs and not await self._keys(self._key(name) + "/"):
            raise SecretNotFound(f"secret {name!r} does not exist")
        out = []
        for o in objs:
            head = await self._call(
                "list_versions", "head_object", Bucket=self.bucket, Key=o["Key"]
            )
            out.append((o["Key"].rsplit("/", 1)[1].removesuffix(".json"), _created(head)))
        return sorted(out, key=lambda item: (item[1], item[0]))

    # ----------------------------------------------------------------- writes

    async def write_version(self, name: str, version_id: str, envelope: bytes) -> None:
        check_name(name)
        validate_version_id(version_id)
        try:
            # S3's LastModified has one-second resolution: keep the exact time.
            await self._call(
                "write_version",
                "put_object",
                Bucket=self.bucket,
                Key=self._key(name, "versions", f"{version_id}.json"),
                Body=envelope,
                IfNoneMatch="*",
                Metadata={"created-at": utcnow().isoformat()},
            )
        except Exception as exc:
            if error_code(exc) == "PreconditionFailed":
                raise Conflict(f"secret {name!r} already has a version {version_id!r}") from None
            raise

    async def replace_envelope(
        self, name: str, version_id: str, envelope: bytes, *, expected: bytes
    ) -> None:
        key = self._key(check_name(name), "versions", f"{validate_version_id(version_id)}.json")
        try:
            obj = await self._call("replace_envelope", "get_object", Bucket=self.bucket, Key=key)
        except NotFound:
            if not await self._keys(self._key(name) + "/"):
                raise SecretNotFound(f"secret {name!r} does not exist") from None
            raise VersionNotFound(f"secret {name!r} has no version {version_id!r}") from None
        async with obj["Body"] as body:
            current = await body.read()
        if current != expected:
            raise Conflict(f"version {version_id!r} of {name!r} changed concurrently")
        try:
            await self._call(
                "replace_envelope",
                "put_object",
                Bucket=self.bucket,
                Key=key,
                Body=envelope,
                IfMatch=obj["ETag"],
                Metadata=obj.get("Metadata") or {},
            )
        except Exception as exc:
            if error_code(exc) == "PreconditionFailed":
                raise Conflict(f"version {version_id!r} of {name!r} changed concurrently") from None
            raise

    async def set_stages(
        self,
        name: str,
        stages: Mapping[str, str],
        *,
        expected_revision: str,
        proof: str | None = None,
    ) -> StageState:
        check_name(name)
        stages = check_stage_map(stages)
        if not await self._keys(self._key(name) + "/"):
            raise SecretNotFound(f"secret {name!r} does not exist")
        for vid in set(stages.values()):
            try:
                await self._call(
                    "set_stages",
                    "head_object",
                    Bucket=self.bucket,
                    Key=self._key(name, "versions", f"{vid}.json"),
                )
            except NotFound:
                raise VersionNotFound(f"secret {name!r} has no version {vid!r}") from None
        doc = {**stages, PROOF_KEY: proof} if proof is not None else dict(stages)
        body = json.dumps(dict(sorted(doc.items())), separators=(",", ":")).encode()
        condition = (
            {"IfNoneMatch": "*"} if expected_revision == "" else {"IfMatch": expected_revision}
        )
        try:
            result = await self._call(
                "set_stages",
                "put_object",
                Bucket=self.bucket,
                Key=self._key(name, "stages.json"),
                Body=body,
                **condition,
            )
        except Exception as exc:
            if error_code(exc) == "PreconditionFailed":
                raise Conflict(
                    f"stage map of secret {name!r} changed concurrently (expected revision "
                    f"{expected_revision or 'none'}); nothing was written"
                ) from None
            raise
        return StageState(dict(stages), result["ETag"], proof)

    async def delete_version(self, name: str, version_id: str) -> None:
        """Delete one unstaged version.

        S3 has no transaction over two objects: the stage map is read first, so
        a writer that stages this version in the same instant can leave a stage
        pointing at nothing, which readers refuse while serving the last good
        value. Retention deletes only versions older than the ones it keeps,
        which no writer is about to stage.
        """
        check_name(name)
        validate_version_id(version_id)
        if version_id in (await self.read_stages(name)).stages.values():
            raise Conflict(f"version {version_id!r} of secret {name!r} is staged; not deleted")
        key = self._key(name, "versions", f"{version_id}.json")
        try:
            await self._call("delete_version", "head_object", Bucket=self.bucket, Key=key)
        except NotFound:
            raise VersionNotFound(f"secret {name!r} has no version {version_id!r}") from None
        await self._call("delete_version", "delete_object", Bucket=self.bucket, Key=key)

    async def aclose(self) -> None:
        await self._aws.aclose()


def _created(obj: Mapping[str, Any]) -> datetime:
    meta = obj.get("Metadata") or {}
    try:
        return datetime.fromisoformat(meta["created-at"])
    except (KeyError, ValueError):
        return _utc(obj.get("LastModified"))


def _utc(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.now(UTC)


async def _read_body(
    obj: Mapping[str, Any], limits: Limits, what: str, too_large: type[AgentError]
) -> bytes:
    """An object's body, refused by its Content-Length before it is read (and capped)."""
    cap = limits.max_object_size
    async with obj["Body"] as body:
        try:
            check_size(obj.get("ContentLength"), cap)
            data: bytes = await body.read(cap + 1)
            check_size(len(data), cap)
        except TooLarge as exc:
            raise too_large(f"{what}: {exc} (store.max_object_size); refused") from None
    return data


def _parse_stages(data: bytes, what: str, limits: Limits) -> dict[str, str]:
    doc = loads_json(data, what=what, error=MalformedStoreData, limits=limits)
    if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
        raise MalformedStoreData(f"{what} is not a JSON object of stage -> version id")
    return {str(k): v for k, v in doc.items()}
