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

# GGUF type -> (scheme, group size) whose codes it holds exactly; IQ4_NL (gguf_mixes' fallback for Q2_K / Q3_K
# rows that are not whole super-blocks) becomes Q4_0, llama.cpp's own fallback there: the same 4.5 bits per weight
_SCHEMES = {T.Q2_K: ("w_q2_k", None), T.Q3_K: ("w_q3_k", None), T.Q4_K: ("w_q4_k", None), T.Q5_K: ("w_q5_k", None),
            T.Q6_K: ("w_q6_k", None), T.Q4_0: ("w_int4_per_group_sym", 32), T.IQ4_NL: ("w_int4_per_group_sym", 32),
            T.Q5_0: ("w_int5_per_group_sym", 32), T.Q5_1: ("w_uint5_per_group_asym", 32),
            T.Q8_0: ("w_int8_per_group_sym", 32)}


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
        scheme, group = _SCHEMES[qtype]
        spec = parse_scheme(scheme, group).weight
        if spec != mine[name].spec:
            changes = (("scheme", scheme),) + ((("group_size", group),) if group else ())
            added.append(Override(name, changes))
    return dataclasses.replace(recipe, overrides=tuple(recipe.overrides) + tuple(added))
