"""AutoRound: the learned rounding on every format (zero iterations is RTN; the learned codes lie on the format's
grid; optimising lowers a layer's output error), and the engine's BLOCK_FORWARD on several families, after AWQ
and a rotation, with exports."""

import json

import pytest
import torch

from lowbit.algorithms import REGISTRY, parse_chain
from lowbit.algorithms.autoround import RangeRounding, rounding
from lowbit.api import evaluate, quantize
from lowbit.engine.block import BlockProblem
from lowbit.errors import LowbitError
from lowbit.formats import quantize as rtn
from lowbit.spec import QuantSpec, parse_scheme

SPECS = {
    "uint4_g32_asym": QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", group_size=32),
    "int3_g16_sym": QuantSpec(bits=3, signed=True, symmetric=True, granularity="group", group_size=16),
    "uint2_channel": QuantSpec(bits=2, signed=False, symmetric=False, granularity="channel"),
}


def all_specs():
    out = dict(SPECS)
    for name in ("w_mxfp4", "w_nvfp4"):
        out[name] = parse_scheme(name).weight
    return out


def linear_problem(spec, rows=24, cols=64, tokens=256, seed=0, clips=None):
    """One linear's output error as a BlockProblem: windows of X, loss = mean (X Wq^T - X W^T)^2."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(tokens, cols, generator=g) * (torch.rand(cols, generator=g) * 3 + 0.1)
    chunks = X.split(32)

    def loss(weights, windows):
        x = torch.cat([chunks[k] for k, _ in windows])
        return ((x @ weights["l"].T - x @ W.T) ** 2).mean()

    return W, X, BlockProblem(["l"], {"l": W}, {"l": spec}, clips or {}, [(k, 0) for k in range(len(chunks))], loss)


@pytest.mark.parametrize("name", sorted(all_specs()))
def test_zero_iterations_is_rtn(name):
    spec = all_specs()[name]
    W, _, problem = linear_problem(spec)
    (qt,) = REGISTRY["autoround"](iters=0).optimise_block(problem)
    ref = rtn(W, spec)
    assert torch.equal(qt.codes, ref.codes) and torch.equal(qt.scale, ref.scale)
    assert (qt.zero is None) == (ref.zero is None) and (qt.zero is None or torch.equal(qt.zero, ref.zero))


@pytest.mark.parametrize("name", sorted(all_specs()))
def test_learned_rounding_lowers_the_output_error(name):
    spec = all_specs()[name]
    W, X, problem = linear_problem(spec)
    # every window in each step: the loss is the same function at every step, so the best kept is never worse
    # than the first (RTN's), and learning lowers it
    (qt,) = REGISTRY["autoround"](iters=40, lr=0.002, batch_size=len(problem.windows)).optimise_block(problem)
    ref = rtn(W, spec)

    def err(q):
        return ((X @ q.dequantize().T - X @ W.T) ** 2).mean().item()

    assert err(qt) < err(ref)
    # the learned weight is what its codes stand for: exactly the fake-quantized weight, on the format's grid
    r = rounding(W, spec, None, (0.5, 1.0))
    assert torch.equal(r.result().dequantize(), r.fake().detach())
    again = rtn(qt.dequantize(), spec)  # codes already on the grid: re-quantizing with its own scales keeps them
    assert qt.codes.shape == W.shape and torch.isfinite(qt.dequantize()).all() and again.codes.shape == W.shape


def test_clipping_factors_stay_in_range_and_start_from_a_transform():
    spec = SPECS["uint4_g32_asym"]
    start = torch.full((24, 2), 0.8)
    W, _, problem = linear_problem(spec, clips={"l": start})
    algo = REGISTRY["autoround"](iters=0, clip_min=0.7, clip_max=0.9)
    (qt,) = algo.optimise_block(problem)
    assert torch.equal(qt.codes, rtn(W, spec, start).codes)  # an AWQ clip search's factors are the start
    r = rounding(W, spec, None, (0.7, 0.9))
    assert isinstance(r, RangeRounding) and float(r.clip_lo.detach().max()) == pytest.approx(0.9)
    assert float(r.clip.detach().max()) == pytest.approx(0.9)  # 1.0 clamped into the range
    with pytest.raises(LowbitError, match="clip_min"):
        parse_chain("autoround", {"autoround": {"clip_min": 0.9, "clip_max": 0.8}})
    with pytest.raises(LowbitError, match="iters"):
        parse_chain("autoround", {"autoround": {"iters": -1}})


CAL = dict(scheme="w_uint4_per_group_asym", group_size=32, num_calib_data=6, seq_len=48, batch_size=2,
           progress=False, quiet=True, algo_args={"autoround": {"iters": 8, "batch_size": 3}})


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "phi3"])
def test_autoround_on_families(tiny_models, tmp_path, arch):
    rtn_out = quantize(tiny_models[arch], tmp_path / "rtn", **{**CAL, "algo_args": None})
    out = quantize(tiny_models[arch], tmp_path / "out", algo="autoround", **CAL)
    notes = out.summary["layer_notes"]
    assert notes and all("autoround: block output loss" in n for n in notes.values())
    recipe = (out.output / "recipe.yaml").read_text()
    assert "autoround" in recipe and "iters: 8" in recipe
    ppl = evaluate(out.output, seq_len=32, max_chunks=2, progress=False)["perplexity"]
    assert 1 < ppl < 1.5 * evaluate(rtn_out.output, seq_len=32, max_chunks=2, progress=False)["perplexity"]


def test_zero_iterations_through_the_engine_is_rtn(tiny_models, tmp_path):
    from lowbit.exporters.native import compare_folders

    rtn_out = quantize(tiny_models["llama"], tmp_path / "rtn", **{**CAL, "algo_args": None})
    out = quantize(tiny_models["llama"], tmp_path / "ar", algo="autoround",
                   **{**CAL, "algo_args": {"autoround": {"iters": 0}}})
    diff = compare_folders(rtn_out.output, out.output)
    assert diff["codes"] > 0 and diff["codes_differing"] == 0 and diff["max_abs_difference"] == 0


@pytest.mark.parametrize("scheme", ["w_mxfp4", "w_nvfp4"])
def test_autoround_on_fp4_formats(tiny_models, tmp_path, scheme):
    out = quantize(tiny_models["llama"], tmp_path / "out", algo="autoround", **{**CAL, "scheme": scheme,
                                                                                  "group_size": None})
    assert all(0 < e < 1 for e in out.summary["layer_errors"].values())
    assert evaluate(out.output, seq_len=32, max_chunks=2, progress=False)["perplexity"] > 1


def test_autoround_after_awq_and_rotation_with_exports(tiny_models, tmp_path):
    out = quantize(tiny_models["llama"], tmp_path / "awq", algo="awq,autoround", export="compressed-tensors",
                   **{**CAL, "group_size": 16})
    assert out.summary["algorithms"] == ["awq", "autoround"]
    config = json.loads((tmp_path / "awq-compressed-tensors" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    rotated = quantize(tiny_models["llama"], tmp_path / "rot", algo="rotation,autoround", export="compressed-tensors",
                       **{**CAL, "group_size": 16, "scheme": "w_int4_per_group_sym"})
    assert rotated.summary["algorithms"] == ["rotation", "autoround"]
    from transformers import AutoModelForCausalLM  # the export loads in its client

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "rot-compressed-tensors")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_autoround_on_a_mixture_of_experts(tiny_moe, tmp_path):
    out = quantize(tiny_moe["mixtral"], tmp_path / "out", algo="autoround", **{**CAL, "group_size": 16})
    assert len(out.summary["layer_errors"]) > 8
    assert evaluate(out.output, seq_len=32, max_chunks=2, progress=False)["perplexity"] > 1


def test_refused_on_onnx(onnx_tiny, tmp_path):
    from lowbit.onnx.options import OnnxOptions

    with pytest.raises(LowbitError, match="ONNX front end"):
        quantize(onnx_tiny["gqa"][1], tmp_path / "o", algo="autoround", onnx_options=OnnxOptions(), **CAL)
    assert not (tmp_path / "o").exists()
