"""The directory store's blocking file operations, run in worker threads by
:class:`agent.stores.file.FileStore` (its layout and guarantees are described there).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ParamSpec, TypeVar

from agent.bounded import Limits, TooLarge, loads_json
from agent.crypto.stageproof import PROOF_KEY
from agent.errors import (
    AccessDenied,
    AgentError,
    BackendUnavailable,
    BadRequest,
    Conflict,
    DecryptionError,
    InvalidName,
    MalformedStoreData,
    SecretNotFound,
    VersionNotFound,
)
from agent.fsutil import (
    FileLock,
    atomic_write,
    create_exclusive,
    explain_denied,
    is_temp_name,
    make_dirs,
    read_nofollow,
)
from agent.stores.base import (
    StageState,
    StoredVersion,
    check_store_name,
)
from agent.types import validate_version_id

#: Name segments that would collide with the on-disk layout.
RESERVED_SEGMENTS = frozenset({"versions", "stages.json", ".lock"})

_FILE_MODE = 0o600
_DIR_MODE = 0o700
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_P = ParamSpec("_P")
_T = TypeVar("_T")


def check_name(name: str) -> str:
    """Validate ``name`` as a secret name this store can lay out on disk."""
    check_store_name(name, store="file", reserved=RESERVED_SEGMENTS)
    for segment in name.split("/"):
        if is_temp_name(segment):
            raise InvalidName(
                f"invalid secret name: the segment {segment!r} is reserved by the file store "
                "layout (versions, stages.json, .lock and .*.tmp)"
            )
    return name


@dataclass(frozen=True, slots=True)
class _Paths:
    """Where one secret lives on disk (its directory as text: Path objects are
    made only when used; pathlib was 60% of a read's cost, profiled at 10k)."""

    directory: str
    exists: bool  # whether versions/ exists, i.e. the secret does

    @property
    def versions(self) -> Path:
        return Path(f"{self.directory}/versions")

    @property
    def stages(self) -> Path:
        return Path(f"{self.directory}/stages.json")

    @property
    def lock(self) -> Path:
        return Path(f"{self.directory}/.lock")

    def version(self, version_id: str) -> Path:
        return Path(f"{self.directory}/versions/{version_id}.json")


class DiskOps:
    """The synchronous half of the file store: paths, reads, writes, stage moves."""

    root: Path
    limits: Limits
    _secrets: Path

    def _paths(self, name: str) -> _Paths:
        """The paths of ``name``, after checking that no directory on the way is a symlink.

        One lstat per existing directory below ``secrets/`` (cheaper than two
        realpath calls, which lstat every component from ``/``).
        """
        directory = os.fspath(self._secrets)
        secret_dir = f"{directory}/{name}"
        for segment in (*name.split("/"), "versions"):
            directory = f"{directory}/{segment}"
            try:
                mode = os.lstat(directory).st_mode
            except FileNotFoundError:
                return _Paths(secret_dir, exists=False)
            except OSError as exc:
                raise self._os_error(exc, f"secret {name!r}", Path(directory)) from None
            if stat.S_ISLNK(mode):
                raise AccessDenied(
                    f"secret {name!r}: {directory} is a symlink; the file "
                    "store does not follow symlinks"
                )
            if not stat.S_ISDIR(mode):
                raise BackendUnavailable(f"secret {name!r}: {directory} is not a directory")
        return _Paths(secret_dir, exists=True)

    def _existing(self, name: str) -> _Paths:
        """The paths of ``name``, which must exist as a secret (``versions/`` present)."""
        paths = self._paths(name)
        if not paths.exists:
            self._check_root(f"secret {name!r}")
            raise SecretNotFound(f"secret {name!r} does not exist")
        return paths

    def _check_root(self, what: str) -> None:
        """BackendUnavailable unless the root exists: a missing root is an outage, not "empty"."""
        try:
            is_dir = stat.S_ISDIR(self.root.stat().st_mode)
        except OSError as exc:
            raise self._os_error(exc, what, self.root) from None
        if not is_dir:
            raise BackendUnavailable(f"{what}: the store root {self.root} is not a directory")

    def _os_error(self, exc: OSError, what: str, path: Path) -> AgentError:
        """Translate an OSError from the store's own files into a domain error."""
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        if exc.errno == errno.ENOENT and path == self.root:
            return BackendUnavailable(
                f"{what}: the store directory {self.root} does not exist "
                "(not mounted, moved away, or not initialised yet)"
            )
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = (
                f"chown -R {os.geteuid()}:{os.getegid()} {self.root} (a file store belongs to "
                "the uid that writes it), or run this as the store's owner"
            )
            hint = explain_denied(path, write=False, fix=fix)
            if hint.startswith("the agent runs as"):  # readable: so writing was refused
                where = path if os.path.isdir(path) else path.parent
                hint = explain_denied(where, write=True, fix=fix)
            return BackendUnavailable(f"{what}: permission denied on {path} ({code}): {hint}")
        if exc.errno == errno.ELOOP:
            return AccessDenied(f"{what}: {path} is a symlink; the file store does not follow it")
        return BackendUnavailable(f"{what}: {code} on {path}")

    def _list_names(self) -> list[str]:
        todo, names = self._walk_start()
        while not self._walk_some(todo, names, budget=1 << 30):
            pass
        return sorted(names)

    def _walk_start(self) -> tuple[list[tuple[str, str]], list[str]]:
        """The state of a listing walk: directories to read (path, name prefix), names."""
        return [(os.fspath(self._secrets), "")], []

    def _walk_some(self, todo: list[tuple[str, str]], names: list[str], *, budget: int) -> bool:
        """Read up to ``budget`` directories of a listing walk; True when it is done.

        Iterative, so an async caller can walk a slice at a time and yield.

        Raises:
            BackendUnavailable: the store root is missing or unreadable.
        """
        while todo and budget > 0:
            budget -= 1
            directory, prefix = todo.pop()
            try:
                with os.scandir(directory) as entries:
                    subdirs = [e for e in entries if e.is_dir(follow_symlinks=False)]
            except FileNotFoundError:
                if prefix:
                    continue  # removed while we walked: it holds no secret any more
                self._check_root("listing secrets")
                return True  # the root exists but nothing was written yet
            except OSError as exc:
                raise self._os_error(exc, "listing secrets", Path(directory)) from None
            for entry in subdirs:
                if entry.name == "versions":
                    if prefix and _is_listable(prefix[:-1]):
                        names.append(prefix[:-1])
                elif not is_temp_name(entry.name):
                    todo.append((entry.path, f"{prefix}{entry.name}/"))
        return not todo

    def _walk(self, directory: Path, prefix: str, names: list[str], *, top: bool = False) -> None:
        """Append the secret names under ``directory`` (whose name prefix is ``prefix``)."""
        try:
            with os.scandir(directory) as entries:
                subdirs = [e for e in entries if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            if top:
                raise
            return  # removed while we walked: it holds no secret any more
        for entry in subdirs:
            if entry.name == "versions":
                if prefix and _is_listable(prefix[:-1]):
                    names.append(prefix[:-1])
            elif not is_temp_name(entry.name):
                self._walk(Path(entry.path), f"{prefix}{entry.name}/", names)

    def _read_stages(self, name: str) -> StageState:
        path = f"{self._existing(name).directory}/stages.json"
        what = f"stage map of secret {name!r} ({path})"
        found = self._read_file(path, what, MalformedStoreData)
        if found is None:
            return StageState({}, "")
        data, st = found
        stages = _parse_stages(data, what, self.limits)
        proof = stages.pop(PROOF_KEY, None)
        return StageState(stages, _revision(data), proof, _marker(st))

    def _read_file(
        self, path: str, what: str, too_large: type[AgentError]
    ) -> tuple[bytes, os.stat_result] | None:
        """The bytes and stat of ``path``, or None if it does not exist.

        Raises:
            too_large: the file is over ``store.max_object_size`` (it is not read).
        """
        try:
            return read_nofollow(path, limit=self.limits.max_object_size)
        except FileNotFoundError:
            return None
        except TooLarge as exc:
            raise too_large(f"{what}: {exc} (store.max_object_size); refused") from None
        except OSError as exc:
            raise self._os_error(exc, what, Path(path)) from None

    def _read_version(self, name: str, version_id: str) -> StoredVersion:
        path = f"{self._existing(name).directory}/versions/{version_id}.json"
        what = f"version {version_id!r} of secret {name!r}"
        found = self._read_file(path, what, DecryptionError)
        if found is None:
            raise VersionNotFound(f"{what} does not exist")
        return StoredVersion(name, version_id, found[0], _utc(found[1].st_mtime_ns))

    def _list_versions(self, name: str) -> list[tuple[str, datetime]]:
        paths = self._existing(name)
        found: list[tuple[int, str]] = []
        try:
            with os.scandir(paths.versions) as entries:
                for entry in entries:
                    version_id = _version_id_of(entry.name)
                    if version_id and entry.is_file(follow_symlinks=False):
                        found.append((entry.stat(follow_symlinks=False).st_mtime_ns, version_id))
        except OSError as exc:
            raise self._os_error(exc, f"versions of secret {name!r}", paths.versions) from None
        return [(version_id, _utc(mtime)) for mtime, version_id in sorted(found)]

    def _write_version(
        self, name: str, version_id: str, envelope: bytes, sync: bool = True
    ) -> None:
        paths = self._paths(name)
        what = f"version {version_id!r} of secret {name!r}"
        path = paths.version(version_id)
        # Kernel file timestamps tick per jiffy (1-10 ms), so versions written in
        # quick succession would tie; stamp the fine-grained clock instead, which
        # keeps created_at (and list_versions' order) faithful.
        now = time.time_ns()
        if not paths.exists:
            self._check_root(what)  # never recreate a store that was moved away
        try:
            make_dirs(paths.versions, mode=_DIR_MODE)
            create_exclusive(path, envelope, mode=_FILE_MODE, times_ns=(now, now), sync=sync)
        except FileExistsError:
            raise Conflict(f"{what} already exists; versions are immutable") from None
        except OSError as exc:
            raise self._os_error(exc, what, path) from None

    def _replace_envelope(
        self, name: str, version_id: str, envelope: bytes, expected: bytes
    ) -> None:
        paths = self._existing(name)
        path = paths.version(version_id)
        what = f"version {version_id!r} of secret {name!r}"
        try:
            with FileLock(paths.lock, mode=_FILE_MODE):
                found = self._read_file(os.fspath(path), what, DecryptionError)
                if found is None:
                    raise VersionNotFound(f"{what} does not exist")
                if found[0] != expected:
                    raise Conflict(
                        f"the envelope of {what} changed concurrently; nothing was written"
                    )
                # Keep the mtime: it is the version's created_at.
                times = (found[1].st_atime_ns, found[1].st_mtime_ns)
                atomic_write(path, envelope, mode=_FILE_MODE, times_ns=times)
        except OSError as exc:
            raise self._os_error(exc, what, path) from None

    def _set_stages(
        self,
        name: str,
        stages: dict[str, str],
        expected_revision: str,
        proof: str | None,
        sync: bool = True,
    ) -> StageState:
        paths = self._existing(name)
        what = f"stage map of secret {name!r}"
        try:
            with FileLock(paths.lock, mode=_FILE_MODE):
                found = self._read_stages(name).revision
                if found != expected_revision:
                    raise Conflict(
                        f"{what} changed concurrently (expected revision "
                        f"{expected_revision!r}, found {found!r}); nothing was written"
                    )
                for stage, version_id in stages.items():
                    if not _is_regular(paths.version(version_id)):
                        raise VersionNotFound(
                            f"stage {stage} of secret {name!r} points at "
                            f"version {version_id!r}, which does not exist"
                        )
                doc = {**stages, PROOF_KEY: proof} if proof is not None else stages
                data = json.dumps(doc, sort_keys=True).encode() + b"\n"
                # Unsynced only for a secret's first map (a bulk import, synced as
                # a batch): replacing a map in service is always synced.
                atomic_write(paths.stages, data, mode=_FILE_MODE, sync=sync or found != "")
                return StageState(stages, _revision(data), proof)
        except OSError as exc:
            raise self._os_error(exc, what, paths.stages) from None

    def _delete_version(self, name: str, version_id: str) -> None:
        paths = self._existing(name)
        path = paths.version(version_id)
        what = f"version {version_id!r} of secret {name!r}"
        try:
            with FileLock(paths.lock, mode=_FILE_MODE):
                if version_id in self._read_stages(name).stages.values():
                    raise Conflict(f"{what} is staged; not deleted")
                os.unlink(path)
        except FileNotFoundError:
            raise VersionNotFound(f"{what} does not exist") from None
        except OSError as exc:
            raise self._os_error(exc, what, path) from None


def _parse_stages(data: bytes, what: str, limits: Limits) -> dict[str, str]:
    # Transient on purpose (MalformedStoreData): cached values keep being served
    # until it is fixed.
    doc = loads_json(data, what=what, error=MalformedStoreData, limits=limits)
    if not isinstance(doc, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in doc.items()
    ):
        raise MalformedStoreData(
            f"{what} is not a JSON object of stage -> version id; fix or remove the file"
        )
    return doc


def _revision(data: bytes) -> str:
    # A content hash, not the mtime: mtimes tick too coarsely to tell two
    # quick writes apart, and a hash also survives copies between hosts.
    return hashlib.sha256(data).hexdigest()[:32]


def _marker(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


def _utc(mtime_ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=mtime_ns // 1000)


def _version_id_of(filename: str) -> str | None:
    if not filename.endswith(".json") or is_temp_name(filename):
        return None
    try:
        return validate_version_id(filename[: -len(".json")])
    except BadRequest:
        return None


def _is_listable(name: str) -> bool:
    try:
        check_name(name)
    except InvalidName:
        return False
    return True


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat(follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
    return st.st_dev, st.st_ino
