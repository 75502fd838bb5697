"""Fuzzing the parsers of outside data: the config loader, envelopes, stage maps.

Each property is the same: whatever the input, the parser returns a value or
raises its domain error (ConfigError, DecryptionError, MalformedStoreData),
never anything else (RecursionError, UnicodeDecodeError, TypeError, ...),
which before the fix escaped and ended the agent. Inputs are random bytes,
random YAML/JSON documents, and mutations of valid documents.
"""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.bounded import DEFAULT_LIMITS
from agent.config import parse_config_text
from agent.crypto import envelope
from agent.errors import ConfigError, DecryptionError, MalformedStoreData
from agent.stores.file_ops import _parse_stages
from tests.reliability.conftest import SCALE, TALLY, scaled

pytestmark = pytest.mark.timeout(120 * SCALE)
CONFIG_DIR = Path(__file__).resolve().parents[2] / "config" / "examples"
EXAMPLES = sorted(p.read_bytes() for p in CONFIG_DIR.glob("*.yaml"))
SETTINGS = settings(
    max_examples=scaled(100),
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["0400", "30s", "file", "*", "env:X", "file:///x", "CURRENT", "SIGHUP"]),
)
keys = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            "listen", "store", "keys", "templates", "refresh", "access", "secrets",
            "type", "path", "mode", "destination", "secret", "on_change", "command",
            "format", "template", "interval", "uids", "tcp", "tokens", "log", "level",
        ]
    ),
)  # fmt: skip
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=30,
)


def _load(raw: bytes) -> None:
    with contextlib.suppress(ConfigError):
        parse_config_text(raw, path=Path("/tmp/fuzz/agent.yaml"))
    TALLY["fuzzed_configs"] += 1


@SETTINGS
@given(st.binary(max_size=2048))
def test_config_loader_random_bytes(raw: bytes) -> None:
    _load(raw)


@SETTINGS
@given(documents)
def test_config_loader_random_yaml(doc: Any) -> None:
    _load(yaml.safe_dump(doc).encode())


@SETTINGS
@given(st.sampled_from(EXAMPLES), st.data())
def test_config_loader_mutated_examples(example: bytes, data: st.DataObject) -> None:
    doc = yaml.safe_load(example)
    _mutate(doc, data)
    _load(yaml.safe_dump(doc).encode())
    raw = bytearray(example)
    for _ in range(data.draw(st.integers(1, 4))):  # byte-level damage too
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    _load(bytes(raw))


def _mutate(doc: Any, data: st.DataObject) -> None:
    """Replace one value somewhere in ``doc`` with a random document."""
    node = doc
    for _ in range(data.draw(st.integers(0, 4))):
        if isinstance(node, dict) and node:
            child = node[data.draw(st.sampled_from(sorted(node, key=str)))]
        elif isinstance(node, list) and node:
            child = data.draw(st.sampled_from(node))
        else:
            break
        if not isinstance(child, (dict, list)):
            break
        node = child
    if isinstance(node, dict) and node:
        node[data.draw(st.sampled_from(sorted(node, key=str)))] = data.draw(documents)
    elif isinstance(node, list) and node:
        node[data.draw(st.integers(0, len(node) - 1))] = data.draw(documents)


# --------------------------------------------------------------------- envelopes

VALID_ENVELOPE: dict[str, Any] = {
    "format": envelope.FORMAT,
    "v": 1,
    "alg": envelope.ALG,
    "context": {"secret": "db", "version": "v1", "store": "default"},
    "keys": [
        {"provider": "local", "key": "master", "wrapped": base64.b64encode(b"k" * 40).decode()}
    ],
    "message_id": base64.b64encode(b"m" * 32).decode(),
    "commitment": base64.b64encode(b"c" * 32).decode(),
    "nonce": base64.b64encode(b"n" * 12).decode(),
    "ciphertext": base64.b64encode(b"x" * 32).decode(),
    "value_type": "string",
}  # fmt: skip


def _parse_envelope(raw: bytes) -> None:
    with contextlib.suppress(DecryptionError):
        envelope.parse(raw, where="fuzz")
    TALLY["fuzzed_envelopes"] += 1


@SETTINGS
@given(st.binary(max_size=2048))
def test_envelope_parser_random_bytes(raw: bytes) -> None:
    _parse_envelope(raw)


@SETTINGS
@given(st.data())
def test_envelope_parser_mutated_valid_envelopes(data: st.DataObject) -> None:
    doc = json.loads(json.dumps(VALID_ENVELOPE))
    _mutate(doc, data)
    if data.draw(st.booleans()):
        doc[data.draw(keys)] = data.draw(documents)
    _parse_envelope(json.dumps(doc).encode())
    nesting = data.draw(st.integers(0, 5000))
    _parse_envelope(b"[" * nesting + json.dumps(doc).encode() + b"]" * nesting)


# -------------------------------------------------------------------- stage maps


def _parse_stage_map(raw: bytes) -> None:
    try:
        stages = _parse_stages(raw, "stage map of secret 'fuzz'", DEFAULT_LIMITS)
    except MalformedStoreData:
        pass
    else:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in stages.items())
    TALLY["fuzzed_stage_maps"] += 1


@SETTINGS
@given(st.one_of(st.binary(max_size=1024), documents.map(lambda d: json.dumps(d).encode())))
def test_stage_map_parser(raw: bytes) -> None:
    _parse_stage_map(raw)
