#!/usr/bin/env bash
# Regenerates constraints.txt: a fresh venv with the newest releases of everything (torch still 2.13.0,
# llama-cpp-python compiled, the demo model), the whole suite, and constraints.txt rewritten only if the suite
# passes (then review `git diff constraints.txt`, and commit it with the code it was tested with).
#   scripts/lock.sh [PYTEST ARGS ...]        LOWBIT_LOCK_VENV: the venv to use (default: a new temporary one)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LOWBIT_LOCK_VENV:-$(mktemp -d "${TMPDIR:-/tmp}/lowbit-lock.XXXXXX")/venv}"
rm -rf "$venv"
unset VIRTUAL_ENV
echo "lock: a fresh venv with the newest releases: $venv"
set +e
LOWBIT_VENV="$venv" scripts/test.sh --latest --llama "$@"
status=$?
set -e
if [ "$status" -ne 0 ]; then
  echo "lock: the suite did not pass (pytest exit $status): constraints.txt left as it was" >&2
  exit 1
fi
"$venv/bin/python" scripts/lockfile.py write constraints.txt
git --no-pager diff --stat -- constraints.txt 2>/dev/null || true
