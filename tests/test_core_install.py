"""`pip install lowbit` without extras: the core commands must not need any optional package (onnx, onnxruntime,
onnxruntime-genai, lm-eval, compressed-tensors, llama-cpp-python, datasets, pyarrow, matplotlib)."""

from __future__ import annotations

import os
import subprocess
import sys

OPTIONAL = ("onnx", "onnxruntime", "onnxruntime_genai", "onnx_ir", "lm_eval", "compressed_tensors", "llama_cpp",
            "datasets", "pyarrow", "matplotlib")
RUN = ("import sys\n"
       "for name in {optional!r}:\n    sys.modules[name] = None  # import of it fails, as when not installed\n"
       "from lowbit.cli import main\nsys.exit(main(sys.argv[1:]))\n")


def lowbit_without_extras(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN.format(optional=OPTIONAL), *map(str, argv)], text=True,
                          capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)


def test_core_commands_need_no_optional_package(tiny_models, tmp_path):
    model, out = tiny_models["llama"], tmp_path / "w4"
    for argv in (["inspect", model],
                 ["quantize", model, "-o", out, "--scheme", "w_uint4_per_group_asym", "--group-size", "16",
                  "--algo", "awq,gptq", "--num-calib-data", "2", "--seq-len", "32", "--no-progress"],
                 ["eval", out, "--seq-len", "32", "--max-chunks", "2", "--no-progress"],
                 ["export", out, "-f", "gptq", "-o", tmp_path / "gptq"],
                 ["export", out, "-f", "compressed-tensors", "-o", tmp_path / "ct"]):
        proc = lowbit_without_extras(*argv)
        assert proc.returncode == 0, proc.stderr[-3000:]
    # an optional package that is needed and missing is one line saying what to install
    proc = lowbit_without_extras("export", out, "-f", "onnx", "-o", tmp_path / "onnx")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "onnx" in errors[0], proc.stderr[-3000:]
