#!/usr/bin/env bash
# The main job on the built-in demo model (SmolLM2-135M-Instruct), after setting up (scripts/setup.sh: .venv,
# the versions in constraints.txt): perplexity and size before, quantize to 4-bit (group 128, asymmetric,
# RTN) into ./smollm2-w4g128, perplexity and size after. Extra arguments go to `lowbit quantize` (e.g.
# --overwrite to run it again over an existing smollm2-w4g128).
set -euo pipefail
cd "$(dirname "$0")/.."
quantize_args=("$@")
set --
# shellcheck source=setup.sh
source scripts/setup.sh

run() { echo "demo: $*"; "$@"; }
run lowbit eval demo
run lowbit quantize demo -o smollm2-w4g128 --scheme w_uint4_per_group_asym --group-size 128 \
  ${quantize_args[@]+"${quantize_args[@]}"}
run lowbit eval smollm2-w4g128
echo "demo: done; to run lowbit yourself: source ${VIRTUAL_ENV}/bin/activate"
