"""ONNX export, checked with its real consumers: onnxruntime runs the graph and must compute what lowbit's
fake-quant model computes (transformers, same weights), step by step through the KV cache too, and
onnxruntime-genai loads the folder and generates the same greedy tokens. MatMulNBits packing is checked
against hand-written bytes and a one-node graph; every unsupported case is refused before anything is written.

Tolerance of the logits: 1e-4 absolute (logits of magnitude ~3). Both sides compute in float32 from the same
weights, so only the summation order differs (observed ~2e-6); one code off by one step moves the logits of
these models by 3e-3 to 1.4e-2 (measured on nine random codes of the Qwen2 export), so the bound still
catches a single wrong code, scale or zero point.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
og = pytest.importorskip("onnxruntime_genai")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lowbit.api import load, quantize  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.eval.perplexity import perplexity  # noqa: E402
from lowbit.eval.onnx_perplexity import onnx_perplexity  # noqa: E402
from lowbit.formats.packed import pack_linear  # noqa: E402
from lowbit.exporters.onnx import check_onnx, export_onnx  # noqa: E402
from lowbit.exporters.onnx_tensors import matmul_block_size, matmul_nbits_tensors, quantize_table  # noqa: E402
from lowbit.exporters.source import PlannedModel  # noqa: E402
from lowbit.formats import Quantized, compute_qparams, quantize_codes  # noqa: E402
from lowbit.spec import QuantSpec, parse_scheme  # noqa: E402
from .conftest import genai_greedy, save_random_model  # noqa: E402

TOL = 1e-4
IDS = torch.randint(3, 300, (2, 23), generator=torch.Generator().manual_seed(0))

# hidden 80 (groups of 32 leave a partial last group of 16), head_dim 16 (GroupQueryAttention needs a multiple
# of 8, so not the shared fixtures' 80 / 4 = 20); Qwen2 with 5 query heads on 1 KV head; Mistral with a sliding
# window shorter than the test sequences
CONFIGS = {
    "llama": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    "qwen2": dict(num_attention_heads=5, num_key_value_heads=1, tie_word_embeddings=False),
    "qwen3": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
    "mistral": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                    tie_word_embeddings=False),
}


def _make(arch: str, folder, tokenizer_dir):
    """A tiny random float32 model (random norms and biases too, so q/k norms and biases count)."""
    import transformers as tf

    classes = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config, "mistral": tf.MistralConfig}
    vocab = len(tf.AutoTokenizer.from_pretrained(tokenizer_dir))
    config = classes[arch](vocab_size=vocab, hidden_size=80, intermediate_size=112, num_hidden_layers=2,
                           max_position_embeddings=256, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                           **CONFIGS[arch])
    return save_random_model(config, folder, tokenizer_dir, randomize_1d=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    return {a: _make(a, tmp_path_factory.mktemp(f"onnx-tiny-{a}"), tokenizer_dir) for a in CONFIGS}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny):
    """quantize(arch, scheme, **kwargs) -> a lowbit folder, made once per module."""
    cache = {}

    def make(arch, scheme, **kwargs):
        key = (arch, scheme, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("lowbit") / f"{arch}-{scheme}"
            quantize(tiny[arch], out, scheme=scheme, progress=False, quiet=True, num_calib_data=4, seq_len=64,
                     **kwargs)
            cache[key] = out
        return cache[key]

    return make


def _feeds(session, ids: np.ndarray, start: int = 0, past: dict | None = None) -> dict:
    n, seq = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((n, start + seq), np.int64),
             "position_ids": np.tile(np.arange(start, start + seq), (n, 1))}
    for spec in session.get_inputs():
        if spec.name.startswith("past"):
            feeds[spec.name] = past[spec.name] if past else np.zeros((n, spec.shape[1], 0, spec.shape[3]), np.float32)
    return feeds


def _session(folder):
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def _reference(folder, ids=IDS) -> np.ndarray:
    model, _ = load(folder)
    with torch.no_grad():
        return model(input_ids=ids).logits.numpy()


def _ops(folder) -> list[str]:
    return [n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node]


# -- MatMulNBits packing -----------------------------------------------------------------------------------

def _qt(codes, spec, scale, zero=None) -> Quantized:
    return Quantized(torch.tensor(codes, dtype=torch.int32), torch.tensor(scale, dtype=torch.float32),
                     None if zero is None else torch.tensor(zero, dtype=torch.int32), spec)


def _nbits(qt: Quantized) -> dict:
    block = matmul_block_size(qt.spec, qt.shape[1])
    return {"block": block, **matmul_nbits_tensors(pack_linear(qt), qt.spec, qt.shape, block)}


def test_matmul_nbits_golden_bytes():
    """Hand-written bytes (FORMATS.md 1.1): codes - qmin packed LSB-first per block (even j in the low nibble),
    a partial block padded with zeros, zero points packed along the blocks, scales repeated per block."""
    int4 = QuantSpec(bits=4, signed=True, symmetric=True, granularity="group", group_size=16)
    codes = [list(range(-8, 8)) + [-8, -7, -6, -5]]  # K = 20: one full block, one of 4 + 12 padding
    out = _nbits(_qt(codes, int4, [[0.5, 0.25]]))
    assert out["block"] == 16 and "zero_points" not in out  # symmetric: the kernel's default zero point 8
    assert out["B"].tolist() == [[[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE], [0x10, 0x32] + [0] * 6]]
    assert out["scales"].tolist() == [[0.5, 0.25]]

    uint4 = QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", group_size=16)
    out = _nbits(_qt([[15, 0] * 24], uint4, [[1.0, 2.0, 3.0]], zero=[[3, 12, 5]]))
    assert out["B"][0, 0].tolist() == [0x0F] * 8
    assert out["zero_points"].tolist() == [[0xC3, 0x05]]  # blocks 0, 1 in one byte; 2 in the low nibble

    uint2 = QuantSpec(bits=2, signed=False, symmetric=False, granularity="group", group_size=16)
    out = _nbits(_qt([[0, 1, 2, 3] * 4], uint2, [[1.0]], zero=[[2]]))
    assert out["B"].tolist() == [[[0xE4] * 4]] and out["zero_points"].tolist() == [[0x02]]

    int8 = QuantSpec(bits=8, signed=True, symmetric=True, granularity="channel", group_size=None)
    out = _nbits(_qt([[-128, 127] + [0] * 30, [5] * 32], int8, [[0.5], [2.0]]))
    assert out["block"] == 32 and out["B"][:, 0, :2].tolist() == [[0, 255], [133, 133]]


def _one_node(tensors: dict, qt: Quantized) -> float:
    """Relative error of onnxruntime's MatMulNBits with these tensors against A @ the dequantized weight."""
    n, k = qt.shape
    a = np.random.default_rng(0).standard_normal((3, k)).astype(np.float32)
    names = [name for name in ("B", "scales", "zero_points") if name in tensors]
    node = helper.make_node("MatMulNBits", ["A", *names], ["Y"], domain="com.microsoft", K=k, N=n, bits=qt.spec.bits,
                            block_size=tensors["block"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, n])],
                              [numpy_helper.from_array(tensors[name], name) for name in names])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
    expected = a @ qt.dequantize().numpy().T
    return float(np.abs(y - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("scheme,group,k", [
    ("w_int4_per_group_sym", 16, 80), ("w_uint4_per_group_asym", 32, 80), ("w_int4_per_group_asym", 48, 112),
    ("w_uint2_per_group_asym", 16, 80), ("w_int8_per_group_sym", 128, 80), ("w_uint8_per_channel_asym", None, 80),
    ("w_int4_per_channel_sym", None, 100), ("w_uint4_per_tensor_asym", None, 96), ("w_int4_per_group_sym", 128, 576),
])
def test_matmul_nbits_one_node(scheme, group, k):
    """onnxruntime's MatMulNBits on one node equals A @ lowbit's dequantized weight, for groups that are whole
    blocks, partial last blocks (K = 80 with 32, 576 with 128), groups of 48 as three blocks of 16, per channel
    as repeated blocks (K = 80) or one padded block (K = 100 -> 128), and per tensor."""
    spec = parse_scheme(scheme, group).weight
    w = torch.randn(24, k, generator=torch.Generator().manual_seed(1))
    scale, zero = compute_qparams(w, spec)
    qt = Quantized(quantize_codes(w, scale, zero, spec), scale, zero, spec)
    assert _one_node(_nbits(qt), qt) < 1e-6


# -- logits against lowbit's fake-quant model ----------------------------------------------------------------

@pytest.mark.parametrize("arch,scheme,kwargs", [
    ("llama", "w_int4_per_group_sym", dict(group_size=16)),
    ("llama", "w_uint4_per_group_asym", dict(group_size=32, exclude_layers=[])),  # lm_head quantized, untied
    ("llama", "w_uint2_per_group_asym", dict(group_size=16)),
    ("qwen2", "w_uint4_per_group_asym", dict(group_size=32)),
    ("qwen2", "w_int8_per_channel_sym", dict()),
    ("qwen3", "w_uint8_per_group_asym", dict(group_size=16)),
    ("qwen3", "w_int4_per_channel_asym", dict()),
    ("mistral", "w_int4_per_tensor_sym", dict(exclude_layers=[])),
])
def test_logits_match_fake_quant(arch, scheme, kwargs, quantized, tmp_path):
    src = quantized(arch, scheme, **kwargs)
    out = export_onnx(src, tmp_path / "onnx")
    session = _session(out)
    logits = session.run(["logits"], _feeds(session, IDS.numpy()))[0]
    assert np.abs(logits - _reference(src)).max() < TOL
    ops = _ops(out)
    assert "MatMulNBits" in ops and "GroupQueryAttention" in ops
    assert ("Gather" in ops) and "GatherBlockQuantized" not in ops


def test_accuracy_level_int8(quantized, tmp_path):
    """accuracy_level=4 (activations quantized to int8 in blocks) is set on every MatMulNBits and stays close."""
    src = quantized("qwen2", "w_uint4_per_group_asym", group_size=32)
    out = export_onnx(src, tmp_path / "onnx", accuracy_level=4)
    nodes = [n for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    assert all(helper.get_attribute_value(next(a for a in n.attribute if a.name == "accuracy_level")) == 4
               for n in nodes)
    session = _session(out)
    reference = _reference(src)
    logits = session.run(["logits"], _feeds(session, IDS.numpy()))[0]
    assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max()


# -- KV cache and onnxruntime-genai --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_past_key_values(arch, quantized, tmp_path):
    """A prefill of 7 tokens then one token at a time, feeding the presents back, gives the logits of one full
    forward (Mistral: 20 tokens across its window of 8)."""
    out = export_onnx(quantized(arch, "w_int4_per_group_sym", group_size=16), tmp_path / "onnx")
    session = _session(out)
    names = [o.name for o in session.get_outputs()]
    ids = np.random.default_rng(0).integers(3, 300, (2, 20))
    full = session.run(["logits"], _feeds(session, ids))[0]
    steps, past, start = [], None, 0
    for chunk in [ids[:, :7]] + [ids[:, t:t + 1] for t in range(7, 20)]:
        outputs = dict(zip(names, session.run(None, _feeds(session, chunk, start, past))))
        past = {n.replace("present", "past_key_values"): v for n, v in outputs.items() if n.startswith("present")}
        steps.append(outputs["logits"])
        start += chunk.shape[1]
    assert np.abs(np.concatenate(steps, axis=1) - full).max() < TOL


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_genai_greedy_generation(arch, quantized, tmp_path):
    """onnxruntime-genai loads the folder (genai_config.json, tokenizer) and greedy-generates the tokens
    transformers generates with lowbit's fake-quant model."""
    src = quantized(arch, "w_uint4_per_group_asym", group_size=32)
    out = export_onnx(src, tmp_path / "onnx")
    prompt = [5, 17, 33, 120, 7, 99, 250, 31]
    model, tokenizer = load(src)
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                  pad_token_id=1)[0, len(prompt):].tolist()
    assert genai_greedy(out, prompt, 24) == expected
    assert og.Tokenizer(og.Model(str(out))).encode("def main():").tolist() == tokenizer("def main():").input_ids
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["type"] == arch and config["search"]["past_present_share_buffer"]


# -- rotation, embedding, perplexity ---------------------------------------------------------------------

def test_online_rotation(quantized, tmp_path):
    """An r4 rotation (the 112-wide Hadamard before each down_proj, 28 x 4) runs as two small MatMuls."""
    src = quantized("llama", "w_int4_per_group_sym", group_size=16, algo="rotation",
                    algo_args={"rotation": {"r4": True}})
    out = export_onnx(src, tmp_path / "onnx")
    session = _session(out)
    logits = session.run(["logits"], _feeds(session, IDS.numpy()))[0]
    assert np.abs(logits - _reference(src)).max() < TOL
    names = {i.name for i in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer}
    assert {"online_rotation_112.left_t", "online_rotation_112.right"} <= names
    assert any("online rotation" in w for w in json.loads((out / "lowbit_export.json").read_text())["warnings"])


@pytest.mark.parametrize("arch,bits", [("llama", 4), ("qwen2", 8)])
def test_quantized_embedding(arch, bits, quantized, tmp_path):
    """quantize_embedding emits GatherBlockQuantized (blocks of 32 on hidden 80: a partial last block); the
    logits equal the fake-quant model with the dequantized table (a tied lm_head keeps the float table) and
    stay close to the float-embedding logits (relative RMS)."""
    src = quantized(arch, "w_int4_per_group_sym", group_size=16)
    out = export_onnx(src, tmp_path / "onnx", quantize_embedding=bits, embedding_block_size=32)
    assert "GatherBlockQuantized" in _ops(out)
    session = _session(out)
    logits = session.run(["logits"], _feeds(session, IDS.numpy()))[0]
    model, _ = load(src)
    float_table = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        float_logits = model(input_ids=IDS).logits.numpy()
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie before editing
        model.model.embed_tokens.weight.copy_(quantize_table(float_table, bits, 32)[1])
        assert np.abs(logits - model(input_ids=IDS).logits.numpy()).max() < TOL
    relative_rms = np.sqrt(((logits - float_logits) ** 2).mean() / (float_logits ** 2).mean())
    assert relative_rms < (0.2 if bits == 4 else 0.02)  # measured 0.14 and 0.007: a random table is the hard case


def test_onnx_perplexity_matches_torch(quantized, tmp_path):
    src = quantized("qwen2", "w_uint4_per_group_asym", group_size=32)
    out = export_onnx(src, tmp_path / "onnx")
    windows = torch.randint(3, 300, (3, 32), generator=torch.Generator().manual_seed(2))
    model, _ = load(src)
    expected = perplexity(model, windows, batch_size=3, progress=False)
    got = onnx_perplexity(out, windows, batch_size=2, progress=False)
    assert got.tokens == expected.tokens and math.isclose(got.perplexity, expected.perplexity, rel_tol=1e-5)


def test_cli_eval_runs_onnx_in_onnxruntime(quantized, text_file, tmp_path, capsys):
    """`lowbit eval ONNX_FOLDER` runs the export in onnxruntime (or, with --runtime onnxruntime-genai, in
    onnxruntime-genai), on the same windows as `lowbit eval LOWBIT_FOLDER`."""
    from lowbit.cli import main

    src = quantized("llama", "w_int4_per_group_sym", group_size=16)
    out = export_onnx(src, tmp_path / "onnx")
    figures = []
    for model, runtime in ((src, "torch"), (out, "torch"), (out, "onnxruntime-genai")):
        assert main(["eval", str(model), "--dataset", str(text_file), "--seq-len", "32", "--max-chunks", "3",
                     "--json", "--no-progress", "--runtime", runtime]) == 0
        figures.append(json.loads(capsys.readouterr().out))
    assert figures[1]["runtime"] == "onnxruntime" and figures[1]["tokens"] == figures[0]["tokens"] == 3 * 31
    assert figures[2]["runtime"] == "onnxruntime-genai" and figures[2]["tokens"] == 3 * 31
    for got in figures[1:]:
        assert math.isclose(got["perplexity"], figures[0]["perplexity"], rel_tol=1e-5)
    assert main(["eval", str(src), "--runtime", "onnxruntime-genai", "--no-progress"]) == 2
    assert "genai_config.json" in capsys.readouterr().err


def test_folder_layout(quantized, tmp_path):
    """model.onnx holds the graph only: initializers of 1 KiB or more are in model.onnx.data."""
    out = export_onnx(quantized("llama", "w_int4_per_group_sym", group_size=16), tmp_path / "onnx")
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "lowbit_export.json"} <= \
        {p.name for p in out.iterdir()}
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external and (out / "model.onnx").stat().st_size < 64 << 10
    assert model.ir_version == 10  # (onnx.checker cannot check it: SimplifiedLayerNormalization is onnxruntime's)


# -- refusals ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme,kwargs,match", [
    ("w_int3_per_group_sym", dict(group_size=16), "2, 4 and 8 bits"),
    ("w_mxfp4", dict(), "integers with float scales"),
    ("w_int8_a_int8_per_tensor_sym", dict(), "quantized input activations"),
])
def test_refusals_write_nothing(scheme, kwargs, match, quantized, tmp_path):
    src = quantized("llama", scheme, **kwargs)
    with pytest.raises(LowbitError, match=match):
        export_onnx(src, tmp_path / "onnx")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_untouched(quantized, tmp_path):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(LowbitError, match="already exists"):
        export_onnx(quantized("llama", "w_int4_per_group_sym", group_size=16), out)
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"] and [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("change,match", [
    (dict(model_type="opt"), "Llama, Mistral, Qwen2, Qwen3, Phi-3"),
    (dict(head_dim=20), "multiple of 8"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "depend on the sequence length"),
    (dict(hidden_act="relu2"), "SiLU and GELU"),
    (dict(model_type="qwen2_moe", num_experts=4), "Mixtral's and Qwen3-MoE's SiLU experts only"),
    (dict(model_type="mixtral", num_local_experts=4, hidden_act="gelu"), "mixture-of-experts"),
])
def test_refused_architectures(change, match):
    config = {**dict(model_type="llama", hidden_size=64, num_attention_heads=4, head_dim=16), **change}
    with pytest.raises(LowbitError, match=match):
        check_onnx(PlannedModel(config=config, modules={}))


