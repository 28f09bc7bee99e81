"""Integer quantizer maths against hand-computed values, and bit packing round trips."""

import pytest
import torch

from lowbit.formats import dequantize, pack_rows, packed_row_bytes, quantize, unpack_rows
from lowbit.spec import QuantSpec

UINT4_ASYM = QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", group_size=4)
INT4_SYM = QuantSpec(bits=4, signed=True, symmetric=True, granularity="group", group_size=4)


def test_uint4_asym_hand_values():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    q = quantize(w, UINT4_ASYM)
    # range [-1, 2] -> scale 3/15 = 0.2; zero = round(1/0.2) = 5
    assert q.scale.item() == pytest.approx(0.2)
    assert q.zero.item() == 5
    # -1/0.2 = -5 -> 0; 0 -> 5; 0.5/0.2 = 2.5 -> 2 (half to even) -> 7; 2/0.2 = 10 -> 15
    assert q.codes.tolist() == [[0, 5, 7, 15]]
    assert torch.allclose(q.dequantize(), torch.tensor([[-1.0, 0.0, 0.4, 2.0]]))


def test_asym_range_always_contains_zero():
    w = torch.tensor([[1.0, 2.0, 3.0, 3.0]])  # all positive: min clamps to 0
    q = quantize(w, UINT4_ASYM)
    assert q.zero.item() == 0 and q.scale.item() == pytest.approx(0.2)
    assert q.codes.tolist() == [[5, 10, 15, 15]]


def test_int4_sym_hand_values_and_edges():
    w = torch.tensor([[-0.8, 0.05, 0.15, 0.35]])
    q = quantize(w, INT4_SYM)
    assert q.zero is None
    assert q.scale.item() == pytest.approx(0.1)  # signed extreme -0.8 / -8
    # 0.05/0.1 = 0.5 -> 0 and 0.15/0.1 = 1.5 -> 2 (half to even); 0.35/0.1 = 3.5 -> 4
    assert q.codes.tolist() == [[-8, 0, 2, 4]]


def test_sym_positive_extreme_gives_negative_scale():
    w = torch.tensor([[0.8, -0.8, 0.1, 0.0]])  # ties on |x|: the first extreme (+0.8) is taken
    q = quantize(w, INT4_SYM)
    assert q.scale.item() == pytest.approx(-0.1)
    # +0.8 -> -8 exactly; -0.8 -> +8, clipped to 7 (one step of error, the rule's known cost)
    assert q.codes.tolist() == [[-8, 7, -1, 0]]
    assert q.dequantize()[0].tolist() == pytest.approx([0.8, -0.7, 0.1, 0.0])


def test_uint_sym_uses_midpoint_zero():
    spec = QuantSpec(bits=4, signed=False, symmetric=True, granularity="channel", group_size=None)
    q = quantize(torch.tensor([[-0.8, 0.7, 0.0]]), spec)
    assert q.zero.item() == 8 and q.scale.item() == pytest.approx(0.1)
    assert q.codes.tolist() == [[0, 15, 8]]


@pytest.mark.parametrize("bits", range(2, 9))
def test_edge_values_of_each_width(bits):
    for signed in (True, False):
        for sym in (True, False):
            spec = QuantSpec(bits=bits, signed=signed, symmetric=sym, granularity="channel", group_size=None)
            w = torch.randn(16, 64)
            q = quantize(w, spec)
            assert q.codes.min() >= spec.qmin and q.codes.max() <= spec.qmax
            err = (q.dequantize() - w).abs()
            if sym:  # the element of largest magnitude is exact; others within a step (half, unless clipped)
                row_max = w.abs().argmax(dim=1, keepdim=True)
                assert torch.allclose(q.dequantize().gather(1, row_max), w.gather(1, row_max), atol=1e-5)
                assert (err <= q.scale.abs() * 1.0 + 1e-6).all()
                assert (q.codes.gather(1, row_max) == -(1 << (bits - 1)) + (0 if signed else 1 << (bits - 1))).all()
            else:  # the integer zero point can shift the grid by up to half a step more
                assert (err <= q.scale * 1.0 + 1e-6).all()
                assert ((q.codes.max(dim=1).values == spec.qmax) | (q.codes.min(dim=1).values == spec.qmin)).all()


