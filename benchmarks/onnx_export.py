"""lowbit's own ONNX export beside onnxruntime-genai's builder on the same model, in one run: decode tokens/s and
prefill time with onnxruntime-genai, perplexity with onnxruntime (onnx_perplexity, the same windows for all),
lowbit's fake-quant perplexity of each lowbit folder, and the size on disk.

    python benchmarks/onnx_export.py [--model demo] [--group-size 32] [--prompt-tokens 64] [--new-tokens 128]
                                     [--repeats 5] [--threads 1] [--max-chunks 8] [--json FILE] [--keep DIR]

Runs (RTN throughout):
- builder int4: `python -m onnxruntime_genai.models.builder -p int4 -e cpu` on the float folder; its CPU
  defaults are symmetric int4 in blocks of 32, accuracy level 4, an int4 lm_head and an embedding that reads
  the lm_head's int4 table;
- lowbit uint4 asym / int4 sym, every linear quantized (lm_head too, as the builder does), exported at accuracy
  level 4 with a 4-bit embedding (quantize_embedding=4): the builder's structure with lowbit's weights;
- the same asym folder at accuracy level 0 (float activations: exactly lowbit's weights, slower);
- lowbit's default (lm_head left float) at accuracy level 4;
- the builder's int4 of lowbit's asym folder exported in the AutoAWQ layout (the seed flow; zero points too).
Decode: batch 1, a prompt of the first --prompt-tokens tokens of the evaluation text, --new-tokens greedy tokens
(min_length forces them all), the models taking turns each repeat; medians reported. --threads sets every
session's intra-op threads (1 by default: the steadiest figure on a shared machine; compare ratios in one run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def builder_input(float_folder: Path, work: Path) -> Path:
    """The float folder as the builder reads it: its config needs `architectures`, which a folder converted
    from GGUF lacks; then a copy of the config with it set, the other files linked."""
    config = json.loads((float_folder / "config.json").read_text())
    if config.get("architectures"):
        return float_folder
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]]
    folder = work / "builder-input"
    folder.mkdir()
    for f in float_folder.iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name.startswith("model"))


def decode_speed(models: dict[str, Path], prompt, new_tokens: int, repeats: int, threads: int) -> dict:
    """{name: (median prefill s, median decode tokens/s)} with onnxruntime-genai, models taking turns."""
    import numpy as np
    import onnxruntime_genai as og

    loaded = {}
    for name, folder in models.items():
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        loaded[name] = og.Model(config)
    prompt = np.asarray(prompt, dtype=np.int32)
    total = len(prompt) + new_tokens
    times = {name: ([], []) for name in models}
    for r in range(repeats + 1):  # the first round warms up and is not counted
        for name, model in loaded.items():
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=total, min_length=total, do_sample=False)
            generator = og.Generator(model, params)
            t0 = time.perf_counter()
            generator.append_tokens(prompt)
            t1 = time.perf_counter()
            steps = 0
            while not generator.is_done():
                generator.generate_next_token()
                steps += 1
            t2 = time.perf_counter()
            if r:
                times[name][0].append(t1 - t0)
                times[name][1].append(steps / (t2 - t1))
    return {name: (statistics.median(p), statistics.median(d)) for name, (p, d) in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-chunks", type=int, default=8)
    ap.add_argument("--json", default="onnx_export_benchmark.json")
    ap.add_argument("--keep", default=None, help="write the models here instead of a temporary folder")
    args = ap.parse_args()

    from lowbit.api import evaluate, quantize
    from lowbit.data import eval_windows, load_text, tokenize
    from lowbit.eval.onnx_perplexity import onnx_perplexity
    from lowbit.exporters.hf_int import export_hf_int
    from lowbit.exporters.onnx import export_onnx
    from lowbit.hf.model import open_model

    load_before = os.getloadavg()
    source = open_model(args.model)
    tokenizer = source.tokenizer()
    ids = tokenize(tokenizer, load_text("pydoc", "eval"))
    windows = eval_windows(ids, args.seq_len, args.max_chunks)
    prompt = ids[: args.prompt_tokens].tolist()
    g = args.group_size
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        onnx_models, lowbit_folders, rows = {}, {}, {}

        t0 = time.perf_counter()
        builder = work / "builder-int4"
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                        str(builder_input(source.folder, work)), "-o", str(builder), "-p", "int4", "-e", "cpu"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        onnx_models["builder int4 (sym g32, acc 4)"] = builder
        rows["builder int4 (sym g32, acc 4)"] = {"build_s": time.perf_counter() - t0}

        quant = dict(group_size=g, progress=False, quiet=True, algo="rtn")
        runs = [  # (label, lowbit folder key, scheme, exclude_layers, accuracy_level, quantize_embedding)
            (f"lowbit uint4 asym g{g}, acc 4, emb4", "asym-all", "w_uint4_per_group_asym", [], 4, 4),
            (f"lowbit int4 sym g{g}, acc 4, emb4", "sym-all", "w_int4_per_group_sym", [], 4, 4),
            (f"lowbit uint4 asym g{g}, acc 0, float emb", "asym-all", "w_uint4_per_group_asym", [], 0, None),
            (f"lowbit uint4 asym g{g} default (float lm_head), acc 4", "asym-default", "w_uint4_per_group_asym",
             None, 4, None),
        ]
        for label, key, scheme, exclude, level, emb in runs:
            t0 = time.perf_counter()
            if key not in lowbit_folders:
                lowbit_folders[key] = work / f"lowbit-{key}"
                quantize(args.model, lowbit_folders[key], scheme=scheme, exclude_layers=exclude, **quant)
            t1 = time.perf_counter()
            out = export_onnx(lowbit_folders[key], work / f"onnx-{len(onnx_models)}", accuracy_level=level,
                              quantize_embedding=emb)
            onnx_models[label] = out
            rows[label] = {"lowbit_folder": key, "quantize_s": t1 - t0, "export_s": time.perf_counter() - t1}
            print(f"{label}: exported in {rows[label]['export_s']:.1f} s", flush=True)

        t0 = time.perf_counter()  # the builder on lowbit's asymmetric weights: its MatMulNBits carry zero points too
        awq = export_hf_int(lowbit_folders["asym-all"], work / "awq-asym-all", "awq")
        from_awq = work / "builder-from-awq"
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(awq), "-o", str(from_awq),
                        "-p", "int4", "-e", "cpu"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        label = f"builder int4 from lowbit's AWQ-layout export (uint4 asym g{g}, acc 4)"
        onnx_models[label] = from_awq
        rows[label] = {"lowbit_folder": "asym-all", "build_s": time.perf_counter() - t0}

        fake_quant = {key: evaluate(str(folder), seq_len=args.seq_len, max_chunks=args.max_chunks, progress=False)
                      for key, folder in lowbit_folders.items()}
        float_ppl = evaluate(args.model, seq_len=args.seq_len, max_chunks=args.max_chunks, progress=False)
        for label, folder in onnx_models.items():
            rows[label]["onnx_perplexity"] = onnx_perplexity(folder, windows, progress=False).perplexity
            rows[label]["size_bytes"] = folder_bytes(folder)
            if "lowbit_folder" in rows[label]:
                rows[label]["fake_quant_perplexity"] = fake_quant[rows[label]["lowbit_folder"]]["perplexity"]
            print(f"{label}: onnx perplexity {rows[label]['onnx_perplexity']:.4f}", flush=True)

        load_decode = os.getloadavg()
        speeds = decode_speed(onnx_models, prompt, args.new_tokens, args.repeats, args.threads)
        for label, (prefill, decode) in speeds.items():
            rows[label].update(prefill_s=prefill, decode_tokens_per_s=decode)
    load_after = os.getloadavg()

    reference = speeds["builder int4 (sym g32, acc 4)"][1]
    print()
    print(f"model {args.model}; perplexity on {windows.shape[0]} x {args.seq_len} pydoc windows (float "
          f"{float_ppl['perplexity']:.3f}); decode: prompt {len(prompt)}, {args.new_tokens} new tokens, "
          f"{args.repeats} repeats (median), {args.threads} thread(s); {platform.machine()}, {os.cpu_count()} "
          f"cores, load average {load_before[0]:.2f} before, {load_decode[0]:.2f} at decode, {load_after[0]:.2f} after")
    print("| model | fake-quant ppl | onnxruntime ppl | decode tok/s | vs builder | prefill ms | size MB |")
    print("|---|---|---|---|---|---|---|")
    for label, row in rows.items():
        fq = f"{row['fake_quant_perplexity']:.3f}" if "fake_quant_perplexity" in row else "-"
        print(f"| {label} | {fq} | {row['onnx_perplexity']:.3f} | {row['decode_tokens_per_s']:.1f} | "
              f"{row['decode_tokens_per_s'] / reference:.2f}x | {1e3 * row['prefill_s']:.0f} | "
              f"{row['size_bytes'] / 1e6:.0f} |")
    import onnxruntime
    import onnxruntime_genai

    record = {"model": args.model, "args": vars(args), "float_perplexity": float_ppl["perplexity"], "rows": rows,
              "load_average": {"before": load_before, "decode": load_decode, "after": load_after},
              "cpu_count": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
              "onnxruntime_genai": onnxruntime_genai.__version__}
    Path(args.json).write_text(json.dumps(record, indent=2))
    print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()
