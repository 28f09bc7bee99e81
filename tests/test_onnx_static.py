"""INT8 static quantization of an ONNX decoder (weights and activations, QDQ) with QuaRot R1 and SmoothQuant
applied on the graph, on tiny random decoders written by onnxruntime-genai's model builder (fp32, CPU):
rotation and SmoothQuant folds that leave the float function unchanged, QDQ output that loads in onnxruntime
(and onnxruntime-genai) close to float, rotation + SmoothQuant helping on a model with outlier channels, and
refusals that write nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lowbit import api  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.runtimes import decoder_feeds  # noqa: E402
from lowbit.onnx.calibrate import session_with_outputs  # noqa: E402
from lowbit.onnx.graph import OnnxDecoder  # noqa: E402
from lowbit.onnx.rotate import plan_rotation, write_rotated  # noqa: E402
from lowbit.onnx.run import OnnxOptions  # noqa: E402
from lowbit.onnx.static_int8 import smooth_graph  # noqa: E402

IDS = torch.randint(3, 300, (1, 19), generator=torch.Generator().manual_seed(1))
CALIB = dict(num_calib_data=4, seq_len=64, progress=False, quiet=True)

@pytest.fixture(scope="module")
def models(onnx_tiny, tmp_path_factory):
    """kind -> (HF float folder, the builder's fp32 ONNX folder of it); "outlier": the GQA model with a few norm
    gain channels scaled up (activation outlier channels, as in real LLMs)."""
    out = dict(onnx_tiny)
    out["outlier"] = (None, _with_outliers(onnx_tiny["gqa"][1], tmp_path_factory.mktemp("onnx-outlier") / "m"))
    return out


def _with_outliers(src, folder):
    """A copy of the ONNX model with norm gains of 4 channels multiplied by 30 (outlier input channels of every
    weight MatMul reading a norm)."""
    from lowbit.onnx.quantize import carry_files
    from lowbit.onnx.write import GraphWriter

    decoder = OnnxDecoder(src)
    folder.mkdir()
    writer = GraphWriter(decoder, folder)
    for node in decoder.graph.node:
        if "LayerNormalization" in node.op_type:
            name = node.input[2 if node.op_type.startswith("Skip") else 1]
            gamma = np.array(decoder.array(name))
            gamma[[3, 17, 40, 77]] *= 30
            writer.tensor(name, gamma)
    writer.write()
    carry_files(decoder, folder)
    return folder


def _logits(folder, ids=IDS) -> np.ndarray:
    decoder = OnnxDecoder(folder)
    session = session_with_outputs(decoder, [], ["CPUExecutionProvider"])
    return session.run(["logits"], decoder_feeds(session, ids.numpy(), 16))[0]


def _qdq_logits(folder, ids=IDS) -> np.ndarray:
    """Logits of a QDQ model as its graph defines them (graph optimizations off: no fused integer kernels, whose
    int16 pair sums saturate on x86 CPUs without VNNI)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], decoder_feeds(session, ids.numpy(), 16))[0]


def _ops(folder) -> list[str]:
    return [n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node]


@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_rotation_keeps_the_float_function(models, tmp_path, kind):
    """R1 on the graph (gammas absorbed, readers Q^T W, writers W Q, embedding E Q, tied table untied) leaves
    the logits unchanged."""
    src = models[kind][1]
    decoder = OnnxDecoder(src)
    _, report = write_rotated(decoder, tmp_path / "rot", seed=3)
    assert report["norms"] == 5 and report["writers"] == 4 and report["readers"] == 7
    base, rotated = _logits(src), _logits(tmp_path / "rot")
    assert np.abs(rotated - base).max() < 1e-4
    out = OnnxDecoder(tmp_path / "rot")
    gammas = [out.array(n.input[1 if n.op_type.startswith("Simplified") else 2]) for n in out.graph.node
              if "LayerNormalization" in n.op_type]
    assert all(np.all(g == 1) for g in gammas)
    if kind == "gqa":  # the tied table is untied: the Gather reads its own rotated table, no Transpose
        assert "Transpose" not in _ops(tmp_path / "rot")
        assert out.embeddings[0].transposed is False


def _plan(decoder, scheme="w_int8_a_int8_per_tensor_sym"):
    from lowbit.recipe import resolve_plan

    return resolve_plan(api.make_recipe(scheme), decoder.linears())


