"""The local key provider: keyring file, passphrase sealing, wrapping and rotation."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.crypto.envelope import WrappedKey, wrap_context
from agent.errors import ConfigError, DecryptionError, KeyRevoked, KeyUnavailable
from agent.keys import create_provider
from agent.keys.base import KeyManager, KeyProvider
from agent.keys.local import LocalKeyProvider, LocalKeyring
from agent.metrics import Metrics

CONTEXT = wrap_context("default")
DEK = bytes(range(32))
PASSPHRASE = b"correct horse battery staple"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "keyring.json"


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def provider(path: Path, metrics: Metrics) -> LocalKeyProvider:
    LocalKeyring.create(path)
    return LocalKeyProvider("local", keyring=path, metrics=metrics)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def materials(keyring: LocalKeyring) -> list[bytes]:
    return [v.material for key in keyring.keys.values() for v in key.versions.values()]


def blob_version(wrapped: WrappedKey) -> int:
    return int.from_bytes(wrapped.wrapped[1:5], "big")


def assert_no_key_bytes(text: str, *secrets: bytes) -> None:
    for secret in secrets:
        assert secret.hex() not in text
        assert base64.b64encode(secret).decode() not in text


# --------------------------------------------------------------------------- keyring file


def test_create_then_load_gives_the_same_keys(path: Path) -> None:
    created = LocalKeyring.create(path)
    loaded = LocalKeyring.load(path)
    assert loaded.keys == created.keys
    master = loaded.keys["master"]
    assert master.primary == 1
    assert len(master.current().material) == 32
    assert "material" not in repr(master)


def test_create_writes_mode_0600_leaves_no_temp_file_and_never_overwrites(path: Path) -> None:
    created = LocalKeyring.create(path)
    assert mode(path) == 0o600
    with pytest.raises(ConfigError, match="already exists"):
        LocalKeyring.create(path)
    assert LocalKeyring.load(path).keys == created.keys
    assert sorted(p.name for p in path.parent.iterdir()) == ["keyring.json"]


def test_rotate_adds_a_primary_version_keeps_the_old_one_and_mode_0600(path: Path) -> None:
    keyring = LocalKeyring.create(path)
    old = keyring.keys["master"].current()
    new = keyring.rotate("master")
    assert mode(path) == 0o600
    loaded = LocalKeyring.load(path).keys["master"]
    assert (new.version, loaded.primary) == (2, 2)
    assert loaded.versions[1] == old
    assert loaded.versions[2].material != old.material


def test_rotate_of_a_stale_copy_keeps_versions_added_by_another_writer(path: Path) -> None:
    first = LocalKeyring.create(path)
    second = LocalKeyring.load(path)
    added_by_first = first.rotate("master")
    added_by_second = second.rotate("master")
    loaded = LocalKeyring.load(path).keys["master"]
    assert sorted(loaded.versions) == [1, 2, 3]
    assert loaded.versions[2] == added_by_first
    assert loaded.versions[3] == added_by_second


def test_create_key_adds_a_key_once(path: Path) -> None:
    keyring = LocalKeyring.create(path)
    added = keyring.create_key("backup")
    assert keyring.create_key("backup") == added
    assert sorted(LocalKeyring.load(path).keys) == ["backup", "master"]
    with pytest.raises(ConfigError, match="invalid master key name"):
        keyring.create_key("no/slashes")


@pytest.mark.parametrize("bad_mode", [0o640, 0o644, 0o604, 0o660, 0o606])
def test_load_refuses_a_keyring_group_or_others_can_access(path: Path, bad_mode: int) -> None:
    LocalKeyring.create(path)
    path.chmod(bad_mode)
    with pytest.raises(ConfigError) as info:
        LocalKeyring.load(path)
    assert f"keyring {path} has mode {bad_mode:04o}" in str(info.value)
    assert f"chmod 600 {path}" in str(info.value)


def test_missing_keyring_is_refused_with_the_fix(path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; create it with"):
        LocalKeyring.load(path)


def test_sealed_keyring_round_trips_and_hides_every_key_version(path: Path) -> None:
    keyring = LocalKeyring.create(path, passphrase=PASSPHRASE)
    keyring.rotate("master")
    assert mode(path) == 0o600
    text = path.read_text()
    doc = json.loads(text)
    assert set(doc) == {"format", "v", "sealed"}
    assert (doc["sealed"]["kdf"], doc["sealed"]["n"]) == ("scrypt", 2**15)
    loaded = LocalKeyring.load(path, passphrase=PASSPHRASE)
    assert loaded.keys == keyring.keys
    assert len(materials(loaded)) == 2
    assert_no_key_bytes(text, *materials(loaded))


def test_sealed_keyring_refuses_a_wrong_or_missing_passphrase(path: Path) -> None:
    keyring = LocalKeyring.create(path, passphrase=PASSPHRASE)
    with pytest.raises(ConfigError, match="wrong passphrase") as info:
        LocalKeyring.load(path, passphrase=b"wrong")
    assert_no_key_bytes(str(info.value), *materials(keyring))
    with pytest.raises(ConfigError, match="is sealed with a passphrase"):
        LocalKeyring.load(path)


def test_altered_sealed_header_is_refused(path: Path) -> None:
    LocalKeyring.create(path, passphrase=PASSPHRASE)
    doc = json.loads(path.read_text())
    doc["sealed"]["n"] = 2**14  # authenticated as AAD: a downgrade is noticed
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="wrong passphrase, or the sealed keyring was altered"):
        LocalKeyring.load(path, passphrase=PASSPHRASE)


def test_plain_keyring_is_refused_when_a_passphrase_is_configured(path: Path) -> None:
    LocalKeyring.create(path)
    with pytest.raises(ConfigError, match="not sealed but a passphrase is configured"):
        LocalKeyring.load(path, passphrase=PASSPHRASE)


def test_malformed_keyring_is_refused_without_echoing_material(path: Path) -> None:
    short = os.urandom(31)
    doc = {
        "format": "secrets-agent/keyring",
        "v": 1,
        "keys": {
            "master": {
                "primary": 1,
                "versions": {
                    "1": {
                        "created_at": "2024-01-01T00:00:00Z",
                        "material": base64.b64encode(short).decode(),
                    }
                },
            }
        },
    }
    path.parent.mkdir()
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="must be 32 bytes") as info:
        LocalKeyring.load(path)
    assert_no_key_bytes(str(info.value), short)


# --------------------------------------------------------------------------- provider


def test_provider_satisfies_both_protocols(provider: LocalKeyProvider) -> None:
    assert isinstance(provider, KeyProvider)
    assert isinstance(provider, KeyManager)


async def test_wrap_then_unwrap_round_trips(provider: LocalKeyProvider) -> None:
    wrapped = await provider.wrap(DEK, context=CONTEXT)
    assert (wrapped.provider, wrapped.key) == ("local", "master")
    assert wrapped.wrapped[0] == 1
    assert blob_version(wrapped) == 1
    assert len(wrapped.wrapped) == 1 + 4 + 12 + 32 + 16
    assert await provider.unwrap(wrapped, context=CONTEXT) == bytearray(DEK)


async def test_unwrap_refuses_another_context(provider: LocalKeyProvider) -> None:
    wrapped = await provider.wrap(DEK, context=CONTEXT)
    with pytest.raises(DecryptionError, match="failed authentication") as info:
        await provider.unwrap(wrapped, context=wrap_context("other-store"))
    assert_no_key_bytes(str(info.value), DEK)


async def test_unwrap_refuses_every_single_flipped_byte(provider: LocalKeyProvider) -> None:
    wrapped = await provider.wrap(DEK, context=CONTEXT)
    blob = wrapped.wrapped
    for i in range(len(blob)):
        tampered = blob[:i] + bytes([blob[i] ^ 0x01]) + blob[i + 1 :]
        with pytest.raises(DecryptionError) as info:
            await provider.unwrap(WrappedKey("local", "master", tampered), context=CONTEXT)
        assert_no_key_bytes(str(info.value), DEK)
    with pytest.raises(DecryptionError, match="truncated"):
        await provider.unwrap(WrappedKey("local", "master", blob[:32]), context=CONTEXT)


async def test_unknown_version_and_key_name_are_refused(provider: LocalKeyProvider) -> None:
    wrapped = await provider.wrap(DEK, context=CONTEXT)
    other_version = wrapped.wrapped[:1] + (99).to_bytes(4, "big") + wrapped.wrapped[5:]
    with pytest.raises(DecryptionError, match="no version 99"):
        await provider.unwrap(WrappedKey("local", "master", other_version), context=CONTEXT)
    with pytest.raises(KeyRevoked, match="has no key 'gone'") as info:
        await provider.unwrap(WrappedKey("local", "gone", wrapped.wrapped), context=CONTEXT)
    assert (info.value.provider, info.value.key) == ("local", "gone")


async def test_after_rotate_new_wraps_use_the_new_version_and_old_ones_open(
    provider: LocalKeyProvider, path: Path
) -> None:
    old = await provider.wrap(DEK, context=CONTEXT)
    info = await provider.rotate_key()
    assert (info.version, info.primary) == ("2", True)
    assert mode(path) == 0o600
    new = await provider.wrap(DEK, context=CONTEXT)
    assert (blob_version(old), blob_version(new)) == (1, 2)
    assert await provider.unwrap(old, context=CONTEXT) == bytearray(DEK)
    assert await provider.unwrap(new, context=CONTEXT) == bytearray(DEK)


async def test_a_running_provider_sees_a_rotation_done_by_another(
    provider: LocalKeyProvider, path: Path
) -> None:
    other = LocalKeyProvider("local", keyring=path)
    assert blob_version(await provider.wrap(DEK, context=CONTEXT)) == 1
    await other.rotate_key()
    wrapped_by_other = await other.wrap(DEK, context=CONTEXT)
    assert blob_version(await provider.wrap(DEK, context=CONTEXT)) == 2
    assert await provider.unwrap(wrapped_by_other, context=CONTEXT) == bytearray(DEK)


async def test_list_keys_shows_versions_and_primary_never_material(
    provider: LocalKeyProvider, path: Path
) -> None:
    await provider.rotate_key()
    infos = await provider.list_keys()
    assert [(i.provider, i.key, i.version, i.primary, i.state) for i in infos] == [
        ("local", "master", "1", False, "enabled"),
        ("local", "master", "2", True, "enabled"),
    ]
    assert all(i.created_at.endswith("Z") for i in infos)
    assert_no_key_bytes(repr(infos), *materials(LocalKeyring.load(path)))


async def test_create_key_creates_a_missing_keyring_once(path: Path) -> None:
    provider = LocalKeyProvider("local", keyring=path)
    info = await provider.create_key()
    assert (info.key, info.version, info.primary) == ("master", "1", True)
    assert mode(path) == 0o600
    before = LocalKeyring.load(path).keys
    assert await provider.create_key() == info
    assert LocalKeyring.load(path).keys == before


async def test_a_keyring_made_too_open_while_running_makes_unwrap_unavailable(
    provider: LocalKeyProvider, path: Path
) -> None:
    wrapped = await provider.wrap(DEK, context=CONTEXT)
    path.chmod(0o644)
    with pytest.raises(KeyUnavailable, match=f"chmod 600 {path}"):
        await provider.unwrap(wrapped, context=CONTEXT)
    path.chmod(0o600)
    assert await provider.unwrap(wrapped, context=CONTEXT) == bytearray(DEK)


async def test_from_config_reads_the_passphrase_reference(
    path: Path, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    LocalKeyring.create(path, passphrase=PASSPHRASE)
    monkeypatch.setenv("TEST_KEYRING_PASSPHRASE", PASSPHRASE.decode())
    config = parse_config(
        {
            "keys": {
                "disk": {
                    "type": "local",
                    "keyring": "keys/keyring.json",
                    "passphrase": "env:TEST_KEYRING_PASSPHRASE",
                }
            },
            "write_keys": ["disk"],
        },
        base_dir=path.parent.parent,
    )
    provider = create_provider("disk", config.keys["disk"], config=config, metrics=metrics)
    assert isinstance(provider, LocalKeyProvider)
    wrapped = await provider.wrap(DEK, context=CONTEXT)
    assert wrapped.provider == "disk"
    assert await provider.unwrap(wrapped, context=CONTEXT) == bytearray(DEK)


async def test_operations_are_counted_and_timed(
    provider: LocalKeyProvider, metrics: Metrics
) -> None:
    wrapped = await provider.wrap(DEK, context=CONTEXT)
    await provider.unwrap(wrapped, context=CONTEXT)
    with pytest.raises(DecryptionError):
        await provider.unwrap(wrapped, context=wrap_context("elsewhere"))

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"provider": "local", **labels})

    ops = "secrets_agent_key_operations_total"
    assert sample(ops, operation="wrap", outcome="ok") == 1
    assert sample(ops, operation="unwrap", outcome="ok") == 1
    assert sample(ops, operation="unwrap", outcome="refused") == 1
    assert sample("secrets_agent_key_operation_seconds_count", operation="unwrap") == 2
