"""onnxruntime-genai model builder runner: int4 CPU export straight from the Hugging Face float folder.

    /work/venv/bin/python benchmarks/peers/onnx_builder.py --model HF_FOLDER --data DATA.npz --algo rtn \
        --block 128 --out OUT [--symmetric]

Unlike the other runners, --model is the Hugging Face float folder (config.json + safetensors): the builder
exports and quantizes in one `python -m onnxruntime_genai.models.builder -i HF_FOLDER -o OUT -p int4 -e cpu`
run, so quantize_seconds is that whole run (export included) and peak_rss_mib is the child's peak.
Algorithms: the builder's algo_config (default, rtn, k_quant); no calibration data is used.
Options passed besides block_size, for the same scheme as the other runners: is_symmetric from --symmetric
(the builder's own default is symmetric), accuracy_level=0 (its CPU default is 4: int8 activations) and
nodes_to_exclude=/lm_head/MatMul,/model/embed_tokens/Gather (by default it quantizes lm_head, or with a tied
lm_head excluded, the embedding as an int4 GatherBlockQuantized).
A failing build reports the builder's last error line.
"""

from __future__ import annotations

import os
import subprocess
import sys

from onnx_common import run

ALGOS = ["default", "rtn", "k_quant"]


def main(args, measure):
    options = [f"block_size={args.block}", f"is_symmetric={str(args.symmetric).lower()}", "accuracy_level=0",
               "nodes_to_exclude=/lm_head/MatMul,/model/embed_tokens/Gather", f"algo_config={args.algo}"]
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", args.model, "-o", args.out,
               "-p", "int4", "-e", "cpu", "-c", os.path.join(args.out, "cache_dir"), "--extra_options", *options]
    with measure:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(done.stdout[-20000:], file=sys.stderr)  # the builder's log, for the record
    if done.returncode != 0:
        lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"the builder exited with {done.returncode}")
    cache = os.path.join(args.out, "cache_dir")
    if os.path.isdir(cache):
        import shutil

        shutil.rmtree(cache)


if __name__ == "__main__":
    run("ort-genai-builder", ALGOS, main)
