"""Speed and size measurement (lowbit.eval.speed): each runtime times a real greedy generation of a tiny model in
a spawned child and reports consistent statistics, the weights' bytes on disk and the child's own peak memory;
every bad input is refused with one LowbitError line before any child starts."""

from __future__ import annotations

import pytest

from lowbit.errors import LowbitError
from lowbit.eval.speed import measure_speed

from .conftest import need_llama_cpp, save_random_model

PROMPT, NEW, RUNS = 16, 8, 2


def _tiny_llama(folder, tokenizer_dir):
    """A tiny random Llama whose in_features (64, 128) are multiples of 32, so that it exports to GGUF."""
    import transformers as tf

    vocab = len(tf.AutoTokenizer.from_pretrained(tokenizer_dir))
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            bos_token_id=0, pad_token_id=1, eos_token_id=2)
    return save_random_model(config, folder, tokenizer_dir)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    return _tiny_llama(tmp_path_factory.mktemp("bench-llama"), tokenizer_dir)


def _safetensors_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def _check_timings(result: dict, runs: int = RUNS) -> None:
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        stats = result[key]
        assert stats["median"] > 0, result
        assert stats["min"] <= stats["median"] <= stats["max"], result
        assert len(stats["all"]) == runs and all(v > 0 for v in stats["all"]), result
    assert result["peak_rss_bytes"] >= result["rss_before_load_bytes"] > 0
    assert result["threads"] >= 1 and result["load_seconds"] >= 0
    assert (result["prompt_tokens"], result["new_tokens"], result["runs"]) == (PROMPT, NEW, runs)


def test_torch_runtime(tiny):
    ballast = b"\x01" * (600 << 20)  # the parent's memory must not show in the child's peak
    result = measure_speed(tiny, prompt_tokens=PROMPT, new_tokens=NEW, runs=RUNS, threads=1, progress=False)
    assert result["runtime"] == "torch" and result["runtime_version"] == result["torch_version"]
    assert result["threads"] == 1
    _check_timings(result)
    assert result["size_bytes"] == _safetensors_bytes(tiny)
    assert result["peak_rss_bytes"] < _rss() - len(ballast) // 2, result
    del ballast


def test_lowbit_output_folder(tiny, lowbit_out):
    out = lowbit_out(tiny, "w_int8_per_group_sym", group_size=32)
    result = measure_speed(out, runtime="torch", prompt_tokens=PROMPT, new_tokens=NEW, runs=1, warmup=0,
                           progress=False)
    _check_timings(result, runs=1)
    assert result["size_bytes"] == _safetensors_bytes(out) < _safetensors_bytes(tiny)


def test_onnxruntime_genai_runtime(onnx_tiny):
    pytest.importorskip("onnxruntime_genai")
    folder = onnx_tiny["gqa"][1]
    result = measure_speed(folder, prompt_tokens=PROMPT, new_tokens=NEW, runs=RUNS, progress=False)
    assert result["runtime"] == "onnxruntime-genai"  # chosen by "auto" for a folder with genai_config.json
    _check_timings(result)
    weights = [folder / "model.onnx", folder / "model.onnx.data"]  # the graph and the external data it names
    assert result["size_bytes"] == sum(p.stat().st_size for p in weights)


def test_llama_cpp_runtime(tiny, lowbit_out, tmp_path):
    need_llama_cpp()
    from lowbit.exporters.gguf import export_gguf

    path = export_gguf(lowbit_out(tiny, "w_int8_per_group_sym", group_size=32), tmp_path / "m.gguf")
    result = measure_speed(path, runtime="llama.cpp", prompt_tokens=PROMPT, new_tokens=NEW, runs=RUNS,
                           progress=False)
    _check_timings(result)
    assert result["runtime"] == "llama.cpp" and result["size_bytes"] == path.stat().st_size


def _bare_onnx(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not read")
    return path


@pytest.mark.parametrize("case,kwargs,message", [
    ("hf", dict(prompt_tokens=0), "prompt_tokens"),
    ("hf", dict(new_tokens=0), "new_tokens"),
    ("hf", dict(runs=0), "runs"),
    ("hf", dict(warmup=-1), "warmup"),
    ("hf", dict(threads=0), "threads"),
    ("hf", dict(runtime="vllm"), "unknown runtime"),
    ("hf", dict(runtime="onnxruntime-genai"), "not ONNX"),
    ("hf", dict(runtime="llama.cpp"), "not one"),
    ("hf", dict(prompt_tokens=10 ** 7), "fewer than prompt_tokens"),
    ("onnx", dict(runtime="torch"), "torch cannot run"),
    ("onnx", dict(new_tokens=10 ** 6), "context length"),
    ("bare-onnx", dict(), "genai_config.json"),
    ("missing", dict(), "not found"),
])
def test_bad_inputs(case, kwargs, message, tiny, onnx_tiny, tmp_path):
    model = {"hf": tiny, "onnx": onnx_tiny["gqa"][1], "bare-onnx": _bare_onnx(tmp_path),
             "missing": tmp_path / "nothing"}[case]
    with pytest.raises(LowbitError, match=message) as info:
        measure_speed(model, **kwargs)
    assert "\n" not in str(info.value)


def test_missing_package(onnx_tiny, monkeypatch):
    from lowbit.eval import speed

    monkeypatch.setitem(speed._PACKAGES, "onnxruntime-genai", ("no_such_module_lowbit", "onnxruntime-genai"))
    with pytest.raises(LowbitError, match="pip install onnxruntime-genai"):
        measure_speed(onnx_tiny["gqa"][1])


def test_child_errors_reach_the_caller(tmp_path):
    """A LowbitError raised in the spawned child is raised, as it is, in the caller."""
    from lowbit.eval.speed import run_in_child
    from lowbit.hf.source import resolve_source

    with pytest.raises(LowbitError, match="not found"):
        run_in_child(resolve_source, str(tmp_path / "nothing"))
