"""lowbit's weighted-search Q4_0 / Q4_1 / Q5_0 / Q5_1 quantizer against gguf-py's reference quantizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from lowbit.exporters.gguf_blocks import requantize
from lowbit.exporters.gguf_legacy import LEGACY_TYPES, quantize_legacy

# ours / gguf-py's relative RMS error on _data(): measured Q4_0 0.969, Q4_1 0.896, Q5_0 0.979, Q5_1 0.901
# (pure Gaussian: 0.94, 0.89, 0.94, 0.88)
MAX_RATIO = {T.Q4_0: 0.98, T.Q4_1: 0.92, T.Q5_0: 0.99, T.Q5_1: 0.92}


@pytest.fixture(autouse=True)
def _one_thread():
    """As requantize does: torch's intra-op threads only slow these small steps down on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(rows: int = 128, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with 1% outliers (8x)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    return torch.where(torch.rand(x.shape, generator=g) < 0.01, 8 * x, x)


def _rel(got: np.ndarray, x: torch.Tensor, w: np.ndarray | float = 1.0) -> float:
    x = x.numpy()
    return float(np.sqrt((w * (got - x) ** 2).sum() / (w * x * x).sum()))


@pytest.mark.parametrize("qtype", LEGACY_TYPES)
def test_beats_gguf_reference(qtype):
    x = _data()
    data = quantize_legacy(x, qtype)
    assert data.dtype == np.uint8 and data.shape == quantize(x.numpy(), qtype).shape
    got = dequantize(data, qtype)
    assert got.shape == x.shape
    ref = _rel(dequantize(quantize(x.numpy(), qtype), qtype), x)
    assert _rel(got, x) <= ref * MAX_RATIO[qtype]
    assert np.array_equal(requantize(x, qtype), data)


@pytest.mark.parametrize("qtype", LEGACY_TYPES)
def test_importance_lowers_weighted_error(qtype):
    x = _data(seed=1)
    imp = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(2)) ** 4 * 10
    w = imp.numpy()[None]
    plain = _rel(dequantize(quantize_legacy(x, qtype), qtype), x, w)
    weighted = _rel(dequantize(quantize_legacy(x, qtype, imp), qtype), x, w)
    assert weighted < plain * 0.96  # measured Q4_0 0.92, Q4_1 0.88, Q5_0 0.95, Q5_1 0.87
    assert np.array_equal(requantize(x, qtype, imp), quantize_legacy(x, qtype, imp))


@pytest.mark.parametrize("qtype", LEGACY_TYPES)
def test_grid_values_round_trip(qtype):
    x = _data(64, 128, seed=3)
    once = torch.from_numpy(dequantize(quantize_legacy(x, qtype), qtype))
    twice = dequantize(quantize_legacy(once, qtype), qtype)
    assert _rel(twice, once) < 1e-6


@pytest.mark.parametrize("qtype", LEGACY_TYPES)
def test_degenerate_blocks(qtype):
    rows = [torch.zeros(64), torch.full((64,), 0.37), torch.rand(64) + 2.0, -torch.rand(64) - 2.0,
            torch.linspace(-1e-6, 1e-6, 64)]
    x = torch.stack(rows)
    got = dequantize(quantize_legacy(x, qtype), qtype)
    ref = dequantize(quantize(x.numpy(), qtype), qtype)
    assert np.isfinite(got).all() and not got[0].any()
    err, ref_err = ((got - x.numpy()) ** 2).sum(1), ((ref - x.numpy()) ** 2).sum(1)
    assert (err <= ref_err * (1 + 1e-6) + 1e-20).all()


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        quantize_legacy(torch.zeros(2, 40), T.Q4_0)
    with pytest.raises(ValueError):
        quantize_legacy(torch.zeros(2, 32), T.Q8_0)
    with pytest.raises(ValueError):
        quantize_legacy(torch.zeros(2, 32), T.Q4_1, torch.full((32,), -1.0))
