"""GPTQ on tensors: lower output error than RTN, consistent codes, static groups, partial groups, damping."""

import pytest
import torch

from lowbit.algorithms.awq import search_clip
from lowbit.algorithms.gptq import GPTQ, HessianAccumulator, gptq_quantize, inverse_cholesky
from lowbit.formats import quantize
from lowbit.spec import QuantSpec


def problem(n=48, k=80, tokens=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g)
    # correlated input channels of uneven size, as real activations are (GPTQ exploits the correlation)
    mix = torch.randn(k // 4, k, generator=g) * (torch.rand(k, generator=g) * 3 + 0.1)
    X = torch.randn(tokens, k // 4, generator=g) @ mix + 0.05 * torch.randn(tokens, k, generator=g)
    acc = HessianAccumulator(k)
    for chunk in X.split(128):
        acc.add(chunk)
    return W, X, acc


def out_err(X, W, Wq):
    return ((X @ W.T - X @ Wq.T) ** 2).mean().item()


def test_hessian_is_running_average():
    W, X, acc = problem()
    assert acc.count == 600
    assert torch.allclose(acc.H, 2 * X.T @ X / 600, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", group_size=32),  # 80 = 32+32+16
    QuantSpec(bits=4, signed=True, symmetric=True, granularity="group", group_size=16),
    QuantSpec(bits=3, signed=False, symmetric=False, granularity="channel", group_size=None),
    QuantSpec(bits=8, signed=True, symmetric=True, granularity="tensor", group_size=None),
])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_output_error(spec, act_order):
    W, X, acc = problem()
    qt, damp = gptq_quantize(W, acc.H, spec, block_size=32, act_order=act_order)
    rtn = quantize(W, spec)
    assert damp == 0.01
    assert qt.scale.shape == rtn.scale.shape  # contiguous groups in the original order: no g_idx
    assert qt.codes.min() >= spec.qmin and qt.codes.max() <= spec.qmax
    assert out_err(X, W, qt.dequantize()) < 0.7 * out_err(X, W, rtn.dequantize())


def test_static_groups_use_original_weight_statistics():
    W, X, acc = problem()
    spec = QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", group_size=32)
    qt, _ = gptq_quantize(W, acc.H, spec, act_order=True)
    rtn = quantize(W, spec)
    assert torch.equal(qt.scale, rtn.scale) and torch.equal(qt.zero, rtn.zero)
    assert not torch.equal(qt.codes, rtn.codes)


def test_identity_hessian_reduces_to_rtn():
    W = torch.randn(8, 64)
    spec = QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", group_size=16)
    qt, _ = gptq_quantize(W, torch.eye(64), spec, act_order=False, damp=0.0 + 1e-9)
    assert torch.equal(qt.codes, quantize(W, spec).codes)


def test_dead_inputs_and_damping_retry():
    W, X, acc = problem(k=40)
    X[:, 5] = 0
    H = 2 * X.T @ X / X.shape[0]
    spec = QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", group_size=16)
    qt, _ = gptq_quantize(W, H, spec)
    assert torch.isfinite(qt.dequantize()).all()
    indefinite = torch.tensor([[1.0, 1.005], [1.005, 1.0]])  # eigenvalue -0.005: needs damping 1e-2
    U, used = inverse_cholesky(indefinite, 1e-6)
    assert used == pytest.approx(1e-2) and torch.isfinite(U).all()
    with pytest.raises(torch.linalg.LinAlgError):
        inverse_cholesky(torch.tensor([[1.0, 3.0], [3.0, 1.0]]), 1e-6, tries=3)


@pytest.mark.parametrize("clip", [False, True])
def test_joint_group_equals_separate_runs(clip):
    W, X, acc = problem()
    spec = QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", group_size=32)
    gptq = GPTQ(clip=clip)
    gptq.observe(("a", "b"), X)
    a, b = gptq.quantize_group(("a", "b"), [W[:20], W[20:]], [spec, spec])
    H = gptq_h(X)
    whole, _ = gptq_quantize(W, H, spec, clip=search_clip(W, spec, H / 2) if clip else None)
    assert torch.equal(torch.cat([a.codes, b.codes]), whole.codes)
    assert torch.equal(torch.cat([a.scale, b.scale]), whole.scale)


def gptq_h(X):
    acc = HessianAccumulator(X.shape[1])
    acc.add(X)
    return acc.H


def test_quantizer_falls_back_to_rtn_without_inputs():
    spec = QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", group_size=16)
    gptq = GPTQ()
    W = torch.randn(8, 32)
    assert torch.equal(gptq.quantize("x", W, spec).codes, quantize(W, spec).codes)
    assert "RTN" in gptq.notes["x"]
