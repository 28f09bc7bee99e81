"""The ONNX front end on tiny random decoders written by onnxruntime-genai's model builder (fp32, CPU): the same
weights as the torch path's RTN in every output form, scale folds that leave the float graph's function
unchanged, AWQ / GPTQ through onnxruntime calibration, mixed INT4/INT8, quantized embeddings, ModelOpt's CLI
spellings, the output loading in onnxruntime-genai, and refusals that write nothing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lowbit import api  # noqa: E402
from lowbit.cli import main  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.runtimes import decoder_feeds  # noqa: E402
from lowbit.formats import quantize as rtn_quantize  # noqa: E402
from lowbit.onnx.calibrate import plan_passes, session_with_outputs  # noqa: E402
from lowbit.onnx.fold import find_fold, fold  # noqa: E402
from lowbit.onnx.graph import OnnxDecoder, module_name  # noqa: E402
from lowbit.onnx.mixed import default_8bit_layers  # noqa: E402
from lowbit.onnx.run import OnnxOptions  # noqa: E402
from lowbit.onnx.write import GraphWriter  # noqa: E402
from lowbit.spec import QuantSpec  # noqa: E402

IDS = torch.randint(3, 300, (1, 19), generator=torch.Generator().manual_seed(1))
CALIB = dict(num_calib_data=4, seq_len=64, progress=False, quiet=True)

@pytest.fixture(scope="module")
def models(onnx_tiny):
    """kind -> (HF float folder, the builder's fp32 ONNX folder of it)."""
    return onnx_tiny


# onnxruntime fuses DequantizeLinear -> MatMul into MatMulNBits at accuracy level 4 (int8 activations) unless
# told otherwise; level 0 keeps float activations, so the weights can be compared exactly
EXACT = {"session.qdq_matmulnbits_accuracy_level": "0"}


def _logits(folder, ids=IDS) -> np.ndarray:
    decoder = OnnxDecoder(folder)
    session = session_with_outputs(decoder, [], ["CPUExecutionProvider"], config=EXACT)
    return session.run(["logits"], decoder_feeds(session, ids.numpy(), 16))[0]


def _torch_logits(folder, ids=IDS) -> np.ndarray:
    model, _ = api.load(folder)
    with torch.no_grad():
        return model(ids).logits.numpy()


def _ops(folder) -> list[str]:
    return [n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node]


def test_module_names():
    assert module_name("/model/layers.0/attn/qkv_proj/MatMul", "x") == "model.layers.0.attn.qkv_proj"
    assert module_name("/model/layers.11/self_attn/q_proj/MatMul_1", "x") == "model.layers.11.self_attn.q_proj"
    assert module_name("/lm_head/MatMul", "x") == "lm_head"
    assert module_name("", "onnx::MatMul_123") == "onnx_MatMul_123"


def test_reader_finds_weights_and_tied_embedding(models):
    decoder = OnnxDecoder(models["gqa"][1])
    names = list(decoder.linears())
    assert "model.layers.1.mlp.down_proj" in names and "lm_head" in names
    assert decoder.linears()["model.layers.0.mlp.down_proj"] == (96, 160)
    (emb,) = decoder.embeddings
    assert emb.transposed and emb.shape[1] == 96  # the builder reads the tied table through a Transpose


@pytest.mark.parametrize("onnx_format", ["matmulnbits", "dq", "qdq"])
@pytest.mark.parametrize("scheme,group", [("w_uint4_per_group_asym", 64), ("w_int4_per_group_sym", 32),
                                          ("w_int8_per_channel_sym", None)])
def test_rtn_equals_torch_path(models, lowbit_out, tmp_path, onnx_format, scheme, group):
    """RTN of the ONNX graph computes what lowbit's torch RTN of the same weights computes, in every form."""
    hf, src = models["gqa"]
    if onnx_format != "matmulnbits" and scheme == "w_int8_per_channel_sym":
        group = None
    out = tmp_path / "q"
    api.quantize(src, out, scheme=scheme, group_size=group, progress=False, quiet=True,
                 onnx_options=OnnxOptions(onnx_format=onnx_format))
    reference = _torch_logits(lowbit_out(hf, scheme, group_size=group))
    got = _logits(out)
    assert np.abs(got - reference).max() < 1e-4
    ops = _ops(out)
    expected = {"matmulnbits": "MatMulNBits", "dq": "DequantizeLinear", "qdq": "QuantizeLinear"}[onnx_format]
    assert ops.count(expected) == 10  # 5 weight MatMuls per layer; lm_head stays float
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quantized_modules"] == 10 and (out / "genai_config.json").is_file()


@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_folds_keep_the_float_function(models, tmp_path, kind):
    """Dividing each fold target by random scales and multiplying the readers' rows by them leaves the logits
    unchanged; under GQA o_proj has no fold target, under MHA it folds into qkv's V columns."""
    decoder = OnnxDecoder(models[kind][1])
    writer = GraphWriter(decoder, tmp_path)
    weights = {mm.name: np.array(decoder.weight(mm)) for mm in decoder.matmuls}
    vectors: dict = {}
    found = {}
    for group in decoder.input_groups().values():
        target = find_fold(decoder, group)
        found[group[0].name] = target
        if target is None:
            continue
        s = np.random.default_rng(0).uniform(0.5, 2.0, group[0].shape[1])
        for name in target.vectors:
            vectors.setdefault(name, np.array(decoder.array(name)))
        fold(target, s, vectors, weights)
        for mm in group:
            weights[mm.name] = (weights[mm.name] * s[:, None]).astype(np.float32)
    for mm in decoder.matmuls:
        writer.tensor(mm.weight, weights[mm.name])
    for name, v in vectors.items():
        writer.tensor(name, v)
    writer.write()
    for name in ("genai_config.json",):
        (tmp_path / name).write_text((decoder.folder / name).read_text())
    assert np.abs(_logits(tmp_path) - _logits(decoder.folder)).max() < 1e-4
    o_proj = found["model.layers.0.attn.o_proj"]
    assert (o_proj is None) == (kind == "gqa")
    assert found["model.layers.0.mlp.down_proj"].matmul.name == "model.layers.0.mlp.up_proj"
    assert found["model.layers.0.attn.qkv_proj"].vectors


@pytest.mark.parametrize("algo", ["awq", "gptq", "awq,gptq"])
def test_calibrated_algorithms_beat_rtn(models, text_file, tmp_path, algo):
    """AWQ / GPTQ calibrated through onnxruntime bring the logits closer to float than RTN does, on text like the
    calibration text."""
    from transformers import AutoTokenizer

    hf, src = models["mha"]
    ids = AutoTokenizer.from_pretrained(hf)(text_file.read_text()[-2000:], return_tensors="pt").input_ids[:, :96]
    base = _logits(src, ids)
    errors = {}
    for a in ("rtn", algo):
        out = tmp_path / a.replace(",", "-")
        api.quantize(src, out, scheme="w_uint4_per_group_asym", group_size=32, algo=a, dataset=str(text_file),
                     **CALIB)
        errors[a] = float(((_logits(out, ids) - base) ** 2).mean())
    assert errors[algo] < errors["rtn"]


def test_awq_matches_torch_path(models, text_file, lowbit_out, tmp_path):
    """One implementation of AWQ: on the ONNX graph it picks the scales and clips the torch path picks (float
    statistics of the same model on the same windows), so the weights agree to rounding flips."""
    hf, src = models["mha"]
    out = tmp_path / "awq"
    api.quantize(src, out, scheme="w_uint4_per_group_asym", group_size=32, algo="awq", dataset=str(text_file),
                 **CALIB)
    torch_out = lowbit_out(hf, "w_uint4_per_group_asym", group_size=32, algo="awq", dataset=str(text_file))
    onnx_err = json.loads((out / "summary.json").read_text())["layer_errors"]
    torch_err = json.loads((torch_out / "summary.json").read_text())["layer_errors"]
    compared = 0
    for name, err in onnx_err.items():  # the builder fuses q/k/v into attn.qkv_proj and names self_attn attn
        other = torch_err.get(name.replace(".attn.", ".self_attn."))
        if other is not None:
            assert abs(err - other) < 0.02 * other, name
            compared += 1
    assert compared == 8


def test_memory_budget_splits_passes_with_the_same_result(models, text_file, tmp_path):
    _, src = models["gqa"]
    outs = []
    for budget in (4 << 30, 1):
        out = tmp_path / f"b{budget}"
        recipe = api.make_recipe("w_uint4_per_group_asym", 32, "gptq", dataset=str(text_file), num_calib_data=4,
                                 seq_len=64)
        api.quantize(src, out, recipe=recipe, progress=False, quiet=True, onnx_options=OnnxOptions(memory_budget=budget))
        outs.append(_logits(out))
    assert np.array_equal(outs[0], outs[1])
    assert plan_passes([{"a": 4}, {"b": 4, "c": 4}], True, 1) == [[0], [1]]


@pytest.mark.parametrize("bits,axis", [(4, 1), (4, 0), (8, 1)])
def test_quantized_embedding(models, tmp_path, bits, axis):
    """GatherBlockQuantized returns the RTN-dequantized rows of the (tied) table, along either axis."""
    _, src = models["gqa"]
    out = tmp_path / "q"
    api.quantize(src, out, scheme="w_uint4_per_group_asym", group_size=32, progress=False, quiet=True,
                 onnx_options=OnnxOptions(embedding_bits=bits, embedding_block=16, embedding_axis=axis))
    assert "GatherBlockQuantized" in _ops(out) and "Transpose" not in _ops(out)
    decoder = OnnxDecoder(src)
    table = torch.from_numpy(decoder.float_table(decoder.embeddings[0]))
    spec = QuantSpec(kind="int", bits=bits, signed=False, symmetric=False, granularity="group", group_size=16)
    expected = (rtn_quantize(table, spec).dequantize() if axis == 1 else rtn_quantize(table.T, spec).dequantize().T)
    name = decoder.embeddings[0].node.output[0]
    quantized = OnnxDecoder(out)
    session = session_with_outputs(quantized, [name], ["CPUExecutionProvider"])
    rows = session.run([name], decoder_feeds(session, IDS.numpy(), 16))[0][0]
    assert np.abs(rows - expected[IDS[0]].numpy()).max() < 1e-5


def test_mixed_int8_layers(models, tmp_path):
    _, src = models["gqa"]
    out = tmp_path / "q"
    api.quantize(src, out, scheme="w_uint4_per_group_asym", group_size=32, progress=False, quiet=True,
                 onnx_options=OnnxOptions(layers_8bit=("layers.0", "down_proj")))
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits")
            for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
            if n.op_type == "MatMulNBits"}
    assert bits["/model/layers.0/attn/qkv_proj/MatMul_Q"] == 8 and bits["/model/layers.1/mlp/down_proj/MatMul_Q"] == 8
    assert bits["/model/layers.1/attn/qkv_proj/MatMul_Q"] == 4
    names = [f"model.layers.{i}.{m}" for i in range(16) for m in ("attn.qkv_proj", "attn.o_proj", "mlp.down_proj")]
    chosen = default_8bit_layers(names)
    assert "model.layers.0.attn.qkv_proj" in chosen and "model.layers.15.mlp.down_proj" in chosen
    assert not any("o_proj" in n for n in chosen) and "model.layers.5.mlp.down_proj" not in chosen


