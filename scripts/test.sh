#!/usr/bin/env bash
# The tests: set up (scripts/setup.sh: .venv, the versions in constraints.txt), then the README's test command,
#   python -m pytest
# Options before any pytest argument:
#   --llama   also build llama-cpp-python (minutes), so that the llama.cpp tests run instead of skipping
#   --latest  the drift check: the newest releases (torch still 2.13.0) in .venv-latest, not constraints.txt;
#             prints "drift: NAME LOCKED→NEWEST" for each package that moved, runs the suite, and closes with
#             a "drift:" verdict, so a failure names the tests that the newest releases break
#   --min     the lower bounds: every direct dependency at its pyproject.toml bound (constraints-min.txt), every
#             extra, in .venv-min
# e.g. scripts/test.sh -m "not slow"   scripts/test.sh --llama   scripts/test.sh --latest --llama
# LOWBIT_VENV names the venv to use (made where missing)
set -euo pipefail
cd "$(dirname "$0")/.."
opts=()
latest=0
while [ $# -gt 0 ]; do
  case "$1" in
    --llama|--min) opts+=("$1"); shift ;;
    --latest) opts+=("$1"); latest=1; shift ;;
    *) break ;;
  esac
done
pytest_args=("$@")
set -- ${opts[@]+"${opts[@]}"}
# shellcheck source=setup.sh
source scripts/setup.sh "$@"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
drift=""
if [ "$latest" = 1 ]; then
  drift="$(python scripts/lockfile.py diff constraints.txt)"
  echo "$drift"
fi
echo "test: python -m pytest ${pytest_args[*]:-}"
set +e
python -m pytest ${pytest_args[@]+"${pytest_args[@]}"}
status=$?
set -e
if [ "$latest" = 1 ]; then
  echo "$drift"
  case "$status" in
    0) echo "drift: verdict: the suite passes on the newest releases (scripts/lock.sh would write them as the lock)" ;;
    5) echo "drift: verdict: no tests ran" ;;
    *) echo "drift: verdict: the suite FAILS on the newest releases (pytest exit $status): the FAILED lines" \
            "above name the tests, the lines above name the packages that moved" ;;
  esac
fi
exit "$status"
