"""llm-compressor runner: weight-only 4-bit per-group quantization of the float model with `oneshot`,
then perplexity of the in-memory model (compressed-tensors fake-quantizes the weights in forward while the
model is not compressed; nothing is saved). See common.py for the protocol.

RTN is QuantizationModifier; GPTQ is GPTQModifier; AWQ is AWQModifier (a smoothing transform, its
mappings inferred for Llama) followed by QuantizationModifier, as llm-compressor composes them.
The scheme is a compressed-tensors recipe: int, 4 bits, group strategy, group_size, symmetric or not
(asymmetric int4 with zero points is the same grid as uint4 asym). lm_head is ignored.
"""

from __future__ import annotations

from common import SCHEMES, run


def quantize(model, calib, args):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from torch.utils.data import DataLoader
    import torch

    if args.algo not in ("rtn", "awq", "gptq"):
        raise ValueError(f"this runner drives llm-compressor's RTN / AWQ / GPTQ only, not {args.algo}")
    bits, symmetric = SCHEMES[args.scheme]
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group",
                               group_size=args.group)
    scheme = dict(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                  ignore=["lm_head"])
    recipe = {"rtn": [QuantizationModifier(**scheme)],
              "gptq": [GPTQModifier(**scheme)],
              "awq": [AWQModifier(), QuantizationModifier(**scheme)]}[args.algo]
    rows = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in calib]
    loader = DataLoader(rows, batch_size=8, shuffle=False)  # the shared windows, in order
    oneshot(model=model, recipe=recipe, dataset=loader, num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1], tie_word_embeddings=True, output_dir=None)
    return model


if __name__ == "__main__":
    run("llmcompressor", quantize)
