"""Schemes on the demo model (SmolLM2-135M-Instruct): perplexity, quantization time, peak memory and size.

Each quantization runs as its own `lowbit quantize` process so that its wall time and peak resident memory
are measured alone (os.wait4). Perplexity uses `lowbit eval` semantics (standard protocol) on a text source.

    python benchmarks/demo_schemes.py [--algo rtn] [--schemes NAME:GROUP,...] [--num-calib-data 128]
                                      [--dataset pydoc] [--seq-len 512] [--max-chunks N] [--model demo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

SCHEMES = [
    ("w_uint4_per_group_asym", 128),
    ("w_uint4_per_group_asym", 64),
    ("w_uint4_per_group_asym", 32),
    ("w_int4_per_group_sym", 128),
    ("w_uint3_per_group_asym", 128),
    ("w_int8_per_channel_sym", None),
]


def peak_of(argv):
    """Wall time and peak RSS of a child process, measured with os.wait4; its output goes to /dev/null."""
    start = time.perf_counter()
    devnull = os.open(os.devnull, os.O_WRONLY)
    pid = os.fork()
    if pid == 0:  # child
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.execvp(argv[0], argv)
    os.close(devnull)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(argv)} failed (exit {os.waitstatus_to_exitcode(status)}); run it by hand")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--dataset", default="pydoc")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-chunks", type=int, default=None)
    ap.add_argument("--algo", default="rtn", help="algorithm chain passed to lowbit quantize")
    ap.add_argument("--schemes", default=None,
                    help="comma-separated NAME:GROUP (GROUP empty for per-channel/tensor) [default: the RTN set]")
    ap.add_argument("--num-calib-data", type=int, default=128, help="calibration windows (calibrated algorithms)")
    ap.add_argument("--lowbit-args", default="", help="more `lowbit quantize` options, e.g. '--propagate float'")
    args = ap.parse_args()
    schemes = SCHEMES if args.schemes is None else [
        (name, int(gs) if gs else None) for name, _, gs in (item.partition(":") for item in args.schemes.split(","))]

    from lowbit.hf.source import resolve_source

    resolve_source(args.model)  # convert the GGUF once, outside the timings
    lowbit = [sys.executable, "-m", "lowbit"]
    eval_kw = dict(dataset=args.dataset, seq_len=args.seq_len, max_chunks=args.max_chunks, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        # all quantizations first, while this process is small: a forked child's peak RSS counts the
        # parent's pages it inherited before exec
        measured = []
        for scheme, gs in schemes:
            out = Path(tmp) / f"{scheme}-{gs}"
            argv = [*lowbit, "quantize", args.model, "-o", str(out), "--scheme", scheme, "--no-progress",
                    "--algo", args.algo, "--dataset", args.dataset, "--seq-len", str(args.seq_len),
                    "--num-calib-data", str(args.num_calib_data), *args.lowbit_args.split()]
            if gs:
                argv += ["--group-size", str(gs)]
            wall, peak = peak_of(argv)
            summary = json.loads((out / "summary.json").read_text())
            measured.append((scheme, gs, out, summary["seconds"]["quantize"], wall, peak))
            print(f"{scheme} g{gs}: quantize {summary['seconds']['quantize']:.2f} s, wall {wall:.1f} s, "
                  f"peak {peak / 2**20:.0f} MiB", flush=True)

        from lowbit.api import evaluate

        base = evaluate(args.model, **eval_kw)
        rows = [("float", "-", base["perplexity"], None, None, None, base["size_bytes"])]
        print(f"float: perplexity {base['perplexity']:.4f} ({base['windows']} windows x {args.seq_len})", flush=True)
        for scheme, gs, out, qs, wall, peak in measured:
            res = evaluate(str(out), **eval_kw)
            rows.append((scheme, gs or "-", res["perplexity"], qs, wall, peak, res["size_bytes"]))
            print(f"{scheme} g{gs}: perplexity {res['perplexity']:.4f}", flush=True)

    float_ppl = base["perplexity"]
    print()
    print(f"model {args.model}, algo {args.algo}, calibration {args.num_calib_data} x {args.seq_len} "
          f"(when calibrated), text {args.dataset}, seq_len {args.seq_len}, windows {base['windows']}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads default")
    print("| scheme | group | perplexity | vs float | quantize s | command wall s | peak RSS MiB | weights MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for scheme, gs, ppl, qs, wall, peak, size in rows:
        delta = "" if scheme == "float" else f"{100 * (ppl / float_ppl - 1):+.1f}%"
        print(f"| {scheme} | {gs} | {ppl:.3f} | {delta} | {'' if qs is None else f'{qs:.2f}'} | "
              f"{'' if wall is None else f'{wall:.1f}'} | {'' if peak is None else f'{peak / 2**20:.0f}'} | "
              f"{size / 2**20:.1f} |")


if __name__ == "__main__":
    main()
