"""PostgreSQL helpers for the ``postgres`` rotator: pure functions, no driver.

* The database secret: JSON in the shape AWS Secrets Manager uses for
  database credentials (``engine``, ``host``, ``port``, ``username``,
  ``password``, ``dbname``; ``masterarn`` or our ``admin_secret`` naming the
  secret with admin credentials), parsed into :class:`DbSecret`.
* SQL quoting of identifiers and string literals (``ALTER ROLE`` takes no bind
  parameters, so the role name and the password verifier are quoted into it).
* SCRAM-SHA-256 verifiers computed client-side (RFC 5802/7677, the format of
  ``pg_authid.rolpassword``), so the plaintext password never reaches the
  server, its statement log or ``pg_stat_statements``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.rotation.base import RotationFailed
from agent.types import SecretValue

#: PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes.
MAX_IDENTIFIER_BYTES = 63
#: The ``engine`` values of a PostgreSQL database secret (AWS writes ``postgres``).
ENGINES = ("postgres", "postgresql", "aurora-postgresql")
#: PostgreSQL's default ``scram_iterations``.
SCRAM_ITERATIONS = 4096
_ARN_SECRET = re.compile(r"arn:aws[a-z-]*:secretsmanager:[a-z0-9-]*:[0-9]*:secret:(.+)")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]+")


@dataclass(frozen=True, slots=True)
class DbSecret:
    """One set of database credentials; ``doc`` is the whole JSON object, kept as is.

    ``repr`` never shows the password or the document.
    """

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    dbname: str
    admin_secret: str | None = None
    doc: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def with_login(self, *, username: str, password: str) -> DbSecret:
        """A copy with other credentials (same server); ``doc`` is updated too."""
        doc = {**self.doc, "username": username, "password": password}
        return DbSecret(
            self.host, self.port, username, password, self.dbname, self.admin_secret, doc
        )

    def to_json(self) -> bytes:
        """The secret's value: ``doc`` with every field the rotator did not change kept."""
        return json.dumps(dict(self.doc)).encode()


def parse_db_secret(
    value: SecretValue | None, *, what: str, defaults: DbSecret | None = None
) -> DbSecret:
    """Read a database secret; with ``defaults``, only the credentials are required.

    Args:
        value: the secret's value (JSON object).
        what: how to name it in an error (``"the CURRENT value of 'prod/db'"``).
        defaults: host, port and dbname to use when the value has none (the
            admin secret may hold only a username and password).

    Raises:
        RotationFailed: not a JSON object, or a field is missing or of the wrong
            type. The message names the field, never a value.
    """
    if value is None:
        raise RotationFailed(f"{what} is missing: the postgres rotator needs a database secret")
    try:
        doc = json.loads(value.reveal())
    except (ValueError, UnicodeDecodeError):
        raise RotationFailed(f"{what} is not JSON (expected a database secret)") from None
    if not isinstance(doc, dict):
        raise RotationFailed(f"{what} is not a JSON object (expected a database secret)")
    engine = doc.get("engine")
    if engine is not None and engine not in ENGINES:
        raise RotationFailed(f"{what}: engine {engine!r} is not PostgreSQL")
    username = _text(doc, "username", what)
    check_role_name(username, what=what)
    password = _text(doc, "password", what, allow_empty=True)
    host = _text(doc, "host", what) if defaults is None or "host" in doc else defaults.host
    dbname = doc.get("dbname", defaults.dbname if defaults else "postgres")
    if not isinstance(dbname, str) or not dbname:
        raise RotationFailed(f"{what}: field 'dbname' must be a non-empty string")
    admin = doc.get("admin_secret", doc.get("masterarn"))
    if admin is not None and (not isinstance(admin, str) or not admin):
        raise RotationFailed(f"{what}: field 'admin_secret' must be a secret name")
    return DbSecret(
        host=host,
        port=_port(doc, what, default=defaults.port if defaults else 5432),
        username=username,
        password=password,
        dbname=dbname,
        admin_secret=secret_name_of(admin) if admin else None,
        doc=doc,
    )


def _text(doc: Mapping[str, Any], key: str, what: str, *, allow_empty: bool = False) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or (not value and not allow_empty):
        raise RotationFailed(f"{what}: field {key!r} must be a non-empty string")
    return value


def _port(doc: Mapping[str, Any], what: str, *, default: int) -> int:
    raw = doc.get("port", default)
    # AWS secrets carry the port as a number or as a string of digits.
    if isinstance(raw, str) and raw.isdigit():
        raw = int(raw)
    if not isinstance(raw, int) or isinstance(raw, bool) or not 0 < raw < 65536:
        raise RotationFailed(f"{what}: field 'port' must be a TCP port number")
    return raw


def secret_name_of(ref: str) -> str:
    """The secret name in an admin-secret reference: a name, or an ARN holding one."""
    m = _ARN_SECRET.fullmatch(ref)
    return m.group(1) if m else ref


def check_role_name(name: str, *, what: str) -> str:
    """Return ``name`` if PostgreSQL keeps it as is (no NUL, at most 63 bytes)."""
    if not name or "\x00" in name or len(name.encode()) > MAX_IDENTIFIER_BYTES:
        raise RotationFailed(
            f"{what}: role name {name!r} must be 1-{MAX_IDENTIFIER_BYTES} bytes without NUL"
        )
    return name


def other_user(username: str, *, suffix: str) -> str:
    """The alternate of ``username``: ``app`` <-> ``app<suffix>``."""
    if username.endswith(suffix) and len(username) > len(suffix):
        return username[: -len(suffix)]
    return check_role_name(username + suffix, what="the alternate user")


def base_user(username: str, *, suffix: str) -> str:
    """The role both alternating users act as: the name without ``suffix``."""
    if username.endswith(suffix) and len(username) > len(suffix):
        return username[: -len(suffix)]
    return username


def quote_ident(name: str) -> str:
    """``name`` as a double-quoted SQL identifier."""
    if "\x00" in name:
        raise ValueError("identifier contains NUL")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """``text`` as a SQL string literal, correct whatever ``standard_conforming_strings`` is."""
    if "\x00" in text:
        raise ValueError("literal contains NUL")
    quoted = "'" + text.replace("'", "''") + "'"
    if "\\" in text:
        return "E" + quoted.replace("\\", "\\\\")
    return quoted


def scram_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password``.

    ``ALTER ROLE ... PASSWORD '<verifier>'`` stores it unchanged, so the server
    never sees the plaintext. Only printable ASCII passwords are accepted: for
    them SASLprep (which the server applies at login) is the identity.

    Raises:
        ValueError: the password is empty or not printable ASCII.
    """
    if not _PRINTABLE_ASCII.fullmatch(password):
        raise ValueError("the password must be non-empty printable ASCII")
    salt = secrets.token_bytes(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    b64 = base64.b64encode
    return (
        f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}"
        f"${b64(stored_key).decode()}:{b64(server_key).decode()}"
    )


def new_password(length: int, alphabet: str) -> str:
    """A random password of ``length`` characters drawn from ``alphabet``."""
    return "".join(secrets.choice(alphabet) for _ in range(length))
