#!/usr/bin/env bash
# Set up and run the agent on its embedded defaults: a local keyring, a
# directory store, a demo secret, the Unix socket and a rendered file on tmpfs.
#
#   scripts/demo.sh            # then, in another terminal, see README.md
#
# Everything lives in ./demo (git-ignored) and /dev/shm/secrets-agent-demo.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
demo="$repo_root/demo"
render_dir="/dev/shm/secrets-agent-demo"

if [ ! -x .venv/bin/secrets-agent ]; then
    echo "demo: creating .venv and installing secrets-agent (about a minute)"
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -e .
fi
sa() { .venv/bin/secrets-agent -c "$demo/agent.yaml" "$@"; }

if [ ! -f "$demo/agent.yaml" ]; then
    .venv/bin/secrets-agent init --dir "$demo"
    # init's config writes nothing next to itself (it may sit on a read-only
    # mount); the demo keeps its socket and audit log in demo/ instead.
    sed -i -e 's|^  # socket: .*|  socket: ./agent.sock|' -e 's|^  path: "-"$|  path: ./audit.log|' \
        "$demo/agent.yaml"
    grep -q '^  socket: ./agent.sock$' "$demo/agent.yaml" \
        || { echo "demo: could not set listen.socket in $demo/agent.yaml" >&2; exit 1; }
    mkdir -p "$render_dir"
    chmod 700 "$render_dir"
    cat >> "$demo/agent.yaml" <<YAML

# Added by scripts/demo.sh: render the demo secret's password to tmpfs.
templates:
  - destination: $render_dir/db-password
    secret: demo/db
    key: password
    format: raw
    mode: "0400"
  - destination: $render_dir/db.env
    secret: demo/db
    format: dotenv
    mode: "0400"
YAML
fi
# A demo/agent.yaml written by something else would serve elsewhere than the
# socket printed below.
grep -q '^# Added by scripts/demo.sh' "$demo/agent.yaml" \
    || { echo "demo: $demo/agent.yaml was not written by this script; move $demo away and run it again" >&2; exit 1; }
if ! sa describe demo/db >/dev/null 2>&1; then
    password="$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(18))')"
    printf '{"engine": "postgres", "host": "127.0.0.1", "port": 5432, "username": "app", "password": "%s", "dbname": "app"}' \
        "$password" | sa put demo/db --json
fi

cat <<TXT

demo: the agent is starting on $demo/agent.sock. In another terminal:

  curl --unix-socket $demo/agent.sock http://localhost/v1/secrets/demo/db
  curl --unix-socket $demo/agent.sock 'http://localhost/v1/secrets/demo/db?key=password&format=raw'
  cat $render_dir/db-password
  echo -n '{"username": "app", "password": "rotated"}' | .venv/bin/secrets-agent -c $demo/agent.yaml put demo/db --json

Stop it with Ctrl-C.
TXT
exec .venv/bin/secrets-agent -c "$demo/agent.yaml" run
