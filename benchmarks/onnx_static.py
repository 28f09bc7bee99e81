"""INT8 static quantization of an ONNX decoder (QDQ; weights and activations) with and without QuaRot R1 and
SmoothQuant on the graph, and the per-layer activation remedies: one `lowbit quantize` process per variant
(stopped after --timeout seconds), then perplexity of each in onnxruntime on the same windows, as a markdown
table with the command of every row.

    python benchmarks/onnx_static.py --model ONNX_FOLDER [--calib 32] [--max-chunks 8] [--work DIR]
                                     [--variants plain,sq,rot,rs,rs_i16down,...] [--timeout 900] [--json FILE]

Variants (chain, scheme, extra CLI options): see VARIANTS. Perplexity: the first --max-chunks 512-token windows
of the pydoc evaluation split (what `lowbit eval OUT --max-chunks N` measures), onnxruntime's default session
(graph optimizations on, so fused int8 kernels where onnxruntime picks them).
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from onnx_frontend import run_measured  # noqa: E402

PT, PC = "w_int8_a_int8_per_tensor_sym", "w_int8_a_int8_per_channel_sym"
RS = "rotation,smoothquant"
VARIANTS = {  # name -> (chain, scheme, extra `lowbit quantize` options)
    "plain": ("rtn", PT, []),
    "sq": ("smoothquant", PT, []),
    "rot": ("rotation", PT, []),
    "rs": (RS, PT, []),
    "rs_i16down": (RS, PT, ["--int16-inputs", "down_proj"]),
    "rs_fdown": (RS, PT, ["--float-inputs", "down_proj"]),
    "rs_pc": (RS, PC, []),
    "rs_pct": (RS, PT, ["--calibrate-method", "percentile"]),
    "rs_entropy": (RS, PT, ["--calibrate-method", "entropy"]),
    "rs_rr": (RS, PT, ["--reduce-range"]),
    "rs_pc_rr": (RS, PC, ["--reduce-range"]),
    "rs_a06": (RS, PT, ["--algo-arg", "smoothquant:alpha=0.6"]),
    "rs_a08": (RS, PT, ["--algo-arg", "smoothquant:alpha=0.8"]),
    "rs_pc_a06": (RS, PC, ["--algo-arg", "smoothquant:alpha=0.6"]),
    "rs_pc_a06_entropy": (RS, PC, ["--algo-arg", "smoothquant:alpha=0.6", "--calibrate-method", "entropy"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", type=int, default=32, help="calibration windows of 512 tokens [default: 32]")
    ap.add_argument("--max-chunks", type=int, default=8, help="evaluation windows of 512 tokens [default: 8]")
    ap.add_argument("--variants", default="plain,sq,rot,rs,rs_i16down",
                    help=f"comma-separated, from {','.join(VARIANTS)}")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per quantization [default: 900]")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--work", default=None, help="keep outputs here [default: a temporary folder]")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from lowbit.data import eval_windows, load_text, tokenize
    from lowbit.eval.onnx_perplexity import onnx_perplexity

    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="onnx-static-"))
    work.mkdir(parents=True, exist_ok=True)
    windows = eval_windows(tokenize(AutoTokenizer.from_pretrained(args.model), load_text("pydoc", "eval")), 512,
                           args.max_chunks)
    float_ppl = onnx_perplexity(args.model, windows, progress=False).perplexity
    print(json.dumps({"float": float_ppl}), file=sys.stderr, flush=True)
    rows = []
    for name in args.variants.split(","):
        chain, scheme, extra = VARIANTS[name]
        out = work / name
        cmd = [sys.executable, "-m", "lowbit", "quantize", args.model, "-o", str(out), "--scheme", scheme,
               "--algo", chain, "--num-calib-data", str(args.calib), *extra, "--json", "--no-progress",
               "--overwrite"]
        code, wall, rss, stdout = run_measured(cmd, work / f"{name}.log", args.timeout)
        row = {"name": name, "chain": chain, "scheme": scheme, "options": " ".join(extra),
               "command": " ".join(["lowbit"] + cmd[3:]), "wall_s": round(wall, 1), "peak_rss_mib": round(rss),
               "error": None}
        if code != 0:
            row["error"] = f"stopped after {args.timeout:.0f} s" if code is None else \
                ((work / f"{name}.log").read_text().strip().splitlines() or ["?"])[-1]
        else:
            summary = json.loads(stdout.strip().splitlines()[-1])
            row["seconds"] = summary["seconds"]
            row["perplexity"] = round(onnx_perplexity(out, windows, progress=False).perplexity, 4)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"\n{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; {args.calib} x 512 "
          f"calibration, {len(windows)} x 512 evaluation windows (pydoc), float {float_ppl:.4f}\n")
    print("| variant | chain | scheme | options | perplexity | vs float | quantize s | wall s | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ppl = r.get("perplexity")
        rel = f"{(ppl / float_ppl - 1) * 100:+.1f}%" if ppl else ""
        print(f"| {r['name']} | {r['chain']} | {r['scheme']} | {r['options']} | {ppl or ''} | {rel} | "
              f"{r.get('seconds', {}).get('quantize', '')} | {r['wall_s']} | {r['error'] or ''} |")
    print("\ncommands:")
    for r in rows:
        print(f"- {r['name']}: `{r['command']}`")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
