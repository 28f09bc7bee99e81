"""LongRoPE (Phi-3.5-mini, Phi-4-mini, Phi-3-*-128k) in the GGUF and ONNX exports (issue #25), on two tiny Phi-3
models with random long / short factors in [1, 4], original context 256 and maximal context 1024: "phi3" (heads of
24, all rotated: ONNX rotates with RotaryEmbedding nodes) and "phi4" (partial_rotary_factor 0.75 on heads of 64,
tied: GroupQueryAttention rotates 48 dimensions itself). Prompts of 24 tokens (short factors in transformers) and
300 (long factors).

transformers chooses the factors by the sequence (largest position + 1 > original context: long), and multiplies
cos / sin by the attention factor either way.
- llama.cpp chooses by the context it is opened with (n_ctx per sequence, padded to a multiple of 256, above
  rope.scaling.original_context_length: long factors for every token). Opened with n_ctx <= 256 it computes
  transformers' short-prompt logits, with 512 its long-prompt logits; a short prompt in a context of 512 gets the
  long factors (transformers' logits with the short factors replaced by the long ones), which the test pins.
  Measured, F32 file against transformers: 5e-4 to 8e-4 of the largest logit (bound 3e-3); the Q4_1 file against
  lowbit's model: 2% to 3% (bound 5%).
- ONNX: two cos / sin cache sets and an If on past + current tokens > original context, as onnxruntime-genai's
  builder writes. One forward pass computes transformers' logits at any length (measured 5e-6 absolute, bound
  1e-4). Stepping the KV cache across the boundary keeps the earlier keys as they were rotated (short factors)
  and rotates new tokens with the long ones: transformers' own cached forward does the same (the test pins
  onnxruntime's steps and onnxruntime-genai's greedy tokens to it), but Phi-3's generate() recomputes the whole
  cache once at the crossing, so its tokens after the boundary can differ.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowbit.api import export, load, quantize
from lowbit.errors import LowbitError

from .conftest import genai_greedy, need_llama_cpp, save_random_model
from .families import COMMON

ORIGINAL, MAXIMAL = 256, 1024
SHORT = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(0))
LONG = torch.randint(3, 300, (1, 300), generator=torch.Generator().manual_seed(1))
PROMPT = 250  # then tokens one at a time across ORIGINAL
MODELS = {"phi3": dict(partial_rotary_factor=1.0, tie_word_embeddings=False),
          "phi4": dict(partial_rotary_factor=0.75, tie_word_embeddings=True, hidden_size=128, num_attention_heads=2,
                       num_key_value_heads=1)}


def _config(name: str, vocab: int):
    from transformers import Phi3Config

    c = dict(COMMON, vocab_size=vocab, max_position_embeddings=MAXIMAL, original_max_position_embeddings=ORIGINAL)
    c.update(MODELS[name])
    half = int(c["hidden_size"] // c["num_attention_heads"] * c["partial_rotary_factor"]) // 2
    g = torch.Generator().manual_seed(len(name))
    long, short = (1 + 3 * torch.rand(half, generator=g)).tolist(), (1 + 3 * torch.rand(half, generator=g)).tolist()
    return Phi3Config(**c, rope_scaling={"rope_type": "longrope", "long_factor": long, "short_factor": short})


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    """name -> (float folder, lowbit RTN folder: uint4 asymmetric, groups of 32), made once per module."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    made = {}

    def get(name: str):
        if name not in made:
            hf = save_random_model(_config(name, vocab), tmp_path_factory.mktemp(name) / "hf", tokenizer_dir,
                                   randomize_1d=True)
            src = hf.parent / "q"
            quantize(hf, src, scheme="w_uint4_per_group_asym", group_size=32, progress=False, quiet=True,
                     num_calib_data=4, seq_len=64)
            made[name] = hf, src
        return made[name]
    return get


