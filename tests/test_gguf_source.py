"""A GGUF source other than the demo: a tiny Llama written here with gguf-py (q/k rows permuted as llama.cpp
stores them), loaded by lowbit and compared with the Hugging Face model it came from. The cached folder of a
GGUF source holds no weights: every tensor is read from the file and equals transformers' own GGUF load."""

import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

gguf = pytest.importorskip("gguf")

from lowbit.api import load, quantize  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.hf.model import open_model  # noqa: E402
from lowbit.hf.source import demo_gguf, resolve_source  # noqa: E402

from .conftest import make_tiny  # noqa: E402

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def permute(w, n_head):
    """llama.cpp's q/k row order: rotate-half pairs (i, i + hd/2) become adjacent (FORMATS.md 4.3)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir, path):
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    cfg = model.config
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    for added in tok["added_tokens"]:
        assert vocab[added["id"]][1] == added["id"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i < 3 else 1 for i in range(len(vocab))])
    merges = tok["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_pad_token_id(1)
    sd = model.state_dict()
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    for i in range(cfg.num_hidden_layers):
        for hf, gg in GGUF_NAMES.items():
            t = sd[f"model.layers.{i}.{hf}.weight"].numpy()
            if hf == "self_attn.q_proj":
                t = permute(t, cfg.num_attention_heads)
            elif hf == "self_attn.k_proj":
                t = permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model.eval()


def test_gguf_file_loads_as_the_model_it_came_from(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    hf_dir = make_tiny("llama", tmp_path / "hf", tokenizer_dir)
    path = tmp_path / "tiny.gguf"
    ref = write_gguf(hf_dir, path)
    ours, tokenizer = load(path)
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, ref(ids).logits, atol=1e-5)
    text = "def f(x): return x"
    assert tokenizer(text).input_ids == __import__("transformers").AutoTokenizer.from_pretrained(hf_dir)(text).input_ids
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "config.json").is_file()
    load(path)  # the second load reuses the cache folder
    assert list((tmp_path / "cache").iterdir()) == cached
    out = tmp_path / "q"
    quantize(path, out, scheme="w_uint4_per_group_asym", group_size=32, progress=False, quiet=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "lowbit"


def transformers_load(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def assert_reads_as_transformers(path):
    """The cached folder holds no weights, and every parameter lowbit reads equals transformers' own load."""
    folder = resolve_source(path)
    assert not list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    record = json.loads((folder / "lowbit_source.json").read_text())
    assert record["weights"] == "gguf" and record["gguf"] == str(path.resolve())
    assert (record["size"], record["mtime_ns"]) == (path.stat().st_size, path.stat().st_mtime_ns)
    loaded = open_model(path)
    assert type(loaded.ckpt).__name__ == "GGUFCheckpoint" and loaded.source_dtype == torch.float32
    reference = transformers_load(path).state_dict()
    for name, want in reference.items():
        got = loaded.read(name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    return folder


def test_gguf_tensors_are_read_from_the_file(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_gguf(make_tiny("llama", tmp_path / "hf", tokenizer_dir), path)
    assert_reads_as_transformers(path)


def test_a_changed_gguf_file_is_read_anew(tokenizer_dir, tmp_path, monkeypatch):
    """A file rewritten after caching gets a new cache folder (the key holds its size and mtime); its old
    folder, given directly, is refused with what to do."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_gguf(make_tiny("llama", tmp_path / "hf", tokenizer_dir), path)
    old_folder = resolve_source(path)
    before = open_model(path).read("model.embed_tokens.weight")
    write_gguf(make_tiny("llama", tmp_path / "hf2", tokenizer_dir, seed=1), path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a new mtime even on a coarse clock
    assert resolve_source(path) != old_folder
    after = assert_reads_as_transformers(path)
    assert after != old_folder and not torch.equal(open_model(path).read("model.embed_tokens.weight"), before)
    with pytest.raises(LowbitError, match="has changed since its cache folder .* give the .gguf file itself"):
        open_model(old_folder)


@pytest.mark.slow
def test_demo_reads_as_transformers_loads_it(tmp_path, monkeypatch):
    """The demo (Q4_1 and Q8_0 blocks): every parameter bit-identical to transformers' float32 GGUF load."""
    try:
        path = demo_gguf()
    except LowbitError as exc:
        pytest.skip(f"demo model not installed: {exc}")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    folder = assert_reads_as_transformers(path)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
