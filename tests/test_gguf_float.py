"""Float GGUF export (F16 / BF16 / F32) of any source lowbit reads (exporters.gguf_float): gguf-py reads back the
source's weights (exactly in F32, rounded once to the type in F16 / BF16, q/k rows permuted), llama.cpp
computes transformers' logits from it, a GGUF source round-trips, and bad inputs are refused in one line with
nothing written."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.exporters.gguf_float import check_gguf_any, export_gguf_any
from lowbit.exporters.gguf_mixes import ModelShape, mix_types
from lowbit.exporters.source import LowbitFolder

from .conftest import need_llama_cpp
from .test_gguf_export import IDS, LOGIT_TOL, _llama_logits, _lowbit_logits, _tiny, _unpermute

TYPES = {"f16": (T.F16, torch.float16, gguf.LlamaFileType.MOSTLY_F16),
         "bf16": (T.BF16, torch.bfloat16, gguf.LlamaFileType.MOSTLY_BF16),
         "f32": (T.F32, torch.float32, gguf.LlamaFileType.ALL_F32)}
GGUF_LEAF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


@pytest.fixture(scope="module")
def hf64(tmp_path_factory, tokenizer_dir):
    """arch -> a tiny random Hugging Face folder (hidden 64, 2 layers; llama untied with attention biases)."""
    extra = {"llama": dict(tie_word_embeddings=False, attention_bias=True), "qwen2": dict(tie_word_embeddings=True),
             "gemma": dict(num_key_value_heads=1, head_dim=32)}
    return {a: _tiny(tmp_path_factory.mktemp(f"float-{a}"), tokenizer_dir, a, **e) for a, e in extra.items()}


def _hf_state(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _gguf_names(layers: int) -> dict[str, str]:
    """HF tensor name -> GGUF name for the tiny llama, biases included."""
    out = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for i in range(layers):
        for hf, g in GGUF_LEAF.items():
            out[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{g}.weight"
            if hf.startswith("self_attn"):
                out[f"model.layers.{i}.{hf}.bias"] = f"blk.{i}.{g}.bias"
    return out


def _read_back(path) -> dict[str, tuple[T, np.ndarray]]:
    """GGUF name -> (type, float32 values in the tensor's row-major shape)."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        values = dequantize(t.data, t.tensor_type).astype(np.float32)
        out[t.name] = (t.tensor_type, values.reshape([int(n) for n in reversed(t.shape)]))
    return out


def _hf_logits(folder, ids=IDS) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _assert_holds(path, state: dict[str, torch.Tensor], names: dict[str, str], dtype: torch.dtype, qtype: T,
                  heads: dict[str, int]) -> None:
    """Every source tensor is in the file: 2-D ones in qtype and equal to the source rounded once to dtype, 1-D
    ones in F32 and equal; q/k rows (and biases) in llama.cpp's order."""
    tensors = _read_back(path)
    for hf, name in names.items():
        kind, values = tensors.pop(name)
        w = state[hf]
        assert kind == (qtype if w.dim() == 2 else T.F32), name
        want = (w.to(dtype) if w.dim() == 2 else w).float().numpy()
        leaf = name.split(".")[-2]
        if leaf in heads:
            values = _unpermute(values, heads[leaf])
        assert np.array_equal(values, want), name
    assert tensors == {}


# -- a Hugging Face folder ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(TYPES))
def test_float_types_hold_the_hf_weights(kind, hf64, tmp_path):
    qtype, dtype, file_type = TYPES[kind]
    path = export_gguf_any(hf64["llama"], tmp_path / "m.gguf", quant_type=kind)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == file_type
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    _assert_holds(path, _hf_state(hf64["llama"]), _gguf_names(2), dtype, qtype, {"attn_q": 4, "attn_k": 2})


@pytest.mark.parametrize("arch,kind", [("llama", "f16"), ("llama", "bf16"), ("llama", "f32"), ("qwen2", "f16"),
                                       ("gemma", "bf16")])
def test_llama_cpp_computes_transformers_logits(arch, kind, hf64, tmp_path):
    need_llama_cpp()
    path = export_gguf_any(hf64[arch], tmp_path / "m.gguf", quant_type=kind)
    diff = np.abs(_llama_logits(path) - _hf_logits(hf64[arch])).max()
    assert diff < LOGIT_TOL, diff


def test_a_k_quant_mix_of_a_float_model(hf64, tmp_path):
    """A K-quant mix of a float folder: llama-quantize's type per tensor (gguf_mixes), quantized from the float
    weights, and it runs in llama.cpp."""
    path = export_gguf_any(hf64["llama"], tmp_path / "m.gguf", quant_type="q4_k_m")
    tensors = _read_back(path)
    widths = {n: v.shape[1] for n, (_, v) in tensors.items() if v.ndim == 2}
    want = mix_types("q4_k_m", widths, ModelShape(2, 2, tied_output=False))
    assert {n: tensors[n][0] for n in widths} == want
    assert gguf.GGUFReader(path).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    need_llama_cpp()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf64["llama"], dtype=torch.float32).eval()
    heads = {"attn_q": 4, "attn_k": 2}
    for hf, name in _gguf_names(2).items():  # transformers with the file's values: what llama.cpp must compute
        values = tensors[name][1]
        values = _unpermute(values, heads[name.split(".")[-2]]) if name.split(".")[-2] in heads else values
        model.get_parameter(hf).data.copy_(torch.from_numpy(np.ascontiguousarray(values)))
    with torch.no_grad():
        theirs = model(torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(_llama_logits(path) - theirs).max() < LOGIT_TOL


def test_llama_quantize_takes_the_float_file(hf64, tmp_path):
    """llama.cpp's own quantizer (llama_model_quantize, what llama-quantize runs) reads the F16 file, and picks
    for each tensor the type lowbit's q4_k_m of the same source has."""
    import ctypes

    llama_cpp = need_llama_cpp()
    f16 = export_gguf_any(hf64["llama"], tmp_path / "m-f16.gguf", quant_type="f16")
    ours = export_gguf_any(hf64["llama"], tmp_path / "m-ours.gguf", quant_type="q4_k_m")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, 2
    theirs = tmp_path / "m-llama.gguf"
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    kinds = [{t.name: t.tensor_type for t in gguf.GGUFReader(p).tensors} for p in (ours, theirs)]
    assert kinds[0] == kinds[1]
    assert np.abs(_llama_logits(theirs) - _llama_logits(ours)).max() < 2 * LOGIT_TOL


# -- a lowbit folder -----------------------------------------------------------------------------------------

def test_lowbit_folder_is_dequantized(hf64, lowbit_out, tmp_path):
    src = lowbit_out(hf64["llama"], "w_int4_per_group_sym", group_size=32)
    folder = LowbitFolder(src)
    assert check_gguf_any(folder, "f32") == []
    path = export_gguf_any(src, tmp_path / "m.gguf", quant_type="f32")
    state = {n: folder.ckpt.get(n) for n in folder.float_tensor_names()}
    state |= {f"{n}.weight": folder.weight(n) for n in folder.modules}
    _assert_holds(path, state, _gguf_names(2), torch.float32, T.F32, {"attn_q": 4, "attn_k": 2})
    need_llama_cpp()
    f16 = export_gguf_any(src, tmp_path / "m16.gguf", quant_type="f16")
    assert np.abs(_llama_logits(f16) - _lowbit_logits(src)).max() < LOGIT_TOL


# -- a GGUF file ---------------------------------------------------------------------------------------------

def test_gguf_source_round_trips(tokenizer_dir, tmp_path, monkeypatch):
    """An F32 GGUF written from a GGUF source (read as Hugging Face tensors, q/k rows un-permuted by transformers)
    holds the source file's tensors bit for bit, permuted back."""
    from .conftest import make_tiny
    from .test_gguf_source import write_gguf

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "tiny.gguf"
    write_gguf(make_tiny("llama", tmp_path / "hf", tokenizer_dir), source)
    path = export_gguf_any(source, tmp_path / "out.gguf", quant_type="f32")
    ours, theirs = _read_back(path), _read_back(source)
    assert ours.keys() == theirs.keys()
    for name, (kind, values) in theirs.items():
        assert ours[name][0] == T.F32 and np.array_equal(ours[name][1], values), name
    reader, original = gguf.GGUFReader(path), gguf.GGUFReader(source)
    for key in ("tokens", "merges", "bos_token_id", "eos_token_id"):
        assert reader.fields[f"tokenizer.ggml.{key}"].contents() == original.fields[f"tokenizer.ggml.{key}"].contents()
    assert reader.fields["general.name"].contents() == "tiny"


@pytest.mark.slow
def test_demo_as_f16(tmp_path):
    """The demo (SmolLM2-135M-Instruct, Q4_1) as F16: the same tensors and vocabulary, its Q4_1 values rounded to
    float16, and llama.cpp computes nearly the original file's logits."""
    from lowbit.hf.source import demo_gguf

    path = export_gguf_any("demo", tmp_path / "demo.gguf", quant_type="f16")
    ours, theirs = _read_back(path), _read_back(demo_gguf())
    assert ours.keys() == theirs.keys()
    for name, (kind, values) in theirs.items():
        assert ours[name][0] == (T.F16 if values.ndim == 2 else T.F32), name
        assert np.array_equal(ours[name][1], values.astype(np.float16).astype(np.float32) if values.ndim == 2
                              else values), name
    reader, original = gguf.GGUFReader(path), gguf.GGUFReader(demo_gguf())
    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "add_bos_token"):
        assert reader.fields[f"tokenizer.ggml.{key}"].contents() == original.fields[f"tokenizer.ggml.{key}"].contents()
    need_llama_cpp()
    ours, theirs = _llama_logits(path), _llama_logits(demo_gguf())
    assert np.abs(ours - theirs).max() < 0.05 * np.abs(theirs).max()


