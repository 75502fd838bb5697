"""The PKCS#11 key provider against a real SoftHSM2 token, for both mechanisms."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, DataKeysConfig, parse_config
from agent.crypto.datakeys import DataKeys
from agent.crypto.envelope import WrappedKey, wrap_context
from agent.errors import ConfigError, DecryptionError, KeyRevoked, KeyUnavailable
from agent.keys import create_provider
from agent.keys.pkcs11 import Pkcs11KeyProvider
from agent.metrics import Metrics

pytestmark = pytest.mark.integration
CTX = wrap_context("default")
DEK = bytes(range(32))
PIN_VAR = "SA_TEST_HSM_PIN"
MECHANISMS = ["aes-gcm", "aes-key-wrap-pad"]


def _config(fixture: Any, tmp_path: Path, label: str, **overrides: str) -> AgentConfig:
    hsm = {
        "type": "pkcs11",
        "module": fixture.module,
        "token": fixture.token_label,
        "pin": f"env:{PIN_VAR}",
        "key": label,
        **overrides,
    }
    return parse_config({"keys": {"hsm": hsm}, "write_keys": ["hsm"]}, base_dir=tmp_path)


def _provider(config: AgentConfig, metrics: Metrics | None = None) -> Pkcs11KeyProvider:
    provider = create_provider(
        "hsm", config.keys["hsm"], config=config, metrics=metrics or Metrics()
    )
    assert isinstance(provider, Pkcs11KeyProvider)
    return provider


def _label() -> str:
    return f"sa-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def _session(token: Any) -> Iterator[Any]:
    """A session of this process (logged in already by a provider: login is per process)."""
    import pkcs11

    with pkcs11.lib(token.module).get_token(token_label=token.token_label).open(rw=True) as s:
        yield s


def _objects(token: Any, **attrs: Any) -> list[dict[str, Any]]:
    """The secret keys matching ``attrs``, each as {attribute name: value}."""
    from pkcs11 import Attribute, ObjectClass

    names = ["SENSITIVE", "PRIVATE", "EXTRACTABLE", "MODIFIABLE", "ENCRYPT", "DECRYPT"]
    names += ["WRAP", "UNWRAP", "SIGN"]
    query = {Attribute.CLASS: ObjectClass.SECRET_KEY}
    query.update({getattr(Attribute, k.upper()): v for k, v in attrs.items()})
    with _session(token) as s:
        return [{n: obj[getattr(Attribute, n)] for n in names} for obj in s.get_objects(query)]


def _destroy(token: Any, label: str) -> None:
    from pkcs11 import Attribute, ObjectClass

    with _session(token) as s:
        for key in s.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}):
            key.destroy()


def _nobody_logged_in(token: Any) -> None:
    """Precondition of the login tests: no session of this process is logged in."""
    import pkcs11
    from pkcs11 import UserType

    session = (
        pkcs11.lib(token.module).get_token(token_label=token.token_label).open(user_pin=token.pin)
    )
    assert session.user_type == UserType.USER, "a session of this process is still logged in"
    session.close()  # logs out again


def _flip(wrapped: WrappedKey, index: int) -> WrappedKey:
    blob = bytearray(wrapped.wrapped)
    blob[index] ^= 0x01
    return WrappedKey(wrapped.provider, wrapped.key, bytes(blob))


def _count(metrics: Metrics, operation: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "secrets_agent_key_operations_total",
        {"provider": "hsm", "operation": operation, "outcome": outcome},
    )
    return value or 0.0


@pytest.fixture
def pin_env(softhsm_token: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PIN_VAR, softhsm_token.pin)


@pytest.fixture(params=MECHANISMS)
async def hsm(
    request: pytest.FixtureRequest, softhsm_token: Any, pin_env: None, tmp_path: Path
) -> AsyncIterator[Pkcs11KeyProvider]:
    config = _config(softhsm_token, tmp_path, _label(), mechanism=request.param)
    provider = _provider(config)
    await provider.create_key()
    yield provider
    await provider.aclose()


async def test_round_trip_with_a_sensitive_non_extractable_single_purpose_key(
    hsm: Pkcs11KeyProvider, softhsm_token: Any
) -> None:
    from pkcs11 import KeyType

    wrapped = await hsm.wrap(DEK, context=CTX)
    assert wrapped.provider == "hsm" and wrapped.key == hsm.key_label
    assert DEK not in wrapped.wrapped
    assert await hsm.unwrap(wrapped, context=CTX) == bytearray(DEK)
    (key,) = _objects(softhsm_token, label=hsm.key_label)
    assert key["SENSITIVE"] and key["PRIVATE"]
    assert not key["EXTRACTABLE"] and not key["MODIFIABLE"]
    gcm = hsm.mechanism == "aes-gcm"
    assert (key["ENCRYPT"], key["DECRYPT"]) == (gcm, gcm)
    assert (key["WRAP"], key["UNWRAP"]) == (not gcm, not gcm)
    assert not key["SIGN"]
    # Key wrap goes through short-lived session objects: none is left behind.
    assert _objects(softhsm_token, key_type=KeyType.GENERIC_SECRET) == []


async def test_tampered_blobs_are_refused_and_never_taken_for_revocation(
    hsm: Pkcs11KeyProvider,
) -> None:
    wrapped = await hsm.wrap(DEK, context=CTX)
    for index in range(len(wrapped.wrapped)):  # format, version, IV, body, tag
        with pytest.raises(DecryptionError) as caught:
            await hsm.unwrap(_flip(wrapped, index), context=CTX)
        assert not isinstance(caught.value, KeyRevoked), index
    with pytest.raises(DecryptionError):
        await hsm.unwrap(WrappedKey("hsm", hsm.key_label, wrapped.wrapped[:-1]), context=CTX)
    assert await hsm.unwrap(wrapped, context=CTX) == bytearray(DEK)


async def test_a_blob_for_another_context_is_refused(hsm: Pkcs11KeyProvider) -> None:
    wrapped = await hsm.wrap(DEK, context=CTX)
    with pytest.raises(DecryptionError, match="another context"):
        await hsm.unwrap(wrapped, context=wrap_context("other-store"))


async def test_rotation_keeps_old_blobs_opening_and_marks_them_not_current(
    hsm: Pkcs11KeyProvider,
) -> None:
    old = await hsm.wrap(DEK, context=CTX)
    assert await hsm.is_current(old)
    info = await hsm.rotate_key()
    assert (info.version, info.primary) == ("2", True)
    new = await hsm.wrap(DEK, context=CTX)
    assert new.wrapped[1:5] == (2).to_bytes(4, "big") != old.wrapped[1:5]
    assert await hsm.unwrap(old, context=CTX) == bytearray(DEK)
    assert not await hsm.is_current(old) and await hsm.is_current(new)
    listed = await hsm.list_keys()
    assert [(k.version, k.primary, k.state) for k in listed] == [
        ("1", False, "enabled"),
        ("2", True, "enabled"),
    ]


async def test_blobs_name_their_mechanism_so_a_mechanism_change_keeps_them_opening(
    softhsm_token: Any, pin_env: None, tmp_path: Path
) -> None:
    label = _label()
    gcm = _provider(_config(softhsm_token, tmp_path, label, mechanism="aes-gcm"))
    kwp = _provider(_config(softhsm_token, tmp_path, label, mechanism="aes-key-wrap-pad"))
    await gcm.create_key()
    old = await gcm.wrap(DEK, context=CTX)
    await kwp.rotate_key()  # version 2 is a key-wrap key
    new = await kwp.wrap(DEK, context=CTX)
    for provider in (gcm, kwp):
        assert await provider.unwrap(old, context=CTX) == bytearray(DEK)
        assert await provider.unwrap(new, context=CTX) == bytearray(DEK)
    forged = WrappedKey("hsm", label, b"\x02" + old.wrapped[1:])  # key-wrap blob for a GCM key
    with pytest.raises(DecryptionError, match="does not allow aes-key-wrap-pad"):
        await kwp.unwrap(forged, context=CTX)
    await gcm.aclose()
    await kwp.aclose()


async def test_a_destroyed_key_is_revocation_and_drops_its_cached_data_keys(
    hsm: Pkcs11KeyProvider, softhsm_token: Any
) -> None:
    metrics = Metrics()
    keys = DataKeys({"hsm": hsm}, write_keys=["hsm"], settings=DataKeysConfig(), metrics=metrics)
    _, cached = await keys.for_write("default")
    assert await keys.unwrap(cached, store_id="default")  # from the cache
    other = await hsm.wrap(os.urandom(32), context=CTX)  # a data key the cache does not hold
    _destroy(softhsm_token, hsm.key_label)
    with pytest.raises(KeyRevoked):
        await keys.unwrap([other], store_id="default")
    dropped = metrics.registry.get_sample_value(
        "secrets_agent_datakey_cache_events_total", {"event": "dropped"}
    )
    assert dropped == 1
    with pytest.raises(KeyRevoked):  # the cached data key went with the revocation
        await keys.unwrap(cached, store_id="default")
    with pytest.raises(KeyRevoked):
        await hsm.wrap(DEK, context=CTX)
    assert [k.state for k in await hsm.list_keys()] == ["missing"]
    assert hsm.status()["state"] == "revoked"
    await keys.aclose()


async def test_a_logout_by_another_session_of_this_process_is_not_revocation(
    softhsm_token: Any, pin_env: None, tmp_path: Path
) -> None:
    """Closing a logged-in session logs the whole process out (as a config reload
    closing the old provider does): the other provider logs in again."""
    from pkcs11 import UserType

    _nobody_logged_in(softhsm_token)
    config = _config(softhsm_token, tmp_path, _label())
    first, second = _provider(config), _provider(config)
    await first.create_key()
    assert first._session.user_type == UserType.USER  # the session that logged in
    wrapped = await second.wrap(DEK, context=CTX)  # "user already logged in": no login
    await first.aclose()  # C_Logout for the whole process
    again = await second.wrap(DEK, context=CTX)  # a key lookup sees no key until logged in
    assert await second.unwrap(wrapped, context=CTX) == bytearray(DEK)
    assert await second.unwrap(again, context=CTX) == bytearray(DEK)
    assert [k.state for k in await second.list_keys()] == ["enabled"]
    await second.aclose()


async def test_a_refused_pin_is_not_tried_again_until_it_changes(
    softhsm_token: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """HSMs lock a user after a few wrong PINs: one refusal, then no more logins."""
    _nobody_logged_in(softhsm_token)
    monkeypatch.setenv(PIN_VAR, "wrong-pin")
    provider = _provider(_config(softhsm_token, tmp_path, _label()))
    logins = 0
    library = provider._library

    def counting() -> Any:
        nonlocal logins
        logins += 1
        return library()

    monkeypatch.setattr(provider, "_library", counting)
    with pytest.raises(ConfigError, match=r"keys\.hsm: .*login refused \(PinIncorrect\)"):
        await provider.create_key()
    for _ in range(3):
        with pytest.raises(KeyUnavailable, match="refused this PIN before"):
            await provider.wrap(DEK, context=CTX)
    assert logins == 1
    assert provider.status()["state"] == "unavailable"
    assert "wrong-pin" not in str(provider.status())
    monkeypatch.setenv(PIN_VAR, softhsm_token.pin)  # fixed: the next call logs in
    await provider.create_key()
    assert await provider.unwrap(await provider.wrap(DEK, context=CTX), context=CTX) == DEK
    await provider.aclose()


@pytest.mark.parametrize("problem", ["module", "token", "pin-ref"])
async def test_a_missing_module_token_or_pin_is_unavailable_to_reads_and_a_config_error_to_admin(
    problem: str, softhsm_token: Any, pin_env: None, tmp_path: Path
) -> None:
    overrides = {
        "module": {"module": str(tmp_path / "libnothere.so")},
        "token": {"token": "no-such-token"},
        "pin-ref": {"pin": "env:SA_TEST_UNSET_VARIABLE"},
    }[problem]
    provider = _provider(_config(softhsm_token, tmp_path, _label(), **overrides))
    with pytest.raises(KeyUnavailable):
        await provider.wrap(DEK, context=CTX)
    with pytest.raises(KeyUnavailable):
        await provider.unwrap(
            WrappedKey("hsm", provider.key_label, b"\x01" + bytes(40)), context=CTX
        )
    with pytest.raises(ConfigError):
        await provider.create_key()
    assert [k.state for k in await provider.list_keys()] == ["unavailable"]
    await provider.aclose()


def test_an_unknown_mechanism_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"keys\.hsm\.mechanism"):
        Pkcs11KeyProvider("hsm", module=tmp_path, token="t", pin=b"1", mechanism="aes-cbc")


async def test_concurrent_calls_share_one_locked_session(
    hsm: Pkcs11KeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    await hsm.aclose()  # start from no session
    opened = 0
    login = hsm._login

    def counting() -> Any:
        nonlocal opened
        opened += 1
        return login()

    monkeypatch.setattr(hsm, "_login", counting)
    deks = [os.urandom(32) for _ in range(64)]
    wrapped = await asyncio.gather(*(hsm.wrap(d, context=CTX) for d in deks))
    opened_back = await asyncio.gather(*(hsm.unwrap(w, context=CTX) for w in wrapped))
    assert opened_back == [bytearray(d) for d in deks]
    assert opened == 1


async def test_calls_are_counted_and_timed_per_outcome(
    softhsm_token: Any, pin_env: None, tmp_path: Path
) -> None:
    metrics = Metrics()
    provider = _provider(_config(softhsm_token, tmp_path, _label()), metrics)
    await provider.create_key()
    wrapped = await provider.wrap(DEK, context=CTX)
    await provider.unwrap(wrapped, context=CTX)
    with pytest.raises(DecryptionError):
        await provider.unwrap(wrapped, context=wrap_context("elsewhere"))
    assert _count(metrics, "wrap", "ok") == 1
    assert _count(metrics, "unwrap", "ok") == 1
    assert _count(metrics, "unwrap", "refused") == 1
    timed = metrics.registry.get_sample_value(
        "secrets_agent_key_operation_seconds_count", {"provider": "hsm", "operation": "unwrap"}
    )
    assert timed == 2
    assert provider.status()["state"] == "ok"  # a refused blob says nothing about the token
    await provider.aclose()
