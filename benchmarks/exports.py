"""Each export format run by its consumer, against lowbit's own perplexity of the same quantized weights, in
one run: AutoAWQ and GPTQ through onnxruntime-genai's model builder (int4, default accuracy level 4 and float
activations, level 1) and onnxruntime; GGUF through llama.cpp (llama-cpp-python); lowbit's own ONNX through
onnxruntime; compressed-tensors through transformers.

    python benchmarks/exports.py [--model demo] [--scheme w_uint4_per_group_asym] [--group-size 32]
                                 [--algo awq] [--dataset pydoc] [--seq-len 512] [--max-chunks N] [--json OUT]

Every figure is computed on the same token windows (lowbit's tokenizer, the standard perplexity protocol).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# lowbit leaves lm_head (and so a tied embedding) float; the builder's -p int4 would quantize both by RTN
EXCLUDE = "nodes_to_exclude=/lm_head/MatMul,/model/embed_tokens/Gather"


def run(argv: list[str]) -> float:
    """Run a command, fail loudly, return its wall seconds."""
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--scheme", default="w_uint4_per_group_asym")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--algo", default="awq")
    ap.add_argument("--dataset", default="pydoc")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-chunks", type=int, default=None)
    ap.add_argument("--formats", default="awq,gptq,gguf,onnx,compressed-tensors")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    from lowbit.api import evaluate
    from lowbit.data import eval_windows, load_text, tokenize
    from lowbit.hf.model import open_model

    lowbit = [sys.executable, "-m", "lowbit"]
    formats = args.formats.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q"
        t = run([*lowbit, "quantize", args.model, "-o", str(out), "--scheme", args.scheme, "--group-size",
                 str(args.group_size), "--algo", args.algo, "--no-progress"])
        print(f"quantized {args.model} ({args.scheme} g{args.group_size}, {args.algo}) in {t:.1f} s", flush=True)
        loaded = open_model(out)
        windows = eval_windows(tokenize(loaded.tokenizer(), load_text(args.dataset, "eval")), args.seq_len,
                               args.max_chunks)
        ref = evaluate(out, dataset=args.dataset, seq_len=args.seq_len, max_chunks=args.max_chunks,
                       progress=False)["perplexity"]
        rows.append({"consumer": "lowbit (fake-quant, torch float32)", "format": "lowbit", "perplexity": ref})
        print(f"lowbit: {ref:.4f}", flush=True)

        def add(consumer: str, fmt: str, ppl: float, export_s: float, extra: dict | None = None) -> None:
            rows.append({"consumer": consumer, "format": fmt, "perplexity": ppl, "vs_lowbit": ppl / ref - 1,
                         "export_seconds": round(export_s, 2), **(extra or {})})
            print(f"{fmt} / {consumer}: {ppl:.4f} ({ppl / ref - 1:+.2%})", flush=True)

        for fmt in formats:
            target = Path(tmp) / ("q.gguf" if fmt == "gguf" else f"q-{fmt}")
            export_s = run([*lowbit, "export", str(out), "-f", fmt, "-o", str(target)])
            if fmt in ("awq", "gptq"):
                from lowbit.eval.onnx_perplexity import onnx_perplexity

                for level in (4, 1):
                    built = Path(tmp) / f"{fmt}-onnx-{level}"
                    build_s = run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(target),
                                   "-o", str(built), "-p", "int4", "-e", "cpu", "--extra_options",
                                   EXCLUDE, f"accuracy_level={level}"])
                    ppl = onnx_perplexity(built, windows, progress=False).perplexity
                    add(f"onnxruntime-genai builder int4 (accuracy_level {level}) + onnxruntime", fmt, ppl,
                        export_s, {"builder_seconds": round(build_s, 1)})
            elif fmt == "gguf":
                from lowbit.eval.llama_cpp import gguf_perplexity

                add("llama.cpp (llama-cpp-python)", fmt, gguf_perplexity(target, windows, progress=False).perplexity,
                    export_s)
            elif fmt == "onnx":
                from lowbit.eval.onnx_perplexity import onnx_perplexity

                add("onnxruntime", fmt, onnx_perplexity(target, windows, progress=False).perplexity, export_s)
            elif fmt == "compressed-tensors":
                ppl = evaluate_compressed_tensors(target, windows)
                add("transformers + compressed-tensors", fmt, ppl, export_s)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "args": vars(args), "rows": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def evaluate_compressed_tensors(folder: Path, windows):
    """Perplexity of a compressed-tensors folder as transformers loads it (decompressed to float32)."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from lowbit.eval.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    return perplexity(model.eval(), windows, progress=False).perplexity


if __name__ == "__main__":
    main()
