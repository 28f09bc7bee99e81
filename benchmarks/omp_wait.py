"""OpenMP wait policy under a busy core: AWQ's scale and clip searches (one 576 x 1536 weight, group 128) timed
with OMP_WAIT_POLICY=ACTIVE (spinning threads) and PASSIVE (lowbit's default), each in a fresh process, while
one other process keeps a core busy, as on a shared machine or beside onnxruntime's threads.

    python benchmarks/omp_wait.py [--threads 2] [--busy 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import lowbit, time, torch
from lowbit.algorithms.awq import search_clip, search_scales
from lowbit.algorithms.stats import InputStats
from lowbit.spec import parse_scheme
torch.set_num_threads(THREADS)
spec = parse_scheme("w_uint4_per_group_asym", 128).weight
g = torch.Generator().manual_seed(0)
stats = InputStats(1536); stats.add(torch.randn(4096, 1536, generator=g))
w = torch.randn(576, 1536, generator=g)
t = time.perf_counter(); search_scales([w], [spec], stats, 20); a = time.perf_counter() - t
t = time.perf_counter(); search_clip(w, spec, stats.gram, 20); b = time.perf_counter() - t
print(round(a, 3), round(b, 3))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--busy", type=int, default=2, help="busy processes beside the measurement [default: 2]")
    args = ap.parse_args()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        for policy in ("ACTIVE", "PASSIVE"):
            out = subprocess.run([sys.executable, "-c", CHILD.replace("THREADS", str(args.threads))], check=True,
                                 capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": policy})
            scales, clip = map(float, out.stdout.split())
            print(json.dumps({"policy": policy, "threads": args.threads, "busy": args.busy, "scales_s": scales,
                              "clip_s": clip}))
    finally:
        for p in busy:
            p.kill()


if __name__ == "__main__":
    main()
