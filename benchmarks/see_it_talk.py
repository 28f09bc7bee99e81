"""See a quantized model talk in every runtime it is exported to, side by side in one run: the float model, its
lowbit folder (torch), the GGUF export (llama.cpp), the ONNX export (onnxruntime-genai), the AutoAWQ and
compressed-tensors exports (torch), each answering the same prompts greedily (`lowbit compare --prompts`) with its
perplexity on the same windows and its size on disk.

    python benchmarks/see_it_talk.py [--model demo] [--scheme w_uint4_per_group_asym] [--group-size 32]
        [--algo rtn] [--prompts FILE] [--max-new-tokens 24] [--max-chunks 8] [--work /tmp/lowbit-talk]
        [--json-out FILE]

Without --prompts it asks three short questions of its own (a fact, code, a chat question). The report (table,
JSON, HTML with the answers) is written under --work/report; --json-out copies compare.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = ["The capital of France is", "def fibonacci(n):", "What is the boiling point of water at sea level?"]


def lowbit(*args: str) -> None:
    print("$ lowbit " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "lowbit", *args], check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--scheme", default="w_uint4_per_group_asym")
    p.add_argument("--group-size", default="32", help="32: the GGUF export writes Q4_1 from the stored codes")
    p.add_argument("--algo", default="rtn")
    p.add_argument("--prompts", default=None, help="a file of prompts, one per line [default: three built in]")
    p.add_argument("--max-new-tokens", default="24")
    p.add_argument("--max-chunks", default="8")
    p.add_argument("--work", default="/tmp/lowbit-talk")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    prompts = Path(args.prompts) if args.prompts else work / "prompts.txt"
    if not args.prompts:
        prompts.write_text("\n".join(PROMPTS) + "\n")
    out = work / "q"
    t0 = time.perf_counter()
    lowbit("quantize", args.model, "-o", str(out), "--scheme", args.scheme, "--group-size", args.group_size,
           "--algo", args.algo, "--export", "gguf,onnx,awq,compressed-tensors", "--no-progress")
    lowbit("compare", f"float={args.model}", f"lowbit={out}", f"gguf={out}.gguf", f"onnx={out}-onnx",
           f"awq={out}-awq", f"compressed-tensors={out}-compressed-tensors", "-o", str(work / "report"),
           "--prompts", str(prompts), "--max-new-tokens", args.max_new_tokens, "--max-chunks", args.max_chunks,
           "--no-speed", "--no-progress")
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    report = json.loads((work / "report" / "compare.json").read_text())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
