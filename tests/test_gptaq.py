"""GPTAQ and Qronos (asymmetric calibration): GPTQ's codes when the float and quantized inputs agree, a lower error
against the float model's output when they do not, the engine's two activation streams on several families, and
the refusal on ONNX models (resume: tests/test_resume.py)."""

import json

import pytest
import torch

from lowbit.algorithms import REGISTRY
from lowbit.algorithms.gptq import GPTQ, gptq_quantize
from lowbit.algorithms.stats import PairedStats
from lowbit.api import evaluate, quantize
from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec

SPEC = QuantSpec(bits=3, signed=False, symmetric=False, granularity="group", group_size=16)


def problem(n=32, k=64, tokens=800, drift=0.3, seed=0):
    """W, the float model's inputs X, and the quantized model's X~ = X + a correlated error."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g)
    mix = torch.randn(k // 4, k, generator=g) * (torch.rand(k, generator=g) * 3 + 0.1)
    X = torch.randn(tokens, k // 4, generator=g) @ mix + 0.05 * torch.randn(tokens, k, generator=g)
    Xq = X + drift * (X @ (torch.randn(k, k, generator=g) / k ** 0.5)) + 0.05 * torch.randn(tokens, k, generator=g)
    return W, X, Xq


def paired(X, Xq) -> PairedStats:
    acc = PairedStats(X.shape[1])
    for x, t in zip(Xq.split(128), X.split(128)):
        acc.add_pair(x, t)
    return acc


def test_paired_statistics_are_running_means():
    _, X, Xq = problem()
    acc = paired(X, Xq)
    assert acc.count == len(X)
    assert torch.allclose(acc.gram, Xq.T @ Xq / len(X), rtol=1e-4, atol=1e-4)
    assert torch.allclose(acc.cross, (X - Xq).T @ Xq / len(X), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act_order", [True, False])
def test_no_asymmetry_is_gptq(act_order):
    W, X, _ = problem()
    acc = paired(X, X)
    assert float(acc.cross.abs().max()) == 0
    plain, _ = gptq_quantize(W, acc.H, SPEC, act_order=act_order)
    asym, _ = gptq_quantize(W, acc.H, SPEC, act_order=act_order, cross=2 * acc.cross, alpha=1.0)
    assert torch.equal(plain.codes, asym.codes)
    gptaq, gptq = REGISTRY["gptaq"](act_order=act_order), GPTQ(act_order=act_order)
    for x in X.split(100):
        gptaq.observe(("l",), x, x)
        gptq.observe(("l",), x)
    assert torch.equal(gptaq.quantize_group(("l",), [W], [SPEC])[0].codes,
                       gptq.quantize_group(("l",), [W], [SPEC])[0].codes)


@pytest.mark.parametrize("alpha", [0.25, 1.0])
def test_closer_to_the_float_output(alpha):
    """On inputs that drifted from the float model's, GPTAQ's codes reproduce W X better than GPTQ's (which
    reproduce W X~), over several draws."""
    wins = 0
    for seed in range(4):
        W, X, Xq = problem(seed=seed)
        acc = paired(X, Xq)
        plain, _ = gptq_quantize(W, acc.H, SPEC)
        asym, _ = gptq_quantize(W, acc.H, SPEC, cross=2 * acc.cross, alpha=alpha)

        def err(qt):
            return ((Xq @ qt.dequantize().T - X @ W.T) ** 2).mean().item()

        wins += err(asym) < err(plain)
    assert wins == 4


CAL = dict(scheme="w_uint4_per_group_asym", group_size=32, num_calib_data=6, seq_len=48, batch_size=2,
           progress=False, quiet=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "phi3"])
def test_gptaq_on_families(tiny_models, tmp_path, arch):
    out = quantize(tiny_models[arch], tmp_path / "out", algo="gptaq", **CAL)
    errors = out.summary["layer_errors"]
    assert errors and all(0 < e < 1 for e in errors.values())
    recipe = (out.output / "recipe.yaml").read_text()
    assert "gptaq" in recipe and "alpha" in recipe
    assert evaluate(out.output, seq_len=32, max_chunks=2, progress=False)["perplexity"] > 1


def test_gptaq_on_a_mixture_of_experts_and_its_export(tiny_moe, tmp_path):
    out = quantize(tiny_moe["mixtral"], tmp_path / "out", algo="gptaq", export="compressed-tensors",
                   **{**CAL, "group_size": 16})
    assert len(out.summary["layer_errors"]) > 8
    notes = out.summary["layer_notes"]  # experts see other tokens in the two models: calibrated as GPTQ, noted
    assert any("experts" in n for n in notes) and all("experts" in n for n in notes if "gptaq" in notes[n])
    config = json.loads((tmp_path / "out-compressed-tensors" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"


def test_gptaq_after_awq_and_on_onnx(tiny_models, onnx_tiny, tmp_path):
    chained = quantize(tiny_models["llama"], tmp_path / "awq", algo="awq,gptaq", **CAL)
    assert chained.summary["algorithms"] == ["awq", "gptaq"]
    from lowbit.onnx.options import OnnxOptions

    with pytest.raises(LowbitError, match="ONNX front end"):
        quantize(onnx_tiny["gqa"][1], tmp_path / "o", algo="gptaq", onnx_options=OnnxOptions(), **CAL)
    assert not (tmp_path / "o").exists()


def test_qronos_without_asymmetry_is_gptq():
    """Equal inputs: Qronos's least-squares steps are GPTQ's first step, so its codes are GPTQ's (with the same
    damping) up to float rounding."""
    from lowbit.algorithms.qronos import largest_eigenvalue, qronos_quantize

    W, X, _ = problem()
    acc = paired(X, X)
    H = acc.H
    qt, _ = qronos_quantize(W, H, 2 * (acc.cross + acc.gram), SPEC, damp=1e-3)
    ref, _ = gptq_quantize(W, H, SPEC, damp=1e-3 * largest_eigenvalue(H) / float(H.diagonal().mean()))
    assert (qt.codes != ref.codes).float().mean() < 0.01


def test_qronos_closer_to_the_float_output():
    from lowbit.algorithms.qronos import qronos_quantize

    for seed in range(4):
        W, X, Xq = problem(seed=seed)
        acc = paired(X, Xq)
        plain, _ = gptq_quantize(W, acc.H, SPEC)
        qronos, _ = qronos_quantize(W, acc.H, 2 * (acc.cross + acc.gram), SPEC)

        def err(qt):
            return ((Xq @ qt.dequantize().T - X @ W.T) ** 2).mean().item()

        assert err(qronos) < err(plain)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_qronos_on_families(tiny_models, tmp_path, arch):
    out = quantize(tiny_models[arch], tmp_path / "out", algo="qronos", **CAL)
    assert all(0 < e < 1 for e in out.summary["layer_errors"].values())
    assert not any("damping" in n or "RTN" in n for n in out.summary["layer_notes"].values())
