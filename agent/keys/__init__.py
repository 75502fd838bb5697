"""Key providers: where master keys live and how data keys are wrapped.

A provider is created from its config by :func:`create_provider`; the type
string is looked up in :data:`KEY_PROVIDERS` and imported lazily.
"""

from __future__ import annotations

from agent.config import AgentConfig, KeyProviderConfig
from agent.keys.base import KeyInfo, KeyManager, KeyProvider
from agent.metrics import Metrics
from agent.registry import load_backend

KEY_PROVIDERS = {
    "local": "agent.keys.local:LocalKeyProvider",
    "aws-kms": "agent.keys.aws_kms:KmsKeyProvider",
    "pkcs11": "agent.keys.pkcs11:Pkcs11KeyProvider",
}

__all__ = ["KEY_PROVIDERS", "KeyInfo", "KeyManager", "KeyProvider", "create_provider"]


def create_provider(
    name: str, cfg: KeyProviderConfig, *, config: AgentConfig, metrics: Metrics
) -> KeyProvider:
    """Build the provider named ``name`` in the config (no I/O until first use)."""
    cls = load_backend(KEY_PROVIDERS, cfg.type, "key provider")
    provider: KeyProvider = cls.from_config(name, cfg, config=config, metrics=metrics)
    return provider
