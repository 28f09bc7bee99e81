"""Which layers to keep at 8 bits in mixed INT4/INT8 ONNX quantization: each candidate rule of
lowbit/onnx/mixed.py (and all-4-bit / all-8-bit for reference) on one float ONNX decoder, with perplexity and
size, so the default rule is chosen by measurement.

    python benchmarks/onnx_mixed.py --model ONNX_FOLDER [--algo rtn] [--scheme w_uint4_per_group_asym]
                                    [--block 128] [--calib 32] [--max-chunks 16] [--work DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lowbit import api
from lowbit.data import eval_windows, load_text, tokenize
from lowbit.eval.onnx_perplexity import onnx_perplexity
from lowbit.onnx.graph import OnnxDecoder
from lowbit.onnx.mixed import STRATEGIES, default_8bit_layers
from lowbit.onnx.run import OnnxOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--algo", default="rtn")
    ap.add_argument("--scheme", default="w_uint4_per_group_asym")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--max-chunks", type=int, default=16)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    work = Path(args.work or tempfile.mkdtemp(prefix="onnx-mixed-"))
    names = list(OnnxDecoder(args.model).linears())
    windows = eval_windows(tokenize(AutoTokenizer.from_pretrained(args.model), load_text("pydoc", "eval")), 512,
                           args.max_chunks)
    float_ppl = onnx_perplexity(args.model, windows, progress=False).perplexity
    runs = {"all 4-bit": (), **{k: tuple(default_8bit_layers(names, k)) for k in STRATEGIES},
            "all 8-bit": tuple(n for n in names if n != "lm_head")}
    print(f"float {float_ppl:.4f}; {args.scheme} block {args.block}, {args.algo}, {args.calib} x 512 calibration, "
          f"{len(windows)} x 512 evaluation windows")
    print("| rule | 8-bit MatMuls | perplexity | vs float | size MiB | quantize s |")
    print("|---|---|---|---|---|---|")
    for rule, layers in runs.items():
        out = work / rule.replace(" ", "-")
        start = time.perf_counter()
        result = api.quantize(args.model, out, scheme=args.scheme, group_size=args.block, algo=args.algo,
                              num_calib_data=args.calib, overwrite=True, progress=False, quiet=True,
                              onnx_options=OnnxOptions(layers_8bit=layers))
        seconds = time.perf_counter() - start
        ppl = onnx_perplexity(out, windows, progress=False).perplexity
        size = result.summary["output_size_bytes"] / 2**20
        print(f"| {rule} | {len(layers)} | {ppl:.4f} | {(ppl / float_ppl - 1) * 100:+.2f}% | {size:.1f} | "
              f"{seconds:.1f} |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
