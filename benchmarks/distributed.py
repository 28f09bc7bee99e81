"""One process against N (torch.distributed, gloo, `lowbit quantize --nproc N`) on this machine: wall time, each
rank's peak memory, the payload each rank puts into collectives, how many codes differ from the one-process
output, and the perplexity of both; then the communication a block costs as a function of hidden size and
rank count, from the shapes (the same accounting as the measured payload, which checks it).

    python benchmarks/distributed.py [--model demo] [--algos rtn,awq,gptq] [--nproc 2] [--num-calib-data 32]
                                     [--seq-len 512] [--eval-chunks 16] [--work /tmp/lowbit-distributed]
                                     [--out benchmarks/results/distributed.json]

Each configuration runs as its own command, with the machine's cores split between the ranks
(OMP_NUM_THREADS = cores / N), as torchrun users would run it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
SCHEME = ["--scheme", "w_uint4_per_group_asym", "--group-size", "64"]  # 576 columns: 9 groups of 64


def lowbit(args: list[str], threads: int) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "lowbit", *args], env=env, text=True, capture_output=True)
    if run.returncode != 0:
        raise SystemExit(f"lowbit {' '.join(args)} failed:\n{run.stderr[-3000:]}")
    return run, time.perf_counter() - start


def quantize(model: str, out: Path, algo: str, nproc: int, args) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["quantize", model, "-o", str(out), *SCHEME, "--algo", algo, "--num-calib-data", str(args.num_calib_data),
           "--seq-len", str(args.seq_len), "--no-progress", "--json"] + (["--nproc", str(nproc)] if nproc > 1 else [])
    _, wall = lowbit(cmd, max(1, (os.cpu_count() or 1) // nproc))
    s = json.loads((out / "summary.json").read_text())
    per = s.get("per_rank", {"peak_rss_bytes": [s["peak_rss_bytes"]], "collective_bytes": [0]})
    blocks = len(s["block_seconds"])
    return {"ranks": nproc, "wall_s": round(wall, 1), "quantize_s": s["seconds"]["quantize"],
            "peak_rss_mib": [round(b / 2**20) for b in per["peak_rss_bytes"]],
            "collective_mib_per_block": [round(b / blocks / 2**20, 3) for b in per["collective_bytes"]]}


def perplexity(folder: Path, args) -> float:
    run, _ = lowbit(["eval", str(folder), "--seq-len", "512", "--max-chunks", str(args.eval_chunks), "--json",
                     "--no-progress"], os.cpu_count() or 1)
    return json.loads(run.stdout)["perplexity"]


# -- communication per block, from the shapes --------------------------------------------------------------------
def block_payload(h: int, inter: int, q_out: int, kv_out: int, algo: str, ranks: int) -> dict:
    """Bytes one rank puts into collectives for one Llama block (what parallel.Ranks counts): the statistics of
    the four stage inputs all-reduced (count float64; Gram K x K float32 for GPTQ and AWQ; |x| sums float64 and
    maxima float32 per channel for AWQ and SmoothQuant), and its share (1/N) of the block's quantized weights
    (codes one byte each, float32 scales and uint8-range zero points per group of 64), sent once to every rank
    (all-gather). A ring all-reduce moves 2 (N-1)/N of its payload in and out of each rank."""
    stages = [h, q_out, h, inter]  # q/k/v, o, gate/up, down: each stage's input width
    rows = [q_out + 2 * kv_out, h, 2 * inter, h]
    reduce = 0
    for k in stages:
        reduce += 8
        if algo in ("gptq", "awq"):
            reduce += 4 * k * k
        if algo in ("awq", "smoothquant"):
            reduce += 12 * k
    weights = sum(r * k + r * -(-k // 64) * 8 for r, k in zip(rows, stages))
    return {"all_reduce": reduce, "shared_results": weights // ranks,
            "ring_traffic_per_rank": int(2 * (ranks - 1) / ranks * reduce + (ranks - 1) / ranks * weights)}


SHAPES = {  # hidden, intermediate, q out, k/v out
    "SmolLM2-135M (576)": (576, 1536, 576, 192),
    "Llama-3.2-1B (2048)": (2048, 8192, 2048, 512),
    "Llama-3-8B (4096)": (4096, 14336, 4096, 1024),
    "Llama-3-70B (8192)": (8192, 28672, 8192, 1024),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--algos", default="rtn,awq,gptq")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--num-calib-data", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-chunks", type=int, default=16)
    p.add_argument("--work", type=Path, default=Path("/tmp/lowbit-distributed"))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "distributed.json")
    args = p.parse_args()
    sys.path.insert(0, str(SRC))
    from lowbit.exporters.native import compare_folders

    results = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "model": args.model,
               "num_calib_data": args.num_calib_data, "seq_len": args.seq_len, "runs": {}}
    for algo in args.algos.split(","):
        one = quantize(args.model, args.work / f"{algo}-1", algo, 1, args)
        many = quantize(args.model, args.work / f"{algo}-{args.nproc}", algo, args.nproc, args)
        diff = compare_folders(args.work / f"{algo}-1", args.work / f"{algo}-{args.nproc}")
        ppl = [perplexity(args.work / f"{algo}-{n}", args) for n in (1, args.nproc)]
        results["runs"][algo] = {"one": one, "many": many, "codes": diff["codes"],
                                 "codes_differing": diff["codes_differing"],
                                 "other_tensors_differing": diff["tensors_differing"], "perplexity": ppl,
                                 "perplexity_change": (ppl[1] - ppl[0]) / ppl[0]}
        print(f"{algo:5s} 1 rank {one['wall_s']:7.1f} s (quantize {one['quantize_s']:.1f} s), peak "
              f"{one['peak_rss_mib']} MiB | {args.nproc} ranks {many['wall_s']:7.1f} s (quantize "
              f"{many['quantize_s']:.1f} s), peaks {many['peak_rss_mib']} MiB, collectives "
              f"{many['collective_mib_per_block']} MiB/block | codes differing {diff['codes_differing']} of "
              f"{diff['codes']} | ppl {ppl[0]:.4f} vs {ppl[1]:.4f}", flush=True)
    results["payload_per_block"] = {
        name: {algo: {n: block_payload(*shape, algo, n) for n in (2, 4, 8)} for algo in ("gptq", "awq", "rtn")}
        for name, shape in SHAPES.items()}
    for name, by_algo in results["payload_per_block"].items():
        g = by_algo["gptq"]
        traffic = ", ".join(f"N={n}: {g[n]['ring_traffic_per_rank'] / 2**20:.1f}" for n in (2, 4, 8))
        print(f"{name:22s} gptq all-reduce {g[2]['all_reduce'] / 2**20:9.1f} MiB/block; ring traffic per rank "
              f"{traffic} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
