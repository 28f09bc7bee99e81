"""What a rotation's first step costs on its own: the norm gains absorbed into the linears that read the
stream, with the rotation itself replaced by the identity, against plain RTN and the real rotation.

    python benchmarks/norm_absorption.py [--model demo] [--scheme w_int4_per_group_sym] [--max-chunks 33]
                                         [--exclude lm_head ...]

R1 needs the norms to apply no gain (RMSNorm(x Q) = RMSNorm(x) Q only then), so their gains move into the
readers' weight columns first. Where a gain is tiny on a channel that carries huge activations (a trained
model's attention-sink channels), the absorbed weights quantize worse; this separates that from the rotation.
"""

from __future__ import annotations

import argparse
import os
import platform

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lowbit import api  # noqa: E402
from lowbit.algorithms import hadamard  # noqa: E402


def run(args, algo: str) -> dict:
    result = api.quantize(args.model, None, scheme=args.scheme, algo=algo, exclude_layers=args.exclude,
                          keep_in_memory=True, evaluate_after=True, eval_dataset=args.dataset,
                          eval_seq_len=args.seq_len, max_chunks=args.max_chunks, progress=False, quiet=True)
    return {"ppl": result.summary["perplexity"]["perplexity"], "err": result.summary["mean_layer_error"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--scheme", default="w_int4_per_group_sym")
    ap.add_argument("--dataset", default="pydoc")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-chunks", type=int, default=None)
    ap.add_argument("--exclude", nargs="*", default=["lm_head"], help="layer patterns left float")
    args = ap.parse_args()
    rows = [("RTN", run(args, "rtn")), ("rotation (R1) + RTN", run(args, "rotation"))]
    real_right = hadamard.Rotation.right
    hadamard.Rotation.right = lambda self, x: x  # absorb the gains, rotate nothing
    try:
        rows.append(("norm gains absorbed, no rotation + RTN", run(args, "rotation")))
    finally:
        hadamard.Rotation.right = real_right
    base = api.evaluate(args.model, dataset=args.dataset, seq_len=args.seq_len, max_chunks=args.max_chunks,
                        progress=False)
    print(f"model {args.model}, scheme {args.scheme}, excluded {' '.join(args.exclude)}, text {args.dataset}, "
          f"{base['windows']} x {args.seq_len} windows, float {base['perplexity']:.3f}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| weights | perplexity | vs float | mean relative weight error |")
    print("|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['ppl']:.3f} | {100 * (r['ppl'] / base['perplexity'] - 1):+.1f}% | {r['err']:.4f} |")


if __name__ == "__main__":
    main()