def _hf_logits(folder, ids, long_factors: bool = False) -> np.ndarray:
    """transformers' float logits; long_factors: with the short factors replaced by the long ones."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if long_factors:
        config.rope_parameters["short_factor"] = list(config.rope_parameters["long_factor"])
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits[0].numpy()


def _lowbit_logits(src, ids) -> np.ndarray:
    with torch.no_grad():
        return load(src)[0].eval()(ids).logits[0].float().numpy()


def _error(got, want) -> float:
    """The largest logit error over the largest |logit|."""
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


# -- GGUF ------------------------------------------------------------------------------------------------

def test_gguf_metadata_of_a_phi35_config():
    """Phi-3.5-mini's own config form (rope_scaling with "type", the original context at the top level): the
    attention factor llama.cpp's converter writes for it (1.190238), the factors as rotary_dim / 2 tensors; a
    factor list of another length and LongRoPE on another architecture are refused in one line."""
    from lowbit.exporters.gguf_meta import longrope_attn_factor, longrope_original, rope, rope_tensors

    config = {"model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 32, "max_position_embeddings": 131072,
              "original_max_position_embeddings": 4096,
              "rope_scaling": {"type": "longrope", "long_factor": [2.0] * 48, "short_factor": [1.0] * 48}}
    _, scaling = rope(config)
    assert longrope_original(config, scaling) == 4096
    assert longrope_attn_factor(config, scaling) == pytest.approx(1.190238, abs=1e-6)
    tensors = rope_tensors(config)
    assert sorted(tensors) == ["rope_factors_long.weight", "rope_factors_short.weight"]
    long = tensors["rope_factors_long.weight"]
    assert long.dtype == np.float32 and long.shape == (48,) and set(long.tolist()) == {2.0}
    bad = dict(config, rope_scaling=dict(config["rope_scaling"], short_factor=[1.0] * 47))
    with pytest.raises(LowbitError, match="short_factor has 47 entries, not rotary_dim / 2 = 48"):
        rope_tensors(bad)
    with pytest.raises(LowbitError, match="written for phi3 models only"):
        rope(dict(config, model_type="llama"))


def _llama_cpp_logits(path, ids, n_ctx: int) -> np.ndarray:
    llama_cpp = need_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=2, verbose=False)
    try:
        assert llm.n_ctx() == n_ctx
        llm.eval(ids[0].tolist())
        return np.array(llm.scores[: ids.shape[1]])
    finally:
        llm.close()


@pytest.mark.parametrize("name", list(MODELS))
def test_gguf_in_llama_cpp(name, models, tmp_path):
    """The F32 file of the float model against transformers and the quantized file against lowbit's model, for
    a short prompt in a context of ORIGINAL and a long one in a context of 2 x ORIGINAL; a short prompt in the
    long context gets the long factors (llama.cpp chooses by context)."""
    import gguf

    need_llama_cpp()
    hf, src = models(name)
    f32, q = tmp_path / "f32.gguf", tmp_path / "q.gguf"
    export(hf, f32, "gguf", quiet=True, quant_type="f32")
    export(src, q, "gguf", quiet=True)
    fields = gguf.GGUFReader(str(q)).fields
    assert fields["phi3.rope.scaling.original_context_length"].parts[-1][0] == ORIGINAL
    assert fields["phi3.rope.scaling.attn_factor"].parts[-1][0] == pytest.approx(
        math.sqrt(1 + math.log(MAXIMAL / ORIGINAL) / math.log(ORIGINAL)))
    for ids, n_ctx in ((SHORT, ORIGINAL), (LONG, 2 * ORIGINAL)):
        assert _error(_llama_cpp_logits(f32, ids, n_ctx), _hf_logits(hf, ids)) < 3e-3, (name, n_ctx)
        assert _error(_llama_cpp_logits(q, ids, n_ctx), _lowbit_logits(src, ids)) < 0.05, (name, n_ctx)
    short_in_long = _llama_cpp_logits(f32, SHORT, 2 * ORIGINAL)
    assert _error(short_in_long, _hf_logits(hf, SHORT, long_factors=True)) < 3e-3
    assert _error(short_in_long, _hf_logits(hf, SHORT)) > 0.05


# -- ONNX ------------------------------------------------------------------------------------------------

def _ort_feeds(session, ids: np.ndarray, start: int = 0, past: dict | None = None, dtype: str = "float32") -> dict:
    n, seq = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((n, start + seq), np.int64),
             "position_ids": np.tile(np.arange(start, start + seq), (n, 1))}
    for spec in session.get_inputs():
        if spec.name.startswith("past"):
            feeds[spec.name] = past[spec.name] if past else np.zeros((n, spec.shape[1], 0, spec.shape[3]), dtype)
    return feeds


def _onnx(src, out, dtype: str = "float32"):
    ort = pytest.importorskip("onnxruntime")
    from lowbit.exporters.onnx import export_onnx

    export_onnx(src, out, dtype=dtype)
    return ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])


def test_onnx_decoder_shape_of_a_phi35_config():
    from lowbit.exporters.onnx_family import check_architecture, decoder_shape

    config = {"model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 32, "num_hidden_layers": 2,
              "vocab_size": 32064, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
              "rope_scaling": {"type": "longrope", "long_factor": [2.0] * 48, "short_factor": [1.0] * 48}}
    check_architecture(config)
    assert decoder_shape(config).rope_original == 4096
    assert decoder_shape(dict(config, rope_scaling=None)).rope_original == 0


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_logits_short_and_long(name, dtype, models, tmp_path):
    """One forward pass of 24 and of 300 tokens against lowbit's model (float16: within 5e-3 of the largest
    logit, as test_onnx_families.py; measured 1.7e-3 to 2.4e-3); the graph holds both cache sets and one If
    (phi4: GroupQueryAttention rotates, no RotaryEmbedding node)."""
    import onnx

    _, src = models(name)
    session = _onnx(src, tmp_path / "onnx", dtype)
    for ids in (SHORT, LONG):
        got = session.run(["logits"], _ort_feeds(session, ids.numpy(), dtype=dtype))[0][0].astype(np.float32)
        want = _lowbit_logits(src, ids)
        bound = 1e-4 if dtype == "float32" else 5e-3 * np.abs(want).max()
        assert np.abs(got - want).max() < bound, ids.shape
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("If") == 1 and ("RotaryEmbedding" in ops) == (name == "phi3")
    assert {"cos_cache.default", "cos_cache.default.long"} <= {i.name for i in graph.initializer}


def _torch_steps(src, ids: torch.Tensor, steps: int) -> tuple[list[np.ndarray], list[int]]:
    """lowbit's model greedy from ids with its KV cache, one token at a time: each step's logits and token."""
    model = load(src)[0].eval()
    logits, tokens = [], []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        for t in range(steps):
            logits.append(out.logits[0, -1].float().numpy())
            tokens.append(int(logits[-1].argmax()))
            if t + 1 < steps:
                out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.past_key_values,
                            position_ids=torch.tensor([[ids.shape[1] + t]]), use_cache=True)
    return logits, tokens


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_steps_and_genai_across_the_boundary(name, models, tmp_path):
    """A prompt of 250 tokens, then 12 tokens one at a time (the 8th step's total passes 256): onnxruntime's
    logits with the presents fed back, and onnxruntime-genai's greedy tokens, against lowbit's model stepping
    its own KV cache."""
    pytest.importorskip("onnxruntime_genai")
    _, src = models(name)
    ids = LONG[:, :PROMPT]
    want_logits, want_tokens = _torch_steps(src, ids, 12)
    session = _onnx(src, tmp_path / "onnx")
    names = [o.name for o in session.get_outputs()]
    chunk, past, start = ids.numpy(), None, 0
    for t in range(12):
        outputs = dict(zip(names, session.run(None, _ort_feeds(session, chunk, start, past))))
        past = {n.replace("present", "past_key_values"): v for n, v in outputs.items() if n.startswith("present")}
        assert np.abs(outputs["logits"][0, -1] - want_logits[t]).max() < 1e-4, t
        start += chunk.shape[1]
        chunk = np.array([[want_tokens[t]]])
    assert genai_greedy(tmp_path / "onnx", ids[0].tolist(), 12) == want_tokens
