"""Prefill and decode speed, peak memory and size of several models side by side (lowbit.eval.speed), as a
markdown table and optionally JSON. Each model is measured in its own fresh process.

    python benchmarks/bench_speed.py MODEL[@RUNTIME] ... [--prompt-tokens 512] [--new-tokens 128] [--runs 3]
                                     [--warmup 1] [--threads N] [--json OUT]

e.g. python benchmarks/bench_speed.py demo demo@llama.cpp /tmp/onnx/demo-fp32
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path


def row(r: dict) -> str:
    """One markdown table row of a measure_speed result."""
    p, d = r["prefill_tokens_per_s"], r["decode_tokens_per_s"]
    return (f"| {r['model']} | {r['runtime']} {r['runtime_version']} | {r['threads']} | "
            f"{p['median']:.1f} ({p['min']:.1f}-{p['max']:.1f}) | {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['size_bytes'] / 2**20:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model sources, each optionally @runtime (torch, onnxruntime-genai, "
                                              "llama.cpp; default auto)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from lowbit.errors import LowbitError
    from lowbit.eval.speed import measure_speed

    results = []
    for spec in args.models:
        model, _, runtime = spec.partition("@")
        try:
            results.append(measure_speed(model, runtime or "auto", args.prompt_tokens, args.new_tokens, args.runs,
                                         args.warmup, args.threads))
        except LowbitError as exc:
            raise SystemExit(f"error: {spec}: {exc}") from None
    print(f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, median (min-max) of {args.runs} runs; "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
    print("| model | runtime | threads | prefill tok/s | decode tok/s | peak RSS MiB | size MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(row(r))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
