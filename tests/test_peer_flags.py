"""The flags users bring from AMD Quark, Intel Neural Compressor and NVIDIA ModelOpt: accepted and translated into
lowbit's own arguments, or answered in one line with lowbit's equivalent; foreign scheme spellings get lowbit's."""

import json

import pytest
import yaml

from lowbit import peer_flags
from lowbit.cli_parser import build_parser
from lowbit.errors import LowbitError
from lowbit.spec import lowbit_spelling

from .test_cli import one_error_line, run


def translated(*argv):
    """The quantize arguments after the peers' flags are translated (no work done)."""
    args = build_parser().parse_args(["quantize", *argv])
    assert peer_flags.apply(args) is None
    return args


@pytest.mark.parametrize("flag", sorted(peer_flags.ANSWERS))
def test_every_answered_flag_gets_one_line_with_lowbit_equivalent(flag, capsys):
    code, out, err = run(capsys, "quantize", "demo", "-o", "/nonexistent/out", flag, "1")
    line = one_error_line(err)
    assert code == 2 and out == "" and line.startswith(f"error: {flag} is ") and "in lowbit:" in line


def test_answered_on_every_command_and_with_dashes(capsys):
    code, _, err = run(capsys, "eval", "demo", "--multi-gpu")
    assert code == 2 and "--nproc N" in one_error_line(err)


def test_misspelled_flag_gets_the_nearest(capsys):
    code, _, err = run(capsys, "eval", "demo", "--seq_lne", "8")
    assert code == 2 and "did you mean --seq_len?" in one_error_line(err)


def test_quark_flags_translate():
    args = translated("--model_dir", "M", "--output_dir", "O", "--quant_scheme", "w_uint4_per_group_asym",
                      "--group_size", "64", "--quant_algo", "quarot,awq", "--model_export", "hf_format", "gguf",
                      "--custom_mode", "awq", "--dataset", "pileval_for_awq_benchmark", "--kv_cache_dtype", "fp8",
                      "--data_type", "bfloat16", "--skip_evaluation", "--device", "cpu", "--eval_task",
                      "lambada_openai")
    assert (args.model, args.output, args.algo, args.export) == ("M", "O", "rotation,awq", "awq,gguf")
    assert (args.calib_dtype, args.kv_cache_dtype, args.tasks, args.device) == ("bfloat16", "fp8", "lambada_openai",
                                                                               "cpu")
    assert translated("--model_dir", "M", "--model_export", "hf_format").export == "compressed-tensors"
    assert translated("M", "--model_export", "hf_format", "--custom_mode", "fp8").export == "compressed-tensors"
    assert translated("M", "--model_export", "onnx", "--export", "gguf").export == "gguf,onnx"


def test_inc_flags_translate():
    args = translated("--model", "M", "--quantize", "--approach", "weight_only", "--algorithm", "GPTQ",
                      "--woq_bits", "3", "--woq_group_size", "32", "--woq_scheme", "asym", "--gptq_actorder",
                      "--gptq_percdamp", "0.02", "--gptq_max_seq_length", "256", "--accuracy", "--tasks",
                      "lambada_openai")
    assert (args.model, args.algo, args.scheme, args.group_size) == ("M", "gptq", "w_uint3_per_group_asym", 32)
    assert args.algo_arg == ["gptq:act_order=true,damp=0.02"] and args.seq_len == 256
    assert args.tasks == "lambada_openai" and not args.eval  # --accuracy with --tasks: the tasks
    per_channel = translated("M", "--woq_algo", "RTN", "--woq_bits", "8", "--woq_group_size", "-1", "--accuracy")
    assert (per_channel.scheme, per_channel.group_size, per_channel.eval) == ("w_int8_per_channel_sym", None, True)
    assert translated("M", "--woq_bits", "4").scheme == "w_int4_per_group_sym"


def test_modelopt_flags_translate():
    args = translated("--pyt_ckpt_path", "M", "--export_path", "O", "--qformat", "int4_awq", "--calib_size", "16",
                      "--kv_cache_qformat", "fp8")
    assert (args.model, args.output, args.scheme, args.group_size, args.algo) == ("M", "O", "w_int4_per_group_sym",
                                                                                   128, "awq")
    assert args.kv_cache_dtype == "fp8"
    assert translated("M", "--qformat", "int8_sq").algo == "smoothquant"


