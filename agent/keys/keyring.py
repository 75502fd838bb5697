"""The keyring file behind the local key provider: versioned master keys on disk.

Keyring file (JSON, mode 0600, always written atomically)::

    {"format": "secrets-agent/keyring", "v": 1,
     "keys": {"master": {"primary": 2,
                         "versions": {"1": {"created_at": "...", "material": "<b64, 32 bytes>"},
                                      "2": {"created_at": "...", "material": "..."}}}}}

Sealed with a passphrase, ``keys`` is replaced by ``sealed``: ``{"kdf": "scrypt",
"salt", "n", "r", "p", "alg": "AES-256-GCM", "nonce", "ciphertext"}``, where the
ciphertext is AES-256-GCM (key = scrypt(passphrase)) over the canonical JSON of
the ``keys`` object, and the AAD is the canonical JSON of every other field but
``nonce`` and ``ciphertext``. A keyring is refused if group or others may read
or write it, if it is sealed and no passphrase is configured, or if it is *not*
sealed while a passphrase is configured (a swapped-in plain keyring would
otherwise be accepted).

Changes (``create``, ``rotate``, ``create_key``) hold an ``flock`` on the
keyring's directory and re-read the file first, so two writers never lose a
key version: a lost version would make every data key it wrapped unreadable.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from agent.bounded import MAX_JSON_DEPTH, Limits, loads_json
from agent.crypto.envelope import canonical_json
from agent.errors import ConfigError
from agent.fsowner import explain_denied

FORMAT: Final = "secrets-agent/keyring"
KEYRING_VERSION: Final = 1
KEY_SIZE: Final = 32
#: How new keyrings are sealed (about 80 ms of scrypt on a laptop).
SEALING: Final = {"kdf": "scrypt", "n": 2**15, "r": 8, "p": 1, "alg": "AES-256-GCM"}
_NONCE_SIZE: Final = 12
_MAX_FILE_SIZE: Final = 1 << 20
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_VERSION_RE: Final = re.compile(r"[1-9][0-9]{0,9}")
_SEALED_FIELDS: Final = frozenset({*SEALING, "salt", "nonce", "ciphertext"})
_SCRYPT_N: Final = frozenset(2**k for k in range(14, 19))  # at most 256 MiB

#: (st_ino, st_size, st_mtime_ns, st_ctime_ns): tells a changed keyring file apart.
Signature = tuple[int, int, int, int]
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class KeyVersion:
    """One version of a master key; the material never appears in the repr."""

    version: int
    created_at: str
    material: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class MasterKey:
    """A named master key: its versions and which one wraps new data keys."""

    name: str
    primary: int
    versions: Mapping[int, KeyVersion]

    def current(self) -> KeyVersion:
        return self.versions[self.primary]


class LocalKeyring:
    """A keyring file loaded into memory; changes are written back atomically."""

    def __init__(
        self,
        path: Path,
        keys: Mapping[str, MasterKey],
        *,
        passphrase: bytes | None,
        signature: Signature,
    ) -> None:
        self.path = path
        self.keys: Mapping[str, MasterKey] = dict(keys)
        self.signature = signature
        self._passphrase = passphrase

    @classmethod
    def create(
        cls, path: Path, *, passphrase: bytes | None = None, key_name: str = "master"
    ) -> LocalKeyring:
        """Write a new keyring holding one fresh key; never overwrites a file.

        Raises:
            ConfigError: the file exists, the name is invalid, or it cannot be written.
        """
        path = Path(path)
        _check_name(key_name)
        keys = {key_name: MasterKey(key_name, 1, {1: _new_version(1)})}
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _dir_lock(path):
            if path.exists() or path.is_symlink():
                raise ConfigError(f"keyring {path} already exists; refusing to overwrite it")
            signature = _write_atomic(path, _encode(keys, passphrase))
        return cls(path, keys, passphrase=passphrase, signature=signature)

    @classmethod
    def load(cls, path: Path, *, passphrase: bytes | None = None) -> LocalKeyring:
        """Read a keyring.

        Raises:
            ConfigError: missing, unreadable, too open (mode), malformed, sealed
                without a passphrase, or the passphrase is wrong.
        """
        path = Path(path)
        raw, signature = _read(path)
        return cls(path, _decode(path, raw, passphrase), passphrase=passphrase, signature=signature)

    def rotate(self, key_name: str = "master") -> KeyVersion:
        """Add a new version of ``key_name`` and make it primary (written atomically)."""

        def change(keys: dict[str, MasterKey]) -> KeyVersion:
            key = keys.get(key_name)
            if key is None:
                raise ConfigError(
                    f"keyring {self.path} has no key {key_name!r}; "
                    "create it with `secrets-agent keys create`"
                )
            new = _new_version(max(key.versions) + 1)
            keys[key_name] = MasterKey(key_name, new.version, {**key.versions, new.version: new})
            return new

        return self._update(change)

    def create_key(self, name: str) -> MasterKey:
        """Add master key ``name`` if the keyring lacks it; return the key either way."""
        _check_name(name)

        def change(keys: dict[str, MasterKey]) -> MasterKey:
            if name not in keys:
                keys[name] = MasterKey(name, 1, {1: _new_version(1)})
            return keys[name]

        return self._update(change)

    def _update(self, change: Callable[[dict[str, MasterKey]], _T]) -> _T:
        # Re-read under the lock: this copy may be stale, and writing it back
        # would drop a version another process added.
        with _dir_lock(self.path):
            fresh = LocalKeyring.load(self.path, passphrase=self._passphrase)
            keys = dict(fresh.keys)
            result = change(keys)
            signature = fresh.signature
            if keys != fresh.keys:
                signature = _write_atomic(self.path, _encode(keys, self._passphrase))
        self.keys, self.signature = keys, signature
        return result


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"invalid master key name {name!r}: use 1-64 of A-Za-z0-9_.-")


def _new_version(version: int) -> KeyVersion:
    if version >= 2**32:
        raise ConfigError("a master key cannot have more than 2**32-1 versions")
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return KeyVersion(version, created, os.urandom(KEY_SIZE))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _malformed(path: Path, why: str) -> ConfigError:
    return ConfigError(f"keyring {path} is malformed: {why}")


def _unb64(path: Path, value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise _malformed(path, f"{what} is not a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise _malformed(path, f"{what} is not base64") from None


def _signature(st: os.stat_result) -> Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def stat_signature(path: Path) -> Signature | None:
    """The signature of the file now at ``path``, or None if it cannot be stat'ed."""
    try:
        return _signature(path.stat())
    except OSError:
        return None


