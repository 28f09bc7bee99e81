"""Perplexity streamed one decoder block at a time (eval/streamed.py) gives the in-memory figure: plain and
tied Llama, Gemma-3 and Qwen2 with sliding-window and full-attention layers (another mask per block), a lowbit
output with static W8A8 inputs, an FP8 KV cache and online rotations (the run-time hooks attached block by
block), hidden states offloaded to disk; `lowbit eval --stream/--no-stream`, the automatic choice, and the
refusals as one line."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit import api
from lowbit.cli import main
from lowbit.data import eval_windows, load_text, tokenize
from lowbit.errors import LowbitError
from lowbit.eval.perplexity import perplexity
from lowbit.eval.streamed import BlockStream, HiddenStore, streamed_perplexity
from lowbit.hf.model import open_model

from .conftest import save_random_model

SEQ, CHUNKS, BATCH = 64, 7, 3  # batches of 3, 3 and 1 windows


def windows_of(loaded, seq_len=SEQ, chunks=CHUNKS):
    return eval_windows(tokenize(loaded.tokenizer(), load_text("pydoc", "eval")), seq_len, chunks)


def both(folder, **stream_options):
    """(in-memory, streamed) PerplexityResult of a folder on the same windows."""
    whole = open_model(folder, torch.float32)
    windows = windows_of(whole)
    in_memory = perplexity(whole.load_all(), windows, BATCH, progress=False)
    streamed = streamed_perplexity(open_model(folder, torch.float32), windows, BATCH, progress=False,
                                   **stream_options)
    return in_memory, streamed


def assert_same(in_memory, streamed):
    assert streamed.tokens == in_memory.tokens and streamed.windows == in_memory.windows
    assert streamed.nll == pytest.approx(in_memory.nll, rel=1e-6)
    assert streamed.nll == in_memory.nll  # measured: bit-identical on CPU (the same ops on the same batches)


def layered(kind, tokenizer_dir, folder):
    """A tiny model whose two layers attend differently: sliding window of 16 tokens, then full attention."""
    import transformers as tf

    vocab = len(tf.AutoTokenizer.from_pretrained(tokenizer_dir))
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                  sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    config = {"gemma3": lambda: tf.Gemma3TextConfig(**common, head_dim=16),
              "qwen2": lambda: tf.Qwen2Config(**common, use_sliding_window=True, max_window_layers=1)}[kind]()
    return save_random_model(config, folder, tokenizer_dir, randomize_1d=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_streamed_equals_in_memory(arch, tiny_models):
    """Llama (tied lm_head) and Qwen2 (untied): the same negative log-likelihood, to the bit."""
    assert_same(*both(tiny_models[arch]))


@pytest.mark.parametrize("kind", ["gemma3", "qwen2"])
def test_per_layer_attention_types(kind, tokenizer_dir, tmp_path):
    """Each block gets its own recorded mask (sliding window or full), so the stream still matches."""
    folder = layered(kind, tokenizer_dir, tmp_path / kind)
    loaded = open_model(folder, torch.float32)
    stream = BlockStream(loaded, [windows_of(loaded)[:2]], HiddenStore(None))
    head_less = [n for n, _ in loaded.model.named_parameters() if "layers" not in n and "lm_head" not in n]
    with torch.inference_mode():
        for name in head_less:
            loaded.materialize(name)
        stream.record()
    masks = [stream.inputs[i][0][1]["attention_mask"] for i in range(2)]
    assert masks[0] is not None  # the sliding window's mask; full attention's may be None (causal SDPA)
    assert masks[1] is None or not torch.equal(masks[0], masks[1])
    assert_same(*both(folder))


def test_lowbit_output_with_static_inputs_kv_cache_and_online_rotation(tiny_models, tmp_path):
    """W8A8 with static (calibrated) input scales, an FP8 KV cache and the R4 online rotation: every run-time
    hook attached to each block as it loads (LoadedModel.attach_runtime), the same figure as load_all's."""
    out = tmp_path / "w8a8"
    api.quantize(tiny_models["llama"], out, scheme="w_int8_a_int8_per_tensor_sym", algo="rotation,rtn",
                 algo_args=["rotation:r4=true"], kv_cache_dtype="fp8", num_calib_data=4, seq_len=SEQ,
                 progress=False, quiet=True)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["inputs"] and qconfig["outputs"] and qconfig["online_rotations"]
    in_memory, streamed = both(out)
    assert_same(in_memory, streamed)
    float_model = open_model(tiny_models["llama"], torch.float32)
    assert perplexity(float_model.load_all(), windows_of(float_model), BATCH, False).nll != streamed.nll


def test_offloaded_hidden_states(tiny_models, tmp_path):
    """Hidden states kept on disk between blocks: the same figure, and the temporary folder is gone after."""
    (tmp_path / "spill").mkdir()
    assert_same(*both(tiny_models["llama"], offload_dir=tmp_path / "spill"))
    assert list((tmp_path / "spill").iterdir()) == []