@pytest.mark.parametrize("argv,expected", [
    (["--quant_algo", "autosmoothquant"], "--algo smoothquant"),
    (["--quant_algo", "gptq", "--algo", "awq"], "give one of them"),
    (["--model_export", "quark_safetensors"], "does not write Quark's own layout"),
    (["--custom_mode", "awq"], "add --model_export hf_format"),
    (["--model_reload"], "needs both --model_reload and --import_model_dir"),
    (["--woq_dtype", "nf4"], "no nf4"),
    (["--woq_bits", "4", "--scheme", "w_fp8"], "give --scheme alone"),
    (["--woq_group_size", "0"], "positive group size or -1"),
    (["--qformat", "w4a8_awq"], "no lowbit scheme"),
    (["--qformat", "int3"], "unknown --qformat"),
    (["--model_dir", "A"], "given twice"),
])
def test_peer_flag_refusals(argv, expected):
    args = build_parser().parse_args(["quantize", "M", *argv])
    with pytest.raises(LowbitError, match=expected.replace("(", r"\(")):
        peer_flags.apply(args)


@pytest.mark.parametrize("name,expected", [
    ("w_int4_g128", "w_int4_per_group_sym --group-size 128"),
    ("w4a16_g128", "w_int4_per_group_sym --group-size 128"),
    ("int4_awq", "w_int4_per_group_sym --algo awq"),
    ("uint4_asym_gs64", "w_uint4_per_group_asym --group-size 64"),
    ("w8a8", "w_int8_a_int8_per_channel_sym"),
    ("int8", "w_int8_per_channel_sym"),
    ("w4a8", None), ("nonsense", None),
])
def test_foreign_scheme_spellings(name, expected):
    assert lowbit_spelling(name) == expected


def test_unknown_scheme_suggests_lowbit_spelling(capsys, tmp_path):
    code, _, err = run(capsys, "quantize", "demo", "-o", tmp_path / "q", "--scheme", "w_int4_g128")
    assert code == 2 and "did you mean w_int4_per_group_sym --group-size 128?" in one_error_line(err)
    assert not (tmp_path / "q").exists()


def test_dataset_aliases(monkeypatch):
    from lowbit import data

    seen = []
    monkeypatch.setattr(data, "_hf_text", lambda name, purpose: seen.append(name) or "text")
    data.load_text("pileval_for_awq_benchmark", "calib")
    data.load_text("wikitext_for_gptq_benchmark", "eval")
    assert seen == ["pileval", "wikitext2"]


def test_inc_command_end_to_end(capsys, tiny_models, tmp_path, text_file):
    out = tmp_path / "inc"
    code, stdout, err = run(capsys, "quantize", "--model", tiny_models["llama"], "--output_dir", out, "--quantize",
                            "--approach", "weight_only", "--algorithm", "RTN", "--woq_bits", "4", "--woq_group_size",
                            "32", "--woq_scheme", "asym", "--accuracy", "--dataset", text_file, "--seq_len", "32",
                            "--max_chunks", "2", "--no-progress")
    assert code == 0, err
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["scheme"]["name"] == "w_uint4_per_group_asym" and recipe["scheme"]["weight"]["group_size"] == 32
    assert "perplexity:" in stdout  # --accuracy without --tasks: perplexity of the result


def test_quark_command_end_to_end_and_reload(capsys, tiny_models, tmp_path, text_file):
    out = tmp_path / "quark"
    code, stdout, err = run(capsys, "quantize", "--model_dir", tiny_models["llama"], "--output_dir", out,
                            "--quant_scheme", "w_uint4_per_group_asym", "--group_size", "16", "--quant_algo", "awq",
                            "--num_calib_data", "2", "--seq_len", "32", "--dataset", text_file, "--model_export",
                            "hf_format", "--custom_mode", "awq", "--skip_evaluation", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "quark-awq" / "config.json").is_file()
    assert json.loads((out / "summary.json").read_text())["algorithms"] == ["awq", "rtn"]
    code, stdout, err = run(capsys, "quantize", "--model_reload", "--import_model_dir", out, "--dataset", text_file,
                            "--seq_len", "32", "--max_chunks", "2", "--no-progress")
    assert code == 0, err
    assert "perplexity" in stdout and "quantized" in stdout


def test_tasks_are_checked_before_quantizing(capsys, tiny_models, tmp_path):
    pytest.importorskip("lm_eval")
    code, _, err = run(capsys, "quantize", tiny_models["llama"], "-o", tmp_path / "q", "--woq_bits", "4",
                       "--tasks", str(tmp_path / "missing.yaml"), "--no-progress")
    assert code == 2 and not (tmp_path / "q").exists()
    one_error_line(err)