# -- refusals and the command line ----------------------------------------------------------------------------

def test_refusals_write_nothing(hf64, tiny_models, lowbit_out, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cases = [(hf64["llama"], "q4_0", "run lowbit quantize first"),
             (hf64["llama"], None, "not a lowbit output folder; pass --gguf-type f16"),
             (tiny_models["opt"], "f16", "GGUF export supports llama, .* models, not 'opt'"),
             (tmp_path / "missing", "f16", "not found"),
             (lowbit_out(hf64["llama"], "w_int4_per_group_sym", group_size=32, algo="rotation",
                         algo_args={"rotation": {"r4": True}}), "f16", "rotation r4")]
    for src, kind, message in cases:
        with pytest.raises(LowbitError, match=message):
            export_gguf_any(src, out / "m.gguf", quant_type=kind)
    foreign = tmp_path / "foreign"
    shutil.copytree(hf64["llama"], foreign)
    config = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(LowbitError, match="quantized by 'gptq'; a float GGUF needs float weights"):
        export_gguf_any(foreign, out / "m.gguf", quant_type="f16")
    with pytest.raises(LowbitError, match="a float GGUF has none: drop it"):
        export_gguf_any(hf64["llama"], out / "m.gguf", quant_type="f16", imatrix=tmp_path / "imatrix.gguf")
    with pytest.raises(LowbitError, match="ending in .gguf"):
        export_gguf_any(hf64["llama"], out / "m", quant_type="f16")
    assert list(out.iterdir()) == []
    (out / "m.gguf").write_text("mine")
    with pytest.raises(LowbitError, match="already exists"):
        export_gguf_any(hf64["llama"], out / "m.gguf", quant_type="f16")
    assert (out / "m.gguf").read_text() == "mine" and [p.name for p in out.iterdir()] == ["m.gguf"]
    export_gguf_any(hf64["llama"], out / "m.gguf", quant_type="f16", overwrite=True)
    assert gguf.GGUFReader(out / "m.gguf").tensors and [p.name for p in out.iterdir()] == ["m.gguf"]


def test_cli_end_to_end(hf64, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", str(hf64["llama"]), "--format", "gguf", "--gguf-type", "BF16", "-o", str(out)]) == 0
    assert f"wrote {out} (gguf)" in capsys.readouterr().out
    assert {t.tensor_type for t in gguf.GGUFReader(out).tensors} == {T.BF16, T.F32}
    assert main(["export", str(hf64["llama"]), "-f", "gguf", "--gguf-type", "f32", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.strip()] == [
        f"error: output {out} already exists; choose another path or pass --overwrite"]
    assert main(["export", str(hf64["llama"]), "-f", "gguf", "--gguf-type", "q4_1", "-o",
                 str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "run lowbit quantize first" in err and "Traceback" not in err
    assert main(["export", str(hf64["llama"]), "-f", "gguf", "--gguf-type", "f32", "-o", str(out), "--overwrite",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "gguf"
    assert {t.tensor_type for t in gguf.GGUFReader(out).tensors} == {T.F32}
    assert not (tmp_path / "x.gguf").exists()
