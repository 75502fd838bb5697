"""Pure parts of the postgres rotator: secret parsing, quoting, SCRAM verifiers, params."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from agent.errors import ConfigError
from agent.rotation.base import RotationFailed
from agent.rotation.pgsql import (
    base_user,
    other_user,
    parse_db_secret,
    quote_ident,
    quote_literal,
    scram_verifier,
    secret_name_of,
)
from agent.rotation.postgres import DEFAULT_ALPHABET, PostgresParams
from agent.types import SecretValue

SECRET_PW = "s3cr3t-Value-never-shown"


def _value(**doc: object) -> SecretValue:
    return SecretValue(json.dumps(doc).encode())


def test_parse_aws_shape_with_defaults_and_string_port() -> None:
    got = parse_db_secret(
        _value(engine="postgres", host="db", port="6432", username="app", password=SECRET_PW),
        what="x",
    )
    assert (got.host, got.port, got.username, got.dbname) == ("db", 6432, "app", "postgres")
    assert got.password == SECRET_PW
    assert SECRET_PW not in repr(got)


def test_parse_admin_reference_from_masterarn_arn_or_admin_secret() -> None:
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/db-admin"
    got = parse_db_secret(_value(host="h", username="u", password="p", masterarn=arn), what="x")
    assert got.admin_secret == "prod/db-admin"
    got = parse_db_secret(_value(host="h", username="u", password="p", admin_secret="a"), what="x")
    assert got.admin_secret == "a"
    assert secret_name_of("plain/name") == "plain/name"


def test_admin_secret_takes_server_fields_from_the_user_secret() -> None:
    doc = _value(host="h", port=7, username="u", password="p", dbname="d")
    user = parse_db_secret(doc, what="u")
    admin = parse_db_secret(_value(username="root", password="rp"), what="a", defaults=user)
    assert (admin.host, admin.port, admin.dbname, admin.username) == ("h", 7, "d", "root")


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"host": "h", "password": SECRET_PW}, "username"),
        ({"host": "h", "username": "u"}, "password"),
        ({"username": "u", "password": SECRET_PW}, "host"),
        ({"host": "h", "username": "u", "password": SECRET_PW, "port": 70000}, "port"),
        ({"host": "h", "username": "u", "password": SECRET_PW, "engine": "mysql"}, "mysql"),
        ({"host": "h", "username": "x" * 64, "password": SECRET_PW}, "role name"),
    ],
)
def test_parse_errors_name_the_field_never_the_password(doc: dict[str, object], field: str) -> None:
    with pytest.raises(RotationFailed) as info:
        parse_db_secret(SecretValue(json.dumps(doc).encode()), what="the CURRENT value")
    assert field in str(info.value)
    assert SECRET_PW not in str(info.value)


@pytest.mark.parametrize("raw", [b"not json " + SECRET_PW.encode(), b"[1]", None])
def test_parse_refuses_non_objects_without_echoing(raw: bytes | None) -> None:
    value = None if raw is None else SecretValue(raw)
    with pytest.raises(RotationFailed) as info:
        parse_db_secret(value, what="v")
    assert SECRET_PW not in str(info.value)


def test_alternate_user_names() -> None:
    assert other_user("app", suffix="_clone") == "app_clone"
    assert other_user("app_clone", suffix="_clone") == "app"
    assert other_user("_clone", suffix="_clone") == "_clone_clone"
    assert base_user("app_clone", suffix="_clone") == "app"
    assert base_user("app", suffix="_clone") == "app"
    with pytest.raises(RotationFailed):
        other_user("a" * 60, suffix="_clone")


def test_quoting() -> None:
    assert quote_ident('we"ird') == '"we""ird"'
    assert quote_literal("it's") == "'it''s'"
    assert quote_literal("a\\b'") == "E'a\\\\b'''"
    with pytest.raises(ValueError):
        quote_ident("a\x00b")
    with pytest.raises(ValueError):
        quote_literal("a\x00b")


def test_scram_verifier_matches_rfc_7677_derivation() -> None:
    salt = bytes(range(16))
    verifier = scram_verifier("pencil", salt=salt, iterations=4096)
    method, rest = verifier.split("$", 1)
    params, keys = rest.split("$")
    iterations, salt_b64 = params.split(":")
    stored_b64, server_b64 = keys.split(":")
    assert method == "SCRAM-SHA-256" and iterations == "4096"
    assert base64.b64decode(salt_b64) == salt
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", salt, 4096)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    assert base64.b64decode(stored_b64) == hashlib.sha256(client_key).digest()
    assert base64.b64decode(server_b64) == hmac.new(salted, b"Server Key", "sha256").digest()
    assert "pencil" not in verifier
    assert scram_verifier("pencil") != scram_verifier("pencil")  # fresh salt each time


@pytest.mark.parametrize("password", ["", "caf\u00e9", "tab\there"])
def test_scram_verifier_refuses_what_saslprep_would_change(password: str) -> None:
    with pytest.raises(ValueError):
        scram_verifier(password)


def test_params_defaults_and_overrides() -> None:
    default = PostgresParams.parse({})
    assert default.strategy == "single-user" and default.alphabet == DEFAULT_ALPHABET
    got = PostgresParams.parse(
        {
            "strategy": "alternating-users",
            "admin_secret": "prod/db-admin",
            "password_length": 40,
            "exclude_characters": "0Ol1",
            "punctuation": True,
            "connect_timeout": "2s",
            "sslmode": "require",
        }
    )
    assert got.connect_timeout == 2.0 and got.password_length == 40
    assert not set("0Ol1") & set(got.alphabet) and "!" in got.alphabet


@pytest.mark.parametrize(
    ("params", "path"),
    [
        ({"strategy": "both"}, "params.strategy"),
        ({"password_length": 8}, "params.password_length"),
        ({"password_length": True}, "params.password_length"),
        ({"sslmode": "maybe"}, "params.sslmode"),
        ({"connect_timeout": "soon"}, "params.connect_timeout"),
        ({"exclude_characters": DEFAULT_ALPHABET[:40]}, "params.exclude_characters"),
        ({"passwrod_length": 20}, "params.passwrod_length"),
    ],
)
def test_bad_params_are_config_errors_naming_the_param(
    params: dict[str, object], path: str
) -> None:
    with pytest.raises(ConfigError) as info:
        PostgresParams.parse(params)
    assert info.value.path == path