def _read(path: Path) -> tuple[bytes, Signature]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(
            f"keyring {path} does not exist; create it with "
            "`secrets-agent init` or `secrets-agent keys create`"
        ) from None
    except PermissionError as exc:
        hint = explain_denied(path, write=False)
        raise ConfigError(f"cannot open keyring {path}: {exc.strerror}: {hint}") from None
    except OSError as exc:
        raise ConfigError(f"cannot open keyring {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())  # of the file we read, not of whatever the path is now
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"keyring {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"keyring {path} has mode {mode:04o}, which lets group or others "
                f"read or write it; fix it with: chmod 600 {path}"
            )
        data = f.read(_MAX_FILE_SIZE + 1)
    if len(data) > _MAX_FILE_SIZE:
        raise _malformed(path, "larger than 1 MiB")
    return data, _signature(st)


@contextlib.contextmanager
def _dir_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the keyring's directory (the file itself is replaced)."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> Signature:
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # the umask could have taken bits off 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            st = os.fstat(f.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    # A rename updates ctime; everything else is as the fd saw it.
    return (st.st_ino, st.st_size, st.st_mtime_ns, path.stat().st_ctime_ns)


def _encode(keys: Mapping[str, MasterKey], passphrase: bytes | None) -> bytes:
    keys_doc = {
        name: {
            "primary": key.primary,
            "versions": {
                str(n): {"created_at": v.created_at, "material": _b64(v.material)}
                for n, v in sorted(key.versions.items())
            },
        }
        for name, key in sorted(keys.items())
    }
    doc: dict[str, Any] = {"format": FORMAT, "v": KEYRING_VERSION}
    if passphrase is None:
        doc["keys"] = keys_doc
    else:
        doc["sealed"] = _seal(canonical_json(keys_doc), passphrase)
    return json.dumps(doc, indent=1).encode() + b"\n"


def _decode(path: Path, raw: bytes, passphrase: bytes | None) -> dict[str, MasterKey]:
    doc = loads_json(
        raw,
        what=f"keyring {path} is malformed",
        error=ConfigError,
        limits=Limits(_MAX_FILE_SIZE, MAX_JSON_DEPTH),
    )
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _malformed(path, f"'format' is not {FORMAT!r}")
    if doc.get("v") != KEYRING_VERSION or type(doc.get("v")) is not int:
        raise ConfigError(
            f"keyring {path} has format version {doc.get('v')!r}; this agent reads version 1"
        )
    if set(doc) == {"format", "v", "sealed"}:
        if passphrase is None:
            raise ConfigError(
                f"keyring {path} is sealed with a passphrase; set the key "
                "provider's 'passphrase' (env:VAR or file:PATH)"
            )
        return _keys_from_json(path, _load_json(path, _unseal(path, doc["sealed"], passphrase)))
    if set(doc) != {"format", "v", "keys"}:
        raise _malformed(path, "expected the fields format, v, and keys or sealed")
    if passphrase is not None:
        raise ConfigError(
            f"keyring {path} is not sealed but a passphrase is configured; "
            "refusing it (was it replaced?)"
        )
    return _keys_from_json(path, doc["keys"])


