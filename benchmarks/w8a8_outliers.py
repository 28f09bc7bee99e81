"""Why static per-tensor W8A8 loses on a model: the input range of each linear versus its typical token, and
the perplexity of W8A8 with SmoothQuant when one kind of linear stays in float.

    python benchmarks/w8a8_outliers.py [--model demo] [--num-calib-data 16] [--max-chunks 8]
        [--ranges-of down_proj,q_proj,gate_proj] [--keep-float '*down_proj,*o_proj'] [--alphas 0.5]

Part 1 runs the float model on the calibration windows and prints, per linear kind and block, the largest
input magnitude, the median over tokens of each token's largest magnitude, and how many tokens reach a
quarter of the largest: one static scale per tensor must cover the largest, so a ratio of hundreds leaves
the typical token a few integer levels. Part 2 quantizes with `smoothquant,rtn` for each alpha, with every
linear and then with each --keep-float set excluded (comma-separated sets of glob patterns joined by '+'),
and prints the perplexities.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lowbit.api import evaluate, load, make_recipe, quantize  # noqa: E402
from lowbit.data import calib_windows, load_text, tokenize  # noqa: E402

SCHEME = "w_int8_a_int8_per_tensor_sym"


def input_ranges(model, windows: torch.Tensor, kinds: tuple[str, ...]) -> list[tuple[str, float, float, int]]:
    """(linear, max |x|, median over tokens of max_j |x_tj|, tokens above max/4) for linears of `kinds`."""
    rows = []

    def hook(name):
        def record(module, args):
            per_token = args[0].float().reshape(-1, args[0].shape[-1]).abs().amax(1)
            top = per_token.max().item()
            rows.append((name, top, per_token.median().item(), int((per_token > top / 4).sum())))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if n.endswith(kinds)]
    with torch.no_grad():
        model(input_ids=windows)
    for h in handles:
        h.remove()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--num-calib-data", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-chunks", type=int, default=8, help="evaluation windows")
    ap.add_argument("--ranges-of", default="down_proj,q_proj,gate_proj", help="linear kinds for part 1")
    ap.add_argument("--keep-float", default="*down_proj,*o_proj",
                    help="sets of linears to exclude one set at a time: PATTERN[+PATTERN...],...")
    ap.add_argument("--alphas", default="0.5", help="SmoothQuant alphas, comma-separated")
    args = ap.parse_args()

    model, tok = load(args.model)
    windows = calib_windows(tokenize(tok, load_text("pydoc", "calib")), args.num_calib_data, args.seq_len, 0)
    kinds = tuple(k.strip() for k in args.ranges_of.split(",") if k.strip())
    kept_sets = [tuple(p for p in s.split("+") if p) for s in args.keep_float.split(",") if s.strip()]
    print(f"input ranges over {windows.shape[0]} x {windows.shape[1]} calibration tokens (float model)")
    print(f"{'linear':45s} {'max |x|':>10s} {'median token max':>17s} {'ratio':>8s} {'tokens > max/4':>15s}")
    for name, top, median, n in input_ranges(model, windows, kinds):
        print(f"{name:45s} {top:10.1f} {median:17.2f} {top / max(median, 1e-9):8.0f} {n:15d}")
    del model

    common = dict(scheme=SCHEME, num_calib_data=args.num_calib_data, seq_len=args.seq_len)
    float_ppl = evaluate(args.model, dataset="pydoc", seq_len=args.seq_len, max_chunks=args.max_chunks,
                         progress=False)["perplexity"]
    print(f"\n{SCHEME}, smoothquant,rtn; perplexity on {args.max_chunks} evaluation windows: float {float_ppl:.3f}")
    for alpha in (float(a) for a in args.alphas.split(",")):
        for kept in ((), *kept_sets):
            exclude = ["lm_head", *kept]
            res = quantize(args.model, recipe=make_recipe(algo="smoothquant,rtn", exclude_layers=exclude,
                                                          algo_args={"smoothquant": {"alpha": alpha}}, **common),
                           evaluate_after=True, max_chunks=args.max_chunks, progress=False, quiet=True)
            ppl = res.summary["perplexity"]["perplexity"]
            label = f"{'+'.join(kept)} in float" if kept else "every linear quantized"
            print(f"alpha {alpha}, {label:60s} {ppl:9.3f} ({100 * (ppl / float_ppl - 1):+.1f}%)", flush=True)


if __name__ == "__main__":
    main()