def test_modelopt_cli_spellings_and_genai(models, text_file, tmp_path, capsys):
    """ModelOpt's flags drive the same run; its awq_lite form is int4 DequantizeLinear + MatMul, and the folder
    generates in onnxruntime-genai."""
    og = pytest.importorskip("onnxruntime_genai")
    _, src = models["gqa"]
    out = tmp_path / "mo"
    assert main(["quantize", "--onnx_path", str(src / "model.onnx"), "--output_path", str(out), "--algo", "awq_lite",
                 "--calib_size", "4", "--seq-len", "64", "--dataset", str(text_file), "--block-size", "32",
                 "--use_zero_point", "True", "--layers_8bit", "/model/layers.0/mlp/down_proj/MatMul",
                 "--gather_quantize_axis", "1", "--gather_block_size", "16", "--add_position_ids", "--json",
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["onnx_format"] == "dq" and summary["scheme"] == "w_uint4_per_group_asym"
    ops = _ops(out)
    assert ops.count("DequantizeLinear") == 10 and "GatherBlockQuantized" in ops
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types["model.layers.0.mlp.down_proj.MatMul.weight_quantized"] == onnx.TensorProto.UINT8
    assert types["model.layers.1.mlp.down_proj.MatMul.weight_quantized"] == onnx.TensorProto.UINT4
    genai = og.Model(str(out))
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=12, do_sample=False)
    generator = og.Generator(genai, params)
    generator.append_tokens(np.array([5, 6, 7], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 12


@pytest.mark.parametrize("args,match", [
    (["--scheme", "w_uint4_per_group_asym", "--block-size", "24"], "power-of-two block"),
    (["--scheme", "w_uint3_per_group_asym"], "2, 4 or 8 bits"),
    (["--scheme", "w_int8_a_int8_per_token_dynamic"], "weights only"),
    (["--scheme", "w_mxfp4"], "not an integer scheme"),
    (["--scheme", "w_uint4_per_group_asym", "--layers-8bit", "nothing_like_this"], "matches no weight MatMul"),
    (["--scheme", "w_uint4_per_group_asym", "--quantize-embedding", "4", "--gather-block-size", "20"], "power-of-two"),
    (["--scheme", "w_uint4_per_group_asym", "--algo", "smoothquant,gptq"], "not available for ONNX"),
    (["--scheme", "w_int8_a_int8_per_tensor_sym", "--algo", "gptq"], "static INT8"),
    (["--scheme", "w_uint4_per_group_asym", "--int16-inputs", "down_proj"], "apply to static INT8"),
    (["--scheme", "w_uint4_per_group_asym", "--calibration-eps", "nosuch"], "not in this onnxruntime"),
])
def test_refusals_write_nothing(models, tmp_path, capsys, args, match):
    _, src = models["gqa"]
    out = tmp_path / "q"
    group = ["--group-size", "32"] if "per_group" in args[1] and "--block-size" not in args else []
    assert main(["quantize", str(src), "-o", str(out), *group, *args]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".q*"))


def test_onnx_flags_refused_for_torch_models(models, tmp_path, capsys):
    hf, _ = models["gqa"]
    assert main(["quantize", str(hf), "-o", str(tmp_path / "q"), "--scheme", "w_uint4_per_group_asym",
                 "--onnx-format", "dq"]) == 2
    assert "ONNX models only" in capsys.readouterr().err


def test_existing_output_untouched(models, tmp_path):
    _, src = models["gqa"]
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LowbitError, match="already exists"):
        api.quantize(src, out, scheme="w_uint4_per_group_asym", progress=False, quiet=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.fixture(scope="module")
def torch_exported(models, tmp_path_factory):
    """The MHA tiny model exported by torch.onnx (the TorchScript exporter optimum uses: decomposed RMSNorm and
    attention, separate q/k/v, position_ids input, opset 17, no KV cache), with its tokenizer beside it."""
    import shutil

    from transformers import AutoModelForCausalLM

    hf, _ = models["mha"]
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model.model
            self.lm_head = model.lm_head

        def forward(self, input_ids, attention_mask, position_ids):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False).last_hidden_state
            return self.lm_head(hidden)

    out = tmp_path_factory.mktemp("torch-exported")
    ids = IDS[:, :8]
    names = ["input_ids", "attention_mask", "position_ids"]
    torch.onnx.export(Logits(), (ids, torch.ones_like(ids), torch.arange(8)[None]), str(out / "model.onnx"),
                      input_names=names, output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names})
    for f in hf.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return hf, out


