"""Read a secret from a running agent with the standard-library client.

SECRETS_AGENT_SOCKET=demo/agent.sock python examples/read_secret.py demo/db password
"""

from __future__ import annotations

import sys

from agent.client import NotFoundError, SecretsClient


def main() -> int:
    name = sys.argv[1] if len(sys.argv) > 1 else "demo/db"
    key = sys.argv[2] if len(sys.argv) > 2 else None
    client = SecretsClient()  # $SECRETS_AGENT_SOCKET, else the default socket
    try:
        value = client.get(name, key=key)
    except NotFoundError as exc:
        print(f"not found: {exc}", file=sys.stderr)
        return 1
    print(f"{name}: {len(value)} characters read (not printed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
