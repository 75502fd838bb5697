"""Read a secret the way AWS documents it for the Secrets Manager Agent / Lambda extension.

Nothing here knows about secrets-agent: it is the AWS request shape (the
``X-Aws-Parameters-Secrets-Token`` header, ``/secretsmanager/get?secretId=``,
``SecretString`` in the answer), pointed at the agent's loopback TCP port.
Enable that port in agent.yaml::

    listen:
      tcp:
        address: "127.0.0.1:2773"
        tokens: {app: "env:AWS_SESSION_TOKEN"}
    access:
      - {secrets: ["app/*"], token: app}

then::

    AWS_SESSION_TOKEN=... python examples/aws_style_client.py app/db [AWSPREVIOUS]

The value is not printed (it is a secret): the script prints its length and version.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

PORT = os.environ.get("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", "2773")


def get_secret_value(secret_id: str, version_stage: str | None = None) -> dict[str, Any]:
    """GetSecretValue through the local endpoint; raises urllib.error.HTTPError on errors."""
    query = {"secretId": secret_id}
    if version_stage is not None:
        query["versionStage"] = version_stage
    url = f"http://localhost:{PORT}/secretsmanager/get?{urllib.parse.urlencode(query)}"
    headers = {"X-Aws-Parameters-Secrets-Token": os.environ.get("AWS_SESSION_TOKEN", "")}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        doc: dict[str, Any] = json.loads(response.read())
    return doc


def get_secret(secret_id: str, version_stage: str | None = None) -> str:
    """The ``SecretString`` of a secret, as AWS's examples read it."""
    value: str = get_secret_value(secret_id, version_stage)["SecretString"]
    return value


def main(argv: list[str]) -> int:
    secret_id = argv[1] if len(argv) > 1 else "app/db"
    stage = argv[2] if len(argv) > 2 else None
    try:
        doc = get_secret_value(secret_id, stage)
    except urllib.error.HTTPError as exc:
        error = json.loads(exc.read() or b"{}")
        print(f"{exc.code} {error.get('__type')}: {error.get('message')}", file=sys.stderr)
        return 1
    stages = ",".join(doc["VersionStages"])
    print(f"{doc['Name']}: {len(doc['SecretString'])} characters, {doc['VersionId']} ({stages})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
