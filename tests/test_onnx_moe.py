"""Mixture-of-experts in the ONNX export (exporters/onnx_moe.py) on tests/families.py's tiny Mixtral and Qwen3-MoE
(4 experts, top 2, two sparse layers): first what onnxruntime 1.32's CPU QMoE and MoE kernels compute, against
numpy (the facts the export rests on), then the export's logits against lowbit's dequantized torch model
(lowbit.api.load) on the same ids. onnxruntime-genai's greedy generation of both families is
tests/test_onnx_families.py's.

Tolerances (logits of magnitude 1 to 8): float32 1e-4 absolute (measured 3e-6 to 5e-6: lowbit's 4-bit codes are
QMoE's bytes as they are); float16 5e-3 of the largest logit (measured 1.3e-3 to 1.6e-3 of it).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lowbit.api import load, quantize  # noqa: E402
from lowbit.exporters.onnx import export_onnx  # noqa: E402
from lowbit.runtimes import decoder_feeds, decoder_session  # noqa: E402

IDS = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))


# -- the kernels -------------------------------------------------------------------------------------------------

E, H, I, K, T = 4, 96, 64, 2, 5
RNG = np.random.default_rng(0)
X, LOGITS = RNG.standard_normal((T, H)).astype(np.float32), RNG.standard_normal((T, E)).astype(np.float32)


def _run_moe(op: str, weights: list, **attrs) -> np.ndarray:
    """One MoE / QMoE node over X and LOGITS; weights: its inputs from 2 on (None for an absent one)."""
    names, inits = ["x", "router"], []
    for j, w in enumerate(weights):
        names.append("" if w is None else f"w{j}")
        if w is not None:
            inits.append(numpy_helper.from_array(w, f"w{j}"))
    node = helper.make_node(op, names, ["y"], domain="com.microsoft", k=K, activation_type="swiglu", swiglu_fusion=1,
                            **attrs)
    graph = helper.make_graph([node], "moe", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                              for n in ("x", "router")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": X, "router": LOGITS})[0]


def _reference(gate, up, down, normalize: bool) -> np.ndarray:
    """softmax over all experts, top k, optionally renormalised; silu(gate) * up through down."""
    probs = np.exp(LOGITS - LOGITS.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    out = np.zeros((T, H), np.float32)
    for t in range(T):
        chosen = np.argsort(-probs[t])[:K]
        weights = probs[t, chosen] / (probs[t, chosen].sum() if normalize else 1.0)
        for e, w in zip(chosen, weights):
            g = gate[e] @ X[t]
            out[t] += w * (down[e] @ (g / (1 + np.exp(-g)) * (up[e] @ X[t])))
    return out


def _quantize(w: np.ndarray, bits: int, block: int):
    """Asymmetric codes, scales and zero points along the last axis (partial last block), and the dequantized w."""
    n_blocks = -(-w.shape[-1] // block)
    padded = np.zeros(w.shape[:-1] + (n_blocks * block,), np.float32)
    padded[..., :w.shape[-1]] = w
    b = padded.reshape(*w.shape[:-1], n_blocks, block)
    lo, hi = np.minimum(b.min(-1), 0), np.maximum(b.max(-1), 0)
    scale = (hi - lo) / (2 ** bits - 1)
    zero = np.round(-lo / scale)
    q = np.clip(np.round(b / scale[..., None]) + zero[..., None], 0, 2 ** bits - 1)
    deq = ((q - zero[..., None]) * scale[..., None]).reshape(padded.shape)[..., :w.shape[-1]]
    return q.reshape(padded.shape)[..., :w.shape[-1]].astype(np.uint8), scale, zero.astype(np.uint8), deq


def _pack4(q: np.ndarray) -> np.ndarray:
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], -1)
    return (q[..., 0::2] | q[..., 1::2] << 4).astype(np.uint8)


def test_kernel_contract():
    """onnxruntime 1.32 CPU: MoE honours normalize_routing_weights 0 (Qwen3-MoE) and 1 (Mixtral) with fc1's gate
    and up rows interleaved; QMoE computes 4-bit experts with zero points exactly (K = 96 in blocks of 32 and 64,
    the last one partial) but always renormalises, and its 8-bit experts are off by more than 1e-3 of the
    output (int8 activations) -- why the export scales QMoE's output back and writes 8-bit experts float."""
    gate, up, down = (RNG.standard_normal(s).astype(np.float32) * 0.1 for s in ((E, I, H), (E, I, H), (E, H, I)))
    fc1 = np.stack([gate, up], 2).reshape(E, 2 * I, H)
    for normalize in (0, 1):
        got = _run_moe("MoE", [fc1, None, down], normalize_routing_weights=normalize)
        assert np.abs(got - _reference(gate, up, down, bool(normalize))).max() < 1e-5
    for block in (32, 64):
        q1, s1, z1, d1 = _quantize(fc1, 4, block)
        q2, s2, z2, d2 = _quantize(down, 4, block)
        halves = d1.reshape(E, I, 2, H)
        inputs = [_pack4(q1), s1, None, _pack4(q2), s2, None, None, None, None, _pack4(z1), _pack4(z2)]
        for normalize in (0, 1):
            got = _run_moe("QMoE", inputs, expert_weight_bits=4, block_size=block, normalize_routing_weights=normalize)
            assert np.abs(got - _reference(halves[:, :, 0], halves[:, :, 1], d2, True)).max() < 1e-5
    q1, s1, z1, d1 = _quantize(fc1, 8, 32)
    q2, s2, z2, d2 = _quantize(down, 8, 32)
    got = _run_moe("QMoE", [q1, s1, None, q2, s2, None, None, None, None, z1, z2], expert_weight_bits=8,
                   block_size=32, normalize_routing_weights=1)
    halves = d1.reshape(E, I, 2, H)
    expected = _reference(halves[:, :, 0], halves[:, :, 1], d2, True)
    assert np.abs(got - expected).max() > 1e-3 * np.abs(expected).max()


