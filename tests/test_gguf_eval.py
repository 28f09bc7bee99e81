"""`lowbit eval FILE.gguf` says where it measures: in llama.cpp by default when llama-cpp-python is installed, else
the dequantized weights in torch, named as such (the file's GGML types), with the file's real size."""

import importlib.util
import json

import pytest

from lowbit.cli import main

from .conftest import need_llama_cpp
from .test_gguf_export import export_gguf, tiny64  # noqa: F401 - the fixture, shared

EVAL = ["--seq-len", "32", "--max-chunks", "2", "--no-progress"]


@pytest.fixture
def gguf_file(tiny64, lowbit_out, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    src = lowbit_out(tiny64["llama"], "w_uint4_per_group_asym", group_size=32)
    return export_gguf(src, tmp_path / "m.gguf")


def _eval(capsys, path, text_file, *extra):
    code = main(["eval", str(path), "--dataset", str(text_file), *EVAL, *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def test_gguf_runs_in_llama_cpp_by_default(gguf_file, text_file, capsys):
    need_llama_cpp()
    out, err = _eval(capsys, gguf_file, text_file, "--json")
    result = json.loads(out)
    assert result["runtime"] == "llama.cpp" and result["size_bytes"] == gguf_file.stat().st_size
    assert "note:" not in err


def test_gguf_without_llama_cpp_says_torch_and_its_types(gguf_file, text_file, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    out, err = _eval(capsys, gguf_file, text_file)
    assert "llama-cpp-python is not installed" in err and "dequantized in torch" in err
    assert f"{gguf_file} (GGUF F32, Q4_1, dequantized in torch)" in out and "(float)" not in out  # float embedding
    size = gguf_file.stat().st_size / 2**20
    assert f"size {size:.1f} MiB" in out


def test_torch_only_options_run_gguf_in_torch(gguf_file, text_file, capsys):
    out, err = _eval(capsys, gguf_file, text_file, "--dtype", "bfloat16", "--json")
    result = json.loads(out)
    assert "runtime" not in result and result["stored_as"].startswith("GGUF ") and "Q4_1" in result["stored_as"] and result["dtype"] == "bfloat16"
    assert "a torch-only option is given" in err
    out, err = _eval(capsys, gguf_file, text_file, "--runtime", "torch", "--json")
    assert "stored_as" in json.loads(out) and "note:" not in err  # asked for: nothing to say


def test_other_models_stay_in_torch(tiny_models, text_file, capsys):
    out, err = _eval(capsys, tiny_models["llama"], text_file)
    assert "(float)" in out and "note:" not in err
