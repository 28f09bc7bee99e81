"""The block-wise optimisers against GPTQ and RTN on one model: RTN, one-pass GPTQ (lowbit's default, float
propagation), true-sequential GPTQ with quantized propagation (the same passes GPTAQ and Qronos make), GPTAQ,
Qronos and AutoRound, each at the same scheme and calibration windows; perplexity of the written folders on the
evaluation text, and quantization time.

    python benchmarks/gptaq.py [--model demo] [--scheme w_uint3_per_group_asym] [--group-size 64]
                               [--num-calib-data 16] [--seq-len 512] [--eval-chunks 16] [--dataset pydoc]
                               [--alphas 0.25] [--qronos-damps 1e-6] [--autoround-iters 50]
                               [--autoround-batch 4] [--runs rtn,gptq,gptq-seq,gptaq,qronos,autoround]
                               [--work /tmp/lowbit-gptaq]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--scheme", default="w_uint3_per_group_asym")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--num-calib-data", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-chunks", type=int, default=16)
    p.add_argument("--dataset", default="pydoc")
    p.add_argument("--alphas", default="0.25")
    p.add_argument("--qronos-damps", default="1e-6")
    p.add_argument("--autoround-iters", default="50")
    p.add_argument("--autoround-batch", type=int, default=4)
    p.add_argument("--runs", default="gptq,gptq-seq,gptaq,qronos")
    p.add_argument("--work", type=Path, default=Path("/tmp/lowbit-gptaq"))
    args = p.parse_args()
    from lowbit.api import evaluate, quantize

    def ppl(model) -> dict:  # per evaluation text (--dataset: comma-separated)
        return {d: round(evaluate(model, dataset=d, seq_len=512, max_chunks=args.eval_chunks,
                                  progress=False)["perplexity"], 4) for d in args.dataset.split(",")}

    wanted = args.runs.split(",")
    runs = [("rtn", "rtn", {})] if "rtn" in wanted else []
    if "gptq" in wanted:
        runs.append(("gptq (one pass, float propagation)", "gptq", {}))
    if "gptq-seq" in wanted:
        runs.append(("gptq (true-sequential, quantized propagation)", "gptq",
                     {"algo_args": ["gptq:true_sequential=true"], "propagate": "quantized"}))
    if "gptaq" in wanted:
        runs += [(f"gptaq alpha={a}", "gptaq", {"algo_args": [f"gptaq:alpha={a}"]}) for a in args.alphas.split(",")]
    if "qronos" in wanted:
        runs += [(f"qronos damp={d}", "qronos", {"algo_args": [f"qronos:damp={d}"]}) for d in args.qronos_damps.split(",")]
    if "autoround" in wanted:
        runs += [(f"autoround iters={n}", "autoround",
                  {"algo_args": [f"autoround:iters={n},batch_size={args.autoround_batch}"]})
                 for n in args.autoround_iters.split(",")]
    rows = {"float": {"perplexity": ppl(args.model)}}
    print(f"float: {rows['float']['perplexity']}", flush=True)
    for k, (label, algo, extra) in enumerate(runs):
        start = time.perf_counter()
        out = quantize(args.model, args.work / f"{label.split()[0]}{k}", scheme=args.scheme,
                       group_size=args.group_size, algo=algo, num_calib_data=args.num_calib_data,
                       seq_len=args.seq_len, progress=False, quiet=True, overwrite=True, **extra)
        seconds = time.perf_counter() - start
        rows[label] = {"perplexity": ppl(out.output), "seconds": round(seconds, 1)}
        print(f"{label}: {rows[label]['perplexity']} in {seconds:.0f} s", flush=True)
    print(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
