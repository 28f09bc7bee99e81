"""AMD Quark runner: weight-only 4-bit per-group quantization of the float model with quark.torch's
ModelQuantizer, then perplexity of its fake-quant model in memory (see common.py for the protocol).

RTN is Quark with no algorithm (min/max observer, round half to even); AWQ and GPTQ are its AWQConfig /
GPTQConfig on the decoder blocks (`model.layers`, scaling layers auto-detected). lm_head is excluded.
"""

from __future__ import annotations

from common import SCHEMES, run


def quantize(model, calib, args):
    from torch.utils.data import DataLoader

    from quark.torch import ModelQuantizer
    from quark.torch.quantization.config.config import (AWQConfig, GPTQConfig, Int4PerGroupSpec, QConfig,
                                                         QLayerConfig, Uint4PerGroupSpec)

    bits, symmetric = SCHEMES[args.scheme]
    if bits != 4 or args.algo not in ("rtn", "awq", "gptq"):
        raise ValueError(f"this runner drives Quark's 4-bit RTN / AWQ / GPTQ only, not {args.algo} at {bits} bits")
    spec_cls = Int4PerGroupSpec if symmetric else Uint4PerGroupSpec
    weight = spec_cls(ch_axis=1, group_size=args.group, symmetric=symmetric).to_quantization_spec()
    linears = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    algo = {"rtn": None,
            "awq": AWQConfig(model_decoder_layers="model.layers"),
            # desc_act (act order) and static groups: Quark's defaults
            "gptq": GPTQConfig(model_decoder_layers="model.layers", inside_layer_modules=linears)}[args.algo]
    config = QConfig(global_quant_config=QLayerConfig(weight=weight), exclude=["lm_head"],
                     algo_config=[algo] if algo is not None else None)
    loader = DataLoader(calib, batch_size=8, shuffle=False)  # the shared windows, in order
    model = ModelQuantizer(config).quantize_model(model, loader)
    return model  # quantize_model returns the model with fake quantization enabled


if __name__ == "__main__":
    run("quark", quantize)