@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_smoothquant_fold_keeps_the_float_function(models, tmp_path, kind):
    """SmoothQuant's scales folded into gammas / up_proj columns / V columns (MHA) leave the logits unchanged;
    under GQA o_proj has no fold target and is noted."""
    from lowbit.onnx.quantize import carry_files
    from lowbit.onnx.write import GraphWriter

    decoder = OnnxDecoder(models[kind][1])
    windows = torch.randint(3, 300, (3, 48), generator=torch.Generator().manual_seed(0))
    (tmp_path / "sq").mkdir()
    writer = GraphWriter(decoder, tmp_path / "sq")
    notes = smooth_graph(decoder, _plan(decoder), windows, 0.5, writer, progress=False)
    writer.write()
    carry_files(decoder, tmp_path / "sq")
    assert np.abs(_logits(tmp_path / "sq") - _logits(decoder.folder)).max() < 1e-4
    assert ("model.layers.0.attn.o_proj" in notes) == (kind == "gqa")
    changed = OnnxDecoder(tmp_path / "sq").array("model.layers.0.input_layernorm.weight")
    assert not np.allclose(changed, decoder.array("model.layers.0.input_layernorm.weight"))


def _static(src, out, text_file, algo, scheme="w_int8_a_int8_per_tensor_sym", options=None):
    return api.quantize(src, out, scheme=scheme, algo=algo, dataset=str(text_file),
                        onnx_options=options or OnnxOptions(), **CALIB)


def _text_ids(hf_or_onnx, text_file, n=96):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_or_onnx)
    return tok(text_file.read_text()[-3000:], return_tensors="pt").input_ids[:, :n]


@pytest.mark.parametrize("scheme", ["w_int8_a_int8_per_tensor_sym", "w_int8_a_int8_per_channel_sym"])
def test_static_int8_qdq_runs_close_to_float(models, text_file, tmp_path, scheme):
    """The QDQ folder loads in onnxruntime: int8 weights (per tensor / per channel) and int8 static activations
    on every planned MatMul (lm_head excluded), logits close to float, summary and carried files written."""
    src = models["gqa"][1]
    out = tmp_path / "q"
    result = _static(src, out, text_file, "rtn", scheme)
    ids = _text_ids(src, text_file)
    base = _logits(src, ids)
    rel = np.abs(_qdq_logits(out, ids) - base).mean() / np.abs(base).mean()
    assert 0 < rel < 0.1
    assert np.abs(_logits(out, ids) - base).mean() / np.abs(base).mean() < 0.2  # onnxruntime's fused kernels
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    matmuls = {n.name: n for n in model.graph.node if n.op_type == "MatMul"}
    assert all(m.input[1].endswith("_DequantizeLinear_Output") or name == "/lm_head/MatMul"
               for name, m in matmuls.items())
    assert not matmuls["/lm_head/MatMul"].input[0].endswith("_DequantizeLinear_Output")
    # Q/DQ on the inputs only: qkv, o_proj, gate/up (one shared), down_proj per layer; MatMul outputs stay float
    quantized = [n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantized) == 8 and not any(t.endswith("MatMul/output_0") for t in quantized)
    inits = {t.name: t for t in model.graph.initializer}
    weight_scales = [inits[n.input[1]] for n in dq if n.input[0].endswith("_quantized")]
    assert len(weight_scales) == 10
    assert all((len(t.dims) == 1) == (scheme.endswith("channel_sym")) for t in weight_scales)
    assert (out / "model.onnx.data").is_file() and (out / "genai_config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quantized_modules"] == 10 and summary["onnx_format"] == "qdq"
    assert result.summary["static_int8"]["per_channel_weights"] == scheme.endswith("channel_sym")


def test_rotation_and_smoothquant_help_with_outliers(models, text_file, tmp_path):
    """On a model with outlier input channels, SmoothQuant and rotation + SmoothQuant bring the int8 static
    logits closer to float than plain static int8."""
    src = models["outlier"][1]
    ids = _text_ids(src, text_file)
    base = _logits(src, ids)
    errors = {}
    for algo in ("rtn", "smoothquant", "rotation,smoothquant"):
        out = tmp_path / algo.replace(",", "-")
        _static(src, out, text_file, algo)
        errors[algo] = float(((_qdq_logits(out, ids) - base) ** 2).mean())
    assert errors["smoothquant"] < errors["rtn"]
    assert errors["rotation,smoothquant"] < errors["rtn"]