# -- the export --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized(tmp_path_factory, family_model):
    """(family, scheme, group size, excluded layers) -> its lowbit folder, made once per module."""
    cache = {}

    def make(family, scheme="w_uint4_per_group_asym", group=32, exclude=("lm_head",)):
        key = (family, scheme, group, exclude)
        if key not in cache:
            out = tmp_path_factory.mktemp("lowbit") / family
            quantize(family_model(family), out, scheme=scheme, group_size=group, exclude_layers=list(exclude),
                     progress=False, quiet=True)
            cache[key] = out
        return cache[key]
    return make


def _compare(src, out, dtype: str = "float32") -> tuple[float, float, list[str]]:
    """(largest logit error, largest reference logit, the graph's op types) of an export against lowbit's model."""
    model, _ = load(src)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits.float().numpy()
    session = decoder_session(out / "model.onnx")
    got = session.run(["logits"], decoder_feeds(session, IDS.numpy(), None))[0]
    assert got.dtype == (np.float16 if dtype == "float16" else np.float32)
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node]
    return float(np.abs(got.astype(np.float32) - expected).max()), float(np.abs(expected).max()), ops


@pytest.mark.parametrize("family,scheme,group", [
    ("mixtral", "w_uint4_per_group_asym", 32), ("mixtral", "w_int4_per_group_sym", 64),
    ("qwen3_moe", "w_uint4_per_group_asym", 32), ("qwen3_moe", "w_int4_per_channel_sym", None)])
def test_qmoe_logits(family, scheme, group, quantized, tmp_path):
    """4-bit experts (with zero points or without, groups or one scale per row) are one QMoE node per layer that
    computes lowbit's model; Qwen3-MoE without norm_topk_prob scales it by the top-k weights' share (TopK)."""
    src = quantized(family, scheme, group)
    err, _, ops = _compare(src, export_onnx(src, tmp_path / "onnx"))
    assert err < 1e-4
    assert ops.count("QMoE") == 2 and "MoE" not in ops
    assert ("TopK" in ops) == (family == "qwen3_moe")


def test_qwen3_moe_norm_topk_prob(quantized, tmp_path):
    """Qwen3-MoE with norm_topk_prob true (as Qwen3-30B-A3B): QMoE's own renormalisation, no TopK."""
    src = tmp_path / "src"
    shutil.copytree(quantized("qwen3_moe"), src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "norm_topk_prob": True}))
    err, _, ops = _compare(src, export_onnx(src, tmp_path / "onnx"))
    assert err < 1e-4 and "TopK" not in ops


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_float16(family, quantized, tmp_path):
    err, largest, ops = _compare(quantized(family), export_onnx(quantized(family), tmp_path / "onnx",
                                                                 dtype="float16"), "float16")
    assert err < 5e-3 * largest and "QMoE" in ops


@pytest.mark.parametrize("family,scheme,exclude", [
    ("qwen3_moe", "w_int8_per_channel_sym", ("lm_head",)),
    ("mixtral", "w_uint4_per_group_asym", ("lm_head", r"re:.*experts\.[02]\..*"))])
def test_float_experts_with_a_warning(family, scheme, exclude, quantized, tmp_path):
    """8-bit experts, or a layer whose experts are partly float, are a float MoE node of the dequantized weights
    (the same function), and the export says so."""
    src = quantized(family, scheme, None if "channel" in scheme else 32, exclude)
    out = export_onnx(src, tmp_path / "onnx")
    err, _, ops = _compare(src, out)
    assert err < 1e-4 and ops.count("MoE") == 2 and "QMoE" not in ops
    warnings = json.loads((out / "lowbit_export.json").read_text())["warnings"]
    assert any("experts of every mixture-of-experts layer stay float" in w for w in warnings)
