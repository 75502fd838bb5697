#!/bin/sh
# A command rotator (docs/rotation.md#command) for an API key that a service
# accepts when the key's SHA-256 is listed in a file (one hash a line): a
# stand-in for any system with an "add credential / check credential" API.
#
#   secrets-agent runs:  rotate-api-key.sh STEP SECRET_NAME TOKEN
#   create: stdin = CURRENT value; print the new value on stdout, nothing else
#   set:    stdin = PENDING value; make the service accept it (idempotent)
#   test:   stdin = PENDING value; prove the service accepts it
# Exit 0: done. Exit 75: transient (the agent retries later). Other: failed.
# Never write the value to stderr, a log or argv.
set -eu

step=$1
keys=${API_KEYS_FILE:?set API_KEYS_FILE in the rule\'s params.env}

hash_stdin() { sha256sum | cut -d' ' -f1; }

case "$step" in
create)
    cat >/dev/null                       # the CURRENT value is not needed here
    # 32 random bytes, URL-safe base64 without padding.
    head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n'
    ;;
set)
    [ -d "$(dirname "$keys")" ] || exit 75  # the service's storage is not there yet: retry
    h=$(hash_stdin)
    touch "$keys"
    # Idempotent: adding a key that is already accepted is success. The old key
    # stays valid, so apps holding it keep working until they read the new one.
    grep -qx "$h" "$keys" || echo "$h" >>"$keys"
    ;;
test)
    h=$(hash_stdin)
    grep -qx "$h" "$keys" || { echo "the new key is not accepted" >&2; exit 1; }
    ;;
*)
    echo "unknown step" >&2
    exit 2
    ;;
esac
