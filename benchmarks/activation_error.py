"""What quantizing only the activations costs: perplexity of the float model with a scheme's input-activation
quantization applied to chosen kinds of linears (weights stay float), and with the static scales multiplied.

    python benchmarks/activation_error.py [--scheme w_fp8_a_fp8] [--model demo] [--num-calib-data 32]
        [--max-chunks 8] [--kinds q_proj+k_proj+v_proj,o_proj,gate_proj+up_proj,down_proj] [--multipliers 1,1.5,2,4]

Static scales come from the largest input magnitude over the calibration windows (as the engine computes
them); a multiplier > 1 leaves headroom for larger values in the evaluation text, < 1 clips. Separates the
activation part of a W+A scheme's loss from the weight part (compare with the weight-only scheme).
"""

from __future__ import annotations

import argparse
import os
import platform

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lowbit.api import load  # noqa: E402
from lowbit.data import calib_windows, eval_windows, load_text, tokenize  # noqa: E402
from lowbit.eval.perplexity import perplexity  # noqa: E402
from lowbit.formats import activation_qparams, fake_quant_activation  # noqa: E402
from lowbit.spec import parse_scheme  # noqa: E402


def input_amax(model, linears: dict, windows: torch.Tensor, batch: int = 4) -> dict[str, float]:
    """The largest input magnitude of every linear over the windows."""
    amax: dict[str, float] = {}

    def hook(name):
        def record(module, args):
            amax[name] = max(amax.get(name, 0.0), args[0].abs().max().item())
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            model(input_ids=windows[i:i + batch])
    for h in handles:
        h.remove()
    return amax


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", default="w_fp8_a_fp8")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--dataset", default="pydoc")
    ap.add_argument("--num-calib-data", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-chunks", type=int, default=8, help="evaluation windows")
    ap.add_argument("--kinds", default="q_proj+k_proj+v_proj,o_proj,gate_proj+up_proj,down_proj",
                    help="comma-separated sets of linear-name endings, each measured alone")
    ap.add_argument("--multipliers", default="1,1.5,2,4", help="static scale multipliers, all linears quantized")
    args = ap.parse_args()

    spec = parse_scheme(args.scheme).input
    if spec is None:
        raise SystemExit(f"{args.scheme} does not quantize activations")
    model, tok = load(args.model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    calib = calib_windows(tokenize(tok, load_text(args.dataset, "calib")), args.num_calib_data, args.seq_len, 0)
    ev = eval_windows(tokenize(tok, load_text(args.dataset, "eval")), args.seq_len, args.max_chunks)
    amax = input_amax(model, linears, calib)
    base = perplexity(model, ev, progress=False).perplexity

    def run(selected, mult: float) -> float:
        handles = []
        for name in selected:
            params = None if spec.dynamic else activation_qparams(-amax[name] * mult, amax[name] * mult, spec)
            handles.append(linears[name].register_forward_pre_hook(
                lambda m, a, p=params: (fake_quant_activation(a[0], spec, p), *a[1:])))
        try:
            return perplexity(model, ev, progress=False).perplexity
        finally:
            for h in handles:
                h.remove()

    print(f"{args.model}, inputs {spec.short_name}{'' if spec.dynamic else ' static'} ({args.scheme}), weights "
          f"float; calibration {calib.shape[0]} x {args.seq_len}, {ev.shape[0]} eval windows of {args.dataset}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| activations quantized at | scale x | perplexity | vs float |")
    print("|---|---|---|---|")
    print(f"| none (float) | | {base:.3f} | |")
    sets = [tuple(k for k in s.split("+") if k) for s in args.kinds.split(",") if s.strip()]
    for kinds in sets:
        ppl = run([n for n in linears if n.endswith(kinds)], 1.0)
        print(f"| {'+'.join(kinds)} | 1 | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% |", flush=True)
    for mult in (float(m) for m in args.multipliers.split(",")):
        ppl = run(list(linears), mult)
        print(f"| every linear | {mult:g} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
