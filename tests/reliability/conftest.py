"""Scale and tallies for the reliability suite.

``RELIABILITY_FULL=1`` runs the full form (scale 20), ``RELIABILITY_SCALE=N``
any other; the reduced form (scale 1) is what CI runs. With
``RELIABILITY_REPORT=path`` the session writes its tallies (fuzzed inputs,
fault scenarios survived, crashes) there as JSON, for docs/reliability.md.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterator

import pytest

SCALE = int(
    os.environ.get("RELIABILITY_SCALE") or (20 if os.environ.get("RELIABILITY_FULL") else 1)
)
TALLY: collections.Counter[str] = collections.Counter()


def scaled(n: int) -> int:
    """``n`` times the suite's scale."""
    return n * SCALE


@pytest.fixture(scope="session", autouse=True)
def _report() -> Iterator[None]:
    yield
    path = os.environ.get("RELIABILITY_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"scale": SCALE, **dict(sorted(TALLY.items()))}, f, indent=1)
