"""quantize_k (llama.cpp's K-quants Q2_K..Q6_K from float weights), checked through gguf-py's own dequantizers: the
bytes decode to the right shape, the error ranks by bit width and beats gguf-py's legacy types of similar size,
weights a block holds exactly come back exactly (which pins every scale, min and code to its byte position), an
importance vector moves the error to the columns it marks, and bad arguments are refused. Where llama-cpp-python
is installed, the error is also compared with llama.cpp's own quantizer."""

from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from lowbit.exporters.gguf_kquants import KQUANT_TYPES, SUPER, quantize_k

from .conftest import need_llama_cpp

# relative RMS error on _weight(): measured 0.313 / 0.177 / 0.088 / 0.045 / 0.026
BOUND = {T.Q2_K: 0.35, T.Q3_K: 0.20, T.Q4_K: 0.10, T.Q5_K: 0.05, T.Q6_K: 0.03}
IMPORTANT = [7, 100, 101, 400]  # columns the importance vector of _importance() marks


def _weight(rows: int = 16, cols: int = 512, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with three outlier columns (x10)."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    w[:, [5, 200, 333]] *= 10
    return w


def _importance(cols: int = 512) -> torch.Tensor:
    imp = torch.ones(cols)
    imp[IMPORTANT] = 1000.0
    return imp


def _decode(blocks: np.ndarray, qtype) -> torch.Tensor:
    return torch.from_numpy(dequantize(blocks, qtype))


def _rel(approx: torch.Tensor, w: torch.Tensor, imp: torch.Tensor | None = None) -> float:
    """Relative RMS error, optionally weighted per column."""
    weight = torch.ones(w.shape[1]) if imp is None else imp
    return float((((approx - w) ** 2 * weight).sum() / ((w ** 2) * weight).sum()).sqrt())


@pytest.fixture(scope="module")
def errors():
    """qtype -> relative RMS error of quantize_k on _weight(), through gguf-py's dequantizer."""
    w = _weight()
    return {t: _rel(_decode(quantize_k(w, t), t), w) for t in KQUANT_TYPES}


@pytest.mark.parametrize("qtype", KQUANT_TYPES, ids=lambda t: t.name)
def test_bytes_decode_with_bounded_error(qtype, errors):
    w = _weight()
    blocks = quantize_k(w, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    assert block == SUPER
    assert blocks.dtype == np.uint8 and blocks.shape == (16, 512 // SUPER * size)
    assert _decode(blocks, qtype).shape == (16, 512)
    assert errors[qtype] < BOUND[qtype]


def test_error_ranks_by_bits_and_beats_legacy_types(errors):
    assert errors[T.Q6_K] < errors[T.Q5_K] < errors[T.Q4_K] < errors[T.Q3_K] < errors[T.Q2_K]
    w = _weight()
    legacy = {t: _rel(_decode(quantize(w.numpy(), t), t), w) for t in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0)}
    # measured: Q4_0 0.135, Q4_1 0.092, Q5_0 0.075, Q8_0 0.0089
    assert errors[T.Q4_K] < 0.8 * legacy[T.Q4_0]
    assert errors[T.Q4_K] < legacy[T.Q4_1]  # 4.5 bits per weight against 5
    assert errors[T.Q5_K] < 0.8 * legacy[T.Q5_0]
    assert errors[T.Q6_K] < 4 * legacy[T.Q8_0]


def _representable(qtype, rows: int = 4, cols: int = 512, seed: int = 0) -> torch.Tensor:
    """Weights that qtype holds exactly: float16 super-scales, integer sub-block scales (and mins) whose largest
    sits at the top of its range, and codes that span each sub-block's full range, so that llama.cpp's search
    finds them again."""
    rng = np.random.default_rng(seed)
    sub = 32 if qtype in (T.Q4_K, T.Q5_K) else 16
    shape = (rows * cols // SUPER, SUPER // sub)

    def half(size):
        return rng.uniform(0.005, 0.02, (size[0], 1)).astype(np.float16).astype(np.float64)

    if qtype in (T.Q3_K, T.Q6_K):
        nmax, top = (4, 32) if qtype == T.Q3_K else (32, 128)
        scale = rng.integers(1, top, shape) * rng.choice([-1, 1], shape)
        scale[:, 3] = -top
        codes = rng.integers(-nmax, nmax, (*shape, sub))
        codes[..., 5] = -nmax
        values = half(shape)[..., None] * scale[..., None] * codes
    else:
        nmax, top = {T.Q2_K: (3, 15), T.Q4_K: (15, 63), T.Q5_K: (31, 63)}[qtype]
        scale, mins = rng.integers(1, top + 1, shape), rng.integers(0, top + 1, shape)
        scale[:, 2], mins[:, 1] = top, top
        codes = rng.integers(0, nmax + 1, (*shape, sub))
        codes[..., 3], codes[..., 6] = 0, nmax
        values = half(shape)[..., None] * scale[..., None] * codes - half(shape)[..., None] * mins[..., None]
    return torch.from_numpy(values.reshape(rows, cols).astype(np.float32))


@pytest.mark.parametrize("with_importance", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("qtype", KQUANT_TYPES, ids=lambda t: t.name)
def test_representable_weights_come_back_exactly(qtype, with_importance):
    w = _representable(qtype)
    imp = torch.rand(512, generator=torch.Generator().manual_seed(1)) + 0.1 if with_importance else None
    back = _decode(quantize_k(w, qtype, imp), qtype)
    # one code off would be at least one grid step (>= 0.005) away
    torch.testing.assert_close(back, w, rtol=0, atol=1e-6 * float(w.abs().max()))


@pytest.mark.parametrize("qtype", KQUANT_TYPES, ids=lambda t: t.name)
def test_importance_lowers_the_weighted_error(qtype):
    w, imp = _weight(), _importance()
    plain = _rel(_decode(quantize_k(w, qtype), qtype), w, imp)
    weighted = _rel(_decode(quantize_k(w, qtype, imp), qtype), w, imp)
    assert weighted < 0.9 * plain  # measured ratios 0.42-0.56


def test_zero_weights_stay_zero():
    w = torch.zeros(2, 512)
    w[1, 256:] = torch.randn(256)  # one zero super-block next to a normal one
    for qtype in KQUANT_TYPES:
        back = _decode(quantize_k(w, qtype), qtype)
        assert torch.equal(back[0], torch.zeros(512)) and torch.equal(back[1, :256], torch.zeros(256))


@pytest.mark.parametrize("call", [
    lambda: quantize_k(torch.randn(4, 300), T.Q4_K),
    lambda: quantize_k(torch.randn(512), T.Q4_K),
    lambda: quantize_k(torch.randn(4, 512), T.Q4_0),
    lambda: quantize_k(torch.randn(4, 512), T.IQ4_XS),
    lambda: quantize_k(torch.randn(4, 512), T.Q4_K, torch.ones(256)),
    lambda: quantize_k(torch.randn(4, 512), T.Q4_K, -torch.ones(512)),
], ids=["cols-not-256", "1-d", "legacy-type", "i-quant", "importance-shape", "negative-importance"])
def test_bad_arguments_are_refused(call):
    with pytest.raises(ValueError):
        call()


def _ggml_quantize(w: np.ndarray, qtype, imp: np.ndarray | None) -> np.ndarray:
    """llama.cpp's own quantizer (ggml_quantize_chunk in the libggml-base that llama-cpp-python ships), or skip."""
    lib_dir = os.path.join(os.path.dirname(need_llama_cpp().__file__), "lib")
    found = sorted(glob.glob(os.path.join(lib_dir, "libggml-base.*")) + glob.glob(os.path.join(lib_dir, "ggml-base.*")))
    if not found:
        pytest.skip("llama-cpp-python ships no libggml-base library here")
    fn = ctypes.CDLL(found[0]).ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    w = np.ascontiguousarray(w, dtype=np.float32)
    out = np.zeros((w.shape[0], w.shape[1] // SUPER * GGML_QUANT_SIZES[qtype][1]), np.uint8)
    imp = None if imp is None else np.ascontiguousarray(imp, dtype=np.float32)
    fn(int(qtype), w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1], None if imp is None else imp.ctypes.data)
    return out


@pytest.mark.parametrize("with_importance", [False, True], ids=["plain", "importance"])
def test_error_matches_or_beats_llama_cpp(with_importance):
    w = _weight(rows=32, cols=1024, seed=3)
    imp = _importance(1024) if with_importance else None
    for qtype in KQUANT_TYPES:
        ours = _rel(_decode(quantize_k(w, qtype, imp), qtype), w, imp)
        theirs = _rel(_decode(_ggml_quantize(w.numpy(), qtype, None if imp is None else imp.numpy()), qtype), w, imp)
        assert ours < 1.01 * theirs, (qtype.name, ours, theirs)  # measured ratios 0.93-1.003
