"""Every quantization path and every export, on tiny models, against recorded sha256 checksums of the output
tensors: a refactoring that claims "no change of behaviour" must leave each checksum as it was.

The checksums are recorded per machine kind (tests/golden.json holds one record per environment: torch, CPU
capability and model, library versions, threads). Float results of the same code can differ in the last bit on
another CPU or library version (measured: 5 of the 22 cases on an Emerald Rapids Xeon against the Sapphire-era
record, both "AVX512"), so the comparison uses the record of this environment, else the record made before CPU
models were recorded when everything else matches, and is skipped, with the difference named, elsewhere.
To record anew (after a deliberate change of results): LOWBIT_GOLDEN_RECORD=1 pytest tests/test_golden.py
writes this environment's record; the others keep theirs (a deliberate change must be recorded on each kind).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from lowbit import api

from .conftest import save_random_model

GOLDEN = Path(__file__).with_name("golden.json")
RECORD = os.environ.get("LOWBIT_GOLDEN_RECORD") == "1"
CALIB = dict(num_calib_data=4, seq_len=64, progress=False, quiet=True)
HASHED_TEXT = ("config.json", "recipe.yaml", "genai_config.json", "quantize_config.json")

# name -> (source kind, quantize keyword arguments)
TORCH_CASES = {
    "rtn_uint4_g32": ("llama64", dict(scheme="w_uint4_per_group_asym", group_size=32,
                                      export="compressed-tensors,awq,gptq,gguf,onnx")),
    "rtn_int8_channel": ("llama64", dict(scheme="w_int8_per_channel_sym", export="compressed-tensors,gguf")),
    "awq_uint4_g32": ("llama", dict(scheme="w_uint4_per_group_asym", group_size=32, algo="awq")),
    "gptq_int4_g32": ("llama64", dict(scheme="w_int4_per_group_sym", group_size=32, algo="gptq",
                                      export="gptq,gguf")),
    "gptq_true_sequential": ("llama", dict(scheme="w_uint4_per_group_asym", group_size=32, algo="gptq",
                                           algo_args={"gptq": {"true_sequential": True}})),
    "awq_gptq_uint4": ("qwen2", dict(scheme="w_uint4_per_group_asym", group_size=32, algo="awq,gptq")),
    "smoothquant_w8a8": ("llama", dict(scheme="w_int8_a_int8_per_tensor_sym", algo="smoothquant")),
    "smoothquant_w8a8_opt": ("opt", dict(scheme="w_int8_a_int8_per_tensor_sym", algo="smoothquant")),
    "rotation_r2_r4_rtn": ("llama64", dict(scheme="w_uint4_per_group_asym", group_size=32, algo="rotation,rtn",
                                         algo_args={"rotation": {"r2": True, "r4": True}}, export="onnx")),
    "rotation_gptq_opt": ("opt", dict(scheme="w_int4_per_group_sym", group_size=16, algo="rotation,gptq")),
    "mxfp4": ("llama64", dict(scheme="w_mxfp4", export="compressed-tensors,gguf")),
    "nvfp4_w_a": ("llama64", dict(scheme="w_nvfp4_a_nvfp4")),
    "nvfp4": ("llama64", dict(scheme="w_nvfp4", export="compressed-tensors")),
    "fp8_kv_cache": ("llama64", dict(scheme="w_fp8_a_fp8", kv_cache_dtype="fp8", export="compressed-tensors")),
    "mx6_override": ("gemma", dict(scheme="w_mx6", overrides=["down_proj:scheme=w_int8_per_channel_sym"])),
    "moe_mixtral": ("mixtral", dict(scheme="w_uint4_per_group_asym", group_size=16, algo="awq",
                                    moe_experts_scheme="w_int4_per_channel_sym")),
    "moe_qwen2": ("qwen2_moe", dict(scheme="w_int4_per_group_sym", group_size=16, algo="gptq")),
}
ONNX_CASES = {
    "onnx_rtn": dict(scheme="w_uint4_per_group_asym", group_size=32),
    "onnx_awq_gptq": dict(scheme="w_uint4_per_group_asym", group_size=32, algo="awq,gptq"),
    "onnx_rotation_rtn": dict(scheme="w_int4_per_group_sym", group_size=32, algo="rotation,rtn"),
    "onnx_static_int8": dict(scheme="w_int8_a_int8_per_tensor_sym", algo="rtn"),
    "onnx_static_smoothquant": dict(scheme="w_int8_a_int8_per_tensor_sym", algo="smoothquant"),
}


def environment() -> dict:
    import onnxruntime
    import transformers

    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(), "cpu_model": _cpu_model(),
            "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
            "threads": torch.get_num_threads()}


def _cpu_model() -> str:
    """The CPU's vendor, family and model numbers (/proc/cpuinfo), which pick the kernels' code paths."""
    info = {}
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    return "/".join(info.get(k, "?") for k in ("vendor_id", "cpu family", "model"))


def _record_for(records: list[dict], env: dict) -> dict | None:
    """This environment's record, else one made before CPU models were recorded that matches the rest."""
    legacy = {k: v for k, v in env.items() if k != "cpu_model"}
    return next((r for r in records if r["environment"] == env), None) or next(
        (r for r in records if "cpu_model" not in r["environment"] and r["environment"] == legacy), None)


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
    return h.hexdigest()


