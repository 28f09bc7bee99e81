"""AutoAWQ and GPTQ folders (lowbit's exports here, the layouts other tools write) read as dequantized float
weights: eval, generate, inspect and quantize take them, with the same logits as the lowbit folder they came from
(float16 scales aside)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.api import evaluate, export, load
from lowbit.errors import LowbitError
from lowbit.formats.packing import pack_int32, unpack_int32

IDS = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(1))


def _logits(folder):
    model, _ = load(folder)
    with torch.no_grad():
        return model(input_ids=IDS).logits[0]


def _close(got, want, tol=2e-3):
    assert (got - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("family,fmt,scheme,group", [
    ("llama", "awq", "w_uint4_per_group_asym", 32), ("llama", "gptq", "w_uint4_per_group_asym", 32),
    ("qwen3", "gptq", "w_int8_per_channel_sym", None), ("mixtral", "awq", "w_uint4_per_group_asym", 32),
    ("phi3", "gptq", "w_int4_per_group_sym", 32)])
def test_read_as_the_folder_it_came_from(family, fmt, scheme, group, family_model, lowbit_out, tmp_path):
    src = lowbit_out(family_model(family), scheme, group_size=group)
    out = export(src, tmp_path / fmt, fmt, quiet=True)
    _close(_logits(out), _logits(src))


def _gptq_v2(src, dst):
    """GPTQModel's gptq_v2 checkpoint of a v1 folder: the zero points stored as they are (v1 stores zero - 1)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(dst / "model.safetensors"))
    bits = config["quantization_config"]["bits"]
    for key in [k for k in tensors if k.endswith(".qzeros")]:
        zeros = (unpack_int32(tensors[key], bits) + 1) & ((1 << bits) - 1)
        tensors[key] = pack_int32(zeros, bits)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_gptq_v2_checkpoint(family_model, lowbit_out, tmp_path):
    src = lowbit_out(family_model("llama"), "w_uint4_per_group_asym", group_size=32)
    v1 = export(src, tmp_path / "v1", "gptq", quiet=True)
    assert torch.equal(_logits(_gptq_v2(v1, tmp_path / "v2")), _logits(v1))


def test_eval_names_what_it_reads(family_model, lowbit_out, tmp_path, text_file):
    src = lowbit_out(family_model("llama"), "w_uint4_per_group_asym", group_size=32)
    out = export(src, tmp_path / "awq", "awq", quiet=True)
    result = evaluate(out, dataset=str(text_file), seq_len=32, max_chunks=2, progress=False)
    assert result["stored_as"] == "AutoAWQ GEMM 4-bit, group 32"
    ours = evaluate(src, dataset=str(text_file), seq_len=32, max_chunks=2, progress=False)["perplexity"]
    assert result["perplexity"] == pytest.approx(ours, rel=1e-3)


@pytest.mark.parametrize("change,expected", [
    (dict(version="gemv"), "4-bit GEMM layout only"),
    (dict(bits=3, quant_method="gptq"), "reads 2/4/8-bit"),
    (dict(group_size=None), "no whole bits and group_size"),
])
def test_layouts_it_cannot_read_are_refused(change, expected, family_model, lowbit_out, tmp_path):
    src = lowbit_out(family_model("llama"), "w_uint4_per_group_asym", group_size=32)
    out = export(src, tmp_path / "awq", "awq", quiet=True)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"].update(change)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(LowbitError, match=expected):
        load(out)


def test_missing_part_is_refused(family_model, lowbit_out, tmp_path):
    src = lowbit_out(family_model("llama"), "w_uint4_per_group_asym", group_size=32)
    out = export(src, tmp_path / "gptq", "gptq", quiet=True)
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.0.mlp.up_proj.qzeros"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LowbitError, match="up_proj has a qweight but no qzeros"):
        load(out)
