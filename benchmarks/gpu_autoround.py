"""AutoRound's speed on a GPU, side by side with Intel's auto-round at the same iterations, windows and batch: a seeded
random Llama-shaped model (no download: a BPE tokenizer trained on CPython's docs, random weights), lowbit's RTN,
GPTQ and AutoRound on --device cuda, then Intel's package on the same folder and windows
(benchmarks/peers/autoround_intel.py). Times only: a random model's perplexity means nothing.

    python benchmarks/gpu_autoround.py [--hidden 2048] [--layers 8] [--windows 64] [--seq-len 512] [--iters 200]
        [--batch 8] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(folder: Path, hidden: int, layers: int) -> None:
    """A BPE tokenizer trained on pydoc_data and a random Llama of the given width and depth, saved to folder."""
    import torch
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(topics.values()), trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<s>", "<pad>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 512,
                         max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=0, pad_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)


def timed(cmd: list[str], env: dict, timeout: int) -> dict:
    start = time.perf_counter()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    row = {"wall_seconds": round(time.perf_counter() - start, 2), "rc": run.returncode}
    lines = [x for x in run.stdout.splitlines() if x.startswith("{")]
    if lines:
        row["result"] = json.loads(lines[-1])
    if run.returncode:
        row["error"] = (run.stderr.strip().splitlines() or ["?"])[-1][:400]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--work", type=Path, default=Path("/tmp/lowbit-gpu-autoround"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--skip-intel", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", default="rtn,gptq,autoround", help="lowbit's chains to time")
    args = p.parse_args()
    model = args.work / "model"
    if not (model / "config.json").exists():
        build(model, args.hidden, args.layers)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from transformers import AutoTokenizer

    from lowbit.torch_job import calibration_windows

    windows = calibration_windows(AutoTokenizer.from_pretrained(model), {
        "dataset": "pydoc", "num_samples": args.windows, "seq_len": args.seq_len, "seed": 0})
    torch.save(windows, args.work / "windows.pt")
    rows = {"args": {k: str(v) for k, v in vars(args).items()},
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    common = ["--scheme", "w_uint4_per_group_asym", "--group-size", "128", "--num-calib-data", str(args.windows),
              "--seq-len", str(args.seq_len), "--batch-size", str(args.batch), "--device", args.device, "--no-progress",
              "--json", "--overwrite"]
    runs = {"lowbit rtn": ["rtn"], "lowbit gptq": ["gptq"],
            "lowbit autoround": ["autoround", "--algo-arg", f"autoround:iters={args.iters},batch_size={args.batch}"]}
    runs = {k: v for k, v in runs.items() if k.split()[1] in args.runs.split(",")}
    for label, algo in runs.items():
        rows[label] = timed([sys.executable, "-m", "lowbit", "quantize", str(model), "-o",
                             str(args.work / label.replace(" ", "-")), "--algo", *algo, *common], env, 400)
        res = rows[label].pop("result", {})
        rows[label].update({k: res.get(k) for k in ("seconds", "peak_rss_bytes", "mean_layer_error")})
        print(label, json.dumps(rows[label]), flush=True)
    if not args.skip_intel:
        rows["intel auto-round"] = timed([sys.executable, str(ROOT / "benchmarks/peers/autoround_intel.py"),
                                          str(model), str(args.work / "windows.pt"), str(args.work / "intel"),
                                          "--bits", "4", "--group-size", "128", "--iters", str(args.iters),
                                          "--batch-size", str(args.batch), "--device", args.device], env, 400)
        print("intel auto-round", json.dumps(rows["intel auto-round"]), flush=True)
    text = json.dumps(rows, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
