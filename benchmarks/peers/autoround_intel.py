"""Intel's auto-round (PyPI auto-round) on a Hugging Face folder, with lowbit's own calibration windows, writing the
fake-quantized model (weights dequantized from auto-round's codes) as a float folder that lowbit evaluates like any
other. Run by compare_peers.py in its own process, with auto-round on PYTHONPATH.

    python benchmarks/peers/autoround_intel.py MODEL_DIR WINDOWS.pt OUT_DIR --bits 4 --group-size 128 [--sym]
        [--iters 200] [--batch-size 8] [--lr 0] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("windows")
    p.add_argument("output")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    windows = torch.load(args.windows)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    start = time.perf_counter()
    extra = {"lr": args.lr} if args.lr else {}
    ar = AutoRound(model, tokenizer=tokenizer, scheme="W4A16", bits=args.bits, group_size=args.group_size,
                   sym=args.sym, iters=args.iters, nsamples=len(windows), seqlen=windows.shape[1],
                   batch_size=args.batch_size, dataset=list(windows.split(args.batch_size)),
                   device_map=args.device, **extra)
    model, _ = ar.quantize()
    seconds = time.perf_counter() - start
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(json.dumps({"seconds": round(seconds, 2),
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main()