def test_torch_exported_decoder(torch_exported, lowbit_out, text_file, tmp_path):
    """A decoder exported by torch.onnx quantizes like the builder's: RTN equals the torch path, AWQ folds its
    scales into the decomposed norms' gamma Muls and beats RTN, and DequantizeLinear forms are refused on
    opset 17 with the way out."""
    hf, src = torch_exported
    decoder = OnnxDecoder(src)
    assert "model.layers.0.self_attn.v_proj" in decoder.linears()
    group = decoder.input_groups()[decoder.matmuls[0].input]
    assert len(group) == 3 and find_fold(decoder, group).vectors  # q/k/v read the norm's gamma Mul
    rtn = tmp_path / "rtn"
    api.quantize(src, rtn, scheme="w_uint4_per_group_asym", group_size=32, progress=False, quiet=True)
    reference = _torch_logits(lowbit_out(hf, "w_uint4_per_group_asym", group_size=32))
    assert np.abs(_logits(rtn) - reference).max() < 1e-4
    awq = tmp_path / "awq"
    api.quantize(src, awq, scheme="w_uint4_per_group_asym", group_size=32, algo="awq", dataset=str(text_file),
                 **CALIB)
    notes = json.loads((awq / "summary.json").read_text())["layer_notes"]
    assert "not scaled" not in notes["model.layers.0.self_attn.q_proj"]
    with pytest.raises(LowbitError, match="opset 21"):
        api.quantize(src, tmp_path / "dq", scheme="w_uint4_per_group_asym", group_size=32, progress=False,
                     quiet=True, onnx_options=OnnxOptions(onnx_format="dq"))


