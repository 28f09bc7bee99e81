"""Intel auto-round runner: AutoRound (signed gradient descent on each block's output) on the float model with the
shared calibration windows as token batches, `--iters` iterations of `--batch` windows, then perplexity of the
in-memory model, whose weights auto-round leaves fake-quantized. See common.py for the protocol. Only the
autoround algorithm (the package's RTN mode is iters=0, not this table's RTN).
"""

from __future__ import annotations

from common import SCHEMES, run


def quantize(model, calib, args):
    if args.algo != "autoround":
        raise ValueError(f"auto-round runs AutoRound only, not {args.algo}")
    from auto_round import AutoRound
    from transformers import AutoTokenizer

    bits, symmetric = SCHEMES[args.scheme]
    # the tokenizer is required with a model object though the windows come tokenized
    ar = AutoRound(model, tokenizer=AutoTokenizer.from_pretrained(args.model), scheme="W4A16", bits=bits, group_size=args.group, sym=symmetric, iters=args.iters,
                   nsamples=len(calib), seqlen=calib.shape[1], batch_size=args.batch,
                   dataset=list(calib.split(args.batch)), device_map="cpu")
    model, _ = ar.quantize()
    return model


if __name__ == "__main__":
    run("autoround", quantize)
