"""K-quant GGUF files from lowbit against llama.cpp's own quantizer, side by side in one run, both evaluated by
llama.cpp itself: perplexity, KL divergence of the token distributions from the reference file's, file size and
quantization time.

Both quantizers start from the same weights: the model is first quantized by lowbit to 8-bit integers in groups
of 32 (RTN) and written as a Q8_0 GGUF (an exact copy of lowbit's codes), the reference. llama.cpp's quantizer
(llama-cpp-python's `llama_model_quantize`, with requantization allowed) turns that file into each mix; lowbit
writes the same mix from the same 8-bit folder (`export --gguf-type MIX`). Perplexity and KL are computed from
llama.cpp's logits over the same token windows (each window from an empty cache); KL is the mean over predicted
tokens of KL(reference || quantized). With --imatrix-windows N, lowbit also writes each mix weighted by its own
importance matrix (`lowbit imatrix` over N calibration windows of the same text, disjoint from the evaluation
windows): llama.cpp's quantizer cannot take one through llama-cpp-python (its imatrix is a C++ map), so its
imatrix row needs the llama-quantize binary and is not in this table.

    python benchmarks/gguf_kquants.py [--model demo] [--mixes q6_k,q5_k_m,q4_k_m,q3_k_m,q2_k]
        [--dataset pydoc] [--eval-chunks 8] [--seq-len 512] [--imatrix-windows 32] [--work /tmp/lowbit-kquants]
        [--json-out FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def llama_cpp_quantize(src: Path, out: Path, mix: str) -> float:
    """llama.cpp's quantizer on src into the mix; returns seconds."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix.upper()}")
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    start = time.perf_counter()
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0:
        raise RuntimeError(f"llama_model_quantize returned {code} for {mix}")
    return time.perf_counter() - start


def window_logprobs(path: Path, windows: torch.Tensor):
    """Per window, llama.cpp's next-token log-probabilities (seq_len - 1, vocab), float32."""
    from lowbit.runtimes import open_llama

    llm = open_llama(path, windows.shape[1], os.cpu_count())
    try:
        for w in windows:
            llm.reset()
            llm.eval(w.tolist())
            logits = torch.from_numpy(llm.scores[: windows.shape[1] - 1]).float()
            yield torch.log_softmax(logits, -1)
    finally:
        llm.close()


def measure(path: Path, windows: torch.Tensor, reference: list | None) -> dict:
    """Perplexity (and KL from the reference log-probabilities, when given) of a GGUF file in llama.cpp."""
    nll, kl, tokens = 0.0, 0.0, 0
    kept = []
    for i, logp in enumerate(window_logprobs(path, windows)):
        targets = windows[i, 1:]
        nll -= float(logp.gather(1, targets[:, None]).sum())
        tokens += targets.numel()
        if reference is None:
            kept.append(logp.half())
        else:
            ref = reference[i].float()
            kl += float((ref.exp() * (ref - logp)).sum())
    row = {"perplexity": round(float(torch.exp(torch.tensor(nll / tokens))), 4), "size_mib":
           round(path.stat().st_size / 2**20, 2)}
    if reference is not None:
        row["kl"] = round(kl / tokens, 5)
    return row, kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--mixes", default="q6_k,q5_k_m,q4_k_m,q3_k_m,q2_k")
    p.add_argument("--dataset", default="pydoc")
    p.add_argument("--eval-chunks", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--work", type=Path, default=Path("/tmp/lowbit-kquants"))
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--imatrix-windows", type=int, default=0, help="also lowbit with its imatrix over N windows")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lowbit.api import quantize
    from lowbit.data import eval_windows, load_text, tokenize
    from lowbit.exporters.gguf import export_gguf
    from lowbit.hf.model import open_model

    args.work.mkdir(parents=True, exist_ok=True)
    base = quantize(args.model, args.work / "w8", scheme="w_int8_per_group_sym", group_size=32, progress=False,
                    quiet=True, overwrite=True).output
    reference_file = export_gguf(base, args.work / "reference-q8_0.gguf", overwrite=True)
    windows = eval_windows(tokenize(open_model(args.model).tokenizer(), load_text(args.dataset, "eval")),
                           args.seq_len, args.eval_chunks)
    imatrix = None
    if args.imatrix_windows:
        from lowbit.imatrix import compute_imatrix

        start = time.perf_counter()
        imatrix = compute_imatrix(args.model, args.work / "imatrix.gguf", dataset=args.dataset,
                                  num_calib_data=args.imatrix_windows, seq_len=args.seq_len, overwrite=True,
                                  progress=False)
        print(f"imatrix over {args.imatrix_windows} windows in {time.perf_counter() - start:.0f} s", flush=True)
    ref_row, reference = measure(reference_file, windows, None)
    rows = [{"tool": "reference (lowbit w8 g32 -> Q8_0)", "mix": "q8_0", **ref_row}]
    print(json.dumps(rows[-1]), flush=True)
    for mix in args.mixes.split(","):
        out = args.work / f"llama-cpp-{mix}.gguf"
        seconds = llama_cpp_quantize(reference_file, out, mix)
        rows.append({"tool": "llama.cpp", "mix": mix, "seconds": round(seconds, 2), **measure(out, windows,
                                                                                              reference)[0]})
        print(json.dumps(rows[-1]), flush=True)
        out = args.work / f"lowbit-{mix}.gguf"
        start = time.perf_counter()
        export_gguf(base, out, overwrite=True, quant_type=mix)
        rows.append({"tool": "lowbit", "mix": mix, "seconds": round(time.perf_counter() - start, 2),
                     **measure(out, windows, reference)[0]})
        print(json.dumps(rows[-1]), flush=True)
        if imatrix is not None:
            out = args.work / f"lowbit-imatrix-{mix}.gguf"
            start = time.perf_counter()
            export_gguf(base, out, overwrite=True, quant_type=mix, imatrix=imatrix)
            rows.append({"tool": "lowbit + imatrix", "mix": mix, "seconds": round(time.perf_counter() - start, 2),
                         **measure(out, windows, reference)[0]})
            print(json.dumps(rows[-1]), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "windows": list(windows.shape),
              "rows": rows}
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    print("| tool | mix | size MiB | perplexity | KL | seconds |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tool']} | {r['mix']} | {r['size_mib']} | {r['perplexity']} | {r.get('kl', '')} | "
              f"{r.get('seconds', '')} |")


if __name__ == "__main__":
    main()