def test_unnamed_nodes(models, tmp_path):
    """Nodes need no names (ONNX allows empty ones): every weight MatMul is still replaced."""
    _, src = models["gqa"]
    bare = tmp_path / "bare"
    bare.mkdir()
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        node.name = ""
    onnx.save_model(model, str(bare / "model.onnx"))
    for f in src.iterdir():  # copies: data reached through a symlink out of the folder is refused (issue #19)
        if f.name != "model.onnx":
            shutil.copy(f, bare / f.name)
    outs = {}
    for name, folder in (("named", src), ("bare", bare)):
        outs[name] = tmp_path / f"q-{name}"
        api.quantize(folder, outs[name], scheme="w_uint4_per_group_asym", group_size=32, progress=False, quiet=True)
    assert _ops(outs["bare"]).count("MatMulNBits") == 10
    assert np.array_equal(_logits(outs["bare"]), _logits(outs["named"]))


@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_rotation_weight_only(models, tmp_path, kind):
    """rotation,rtn on the ONNX graph: R1 (rotate.py) once, then RTN of the rotated weights, written as a normal
    quantized folder (MatMulNBits, tied table untied, genai_config carried, rotation in summary.json, no rotated
    float copy left behind) that runs in onnxruntime and equals RTN of the separately rotated float graph."""
    from lowbit.onnx.rotate import write_rotated

    _, src = models[kind]
    out = tmp_path / "q"
    api.quantize(src, out, scheme="w_uint4_per_group_asym", group_size=32, algo="rotation,rtn", progress=False,
                 quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "summary.json", "recipe.yaml"} <= \
        {p.name for p in out.iterdir()} and not [p for p in out.iterdir() if p.is_dir()]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithms"] == ["rotation", "rtn"] and summary["rotation"]["seed"] == 0
    assert summary["quantized_modules"] == 10 and "rotation" in summary["seconds"]
    ops = _ops(out)
    assert ops.count("MatMulNBits") == 10 and "Transpose" not in ops
    rotated, _ = write_rotated(OnnxDecoder(src), tmp_path / "rotated", 0)
    reference = tmp_path / "reference"
    api.quantize(rotated.parent, reference, scheme="w_uint4_per_group_asym", group_size=32, progress=False,
                 quiet=True)
    got = _logits(out)
    assert np.isfinite(got).all() and np.abs(got - _logits(reference)).max() < 1e-4


