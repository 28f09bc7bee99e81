"""Float, MX, block floating point and NVFP4 formats: hand-worked values, bit-exact agreement with torch's
float8 dtypes, ml_dtypes and gguf's MXFP4, pack/unpack round trips and GPTQ with these formats."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowbit.algorithms.gptq import gptq_quantize
from lowbit.formats.packed import pack_linear, unpack_linear
from lowbit.formats import dequantize, fake_quant, fake_quant_activation, quantize
from lowbit.formats.minifloat import E2M1, E2M3, E3M2, E4M3FN, E4M3FNUZ, E5M2, E5M2FNUZ
from lowbit.formats.scaled import shared_exponent
from lowbit.spec import parse_scheme

ml_dtypes = pytest.importorskip("ml_dtypes")

TORCH_FP8 = [(E4M3FN, torch.float8_e4m3fn), (E4M3FNUZ, torch.float8_e4m3fnuz), (E5M2, torch.float8_e5m2),
             (E5M2FNUZ, torch.float8_e5m2fnuz)]
ML_SMALL = [(E3M2, ml_dtypes.float6_e3m2fn), (E2M3, ml_dtypes.float6_e2m3fn), (E2M1, ml_dtypes.float4_e2m1fn)]


def wide_random(n: int = 100_000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 4)


@pytest.mark.parametrize("fmt,dtype", TORCH_FP8)
def test_fp8_bit_exact_with_torch(fmt, dtype):
    x = wide_random()
    ref = x.clamp(-fmt.max, fmt.max).to(dtype)  # torch's cast rounds to nearest even but does not saturate
    values = fmt.round(x)
    assert torch.equal(values, ref.float())
    assert torch.equal(fmt.encode(values), ref.view(torch.uint8).int())
    every = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    assert torch.equal(fmt.table.nan_to_num(7.0, 8.0, -8.0), every.nan_to_num(7.0, 8.0, -8.0))


@pytest.mark.parametrize("fmt,dtype", ML_SMALL)
def test_fp6_fp4_bit_exact_with_ml_dtypes(fmt, dtype):
    x = wide_random(seed=1)
    ref = x.clamp(-fmt.max, fmt.max).numpy().astype(dtype)
    values = fmt.round(x)
    assert np.array_equal(values.numpy(), ref.astype(np.float32))
    assert np.array_equal(fmt.encode(values).numpy(), ref.view(np.uint8).astype(np.int32))
    every = np.arange(1 << fmt.bits, dtype=np.uint8).view(dtype).astype(np.float32)
    assert np.array_equal(fmt.table.numpy(), every)


def test_minifloat_hand_table():
    # ranges (FORMATS.md 5.1, 5.2)
    assert (E4M3FN.max, E4M3FNUZ.max, E5M2.max, E3M2.max, E2M3.max, E2M1.max) == (448, 240, 57344, 28, 7.5, 6)
    r = lambda fmt, *v: fmt.round(torch.tensor(v)).tolist()  # noqa: E731
    # saturation: 464 is the tie between 448 and 480 (even: 448); 470, 1e6 and Inf clamp to the max
    assert r(E4M3FN, 464, 470, 1e6, float("inf"), -float("inf")) == [448, 448, 448, 448, -448]
    # subnormals and ties to even: 2^-10 is halfway between 0 and 2^-9; 3 * 2^-10 between codes 1 and 2
    assert r(E4M3FN, 2 ** -10, 3 * 2 ** -10, 2 ** -9) == [0, 2 ** -8, 2 ** -9]
    # FP4 E2M1: ties 0.25, 0.75, 1.25, 2.5, 5 go to the even code
    assert r(E2M1, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 7, -0.3) == [0, 1, 1, 2, 2, 4, 4, 6, -0.5]
    enc = lambda fmt, *v: fmt.encode(torch.tensor(v)).tolist()  # noqa: E731
    assert enc(E4M3FN, 448, -448, 2 ** -9, float("nan"), -0.0) == [0x7E, 0xFE, 0x01, 0x7F, 0x80]
    assert enc(E4M3FNUZ, 240, float("nan"), -0.0) == [0x7F, 0x80, 0x00]  # no -0: 0x80 is NaN
    assert enc(E5M2, 57344, float("inf"), float("nan")) == [0x7B, 0x7C, 0x7E]
    assert enc(E2M1, 0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -6) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 15]
    with pytest.raises(ValueError, match="no NaN"):
        E2M1.encode(torch.tensor([float("nan")]))


def test_e8m0_scale_rules():
    spec = parse_scheme("w_mxfp4").weight  # E2M1 elements: emax 2, max 6
    e = lambda rule, *a: shared_exponent(torch.tensor(a), spec.with_changes(scale_rule=rule)).tolist()  # noqa: E731
    # floor (OCP MX v1.0): floor(log2 amax) - 2; amax / 2^e lies in [4, 8), so 7.9 saturates to 6
    assert e("floor", 6.0, 7.9, 8.0, 1.0, 0.0, 1e-45, 1e38) == [0, 0, 1, -2, -127, -127, 124]
    # even (Quark): the mantissa of amax rounded to E2M1's one bit first: 1.75 * 4 = 7 goes to 8
    assert e("even", 6.0, 6.99, 7.0, 0.0) == [0, 0, 1, -127]
    # ceil: the smallest power of two with amax / 2^e <= 6
    assert e("ceil", 6.0, 6.01, 3.0, 3.01) == [0, 1, -1, 0]
    # mse: per block the lower-error one of floor's exponent and the next
    rows = torch.tensor([[7.9] + [1.5] * 31, [7.9] + [0.1] * 31])
    mse = fake_quant(rows, spec.with_changes(scale_rule="mse"))
    assert mse[0, 0] == 6 and mse[0, 1] == 1.5  # saturating 7.9 costs less than 31 x (1.5 -> 2)
    assert mse[1, 0] == 8  # 0.1 rounds to 0 under both, so the top decides
    w = torch.tensor([[7.9] + [0.1] * 31])
    assert fake_quant(w, spec.with_changes(scale_rule="floor"))[0, 0] == 6  # floor: the top of the block clips
    assert fake_quant(w, spec)[0, 0] == 8  # even (the default): 7.9 rounds up to 8 = 2^1 * 4
    assert fake_quant(w, spec.with_changes(scale_rule="ceil"))[0, 0] == 8  # ceil: 2^1 * 4


def _mx_reference(x: np.ndarray, elem_dtype, emax: int) -> np.ndarray:
    """MX v1.0 by the spec's words, with ml_dtypes doing the element rounding: X = 2^(floor(log2 amax) - emax)
    per 32 elements, P = saturate(V / X) rounded to the element type."""
    out = np.empty_like(x)
    elem_max = float(ml_dtypes.finfo(elem_dtype).max)
    for r in range(x.shape[0]):
        for c in range(0, x.shape[1], 32):
            block = x[r, c:c + 32]
            amax = float(np.abs(block).max())
            e = max(-127, math.frexp(amax)[1] - 1 - emax) if amax > 0 else -127
            scale = np.float32(2.0 ** e)
            out[r, c:c + 32] = np.clip(block / scale, -elem_max, elem_max).astype(elem_dtype).astype(np.float32) * scale
    return out


@pytest.mark.parametrize("scheme,elem,emax", [("w_mxfp4", ml_dtypes.float4_e2m1fn, 2),
                                              ("w_mxfp6_e3m2", ml_dtypes.float6_e3m2fn, 4),
                                              ("w_mxfp6_e2m3", ml_dtypes.float6_e2m3fn, 2),
                                              ("w_mxfp8", ml_dtypes.float8_e4m3fn, 8)])
def test_mx_bit_exact_with_reference(scheme, elem, emax):
    x = (wide_random(64 * 96, seed=2).reshape(64, 96) * 0.01).numpy()
    ours = fake_quant(torch.from_numpy(x), parse_scheme(scheme).weight.with_changes(scale_rule="floor")).numpy()
    assert np.array_equal(ours, _mx_reference(x, elem, emax))


def test_mxfp4_bit_exact_with_gguf():
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    x = (torch.randn(32, 256, generator=torch.Generator().manual_seed(3)) * 0.05).numpy()
    ref = quants.dequantize(quants.quantize(x, gguf.GGMLQuantizationType.MXFP4), gguf.GGMLQuantizationType.MXFP4)
    spec = parse_scheme("w_mxfp4").weight.with_changes(scale_rule="floor")  # gguf's rule
    assert np.array_equal(fake_quant(torch.from_numpy(x), spec).numpy(), ref)


def _nvfp4_reference(x: np.ndarray) -> np.ndarray:
    """Two-level FP4: t = amax / (6 * 448) per tensor; per 16: s = E4M3(amax_b / 6 / t) (at least 2^-9);
    elements E2M1(saturate(x / (s t))); ml_dtypes does both roundings."""
    t = np.float32(np.abs(x).max()) / np.float32(6 * 448)
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for c in range(0, x.shape[1], 16):
            block = x[r, c:c + 16]
            s = np.float32(np.abs(block).max()) / np.float32(6) / t
            s = max(np.float32(np.clip(s, 0, 448).astype(ml_dtypes.float8_e4m3fn)), np.float32(2.0 ** -9))
            eff = np.float32(s) * t
            out[r, c:c + 16] = np.clip(block / eff, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32) * eff
    return out


def test_nvfp4_bit_exact_with_reference():
    x = (wide_random(32 * 128, seed=4).reshape(32, 128) * 0.01).numpy()
    for name in ("w_nvfp4", "w_fp4_scale_fp8"):
        assert np.array_equal(fake_quant(torch.from_numpy(x), parse_scheme(name).weight).numpy(), _nvfp4_reference(x))


def test_fp8_per_tensor_scale_is_amax_over_448():
    w = torch.tensor([[0.5, -896.0, 3.0]])
    qt = quantize(w, parse_scheme("w_fp8_a_fp8").weight)
    assert qt.scale.item() == 2.0 and qt.codes[0, 1].item() == 0xFE  # -448 * 2
    assert torch.equal(qt.dequantize(), torch.tensor([[0.5, -896.0, 3.0]]))


def test_bfp16_hand_values():
    spec = parse_scheme("w_bfp16").weight  # 8 per block, 8-bit sign-magnitude, step 2^(E - 6)
    w = torch.tensor([[1.0, 0.5, -0.25, 0.01, 0, 0, 0, 0, 1.999, 0.3, 0, 0, 0, 0, 0, 0]])
    out = fake_quant(w, spec)[0].tolist()
    assert out[:4] == [1.0, 0.5, -0.25, 1 / 64]  # E = 0, step 1/64: 0.01 * 64 = 0.64 rounds to 1
    # 1.999 * 64 rounds to 128, past the 7-bit magnitude: E rises to 1 and the step to 1/32
    assert out[8:10] == [2.0, 10 / 32]


def test_mx6_microexponent_shift():
    spec = parse_scheme("w_mx6").weight  # 16 per exponent, pairs with a 1-bit shift, sign + 4 bits
    w = torch.zeros(1, 16)
    w[0, 0], w[0, 2], w[0, 3] = 1.0, 0.3, -0.2
    qt = quantize(w, spec)
    # pair 0 holds 2^E = 1: step 2^(0 - 3); pair 1 lies below 2^E: shifted, step 2^(0 - 1 - 3)
    assert qt.scale[0, :2].tolist() == [1 / 8, 1 / 16]
    assert qt.dequantize()[0, :4].tolist() == [1.0, 0.0, 5 / 16, -3 / 16]
    assert qt.codes.abs().max() <= 15


ROUND_TRIP = ["w_fp8_a_fp8", "w_mxfp8", "w_mxfp6_e3m2", "w_mxfp6_e2m3", "w_mxfp4", "w_mxint8", "w_mx6", "w_mx9",
              "w_bfp16", "w_fp4_scale_fp8", "w_nvfp4"]


@pytest.mark.parametrize("scheme", ROUND_TRIP)
def test_pack_unpack_round_trip(scheme):
    spec = parse_scheme(scheme).weight
    w = torch.randn(24, 80, generator=torch.Generator().manual_seed(5)) * 0.02  # 80: partial last MX group
    w[3, 7] = 0.9  # an outlier
    w[5] = 0  # an all-zero row
    qt = quantize(w, spec)
    back = unpack_linear(pack_linear(qt), spec, tuple(w.shape))
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.scale, qt.scale)
    assert torch.equal(back.dequantize(), qt.dequantize())
    assert torch.equal(qt.dequantize(), fake_quant(w, spec))
    assert torch.equal(dequantize(qt.codes, qt.scale, qt.zero, spec), qt.dequantize())


@pytest.mark.parametrize("scheme", ["w_mxfp4", "w_fp8_a_fp8", "w_nvfp4", "w_mx6", "w_mxint8"])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_in_every_format(scheme, act_order):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2048, 64, generator=g) @ (torch.randn(64, 64, generator=g) * 0.3 + torch.eye(64))
    w = torch.randn(48, 64, generator=g) * 0.05
    H = 2 * x.T @ x / x.shape[0]
    spec = parse_scheme(scheme).weight
    qt, _ = gptq_quantize(w, H, spec, act_order=act_order)
    err = lambda wq: ((x @ (wq - w).T) ** 2).mean().item()  # noqa: E731
    assert err(qt.dequantize()) < 0.9 * err(fake_quant(w, spec))
    assert torch.equal(qt.dequantize(), dequantize(qt.codes, qt.scale, qt.zero, spec))


def test_activation_fake_quant_of_block_formats_is_dynamic_per_block():
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(7))
    for name in ("w_mxfp4_a_mxfp4", "w_mx6_a_mx6", "w_bfp16_a_bfp16", "w_fp4_a_fp4_scale_fp8"):
        spec = parse_scheme(name).input
        assert spec.dynamic
        out = fake_quant_activation(x, spec)
        assert out.shape == x.shape and torch.equal(out.reshape(-1, 64), fake_quant(x.reshape(-1, 64), spec))
        if not spec.tensor_scale:  # one token's blocks do not depend on the others
            assert torch.equal(out[1, 2], fake_quant(x[1, 2:3], spec)[0])
    fp8 = parse_scheme("w_fp8_a_fp8").input
    assert not fp8.dynamic and fp8.granularity == "tensor"
    assert torch.equal(fake_quant_activation(x, fp8, torch.tensor(0.01)),
                       E4M3FN.round(x / 0.01) * 0.01)
