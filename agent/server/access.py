"""Access rules: which callers may read which secret names and stages.

Deny by default. A rule matches names by glob and callers by uid, gid
(primary or supplementary) or token name; it allows the stages it lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from agent.config import AccessRule
from agent.server.peer import Caller
from agent.types import normalize_stage


@dataclass(frozen=True, slots=True)
class Decision:
    """An access decision and, for the audit log, why."""

    allowed: bool
    reason: str


class AccessPolicy:
    """The ``access:`` rules of the config."""

    def __init__(self, rules: Sequence[AccessRule]) -> None:
        self.rules = tuple(rules)

    def _matches_caller(self, rule: AccessRule, caller: Caller) -> bool:
        if caller.listener == "tcp":
            return rule.token is not None and rule.token == caller.token
        if rule.token is not None and not (rule.uids or rule.gids):
            return False
        if caller.uid is None:
            return False
        if not (caller.uid in rule.uids or caller.groups & set(rule.gids)):
            return False
        if rule.exe:
            exe = caller.exe
            return exe is not None and any(fnmatchcase(exe, pat) for pat in rule.exe)
        return True

    def _rules_for(self, caller: Caller, name: str) -> Iterable[tuple[int, AccessRule]]:
        for i, rule in enumerate(self.rules):
            if self._matches_caller(rule, caller) and any(
                fnmatchcase(name, pat) for pat in rule.secrets
            ):
                yield i, rule

    def check(self, caller: Caller, name: str, stages: Iterable[str] | None = None) -> Decision:
        """May ``caller`` read ``name``, at one of ``stages``?

        ``stages=None`` checks the name alone (done before any lookup, so a
        denied read and a missing secret answer alike). A version read by id
        passes the stages that version carries: at least one must be allowed,
        unless a rule allows ``"*"``.
        """
        matched = False
        wanted = set(stages) if stages is not None else None
        for i, rule in self._rules_for(caller, name):
            matched = True
            if wanted is None or "*" in rule.stages:
                return Decision(True, f"access[{i}]")
            if wanted & {normalize_stage(s) for s in rule.stages}:
                return Decision(True, f"access[{i}]")
        if matched:
            return Decision(
                False, f"stages {sorted(wanted or ())} not allowed by any matching rule"
            )
        return Decision(False, "no rule matches this caller and secret")

    def may_list(self, caller: Caller, name: str) -> bool:
        """Whether ``name`` appears in this caller's ``GET /v1/secrets``."""
        return any(True for _ in self._rules_for(caller, name))
