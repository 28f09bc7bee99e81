"""Scheme names -> QuantSpec, and QuantSpec validation."""

import pytest

from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec, parse_scheme, scheme_names


@pytest.mark.parametrize("name,bits,signed,sym,gran,gs", [
    ("w_uint4_per_group_asym", 4, False, False, "group", 128),
    ("w_int4_per_group_sym", 4, True, True, "group", 128),
    ("w_int8_per_channel_sym", 8, True, True, "channel", None),
    ("w_int8_per_tensor_sym", 8, True, True, "tensor", None),
    ("w_uint8_per_group_asym", 8, False, False, "group", 128),
    ("w_int3_per_group_sym", 3, True, True, "group", 128),
    ("w_uint2_per_group_asym", 2, False, False, "group", 128),
])
def test_quark_names_parse(name, bits, signed, sym, gran, gs):
    s = parse_scheme(name)
    assert s.input is None
    w = s.weight
    assert (w.kind, w.bits, w.signed, w.symmetric, w.granularity, w.group_size) == ("int", bits, signed, sym, gran, gs)


def test_group_size_applies_to_group_schemes_only():
    assert parse_scheme("w_uint4_per_group_asym", 32).weight.group_size == 32
    with pytest.raises(LowbitError, match="per-channel"):
        parse_scheme("w_int8_per_channel_sym", 64)


def test_unknown_scheme_lists_valid_ones():
    with pytest.raises(LowbitError) as err:
        parse_scheme("w_uint4_per_grp_asym")
    msg = str(err.value)
    assert "w_uint4_per_group_asym" in msg and "w_{int|uint}{2..8}" in msg and "\n" not in msg


def test_float_and_mx_schemes_are_described():
    mx = parse_scheme("w_mxfp4").weight
    assert (mx.kind, mx.bits, mx.exponent_bits, mx.mantissa_bits, mx.group_size, mx.scale_dtype) == \
        ("float", 4, 2, 1, 32, "e8m0")
    fp8 = parse_scheme("w_fp8_a_fp8")
    assert fp8.weight.kind == "float" and fp8.weight.exponent_bits == 4 and fp8.input is not None
    nv = parse_scheme("w_fp4_scale_fp8").weight
    assert nv.scale_dtype == "fp8_e4m3" and nv.tensor_scale and nv.group_size == 16
    assert parse_scheme("w_bfp16").weight.kind == "bfp"


def test_every_listed_name_parses():
    for name in scheme_names():
        parse_scheme(name)


def test_activation_scheme_has_input_spec():
    s = parse_scheme("w_int8_a_int8_per_tensor_sym")
    assert s.input.bits == 8 and s.input.granularity == "tensor"


def test_spec_ranges_and_validation():
    assert (QuantSpec(bits=4, signed=True).qmin, QuantSpec(bits=4, signed=True).qmax) == (-8, 7)
    assert (QuantSpec(bits=3).qmin, QuantSpec(bits=3).qmax) == (0, 7)
    with pytest.raises(LowbitError):
        QuantSpec(bits=9)
    with pytest.raises(LowbitError):
        QuantSpec(granularity="group", group_size=0)
    spec = parse_scheme("w_uint4_per_group_asym").weight
    assert QuantSpec.from_dict(spec.to_dict()) == spec
