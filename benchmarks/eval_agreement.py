"""Issue #8's bars on the demo model: lowbit's task accuracy equals lm-eval's own HF backend, and `lowbit compare`
of float vs w_uint4 AWQ vs its ONNX export agrees with `lowbit eval` run separately.

    python benchmarks/eval_agreement.py --work /tmp/eval-agreement [--text FILE] [--num-calib-data 128]

Steps (each printed, with its figures): a LAMBADA-style task file cut from the text (the built-in pydoc evaluation
split by default: held out from calibration); the float demo through lowbit and through lm-eval's HFLM on the
demo's Hugging Face folder; an AWQ quantization with its ONNX export; `lowbit compare` of the three; `lowbit eval`
of each alone; and the ONNX export's tasks in onnxruntime-genai too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def lowbit(*argv: str) -> dict:
    """Run the lowbit CLI with --json and return its JSON (stderr passed through)."""
    out = subprocess.run([sys.executable, "-m", "lowbit", *argv, "--json"], stdout=subprocess.PIPE, text=True,
                         check=True)
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/eval-agreement", help="folder for the task, models and report")
    p.add_argument("--text", default=None, help="text file to cut the task from [default: pydoc eval split]")
    p.add_argument("--num-calib-data", default="128")
    p.add_argument("--max-chunks", default=None, help="perplexity windows [default: all]")
    args = p.parse_args()

    from lowbit.data import load_text
    from lowbit.eval.task_files import write_last_word_task
    from lowbit.eval.tasks import evaluate_tasks, run_tasks
    from lowbit.hf.weights_folder import weights_folder

    work = Path(args.work)
    tasks = work / "tasks"
    if not (tasks / "lambada_local.yaml").is_file():
        text = Path(args.text).read_text() if args.text else load_text("pydoc", "eval")
        write_last_word_task(text, tasks)
    docs = len((tasks / "lambada_local.jsonl").read_text().splitlines())
    print(f"task: {tasks / 'lambada_local.yaml'} ({docs} documents)")

    # 1. float demo: lowbit vs lm-eval's own HF backend on the demo's Hugging Face folder, both float32 on CPU
    from lm_eval.models.huggingface import HFLM

    t0 = time.perf_counter()
    ours = evaluate_tasks("demo", "lambada_local", task_dir=tasks)["tasks"]["lambada_local"]["metrics"]
    t1 = time.perf_counter()
    folder = weights_folder("demo")
    folder = folder if isinstance(folder, Path) else Path(folder[0] if isinstance(folder, tuple) else folder)
    theirs = run_tasks(HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=1), "lambada_local",
                       tasks)["lambada_local"]["metrics"]
    t2 = time.perf_counter()
    print("\n| float demo, lambada_local | acc | acc stderr | perplexity | seconds |\n|---|---|---|---|---|")
    for name, m, s in (("lowbit eval --tasks", ours, t1 - t0), ("lm-eval HFLM", theirs, t2 - t1)):
        print(f"| {name} | {m['acc,none']:.6f} | {m['acc_stderr,none']:.6f} | {m['perplexity,none']:.6f} | {s:.0f} |")
    print(f"equal: {ours == theirs}")

    # 2. AWQ w_uint4 g128 with its ONNX export
    awq, onnx = work / "awq", work / "awq-onnx"
    if not (awq / "summary.json").is_file():
        lowbit("quantize", "demo", "--scheme", "w_uint4_per_group_asym", "--algo", "awq", "-o", str(awq),
               "--num-calib-data", args.num_calib_data, "--export", "onnx", "--no-progress")
    chunks = ["--max-chunks", args.max_chunks] if args.max_chunks else []
    common = ["--dataset", "pydoc", *chunks, "--tasks", "lambada_local", "--task-dir", str(tasks)]

    # 3. lowbit compare, then lowbit eval of each model alone
    report = work / "report"
    models = {"float": "demo", "awq": str(awq), "awq-onnx": str(onnx)}
    compared = lowbit("compare", *(f"{k}={v}" for k, v in models.items()), "-o", str(report), "--overwrite",
                      *common, "--no-progress")
    rows = {r["name"]: r for r in compared["rows"]}
    print(f"\nreport: {', '.join(compared['files'].values())}")
    print("\n| model | compare ppl | eval ppl | compare acc | eval acc | size MiB | bits/weight | prefill tok/s | "
          "decode tok/s |\n|---|---|---|---|---|---|---|---|---|")
    agree = True
    for name, path in models.items():
        alone = lowbit("eval", path, *common, "--no-progress")
        row = rows[name]
        acc_c, acc_e = row["tasks"]["lambada_local"]["value"], alone["tasks"]["lambada_local"]["value"]
        agree &= row["perplexity"] == alone["perplexity"] and acc_c == acc_e
        print(f"| {name} | {row['perplexity']:.4f} | {alone['perplexity']:.4f} | {acc_c:.4f} | {acc_e:.4f} | "
              f"{row['size_bytes'] / 2**20:.1f} | {row['bits_per_weight']:.2f} | {row['prefill_tokens_per_s']:.1f} | "
              f"{row['decode_tokens_per_s']:.1f} |")
    print(f"compare agrees with eval: {agree}")

    # 4. the ONNX export's tasks in onnxruntime-genai as well
    genai = evaluate_tasks(str(onnx), "lambada_local", runtime="onnxruntime-genai", task_dir=tasks)
    m = genai["tasks"]["lambada_local"]["metrics"]
    print(f"\nawq-onnx in onnxruntime-genai: acc {m['acc,none']:.4f}, perplexity {m['perplexity,none']:.4f}")


if __name__ == "__main__":
    main()