def test_calibration_methods_and_input_overrides(models, text_file, tmp_path):
    """Percentile calibration runs; float_inputs keeps down_proj's input in float (no activation QDQ there, its
    weight still int8); int16_inputs gives o_proj's input int16 Q/DQ (A16W8)."""
    src = models["gqa"][1]
    out = tmp_path / "p"
    _static(src, out, text_file, "rtn", options=OnnxOptions(calibrate_method="percentile",
                                                              float_inputs=("down_proj",), int16_inputs=("o_proj",)))
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    down = next(n for n in model.graph.node if n.name == "/model/layers.0/mlp/down_proj/MatMul")
    up = next(n for n in model.graph.node if n.name == "/model/layers.0/mlp/up_proj/MatMul")
    assert down.input[0] == "/model/layers.0/mlp/Mul/output_0" and down.input[1].endswith("_DequantizeLinear_Output")
    assert up.input[0].endswith("_DequantizeLinear_Output")
    zero_points = {t.name: t.data_type for t in model.graph.initializer if t.name.endswith("_zero_point")}
    assert zero_points["/model/layers.0/attn/GroupQueryAttention/output_0_zero_point"] == onnx.TensorProto.INT16
    assert zero_points["/model/layers.0/post_attention_layernorm/output_0_zero_point"] == onnx.TensorProto.INT8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["static_int8"]["calibrate_method"] == "percentile"
    assert summary["layer_notes"]["model.layers.1.mlp.down_proj"] == "float inputs"
    ids = _text_ids(src, text_file)
    base = _logits(src, ids)
    assert np.abs(_qdq_logits(out, ids) - base).mean() / np.abs(base).mean() < 0.1


def test_static_output_generates_in_genai(models, text_file, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    src = models["mha"][1]
    out = tmp_path / "g"
    _static(src, out, text_file, "rotation,smoothquant")
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=24, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([[5, 6, 7, 8]], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 24


@pytest.mark.parametrize("scheme,algo,options,message", [
    ("w_int8_a_int8_per_tensor_sym", "gptq", None, "quantizes activations"),
    ("w_uint8_a_uint8_per_tensor_asym", "smoothquant", None, "is not available"),
    ("w_int8_a_int8_per_tensor_sym", "rotation", OnnxOptions(calibrate_method="kl"), "calibration method"),
    ("w_int8_a_int8_per_tensor_sym", "rtn", OnnxOptions(embedding_bits=8), "weight-only options"),
])
def test_refusals_write_nothing(models, text_file, tmp_path, scheme, algo, options, message):
    out = tmp_path / "never"
    with pytest.raises(LowbitError, match=message):
        _static(models["gqa"][1], out, text_file, algo, scheme, options)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name != "text.txt"]


def test_rotation_refuses_layernorm_graphs(models, tmp_path):
    """A graph whose stream goes through a mean-centering LayerNormalization is refused in one line, before
    anything is written."""
    decoder = OnnxDecoder(models["gqa"][1])
    for node in decoder.graph.node:
        if node.op_type == "SimplifiedLayerNormalization":
            node.op_type = "LayerNormalization"
            break
    with pytest.raises(LowbitError, match="subtracts the mean") as info:
        plan_rotation(decoder)
    assert "\n" not in str(info.value)


def test_static_int8_from_the_cli(models, text_file, tmp_path, capsys):
    """`lowbit quantize MODEL.onnx --scheme w_int8_a_int8_per_tensor_sym --algo rotation,smoothquant` with the
    static options as flags: int16 inputs for down_proj, int8 for the rest."""
    from lowbit.cli import main

    _, src = models["gqa"]
    out = tmp_path / "cli"
    assert main(["quantize", str(src), "-o", str(out), "--scheme", "w_int8_a_int8_per_tensor_sym", "--algo",
                 "rotation,smoothquant", "--int16-inputs", "down_proj", "--calibrate-method", "percentile",
                 "--num-calib-data", "4", "--seq-len", "64", "--dataset", str(text_file), "--json",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == str(out)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    zero_types = {t.data_type for t in model.graph.initializer if t.name.endswith("zero_point")}
    assert onnx.TensorProto.INT16 in zero_types and onnx.TensorProto.INT8 in zero_types
