"""``audit verify``: check the hash chain through one file, several, or a directory.

Rotated files (by the agent or by logrotate) hold consecutive parts of one
chain. Given a directory, every regular file in it whose first line is an
audit record is taken, ordered by the ``seq`` of that first line, so the
file names do not matter.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: ``prev`` of the first record of a new chain.
GENESIS = "0" * 64


def line_hash(line: bytes) -> str:
    """The chain hash of one record line (without its newline)."""
    return hashlib.sha256(line).hexdigest()


@dataclass(frozen=True, slots=True)
class Verdict:
    """The result of :func:`verify`: ``ok``, the record count, and the first break."""

    ok: bool
    records: int
    head: str
    file: str | None = None
    line: int | None = None
    reason: str | None = None
    files: int = 0


def _check(doc: object, prev: str | None, seq: int | None) -> str | None:
    """Why a parsed record does not continue the chain (None if it does)."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    if not isinstance(doc.get("seq"), int) or not isinstance(doc.get("prev"), str):
        return "no 'seq' or 'prev' field: not an audit record"
    if not isinstance(doc.get("event"), str) or not isinstance(doc.get("outcome"), str):
        return "no 'event' or 'outcome' field: not an audit record"
    if seq is not None and doc["seq"] != seq + 1:
        if doc["seq"] > seq + 1:
            return f"seq {doc['seq']} follows {seq}: record(s) missing"
        return f"seq {doc['seq']} follows {seq}: records out of order or repeated"
    if prev is not None and doc["prev"] != prev:
        return "prev hash does not match the line before: it was edited, removed or reordered"
    return None


def first_seq(path: Path) -> int | None:
    """The ``seq`` of the first line of ``path`` if it is an audit record, else None."""
    try:
        with open(path, "rb") as fh:
            line = fh.readline(64 * 1024)
        doc = json.loads(line)
    except (OSError, ValueError):
        return None
    seq = doc.get("seq") if isinstance(doc, dict) else None
    return seq if isinstance(seq, int) and "prev" in doc else None


def expand(paths: Iterable[Path]) -> list[Path]:
    """Files as given; a directory becomes its audit files, in chain order.

    Raises:
        FileNotFoundError: a directory holds no audit file.
    """
    out: list[Path] = []
    for path in paths:
        if not path.is_dir():
            out.append(path)
            continue
        found = []
        for entry in os.scandir(path):
            if entry.is_file(follow_symlinks=False):
                seq = first_seq(Path(entry.path))
                if seq is not None:
                    found.append((seq, entry.name))
        if not found:
            raise FileNotFoundError(2, "no audit log files in the directory", str(path))
        out.extend(path / name for _, name in sorted(found))
    return out


def verify(paths: Sequence[Path] | Iterable[Path]) -> Verdict:
    """Check the chain through ``paths`` (older files first; directories are expanded).

    The first record of the first file may continue a chain from an earlier
    file that is not given; every other link is checked, across files too.
    """
    prev: str | None = None
    seq: int | None = None
    records = 0
    files = expand(paths)
    for path in files:
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                line = raw.rstrip(b"\n")
                try:
                    doc = json.loads(line)
                except ValueError:
                    doc = None
                why = _check(doc, prev, seq) if doc is not None else "not valid JSON"
                if why is None and not raw.endswith(b"\n"):
                    why = "the last line is incomplete (no newline): a torn write"
                if why is not None:
                    head = prev or GENESIS
                    return Verdict(False, records, head, str(path), number, why, len(files))
                assert isinstance(doc, dict)
                prev, seq = line_hash(line), doc["seq"]
                records += 1
    return Verdict(True, records, prev or GENESIS, files=len(files))