def _load_json(path: Path, data: bytes) -> Any:
    return loads_json(
        data,
        what=f"keyring {path} is malformed: the sealed keys",
        error=ConfigError,
        limits=Limits(_MAX_FILE_SIZE, MAX_JSON_DEPTH),
    )


def _keys_from_json(path: Path, obj: Any) -> dict[str, MasterKey]:
    if not isinstance(obj, dict):
        raise _malformed(path, "'keys' is not an object")
    keys: dict[str, MasterKey] = {}
    for name, doc in obj.items():
        if not _NAME_RE.fullmatch(name):
            raise _malformed(path, f"invalid key name {name!r}")
        if not isinstance(doc, dict) or set(doc) != {"primary", "versions"}:
            raise _malformed(path, f"key {name!r} needs exactly 'primary' and 'versions'")
        if not isinstance(doc["versions"], dict) or type(doc["primary"]) is not int:
            raise _malformed(path, f"key {name!r}: bad 'primary' or 'versions'")
        versions = {}
        for text, v in doc["versions"].items():
            versions[_version_number(path, name, text)] = _key_version(path, name, text, v)
        if doc["primary"] not in versions:
            raise _malformed(path, f"key {name!r}: primary version {doc['primary']} is missing")
        keys[name] = MasterKey(name, doc["primary"], versions)
    return keys


def _version_number(path: Path, name: str, text: str) -> int:
    if not _VERSION_RE.fullmatch(text) or int(text) >= 2**32:
        raise _malformed(path, f"key {name!r}: invalid version {text!r}")
    return int(text)


def _key_version(path: Path, name: str, text: str, doc: Any) -> KeyVersion:
    what = f"key {name!r} version {text}"
    if not isinstance(doc, dict) or set(doc) != {"created_at", "material"}:
        raise _malformed(path, f"{what} needs exactly 'created_at' and 'material'")
    material = _unb64(path, doc["material"], f"{what} material")
    if len(material) != KEY_SIZE or not isinstance(doc["created_at"], str):
        raise _malformed(path, f"{what}: material must be {KEY_SIZE} bytes")
    return KeyVersion(int(text), doc["created_at"], material)


def _kdf(passphrase: bytes, salt: bytes, params: Mapping[str, Any]) -> bytes:
    n, r, p = params["n"], params["r"], params["p"]
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def _seal(plaintext: bytes, passphrase: bytes) -> dict[str, Any]:
    salt, nonce = os.urandom(16), os.urandom(_NONCE_SIZE)
    header = {**SEALING, "salt": _b64(salt)}
    aad = canonical_json({"format": FORMAT, "v": KEYRING_VERSION, **header})
    kek = _kdf(passphrase, salt, header)
    ciphertext = AESGCM(kek).encrypt(nonce, plaintext, aad)
    return {**header, "nonce": _b64(nonce), "ciphertext": _b64(ciphertext)}


def _unseal(path: Path, sealed: Any, passphrase: bytes) -> bytes:
    if not isinstance(sealed, dict) or set(sealed) != _SEALED_FIELDS:
        raise _malformed(path, f"'sealed' needs exactly the fields {sorted(_SEALED_FIELDS)}")
    if sealed["kdf"] != SEALING["kdf"] or sealed["alg"] != SEALING["alg"]:
        raise ConfigError(f"keyring {path} is sealed with an unsupported kdf or algorithm")
    # Bounds keep a corrupt header from asking scrypt for gigabytes or no work at all.
    n, r, p = sealed["n"], sealed["r"], sealed["p"]
    if not (type(n) is type(r) is type(p) is int and n in _SCRYPT_N and (r, p) == (8, 1)):
        raise _malformed(path, "scrypt parameters out of range")
    salt = _unb64(path, sealed["salt"], "salt")
    nonce = _unb64(path, sealed["nonce"], "nonce")
    ciphertext = _unb64(path, sealed["ciphertext"], "ciphertext")
    header = {k: sealed[k] for k in _SEALED_FIELDS - {"nonce", "ciphertext"}}
    aad = canonical_json({"format": FORMAT, "v": KEYRING_VERSION, **header})
    if len(nonce) != _NONCE_SIZE:
        raise _malformed(path, "nonce must be 12 bytes")
    try:
        return AESGCM(_kdf(passphrase, salt, sealed)).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise ConfigError(
            f"keyring {path}: wrong passphrase, or the sealed keyring was altered"
        ) from None
