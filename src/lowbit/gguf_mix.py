"""Schemes named after llama.cpp's file mixes (gguf_q4_k_m, gguf_q2_k, ...; spec.GGUF_MIXES): each linear is
quantized onto the grid llama-quantize would give its tensor in that file (exporters/gguf_mixes: Q6_K for attn_v
and ffn_down in some layers, the fallbacks of widths that are not whole super-blocks, ...), written into the
recipe as one override per linear, so that GPTQ's codes are the ones the GGUF file of that mix stores.
"""

from __future__ import annotations

import dataclasses

from gguf import GGMLQuantizationType as T

from .errors import LowbitError
from .exporters.gguf import linear_mix_types
from .recipe import Override, Recipe, resolve_plan
from .spec import gguf_mix, parse_scheme

# GGUF type -> the scheme of its grid; IQ4_NL (gguf_mixes' fallback for Q2_K / Q3_K rows that are not whole
# super-blocks) becomes Q4_0, llama.cpp's own fallback there: the same 4.5 bits per weight
_SCHEMES = {T.Q2_K: "w_q2_k", T.Q3_K: "w_q3_k", T.Q4_K: "w_q4_k", T.Q5_K: "w_q5_k", T.Q6_K: "w_q6_k",
            T.Q4_0: "w_q4_0", T.IQ4_NL: "w_q4_0", T.Q4_1: "w_q4_1", T.Q5_0: "w_q5_0", T.Q5_1: "w_q5_1",
            T.Q8_0: "w_q8_0"}


def with_gguf_mix(recipe: Recipe, config: dict, linears: dict[str, tuple[int, int]]) -> Recipe:
    """The recipe with an override for each linear whose type in the scheme's mix differs from the scheme's
    base grid; linears the user excluded or overrode keep what they have. Other schemes: unchanged."""
    mix = gguf_mix(recipe.scheme.name)
    if mix is None:
        return recipe
    plan = resolve_plan(recipe, linears)
    mine = {n: lp for n, lp in plan.items() if lp.spec is not None and lp.reason.startswith("scheme")}
    types = linear_mix_types(config, mix, {n: lp.shape[1] for n, lp in mine.items()})
    added = []
    for name, qtype in types.items():
        if qtype not in _SCHEMES:
            raise LowbitError(f"{name}: llama.cpp's {mix} gives it {qtype.name}, which lowbit does not quantize "
                              f"onto; exclude it (--exclude-layers {name})")
        scheme = _SCHEMES[qtype]
        if parse_scheme(scheme).weight != mine[name].spec:
            added.append(Override(name, (("scheme", scheme),)))
    return dataclasses.replace(recipe, overrides=tuple(recipe.overrides) + tuple(added))