def test_weights_loaded_one_block_at_a_time(tiny_models, monkeypatch):
    """While blocks run, no other block and no lm_head holds weights; everything is released at the end."""
    loaded = open_model(tiny_models["qwen2"], torch.float32)
    seen = []
    real = BlockStream.run_block

    def watch(self, i):
        real_block = type(self).real_block

        def spy(stream, j):
            seen.append(sorted({n.split(".")[2] if ".layers." in n else n.split(".")[0]
                                for n, p in loaded.model.named_parameters() if p.device.type != "meta"}))
            return real_block(stream, j)

        monkeypatch.setattr(type(self), "real_block", spy)
        try:
            return real(self, i)
        finally:
            monkeypatch.setattr(type(self), "real_block", real_block)

    monkeypatch.setattr(BlockStream, "run_block", watch)
    streamed_perplexity(loaded, windows_of(loaded), BATCH, progress=False)
    assert seen == [[], []]  # before each block loads: nothing else is loaded
    assert all(p.device.type == "meta" for p in loaded.model.parameters())


def test_cli_stream_flags(capsys, tiny_models):
    results = {}
    for flag in ("--stream", "--no-stream"):
        code = main(["eval", str(tiny_models["llama"]), "--seq-len", str(SEQ), "--max-chunks", str(CHUNKS),
                     "--batch-size", str(BATCH), "--json", "--no-progress", flag])
        assert code == 0
        results[flag] = json.loads(capsys.readouterr().out)
    assert results["--stream"]["streamed"] is True and results["--no-stream"]["streamed"] is False
    assert results["--stream"]["perplexity"] == results["--no-stream"]["perplexity"]
    assert results["--stream"]["parameters"] == results["--no-stream"]["parameters"]
    assert main(["eval", str(tiny_models["llama"]), "--stream", "--no-stream"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_automatic_choice_and_refusals(tiny_models, tmp_path, monkeypatch):
    """stream None streams when the weights do not fit; a stream whose hidden states do not fit either is
    refused (one line) unless they go to --offload-dir; a missing --offload-dir folder is refused."""
    import lowbit.memory as memory

    model, kw = tiny_models["llama"], dict(seq_len=SEQ, max_chunks=CHUNKS, progress=False)
    assert api.evaluate(model, **kw)["streamed"] is False
    monkeypatch.setattr(memory, "fits_in_memory", lambda *a, **k: False)
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    assert api.evaluate(model, **kw)["streamed"] is True
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
    with pytest.raises(LowbitError, match="--offload-dir"):
        api.evaluate(model, **kw)
    assert api.evaluate(model, offload_dir=tmp_path, **kw)["streamed"] is True
    with pytest.raises(LowbitError, match="not an existing folder"):
        api.evaluate(model, offload_dir=tmp_path / "missing", **kw)


def test_available_memory_reads_the_cgroup(tmp_path, monkeypatch):
    """The smaller of MemAvailable and the cgroup's limit minus its usage; v1's 'no limit' is no limit."""
    import lowbit.memory as memory

    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text(f"{3 << 30}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{1 << 30}\n")
    monkeypatch.setattr(memory, "CGROUP_V1", v1)
    monkeypatch.setattr(memory, "_mem_available", lambda: 64 << 30)
    assert memory.available_bytes() == 2 << 30
    (v1 / "memory.limit_in_bytes").write_text(f"{(1 << 63) - 4096}\n")
    monkeypatch.setattr(memory, "CGROUP_V2", tmp_path / "none")
    assert memory.available_bytes() == 64 << 30
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("max\n")
    monkeypatch.setattr(memory, "CGROUP_V2", v2)
    assert memory.available_bytes() == 64 << 30
    (v2 / "memory.max").write_text(f"{5 << 30}\n")
    (v2 / "memory.current").write_text(f"{4 << 30}\n")
    assert memory.available_bytes() == 1 << 30


def test_demo_streamed_equals_in_memory():
    """The demo model (SmolLM2-135M from GGUF, tied embeddings): 4 windows of 128 tokens."""
    from lowbit.hf.source import demo_gguf

    try:
        demo_gguf()
    except LowbitError as exc:
        pytest.skip(f"demo model not installed: {exc}")
    whole = open_model("demo", torch.float32)
    windows = windows_of(whole, 128, 4)
    in_memory = perplexity(whole.load_all(), windows, 4, progress=False)
    assert_same(in_memory, streamed_perplexity(open_model("demo", torch.float32), windows, 4, progress=False))


@pytest.mark.parametrize("extra,message", [
    (["--stream", "--runtime", "llama.cpp"], "runs in llama.cpp, which holds it whole"),
    (["--no-stream", "--offload-dir", "."], "does nothing with --no-stream"),
    (["--offload-dir", "missing-folder"], "is not an existing folder"),
])
def test_stream_option_refusals_are_one_line(extra, message, capsys, tiny_models):
    assert main(["eval", str(tiny_models["llama"]), "--no-progress", *extra]) != 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
