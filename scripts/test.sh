#!/usr/bin/env bash
# Install dependencies, then run every check: ruff lint, ruff format, mypy and
# pytest (arguments are passed to pytest). All four run even when one fails, so
# a single run reports everything; the exit status is non-zero if any failed.
#
#   scripts/test.sh                      # everything
#   scripts/test.sh -m 'not integration' # pytest args pass through
#   scripts/test.sh tests/test_servers.py -x
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

scripts/install-deps.sh

venv_bin="$repo_root/.venv/bin"
export PATH="$venv_bin:$PATH"

failed=()
results=()

run_check() {
    local name="$1"
    shift
    local start=$SECONDS rc=0
    printf '\n=== %s: %s\n' "$name" "$*"
    "$@" || rc=$?
    if [ "$rc" -eq 0 ]; then
        results+=("ok    $name ($((SECONDS - start))s)")
    else
        results+=("FAIL  $name (exit $rc, $((SECONDS - start))s)")
        failed+=("$name")
    fi
}

run_check "ruff check" "$venv_bin/ruff" check .
run_check "ruff format" "$venv_bin/ruff" format --check .
run_check "mypy" "$venv_bin/mypy"
# Any non-zero status fails, including pytest's 5 ("no tests collected"):
# a test tree that collects nothing is broken, not passing.
run_check "pytest" "$venv_bin/python" -m pytest -q "$@"

printf '\n=== summary\n'
printf '%s\n' "${results[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    printf 'failed: %s\n' "${failed[*]}"
    exit 1
fi
