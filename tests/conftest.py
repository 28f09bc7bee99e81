"""Shared fixtures: a small byte-level BPE tokenizer trained on CPython's docs, and tiny random causal LMs of
several architectures saved as Hugging Face folders."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

HIDDEN = 80  # not a power of two: group 32 leaves a partial last group of 16


def _configs(vocab: int) -> dict:
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=2, max_position_embeddings=256,
                  bos_token_id=0, pad_token_id=1, eos_token_id=2)
    return {
        "llama": tf.LlamaConfig(**common, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2,
                                tie_word_embeddings=True),
        "qwen2": tf.Qwen2Config(**common, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2,
                                tie_word_embeddings=False),
        "mistral": tf.MistralConfig(**common, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2),
        "phi3": tf.Phi3Config(**common, intermediate_size=112, num_attention_heads=4, num_key_value_heads=4),
        "gemma": tf.GemmaConfig(**common, intermediate_size=112, num_attention_heads=4, num_key_value_heads=1,
                                head_dim=20),
        "gemma3": tf.Gemma3TextConfig(**common, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=20, sliding_window=64),
        "mixtral": tf.MixtralConfig(**common, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                                    num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": tf.Qwen2MoeConfig(**common, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2,
                                       num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                       shared_expert_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[]),
        "opt": tf.OPTConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=2, ffn_dim=112,
                            num_attention_heads=4, word_embed_proj_dim=HIDDEN, max_position_embeddings=256,
                            pad_token_id=1, bos_token_id=0, eos_token_id=2),
    }


ARCHS = ["llama", "qwen2", "mistral", "phi3", "gemma", "gemma3", "opt"]


NEEDS_LLAMA_CPP = 'needs llama-cpp-python (pip install -e ".[llama]"; see README)'


def need_llama_cpp():
    """llama_cpp, or else skip the calling test: llama-cpp-python compiles from source, so it has an extra of its
    own (`llama`) that the quick install leaves out. Skipping here (not at each caller) gives every such test
    the same location, so pytest -ra reports them all on one line."""
    try:
        import llama_cpp
    except ImportError:
        pytest.skip(NEEDS_LLAMA_CPP)
    return llama_cpp


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A 400-token byte-level BPE tokenizer, trained here on CPython's own documentation."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(topics.values())[:40], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return path


def save_random_model(config, folder, tokenizer_dir, dtype=torch.float32, seed: int = 0,
                      randomize_1d: bool = False):
    """A random causal LM of `config`, saved with the test tokenizer to folder. Matrices (and fused 3-D MoE
    experts) ~ N(0, 0.08), wider than the init default; with randomize_1d also biases ~ N(0, 0.05), norm gains
    ~ N(1, 0.1) and zero-initialised gains (Gemma stores w for 1 + w) ~ N(0, 0.1), so that an export which drops
    a bias or a norm offset shows."""
    import shutil

    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() in (2, 3):
                p.normal_(0, 0.08)
            elif randomize_1d and name.endswith("bias"):
                p.normal_(0, 0.05)
            elif randomize_1d:
                p.normal_(1 if bool((p == 1).all()) else 0, 0.1)
    model.to(dtype).save_pretrained(folder)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, folder)
    return folder


def make_tiny(arch: str, folder, tokenizer_dir, dtype=torch.float32, seed: int = 0):
    """Build a tiny random model of an architecture and save it (with the tokenizer) to folder."""
    from transformers import AutoTokenizer

    config = _configs(len(AutoTokenizer.from_pretrained(tokenizer_dir)))[arch]
    return save_random_model(config, folder, tokenizer_dir, dtype, seed)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir):
    """arch -> folder of a saved tiny float32 model."""
    return {a: make_tiny(a, tmp_path_factory.mktemp(f"tiny-{a}"), tokenizer_dir) for a in ARCHS}


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory, tokenizer_dir):
    """arch -> folder of a saved tiny float32 mixture-of-experts model (Mixtral, Qwen2-MoE)."""
    return {a: make_tiny(a, tmp_path_factory.mktemp(f"tiny-{a}"), tokenizer_dir) for a in ("mixtral", "qwen2_moe")}


@pytest.fixture(scope="module")
def lowbit_out(tmp_path_factory):
    """quantize(source, scheme, **kwargs) -> a lowbit output folder (4 calibration windows of 64), made once
    per test module."""
    from lowbit.api import quantize

    cache = {}

    def make(source, scheme, **kwargs):
        key = (str(source), scheme, repr(sorted(kwargs.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("lowbit") / scheme
            quantize(source, out, scheme=scheme, progress=False, quiet=True, num_calib_data=4, seq_len=64, **kwargs)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture
def text_file(tmp_path):
    from pydoc_data.topics import topics

    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(list(topics.values())[40:80]))
    return path


# Tiny Llama decoders for the ONNX front end: GroupQueryAttention needs head_dim a multiple of 8; hidden 96
# leaves a partial last group of 32 at group 64
ONNX_TINY = {"gqa": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
             "mha": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=False)}


def builder_export(hf, out):
    """onnxruntime-genai's model builder: the fp32 CPU ONNX decoder of a Hugging Face folder."""
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                          "-p", "fp32", "-e", "cpu", "-c", str(out) + "-cache"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def tiny256(tmp_path_factory, tokenizer_dir):
    """A tiny llama whose rows are whole super-blocks (hidden 256, MLP 512), untied, 4 layers."""
    import transformers as tf
    from transformers import AutoTokenizer

    config = tf.LlamaConfig(vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), hidden_size=256,
                            intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                            max_position_embeddings=256, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                            tie_word_embeddings=False)
    return save_random_model(config, tmp_path_factory.mktemp("tiny256"), tokenizer_dir, torch.float32,
                             randomize_1d=True)


@pytest.fixture(scope="session")
def onnx_tiny(tmp_path_factory, tokenizer_dir):
    """kind ("gqa": tied, grouped queries; "mha") -> (HF float folder, the builder's fp32 ONNX folder of it)."""
    import transformers as tf

    vocab = len(tf.AutoTokenizer.from_pretrained(tokenizer_dir))
    out = {}
    for kind, extra in ONNX_TINY.items():
        config = tf.LlamaConfig(vocab_size=vocab, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                max_position_embeddings=256, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                                architectures=["LlamaForCausalLM"], **extra)
        base = tmp_path_factory.mktemp(f"onnx-tiny-{kind}")
        hf = save_random_model(config, base / "hf", tokenizer_dir, randomize_1d=True)
        out[kind] = (hf, builder_export(hf, base / "onnx"))
    return out



@pytest.fixture(scope="session")
def family_model(tmp_path_factory, tokenizer_dir):
    """family name (tests/families.py) -> the folder of its tiny float32 model, made on first use."""
    from .families import make_family

    made = {}

    def get(name: str):
        if name not in made:
            made[name] = make_family(name, tmp_path_factory.mktemp(f"family-{name.replace('.', '_')}"), tokenizer_dir)
        return made[name]
    return get


def genai_greedy(folder, prompt, new_tokens: int) -> list[int]:
    """onnxruntime-genai's greedy tokens after `prompt` (token ids) for an ONNX folder, up to new_tokens."""
    import numpy as np

    from lowbit.runtimes import genai_generator, open_genai_model

    prompt = [int(t) for t in prompt]
    generator = genai_generator(open_genai_model(folder), len(prompt) + new_tokens, do_sample=False)
    generator.append_tokens(np.array(prompt, dtype=np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens
