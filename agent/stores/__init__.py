"""Backing stores: where envelopes and stage maps live. They never see plaintext."""

from __future__ import annotations

from agent.config import AgentConfig
from agent.metrics import Metrics
from agent.registry import load_backend
from agent.stores.base import (
    SecretStore,
    StageState,
    StoredVersion,
    WatchableStore,
    WatchEvent,
    WritableStore,
)

STORES = {
    "file": "agent.stores.file:FileStore",
    "etcd": "agent.stores.etcd:EtcdStore",
    "aws-secretsmanager": "agent.stores.aws_sm:SecretsManagerStore",
    "s3": "agent.stores.s3:S3Store",
}

__all__ = [
    "STORES",
    "SecretStore",
    "StageState",
    "StoredVersion",
    "WatchEvent",
    "WatchableStore",
    "WritableStore",
    "create_store",
]


def create_store(config: AgentConfig, *, metrics: Metrics) -> WritableStore:
    """Build the configured store (connections are opened lazily or by ``open``)."""
    cls = load_backend(STORES, config.store.type, "store")
    store: WritableStore = cls.from_config(config.store, config=config, metrics=metrics)
    return store