@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_rotation_alone_at_8_bits_stays_close_to_float(models, tmp_path, kind):
    """Rotation is function-preserving: rotation alone (implicit rtn) at 8 bits per channel keeps the logits as
    close to float as plain 8-bit RTN does (within a factor 2)."""
    _, src = models[kind]
    base = _logits(src)
    errors = {}
    for algo in ("rtn", "rotation"):
        out = tmp_path / algo
        api.quantize(src, out, scheme="w_int8_per_channel_sym", algo=algo, progress=False, quiet=True)
        errors[algo] = float(np.abs(_logits(out) - base).max())
    assert errors["rotation"] < 0.05 * float(np.abs(base).max())
    assert errors["rotation"] < 2 * errors["rtn"]


def test_rotation_calibrated_chains(models, text_file, tmp_path):
    """rotation,awq,gptq: the statistics come from the rotated graph, AWQ folds into the (now unit) norm gains."""
    _, src = models["mha"]
    out = tmp_path / "q"
    api.quantize(src, out, scheme="w_uint4_per_group_asym", group_size=32, algo="rotation,awq,gptq",
                 dataset=str(text_file), **CALIB)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithms"] == ["rotation", "awq", "gptq"] and summary["rotation"]["norms"] == 5
    assert "not scaled" not in summary["layer_notes"].get("model.layers.0.attn.qkv_proj", "")
    assert _ops(out).count("MatMulNBits") == 10 and np.isfinite(_logits(out)).all()


