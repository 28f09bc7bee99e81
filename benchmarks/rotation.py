"""Hadamard rotation with and without, side by side in one run: perplexity, quantization time and peak memory
of each (scheme, algorithm chain) on a model, every quantization in its own `lowbit quantize` process.

    python benchmarks/rotation.py [--model demo] [--dataset pydoc] [--seq-len 512] [--max-chunks N]
                                  [--runs 'SCHEME|CHAIN|ALGO-ARGS;...'] [--num-calib-data 128]

The default runs are issue #5's: int4 per-group symmetric weights with RTN and GPTQ, and int8 weights with
static per-tensor int8 activations with RTN, SmoothQuant, rotation and both; each with and without rotation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from demo_schemes import peak_of  # noqa: E402

RUNS = [
    ("w_int4_per_group_sym", "rtn", ""),
    ("w_int4_per_group_sym", "rotation", ""),
    ("w_int4_per_group_sym", "rotation", "rotation:r2=true,r4=true"),
    ("w_int4_per_group_sym", "gptq", ""),
    ("w_int4_per_group_sym", "rotation,gptq", ""),
    ("w_int8_a_int8_per_tensor_sym", "rtn", ""),
    ("w_int8_a_int8_per_tensor_sym", "smoothquant", ""),
    ("w_int8_a_int8_per_tensor_sym", "rotation", ""),
    ("w_int8_a_int8_per_tensor_sym", "rotation,smoothquant", ""),
    ("w_int8_a_int8_per_tensor_sym", "rotation,smoothquant", "rotation:r2=true,r4=true"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--dataset", default="pydoc")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-chunks", type=int, default=None)
    ap.add_argument("--num-calib-data", type=int, default=128)
    ap.add_argument("--runs", default=None, help="';'-separated SCHEME|CHAIN|ALGO-ARGS [default: issue #5's set]")
    args = ap.parse_args()
    runs = RUNS if args.runs is None else [tuple((item.split("|") + ["", ""])[:3]) for item in args.runs.split(";")]

    from lowbit.hf.source import resolve_source

    resolve_source(args.model)  # convert a GGUF once, outside the timings
    lowbit = [sys.executable, "-m", "lowbit"]
    eval_kw = dict(dataset=args.dataset, seq_len=args.seq_len, max_chunks=args.max_chunks, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        measured = []
        for k, (scheme, chain, algo_args) in enumerate(runs):
            out = Path(tmp) / str(k)
            argv = [*lowbit, "quantize", args.model, "-o", str(out), "--scheme", scheme, "--algo", chain,
                    "--no-progress", "--dataset", args.dataset, "--seq-len", str(args.seq_len),
                    "--num-calib-data", str(args.num_calib_data)]
            for item in filter(None, algo_args.split(" ")):
                argv += ["--algo-arg", item]
            wall, peak = peak_of(argv)
            summary = json.loads((out / "summary.json").read_text())
            measured.append((scheme, chain, algo_args, out, summary, wall, peak))
            print(f"{scheme} {chain} {algo_args}: quantize {summary['seconds']['quantize']:.1f} s, "
                  f"peak {peak / 2**20:.0f} MiB", flush=True)

        from lowbit.api import evaluate

        base = evaluate(args.model, **eval_kw)
        print(f"float: perplexity {base['perplexity']:.4f} ({base['windows']} windows)", flush=True)
        rows = []
        for scheme, chain, algo_args, out, summary, wall, peak in measured:
            ppl = evaluate(str(out), **eval_kw)["perplexity"]
            rows.append((scheme, chain, algo_args, ppl, summary, wall, peak))
            print(f"{scheme} {chain} {algo_args}: perplexity {ppl:.4f}", flush=True)

    fp = base["perplexity"]
    print()
    print(f"model {args.model}, text {args.dataset}, {base['windows']} x {args.seq_len} windows, float {fp:.3f}; "
          f"calibration {args.num_calib_data} x {args.seq_len}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    print("| scheme | chain | options | perplexity | vs float | rotation | quantize s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for scheme, chain, algo_args, ppl, summary, wall, peak in rows:
        rot = summary.get("rotation") or {}
        how = rot.get("matrix", "") + (f", max block error {rot['max_block_error']:.1e}" if rot else "")
        print(f"| {scheme} | {chain} | {algo_args} | {ppl:.3f} | {100 * (ppl / fp - 1):+.1f}% | {how} | "
              f"{summary['seconds']['quantize']:.1f} | {peak / 2**20:.0f} |")


if __name__ == "__main__":
    main()
