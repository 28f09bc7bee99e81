"""The least work any GPTQ over the calibration tokens must do per decoder block on this machine, to set
quantization times against: one forward of the block over every token (to see each linear's inputs) and
the Gram matrix of every distinct linear input (lowbit's own accumulator), timed on one batch and scaled.
Quantized propagation, as llm-compressor and lowbit's default do, adds a second forward per block.

    python benchmarks/gptq_lower_bound.py [--model demo] [--block 3] [--num-calib-data 128] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lowbit.algorithms.stats import HessianAccumulator  # noqa: E402
from lowbit.api import load  # noqa: E402
from lowbit.data import calib_windows, load_text, tokenize  # noqa: E402

BATCH = 8  # windows per forward, lowbit's default --batch-size


def block_call(model, ids: torch.Tensor, index: int):
    """The decoder block `index` and the (hidden states, keyword arguments) it is called with on ids."""
    blocks = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > index)
    got = {}

    def grab(module, args, kwargs):
        got["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        got["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "use_cache")}
        raise StopIteration

    handle = blocks[index].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except StopIteration:
        pass
    finally:
        handle.remove()
    return blocks[index], got["hidden"], got["kwargs"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--block", type=int, default=3)
    ap.add_argument("--num-calib-data", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()

    model, tok = load(args.model)
    ids = calib_windows(tokenize(tok, load_text("pydoc", "calib")), BATCH, args.seq_len, 0)
    block, hidden, kwargs = block_call(model, ids, args.block)
    batches = args.num_calib_data / BATCH
    n_blocks = sum(1 for m in model.modules() if type(m) is type(block))

    inputs = {}  # distinct linear inputs, by identity (q/k/v share one); the tensors stay alive, so ids hold

    def keep(name):
        def hook(module, args):
            inputs.setdefault(id(args[0]), (name, args[0]))
        return hook

    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        block(hidden, **kwargs)
        for h in hooks:
            h.remove()
        start = time.perf_counter()
        for _ in range(3):
            block(hidden, **kwargs)
        forward = (time.perf_counter() - start) / 3 * batches
    inputs = {k: (n, x.reshape(-1, x.shape[-1])) for k, (n, x) in inputs.items()}
    accs = {n: HessianAccumulator(x.shape[1]) for n, x in inputs.values()}
    start = time.perf_counter()
    for _ in range(3):
        for n, x in inputs.values():
            accs[n].add(x)
    gram = (time.perf_counter() - start) / 3 * batches
    start = time.perf_counter()  # the same products as one full matrix multiply each, for comparison
    for _ in range(3):
        for n, x in inputs.values():
            torch.zeros(x.shape[1], x.shape[1]).addmm_(x.T, x)
    full_gram = (time.perf_counter() - start) / 3 * batches

    print(f"block {args.block} of {n_blocks}, {args.num_calib_data} x {args.seq_len} tokens, {torch.get_num_threads()} threads")
    print(f"one forward {forward:.2f} s, Gram matrices of {', '.join(n for n, _ in inputs.values())}: {gram:.2f} s "
          f"(as full products: {full_gram:.2f} s)")
    print(f"per block: float propagation {forward + gram:.2f} s, quantized propagation {2 * forward + gram:.2f} s")
    print(f"whole model: float propagation {n_blocks * (forward + gram):.0f} s, "
          f"quantized propagation {n_blocks * (2 * forward + gram):.0f} s (GPTQ's own solve not included)")


if __name__ == "__main__":
    main()
