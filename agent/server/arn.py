"""Secret ARNs on the AWS-compatible routes: the ones we answer with, the ones we accept.

Secrets Manager's ``SecretId`` is a name, a full ARN or a partial ARN
(GetSecretValue, "SecretId" in the API reference):

* full: ``arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/db-AbCdEf``,
  the name followed by ``-`` and six random characters;
* partial: the same without ``-AbCdEf``.

Answers carry the store's real ARN where it has one (the AWS Secrets Manager
store learns it from DescribeSecret and GetSecretValue) and otherwise a
synthetic one, stable for a name and region::

    arn:aws:secretsmanager:<region>:000000000000:secret:<name>-<suffix>

where ``<suffix>`` is six characters of ``A-Za-z0-9`` derived from a SHA-256 of
the name, so code that strips the last seven characters of an ARN's name part
(as for real ARNs) finds the name.

A full ARN must equal the secret's ARN, real or synthetic. A partial ARN
must be the secret's real ARN without its suffix; on stores without real ARNs
only its name part is used (region and account are not checked: there is no
account to check them against).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

ACCOUNT = "000000000000"
_ARN_RE = re.compile(
    r"arn:(?P<partition>aws[a-z-]*):secretsmanager:(?P<region>[a-z0-9-]*):"
    r"(?P<account>[0-9]*):secret:(?P<name>.+)"
)
_SUFFIX_RE = re.compile(r"(?P<stem>.+)-(?P<suffix>[A-Za-z0-9]{6})")
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


@runtime_checkable
class ArnSource(Protocol):
    """A store that knows its secrets' real ARNs."""

    def known_arn(self, name: str) -> str | None:
        """The real ARN of ``name``, if the store has seen it."""
        ...

    def name_for(self, aws_name: str) -> str | None:
        """Our name for the store-side name in an ARN, or None if it is not ours."""
        ...


def synthetic_suffix(name: str) -> str:
    """Six characters of ``A-Za-z0-9`` that stand for ``name`` (stable across runs)."""
    n = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    out = []
    for _ in range(6):
        n, i = divmod(n, len(_ALPHABET))
        out.append(_ALPHABET[i])
    return "".join(out)


def synthetic_arn(name: str, *, region: str) -> str:
    """The ARN answered for ``name`` on a store that has no real ARNs."""
    return f"arn:aws:secretsmanager:{region}:{ACCOUNT}:secret:{name}-{synthetic_suffix(name)}"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One reading of a ``secretId``: a name, and the ARN check its answer must pass."""

    name: str
    #: The full ARN given (the secret's ARN must equal it), or None.
    full_arn: str | None = None
    #: The partial ARN given (the real ARN minus its suffix must equal it), or None.
    partial_arn: str | None = None

    def accepts(self, actual_arn: str, *, real: bool) -> bool:
        """Whether a secret whose ARN is ``actual_arn`` is the one this candidate names."""
        if self.full_arn is not None:
            return actual_arn == self.full_arn
        if self.partial_arn is not None and real:
            return actual_arn.rsplit("-", 1)[0] == self.partial_arn
        return True


def candidates(secret_id: str, arns: ArnSource | None = None) -> Iterator[Candidate]:
    """The names a ``secretId`` may mean, most likely first.

    A plain name is itself. An ARN whose name part ends in ``-`` and six
    characters is first read as a full ARN, then as a partial ARN of a name
    that happens to end that way (Secrets Manager resolves the same ambiguity
    the same way).
    """
    m = _ARN_RE.fullmatch(secret_id)
    if m is None:
        yield Candidate(secret_id)
        return
    arn_name = m.group("name")
    suffixed = _SUFFIX_RE.fullmatch(arn_name)
    if suffixed is not None:
        name = _ours(suffixed.group("stem"), arns)
        if name is not None:
            yield Candidate(name, full_arn=secret_id)
    name = _ours(arn_name, arns)
    if name is not None:
        yield Candidate(name, partial_arn=secret_id)


def _ours(aws_name: str, arns: ArnSource | None) -> str | None:
    return aws_name if arns is None else arns.name_for(aws_name)


def arn_for(name: str, *, region: str, arns: ArnSource | None) -> tuple[str, bool]:
    """The ARN to answer for ``name``, and whether it is the store's real one."""
    real = arns.known_arn(name) if arns is not None else None
    if real is not None:
        return real, True
    return synthetic_arn(name, region=region), False