def test_int8_sym_int8_extremes():
    spec = QuantSpec(bits=8, signed=True, symmetric=True, granularity="tensor", group_size=None)
    q = quantize(torch.tensor([[-1.28, 1.27, 0.01]]), spec)
    assert q.scale.item() == pytest.approx(0.01)
    assert q.codes.tolist() == [[-128, 127, 1]]


def test_non_dividing_groups_use_only_their_columns():
    # K = 10, group 4 -> groups of 4, 4 and a last group of 2 columns
    spec = QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", group_size=4)
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.0, 0.5, 1.0, 1.5, -3.0, 3.0]])
    q = quantize(w, spec)
    assert q.scale.shape == (1, 3) and q.zero.shape == (1, 3)
    assert q.scale[0].tolist() == pytest.approx([0.2, 0.1, 0.4])
    assert q.zero[0].tolist() == [0, 0, 8]  # last group range [-3, 3]: scale 0.4, zero round(7.5) = 8
    assert q.codes[0, 8:].tolist() == [0, 15]
    assert torch.allclose(q.dequantize()[0, :8], w[0, :8])


def test_partial_group_statistics_equal_a_separate_quantization():
    spec = QuantSpec(bits=3, signed=False, symmetric=False, granularity="group", group_size=128)
    w = torch.randn(8, 576)
    q = quantize(w, spec)
    tail = quantize(w[:, 512:], spec.with_changes(group_size=64))
    assert torch.equal(q.scale[:, -1:], tail.scale) and torch.equal(q.codes[:, 512:], tail.codes)


def test_per_tensor_and_per_channel_shapes():
    w = torch.randn(6, 10)
    t = quantize(w, QuantSpec(bits=8, signed=True, symmetric=True, granularity="tensor", group_size=None))
    c = quantize(w, QuantSpec(bits=8, signed=True, symmetric=True, granularity="channel", group_size=None))
    assert t.scale.shape == (1, 1) and c.scale.shape == (6, 1)
    ext = w.flatten()[w.abs().argmax()].item()
    assert t.scale.item() == pytest.approx(ext / -128)


def test_zero_weights_are_safe():
    q = quantize(torch.zeros(2, 8), UINT4_ASYM)
    assert torch.equal(q.dequantize(), torch.zeros(2, 8))


def test_dequantize_formula():
    spec = UINT4_ASYM
    codes = torch.tensor([[0, 15, 3, 4, 1, 1, 1, 1]])
    scale = torch.tensor([[0.5, 2.0]])
    zero = torch.tensor([[3, 1]])
    assert dequantize(codes, scale, zero, spec).tolist() == [[-1.5, 6.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("cols", [1, 7, 8, 37, 576])
def test_pack_round_trip(bits, cols):
    codes = torch.randint(0, 1 << bits, (5, cols))
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_row_bytes(cols, bits))
    assert torch.equal(unpack_rows(packed, bits, cols), codes.to(torch.int32))
    # a transposed (column-major) tensor packs as its contiguous copy does (compressed-tensors' zero points)
    assert torch.equal(pack_rows(codes.T.contiguous().T, bits), packed)


def test_pack_golden_bytes():
    # LSB first: element 0 in the low nibble (MatMulNBits order)
    assert pack_rows(torch.tensor([[1, 2, 3, 4]]), 4).tolist() == [[0x21, 0x43]]
    assert pack_rows(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001]]
    # 3 bits: 8 codes in 3 bytes; codes 1..7,0 -> bit stream 001 010 011 100 101 110 111 000 (LSB first)
    stream = sum(c << (3 * i) for i, c in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    assert pack_rows(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]]), 3).tolist() == [list(stream.to_bytes(3, "little"))]


def test_pack_refuses_out_of_range():
    with pytest.raises(ValueError):
        pack_rows(torch.tensor([[16]]), 4)
