"""Config sections of the backends: key providers, data keys, stores (see :mod:`agent.config`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BeforeValidator,
    Field,
    field_validator,
)

from agent.bounded import (
    MAX_JSON_DEPTH,
    MAX_OBJECT_SIZE,
    Limits,
)
from agent.config_scalars import (
    ConfigPath,
    Duration,
    Period,
    PositiveInt,
    SecretRef,
    _Model,
)


class LocalKeysConfig(_Model):
    type: Literal["local"]
    keyring: ConfigPath = Path("keyring.json")
    passphrase: SecretRef | None = None
    rotate_every: Period | None = None


class Pkcs11KeysConfig(_Model):
    type: Literal["pkcs11"]
    module: ConfigPath
    token: str
    pin: SecretRef
    key: str = "secrets-agent-master"
    mechanism: Literal["aes-gcm", "aes-key-wrap-pad"] = "aes-gcm"
    rotate_every: Period | None = None


class KmsKeysConfig(_Model):
    type: Literal["aws-kms"]
    key_id: str
    region: str | None = None
    endpoint_url: str | None = None
    timeout: Duration = 5.0
    rotate_every: Period | None = None

    @field_validator("rotate_every")
    @classmethod
    def _kms_period(cls, v: float | None) -> float | None:
        if v is not None and not (v % 86400 == 0 and 90 <= v / 86400 <= 2560):
            raise ValueError(
                f"KMS rotates on a period of whole days from 90d to 2560d; got {v:g} seconds"
            )
        return v


KeyProviderConfig = Annotated[
    LocalKeysConfig | Pkcs11KeysConfig | KmsKeysConfig, Field(discriminator="type")
]


class DataKeysConfig(_Model):
    cache_capacity: PositiveInt = 1024
    max_age: Duration = 300.0
    max_uses: PositiveInt = 100_000
    max_messages: PositiveInt = 1000


_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_size(value: object) -> int:
    """Bytes from ``1048576``, ``"64KiB"``, ``"1MiB"`` or ``"1GiB"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and int(m.group(1)) > 0:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError(f'expected a size like "64KiB" or "1MiB", got {value!r}')


ByteSize = Annotated[int, BeforeValidator(parse_size)]


class _StoreBase(_Model):
    id: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    #: Envelopes and stage maps larger than this are refused before being read whole.
    max_object_size: ByteSize = MAX_OBJECT_SIZE
    #: JSON in store objects nested deeper than this is refused.
    max_json_depth: Annotated[int, Field(ge=4, le=512)] = MAX_JSON_DEPTH

    @property
    def limits(self) -> Limits:
        """The parsing caps of this store."""
        return Limits(self.max_object_size, self.max_json_depth)

    #: Serve stage maps that carry no proof (written before 0.x, or by another
    #: tool). For the upgrade only: it lets a store writer without keys move
    #: stages freely until the maps are signed (see CHANGELOG).
    accept_unproven_stages: bool = False


class FileStoreConfig(_StoreBase):
    type: Literal["file"]
    path: ConfigPath = Path("store")


class TlsConfig(_Model):
    ca: ConfigPath | None = None
    cert: ConfigPath | None = None
    key: ConfigPath | None = None


class EtcdStoreConfig(_StoreBase):
    type: Literal["etcd"]
    endpoints: list[str] = Field(default_factory=lambda: ["127.0.0.1:2379"], min_length=1)
    prefix: str = "/secrets-agent"
    username: str | None = None
    password: SecretRef | None = None
    tls: TlsConfig | None = None
    timeout: Duration = 5.0


class AwsSecretsManagerStoreConfig(_StoreBase):
    type: Literal["aws-secretsmanager"]
    region: str | None = None
    endpoint_url: str | None = None
    client_side_encryption: bool = True
    name_prefix: str = ""
    timeout: Duration = 5.0


class S3StoreConfig(_StoreBase):
    type: Literal["s3"]
    bucket: str
    prefix: str = "secrets-agent"
    region: str | None = None
    endpoint_url: str | None = None
    timeout: Duration = 5.0


StoreConfig = Annotated[
    FileStoreConfig | EtcdStoreConfig | AwsSecretsManagerStoreConfig | S3StoreConfig,
    Field(discriminator="type"),
]