@pytest.mark.parametrize("args,match", [
    (["--algo", "smoothquant,rtn"], "smoothquant is not available for ONNX weight-only"),
    (["--algo", "rotation,gptq", "--algo-arg", "rotation:r4=true"], "R1 only"),
])
def test_rotation_refusals_write_nothing(models, tmp_path, capsys, args, match):
    _, src = models["gqa"]
    out = tmp_path / "q"
    assert main(["quantize", str(src), "-o", str(out), "--scheme", "w_uint4_per_group_asym", "--group-size", "32",
                 *args]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_rotation_refused_on_a_graph_it_cannot_rotate(torch_exported, tmp_path, capsys):
    """A decomposed RMS norm (torch.onnx: Pow / ReduceMean on the residual stream) is refused by rotate.py's
    check, as one error line, before anything is written."""
    _, src = torch_exported
    out = tmp_path / "q"
    assert main(["quantize", str(src), "-o", str(out), "--scheme", "w_uint4_per_group_asym", "--group-size", "32",
                 "--algo", "rotation,rtn"]) == 2
    err = capsys.readouterr().err
    assert "rotation on the ONNX graph" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


# -- the builder's float16 output of several families (tests/families.py) -----------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama3.2", "gemma2", "granite"])
def test_builder_fp16_families(family, family_model, tmp_path):
    """The builder's fp16 CPU decoder (MultiHeadAttention + RotaryEmbedding, fp16 logits and KV cache) of a
    family quantizes: RTN of its fp16 weights computes what lowbit's torch RTN of the same fp16 weights does,
    within 5e-3 of the largest logit (measured 3e-4 to 1.7e-3: fp16 activations against float32)."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    hf16 = tmp_path / "hf16"
    AutoModelForCausalLM.from_pretrained(family_model(family), dtype=torch.float16).save_pretrained(hf16)
    for f in family_model(family).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, hf16 / f.name)
    built = tmp_path / "onnx"
    run = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(family_model(family)),
                          "-o", str(built), "-p", "fp16", "-e", "cpu", "-c", str(tmp_path / "cache")],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    out, reference = tmp_path / "q", tmp_path / "torch-rtn"
    api.quantize(built, out, scheme="w_uint4_per_group_asym", group_size=32, progress=False, quiet=True)
    api.quantize(hf16, reference, scheme="w_uint4_per_group_asym", group_size=32, progress=False, quiet=True)
    model, _ = api.load(reference, dtype=torch.float32)
    with torch.no_grad():
        expected = model(IDS).logits.numpy()
    decoder = OnnxDecoder(out)
    session = session_with_outputs(decoder, [], ["CPUExecutionProvider"], config=EXACT)
    got = session.run(["logits"], decoder_feeds(session, IDS.numpy(), 24))[0]
    assert got.dtype == np.float16
    assert np.abs(got.astype(np.float32) - expected).max() < 5e-3 * np.abs(expected).max()


@pytest.mark.slow
def test_builder_sliding_window_cache(tokenizer_dir, tmp_path):
    """Gemma-2's builder graph bounds each sliding-window layer's KV cache (past_sliding_length inputs,
    GroupQueryAttention sliding_window_cache=1), which onnxruntime refuses below the window's capacity: lowbit
    feeds a zeroed cache of local_window_size positions, as onnxruntime-genai does. Windows of 128 tokens (twice
    the window of 64): the float graph's perplexity equals transformers' within 1e-3 relative (measured 1.4e-4;
    the builder's Gemma graphs differ from transformers by ~2e-4 of the largest logit with or without sliding
    windows), RTN and GPTQ through the front end stay within 5% of it (measured 0.1% and 1.2%), and a decode step
    on the returned ring cache continues the sequence as transformers does. head_dim 32: onnxruntime's CPU
    kernel wants a multiple of 16 for a sliding-window cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.runtimes import decoder_session

    from .conftest import builder_export, save_random_model
    from .families import family_configs

    config = family_configs(len(AutoTokenizer.from_pretrained(tokenizer_dir)))["gemma2"]
    config.hidden_size, config.head_dim, config.query_pre_attn_scalar = 128, 32, 32
    hf = save_random_model(config, tmp_path / "hf", tokenizer_dir, randomize_1d=True)
    built = builder_export(hf, tmp_path / "onnx")
    graph = onnx.load(str(built / "model.onnx"), load_external_data=False).graph
    assert any(d.dim_param == "past_sliding_length" for i in graph.input for d in i.type.tensor_type.shape.dim)

    ppl = dict(seq_len=128, max_chunks=4, progress=False)
    expected = api.evaluate(hf, **ppl)["perplexity"]
    got = api.evaluate(built, **ppl)["perplexity"]
    assert abs(got / expected - 1) < 1e-3
    for algo in ("rtn", "gptq"):
        api.quantize(built, tmp_path / algo, scheme="w_uint4_per_group_asym", group_size=32, algo=algo,
                     num_calib_data=4, seq_len=128, progress=False, quiet=True)
        assert abs(api.evaluate(tmp_path / algo, **ppl)["perplexity"] / got - 1) < 0.05

    ids = torch.randint(3, 390, (1, 101), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(hf).eval()(ids).logits[0, -1].numpy()
    session = decoder_session(built / "model.onnx")
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, decoder_feeds(session, ids[:, :100].numpy(), 32))))
    step = {"input_ids": ids[:, 100:].numpy(), "attention_mask": np.ones((1, 101), dtype=np.int64)}
    step.update({n.replace("present", "past_key_values", 1): v for n, v in outputs.items() if n.startswith("present")})
    last = session.run(["logits"], step)[0][0, -1]
    assert np.abs(last - reference).max() < 1e-3 * np.abs(reference).max()
