"""What ``GET /v1/status`` shows one caller: only what its access rules let it see.

A caller no rule names gets health only (``ready``): status would otherwise
tell a stranger which secrets exist, where templates write and why they
fail. A granted caller sees the secrets it may list, the templates whose
every secret it may list, and the agent-wide parts (audit, keys). Errors
and file paths shown carry no absolute paths (a template's ``destination``
stays whole: the caller reads that file).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from agent.server.access import AccessPolicy
from agent.server.errors import redact_paths
from agent.server.peer import Caller


def status_for(
    caller: Caller,
    policy: AccessPolicy,
    *,
    ready: bool,
    secrets: Iterable[Mapping[str, Any]],
    parts: Iterable[Callable[[], Mapping[str, Any]]],
) -> dict[str, Any]:
    """The status document for ``caller``.

    Args:
        secrets: per-secret entries (``name``, ``last_error``, ...).
        parts: providers of further top-level sections; a list whose entries
            name a ``secret`` or ``secrets`` is filtered entry by entry.
    """
    doc: dict[str, Any] = {"ready": ready}
    if not policy.has_grant(caller):
        return doc

    def visible(names: Iterable[str]) -> bool:
        return all(policy.may_list(caller, n) for n in names)

    doc["secrets"] = [
        {**s, "last_error": _clean(s.get("last_error"))} for s in secrets if visible([s["name"]])
    ]
    for part in parts:
        for key, value in part().items():
            doc[key] = _scrub(_filter(value, visible))
    return doc


#: Keys whose string values are cut to their last path component.
_PATH_KEYS = frozenset({"error", "last_error", "path"})


def _scrub(value: Any, key: str | None = None) -> Any:
    if isinstance(value, str):
        return redact_paths(value) if key in _PATH_KEYS else value
    if isinstance(value, Mapping):
        return {k: _scrub(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, key) for v in value]
    return value


def _names_of(entry: Mapping[str, Any]) -> list[str] | None:
    if "secrets" in entry and isinstance(entry["secrets"], list):
        return [str(n) for n in entry["secrets"]]
    if "secret" in entry and isinstance(entry["secret"], str):
        return [entry["secret"]]
    return None


def _filter(value: Any, visible: Callable[[Iterable[str]], bool]) -> Any:
    if not isinstance(value, list):
        return value
    out = []
    for entry in value:
        names = _names_of(entry) if isinstance(entry, Mapping) else None
        if names is None or visible(names):
            out.append(entry)
    return out


def _clean(error: Any) -> Any:
    return redact_paths(error) if isinstance(error, str) else error