def _safetensors(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: _sha(t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
                for k in sorted(f.keys()) for t in [f.get_tensor(k)]}


def _onnx(path: Path) -> dict:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=True)
    out = {i.name: _sha(numpy_helper.to_array(i).dtype, numpy_helper.to_array(i).shape,
                        numpy_helper.to_array(i).tobytes()) for i in model.graph.initializer}
    del model.graph.initializer[:]
    out["<graph>"] = _sha(model.graph.SerializeToString(deterministic=True))
    return out


def _gguf(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = {t.name: _sha(t.tensor_type, tuple(t.shape), bytes(t.data)) for t in reader.tensors}
    out["<fields>"] = _sha(*(f"{k}={bytes(f.parts[-1]) if f.parts else ''}" for k, f in sorted(reader.fields.items())))
    return out


def digest(root: Path) -> dict:
    """file (relative to root) -> {tensor: sha256} for every tensor file under root, and the text of the files
    that describe the format; timings, paths and memory (summary.json, lowbit_export.json) are left out."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.suffix == ".safetensors":
            out[rel] = _safetensors(path)
        elif path.suffix == ".onnx":
            out[rel] = _onnx(path)
        elif path.suffix == ".gguf":
            out[rel] = _gguf(path)
        elif path.name in HASHED_TEXT:
            out[rel] = _sha(path.read_bytes())
    return out


def outputs(out: Path) -> dict:
    """The digests of a quantize output and of every export written beside it (OUT-awq/, OUT.gguf, ...)."""
    found = {"OUT" + p.name[len(out.name):]: p for p in out.parent.iterdir() if p.name.startswith(out.name)}
    return {name: (digest(p) if p.is_dir() else digest_file(p)) for name, p in sorted(found.items())}


def digest_file(path: Path) -> dict:
    return {path.name: _gguf(path)} if path.suffix == ".gguf" else {}


@pytest.fixture(scope="module")
def golden():
    records = json.loads(GOLDEN.read_text())["records"] if GOLDEN.exists() else []
    env = environment()
    record = _record_for(records, env)
    if RECORD:
        record = next((r for r in records if r["environment"] == env), None)
        if record is None:
            record = {"environment": env, "cases": {}}
            records.append(record)
    elif record is None:
        pytest.skip(f"checksums recorded in {[r['environment'] for r in records]}, this is {env}; "
                    "record anew with LOWBIT_GOLDEN_RECORD=1 on the commit before a refactoring")
    yield record["cases"]
    if RECORD:
        GOLDEN.write_text(json.dumps({"records": records}, indent=1, sort_keys=True) + "\n")


def _check(golden: dict, name: str, got: dict) -> None:
    if RECORD:
        golden[name] = got
        return
    assert name in golden, f"no checksums recorded for {name}"
    want = golden[name]
    assert sorted(got) == sorted(want), "the set of outputs changed"
    for file in want:
        assert got[file] == want[file], f"{name}: {file} changed"


@pytest.fixture(scope="module")
def llama64(tmp_path_factory, tokenizer_dir):
    """A tiny llama whose widths (64, 128) are whole groups of 32, as every export format needs."""
    from transformers import AutoTokenizer, LlamaConfig

    config = LlamaConfig(vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    return save_random_model(config, tmp_path_factory.mktemp("golden-llama64"), tokenizer_dir)


@pytest.mark.parametrize("name", sorted(TORCH_CASES))
def test_torch_path(name, golden, tiny_models, tiny_moe, llama64, tmp_path):
    arch, kwargs = TORCH_CASES[name]
    source = {**tiny_models, **tiny_moe, "llama64": llama64}[arch]
    out = tmp_path / "q"
    api.quantize(source, out, **CALIB, **kwargs)
    _check(golden, name, outputs(out))


@pytest.mark.parametrize("name", sorted(ONNX_CASES))
def test_onnx_path(name, golden, onnx_tiny, tmp_path):
    from lowbit.onnx.options import OnnxOptions

    out = tmp_path / "q"
    api.quantize(onnx_tiny["gqa"][1], out, onnx_options=OnnxOptions(), **CALIB, **ONNX_CASES[name])
    _check(golden, name, outputs(out))
