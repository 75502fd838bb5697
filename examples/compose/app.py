"""The demo app of examples/docker-compose.yml: reads a rendered file and the socket.

Standard library only, so it runs in any Python image. Prints the length and
a digest of the secret (never the secret) each time either source changes.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import sys
import time

SECRET_FILE = os.environ.get("SECRET_FILE", "/run/secrets-agent/files/db-password")
AGENT_SOCKET = os.environ.get("AGENT_SOCKET", "/run/secrets-agent/agent.sock")
SECRET_NAME = os.environ.get("SECRET_NAME", "demo/db-password")


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self.path)


def from_socket() -> tuple[str, str]:
    """(version id, value) of the secret, from the agent's API."""
    conn = UnixConnection(AGENT_SOCKET)
    try:
        conn.request("GET", f"/v1/secrets/{SECRET_NAME}")
        response = conn.getresponse()
        body = json.loads(response.read())
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"agent answered {response.status}: {body.get('message')}")
    return body["version_id"], body["value"]


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:12]


def main() -> int:
    once = "--once" in sys.argv
    seen = None
    while True:
        with open(SECRET_FILE, encoding="utf-8") as f:
            from_file = f.read()
        version, value = from_socket()
        now = (version, digest(from_file), digest(value))
        if now != seen:
            same = "the same" if from_file == value else "DIFFERENT"
            print(
                f"version {version}: file and socket give {same} value "
                f"({len(value)} chars, sha256 {now[2]})",
                flush=True,
            )
            seen = now
        if once:
            return 0 if from_file == value else 1
        time.sleep(2)


if __name__ == "__main__":
    sys.exit(main())