def test_planned_checks():
    """check_onnx on a plan (before calibration): a group of 24 and an FP8 KV cache are refused, a group of 48
    and an odd K pass."""
    config = dict(model_type="qwen2", hidden_size=64, num_attention_heads=4)

    def plan(scheme, group, k):
        return PlannedModel(config, {"m": (parse_scheme(scheme, group).weight, (8, k))})
    with pytest.raises(LowbitError, match="group size 24"):
        check_onnx(plan("w_int4_per_group_sym", 24, 96))
    assert check_onnx(plan("w_int4_per_group_sym", 48, 96))
    assert any("padded block of 128" in w for w in check_onnx(plan("w_int4_per_channel_sym", None, 100)))
    fp8 = parse_scheme("w_fp8_a_fp8").input
    with pytest.raises(LowbitError, match="quantized KV cache"):
        check_onnx(PlannedModel(config, {}, outputs={"model.layers.0.self_attn.k_proj": fp8}))


# -- the demo model ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_perplexity(tmp_path):
    """SmolLM2-135M, uint4 asym g128: 576 is not a multiple of 128, so every 576-wide linear ends in a partial
    block. onnxruntime's perplexity equals lowbit's fake-quant figure on the same windows (within 1%; measured
    to 1e-6) and onnxruntime-genai generates with the folder."""
    from lowbit.api import evaluate
    from lowbit.data import eval_windows, load_text, tokenize

    src = tmp_path / "lowbit"
    quantize("demo", src, scheme="w_uint4_per_group_asym", group_size=128, progress=False, quiet=True)
    out = export_onnx(src, tmp_path / "onnx")
    expected = evaluate(src, max_chunks=8, progress=False)
    _, tokenizer = load(src)
    windows = eval_windows(tokenize(tokenizer, load_text("pydoc", "eval")), 512, 8)
    got = onnx_perplexity(out, windows, progress=False)
    assert got.tokens == expected["tokens"]
    assert abs(got.perplexity / expected["perplexity"] - 1) < 0.01
    genai = og.Model(str(out))
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=32, do_sample=False)
    generator = og.Generator(genai, params)
    generator.append_tokens(og.Tokenizer(genai).encode("def fibonacci(n):"))
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 32
