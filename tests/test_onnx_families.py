"""The ONNX export on every family of tests/families.py, in float32 and float16: onnxruntime's logits of the
export against lowbit's own dequantized torch model (lowbit.api.load, float32) on the same ids, the KV cache
stepped token by token, and onnxruntime-genai greedy-generating transformers' tokens (mixture-of-experts
families: tests/test_onnx_moe.py tests their QMoE / MoE nodes). bfloat16 is refused before anything is written.

Tolerances (logits of magnitude 1 to 8; 2 x 80 ids, so Gemma-2/3's windows of 64 bite):
- float32: 1e-4 absolute, as test_onnx_export.py (measured 2e-7 to 4e-6 on these families);
- float16: 5e-3 of the largest reference logit (measured 1.3e-3 to 1.7e-3 of it: fp16 weights, scales,
  activations and KV cache against the float32 reference);
- stepping the KV cache against one full forward: the same bounds (float16 measured 2e-3 of the largest).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
og = pytest.importorskip("onnxruntime_genai")
onnx = pytest.importorskip("onnx")

from onnx import helper  # noqa: E402

from lowbit.api import load, quantize  # noqa: E402
from lowbit.exporters.onnx import export_onnx  # noqa: E402

from .conftest import genai_greedy  # noqa: E402

EXPORTED = ["llama", "llama3.2", "mistral", "qwen2", "qwen3", "phi3", "phi4_mini", "gemma", "gemma2", "gemma3",
            "granite", "olmo2", "mixtral", "qwen3_moe"]
GENAI_TYPES = {"llama": "llama", "llama3.2": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
               "phi3": "phi3", "phi4_mini": "phi3", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text",
               "granite": "granite", "olmo2": "olmo", "mixtral": "mistral", "qwen3_moe": "qwen3"}
DTYPES = {"float32": np.float32, "float16": np.float16}
IDS = torch.randint(3, 300, (2, 80), generator=torch.Generator().manual_seed(0))
PROMPT = [5, 17, 33, 120, 7, 99, 250, 31]


def _within(got: np.ndarray, reference: np.ndarray, dtype: str) -> bool:
    err = np.abs(got.astype(np.float32) - reference).max()
    return err < (1e-4 if dtype == "float32" else 5e-3 * np.abs(reference).max())


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, family_model):
    """family -> its lowbit folder (uint4 asymmetric, groups of 32), made once per module."""
    cache = {}

    def make(name):
        if name not in cache:
            out = tmp_path_factory.mktemp("lowbit") / name.replace(".", "_")
            quantize(family_model(name), out, scheme="w_uint4_per_group_asym", group_size=32, progress=False,
                     quiet=True, num_calib_data=4, seq_len=64)
            cache[name] = out
        return cache[name]
    return make


@pytest.fixture(scope="module")
def expected(quantized):
    """family -> (reference logits on IDS, the 24 tokens transformers greedy-generates after PROMPT) of
    lowbit's dequantized float32 model, computed once per family."""
    cache = {}

    def get(name):
        if name not in cache:
            model, _ = load(quantized(name))
            with torch.no_grad():
                tokens = model.generate(torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False,
                                        eos_token_id=None, pad_token_id=1)[0, len(PROMPT):].tolist()
                cache[name] = model(input_ids=IDS).logits.float().numpy(), tokens
        return cache[name]
    return get


def _reference(folder, ids=IDS) -> np.ndarray:
    model, _ = load(folder)
    with torch.no_grad():
        return model(input_ids=ids).logits.float().numpy()


def _feeds(session, ids: np.ndarray, start: int = 0, past: dict | None = None) -> dict:
    n, seq = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((n, start + seq), np.int64),
             "position_ids": np.tile(np.arange(start, start + seq), (n, 1))}
    float_type = np.float16 if session.get_outputs()[0].type == "tensor(float16)" else np.float32
    for spec in session.get_inputs():
        if spec.name.startswith("past"):
            feeds[spec.name] = past[spec.name] if past else np.zeros((n, spec.shape[1], 0, spec.shape[3]),
                                                                      float_type)
    return feeds


def _session(folder):
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def _logits(folder, ids=IDS) -> np.ndarray:
    session = _session(folder)
    return session.run(["logits"], _feeds(session, ids.numpy()))[0]


