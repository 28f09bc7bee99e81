"""Peak memory of `lowbit eval` streamed one decoder block at a time vs the model held whole: the same
perplexity, less resident memory. Each run is its own process (peak RSS from os.wait4), alternating the two
modes; the first, unmeasured run warms the model's cache (a GGUF source is converted once).

    python benchmarks/streamed_memory.py [--model demo] [--seq-len 128] [--max-chunks 4] [--repeats 2]
                                         [--dtype float32] [--src src]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def run_eval(src: Path, model: str, flag: str, args) -> tuple[dict, int]:
    """(the JSON result, peak RSS bytes) of one `lowbit eval` process."""
    argv = [sys.executable, "-m", "lowbit", "eval", model, flag, "--seq-len", str(args.seq_len), "--max-chunks",
            str(args.max_chunks), "--dtype", args.dtype, "--json", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}")
    return json.loads(out), usage.ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-chunks", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src")
    args = p.parse_args()
    run_eval(args.src, args.model, "--no-stream", args)  # warm-up: caches, page cache
    rows = {"--no-stream": [], "--stream": []}
    for _ in range(args.repeats):
        for flag in rows:
            rows[flag].append(run_eval(args.src, args.model, flag, args))
    for flag, runs in rows.items():
        ppl = {r["perplexity"] for r, _ in runs}
        peaks = [rss / 2**20 for _, rss in runs]
        print(f"{flag:12s} perplexity {sorted(ppl)}  streamed={runs[0][0]['streamed']}  peak RSS MiB "
              f"{', '.join(f'{x:.0f}' for x in peaks)}  ({runs[0][0]['seconds']:.2f} s perplexity)")
    same = {r["perplexity"] for runs in rows.values() for r, _ in runs}
    print("identical perplexity" if len(same) == 1 else f"perplexities differ: {sorted(same)}")


if __name__ == "__main__":
    main()
