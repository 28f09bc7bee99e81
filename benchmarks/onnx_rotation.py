"""QuaRot R1 before weight-only quantization on the ONNX graph: each chain quantized by lowbit's ONNX front end
(one `lowbit quantize` process per chain), then the perplexity of every output in onnxruntime on the same
windows, beside the float model.

    python benchmarks/onnx_rotation.py [--model ONNX_FOLDER] [--scheme w_uint4_per_group_asym] [--block 128]
        [--calib 32] [--max-chunks 16] [--chains awq rotation,awq rotation,gptq rotation,awq,gptq]
        [--timeout 1800] [--json FILE] [--work DIR]

Every run calibrates on --calib windows of 512 tokens of the pydoc calibration split (seed 0); perplexity is
on the first --max-chunks 512-token windows of the pydoc evaluation split (what `lowbit eval OUT --max-chunks
N` measures). "quantize s" is the summary's `quantize` seconds (rotation and calibration included, loading and
writing not). The model defaults to the onnxruntime-genai builder's fp32 CPU export of the demo model (made
in --work when not given). lm_head stays float (lowbit's default); a tied embedding is untied by the rotation,
so a rotated output of a tied model carries a second float table (the size column shows it).
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

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from onnx_export import folder_bytes  # noqa: E402
from onnx_frontend import demo_fp32, lowbit_row, make_data  # noqa: E402

DEFAULT_CHAINS = ["awq", "rotation,awq", "rotation,gptq", "rotation,awq,gptq"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="float ONNX folder [default: the builder's fp32 demo export]")
    ap.add_argument("--scheme", default="w_uint4_per_group_asym")
    ap.add_argument("--block", type=int, default=128, help="group size [default: 128]")
    ap.add_argument("--calib", type=int, default=32, help="calibration windows of 512 tokens [default: 32]")
    ap.add_argument("--max-chunks", type=int, default=16, help="evaluation windows of 512 tokens [default: 16]")
    ap.add_argument("--chains", nargs="+", default=DEFAULT_CHAINS, help="algorithm chains, one per run "
                                                                         f"[default: {' '.join(DEFAULT_CHAINS)}]")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed per quantization [default: 1800]")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--work", default=None, help="keep outputs here [default: a temporary folder]")
    args = ap.parse_args()
    import torch

    from lowbit.eval.onnx_perplexity import onnx_perplexity

    work = Path(args.work or tempfile.mkdtemp(prefix="onnx-rotation-"))
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else demo_fp32(work)
    windows = torch.from_numpy(np.load(make_data(model, work, args.calib, args.max_chunks))["eval"])
    float_ppl = onnx_perplexity(model, windows, progress=False).perplexity
    rows = [{"algo": "float", "out": str(model), "perplexity": round(float_ppl, 4),
             "size_mib": round(folder_bytes(model) / 2**20, 1), "error": None}]
    for chain in args.chains:
        row = lowbit_row(model, work, chain, args.scheme, args.block, args.calib, args.timeout)
        if row["error"] is None:
            row["perplexity"] = round(onnx_perplexity(row["out"], windows, progress=False).perplexity, 4)
            row["size_mib"] = round(folder_bytes(Path(row["out"])) / 2**20, 1)
            summary = json.loads((Path(row["out"]) / "summary.json").read_text())
            row["rotation_seconds"] = summary["seconds"].get("rotation")
        rows.append(row)
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"\n{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; {args.scheme} group "
          f"{args.block}, {args.calib} x 512 calibration, {len(windows)} x 512 evaluation windows (pydoc)\n")
    print("| chain | perplexity | vs float | quantize s | of which rotation s | size MiB | error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ppl = r.get("perplexity")
        rel = f"{(ppl / float_ppl - 1) * 100:+.1f}%" if ppl else ""
        print(f"| {r['algo']} | {ppl or ''} | {rel} | {r.get('quantize_seconds', '')} | "
              f"{r.get('rotation_seconds') or ''} | {r.get('size_mib', '')} | {r.get('error') or ''} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
