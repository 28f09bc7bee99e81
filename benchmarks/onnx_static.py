"""INT8 static quantization of an ONNX decoder (QDQ; weights and activations) with and without QuaRot R1 and
SmoothQuant on the graph, and the per-layer activation remedies: one lowbit quantization per variant, then
perplexity of each in onnxruntime on the same windows.

    python benchmarks/onnx_static.py --model ONNX_FOLDER [--calib 32] [--max-chunks 8] [--work DIR]
                                     [--variants plain,sq,rot,rs,rs_i16down,...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lowbit import api
from lowbit.data import eval_windows, load_text, tokenize
from lowbit.eval.onnx_perplexity import onnx_perplexity
from lowbit.onnx.run import OnnxOptions

PT, PC = "w_int8_a_int8_per_tensor_sym", "w_int8_a_int8_per_channel_sym"
VARIANTS = {  # name -> (chain, scheme, OnnxOptions fields)
    "plain": ("rtn", PT, {}),
    "sq": ("smoothquant", PT, {}),
    "rot": ("rotation", PT, {}),
    "rs": ("rotation,smoothquant", PT, {}),
    "rs_i16down": ("rotation,smoothquant", PT, {"int16_inputs": ("down_proj",)}),
    "rs_fdown": ("rotation,smoothquant", PT, {"float_inputs": ("down_proj",)}),
    "rs_pc": ("rotation,smoothquant", PC, {}),
    "rs_pct": ("rotation,smoothquant", PT, {"calibrate_method": "percentile"}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--max-chunks", type=int, default=8)
    ap.add_argument("--variants", default="plain,sq,rot,rs,rs_i16down")
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    work = Path(args.work or tempfile.mkdtemp(prefix="onnx-static-"))
    windows = eval_windows(tokenize(AutoTokenizer.from_pretrained(args.model), load_text("pydoc", "eval")), 512,
                           args.max_chunks)
    print(json.dumps({"float": onnx_perplexity(args.model, windows, progress=False).perplexity}), flush=True)
    for name in args.variants.split(","):
        chain, scheme, options = VARIANTS[name]
        start = time.perf_counter()
        result = api.quantize(args.model, work / name, scheme=scheme, algo=chain, num_calib_data=args.calib,
                              overwrite=True, progress=False, quiet=True, onnx_options=OnnxOptions(**options))
        seconds = time.perf_counter() - start
        ppl = onnx_perplexity(work / name, windows, progress=False).perplexity
        print(json.dumps({"name": name, "chain": chain, "scheme": scheme, "options": options, "perplexity": ppl,
                          "seconds": round(seconds, 1), "steps": result.summary["seconds"]}), flush=True)


if __name__ == "__main__":
    main()