def _nodes(folder) -> list:
    return list(onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", EXPORTED)
def test_family_logits(family, dtype, quantized, expected, tmp_path):
    out = export_onnx(quantized(family), tmp_path / "onnx", dtype=dtype)
    logits = _logits(out)
    assert logits.dtype == DTYPES[dtype]
    assert _within(logits, expected(family)[0], dtype)
    ops = [n.op_type for n in _nodes(out)]
    assert "MatMulNBits" in ops and "GroupQueryAttention" in ops
    assert json.loads((out / "lowbit_export.json").read_text())["dtype"] == dtype


def _attribute(node, name):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def test_family_quirks_in_the_graph(quantized, tmp_path):
    """Gemma-2: soft-capped attention, a window on the sliding layer only, capped logits; Phi-3: one MatMulNBits
    for the fused qkv_proj fed to GroupQueryAttention packed; Phi-4-mini: rotary on 18 of 24 dimensions."""
    gemma2 = _nodes(export_onnx(quantized("gemma2"), tmp_path / "gemma2"))
    attn = [n for n in gemma2 if n.op_type == "GroupQueryAttention"]
    assert [_attribute(n, "softcap") for n in attn] == [50.0, 50.0]
    assert [_attribute(n, "local_window_size") for n in attn] == [64, -1]
    assert "Tanh" in [n.op_type for n in gemma2]
    phi3 = _nodes(export_onnx(quantized("phi3"), tmp_path / "phi3"))
    assert sum(n.op_type == "MatMulNBits" for n in phi3) == 8 and "Split" in [n.op_type for n in phi3]
    phi4 = _nodes(export_onnx(quantized("phi4_mini"), tmp_path / "phi4"))
    assert {_attribute(n, "rotary_embedding_dim") for n in phi4 if n.op_type == "RotaryEmbedding"} == {18}


def test_gemma3_local_and_global_layers(quantized, tmp_path):
    """Gemma-3 with a sliding layer (window 16, rope_local_base_freq's cache) and a global one (its own cache):
    two cos/sin caches, each layer on its own, over 80 tokens."""
    src = tmp_path / "gemma3"
    shutil.copytree(quantized("gemma3"), src)
    config = json.loads((src / "config.json").read_text())
    config.update(layer_types=["sliding_attention", "full_attention"], sliding_window=16)
    (src / "config.json").write_text(json.dumps(config))
    out = export_onnx(src, tmp_path / "onnx")
    assert _within(_logits(out), _reference(src), "float32")
    caches = [[i for i in n.input if i.startswith("cos_cache")] for n in _nodes(out) if n.op_type == "RotaryEmbedding"]
    assert caches == [["cos_cache.sliding_attention"]] * 2 + [["cos_cache.full_attention"]] * 2


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", ["phi3", "gemma2", "olmo2", "granite"])
def test_family_kv_cache(family, dtype, quantized, tmp_path):
    """A prefill of 7 tokens then one token at a time, feeding the presents back, gives the logits of one full
    forward (Gemma-2: 72 tokens across its window of 64)."""
    session = _session(export_onnx(quantized(family), tmp_path / "onnx", dtype=dtype))
    names = [o.name for o in session.get_outputs()]
    ids = np.random.default_rng(0).integers(3, 300, (2, 72))
    full = session.run(["logits"], _feeds(session, ids))[0].astype(np.float32)
    steps, past, start = [], None, 0
    for chunk in [ids[:, :7]] + [ids[:, t:t + 1] for t in range(7, ids.shape[1])]:
        outputs = dict(zip(names, session.run(None, _feeds(session, chunk, start, past))))
        past = {n.replace("present", "past_key_values"): v for n, v in outputs.items() if n.startswith("present")}
        steps.append(outputs["logits"])
        start += chunk.shape[1]
    assert _within(np.concatenate(steps, axis=1), full, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", EXPORTED)
def test_family_genai_generation(family, dtype, quantized, expected, tmp_path):
    """onnxruntime-genai loads the folder and greedy-generates the 24 tokens transformers generates with
    lowbit's float32 model (float16 too: measured equal on every family)."""
    out = export_onnx(quantized(family), tmp_path / "onnx", dtype=dtype)
    assert genai_greedy(out, PROMPT, 24) == expected(family)[1]
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == GENAI_TYPES[family]


def test_bfloat16_refused_and_cli_float16(quantized, tmp_path, capsys):
    """`lowbit export -f onnx --onnx-dtype float16` writes a float16 decoder; bfloat16 is refused in one line
    naming the CPU kernels that lack it, before anything is written."""
    from lowbit.cli import main

    src = quantized("qwen3")
    assert main(["export", str(src), "-f", "onnx", "-o", str(tmp_path / "fp16"), "--onnx-dtype", "float16"]) == 0
    assert _logits(tmp_path / "fp16").dtype == np.float16
    assert main(["export", str(src), "-f", "onnx", "-o", str(tmp_path / "bf16"), "--onnx-dtype", "bfloat16"]) == 2
    assert "no bfloat16 MatMulNBits" in capsys.readouterr().err
    assert not (tmp_path / "bf16").exists()
