"""Each export format's declaration (exporters/declared.py): a spec it holds is accepted, specs it cannot hold
are refused naming the layer and the nearest format or option, and the declaration agrees with what the
writer really writes (GGUF's exact types, MatMulNBits' blocks, the AWQ / GPTQ packing round trip)."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.exporters.declared import CAPABILITIES, check_layers
from lowbit.exporters.source import PlannedModel
from lowbit.formats.quantized import quantize
from lowbit.spec import parse_kv_cache_dtype, parse_scheme

CONFIG = {"model_type": "llama"}
LAYER = "model.layers.0.mlp.down_proj"


def _model(scheme: str, group: int | None = None, shape=(64, 128), **kw) -> PlannedModel:
    s = parse_scheme(scheme, group)
    inputs = {LAYER: s.input} if s.input is not None else {}
    return PlannedModel(CONFIG, {LAYER: (s.weight, shape)}, inputs=inputs, **kw)


HELD = {"compressed-tensors": ("w_nvfp4", None), "awq": ("w_uint4_per_group_asym", 32),
        "gptq": ("w_int8_per_channel_sym", None), "gguf": ("w_mxfp4", None), "onnx": ("w_uint4_per_group_asym", 48)}

REFUSED = [  # format, model, what the line must say (the layer, why, the nearest way out)
    ("compressed-tensors", _model("w_mx6"), r"block-floating-point.*export to gguf, which re-quantizes"),
    ("compressed-tensors", _model("w_mxint8"), r"no MXINT8.*; export to gguf$"),
    ("compressed-tensors", _model("w_int4_per_group_sym", 48),
     r"no partial last group; use a group size that divides 128 \(e.g. --group-size 64\), or export to onnx"),
    ("compressed-tensors", _model("w_int8_a_int8_per_tensor_sym"), "only static per-tensor FP8 inputs"),
    ("awq", _model("w_int8_per_channel_sym"), r"integers of 4 bits only; export to "
                                              r"compressed-tensors, gptq, gguf or onnx$"),
    ("awq", _model("w_mxfp4"), r"has no MXFP4 \(E2M1\).*export to compressed-tensors or gguf"),
    ("awq", _model("w_uint4_per_channel_asym"), r"per-group scales only; export to .*gptq"),
    ("gptq", _model("w_int3_per_group_sym", 32), r"2, 4 and 8 bits only; requantize with 2, 4 or 8 bits, or "
                                                 r"export to compressed-tensors or gguf$"),
    ("gptq", _model("w_fp8"), "export to compressed-tensors"),
    ("gptq", _model("w_int2_per_group_sym", 32, shape=(8, 128)), "whole 16-value int32 words along N and K"),
    ("gguf", _model("w_int4_per_group_sym", 16, shape=(64, 80)), "80 input features, not a multiple of 32.*"
                                                                 "export to compressed-tensors, awq, gptq or onnx$"),
    ("gguf", _model("w_fp8_a_fp8"), "quantized input activations.*export to compressed-tensors"),
    ("gguf", _model("w_int4_per_group_sym", 32, outputs={"model.layers.0.self_attn.k_proj":
                                                         parse_kv_cache_dtype("fp8")}), "KV cache.*compressed-tensors"),
    ("onnx", _model("w_int4_per_group_sym", 24), r"group size 24 is not a multiple of 16.*--group-size 32"),
    ("onnx", _model("w_nvfp4"), "no NVFP4.*export to compressed-tensors$"),
    ("onnx", _model("w_int8_a_int8_per_tensor_sym"), "weights only.*requantize with a weight-only scheme"),
]


@pytest.mark.parametrize("fmt", list(CAPABILITIES))
def test_held_spec_accepted(fmt):
    scheme, group = HELD[fmt]
    check_layers(fmt, _model(scheme, group))
    assert CAPABILITIES[fmt].holds(parse_scheme(scheme, group).weight, (64, 128))


@pytest.mark.parametrize("fmt,model,match", REFUSED, ids=[f"{r[0]}-{i}" for i, r in enumerate(REFUSED)])
def test_refused_with_nearest(fmt, model, match):
    with pytest.raises(LowbitError, match=match) as err:
        check_layers(fmt, model)
    line = str(err.value)
    assert "\n" not in line and ("model.layers.0" in line)


def test_rotation_r4_names_onnx():
    for fmt in ("compressed-tensors", "awq", "gptq", "gguf"):
        with pytest.raises(LowbitError, match="rotation r4.*rotation:r4=false.*export to onnx$"):
            check_layers(fmt, _model("w_int4_per_group_sym", 32, online_rotations={LAYER: {}}))
    check_layers("onnx", _model("w_int4_per_group_sym", 32, online_rotations={LAYER: {}}))


def test_model_level_refusals():
    spec = parse_scheme("w_uint4_per_group_asym", 32).weight
    mixed = PlannedModel(CONFIG, {"a": (spec, (64, 128)), "b": (spec.with_changes(group_size=64), (64, 128))})
    with pytest.raises(LowbitError, match=r"one group size.*\[32, 64\].*export to compressed-tensors, gptq"):
        check_layers("awq", mixed)
    with pytest.raises(LowbitError, match="no quantized linear"):
        check_layers("gptq", PlannedModel(CONFIG, {}))
    fp8 = parse_kv_cache_dtype("fp8")
    with pytest.raises(LowbitError, match="only one of k_proj / v_proj"):
        check_layers("compressed-tensors", _model("w_fp8", outputs={"model.layers.0.self_attn.k_proj": fp8}))
    check_layers("compressed-tensors", _model("w_fp8", outputs={"model.layers.0.self_attn.k_proj": fp8,
                                                                "model.layers.0.self_attn.v_proj": fp8}))


# -- the declarations agree with the writers -----------------------------------------------------------

SCHEMES = ["w_int8_per_channel_sym", "w_uint4_per_channel_asym", "w_int4_per_tensor_sym", "w_mxfp4", "w_mxfp8",
           "w_mxfp6_e2m3", "w_mxfp6_e3m2", "w_mxint8", "w_fp8", "w_nvfp4", "w_mx6", "w_bfp16",
           "w_uint8_per_group_asym", "w_uint7_per_group_asym", "w_int5_per_group_sym", "w_uint3_per_group_asym"]
GROUPS = [16, 24, 32, 48, 64, 96, 128]
WIDTHS = [64, 80, 96, 100, 128]


def _specs():
    for scheme in SCHEMES:
        if "per_group" in scheme:
            yield from (parse_scheme(scheme, g).weight for g in GROUPS)
        else:
            yield parse_scheme(scheme).weight
    yield from (parse_scheme(s, g).weight for s in ("w_uint4_per_group_asym", "w_int2_per_group_sym",
                                                    "w_int8_per_group_sym") for g in GROUPS)


def test_gguf_declaration_is_exact_type():
    from lowbit.exporters.gguf_blocks import exact_type

    for spec in _specs():
        for k in WIDTHS:
            assert CAPABILITIES["gguf"].holds(spec, (64, k)) == (exact_type(spec, k) is not None), (spec, k)


def test_onnx_declaration_is_matmulnbits():
    from lowbit.exporters.onnx_tensors import MATMUL_BITS, matmul_block_size

    for spec in _specs():
        for k in WIDTHS:
            writable = spec.plain_int and spec.bits in MATMUL_BITS and matmul_block_size(spec, k) is not None
            assert CAPABILITIES["onnx"].holds(spec, (64, k)) == writable, (spec, k)


def test_compressed_tensors_declaration_is_its_formats():
    from lowbit.exporters import compressed_tensors as ct

    caps = CAPABILITIES["compressed-tensors"]
    mx = [e for e in caps.elements if e.scales == ("e8m0",)][0]
    assert sorted(1 + e + m for e, m in mx.layouts) == sorted(ct.MX_FORMATS)
    for spec in _specs():
        if caps.holds(spec, (64, 128)):
            lin = ct._plan_weight("m", spec, (64, 128))
            assert lin.format in (ct.PACK_QUANTIZED, ct.FLOAT_QUANTIZED, ct.NVFP4, *ct.MX_FORMATS.values())


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_hf_int_declaration_round_trips(fmt):
    """Every spec the AWQ / GPTQ declaration holds packs and unpacks back to its codes."""
    from lowbit.exporters.hf_int import AWQ_ORDER, awq_tensors, gptq_tensors, unpack_int32, unsigned_codes

    g = torch.Generator().manual_seed(0)
    held = 0
    for spec in _specs():
        for n, k in ((64, 128), (24, 96), (8, 64)):
            if not CAPABILITIES[fmt].holds(spec, (n, k)):
                continue
            qt = quantize(torch.randn(n, k, generator=g), spec)
            codes, _ = unsigned_codes(qt)
            if fmt == "awq":
                got = unpack_int32(awq_tensors(qt)["qweight"], 4, AWQ_ORDER).T
            else:
                got = unpack_int32(gptq_tensors(qt)["qweight"].T.contiguous(), spec.bits)
            assert torch.equal(got, codes), (spec, n, k)
            held += 1
    assert held
